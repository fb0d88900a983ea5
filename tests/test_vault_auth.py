"""The broker's own credential: methods in order, fallback, renewal, re-login on 403."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import hvac.exceptions as hx
import pytest
from prometheus_client import CollectorRegistry

from broker.audit import AuditLog
from broker.devserver import OpenBaoDevServer, setup_approle, setup_token_role
from broker.errors import AuthRejected, VaultRequestRejected, VaultUnavailable
from broker.metrics import Metrics
from broker.vault.auth import Authenticator, TokenAuth
from broker.vault.client import Login, VaultClient, VaultClientConfig, classify
from tests.conftest import BrokerFactory, LogLines, RunningBroker, root_client, token_is_valid
from tests.faults import TcpProxy
from tests.fakes import FakeClock


def _token_file(directory: Path, token: str) -> Path:
    path = directory / "vault-token"
    path.write_text(token + "\n")
    os.chmod(path, 0o600)
    return path


def _broker_token(brokers: BrokerFactory, role: str, ttl: str = "1h") -> str:
    """A periodic-less token with only the broker policy for ``role``, as an operator would make."""
    from broker.devserver import broker_policy

    brokers.openbao.bao("policy", "write", f"tok-{role}", "-", stdin=broker_policy([role]))
    created = root_client(brokers.openbao).auth.token.create(policies=[f"tok-{role}"], ttl=ttl, no_parent=True)
    return str(created["auth"]["client_token"])


async def test_token_auth_from_file(brokers: BrokerFactory, tmp_path: Path) -> None:
    role = "tokauth-role"
    brokers.openbao.bao("write", f"auth/token/roles/{role}", "allowed_policies=default", "orphan=true")
    path = _token_file(tmp_path, _broker_token(brokers, role))
    b = await brokers.start({"demo": {"policies": []}}, roles={"demo": role},
                            auth=[{"method": "token", "token_file": str(path)}])
    assert token_is_valid(b.vault, (await b.get_token())["token"])
    logins = [e for e in b.audit_events() if e["event"] == "vault_login"]
    assert logins[0]["method"] == "token"
    b.seen_secrets.add(path.read_text().strip())


async def test_token_auth_from_env(brokers: BrokerFactory, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    role = "tokenv-role"
    brokers.openbao.bao("write", f"auth/token/roles/{role}", "allowed_policies=default", "orphan=true")
    token = _broker_token(brokers, role)
    monkeypatch.setenv("BROKER_TEST_VAULT_TOKEN", token)
    b = await brokers.start({"demo": {"policies": []}}, roles={"demo": role},
                            auth=[{"method": "token", "token_env": "BROKER_TEST_VAULT_TOKEN"}])
    assert token_is_valid(b.vault, (await b.get_token())["token"])
    b.seen_secrets.add(token)


async def test_broken_primary_falls_back_to_the_next_method(brokers: BrokerFactory, tmp_path: Path) -> None:
    role = "fallback-role"
    brokers.openbao.bao("write", f"auth/token/roles/{role}", "allowed_policies=default", "orphan=true")
    bad_secret = tmp_path / "bad_secret_id"
    bad_secret.write_text("00000000-0000-0000-0000-000000000000\n")
    os.chmod(bad_secret, 0o600)
    role_id = tmp_path / "role_id"
    role_id.write_text("no-such-role-id\n")
    token_path = _token_file(tmp_path, _broker_token(brokers, role))
    b = await brokers.start({"demo": {"policies": []}}, roles={"demo": role}, auth=[
        {"method": "approle", "role_id_file": str(role_id), "secret_id_file": str(bad_secret)},
        {"method": "token", "token_file": str(token_path)},
    ])
    assert token_is_valid(b.vault, (await b.get_token())["token"])
    events = [(e["event"], e.get("method")) for e in b.audit_events() if e["event"].startswith("vault_login")]
    assert events[:2] == [("vault_login_failed", "approle"), ("vault_login", "token")]
    failed = next(e for e in b.audit_events() if e["event"] == "vault_login_failed")
    assert "no-such-role-id" not in str(failed) and failed["outcome"] == "failure"
    assert b.metric("broker_vault_authenticated") == 1
    b.seen_secrets.add(token_path.read_text().strip())


async def test_relogin_after_our_token_is_revoked_behind_our_back(brokers: BrokerFactory) -> None:
    b = await brokers.start()
    await b.get_token()
    root_client(b.vault).auth.token.revoke(b.broker.auth._login.token)
    status, body, _ = await b.request("POST", "/v1/tokens/demo/rotate", cert="ops")
    assert status == 200 and body["generation"] == 2
    assert [e["event"] for e in b.audit_events()].count("vault_login") == 2


async def test_short_login_is_renewed_and_keeps_working(brokers: BrokerFactory) -> None:
    b = await brokers.start(login_ttl="3s")
    first_login = b.broker.auth._login.token
    await asyncio.sleep(4.5)  # past the first login's TTL: only renewals keep it alive
    status, body, _ = await b.request("POST", "/v1/tokens/demo/rotate", cert="ops")
    assert status == 200 and body["generation"] == 2
    assert b.broker.auth._login.token == first_login, "renewed, not replaced"
    assert b.metric("broker_vault_requests_total", operation="renew_self", outcome="success") >= 1


# --- a credential file or variable with more than the credential in it ----------------------


async def test_a_token_file_with_a_second_line_is_refused_by_name_without_quoting_it(
        brokers: BrokerFactory, tmp_path: Path) -> None:
    """An operator drops a new token into the file, with the old one on a second line. Sent as
    is, requests refuses the header and quotes it whole: into the log, audit, /readyz and the
    503 body. The file must be refused by name, and the broker keep serving what it has."""
    role = "twolines-role"
    brokers.openbao.bao("write", f"auth/token/roles/{role}", "allowed_policies=default", "orphan=true")
    path = _token_file(tmp_path, _broker_token(brokers, role))
    b = await brokers.start({"demo": {"policies": []}}, roles={"demo": role},
                            auth=[{"method": "token", "token_file": str(path)}])
    old = path.read_text().strip()
    new = _broker_token(brokers, role)
    b.seen_secrets.update({old, new})
    served = (await b.get_token())["token"]
    path.write_text(f"{new}\nold: {old}\n")
    root_client(b.vault).auth.token.revoke(old)  # the next Vault call gets a 403 and logs in again

    status, body, headers = await b.request("POST", "/v1/tokens/demo/rotate", cert="ops")
    expected = f"token file {path} has 2 lines; put only the token in it"
    assert status == 503 and body["error"] == "unavailable" and headers["Retry-After"], body
    assert expected in body["message"], body
    failed = [e for e in b.audit_events() if e["event"] == "vault_login_failed"]
    assert failed[-1]["method"] == "token" and expected in failed[-1]["reason"]
    status, ready = await b.ops("/readyz")
    assert expected in ready["vault"]["last_error"]
    assert ready["vault"]["authenticated"] is False  # Vault refused the old token: nothing to keep
    # Still serving the token it holds (an orphan, valid at Vault), and alive.
    assert (await b.get_token())["token"] == served and token_is_valid(b.vault, served)
    assert (await b.ops("/healthz"))[0] == 200
    assert old not in "\n".join(b.error_bodies) and new not in "\n".join(b.error_bodies)

    path.write_text(new + "\n")  # repaired: the login loop's next try works
    await b.wait_for(lambda: b.broker.auth.authenticated, what="a login with the repaired file")
    status, body, _ = await b.request("POST", "/v1/tokens/demo/rotate", cert="ops")
    assert status == 200 and body["generation"] == 2
    assert b.broker.auth.authenticated and b.broker.auth.last_error is None


@pytest.mark.parametrize(("value", "problem"), [
    ("hvs.AAAAAAAAAAAAAAAAAAAAAAAA\nhvs.BBBBBBBBBBBBBBBBBBBBBBBB", "has 2 lines; put only the token in it"),
    ("hvs.AAAAAAAAAAAAAAAAAAAAAAAA hvs.BBBBBBBBBBBBBBBBBBBBBBBB", "contains a space or tab; put only the token in it"),
    ("hvs.AAAAAAAAAAAAAAAAAAAAAAAA\x1bBBBBBBBBBBBBBBBBBBBBBBBB", "contains a control character; put only the token in it"),
    (" \n", "is empty"),
])
async def test_a_bad_token_variable_is_refused_by_name_before_any_vault_call(
        openbao: OpenBaoDevServer, monkeypatch: pytest.MonkeyPatch, value: str, problem: str) -> None:
    monkeypatch.setenv("BROKER_TEST_BAD_TOKEN", value)
    metrics = Metrics(CollectorRegistry())
    vault = VaultClient(VaultClientConfig(address=openbao.address), metrics)
    try:
        with pytest.raises(AuthRejected) as caught:
            await TokenAuth(None, "BROKER_TEST_BAD_TOKEN").login(vault)
    finally:
        vault.close()
    assert str(caught.value) == f"vault login_token: environment variable BROKER_TEST_BAD_TOKEN {problem}"
    assert "AAAA" not in str(caught.value) and "BBBB" not in str(caught.value)
    sent = [sample for family in metrics.registry.collect() if family.name == "broker_vault_requests"
            for sample in family.samples if sample.name == "broker_vault_requests_total"]
    assert sent == [], "refused here: nothing was sent to Vault"


# --- renewal: kept through an outage, replaced near the max TTL ------------------------------


async def _advance_until(b: RunningBroker, clock: FakeClock, predicate: Callable[[], bool], what: str,
                         step: float = 0.0) -> None:
    """Advance the fake clock by ``step`` at a time, letting real Vault calls finish in between."""
    deadline = asyncio.get_running_loop().time() + 15
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await clock.advance(step)
        await asyncio.sleep(0.02)
    b.remember_tokens()


async def test_a_renewal_during_an_outage_keeps_the_login_until_it_expires(
        brokers: BrokerFactory, proxy: TcpProxy, caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    b = await brokers.start({"demo": {"ttl": "3h", "grace": "10m", "rotate_after": "2h", "check_interval": "3h"}},
                            vault_address=proxy.address, clock=clock, login_ttl="1h")
    auth = b.broker.auth
    login = auth._login
    assert login is not None and login.ttl == pytest.approx(3600, abs=5)

    proxy.cut()
    await clock.advance(login.ttl * 2 / 3)  # the renewal point
    await _advance_until(b, clock, lambda: auth.last_error is not None, "a failed renewal")
    # A plain outage: the login still has a third of its life, so it is kept and nothing
    # points at the credentials.
    assert auth.authenticated and auth._login is login
    assert b.metric("broker_vault_authenticated") == 1
    assert "cannot connect to Vault" in auth.last_error
    assert [e["event"] for e in b.audit_events()].count("vault_login_failed") == 0
    status, ready = await b.ops("/readyz")
    assert ready["vault"]["authenticated"] is True and "cannot connect" in ready["vault"]["last_error"]
    assert b.metric("broker_vault_requests_total", operation="renew_self", outcome="unavailable") == 1

    proxy.heal()  # back before the login ran out: the retry renews the same token
    assert auth.renew_retry_at is not None and auth.renew_retry_at > clock.now()
    await clock.advance(auth.renew_retry_at - clock.now())
    await _advance_until(b, clock, lambda: auth.last_error is None, "the retried renewal")
    assert auth._login is not None and auth._login.token == login.token
    assert b.metric("broker_vault_requests_total", operation="renew_self", outcome="success") == 1

    proxy.cut()  # now an outage longer than what is left of the login
    renewed_until = auth._valid_until
    assert renewed_until is not None
    await clock.advance(auth._login.ttl * 2 / 3)
    await _advance_until(b, clock, lambda: auth.renew_retry_at is not None, "a failed renewal")
    while clock.now() < renewed_until - 60:  # held through the outage, retried with backoff...
        assert auth.authenticated and b.metric("broker_vault_authenticated") == 1
        await clock.advance(30)
        await asyncio.sleep(0.02)
    assert auth._login is not None and auth._login.token == login.token
    assert b.metric("broker_vault_requests_total", operation="renew_self", outcome="unavailable") >= 3
    # ...until it really expires; then it is gone, and the broker says so.
    await _advance_until(b, clock, lambda: not auth.authenticated, "the login to expire", step=5)
    assert clock.now() >= renewed_until - 1
    assert b.metric("broker_vault_authenticated") == 0

    def login_failures() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("vault_login_failed")]

    await _advance_until(b, clock, lambda: bool(login_failures()), "a failed login", step=5)
    assert f"vault={proxy.address} error=" in login_failures()[0], "the log says which Vault cannot be reached"
    assert "cannot connect to Vault" in login_failures()[0]

    proxy.heal()
    await _advance_until(b, clock, lambda: auth.authenticated, "a new login", step=1)
    assert auth._login is not None and auth._login.token != login.token
    assert [e["event"] for e in b.audit_events()].count("vault_login") == 2
    assert b.metric("broker_vault_authenticated") == 1


async def test_near_its_max_ttl_the_login_is_replaced_and_minted_tokens_stay_valid(
        brokers: BrokerFactory, tmp_path: Path, log_lines: LogLines) -> None:
    """DESIGN §6 rule 6: renewals grant less and less as the max TTL nears; then a new login,
    made while the old one still works (not after it ran out)."""
    suffix = uuid.uuid4().hex[:8]
    role, approle = f"demo-{suffix}", f"broker-{suffix}"
    setup_token_role(brokers.openbao, role, [f"{role}-policy"])
    # Renewed at 2/3 of 4 s; the second renewal grants what is left of 7 s, under half: a new login.
    files = setup_approle(brokers.openbao, [role], tmp_path / "secrets", login_ttl="4s", role_name=approle)
    brokers.openbao.bao("write", f"auth/approle/role/{approle}", "token_max_ttl=7s")
    seen = len(log_lines)
    b = await brokers.start(roles={"demo": role}, auth=[
        {"method": "approle", "role_id_file": str(files.role_id_file), "secret_id_file": str(files.secret_id_file)}])
    auth = b.broker.auth
    assert auth._login is not None
    first = auth._login.token
    minted = (await b.get_token())["token"]

    await b.wait_for(lambda: [e["event"] for e in b.audit_events()].count("vault_login") == 2, timeout=15,
                     what="a second login near the first one's max TTL")
    assert auth._login is not None and auth._login.token != first
    assert b.metric("broker_vault_requests_total", operation="renew_self", outcome="success") >= 1
    assert not [line for line in log_lines[seen:] if "vault_login_expired" in line], "replaced, not run out"
    await b.wait_for(lambda: not token_is_valid(b.vault, first), timeout=15, what="the first login to expire")
    assert token_is_valid(b.vault, minted), "minted tokens are orphans: they outlive the login that made them"
    status, body, _ = await b.request("POST", "/v1/tokens/demo/rotate", cert="ops")
    assert status == 200 and body["generation"] == 2
    assert token_is_valid(b.vault, (await b.get_token())["token"])
    assert b.metric("broker_vault_authenticated") == 1
    assert [e["event"] for e in b.audit_events()].count("vault_login_failed") == 0


def test_a_renewal_refused_past_the_max_ttl_is_not_an_outage() -> None:
    # OpenBao answers 500 here; read as an outage, the broker would retry the renewal until the
    # login ran out instead of logging in again.
    exc = hx.InternalServerError("1 error occurred:\n\t* past the max TTL, cannot renew\n\n", method="post",
                                 url="http://127.0.0.1:8200/v1/auth/token/renew-self")
    error = classify("renew_self", exc)
    assert isinstance(error, VaultRequestRejected)
    assert str(error) == "vault renew_self: the token is at its max TTL and cannot be renewed"
    assert isinstance(classify("create_token", exc), VaultUnavailable)


# --- the login loop survives what nobody classified ----------------------------------------


class _BrokenOnce:
    """An auth method with a bug: its first login raises an error no one classifies, quoting
    a credential in its text; later logins work."""

    name = "token"

    def __init__(self, inner: TokenAuth, secret: str) -> None:
        self._inner = inner
        self._secret = secret
        self.calls = 0

    async def login(self, vault: VaultClient) -> Login:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError(f"unexpected answer {self._secret}")
        return await self._inner.login(vault)


async def test_an_unexpected_error_in_the_login_loop_is_logged_and_retried(
        brokers: BrokerFactory, tmp_path: Path, log_lines: LogLines) -> None:
    role = "loopbug-role"
    brokers.openbao.bao("write", f"auth/token/roles/{role}", "allowed_policies=default", "orphan=true")
    token = _broker_token(brokers, role)
    log_lines.secrets.add(token)
    clock = FakeClock()
    metrics = Metrics(CollectorRegistry())
    audit = AuditLog(tmp_path / "audit.jsonl", clock)
    audit.open()
    vault = VaultClient(VaultClientConfig(address=brokers.openbao.address), metrics)
    method = _BrokenOnce(TokenAuth(_token_file(tmp_path, token), None), token)
    auth = Authenticator(vault, [method], clock, audit, metrics)
    seen = len(log_lines)
    task = asyncio.create_task(auth.run())
    try:
        await clock.settle()
        assert not task.done(), "the loop must outlive the error"
        assert auth.last_error == "unexpected RuntimeError in the Vault login loop"
        assert not auth.authenticated
        errors = [line for line in log_lines[seen:] if "vault_auth_internal_error" in line]
        assert len(errors) == 1 and errors[0].startswith("ERROR")
        assert "error=RuntimeError at test_vault_auth.py:" in errors[0], "type and where, never the message"
        assert clock.sleeps, "it backs off before trying again"
        deadline = asyncio.get_running_loop().time() + 10
        while not auth.authenticated:  # the backoff on the fake clock, then a real login
            assert asyncio.get_running_loop().time() < deadline and not task.done()
            await clock.advance(1)
            await asyncio.sleep(0.02)
        assert method.calls == 2 and metrics.registry.get_sample_value("broker_vault_authenticated") == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        vault.close()
        audit.close()
    assert token not in "\n".join(log_lines[seen:]) and token not in (tmp_path / "audit.jsonl").read_text()
