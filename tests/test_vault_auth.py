"""The broker's own credential: methods in order, fallback, renewal, re-login on 403."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from tests.conftest import BrokerFactory, root_client, token_is_valid


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
