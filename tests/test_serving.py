"""End to end against a real OpenBao and real mTLS sockets: fetch, rotate, grace, revoke."""

from __future__ import annotations

import asyncio
import hashlib
import time
from datetime import datetime

import pytest

from broker.api.app import prefers_plain
from tests.conftest import BrokerFactory, RunningBroker, root_client, token_is_valid


async def test_fetched_token_is_accepted_by_openbao(brokers: BrokerFactory) -> None:
    b = await brokers.start()
    body = await b.get_token()
    assert set(body) == {"profile", "token", "expires_at", "issued_at", "ttl", "generation"}
    assert body["profile"] == "demo" and body["generation"] == 1
    assert 25 <= body["ttl"] <= 30
    assert token_is_valid(b.vault, body["token"])
    info = root_client(b.vault).auth.token.lookup(body["token"])["data"]
    assert info["orphan"] is True
    assert info["meta"]["profile"] == "demo"
    assert f"{b.roles['demo']}-policy" in info["policies"]


async def test_plain_text_accept_gives_the_bare_token(brokers: BrokerFactory) -> None:
    b = await brokers.start()
    status, text, headers = await b.request("GET", "/v1/tokens/demo", headers={"Accept": "text/plain"})
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    assert headers["Cache-Control"] == "no-store"
    assert text == b.broker.cache.get("demo").current.value


ACCEPT_CASES = [
    ("text/plain", True),
    ("TEXT/Plain", True),  # media types are case-insensitive
    ("text/plain, */*;q=0.1", True),
    ("text/plain;q=0.5, application/json;q=0.4", True),
    ("application/json, text/plain, */*", False),  # axios' default: a tie keeps JSON
    ("text/plain, */*", False),
    ("text/plain;q=0", False),
    ("application/json;q=1, text/plain;q=0", False),
    ("text/plainx", False),
    ("text/plain;q=abc", False),
    ("text/plain;q=2", False),
    ("*/*", False),
]


@pytest.mark.parametrize("accept, plain", ACCEPT_CASES)
def test_text_plain_is_chosen_only_when_it_outweighs_json(accept: str, plain: bool) -> None:
    assert prefers_plain(accept) is plain


async def test_accept_negotiation_is_the_same_on_the_hot_route_and_the_full_handler(brokers: BrokerFactory) -> None:
    b = await brokers.start()
    token = b.broker.cache.get("demo").current.value
    for accept, plain in ACCEPT_CASES:
        for query in ("", "?min_ttl=1"):  # a query takes the full handler
            status, body, headers = await b.request("GET", "/v1/tokens/demo" + query, headers={"Accept": accept})
            assert status == 200
            if plain:
                assert headers["Content-Type"].startswith("text/plain") and body == token, accept
            else:
                assert headers["Content-Type"].startswith("application/json") and body["token"] == token, accept


async def test_rotates_before_expiry_and_keeps_previous_valid_through_grace(brokers: BrokerFactory) -> None:
    b = await brokers.start({"demo": {"ttl": "8s", "rotate_after": "3s", "grace": "3s", "check_interval": "30s"}})
    first = await b.get_token()
    await b.wait_for(lambda: b.generation() >= 2, timeout=10, what="the scheduled rotation")
    second = await b.get_token()
    assert second["generation"] == 2 and second["token"] != first["token"]
    state = b.broker.cache.get("demo")
    assert state.previous is not None and state.previous.value == first["token"]
    # Inside grace: the previous token still works at OpenBao.
    assert token_is_valid(b.vault, first["token"])
    # After grace (and before its own expiry at 8 s) the broker revokes it.
    await b.wait_for(lambda: not token_is_valid(b.vault, first["token"]), timeout=6, what="revocation after grace")
    assert time.time() < state.previous.expires_at, "revoked by the broker, not expired at Vault"
    assert token_is_valid(b.vault, second["token"])
    # Vault has revoked it; the broker records that once its revoke call returns to the loop.
    await b.wait_for(lambda: any(e["event"] == "token_revoked" for e in b.audit_events()), timeout=5,
                     what="the revocation in the audit log")
    events = [e["event"] for e in b.audit_events()]
    assert events.count("token_rotated") >= 2
    revoked = [e for e in b.audit_events() if e["event"] == "token_revoked"]
    assert revoked[0]["generation"] == 1 and revoked[0]["reason"] == "grace_ended"
    assert b.metric("broker_rotations_total", profile="demo", outcome="success") >= 2
    assert b.metric("broker_token_generation", profile="demo") >= 2


