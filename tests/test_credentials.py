"""The broker's own credential against a real OpenBao: AppRole secret_id rotation (crash-safe),
TLS certificate auth, and the fallback order with the primary retried (and won back) later.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import hvac
import pytest

import broker.vault.auth as auth_module
from broker import certs
from broker.config import load_config
from broker.devserver import (
    OpenBaoDevServer,
    broker_policy,
    setup_approle,
    setup_cert_auth,
    setup_token_role,
    write_secret,
)
from broker.errors import TokenInvalid, VaultUnavailable
from broker.tokens.model import fingerprint
from broker.vault.client import NewSecretId, VaultClient, classify
from tests.conftest import DEFAULT_PROFILE, BrokerFactory, Pki, RunningBroker, run_config, write_config
from tests.fakes import FakeClock
from tests.processes import ServeProcess

# --- helpers ------------------------------------------------------------------------------


def _client(server: OpenBaoDevServer, token: str) -> hvac.Client:
    return hvac.Client(url=server.address, token=token, verify=str(server.ca_cert) if server.ca_cert else True)


def _root(server: OpenBaoDevServer) -> hvac.Client:
    return _client(server, "root")


def _valid_at(server: OpenBaoDevServer, token: str) -> bool:
    try:
        _client(server, token).auth.token.lookup_self()
        return True
    except hvac.exceptions.Forbidden:
        return False


def _secret_id_exists(server: OpenBaoDevServer, role: str, secret_id: str) -> bool:
    # An unknown secret_id is an empty 204 answer, not an error.
    return isinstance(_root(server).auth.approle.read_secret_id(role, secret_id), dict)


def _secret_id_accessors(server: OpenBaoDevServer, role: str) -> list[str]:
    try:
        return list(_root(server).auth.approle.list_secret_id_accessors(role)["data"]["keys"])
    except hvac.exceptions.InvalidPath:
        return []  # none left


def _login_works(server: OpenBaoDevServer, role_id: str, secret_id: str) -> bool:
    client = _root(server)
    try:
        token = client.auth.approle.login(role_id, secret_id, use_token=False)["auth"]["client_token"]
    except hvac.exceptions.InvalidRequest:
        return False
    client.auth.token.revoke(token)  # it was only a probe
    return True


def _events(b: RunningBroker, *names: str) -> list[tuple[str, str | None]]:
    return [(e["event"], e.get("method")) for e in b.audit_events() if e["event"] in names]


class Setup:
    """A token role and an AppRole (allowed to rotate its own secret_id) on ``server``."""

    def __init__(self, server: OpenBaoDevServer, directory: Path) -> None:
        suffix = uuid.uuid4().hex[:8]
        self.server = server
        self.token_role = f"demo-{suffix}"
        self.approle = f"broker-{suffix}"
        setup_token_role(server, self.token_role, [f"{self.token_role}-policy"])
        self.files = setup_approle(server, [self.token_role], directory / "secrets", role_name=self.approle,
                                   rotate_secret_id=True)

    @property
    def roles(self) -> dict[str, str]:
        return {"demo": self.token_role}

    @property
    def role_id(self) -> str:
        return self.files.role_id_file.read_text().strip()

    @property
    def secret_id(self) -> str:
        return self.files.secret_id_file.read_text().strip()

    def approle_auth(self, **extra: str) -> dict[str, str]:
        return {"method": "approle", "role_id_file": str(self.files.role_id_file),
                "secret_id_file": str(self.files.secret_id_file), **extra}

    def destroy_secret_id(self) -> None:
        _root(self.server).auth.approle.destroy_secret_id(self.approle, self.secret_id)

    def broker_token_file(self, directory: Path, ttl: str = "1h") -> Path:
        """A plain token with the broker's policy, as an operator would keep for a fallback."""
        self.server.bao("policy", "write", f"tok-{self.token_role}", "-", stdin=broker_policy([self.token_role]))
        created = _root(self.server).auth.token.create(policies=[f"tok-{self.token_role}"], ttl=ttl,
                                                       no_parent=True)
        path = directory / "vault-token"
        write_secret(path, created["auth"]["client_token"])
        return path


