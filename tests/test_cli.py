"""The ``broker`` command line as users run it: real subprocesses (``python -m broker``) against a
real broker on real mTLS sockets (DESIGN §4).

The broker runs in this module's event loop, so every subprocess goes through asyncio's
subprocess API (a blocking ``subprocess.run`` would freeze the broker it talks to). Every run
is bounded by a timeout. Errors must be one line on stderr, no traceback, never a token, with
exit code 0 ok, 1 runtime failure, 2 usage or configuration error.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import shlex
import signal
import socket
import stat
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import hvac
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from broker import certs
from broker.devserver import OpenBaoDevServer, free_port
from tests.conftest import (DEFAULT_PROFILE, Pki, RunningBroker, assert_still_serving, module_broker, token_is_valid,
                            write_config)
from tests.processes import Ran, run_process

pytestmark = pytest.mark.asyncio(loop_scope="module")

RUN_TIMEOUT = 30.0


b = module_broker("cli", {"demo": {}, "ops-only": {"allow": ["cn:ops"]}})


# --- running the CLI ------------------------------------------------------------------------

Run = Ran  # how a `broker` command ended: code, out, err


def clean_env(**overrides: str | None) -> dict[str, str]:
    """This process's environment without anything the CLI reads, plus ``overrides`` (None drops)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("BROKER_", "VAULT_", "BAO_")) and k != "GITHUB_ACTIONS"}
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def job_env(b: RunningBroker, cert: str = "job", **overrides: str | None) -> dict[str, str]:
    pem, key = b.pki.pair(cert)
    return clean_env(**{"BROKER_URL": b.url, "BROKER_CERT": str(pem), "BROKER_KEY": str(key),
                        "BROKER_CA": str(b.pki.ca), **overrides})


async def broker_cli(*args: str, env: Mapping[str, str] | None = None, cwd: Path | None = None,
                     timeout: float = RUN_TIMEOUT) -> Run:
    return await run_process([sys.executable, "-m", "broker", *args],
                             env if env is not None else clean_env(), cwd, timeout)


def secrets_of(b: RunningBroker) -> set[str]:
    b.remember_tokens()
    return set(b.seen_secrets)


def assert_one_line_error(run: Run, code: int, *needles: str, secrets: Iterable[str] = ()) -> str:
    """Exit ``code``, nothing on stdout, exactly one stderr line naming every needle, no secrets."""
    assert run.code == code, run
    assert run.out == "", run
    assert "Traceback" not in run.err, run.err
    lines = run.err.strip().splitlines()
    assert len(lines) == 1, run.err
    for needle in needles:
        assert needle in lines[0], lines[0]
    for secret in secrets:
        assert secret not in run.err
    return lines[0]


async def get_ok(b: RunningBroker, *args: str, env: Mapping[str, str] | None = None) -> Run:
    run = await broker_cli("get", *args, env=env if env is not None else job_env(b))
    assert run.code == 0, run
    assert "Traceback" not in run.err
    return run


def remember(b: RunningBroker, token: str) -> str:
    """The token came through a subprocess: let the leak scan know it, and check it is real."""
    b.seen_secrets.add(token)
    assert token_is_valid(b.vault, token)
    return token


# --- broker get: formats and outputs --------------------------------------------------------

async def test_get_raw_prints_the_bare_token(b: RunningBroker) -> None:
    run = await get_ok(b, "demo")
    assert run.out.endswith("\n") and run.out.count("\n") == 1
    token = remember(b, run.out.strip())
    assert run.err == ""
    state = b.broker.cache.get("demo")
    assert state is not None and state.current is not None and token == state.current.value


async def test_get_json_prints_the_api_body(b: RunningBroker) -> None:
    run = await get_ok(b, "demo", "--format", "json")
    body = json.loads(run.out)
    remember(b, body["token"])
    assert set(body) == {"profile", "token", "expires_at", "issued_at", "ttl", "generation"}
    assert body["profile"] == "demo" and body["ttl"] > 0


