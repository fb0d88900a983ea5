"""The broker's own logins do not pile up at Vault: one login per need (not one per waiting
caller, not one per 403), a replaced login is revoked, and a clean shutdown revokes the last
one, except a token the operator configured. Counted at a private OpenBao with its root token."""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import hvac
import pytest
from prometheus_client import CollectorRegistry

from broker.audit import AuditLog
from broker.devserver import AppRoleFiles, OpenBaoDevServer, broker_policy, setup_approle
from broker.errors import VaultError
from broker.metrics import Metrics
from broker.vault.auth import RENEW_FRACTION, AppRoleAuth, AuthMethod, Authenticator, TokenAuth
from broker.vault.client import Login, VaultClient, VaultClientConfig
from tests.conftest import BrokerFactory, LogLines, RunningBroker, root_client, token_is_valid
from tests.fakes import FakeClock
from tests.faults import TcpProxy

BAD_SECRET_ID = "00000000-0000-0000-0000-000000000000\n"


def live_logins(server: OpenBaoDevServer, role_name: str) -> list[str]:
    """Accessors of the live tokens an AppRole login of ``role_name`` made."""
    root = root_client(server)
    live = []
    for accessor in root.auth.token.list_accessors()["data"]["keys"]:
        try:
            data = root.auth.token.lookup_accessor(accessor)["data"]
        except hvac.exceptions.InvalidRequest:
            continue  # revoked or expired between the list and the lookup
        if (data.get("meta") or {}).get("role_name") == role_name:
            live.append(accessor)
    return live


def _login(b: RunningBroker) -> Login:
    login = b.broker.auth._login
    assert login is not None, "the broker is logged in"
    return login


class _Jitter(random.Random):
    """Backoff with a known length: 90 % of each ceiling (1 s, 2 s, 4 s ...)."""

    def random(self) -> float:
        return 0.9


@dataclass
class Harness:
    """An Authenticator on a fake clock against a real OpenBao."""

    auth: Authenticator
    vault: VaultClient
    clock: FakeClock
    audit_path: Path

    def logins(self) -> int:
        return [json.loads(line)["event"] for line in self.audit_path.read_text().splitlines()].count("vault_login")

    async def until(self, predicate: Callable[[], bool], what: str, timeout: float = 10) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate():
            assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.02)  # real Vault calls finish on their threads meanwhile


@pytest.fixture
async def harness(tmp_path: Path, private_openbao: OpenBaoDevServer,
                  log_lines: LogLines) -> AsyncIterator[Callable[[list[AuthMethod]], Harness]]:
    made: list[tuple[Harness, AuditLog, asyncio.Task[None]]] = []

    def make(methods: list[AuthMethod], **settings: float) -> Harness:
        clock = FakeClock()
        metrics = Metrics(CollectorRegistry())
        audit = AuditLog(tmp_path / f"audit-{len(made)}.jsonl", clock)
        audit.open()
        vault = VaultClient(VaultClientConfig(address=private_openbao.address), metrics)
        auth = Authenticator(vault, methods, clock, audit, metrics, rng=_Jitter(), **settings)  # type: ignore[arg-type]
        h = Harness(auth, vault, clock, audit.path)
        made.append((h, audit, asyncio.create_task(auth.run())))
        return h

    yield make
    for h, audit, task in made:
        if h.auth._login is not None:
            log_lines.secrets.add(h.auth._login.token)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await h.auth.logout(5)
        h.vault.close()
        audit.close()


def _approle(server: OpenBaoDevServer, directory: Path, name: str) -> tuple[AppRoleFiles, AppRoleAuth]:
    files = setup_approle(server, ["demo"], directory / name, role_name=name)
    return files, AppRoleAuth("approle", files.role_id_file, files.secret_id_file)


def _swap(path: Path, text: str) -> str:
    """Write ``text`` (0600, as a credential file must be); returns what was there."""
    old = path.read_text() if path.exists() else ""
    path.write_text(text)
    os.chmod(path, 0o600)
    return old