class Created(list[NewSecretId]):
    """Every secret_id the broker generated (for the leak scan), and how many calls began."""

    began = 0


@pytest.fixture
def created_secret_ids(monkeypatch: pytest.MonkeyPatch) -> Created:
    created = Created()
    original = VaultClient.create_secret_id

    async def spy(self: VaultClient, mount: str, role: str) -> NewSecretId:
        created.began += 1
        new = await original(self, mount, role)
        created.append(new)
        return new

    monkeypatch.setattr(VaultClient, "create_secret_id", spy)
    return created


def _rotation_idle(b: RunningBroker, created: Created) -> bool:
    """No rotation step in flight: every secret_id asked for is back and settled (used or destroyed)."""
    approle = b.broker.auth._methods[0]
    assert isinstance(approle, auth_module.AppRoleAuth)
    return created.began == len(created) and not approle.destroys_pending


def _hold_rotation(b: RunningBroker, every: float = 3600.0) -> None:
    """Change the rotation interval of a running broker (a test-only knob) and let it re-plan."""
    approle = b.broker.auth._methods[0]
    assert isinstance(approle, auth_module.AppRoleAuth)
    approle.rotate_every = every
    b.broker.auth._changed.set()


def _remember(b: RunningBroker, *secrets: str | NewSecretId) -> None:
    for secret in secrets:
        b.seen_secrets.add(secret.secret_id if isinstance(secret, NewSecretId) else secret)


# --- AppRole secret_id rotation -----------------------------------------------------------


async def test_secret_id_rotation_replaces_the_file_and_destroys_the_old_one(
        brokers: BrokerFactory, private_openbao: OpenBaoDevServer, tmp_path: Path,
        created_secret_ids: Created) -> None:
    s = Setup(private_openbao, tmp_path)
    original = s.secret_id
    b = await brokers.start(vault=private_openbao, roles=s.roles, auth=[s.approle_auth(rotate_secret_id="1s")])
    _remember(b, original)
    assert b.broker.auth._methods[0].secret_id_due_at() == pytest.approx(  # type: ignore[attr-defined]
        s.files.secret_id_file.stat().st_mtime + 1), "counted from the file's age, not from the start"
    await b.wait_for(lambda: len(_events(b, "secret_id_rotated")) >= 2, timeout=10, what="two rotations")
    _hold_rotation(b)  # hold still while we look
    await b.wait_for(lambda: _rotation_idle(b, created_secret_ids)
                     and len(_events(b, "secret_id_rotated")) == len(created_secret_ids), what="rotation settled")
    _remember(b, *created_secret_ids)

    current = s.secret_id
    assert current != original and current == created_secret_ids[-1].secret_id
    assert stat.S_IMODE(os.stat(s.files.secret_id_file).st_mode) == 0o600
    assert not _secret_id_exists(private_openbao, s.approle, original), "the old one is destroyed at OpenBao"
    assert _secret_id_accessors(private_openbao, s.approle) == [created_secret_ids[-1].accessor], \
        "exactly one secret_id is left: the one in the file"
    assert _login_works(private_openbao, s.role_id, current)
    assert not _login_works(private_openbao, s.role_id, original)

    rotated = [e for e in b.audit_events() if e["event"] == "secret_id_rotated"]
    assert rotated[-1]["method"] == "approle"
    assert rotated[-1]["accessor_fp"] == fingerprint(created_secret_ids[-1].accessor)
    assert created_secret_ids[-1].accessor not in b.audit_path.read_text(), "only the accessor's fingerprint"
    # The broker now runs on the login made with the new secret_id, and keeps minting.
    assert b.broker.auth.method == "approle"
    status, body, _ = await b.request("POST", "/v1/tokens/demo/rotate", cert="ops")
    assert status == 200 and body["generation"] == 2
    assert _events(b, "vault_login_failed") == []