async def test_get_env_prints_an_export_line(b: RunningBroker) -> None:
    run = await get_ok(b, "demo", "--format", "env", "--env-name", "MY_TOKEN_2")
    assert run.out.startswith("export MY_TOKEN_2=") and run.out.count("\n") == 1
    (assignment,) = shlex.split(run.out.removeprefix("export "))
    name, _, token = assignment.partition("=")
    assert name == "MY_TOKEN_2"
    remember(b, token)


async def test_get_env_defaults_to_vault_token(b: RunningBroker) -> None:
    run = await get_ok(b, "demo", "--format", "env")
    assert run.out.startswith("export VAULT_TOKEN=")
    remember(b, shlex.split(run.out)[1].partition("=")[2])


async def test_get_output_writes_a_0600_file_and_nothing_to_stdout(b: RunningBroker, tmp_path: Path) -> None:
    target = tmp_path / "sub" / "token.txt"
    served = _served(b)
    missing = await broker_cli("get", "demo", "--output", str(target), env=job_env(b))
    # Checked before the fetch (exit 2): a typo creates nothing and fetches nothing.
    assert_one_line_error(missing, 2, "cannot write the --output file", str(target), "does not exist")
    assert not target.parent.exists() and _served(b) == served
    target.parent.mkdir()
    run = await get_ok(b, "demo", "--output", str(target))
    assert run.out == ""
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    token = remember(b, target.read_text().strip())
    assert token not in run.err and str(target) in run.err
    assert [p.name for p in target.parent.iterdir()] == ["token.txt"], "no temp file left behind"


async def test_get_output_replaces_a_world_readable_file_with_a_0600_one(b: RunningBroker, tmp_path: Path) -> None:
    target = tmp_path / "token.env"
    target.write_text("old\n")
    target.chmod(0o644)
    run = await get_ok(b, "demo", "--format", "env", "--output", str(target))
    assert run.out == ""
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    remember(b, shlex.split(target.read_text())[1].partition("=")[2])


async def test_get_under_github_actions_masks_the_token_on_stderr(b: RunningBroker) -> None:
    """stdout holds the token alone, so VAULT_TOKEN=$(broker get demo) and `>> "$GITHUB_ENV"`
    work; the runner reads the mask command from stderr."""
    run = await get_ok(b, "demo", env=job_env(b, GITHUB_ACTIONS="true"))
    token = run.out.removesuffix("\n")
    assert run.out == token + "\n" and "\n" not in token, "one line: the token alone"
    remember(b, token)
    assert run.err == f"::add-mask::{token}\n"


async def test_get_under_github_actions_masks_even_with_output(b: RunningBroker, tmp_path: Path) -> None:
    target = tmp_path / "t"
    run = await get_ok(b, "demo", "--output", str(target), env=job_env(b, GITHUB_ACTIONS="true"))
    token = remember(b, target.read_text().strip())
    assert run.out == ""
    assert run.err.splitlines()[0] == f"::add-mask::{token}"


async def test_get_with_min_ttl(b: RunningBroker) -> None:
    run = await get_ok(b, "demo", "--min-ttl", "10s", "--format", "json")
    body = json.loads(run.out)
    remember(b, body["token"])
    assert body["ttl"] >= 10


# --- broker get: errors -----------------------------------------------------------------------

async def test_get_without_broker_cert_is_a_usage_error(b: RunningBroker) -> None:
    run = await broker_cli("get", "demo", env=job_env(b, BROKER_CERT=None))
    assert_one_line_error(run, 2, "BROKER_CERT")


async def test_get_with_a_missing_cert_file_is_a_usage_error(b: RunningBroker, tmp_path: Path) -> None:
    missing = tmp_path / "gone.pem"
    run = await broker_cli("get", "demo", env=job_env(b, BROKER_CERT=str(missing)))
    assert_one_line_error(run, 2, "BROKER_CERT", str(missing))


async def test_get_with_a_key_that_does_not_match_the_cert_is_a_usage_error(b: RunningBroker) -> None:
    run = await broker_cli("get", "demo", env=job_env(b, BROKER_KEY=str(b.pki.pair("ops")[1])))
    assert_one_line_error(run, 2, "does not match")