async def test_token_revoked_behind_our_back_is_replaced_within_check_interval(brokers: BrokerFactory) -> None:
    b = await brokers.start({"demo": {"ttl": "60s", "rotate_after": "40s", "grace": "5s", "check_interval": "1s"}})
    first = await b.get_token()
    root_client(b.vault).auth.token.revoke(first["token"])
    await b.wait_for(lambda: b.generation() >= 2, timeout=5, what="replacement after an external revoke")
    second = await b.get_token()
    assert second["token"] != first["token"] and token_is_valid(b.vault, second["token"])
    invalidated = [e for e in b.audit_events() if e["event"] == "token_invalidated"]
    assert invalidated and invalidated[0]["generation"] == 1


async def test_minted_token_survives_the_brokers_own_relogin(brokers: BrokerFactory) -> None:
    b = await brokers.start()
    body = await b.get_token()
    old_login = b.broker.auth._login
    await b.broker.auth.login()
    assert b.broker.auth._login.token != old_login.token
    # Revoking the broker's old login token (and its children) must not touch what it minted.
    root_client(b.vault).auth.token.revoke(old_login.token)
    assert token_is_valid(b.vault, body["token"])
    await b.request("POST", "/v1/tokens/demo/rotate", cert="ops")  # the new login works
    assert b.generation() == 2


async def test_min_ttl_rotates_early_once_for_concurrent_callers(brokers: BrokerFactory) -> None:
    b = await brokers.start({"demo": {"ttl": "30s", "rotate_after": "20s", "grace": "5s"}})
    await asyncio.sleep(1.2)  # the first token now has < 29 s left
    results = await asyncio.gather(*(b.request("GET", "/v1/tokens/demo?min_ttl=29") for _ in range(8)))
    assert {status for status, _, _ in results} == {200}
    assert {body["generation"] for _, body, _ in results} == {2}, "one shared early rotation"
    assert all(body["ttl"] >= 28 for _, body, _ in results)
    assert b.metric("broker_rotations_total", profile="demo", outcome="success") == 2


async def test_admin_rotate_and_revoke(brokers: BrokerFactory) -> None:
    b = await brokers.start()
    first = await b.get_token()
    status, body, _ = await b.request("POST", "/v1/tokens/demo/rotate", cert="ops")
    assert status == 200 and body["generation"] == 2 and body["profile"] == "demo"
    assert token_is_valid(b.vault, first["token"]), "rotation keeps the previous one through grace"
    second = await b.get_token()
    status, body, _ = await b.request("POST", "/v1/tokens/demo/revoke", cert="ops")
    assert status == 200 and body["generation"] == 3
    assert not token_is_valid(b.vault, first["token"]) and not token_is_valid(b.vault, second["token"])
    third = await b.get_token()
    assert third["generation"] == 3 and token_is_valid(b.vault, third["token"])
    events = [(e["event"], e["identity"]) for e in b.audit_events() if e["event"].startswith("admin_")]
    assert events == [("admin_rotate", "cn:ops"), ("admin_revoke", "cn:ops")]


async def test_list_and_whoami(brokers: BrokerFactory) -> None:
    b = await brokers.start({"demo": {}, "deploy": {"allow": ["cn:ops"]}})
    status, body, _ = await b.request("GET", "/v1/tokens")
    assert status == 200
    assert [p["name"] for p in body["profiles"]] == ["demo"]
    entry = body["profiles"][0]
    assert set(entry) == {"name", "mode", "generation", "expires_at", "rotates_at", "healthy"}
    assert entry["mode"] == "shared"
    assert entry["healthy"] is True and entry["generation"] == 1
    assert "token" not in str(body).lower().replace("tokens", "")
    status, body, _ = await b.request("GET", "/v1/whoami")
    assert body == {"identities": ["cn:job", "uri:spiffe://ci.example/runner/1"], "profiles": ["demo"], "admin": False}
    status, body, _ = await b.request("GET", "/v1/whoami", cert="ops")
    assert body["admin"] is True and body["profiles"] == ["deploy"]