async def test_the_login_loop_does_not_log_in_again_after_a_caller_did(
        harness: Callable[..., Harness], private_openbao: OpenBaoDevServer, tmp_path: Path) -> None:
    """Vault came back while the login loop slept in its backoff; a rotation's call logged in
    first. The loop, waking, must see that and not make a second login."""
    files, method = _approle(private_openbao, tmp_path, "broker-loop")
    good = _swap(files.secret_id_file, BAD_SECRET_ID)
    h = harness([method])
    await h.until(lambda: len(h.clock.sleeps) == 1, "the first failed login")
    await h.clock.advance(h.clock.sleeps[-1])
    await h.until(lambda: len(h.clock.sleeps) == 2, "the second failed login")  # now asleep for 1.8 s

    _swap(files.secret_id_file, good)  # Vault is set up again
    await h.clock.advance(1.1)  # past the floor between request-driven logins, not the loop's backoff
    assert await h.auth.call(h.vault.renew_self) > 0
    assert h.logins() == 1 and len(live_logins(private_openbao, "broker-loop")) == 1
    first = h.auth._login

    await h.clock.advance(1.0)  # the loop wakes from its backoff...
    await h.until(lambda: any(s > 60 for s in h.clock.sleeps[2:]), "the loop to plan the renewal")
    assert h.auth._login is first, "...and keeps the login a caller made"
    assert h.logins() == 1
    assert len(live_logins(private_openbao, "broker-loop")) == 1


async def test_a_replaced_login_is_revoked_at_vault(
        harness: Callable[..., Harness], private_openbao: OpenBaoDevServer, tmp_path: Path,
        log_lines: LogLines) -> None:
    """On a fallback AppRole, the retry of the primary one logs in: the fallback's login token
    is revoked then, not left to live out its TTL."""
    primary_files, primary = _approle(private_openbao, tmp_path, "broker-primary")
    _, fallback = _approle(private_openbao, tmp_path, "broker-fallback")
    good = _swap(primary_files.secret_id_file, BAD_SECRET_ID)
    h = harness([primary, fallback], preferred_retry=30.0)
    await h.until(lambda: h.auth.method == "approle" and h.auth.preferred_retry_at is not None, "the fallback login")
    fallback_login = h.auth._login
    assert fallback_login is not None and live_logins(private_openbao, "broker-fallback")
    log_lines.secrets.add(fallback_login.token)

    _swap(primary_files.secret_id_file, good)
    seen = len(log_lines)
    await h.until(lambda: h.clock.waiting > 0, "the authenticator to wait for its retry of the primary")
    await h.clock.advance(30)  # the retry of the primary method
    await h.until(lambda: h.auth._login is not fallback_login, "the primary login")
    await h.until(lambda: not token_is_valid(private_openbao, fallback_login.token), "the fallback login revoked")
    assert live_logins(private_openbao, "broker-fallback") == []
    assert len(live_logins(private_openbao, "broker-primary")) == 1
    assert h.auth._login is not None and token_is_valid(private_openbao, h.auth._login.token), "never the one in use"
    assert any("vault_logout method=approle" in line and "reason=replaced" in line for line in log_lines[seen:])


async def test_an_operator_token_is_never_revoked_when_replaced(
        harness: Callable[..., Harness], private_openbao: OpenBaoDevServer, tmp_path: Path,
        log_lines: LogLines) -> None:
    primary_files, primary = _approle(private_openbao, tmp_path, "broker-main")
    private_openbao.bao("policy", "write", "operator-policy", "-", stdin=broker_policy(["demo"]))
    token = root_client(private_openbao).auth.token.create(policies=["operator-policy"], ttl="1h",
                                                          no_parent=True)["auth"]["client_token"]
    log_lines.secrets.add(token)
    token_file = tmp_path / "vault-token"
    _swap(token_file, token + "\n")
    good = _swap(primary_files.secret_id_file, BAD_SECRET_ID)
    h = harness([primary, TokenAuth(token_file, None)], preferred_retry=30.0)
    await h.until(lambda: h.auth.method == "token", "the fallback to the operator's token")

    _swap(primary_files.secret_id_file, good)
    await h.until(lambda: h.clock.waiting > 0, "the authenticator to wait for its retry of the primary")
    await h.clock.advance(30)
    await h.until(lambda: h.auth.method == "approle", "the primary login")
    await h.auth.logout(5)  # also at shutdown: the approle login goes, the operator's token stays
    assert live_logins(private_openbao, "broker-main") == []
    assert token_is_valid(private_openbao, token)


