"""Shared fixtures: a real OpenBao dev server, a real dev PKI, and brokers on real mTLS sockets.

Every broker a test starts is checked on teardown for leaks: no token value it ever held may
appear in the captured logs, the audit file or the metrics.
"""

from __future__ import annotations

import asyncio
import faulthandler
import json
import logging
import os
import ssl
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import hvac
import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry, generate_latest
from yarl import URL

from broker import certs, tls
from broker.clock import Clock
from broker.config import Config, load_config
from broker.devserver import OpenBaoDevServer, setup_approle, setup_token_role
from broker.service import Broker, build
from tests.faults import TcpProxy


# --- logs, kept for the leak scan ---------------------------------------------------------

# A test that hangs (a wait with no deadline after a regression) ends the run with every
# thread's traceback instead of holding CI until its 90-minute limit. Far above the slowest
# test (the 30 s load run plus its broker's start and stop).
TEST_TIMEOUT = 300.0


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    faulthandler.dump_traceback_later(TEST_TIMEOUT, exit=True, file=_uncaptured_stderr(item.config))
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def _uncaptured_stderr(config: pytest.Config) -> Any:
    """Where the hang report goes: the terminal's stderr, not pytest's capture of it (which is
    lost when the process exits from under it)."""
    capman = config.pluginmanager.getplugin("capturemanager")
    saved = getattr(getattr(getattr(capman, "_global_capturing", None), "err", None), "targetfd_save", None)
    if isinstance(saved, int):
        if not hasattr(config, "_broker_hang_stream"):
            config._broker_hang_stream = os.fdopen(os.dup(saved), "w")  # type: ignore[attr-defined]
        return config._broker_hang_stream  # type: ignore[attr-defined]
    return sys.stderr


class LogLines(list[str]):
    """Every log line of the run, and every token value any broker of the run held or served."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines = LogLines()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture(scope="session")
def log_lines() -> Iterator[LogLines]:
    """Every log line of the whole run. At the end, none may contain any token value that any
    broker of the run held or served (each broker is also checked when it stops)."""
    handler = _Collect()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    logging.getLogger("hvac").setLevel(logging.DEBUG)
    yield handler.lines
    root.removeHandler(handler)
    text = "\n".join(handler.lines)
    leaked = [secret[:4] + "…" for secret in handler.lines.secrets if secret in text]
    assert not leaked, f"token values leaked into the logs of this run: {leaked}"
    assert len(handler.lines) > 0


# --- OpenBao -------------------------------------------------------------------------------

# ``cli=False``: roles, policies and AppRoles made for each test go to OpenBao as the HTTP
# requests the ``bao`` CLI sends (the CLI costs ~0.2 s a command, seven per broker started).
# ``broker dev``, and the tests of it, still run the CLI commands the README shows operators.

@pytest.fixture(scope="session")
def openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBaoDevServer]:
    server = OpenBaoDevServer(log_path=tmp_path_factory.mktemp("openbao") / "openbao.log", cli=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def proxy(openbao: OpenBaoDevServer) -> AsyncIterator[TcpProxy]:
    """A TCP proxy in front of the shared OpenBao, to slow, hold or cut the broker's calls."""
    p = await TcpProxy("127.0.0.1", openbao.port).start()
    yield p
    await p.stop()


@pytest.fixture
def private_openbao(tmp_path: Path) -> Iterator[OpenBaoDevServer]:
    """An OpenBao of this test's own, for tests that stop, pause or empty it."""
    server = OpenBaoDevServer(log_path=tmp_path / "openbao.log", cli=False)
    server.start()
    yield server
    server.stop()


def root_client(server: OpenBaoDevServer) -> hvac.Client:
    return hvac.Client(url=server.address, token="root")


def record_answer(seen_secrets: set[str], error_bodies: list[str], status: int, text: str) -> None:
    """A non-200 body joins the leak scan; a token in a 200 body (JSON or bare) joins the
    secrets the scan looks for."""
    if status != 200:
        error_bodies.append(text)
        return
    try:
        body = json.loads(text)
    except ValueError:
        if text and "\n" not in text and " " not in text:
            seen_secrets.add(text)
        return
    if isinstance(body, dict):
        seen_secrets.update(body[key] for key in ("token", "refresh_token") if isinstance(body.get(key), str))


def token_is_valid(server: OpenBaoDevServer, token: str) -> bool:
    client = hvac.Client(url=server.address, token=token)
    try:
        client.auth.token.lookup_self()
        return True
    except hvac.exceptions.Forbidden:
        return False