async def test_a_new_secret_id_that_cannot_log_in_is_discarded_and_the_old_one_kept(
        brokers: BrokerFactory, private_openbao: OpenBaoDevServer, tmp_path: Path,
        created_secret_ids: Created) -> None:
    s = Setup(private_openbao, tmp_path)
    original = s.secret_id
    b = await brokers.start(vault=private_openbao, roles=s.roles, auth=[s.approle_auth(rotate_secret_id="1h")])
    _remember(b, original)
    auth = b.broker.auth
    # Logged in; from now on OpenBao refuses every login with this role from 127.0.0.1 (the
    # role's CIDR binding is checked at login), so each new secret_id fails its proving login.
    private_openbao.bao("write", f"auth/approle/role/{s.approle}", "secret_id_bound_cidrs=192.0.2.0/24")
    _hold_rotation(b, 1.0)
    await b.wait_for(lambda: len(created_secret_ids) >= 2 and auth.rotation_retry_at is not None,
                     timeout=10, what="two failed rotation attempts")
    _hold_rotation(b)
    await b.wait_for(lambda: _rotation_idle(b, created_secret_ids), what="the attempt in flight done")
    _remember(b, *created_secret_ids)
    assert s.secret_id == original, "the file keeps the secret_id that works"
    kept = _root(private_openbao).auth.approle.read_secret_id(s.approle, original)["data"]["secret_id_accessor"]
    assert _secret_id_accessors(private_openbao, s.approle) == [kept], \
        "the old one is never destroyed (the new one did not log in); each rejected new one is"
    assert _events(b, "secret_id_rotated") == []
    assert auth.method == "approle" and auth.authenticated
    status, _, _ = await b.request("POST", "/v1/tokens/demo/rotate", cert="ops")
    assert status == 200, "still minting on the current login"

    private_openbao.bao("write", f"auth/approle/role/{s.approle}", "secret_id_bound_cidrs=")
    auth.rotation_retry_at = None  # skip what is left of the backoff; its growth is not the point here
    _hold_rotation(b, 1.0)
    await b.wait_for(lambda: len(_events(b, "secret_id_rotated")) >= 1, timeout=10, what="a retry that works")
    _hold_rotation(b)
    await b.wait_for(lambda: _rotation_idle(b, created_secret_ids), what="rotation settled")
    _remember(b, *created_secret_ids)
    assert s.secret_id != original and _login_works(private_openbao, s.role_id, s.secret_id)
    assert not _secret_id_exists(private_openbao, s.approle, original)


def _serve_config(directory: Path, pki: Pki, server: OpenBaoDevServer, s: Setup, **auth: str) -> ServeProcess:
    """A config for `broker serve` as a child process with the AppRole of ``s`` (port 0: the
    child reports the ports it bound)."""
    profile = {**DEFAULT_PROFILE, "token_role": s.token_role, "policies": [f"{s.token_role}-policy"]}
    config = write_config(directory, pki, server.address, [s.approle_auth(**auth)], {"demo": profile})
    return ServeProcess(config, 0, 0, pki)