async def test_a_403_from_a_policy_without_the_capability_is_reported_not_met_with_logins(
        brokers: BrokerFactory, private_openbao: OpenBaoDevServer, log_lines: LogLines) -> None:
    b = await brokers.start(vault=private_openbao)
    role_name = _login(b).meta["role_name"]
    # The operator removes auth/token/create/<role> from the broker's policy.
    private_openbao.bao("policy", "write", f"{role_name}-policy", "-", stdin=broker_policy([]))
    seen = len(log_lines)
    for _ in range(3):
        status, body, _ = await b.request("POST", "/v1/tokens/demo/rotate", cert="ops")
        assert status == 503, body
    assert [e["event"] for e in b.audit_events()].count("vault_login") == 1
    assert len(live_logins(private_openbao, role_name)) == 1
    assert b.broker.auth.authenticated
    reports = [line for line in log_lines[seen:] if "vault_permission_denied operation=create_token" in line]
    assert reports and all("the broker's Vault policy lacks the capability" in line for line in reports), reports
    assert not [line for line in log_lines[seen:] if "action=relogin" in line]
    assert (await b.get_token())["token"], "still serving the token it holds"


async def test_a_token_revoked_behind_our_back_still_gets_one_new_login(
        brokers: BrokerFactory, private_openbao: OpenBaoDevServer) -> None:
    b = await brokers.start(vault=private_openbao)
    role_name = _login(b).meta["role_name"]
    root_client(private_openbao).auth.token.revoke(_login(b).token)
    results = await asyncio.gather(*(b.request("POST", "/v1/tokens/demo/rotate", cert="ops") for _ in range(3)))
    assert [status for status, _, _ in results] == [200] * 3
    assert [e["event"] for e in b.audit_events()].count("vault_login") == 2
    assert len(live_logins(private_openbao, role_name)) == 1
    # Retiring the revoked login gets a 403 from Vault: it is gone, which is what was wanted.
    await b.wait_for(lambda: any(e["event"] == "vault_logout" for e in b.audit_events()), what="the old login retired")
    logouts = [(e["reason"], e["outcome"]) for e in b.audit_events() if e["event"] == "vault_logout"]
    assert logouts == [("replaced (already revoked or expired at Vault)", "ok")]


async def test_a_clean_shutdown_revokes_the_brokers_own_login(
        brokers: BrokerFactory, private_openbao: OpenBaoDevServer, log_lines: LogLines) -> None:
    b = await brokers.start(vault=private_openbao)
    role_name = _login(b).meta["role_name"]
    login = _login(b).token
    served = (await b.get_token())["token"]
    assert len(live_logins(private_openbao, role_name)) == 1
    seen = len(log_lines)
    await b.shutdown()
    assert not token_is_valid(private_openbao, login)
    assert live_logins(private_openbao, role_name) == []
    assert token_is_valid(private_openbao, served), "what it minted lives on (orphans; revoke_on_shutdown is off)"
    assert any("vault_logout method=approle" in line and "reason=shutdown" in line for line in log_lines[seen:])
    assert b.metric("broker_vault_authenticated") == 0
    logouts = [(e["method"], e["reason"], e["outcome"]) for e in b.audit_events() if e["event"] == "vault_logout"]
    assert logouts == [("approle", "shutdown", "ok")], "audited like the login it ends"


async def test_a_clean_shutdown_keeps_an_operator_token(
        brokers: BrokerFactory, private_openbao: OpenBaoDevServer, tmp_path: Path, log_lines: LogLines) -> None:
    role = "optoken-role"
    private_openbao.bao("write", f"auth/token/roles/{role}", "allowed_policies=default", "orphan=true")
    private_openbao.bao("policy", "write", "optoken-policy", "-", stdin=broker_policy([role]))
    token = root_client(private_openbao).auth.token.create(policies=["optoken-policy"], ttl="1h",
                                                          no_parent=True)["auth"]["client_token"]
    log_lines.secrets.add(token)
    token_file = tmp_path / "vault-token"
    _swap(token_file, token + "\n")
    b = await brokers.start({"demo": {"policies": []}}, vault=private_openbao, roles={"demo": role},
                            auth=[{"method": "token", "token_file": str(token_file)}])
    b.seen_secrets.add(token)
    await b.shutdown()
    assert token_is_valid(private_openbao, token)