# --- PKI -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pki:
    dir: Path
    other_dir: Path  # a second, unrelated CA

    @property
    def ca(self) -> Path:
        return self.dir / "ca.pem"

    def pair(self, name: str) -> tuple[Path, Path]:
        return self.dir / f"{name}.pem", self.dir / f"{name}.key"

    def client_context(self, name: str = "job") -> ssl.SSLContext:
        cert, key = self.pair(name)
        return tls.client_context(self.ca, cert, key)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    certs.init_ca_and_server(d)
    certs.issue_client(d, "job", uris=["spiffe://ci.example/runner/1"])
    certs.issue_client(d, "job-other", uris=["spiffe://ci.example/runner/2"])
    certs.issue_client(d, "stranger")
    certs.issue_client(d, "ops")
    certs.issue_client(d, "server-only", eku="server")
    certs.issue_client(d, "no-eku", eku="none")
    other = tmp_path_factory.mktemp("other-pki")
    certs.init_ca_and_server(other)
    certs.issue_client(other, "job")
    return Pki(d, other)


# --- brokers -------------------------------------------------------------------------------

DEFAULT_PROFILE: dict[str, Any] = {
    "ttl": "30s", "grace": "5s", "rotate_after": "20s", "check_interval": "60s",
    "allow": ["cn:job", "uri:spiffe://ci.example/runner/*"],
}


SHARED_ONLY = ("rotate_after", "check_interval", "alert_threshold")  # refused on a per-job profile


def defaults_for(settings: dict[str, Any]) -> dict[str, Any]:
    """DEFAULT_PROFILE, without what only a shared profile takes when ``settings`` is per-job."""
    if settings.get("mode") != "per-job":
        return DEFAULT_PROFILE
    return {k: v for k, v in DEFAULT_PROFILE.items() if k not in SHARED_ONLY}


def _toml_value(value: Any) -> str:
    return json.dumps(value)  # JSON strings, numbers and arrays of them are valid TOML


def write_config(directory: Path, pki: Pki, vault_address: str, auth: list[dict[str, str]],
                 profiles: dict[str, dict[str, Any]], extra: str = "", *, audit_on_failure: str | None = None,
                 server_extra: str = "", vault_timeout: str = "2s", vault_extra: str = "") -> Path:
    lines = [
        "[server]", 'listen = "127.0.0.1:0"', f'cert = "{pki.dir}/server.pem"', f'key = "{pki.dir}/server.key"',
        f'client_ca = "{pki.ca}"', server_extra, "", "[ops]", 'listen = "127.0.0.1:0"', "",
        "[audit]", 'path = "audit.jsonl"', f'on_failure = "{audit_on_failure}"' if audit_on_failure else "", "",
        "[state]", 'dir = "state"', "",
        "[vault]", f'address = "{vault_address}"', f'timeout = "{vault_timeout}"', vault_extra, "",
    ]
    for entry in auth:
        lines.append("[[vault.auth]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in entry.items()]
        lines.append("")
    lines += ["[admin]", 'allow = ["cn:ops"]', ""]
    for name, settings in profiles.items():
        lines.append(f"[profiles.{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in settings.items()]
        lines.append("")
    path = directory / "broker.toml"
    path.write_text("\n".join(lines) + extra)
    return path


@dataclass
class RunningBroker:
    broker: Broker
    dir: Path
    pki: Pki
    vault: OpenBaoDevServer
    stop: asyncio.Event
    task: asyncio.Task[None]
    roles: dict[str, str]
    seen_secrets: set[str] = field(default_factory=set)
    error_bodies: list[str] = field(default_factory=list)  # every non-200 answer, for the leak scan

    def auth_entries(self) -> list[dict[str, str]]:
        """This broker's [[vault.auth]] entries, to start another broker on the same credential."""
        entries = []
        for a in self.broker.config.vault.auth:
            entry = {"method": a.method}
            for key in ("role_id_file", "secret_id_file", "token_file", "token_env"):
                if getattr(a, key):
                    entry[key] = str(getattr(a, key))
            entries.append(entry)
        return entries

    @property
    def url(self) -> str:
        return f"https://localhost:{self.broker.api_port}"

    @property
    def ops_url(self) -> str:
        return f"http://127.0.0.1:{self.broker.ops_port}"

    @property
    def audit_path(self) -> Path:
        return self.broker.config.audit.path

    def audit_events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit_path.read_text().splitlines()]

    def remember_tokens(self) -> None:
        for state in self.broker.cache.all():
            for token in (state.current, state.previous):
                if token is not None:
                    self.seen_secrets.add(token.value)
        login = self.broker.auth._login
        if login is not None:
            self.seen_secrets.add(login.token)

    def record_answer(self, status: int, text: str) -> None:
        """An answer that came some other way than ``request``."""
        record_answer(self.seen_secrets, self.error_bodies, status, text)

    async def request(self, method: str, path: str, cert: str = "job", **kwargs: Any) -> tuple[int, Any, Any]:
        """One mTLS request with the named client cert; returns (status, parsed body, headers)."""
        ctx = self.pki.client_context(cert)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, force_close=True)) as session:
            async with session.request(method, self.url + path, **kwargs) as response:
                text = await response.text()
                if response.status != 200:
                    self.error_bodies.append(text)
                body: Any = text
                if response.content_type == "application/json":
                    body = json.loads(text)
                    if isinstance(body, dict):
                        self.seen_secrets.update(body[key] for key in ("token", "refresh_token")
                                                 if isinstance(body.get(key), str))
                elif response.status == 200 and response.content_type == "text/plain":
                    self.seen_secrets.add(text)
                return response.status, body, response.headers

    async def get_token(self, profile: str = "demo", cert: str = "job", **kwargs: Any) -> dict[str, Any]:
        status, body, _ = await self.request("GET", f"/v1/tokens/{profile}", cert=cert, **kwargs)
        assert status == 200, body
        return body  # type: ignore[no-any-return]

    async def ops(self, path: str) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as session:
            async with session.get(self.ops_url + path) as response:
                text = await response.text()
                self.error_bodies.append(text)  # ops answers never carry a token: scan them all
                return response.status, (json.loads(text) if response.content_type == "application/json" else text)

    def metrics_text(self) -> str:
        return generate_latest(self.broker.metrics.registry).decode()

    def metric(self, name: str, **labels: str) -> float | None:
        value = self.broker.metrics.registry.get_sample_value(name, labels)
        return value

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate():
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            await asyncio.sleep(0.05)
        self.remember_tokens()

    def generation(self, profile: str = "demo") -> int:
        state = self.broker.cache.get(profile)
        return state.generation if state else 0

    async def shutdown(self) -> None:
        self.remember_tokens()
        if not self.task.done():
            self.stop.set()
            await asyncio.wait_for(self.task, timeout=20)


