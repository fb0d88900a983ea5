"""The ops pack and the container files, checked without Docker (DESIGN §10: no engine here).

- deploy/prometheus/alerts.yml is a Prometheus rule file, and every metric it names is one a
  real broker exposes on /metrics; the same for every query of the Grafana dashboard.
- Dockerfile, .dockerignore and compose.yaml are checked statically: multi-stage slim base,
  non-root user, health check on /healthz, no secrets in the build context, the services and
  ports of DESIGN.
- The compose stack's moving parts run for real, minus the containers: certs-init.sh and
  openbao-init.sh set up a PKI and a fresh OpenBao, the broker serves the compose broker.toml
  (paths moved under a temp dir), the sample job's script fetches and uses a token, and the
  image's health check command passes against the broker.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import tomllib
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml

from broker.config import _plaintext_problem, check_config, load_config
from broker.devserver import OpenBaoDevServer
from tests.conftest import Pki, RunningBroker, assert_no_leaks, run_config, token_is_valid
from tests.test_examples import BIN, Ran, Shell, assert_tokens_hidden, clean_env, run

MODULE_LOOP = pytest.mark.asyncio(loop_scope="module")

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "broker-dashboard.json"
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE_DIR = ROOT / "deploy" / "compose"

# Series Prometheus makes itself (not on the broker's /metrics).
PROMETHEUS_SERIES = {"up"}
PROMQL_WORDS = {
    # aggregations, set operators and modifiers
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values",
    "group", "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "offset", "bool", "inf", "nan",
}


# --- PromQL: which metric names an expression reads -----------------------------------------

def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (or a Grafana label_values() query)."""
    by_name = {name for alternatives in re.findall(r'__name__\s*=~?\s*"([^"]*)"', expr)
               for name in alternatives.split("|")}  # {__name__=~"a|b"} selects metrics a and b
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range and subquery selectors
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\$\w+", "", text)  # Grafana variables
    text = re.sub(r"\blabel_values\((.*),\s*\w+\s*\)", r"label_values(\1)", text)  # its label argument
    names = set(by_name)
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*\()?", text):
        word, call = match[1], match[2]
        if call or word.lower() in PROMQL_WORDS:
            continue  # a function (rate, time, label_values, ...) or a keyword
        if re.fullmatch(r"\d+[smhdwy]", word):
            continue
        names.add(word)
    return names


def test_metric_names_reads_promql() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, operation) (rate(broker_vault_request_duration_seconds_bucket'
            '{instance=~"$instance", x="a{b}"}[$__rate_interval]))) and on(profile) up{job="x"} == 0 '
            "or (broker_a unless broker_a offset 10m) - time() < 300")
    assert metric_names(expr) == {"broker_vault_request_duration_seconds_bucket", "up", "broker_a"}
    assert metric_names('label_values(broker_token_generation{instance=~"$instance"}, profile)') == {
        "broker_token_generation"}
    assert metric_names('label_values({__name__=~"broker_a|broker_b", instance=~"$instance"}, profile)') == {
        "broker_a", "broker_b"}


def test_the_profile_variable_lists_shared_and_per_job_profiles() -> None:
    # Shared profiles have a generation series from the start, per-job ones a reuse counter;
    # neither has the other, so the variable reads both.
    query = dict(dashboard_queries(dashboard()))["variable profile"]
    assert metric_names(query) == {"broker_token_generation", "broker_token_reuse_detected_total"}


# --- alerts.yml -----------------------------------------------------------------------------

def alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text())
    assert set(data) == {"groups"}
    rules = []
    for group in data["groups"]:
        assert set(group) <= {"name", "interval", "rules", "limit"} and group["name"]
        rules += group["rules"]
    return rules


def test_alert_rules_have_prometheus_rule_file_shape() -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), "alert names are unique"
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}, rule
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", rule["alert"])
        assert isinstance(rule["expr"], str) and rule["expr"].strip()
        assert re.fullmatch(r"\d+[smh]", str(rule["for"])), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert {"summary", "description"} <= set(rule["annotations"])
        assert "Runbook" in rule["annotations"]["description"], f"{rule['alert']}: say what to do"
        assert rule["expr"].count("(") == rule["expr"].count(")")