async def test_a_kill_between_write_and_destroy_logs_in_and_destroys_the_old_one_on_restart(
        brokers: BrokerFactory, private_openbao: OpenBaoDevServer, tmp_path: Path) -> None:
    """A real `broker serve`, SIGKILLed after it wrote the new secret_id and before the old one
    was destroyed. To stop it there without racing it, its policy lacks the destroy path: it
    rotates, writes the file, and is refused the destroy (it would retry, with backoff)."""
    s = Setup(private_openbao, tmp_path)
    original = s.secret_id
    destroy = f'path "auth/approle/role/{s.approle}/secret-id-accessor/destroy" {{ capabilities = ["update"] }}'
    policy = private_openbao.bao("policy", "read", f"{s.approle}-policy")
    assert destroy in policy
    private_openbao.bao("policy", "write", f"{s.approle}-policy", "-", stdin=policy.replace(destroy, ""))
    aged = time.time() - 7200  # due at once; the next rotation of the new file is an hour away
    os.utime(s.files.secret_id_file, (aged, aged))
    directory = tmp_path / "broker"
    directory.mkdir()
    serve = _serve_config(directory, brokers.pki, private_openbao, s, rotate_secret_id="1h")
    pending = directory / "state" / auth_module._pending_name(s.files.secret_id_file)
    kept = _root(private_openbao).auth.approle.read_secret_id(s.approle, original)["data"]["secret_id_accessor"]

    def written_not_destroyed() -> bool:
        try:
            return s.secret_id != original and json.loads(pending.read_text()) == [kept]
        except (OSError, ValueError):
            return False

    await serve.start()
    try:
        deadline = asyncio.get_running_loop().time() + 15
        while not written_not_destroyed():
            assert asyncio.get_running_loop().time() < deadline, "the rotation never got to its destroy step"
            await asyncio.sleep(0.05)
    finally:
        assert serve.proc is not None
        serve.proc.kill()  # SIGKILL: no shutdown code runs
        await serve.proc.wait()
    assert serve.proc.returncode == -signal.SIGKILL
    written = s.secret_id
    assert _secret_id_exists(private_openbao, s.approle, original), "the kill came before the destroy"
    assert stat.S_IMODE(pending.stat().st_mode) == 0o600
    assert json.loads(pending.read_text()) == [kept], "only accessors are kept, never a secret_id"
    serve.assert_no_leaks(extra_secrets={original, written})
    before = len(serve.audit_path.read_text().splitlines())

    # The policy repaired, the same state directory, rotation no longer configured: what the
    # kill left is still done.
    private_openbao.bao("policy", "write", f"{s.approle}-policy", "-", stdin=policy)
    second = await brokers.start(vault=private_openbao, roles=s.roles, auth=[s.approle_auth()], directory=directory)
    _remember(second, original, written)
    await second.wait_for(lambda: not _secret_id_exists(private_openbao, s.approle, original),
                          what="the replaced secret_id destroyed after the restart")
    in_file = _root(private_openbao).auth.approle.read_secret_id(s.approle, written)["data"]["secret_id_accessor"]
    assert _secret_id_accessors(private_openbao, s.approle) == [in_file]
    await second.wait_for(lambda: json.loads(pending.read_text()) == [], what="nothing left pending")
    logins = [(e["event"], e.get("method")) for e in second.audit_events()[before:]
              if e["event"] in ("vault_login", "vault_login_failed")]
    assert logins == [("vault_login", "approle")]
    assert _login_works(private_openbao, s.role_id, written)
    assert _valid_at(private_openbao, (await second.get_token())["token"])


async def test_a_listed_secret_id_that_is_in_the_file_is_never_destroyed(
        brokers: BrokerFactory, private_openbao: OpenBaoDevServer, tmp_path: Path) -> None:
    """A crash between writing the new secret_id and updating the pending list leaves the new
    one listed; after the restart it must be spared (destroying it would lock the broker out at
    its next login), and the others destroyed."""
    s = Setup(private_openbao, tmp_path)
    root = _root(private_openbao)
    in_file = root.auth.approle.read_secret_id(s.approle, s.secret_id)["data"]["secret_id_accessor"]
    stale = root.auth.approle.generate_secret_id(s.approle)["data"]
    directory = tmp_path / "broker"
    pending = directory / "state" / auth_module._pending_name(s.files.secret_id_file)
    pending.parent.mkdir(parents=True)
    pending.write_text(json.dumps([in_file, stale["secret_id_accessor"]]))

    b = await brokers.start(vault=private_openbao, roles=s.roles, auth=[s.approle_auth()], directory=directory)
    _remember(b, s.secret_id, stale["secret_id"])
    await b.wait_for(lambda: json.loads(pending.read_text()) == [], what="the pending list worked off")
    assert _secret_id_accessors(private_openbao, s.approle) == [in_file]
    assert _login_works(private_openbao, s.role_id, s.secret_id)
    assert b.broker.auth.method == "approle" and (await b.get_token())["token"]