async def run_config(config: Config, directory: Path, pki: Pki, vault: OpenBaoDevServer, roles: dict[str, str],
                     clock: Clock | None = None) -> RunningBroker:
    """Build a broker from ``config`` and run it in this event loop until its listeners are up."""
    broker = build(config, clock=clock, registry=CollectorRegistry())
    started = asyncio.Event()
    stop = asyncio.Event()
    task = asyncio.create_task(broker.run(stop, on_started=lambda _: started.set()))
    waiter = asyncio.create_task(started.wait())
    await asyncio.wait({task, waiter}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # raise the start-up failure
    running = RunningBroker(broker, directory, pki, vault, stop, task, roles)
    for entry in config.vault.auth:
        if entry.secret_id_file is not None and entry.secret_id_file.exists():
            running.seen_secrets.add(entry.secret_id_file.read_text().strip())
    return running


# --- rejected inputs: the exact error, and a broker that still serves afterwards ------------

@dataclass(frozen=True)
class Raw:
    """An answer as it came: status, unparsed body, headers."""

    status: int
    text: str
    headers: Mapping[str, str]
    content_type: str

    def json(self) -> dict[str, Any]:
        body = json.loads(self.text)
        assert isinstance(body, dict)
        return body


async def raw(b: RunningBroker, method: str, path: str, cert: str = "job", **kwargs: Any) -> Raw:
    """One mTLS request whose path goes on the wire exactly as written (no client-side
    normalisation of ``%2e%2e`` or ``..``), returning the body unparsed. Non-200 bodies go to
    the broker's leak scan; a token in a 200 answer joins the secrets it looks for."""
    url = URL(b.url + path, encoded=True)
    connector = aiohttp.TCPConnector(ssl=b.pki.client_context(cert), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.request(method, url, **kwargs) as response:
            answer = Raw(response.status, await response.text(), response.headers, response.content_type)
    b.record_answer(answer.status, answer.text)
    return answer


def assert_error(answer: Raw, status: int, code: str, *needles: str) -> dict[str, Any]:
    """Exactly ``status``, a JSON ``{"error": code, "message": ...}`` naming every needle, no-store."""
    assert answer.status == status, answer.text
    assert answer.content_type == "application/json", answer.text
    assert answer.headers.get("Cache-Control") == "no-store"
    body = answer.json()
    assert set(body) == {"error", "message"}, body
    assert body["error"] == code
    assert isinstance(body["message"], str) and len(body["message"]) > 10
    for needle in needles:
        assert needle in body["message"], body
    return body


async def assert_still_serving(b: RunningBroker, profile: str = "demo") -> None:
    """The broker answers a normal fetch with a live token afterwards."""
    body = await b.get_token(profile)
    assert body["profile"] == profile and body["ttl"] > 0 and body["token"]


@dataclass
class BrokerFactory:
    """Starts brokers with unique OpenBao roles; stops them and scans for leaks at teardown."""

    tmp_path: Path
    pki: Pki
    openbao: OpenBaoDevServer
    log_lines: list[str]
    started: list[RunningBroker] = field(default_factory=list)

    async def start(
        self,
        profiles: dict[str, dict[str, Any]] | None = None,
        *,
        vault: OpenBaoDevServer | None = None,
        vault_address: str | None = None,
        clock: Clock | None = None,
        login_ttl: str = "1h",
        auth: list[dict[str, str]] | None = None,
        extra: str = "",
        wait_ready: bool = True,
        directory: Path | None = None,
        roles: dict[str, str] | None = None,
        broker_policy: str | None = None,
        audit_on_failure: str | None = None,
        server_extra: str = "",
        vault_timeout: str = "2s",
        vault_extra: str = "",
    ) -> RunningBroker:
        vault = vault or self.openbao
        profiles = profiles or {"demo": {}}
        directory = directory or self.tmp_path / f"broker-{len(self.started)}"
        directory.mkdir(parents=True, exist_ok=True)
        suffix = uuid.uuid4().hex[:8]
        if roles is None:
            roles = {name: f"{name}-{suffix}" for name in profiles}
            for name, role in roles.items():
                setup_token_role(vault, role, [f"{role}-policy"])
        if auth is None:
            files = setup_approle(vault, list(roles.values()), directory / "secrets", login_ttl=login_ttl,
                                  role_name=f"broker-{suffix}", policy=broker_policy)
            auth = [{"method": "approle", "role_id_file": str(files.role_id_file),
                     "secret_id_file": str(files.secret_id_file)}]
        full = {
            name: {**defaults_for(settings), "token_role": roles[name], "policies": [f"{roles[name]}-policy"],
                   **settings}
            for name, settings in profiles.items()
        }
        config = load_config(write_config(directory, self.pki, vault_address or vault.address, auth, full, extra,
                                          audit_on_failure=audit_on_failure, server_extra=server_extra,
                                          vault_timeout=vault_timeout, vault_extra=vault_extra))
        running = await run_config(config, directory, self.pki, vault, roles, clock=clock)
        self.started.append(running)
        if wait_ready:
            await running.wait_for(lambda: all(s.current is not None for s in running.broker.cache.all()),
                                   what="a first token for every profile")
        return running

    async def close(self) -> None:
        for running in self.started:
            await running.shutdown()
        for running in self.started:
            if isinstance(self.log_lines, LogLines):
                self.log_lines.secrets.update(running.seen_secrets)
            assert_no_leaks(running, self.log_lines)


def assert_no_leaks(running: RunningBroker, log_lines: list[str]) -> None:
    haystacks = {
        "logs": "\n".join(log_lines),
        "error and ops answers": "\n".join(running.error_bodies),
        "audit": running.audit_path.read_text() if running.audit_path.is_file() else "",
        "metrics": running.metrics_text(),
        "state": "".join(p.read_text() for p in running.broker.config.state.dir.glob("*.json")),
    }
    leaks = [(where, secret[:4] + "…") for secret in running.seen_secrets
             for where, text in haystacks.items() if secret in text]
    assert not leaks, f"token values leaked into: {leaks}"


@pytest.fixture
async def brokers(tmp_path: Path, pki: Pki, openbao: OpenBaoDevServer,
                  log_lines: list[str]) -> AsyncIterator[BrokerFactory]:
    factory = BrokerFactory(tmp_path, pki, openbao, log_lines)
    try:
        yield factory
    finally:
        await factory.close()


def module_broker(name: str, profiles: dict[str, dict[str, Any]]) -> Any:
    """A module-scoped fixture: one broker with ``profiles`` for every test of a module (the
    factory's leak scan runs at its teardown). Use as ``b = module_broker("cli", {...})``; the
    module's tests need ``pytest.mark.asyncio(loop_scope="module")``."""

    @pytest_asyncio.fixture(scope="module", loop_scope="module")
    async def broker(tmp_path_factory: pytest.TempPathFactory, pki: Pki, openbao: OpenBaoDevServer,
                     log_lines: list[str]) -> AsyncIterator[RunningBroker]:
        factory = BrokerFactory(tmp_path_factory.mktemp(name), pki, openbao, log_lines)
        try:
            yield await factory.start(profiles)
        finally:
            await factory.close()

    return broker