def test_alert_rules_cover_what_ops_needs() -> None:
    exprs = {r["alert"]: " ".join(r["expr"].split()) for r in alert_rules()}
    wanted = {
        "rotation failing": r"broker_rotation_consecutive_failures >= 2",
        "current token expires in < 5 min":
            r'broker_token_expiry_timestamp_seconds\{slot="current"\} - time\(\)\) < 300',
        "not authenticated to Vault": r"broker_vault_authenticated == 0",
        "reuse detected": r"increase\(broker_token_reuse_detected_total\[10m\]\) > 0",
        "no valid token (readiness)": r'broker_token_expiry_timestamp_seconds\{slot="current"\} <= time\(\)',
        "broker down": r"up\{job=\"token-broker\"\} == 0",
    }
    for what, pattern in wanted.items():
        assert any(re.search(pattern, e) for e in exprs.values()), f"no alert for {what}"
    expiring = next(e for e in exprs.values() if "< 300" in e)
    assert "> time()" in expiring or "> 0" in expiring, "an empty slot (0) is not 'expiring soon'"


# --- the Grafana dashboard ------------------------------------------------------------------

def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def dashboard_queries(data: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for panel in data["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]
    for variable in data["templating"]["list"]:
        query = variable["query"]
        yield f"variable {variable['name']}", query["query"] if isinstance(query, dict) else query


def test_dashboard_is_an_importable_grafana_dashboard() -> None:
    data = dashboard()
    assert 36 <= data["schemaVersion"] <= 41
    assert data["uid"] and data["title"]
    assert any(i["name"] == "DS_PROMETHEUS" and i["pluginId"] == "prometheus" for i in data["__inputs"])
    ids = [p["id"] for p in data["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in data["panels"]:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["type"] in ("timeseries", "stat", "gauge", "table", "bargauge")
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not mine & cells, f"panel {panel['title']!r} overlaps another"
        cells |= mine
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"
            assert target["expr"].count("(") == target["expr"].count(")")


def test_dashboard_has_the_panels_ops_asked_for() -> None:
    exprs = [" ".join(e.split()) for _, e in dashboard_queries(dashboard())]
    wanted = {
        "requests by outcome": r"by \(profile, outcome\) \(rate\(broker_token_requests_total",
        "rotation history": r"by \(profile, outcome\) \(increase\(broker_rotations_total",
        "seconds to expiry per profile": r'broker_token_expiry_timestamp_seconds\{slot="current".*\} - time\(\)',
        "Vault latency": r"histogram_quantile\(0\.99, .*broker_vault_request_duration_seconds_bucket",
        "revocations pending": r"broker_revocations_pending",
        "reuse detected": r"broker_token_reuse_detected_total",
    }
    for what, pattern in wanted.items():
        assert any(re.search(pattern, e) for e in exprs), f"no panel for {what}"


# --- Dockerfile and .dockerignore -----------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    found = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def _exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def healthcheck_command() -> list[str]:
    (check,) = [args for word, args in dockerfile_instructions() if word == "HEALTHCHECK"]
    options, _, command = check.partition("CMD ")
    assert "--interval=" in options and "--timeout=" in options
    return _exec_form(command)


def test_dockerfile_multi_stage_slim_non_root_with_healthcheck() -> None:
    instructions = dockerfile_instructions()
    words = [w for w, _ in instructions]
    args = dict(a.split("=", 1) for w, a in instructions if w == "ARG" and "=" in a)
    bases = [a.split()[0].replace("${PYTHON_IMAGE}", args.get("PYTHON_IMAGE", "")) for w, a in instructions
             if w == "FROM"]
    assert len(bases) >= 2, "multi-stage"
    assert all(re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", b) for b in bases), bases
    users = [a for w, a in instructions if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image runs as an unprivileged user"
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN"), "USER after the last RUN"
    command = healthcheck_command()
    assert command[0] == "python" and "urllib" in " ".join(command) and "curl" not in " ".join(command)
    env = " ".join(a for w, a in instructions if w == "ENV")
    assert "BROKER_HEALTH_URL=http://127.0.0.1:9090/healthz" in env
    assert _exec_form(next(a for w, a in instructions if w == "ENTRYPOINT")) == ["broker"]
    assert _exec_form(next(a for w, a in instructions if w == "CMD")) == [
        "serve", "--config", "/etc/token-broker/broker.toml"]
    assert "8443" in next(a for w, a in instructions if w == "EXPOSE") and "9090" in next(
        a for w, a in instructions if w == "EXPOSE")
    assert any(w == "VOLUME" and "/var/lib/token-broker" in a for w, a in instructions)


def test_dockerfile_bakes_in_no_secrets() -> None:
    for word, arguments in dockerfile_instructions():
        if word in ("ENV", "ARG", "LABEL"):
            names = re.findall(r"([\w.-]+)=", arguments)
            assert not [n for n in names if re.search(r"(?i)token|secret|password|role_id", n)], arguments
        if word in ("COPY", "ADD") and "--from=" not in arguments:
            sources = shlex.split(arguments)[:-1]
            assert not any(re.search(r"(?i)\.key$|secret|certs|\.broker-dev|\.pem$", s) for s in sources), sources


def _ignored(path: str, patterns: Iterable[str]) -> bool:
    """Docker's .dockerignore matching, enough for these patterns (``**``, ``*``, dir/)."""
    result = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw.lstrip("!").strip("/")
        regex = "".join({"**/": "(.*/)?", "**": ".*"}.get(part) or
                        re.escape(part).replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
                        for part in re.split(r"(\*\*/?)", pattern) if part)
        if re.fullmatch(regex + "(/.*)?", path):
            result = not negate
    return result


def dockerignore() -> list[str]:
    return [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def test_dockerignore_keeps_secrets_out_and_the_build_inputs_in() -> None:
    patterns = dockerignore()
    for secret in ("certs/server.key", ".broker-dev/certs/job.key", "secrets/secret_id", "x/y/role_id",
                   ".venv/bin/python", ".git/config", "state/revocations.json", "audit.jsonl", "a/b.pem",
                   "deploy/compose/broker.toml"):
        assert _ignored(secret, patterns), f"{secret} would be sent to the Docker daemon"
    copied = []
    for word, arguments in dockerfile_instructions():
        if word == "COPY" and "--from=" not in arguments:
            for source in shlex.split(arguments)[:-1]:
                assert not _ignored(source.rstrip("/"), patterns), f"COPY {source} is excluded by .dockerignore"
                copied.append(source.rstrip("/"))
    needed = _build_inputs()
    assert not [p for p in needed if _ignored(p, patterns)]
    # `pip install .` in the image fails on a readme or license file the build stage left out.
    assert not [p for p in needed if not any(p == c or p.startswith(c + "/") for c in copied)]


def _build_inputs() -> list[str]:
    """What building the package reads: pyproject.toml, the files it names, broker/."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return (["pyproject.toml", project["readme"], *project["license-files"]]
            + [str(p.relative_to(ROOT)) for p in (ROOT / "broker").rglob("*.py")])


# --- compose.yaml ---------------------------------------------------------------------------

def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def test_compose_has_openbao_init_broker_and_job() -> None:
    services = compose()["services"]
    assert {"openbao", "openbao-init", "certs-init", "broker", "job"} <= set(services)

    openbao = services["openbao"]
    assert openbao["image"].startswith("openbao/openbao")
    assert "-dev" in openbao["command"]
    assert _env(openbao)["BAO_DEV_ROOT_TOKEN_ID"] == "root"
    assert _env(openbao)["BAO_DEV_LISTEN_ADDRESS"] == "0.0.0.0:8200"
    assert openbao["healthcheck"]["test"]

    init = services["openbao-init"]
    assert init["image"] == openbao["image"]
    assert _env(init)["BAO_ADDR"] == "http://openbao:8200" and _env(init)["BAO_TOKEN"] == "root"
    assert init["depends_on"]["openbao"]["condition"] == "service_healthy"

    broker = services["broker"]
    assert broker["build"]["context"] == "." and broker["build"].get("dockerfile", "Dockerfile") == "Dockerfile"
    assert broker["command"] == ["serve", "--config", "/etc/token-broker/broker.toml"]
    assert str(broker["user"]).split(":")[0] not in ("0", "root")
    assert broker["healthcheck"]["test"] and "9090" in " ".join(broker["healthcheck"]["test"])
    assert broker["depends_on"]["openbao-init"]["condition"] == "service_completed_successfully"
    assert broker["depends_on"]["certs-init"]["condition"] == "service_completed_successfully"
    assert sorted(broker["ports"]) == ["127.0.0.1:8443:8443", "127.0.0.1:9090:9090"], "DESIGN ports, loopback only"
    mounts = {v.split(":")[1]: v.split(":")[0] for v in broker["volumes"]}
    assert mounts["/etc/token-broker/broker.toml"] == "./deploy/compose/broker.toml"
    assert {"/etc/token-broker/certs", "/etc/token-broker/secrets", "/var/lib/token-broker"} <= set(mounts)

    job = services["job"]
    env = _env(job)
    assert env["BROKER_URL"] == "https://broker:8443"
    assert {"BROKER_CERT", "BROKER_KEY", "BROKER_CA"} <= set(env)
    assert job["depends_on"]["broker"]["condition"] == "service_healthy"
    assert str(job["user"]).split(":")[0] not in ("0", "root")
    assert "job.sh" in " ".join(job["entrypoint"]) and "broker get" in (COMPOSE_DIR / "job.sh").read_text()


def test_compose_wiring_is_consistent() -> None:
    data = compose()
    services = data["services"]
    declared = set(data["volumes"])
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"
            else:
                assert source in declared, f"{name} uses undeclared volume {source}"
        for dependency in service.get("depends_on", {}):
            assert dependency in services
    # The same volume is where one service writes and another reads.
    by_path = {name: {v.split(":")[1]: v.split(":")[0] for v in s.get("volumes", [])} for name, s in services.items()}
    init_env = _env(services["certs-init"])
    assert by_path["certs-init"][init_env["BROKER_CERTS_DIR"]] == by_path["broker"]["/etc/token-broker/certs"]
    assert by_path["certs-init"][init_env["JOB_CERTS_DIR"]] == by_path["job"][
        str(Path(_env(services["job"])["BROKER_CERT"]).parent)]
    assert by_path["openbao-init"][_env(services["openbao-init"])["SECRETS_DIR"]] == by_path["broker"][
        "/etc/token-broker/secrets"]
    assert "broker" in init_env["SERVER_HOSTS"].split(), "the server cert must name the compose host"
    # The uid the init steps chown to is the one the broker and the job run as.
    uid = _env(services["openbao-init"])["BROKER_UID"]
    assert init_env["BROKER_UID"] == uid == str(services["broker"]["user"]).split(":")[0]
    assert "USER 10001:10001" in DOCKERFILE.read_text() and uid == "10001"
    # The compose config names the compose hosts and ports.
    text = (COMPOSE_DIR / "broker.toml").read_text()
    assert 'address = "http://openbao:8200"' in text
    # Without the opt-in, `broker serve` refuses plain http:// to a host that is not loopback;
    # the stack test below runs on loopback and would not notice.
    assert _plaintext_problem("http://openbao:8200") is not None
    assert re.search(r'(?m)^allow_plaintext = true$', text.split("[vault]")[1].split("[")[0])
    assert 'listen = "0.0.0.0:8443"' in text and 'listen = "0.0.0.0:9090"' in text


# --- the compose stack without containers ---------------------------------------------------

COMPOSE_STATE = "/var/lib/token-broker"
# Test-only addition to the served config: a per-job profile, so that the refresh-token reuse
# counter can be made to appear on /metrics. The compose config itself is checked unchanged.
PER_JOB_PROFILE = """
[profiles.release]
mode = "per-job"
token_role = "demo"
policies = ["demo"]
ttl = "60s"
grace = "2s"
allow = ["cn:job"]
"""


@dataclass
class Stack:
    """What compose.yaml would have running: OpenBao, the init steps' output, the broker."""

    root: Path
    vault: OpenBaoDevServer
    b: RunningBroker
    env: dict[str, str]  # PATH with this environment's broker, bao and python
    inits: dict[str, Ran]  # the init scripts' runs
    exposed: set[str]  # every metric name on the broker's /metrics

    def dir(self, name: str) -> Path:
        return self.root / name

    @property
    def etc(self) -> Path:
        return self.root / "etc" / "token-broker"

    def job_env(self, cert: str = "job") -> dict[str, str]:
        certs = self.dir(f"{cert}-certs")
        return {**self.env, "BROKER_URL": self.b.url, "BROKER_CERT": str(certs / f"{cert}.pem"),
                "BROKER_KEY": str(certs / f"{cert}.key"), "BROKER_CA": str(certs / "ca.pem"),
                "VAULT_ADDR": self.vault.address}


@asynccontextmanager
async def serving(config_path: Path, vault: OpenBaoDevServer, pki: Pki,
                  log_lines: list[str]) -> AsyncIterator[RunningBroker]:
    """``broker serve`` of this config in this event loop, leak-scanned when it stops."""
    config = load_config(config_path)
    running = await run_config(config, config_path.parent, pki, vault, {})
    try:
        await running.wait_for(lambda: all(s.current is not None for s in running.broker.cache.all()),
                               what="a first token")
        yield running
    finally:
        await running.shutdown()
        assert_no_leaks(running, log_lines)


async def _exercise_for_metrics(b: RunningBroker) -> set[str]:
    """A fetch, a rotation and a refresh-token reuse (labelled counters appear on first use);
    then every metric name on /metrics."""
    await b.get_token("demo")
    status, body, _ = await b.request("POST", "/v1/tokens/demo/rotate", cert="ops")
    assert status == 200, body
    status, family, _ = await b.request("POST", "/v1/tokens/release")
    assert status == 200, family
    b.seen_secrets.add(family["refresh_token"])
    stolen = {"refresh_token": family["refresh_token"]}
    status, body, _ = await b.request("POST", "/v1/refresh", cert="ops", json=stolen)
    assert status == 401 and body["error"] == "refresh_token_reused", body
    status, text = await b.ops("/metrics")
    assert status == 200
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory, log_lines: list[str]) -> AsyncIterator[Stack]:
    """certs-init → openbao-init → broker with compose's broker.toml, as compose runs them,
    with the container-only paths and addresses moved to this machine."""
    root = tmp_path_factory.mktemp("compose")
    etc = root / "etc" / "token-broker"
    shell = Shell.make(root)
    env = clean_env()
    env["PATH"] = os.pathsep.join([str(shell.dir / "shim"), str(BIN), env.get("PATH", "/usr/bin:/bin")])
    inits: dict[str, Ran] = {}
    inits["certs-init"] = await run(["sh", str(COMPOSE_DIR / "certs-init.sh")], {
        **env, "PKI_DIR": str(root / "pki"), "BROKER_CERTS_DIR": str(etc / "certs"),
        "JOB_CERTS_DIR": str(root / "job-certs"), "OPS_CERTS_DIR": str(root / "ops-certs"),
        "SERVER_HOSTS": "broker localhost 127.0.0.1"}, root)
    assert inits["certs-init"].code == 0, inits["certs-init"]
    with OpenBaoDevServer(log_path=root / "openbao.log") as vault:
        inits["openbao-init"] = await run(["sh", str(COMPOSE_DIR / "openbao-init.sh")], {
            **env, "BAO_ADDR": vault.address, "BAO_TOKEN": "root", "SECRETS_DIR": str(etc / "secrets")}, root)
        assert inits["openbao-init"].code == 0, inits["openbao-init"]
        text = (COMPOSE_DIR / "broker.toml").read_text()
        text = text.replace(f'"{COMPOSE_STATE}', f'"{root}{COMPOSE_STATE}')
        text = text.replace('"0.0.0.0:8443"', '"127.0.0.1:0"').replace('"0.0.0.0:9090"', '"127.0.0.1:0"')
        text = text.replace('"http://openbao:8200"', f'"{vault.address}"')
        (etc / "broker.toml").write_text(text)
        problems = check_config(etc / "broker.toml")
        assert problems == [], problems
        (etc / "served.toml").write_text(text + PER_JOB_PROFILE)
        async with serving(etc / "served.toml", vault, Pki(root / "pki", root / "pki"), log_lines) as b:
            exposed = await _exercise_for_metrics(b)
            yield Stack(root, vault, b, env, inits, exposed)


@MODULE_LOOP
async def test_compose_init_steps_make_what_the_broker_and_job_mount(stack: Stack) -> None:
    assert sorted(p.name for p in (stack.etc / "certs").iterdir()) == ["ca.pem", "server.key", "server.pem"]
    assert sorted(p.name for p in stack.dir("job-certs").iterdir()) == ["ca.pem", "job.key", "job.pem"]
    assert sorted(p.name for p in stack.dir("ops-certs").iterdir()) == ["ca.pem", "ops.key", "ops.pem"]
    for key in (stack.etc / "certs" / "server.key", stack.dir("job-certs") / "job.key",
                stack.etc / "secrets" / "role_id", stack.etc / "secrets" / "secret_id"):
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600, key
    secret_id = (stack.etc / "secrets" / "secret_id").read_text().strip()
    ran = stack.inits["openbao-init"]
    assert secret_id and secret_id not in ran.out + ran.err, "openbao-init must not print the secret_id"


@MODULE_LOOP
async def test_compose_job_fetches_a_token_and_uses_it_at_openbao(stack: Stack) -> None:
    ran = await run(["sh", str(COMPOSE_DIR / "job.sh")], stack.job_env(), stack.root)
    assert ran.code == 0, ran
    assert "job: got a token valid at OpenBao" in ran.out and "demo" in ran.out
    stack.b.remember_tokens()
    assert_tokens_hidden(stack.b, stack.b.seen_secrets, ran.out, ran.err)


@MODULE_LOOP
async def test_compose_rotate_service_rotates_with_the_ops_cert(stack: Stack) -> None:
    """``docker compose run --rm rotate``: broker + the rotate service's command, ops certificate."""
    generation = stack.b.generation("demo")
    rotate = compose()["services"]["rotate"]
    assert {"BROKER_CERT": "/certs/ops.pem"}.items() <= _env(rotate).items()
    ran = await run(["broker", *rotate["command"]], stack.job_env("ops"), stack.root)
    assert ran.code == 0, ran
    assert json.loads(ran.out)["generation"] == generation + 1 == stack.b.generation("demo")
    stack.b.remember_tokens()
    current = stack.b.broker.cache.get("demo")
    assert current is not None and current.current is not None and token_is_valid(stack.vault, current.current.value)


@MODULE_LOOP
async def test_image_and_compose_healthchecks_pass_against_the_broker(stack: Stack) -> None:
    health = healthcheck_command()
    ok = await run(health, {**stack.env, "BROKER_HEALTH_URL": f"{stack.b.ops_url}/healthz"}, stack.root)
    assert ok.code == 0, ok
    down = await run(health, {**stack.env, "BROKER_HEALTH_URL": "http://127.0.0.1:1/healthz"}, stack.root)
    assert down.code != 0
    test = compose()["services"]["broker"]["healthcheck"]["test"]
    assert test[0] == "CMD" and "http://127.0.0.1:9090/readyz" in test[-1]
    ok = await run([*test[1:-1], test[-1].replace("http://127.0.0.1:9090", stack.b.ops_url)], stack.env, stack.root)
    assert ok.code == 0, ok


@MODULE_LOOP
async def test_every_metric_in_the_alert_rules_is_exposed(stack: Stack) -> None:
    for rule in alert_rules():
        unknown = metric_names(rule["expr"]) - stack.exposed - PROMETHEUS_SERIES
        assert not unknown, f"{rule['alert']} reads metrics the broker does not expose: {unknown}"


@MODULE_LOOP
async def test_every_metric_on_the_dashboard_is_exposed(stack: Stack) -> None:
    for where, expr in dashboard_queries(dashboard()):
        unknown = metric_names(expr) - stack.exposed
        assert not unknown, f"{where} reads metrics the broker does not expose: {unknown}"