async def test_rotation_without_the_policy_paths_fails_quietly_and_keeps_the_login(
        brokers: BrokerFactory, private_openbao: OpenBaoDevServer, tmp_path: Path,
        created_secret_ids: Created) -> None:
    suffix = uuid.uuid4().hex[:8]
    setup_token_role(private_openbao, f"demo-{suffix}", [f"demo-{suffix}-policy"])
    files = setup_approle(private_openbao, [f"demo-{suffix}"], tmp_path / "secrets", role_name=f"broker-{suffix}")
    original = files.secret_id_file.read_text().strip()
    b = await brokers.start(vault=private_openbao, roles={"demo": f"demo-{suffix}"}, auth=[
        {"method": "approle", "role_id_file": str(files.role_id_file), "secret_id_file": str(files.secret_id_file),
         "rotate_secret_id": "1s"}])
    _remember(b, original)
    auth = b.broker.auth
    await b.wait_for(lambda: auth._rotation_failures >= 2, timeout=10, what="two refused rotations")
    assert created_secret_ids == [], "refused at the first step"
    assert files.secret_id_file.read_text().strip() == original
    # A 403 on the secret-id paths is a policy gap, not a dead login: no re-login storm.
    assert _events(b, "vault_login", "vault_login_failed") == [("vault_login", "approle")]
    assert auth.method == "approle"
    assert (await b.get_token())["token"]


def test_destroying_an_unknown_secret_id_accessor_is_classified_as_gone() -> None:
    # OpenBao answers 500 here; that must not read as an outage to retry forever.
    exc = hvac.exceptions.InternalServerError('1 error occurred: * failed to find accessor entry for '
                                              'secret_id_accessor: "3b1e"')
    error = classify("destroy_secret_id", exc)
    assert isinstance(error, TokenInvalid) and "3b1e" not in str(error)
    assert isinstance(classify("create_secret_id", exc), VaultUnavailable)