async def test_a_renewal_that_waited_while_another_login_was_adopted_keeps_the_new_one(
        harness: Callable[..., Harness], private_openbao: OpenBaoDevServer, tmp_path: Path,
        log_lines: LogLines, monkeypatch: pytest.MonkeyPatch) -> None:
    """The renewal read login L1, then waited for a worker thread; meanwhile L1 was revoked
    behind the broker's back and a request's 403 adopted L2. The renewal (of hvac's token: L2)
    must not write L1 back, or the shutdown would revoke the dead L1 and leave L2 alive."""
    _, method = _approle(private_openbao, tmp_path, "broker-renew")
    h = harness([method])
    await h.until(lambda: h.auth.authenticated, "the first login")
    first = h.auth._login
    assert first is not None
    log_lines.secrets.add(first.token)
    renew_self, waiting, go_on = h.vault.renew_self, asyncio.Event(), asyncio.Event()

    async def queued_renew() -> float:
        waiting.set()
        await go_on.wait()
        return await renew_self()

    monkeypatch.setattr(h.vault, "renew_self", queued_renew)
    await h.until(lambda: h.clock.waiting > 0, "the loop asleep until the renewal")
    await h.clock.advance(first.ttl * RENEW_FRACTION + 1)
    await asyncio.wait_for(waiting.wait(), 10)
    root_client(private_openbao).auth.token.revoke(first.token)
    try:  # 403, token gone, one new login; the retried lookup of L1's accessor may fail: irrelevant
        await h.auth.call(lambda: h.vault.lookup_accessor(first.accessor))
    except VaultError:
        pass
    second = h.auth._login
    assert second is not None and second.token != first.token
    log_lines.secrets.add(second.token)
    go_on.set()
    await h.until(lambda: h.clock.waiting > 0 and h.auth.renew_retry_at is None, "the renewal to finish")
    await asyncio.sleep(0.1)
    assert h.auth._login is not None and h.auth._login.token == second.token
    await h.auth.logout(5)
    assert not token_is_valid(private_openbao, second.token), "the shutdown revoked the login in use"


async def test_a_rotation_still_running_at_shutdown_does_not_log_in_again(
        brokers: BrokerFactory, proxy: TcpProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    """A scheduled rotation's mint is on the wire at SIGTERM (it is shielded: the shutdown does
    not stop it). When Vault answers after logout began, the rotation found no login and made a
    new one, which nothing revoked: the broker's own credential outlived a clean stop."""
    clock = FakeClock()
    b = await brokers.start({"demo": {"ttl": "1h", "grace": "10m", "rotate_after": "40m", "check_interval": "1h"}},
                            clock=clock, vault_address=proxy.address, vault_timeout="30s")
    auth, vault = b.broker.auth, b.broker.vault
    role_name = _login(b).meta["role_name"]
    revoke_self_with, revoking = vault.revoke_self_with, asyncio.Event()

    async def slow_revoke_self(token: str) -> None:  # the logout's one call, slower than the mint's answer
        await revoking.wait()
        await revoke_self_with(token)

    monkeypatch.setattr(vault, "revoke_self_with", slow_revoke_self)
    proxy.hold()
    on_the_wire = proxy.request_seen("/v1/auth/token/create")
    await clock.advance(b.broker.cache.get("demo").current.rotate_at - clock.now())
    await asyncio.wait_for(on_the_wire.wait(), 10)
    b.stop.set()  # SIGTERM
    await b.wait_for(lambda: auth._login is None, what="the logout to begin")
    proxy.release()  # Vault answers the mint now
    await asyncio.sleep(0.5)
    assert auth._login is None, "no login after logout began"
    revoking.set()
    await asyncio.wait_for(b.task, 20)
    await b.wait_for(lambda: live_logins(b.vault, role_name) == [], timeout=5, what="every broker login revoked")