@pytest.mark.parametrize(("url", "shown", "problem"), [
    ("http://localhost:8443", "http://localhost:8443", "https://"),
    ("https://localhost:notaport", "https://localhost:notaport", "not a valid URL (the port is not a number"),
    ("https://ci:Hunter2pw/x@localhost:1", "https://…@localhost:1", "the port is not a number"),
    ("https://localhost:1/?token=s.Part1@Part2pw", "https://…", "no path, query or fragment"),
    ("https://[::1", "https://[::1", "not a valid URL"),
    ("https://localhost:8443/v1", "https://localhost:8443/v1", "no path, query or fragment"),
    ("https://localhost:8443/?", "https://localhost:8443/?…", "no path, query or fragment"),
    ("https://localhost:8443#x", "https://localhost:8443#…", "no path"),
    ("https://localhost:8443/?token=s.FAKESECRET", "https://localhost:8443/?…", "no path, query or fragment"),
    ("https://localhost:8443#s.FAKESECRET", "https://localhost:8443#…", "no path, query or fragment"),
])
async def test_get_with_a_bad_broker_url_is_a_usage_error(b: RunningBroker, url: str, shown: str, problem: str) -> None:
    """The URL is repeated as far as it cannot be a secret: a query or fragment may hold a token."""
    run = await broker_cli("get", "demo", env=job_env(b, BROKER_URL=url))
    assert_one_line_error(run, 2, "BROKER_URL", repr(shown), problem, secrets=["FAKESECRET", "Hunter2pw", "Part2pw"])


@pytest.mark.parametrize("userinfo", ["ci-user:s3cr3t-pw@", "s3cr3t-pw@", "ci-user:s3cr3t-pw@[::1"])
async def test_get_with_a_password_in_broker_url_refuses_without_echoing_it(b: RunningBroker, userinfo: str) -> None:
    url = f"https://{userinfo}localhost:{b.broker.api_port}"
    run = await broker_cli("get", "demo", env=job_env(b, BROKER_URL=url))
    line = assert_one_line_error(run, 2, "BROKER_URL", secrets=["s3cr3t-pw", "ci-user"])
    assert "password" in line or "not a valid URL" in line, line


async def test_get_accepts_a_broker_url_with_a_trailing_slash(b: RunningBroker) -> None:
    run = await get_ok(b, "demo", env=job_env(b, BROKER_URL=b.url + "/"))
    remember(b, run.out.strip())


async def test_get_with_a_host_the_cert_is_not_issued_for_names_the_host(b: RunningBroker) -> None:
    """127.1 reaches the broker (it is 127.0.0.1) but is not a name in its certificate: the CA is right."""
    run = await broker_cli("get", "demo", env=job_env(b, BROKER_URL=f"https://127.1:{b.broker.api_port}"))
    line = assert_one_line_error(run, 1, "not issued for '127.1'", "BROKER_URL", "e.g. localhost",
                                 secrets=secrets_of(b))
    assert "is BROKER_CA the CA" not in line


async def test_get_with_the_wrong_ca_fails_without_retrying(b: RunningBroker) -> None:
    run = await broker_cli("get", "demo", env=job_env(b, BROKER_CA=str(b.pki.other_dir / "ca.pem")))
    assert_one_line_error(run, 1, "BROKER_CA", "is BROKER_CA the CA", secrets=secrets_of(b))


async def test_get_with_a_client_cert_the_broker_does_not_trust_says_so_at_once(b: RunningBroker) -> None:
    other = b.pki.other_dir
    env = job_env(b, BROKER_CERT=str(other / "job.pem"), BROKER_KEY=str(other / "job.key"))
    refused = b.metric("broker_tls_handshakes_total", outcome="failure") or 0
    run = await broker_cli("get", "demo", "--retries", "5", env=env)
    assert_one_line_error(run, 1, b.url, "does not trust the CA that signed it", "UNKNOWN_CA", "BROKER_CERT",
                          secrets=secrets_of(b))
    assert b.metric("broker_tls_handshakes_total", outcome="failure") == refused + 1, "not retried"