# --- TLS certificate auth -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBaoDevServer]:
    server = OpenBaoDevServer(log_path=tmp_path_factory.mktemp("openbao-tls") / "openbao.log", tls=True, cli=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def vault_client_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """The broker's client certificate for OpenBao, from a CA of its own: (ca, cert, key)."""
    d = tmp_path_factory.mktemp("vault-client-pki")
    certs.init_ca_and_server(d)
    cert, key = certs.issue_client(d, "token-broker")
    return d / "ca.pem", cert, key


async def _start_with_vault_ca(brokers: BrokerFactory, server: OpenBaoDevServer, directory: Path,
                               auth: list[dict[str, str]], roles: dict[str, str]) -> RunningBroker:
    """Like ``brokers.start``, with ``[vault] ca_cert`` set (the factory's config has no key for it)."""
    directory.mkdir(parents=True, exist_ok=True)
    profile = {**DEFAULT_PROFILE, "token_role": roles["demo"], "policies": [f"{roles['demo']}-policy"]}
    path = write_config(directory, brokers.pki, server.address, auth, {"demo": profile})
    path.write_text(path.read_text().replace("[vault]\n", f'[vault]\nca_cert = "{server.ca_cert}"\n', 1))
    config = load_config(path)
    assert config.vault.ca_cert == server.ca_cert
    running = await run_config(config, directory, brokers.pki, server, roles)
    brokers.started.append(running)  # the factory stops it and scans it for leaks
    cache = running.broker.cache
    await running.wait_for(lambda: cache.get("demo") is not None and cache.get("demo").current is not None,
                           what="a first token")
    return running


async def test_cert_auth_as_primary_logs_in_over_tls(brokers: BrokerFactory, tls_openbao: OpenBaoDevServer,
                                                     vault_client_cert: tuple[Path, Path, Path],
                                                     tmp_path: Path) -> None:
    ca, cert, key = vault_client_cert
    role = f"demo-{uuid.uuid4().hex[:8]}"
    setup_token_role(tls_openbao, role, [f"{role}-policy"])
    setup_cert_auth(tls_openbao, [role], ca, name="token-broker")
    b = await _start_with_vault_ca(brokers, tls_openbao, tmp_path / "b", roles={"demo": role}, auth=[
        {"method": "cert", "cert_file": str(cert), "key_file": str(key), "cert_role": "token-broker"}])
    assert b.broker.auth.method == "cert"
    assert _events(b, "vault_login", "vault_login_failed") == [("vault_login", "cert")]
    info = _root(tls_openbao).auth.token.lookup(b.broker.auth._login.token)["data"]  # type: ignore[union-attr]
    assert info["meta"]["cert_name"] == "token-broker" and "token-broker-cert-policy" in info["policies"]
    assert _valid_at(tls_openbao, (await b.get_token())["token"])
    b.remember_tokens()


async def test_cert_auth_as_fallback_after_a_broken_approle(brokers: BrokerFactory, tls_openbao: OpenBaoDevServer,
                                                            vault_client_cert: tuple[Path, Path, Path],
                                                            tmp_path: Path) -> None:
    ca, cert, key = vault_client_cert
    s = Setup(tls_openbao, tmp_path)
    broken = s.secret_id
    s.destroy_secret_id()
    setup_cert_auth(tls_openbao, [s.token_role], ca, name=f"cert-{s.token_role}")
    b = await _start_with_vault_ca(brokers, tls_openbao, tmp_path / "b", roles=s.roles, auth=[
        s.approle_auth(),
        {"method": "cert", "cert_file": str(cert), "key_file": str(key), "cert_role": f"cert-{s.token_role}"}])
    _remember(b, broken)
    assert _events(b, "vault_login", "vault_login_failed")[:2] == [("vault_login_failed", "approle"),
                                                                   ("vault_login", "cert")]
    assert b.broker.auth.method == "cert" and b.broker.auth.preferred_retry_at is not None
    assert _valid_at(tls_openbao, (await b.get_token())["token"])


# --- fallback and the way back --------------------------------------------------------------


async def test_fallback_from_a_broken_approle_to_a_token_and_back(
        brokers: BrokerFactory, private_openbao: OpenBaoDevServer, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth_module, "PREFERRED_RETRY_BASE", 0.5)
    s = Setup(private_openbao, tmp_path)
    token_file = s.broker_token_file(tmp_path)
    first_secret = s.secret_id
    b = await brokers.start(vault=private_openbao, roles=s.roles, auth=[
        s.approle_auth(), {"method": "token", "token_file": str(token_file)}])
    _remember(b, first_secret, token_file.read_text().strip())
    auth = b.broker.auth
    assert auth.method == "approle" and auth.preferred_retry_at is None

    # Behind the broker's back: the secret_id is destroyed and the login token revoked.
    s.destroy_secret_id()
    _root(private_openbao).auth.token.revoke(auth._login.token)  # type: ignore[union-attr]
    status, body, _ = await b.request("POST", "/v1/tokens/demo/rotate", cert="ops")
    assert status == 200 and body["generation"] == 2, "403 → re-login → the fallback"
    assert auth.method == "token"
    assert _events(b, "vault_login", "vault_login_failed")[-2:] == [("vault_login_failed", "approle"),
                                                                    ("vault_login", "token")]

    # The primary is retried with backoff and keeps failing while it is broken... (few failures
    # on purpose: the fifth locks the AppRole out for 15 minutes, OpenBao's user lockout)
    await b.wait_for(lambda: _events(b, "vault_login_failed").count(("vault_login_failed", "approle")) >= 2,
                     timeout=10, what="a retry of the approle")
    assert auth.method == "token"
    # ...until an operator repairs it; then the broker goes back to it on its own.
    fresh = _root(private_openbao).auth.approle.generate_secret_id(s.approle)["data"]["secret_id"]
    _remember(b, fresh)
    write_secret(s.files.secret_id_file, fresh)
    await b.wait_for(lambda: auth.method == "approle", timeout=10, what="back on the approle")
    assert _events(b, "vault_login")[-1] == ("vault_login", "approle")
    assert auth.preferred_retry_at is None
    status, body, _ = await b.request("POST", "/v1/tokens/demo/rotate", cert="ops")
    assert status == 200 and body["generation"] == 3
    assert _valid_at(private_openbao, (await b.get_token())["token"])


async def _settle_until(b: RunningBroker, clock: FakeClock, predicate: Callable[[], bool], what: str) -> None:
    """Let real Vault calls finish and wake every sleeper already due, until ``predicate``."""
    deadline = asyncio.get_running_loop().time() + 10
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await clock.advance(0)
        await asyncio.sleep(0.02)
    b.remember_tokens()


async def test_primary_retry_doubles_from_30s_up_to_the_renewal_interval(
        brokers: BrokerFactory, private_openbao: OpenBaoDevServer, tmp_path: Path) -> None:
    clock = FakeClock()
    s = Setup(private_openbao, tmp_path)
    broken = s.secret_id
    s.destroy_secret_id()
    token_file = s.broker_token_file(tmp_path, ttl="90s")  # renewal every 60 s: the retry cap
    profile = {"demo": {"ttl": "1h", "grace": "10m", "rotate_after": "40m", "check_interval": "10m"}}
    b = await brokers.start(profile, vault=private_openbao, roles=s.roles, clock=clock, auth=[
        s.approle_auth(), {"method": "token", "token_file": str(token_file)}])
    _remember(b, broken, token_file.read_text().strip())
    auth = b.broker.auth
    assert auth.method == "token"

    def failures() -> int:
        return _events(b, "vault_login_failed").count(("vault_login_failed", "approle"))

    # Three retries reach the cap and stay under OpenBao's user lockout (5 failed logins).
    for attempt in range(3):
        ceiling = min(30.0 * 2 ** attempt, 60.0)
        assert auth.preferred_retry_at is not None
        delay = auth.preferred_retry_at - clock.now()
        assert 0.9 * ceiling - 1.0 <= delay <= ceiling + 1e-6, (attempt, delay)
        await clock.advance(delay)
        await _settle_until(b, clock, lambda: failures() == attempt + 2, f"retry {attempt + 1}")
        assert auth.method == "token"

    fresh = _root(private_openbao).auth.approle.generate_secret_id(s.approle)["data"]["secret_id"]
    _remember(b, fresh)
    write_secret(s.files.secret_id_file, fresh)
    assert auth.preferred_retry_at is not None
    await clock.advance(auth.preferred_retry_at - clock.now())
    await _settle_until(b, clock, lambda: auth.method == "approle", "back on the approle")
    assert auth.preferred_retry_at is None
    assert _events(b, "vault_login")[-1] == ("vault_login", "approle")
    assert b.metric("broker_vault_authenticated") == 1


@pytest.mark.parametrize("method", ["token", "approle"])
async def test_a_quoted_credential_file_is_refused_at_login_unrepeated(tmp_path: Path, openbao: OpenBaoDevServer,
                                                                       method: str) -> None:
    """The same rule as broker check, at each login (the files are read again then): Vault
    would be sent the quotes as part of the credential."""
    from prometheus_client import CollectorRegistry

    from broker.errors import AuthRejected
    from broker.metrics import Metrics
    from broker.vault.auth import AppRoleAuth, TokenAuth
    from broker.vault.client import VaultClientConfig

    quoted = tmp_path / "credential"
    quoted.write_text('"Hunter2pw-6a1f0c2e"\n')
    quoted.chmod(0o600)
    what = "token" if method == "token" else "role_id"
    login_with = (TokenAuth(quoted, None) if method == "token"
                  else AppRoleAuth("approle", quoted, quoted))
    vault = VaultClient(VaultClientConfig(address=openbao.address), Metrics(CollectorRegistry()))
    with pytest.raises(AuthRejected) as caught:
        await login_with.login(vault)
    assert str(caught.value).endswith(f"{what} file {quoted} is wrapped in quotes; put only the {what} in it, "
                                      "without quotes")
    assert "Hunter2pw" not in str(caught.value)