def _fp(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def _epoch(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


async def test_token_served_audit_names_the_token_by_its_fingerprint(brokers: BrokerFactory) -> None:
    """DESIGN §7: token_fp is the first 16 hex digits of SHA-256 of the token, on the hot
    route and on the full handler (a query sends the fetch there) alike."""
    b = await brokers.start()
    hot = await b.get_token()
    full = await b.get_token(params={"min_ttl": "1"})
    assert hot["token"] == full["token"]
    served = [e for e in b.audit_events() if e["event"] == "token_served"]
    assert [(e["profile"], e["identity"], e["generation"], e["outcome"]) for e in served] == \
        [("demo", "cn:job", 1, "ok")] * 2
    assert [e["token_fp"] for e in served] == [_fp(hot["token"])] * 2
    minted = [e for e in b.audit_events() if e["event"] == "token_minted"]
    assert minted and minted[0]["token_fp"] == _fp(hot["token"])
    assert hot["token"] not in b.audit_path.read_text()


def _gauge(b: RunningBroker, slot: str) -> float | None:
    return b.metric("broker_token_expiry_timestamp_seconds", profile="demo", slot=slot)


async def test_expiry_gauges_follow_current_and_previous(brokers: BrokerFactory) -> None:
    b = await brokers.start({"demo": {"ttl": "1h", "rotate_after": "40m", "grace": "10m", "check_interval": "10m"}})
    first = await b.get_token()
    state = b.broker.cache.get("demo")
    assert _gauge(b, "current") == state.current.expires_at == pytest.approx(_epoch(first["expires_at"]), abs=1)
    assert _gauge(b, "previous") == 0

    status, body, _ = await b.request("POST", "/v1/tokens/demo/rotate", cert="ops")
    assert status == 200 and body["generation"] == 2
    second = await b.get_token()
    state = b.broker.cache.get("demo")
    assert state.previous.value == first["token"]
    assert _gauge(b, "current") == state.current.expires_at == pytest.approx(_epoch(second["expires_at"]), abs=1)
    assert _gauge(b, "previous") == state.previous.expires_at == pytest.approx(_epoch(first["expires_at"]), abs=1)

    # An admin revoke retires both slots at Vault and mints a fresh current: previous reads 0.
    status, body, _ = await b.request("POST", "/v1/tokens/demo/revoke", cert="ops")
    assert status == 200 and body["generation"] == 3
    assert not token_is_valid(b.vault, first["token"]) and not token_is_valid(b.vault, second["token"])
    third = await b.get_token()
    assert _gauge(b, "current") == b.broker.cache.get("demo").current.expires_at
    assert _gauge(b, "current") == pytest.approx(_epoch(third["expires_at"]), abs=1)
    assert _gauge(b, "previous") == 0


async def test_previous_expiry_gauge_reads_0_once_grace_revocation_is_done(brokers: BrokerFactory) -> None:
    b = await brokers.start({"demo": {"ttl": "60s", "rotate_after": "40s", "grace": "2s", "check_interval": "60s"}})
    first = await b.get_token()
    status, _, _ = await b.request("POST", "/v1/tokens/demo/rotate", cert="ops")
    assert status == 200 and _gauge(b, "previous") == b.broker.cache.get("demo").previous.expires_at > 0
    await b.wait_for(lambda: any(e["event"] == "token_revoked" for e in b.audit_events()), timeout=10,
                     what="the revocation after grace")
    assert not token_is_valid(b.vault, first["token"])
    await b.wait_for(lambda: _gauge(b, "previous") == 0, timeout=3, what="the previous gauge to drop to 0")
    assert _gauge(b, "current") == b.broker.cache.get("demo").current.expires_at