@pytest.mark.parametrize("when", ["expired", "not yet valid"])
async def test_get_with_a_client_cert_outside_its_validity_is_a_local_usage_error(
        b: RunningBroker, tmp_path: Path, when: str) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    window = (now - dt.timedelta(days=2), now - dt.timedelta(days=1)) if when == "expired" else (
        now + dt.timedelta(days=1), now + dt.timedelta(days=2))
    pem, key = b.pki.pair("job")
    ca_key = serialization.load_pem_private_key((b.pki.dir / "ca.key").read_bytes(), password=None)
    ca = x509.load_pem_x509_certificate(b.pki.ca.read_bytes())
    job = x509.load_pem_x509_certificate(pem.read_bytes())
    builder = x509.CertificateBuilder().subject_name(job.subject).issuer_name(ca.subject).public_key(
        job.public_key()).serial_number(x509.random_serial_number()).not_valid_before(window[0]).not_valid_after(
        window[1])
    for extension in job.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    (tmp_path / "job.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    handshakes = b.metric("broker_tls_handshakes_total", outcome="failure") or 0
    run = await broker_cli("get", "demo", env=job_env(b, BROKER_CERT=str(tmp_path / "job.pem"), BROKER_KEY=str(key)))
    expected = (f"expired at {cert.not_valid_after_utc.isoformat()}" if when == "expired"
                else f"is not valid until {cert.not_valid_before_utc.isoformat()}")
    assert_one_line_error(run, 2, f"client cert {tmp_path / 'job.pem'} {expected}")
    assert (b.metric("broker_tls_handshakes_total", outcome="failure") or 0) == handshakes, "never sent"


@pytest.mark.parametrize("cert", ["no-eku", "server-only"])
async def test_get_with_a_cert_not_issued_for_client_auth_says_so_at_once(b: RunningBroker, cert: str) -> None:
    refused = b.metric("broker_tls_handshakes_total", outcome="failure") or 0
    run = await broker_cli("get", "demo", "--retries", "5", env=job_env(b, cert))
    assert_one_line_error(run, 1, b.url, "not issued for client authentication", "clientAuth", "BROKER_CERT",
                          secrets=secrets_of(b))
    assert b.metric("broker_tls_handshakes_total", outcome="failure") == refused + 1, "not retried"
    await assert_still_serving(b)


@pytest.mark.parametrize(("cert", "profile"), [("stranger", "demo"), ("job", "no-such")])
async def test_get_forbidden_profile_exits_1_with_the_403_message(b: RunningBroker, cert: str, profile: str) -> None:
    run = await broker_cli("get", profile, env=job_env(b, cert))
    assert_one_line_error(run, 1, "403", "forbidden", "may not fetch", secrets=secrets_of(b))
    await assert_still_serving(b)


async def test_get_with_min_ttl_beyond_the_profile_exits_1_with_the_400_message(b: RunningBroker) -> None:
    run = await broker_cli("get", "demo", "--min-ttl", "1h", env=job_env(b))
    assert_one_line_error(run, 1, "400", "min_ttl", secrets=secrets_of(b))


async def test_get_when_the_broker_is_down_exits_1(b: RunningBroker) -> None:
    env = job_env(b, BROKER_URL=f"https://localhost:{free_port()}")
    run = await broker_cli("get", "demo", "--retries", "1", env=env)
    assert_one_line_error(run, 1, "cannot reach the broker", "2 attempts")


@pytest.mark.parametrize(("value", "problem"), [("ten", "ten"), ("1h1h", "1h1h"), ("=-5s", "negative")])
async def test_get_with_a_bad_min_ttl_is_a_usage_error(b: RunningBroker, value: str, problem: str) -> None:
    args = ["--min-ttl" + value] if value.startswith("=") else ["--min-ttl", value]
    run = await broker_cli("get", "demo", *args, env=job_env(b))
    assert_one_line_error(run, 2, "--min-ttl", problem)


async def test_get_with_a_dash_min_ttl_says_how_to_write_it(b: RunningBroker) -> None:
    # argparse reads "-5s" as an option, so the value never reaches the duration check.
    run = await broker_cli("get", "demo", "--min-ttl", "-5s", env=job_env(b))
    assert_one_line_error(run, 2, "--min-ttl", "OPTION=VALUE")


@pytest.mark.parametrize("name", ["1ABC", "A-B", "é"])
async def test_get_with_a_bad_env_name_is_a_usage_error(b: RunningBroker, name: str) -> None:
    run = await broker_cli("get", "demo", "--format", "env", "--env-name", name, env=job_env(b))
    assert_one_line_error(run, 2, "--env-name")


@pytest.mark.parametrize("args", [["--retries", "-1"], ["--format", "xml"]])
async def test_get_with_bad_arguments_is_a_one_line_usage_error(b: RunningBroker, args: list[str]) -> None:
    run = await broker_cli("get", "demo", *args, env=job_env(b))
    assert_one_line_error(run, 2, "--help")


async def test_get_with_a_directory_as_output_fetches_nothing(b: RunningBroker, tmp_path: Path) -> None:
    served = _served(b)
    run = await broker_cli("get", "demo", "--output", str(tmp_path), env=job_env(b))
    line = assert_one_line_error(run, 2, "the --output file", str(tmp_path), "not a regular file",
                                 secrets=secrets_of(b))
    assert "Errno" not in line
    assert _served(b) == served, "refused before the fetch: no token served that nobody receives"


async def test_get_output_to_something_not_a_regular_file_leaves_it_alone(b: RunningBroker, tmp_path: Path) -> None:
    # A FIFO stands for /dev/null: the atomic write would rename a file over it (as root, too).
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    run = await broker_cli("get", "demo", "--output", str(fifo), env=job_env(b))
    assert_one_line_error(run, 2, "the --output file", str(fifo), "not a regular file", secrets=secrets_of(b))
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


async def test_get_output_to_a_symbolic_link_is_refused_and_leaves_the_link(b: RunningBroker, tmp_path: Path) -> None:
    # As root, --output /dev/stdout (a link to /proc/self/fd/1) replaced the link itself with a
    # 0600 file holding the token: the job's later output went into it.
    target = tmp_path / "target"
    target.write_text("kept\n")
    link = tmp_path / "link"
    link.symlink_to(target)
    served = _served(b)
    run = await broker_cli("get", "demo", "--output", str(link), env=job_env(b))
    assert_one_line_error(run, 2, f"the --output file {link} is a symbolic link", "leave out --output",
                          secrets=secrets_of(b))
    assert link.is_symlink() and target.read_text() == "kept\n"
    assert _served(b) == served, "refused before the fetch"


def _served(b: RunningBroker) -> int:
    return sum(1 for e in b.audit_events() if e["event"] == "token_served")


# --- admin calls ------------------------------------------------------------------------------

@pytest.mark.parametrize("action", ["rotate", "revoke"])
async def test_admin_action_with_the_ops_cert_prints_json(b: RunningBroker, action: str) -> None:
    before = b.generation()
    b.remember_tokens()  # revoke replaces the token the leak scan would otherwise read at teardown
    run = await broker_cli(action, "demo", env=job_env(b, "ops"))
    assert run.code == 0, run
    body = json.loads(run.out)
    assert body["profile"] == "demo" and body["generation"] == before + 1 == b.generation()
    assert set(body) == {"profile", "generation", "expires_at"}
    b.remember_tokens()


@pytest.mark.parametrize("action", ["rotate", "revoke"])
async def test_admin_action_with_a_job_cert_exits_1(b: RunningBroker, action: str) -> None:
    before = b.generation()
    run = await broker_cli(action, "demo", env=job_env(b, "job"))
    assert_one_line_error(run, 1, "403", "forbidden", "admin", secrets=secrets_of(b))
    assert b.generation() == before
    await assert_still_serving(b)


async def test_admin_action_on_an_unknown_profile_exits_1_with_404(b: RunningBroker) -> None:
    before = b.generation()
    run = await broker_cli("rotate", "nope", env=job_env(b, "ops"))
    assert_one_line_error(run, 1, "404", "not_found", "nope", secrets=secrets_of(b))
    assert b.generation() == before
    await assert_still_serving(b)


# --- broker check -----------------------------------------------------------------------------

def _valid_config(directory: Path, pki: Pki, openbao: OpenBaoDevServer) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    profile = {**DEFAULT_PROFILE, "token_role": "demo", "policies": ["demo"]}
    return write_config(directory, pki, openbao.address, [{"method": "token", "token_env": "VAULT_TOKEN"}],
                        {"demo": profile})


async def test_check_accepts_a_valid_config(tmp_path: Path, pki: Pki, openbao: OpenBaoDevServer) -> None:
    config = _valid_config(tmp_path, pki, openbao)
    run = await broker_cli("check", "--config", str(config), env=clean_env(VAULT_TOKEN="set-for-serve"))
    assert run.code == 0, run
    assert run.err == "" and run.out.strip() == f"{config}: ok"


async def test_check_reports_one_line_per_problem(tmp_path: Path, pki: Pki, openbao: OpenBaoDevServer) -> None:
    config = _valid_config(tmp_path, pki, openbao)
    text = config.read_text()
    text = text.replace('grace = "5s"', 'grace = "25s"').replace("[admin]", "[admin]\nbogus = 1")
    text = text.replace(f'client_ca = "{pki.ca}"', f'client_ca = "{tmp_path}/missing-ca.pem"')
    config.write_text(text)
    run = await broker_cli("check", "--config", str(config))
    assert run.code == 2, run
    assert run.out == "" and "Traceback" not in run.err
    lines = run.err.strip().splitlines()
    assert len(lines) == 3, run.err
    assert all(line.startswith(f"{config}: ") for line in lines)
    joined = "\n".join(lines)
    assert "profiles.demo.grace" in joined and "bogus" in joined and "missing-ca.pem" in joined


async def test_check_of_a_missing_file_names_it_once(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    run = await broker_cli("check", "--config", str(missing))
    line = assert_one_line_error(run, 2, "does not exist")
    assert line.count(str(missing)) == 1, line


async def test_serve_on_a_port_in_use_is_one_line_exit_2(tmp_path: Path, pki: Pki, openbao: OpenBaoDevServer) -> None:
    """Also: it changes nothing of the state a broker already running on that port owns."""
    config = _valid_config(tmp_path, pki, openbao)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    record = {"demo": {"accessor": "acc", "generation": 7, "token_fp": "0123456789abcdef", "expires_at": 4e9}}
    (state / "profiles.json").write_text(json.dumps(record))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config.write_text(config.read_text().replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"', 1))
        run = await broker_cli("serve", "--config", str(config), env=clean_env(VAULT_TOKEN="not-a-real-token"))
    assert run.code == 2, run
    problems = [line for line in run.err.splitlines() if line.startswith("broker serve: ")]
    assert len(problems) == 1 and f"cannot listen on 127.0.0.1:{port}" in problems[0], run.err
    assert "Traceback" not in run.err
    assert sorted(p.name for p in state.iterdir()) == ["profiles.json"], "no revocation of the running one's token"
    assert json.loads((state / "profiles.json").read_text()) == record


# --- broker certs -------------------------------------------------------------------------------

def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_certs_init_then_client(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    run = await broker_cli("certs", "init", "--dir", str(d))
    assert run.code == 0, run
    names = {"ca.pem", "ca.key", "server.pem", "server.key"}
    assert {Path(line).name for line in run.out.split()} == names
    assert {p.name for p in d.iterdir()} == names
    assert _mode(d / "ca.key") == _mode(d / "server.key") == 0o600

    run = await broker_cli("certs", "client", "job-1", "--dir", str(d), "--uri", "spiffe://x/y")
    assert run.code == 0, run
    assert [Path(line).name for line in run.out.split()] == ["job-1.pem", "job-1.key"]
    assert _mode(d / "job-1.key") == 0o600
    cert = x509.load_pem_x509_certificate((d / "job-1.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://x/y"]
    assert ExtendedKeyUsageOID.CLIENT_AUTH in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    ca = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
    cert.verify_directly_issued_by(ca)


async def test_certs_init_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    assert (await broker_cli("certs", "init", "--dir", str(d))).code == 0
    ca_before = (d / "ca.pem").read_bytes()
    run = await broker_cli("certs", "init", "--dir", str(d))
    assert_one_line_error(run, 2, "already exists", "--force")
    assert (d / "ca.pem").read_bytes() == ca_before
    run = await broker_cli("certs", "init", "--dir", str(d), "--force")
    assert run.code == 0 and (d / "ca.pem").read_bytes() != ca_before


@pytest.mark.parametrize("args", [["client", "../evil"], ["client", "x", "--days", "0"]])
async def test_certs_client_rejects_bad_input_in_one_line(tmp_path: Path, args: list[str]) -> None:
    d = tmp_path / "pki"
    certs.init_ca_and_server(d)
    run = await broker_cli("certs", *args, "--dir", str(d))
    assert_one_line_error(run, 2)
    assert {p.name for p in d.iterdir()} == {"ca.pem", "ca.key", "server.pem", "server.key"}


# --- the README quick start: broker dev ---------------------------------------------------------

async def _read_until(stream: asyncio.StreamReader, marker: str, timeout: float) -> list[str]:
    lines: list[str] = []
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise AssertionError(f"no {marker!r} line within {timeout}s; got {lines}")
        raw = await asyncio.wait_for(stream.readline(), remaining)
        if not raw:
            raise AssertionError(f"stdout closed before a {marker!r} line; got {lines}")
        lines.append(raw.decode().rstrip("\n"))
        if marker in lines[-1]:
            return lines


def _exports(line: str) -> dict[str, str]:
    words = shlex.split(line.strip())
    assert words[0] == "export", line
    return dict(word.split("=", 1) for word in words[1:])


def _refuses(address: str) -> bool:
    host, _, port = address.rpartition("//")[2].partition(":")
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


async def _ops_get(port: int, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}{path}") as response:
            return response.status, await response.json(content_type=None)


async def test_readme_quick_start_with_broker_dev(tmp_path: Path) -> None:
    # Port 0 for both listeners: broker dev binds free ports itself and prints the ones it got.
    directory = tmp_path / "dev"
    stderr_path = tmp_path / "dev.stderr"
    with stderr_path.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "broker", "dev", "--dir", str(directory), "--port", "0",
            "--ops-port", "0", env=clean_env(), cwd=tmp_path, start_new_session=True,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=stderr,
        )
    try:
        assert proc.stdout is not None
        lines = await _read_until(proc.stdout, "/metrics", timeout=40)
        first = next(line for line in lines if line.strip())
        match = re.search(r"OpenBao dev server at (http://127\.0\.0\.1:\d+), broker at https://localhost:(\d+)\.",
                          first)
        assert match, first
        vault_address, port = match[1], int(match[2])
        assert port != 0
        env = _exports(next(line for line in lines if "export BROKER_URL=" in line))
        assert env["BROKER_URL"] == f"https://localhost:{port}"
        ops_port = int(re.findall(r"http://127\.0\.0\.1:(\d+)/readyz", "\n".join(lines))[0])
        assert ops_port not in (0, port)

        run = await broker_cli("get", "demo", env=clean_env(**env))
        assert run.code == 0, (run, stderr_path.read_text())
        token = run.out.strip()
        info = hvac.Client(url=vault_address, token=token).auth.token.lookup_self()["data"]
        assert info["meta"]["profile"] == "demo" and info["orphan"] is True

        status, ready = await _ops_get(ops_port, "/readyz")
        assert status == 200, ready

        # The per-job lines as printed, in order: their refresh file lives in the dev directory.
        per_job = [shlex.split(line)[1:] for line in lines if "--refresh-file" in line]
        assert [words[0] for words in per_job] == ["get", "refresh", "release"], lines
        refresh_file = directory.resolve() / "release.refresh"
        assert all(words[-1] == str(refresh_file) for words in per_job), per_job
        for words in per_job:
            ran = await broker_cli(*words, env=clean_env(**env))
            assert ran.code == 0, (ran, stderr_path.read_text())
        assert not refresh_file.exists()

        assert _mode(directory / "openbao.log") == _mode(directory / "audit.jsonl") == 0o600

        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 25) == 0, stderr_path.read_text()
        assert _refuses(vault_address), "the OpenBao child outlived broker dev"
        assert _refuses(f"https://127.0.0.1:{port}")
        for leaked_into in (stderr_path, directory / "audit.jsonl", directory / "openbao.log"):
            assert token not in leaked_into.read_text(), leaked_into
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)  # its whole group: the OpenBao child too
            await proc.wait()
