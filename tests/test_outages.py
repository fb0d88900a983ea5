"""OpenBao paused, killed, restarted empty, slow, or cutting connections mid-request.

For each: fetches keep succeeding while the cached token is valid, /readyz, metrics and audit
say what is wrong, and the broker recovers by itself once OpenBao is back.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.devserver import OpenBaoDevServer, setup_approle, setup_token_role
from tests.conftest import BrokerFactory, RunningBroker, root_client, token_is_valid
from tests.faults import TcpProxy

FAST = {"ttl": "30s", "rotate_after": "3s", "grace": "2s", "check_interval": "1s", "alert_threshold": 2}


def _state(b: RunningBroker):  # type: ignore[no-untyped-def]
    return b.broker.cache.get("demo")


async def _assert_reported_unhealthy(b: RunningBroker) -> None:
    await b.wait_for(lambda: _state(b).unhealthy, timeout=15, what="the outage to be reported")
    status, ready = await b.ops("/readyz")
    assert status == 503 and ready["profiles"]["demo"]["consecutive_failures"] >= 2
    assert b.metric("broker_rotation_consecutive_failures", profile="demo") >= 2
    failed = [e for e in b.audit_events() if e["event"] in ("check_failed", "rotation_failed")]
    assert failed and all(e["outcome"] == "failure" and e["reason"] for e in failed)


async def _assert_recovers(b: RunningBroker, within: float) -> None:
    await b.wait_for(lambda: not _state(b).unhealthy and _state(b).current is not None
                     and token_is_valid(b.vault, _state(b).current.value),
                     timeout=within, what="recovery with a token valid at OpenBao")
    status, _ = await b.ops("/readyz")
    assert status == 200
    body = await b.get_token()
    assert token_is_valid(b.vault, body["token"])


def _reprovision(server: OpenBaoDevServer, b: RunningBroker) -> None:
    """What an operator does after OpenBao lost everything: roles and the broker's AppRole again."""
    role = b.roles["demo"]
    setup_token_role(server, role, [f"{role}-policy"])
    secrets = Path(str(b.broker.config.vault.auth[0].secret_id_file)).parent
    setup_approle(server, [role], secrets, role_name=f"broker-{role}")
    b.seen_secrets.add((secrets / "secret_id").read_text().strip())


async def test_openbao_paused_longer_than_a_rotation(brokers: BrokerFactory,
                                                    private_openbao: OpenBaoDevServer) -> None:
    b = await brokers.start({"demo": FAST}, vault=private_openbao)
    first = await b.get_token()
    private_openbao.pause()
    try:
        await _assert_reported_unhealthy(b)
        await asyncio.sleep(max(0.0, _state(b).current.rotate_at - time.time()) + 0.5)  # rotation is overdue
        for _ in range(5):
            assert (await b.get_token())["token"] == first["token"], "the cached token is still served"
        assert b.generation() == 1
    finally:
        private_openbao.resume()
    await _assert_recovers(b, within=1 + 2 * 2 + 3)  # check_interval + two timed-out calls + slack
    assert b.generation() >= 2
    assert {"check_failed", "rotation_failed"} & {e["event"] for e in b.audit_events()}


async def test_openbao_killed_then_back_empty(brokers: BrokerFactory, private_openbao: OpenBaoDevServer) -> None:
    b = await brokers.start({"demo": FAST}, vault=private_openbao)
    first = await b.get_token()
    private_openbao.stop()
    await _assert_reported_unhealthy(b)
    assert (await b.get_token())["token"] == first["token"]
    assert b.metric("broker_vault_requests_total", operation="lookup_accessor", outcome="unavailable") >= 1

    private_openbao.start()  # dev mode keeps nothing: every token, role and AppRole is gone
    _reprovision(private_openbao, b)
    await _assert_recovers(b, within=8)
    assert not token_is_valid(b.vault, first["token"])
    events = [e["event"] for e in b.audit_events()]
    assert events.count("vault_login") >= 2, "logged in again to the new OpenBao"
    assert "check_failed" in events


async def test_openbao_restarted_empty_while_up(brokers: BrokerFactory, private_openbao: OpenBaoDevServer) -> None:
    b = await brokers.start({"demo": {**FAST, "rotate_after": "20s"}}, vault=private_openbao)
    first = await b.get_token()
    private_openbao.restart_empty()
    _reprovision(private_openbao, b)
    # Every token is gone at OpenBao; the check notices within check_interval and replaces it.
    await b.wait_for(lambda: b.generation() >= 2, timeout=6, what="replacement of the lost token")
    second = await b.get_token()
    assert second["token"] != first["token"] and token_is_valid(b.vault, second["token"])
    invalidated = [e for e in b.audit_events() if e["event"] == "token_invalidated"]
    assert invalidated[0]["token_fp"] and invalidated[0]["generation"] == 1


@pytest.fixture
async def proxy(private_openbao: OpenBaoDevServer) -> AsyncIterator[TcpProxy]:
    p = await TcpProxy("127.0.0.1", private_openbao.port).start()
    yield p
    await p.stop()


def vault_requests(b: RunningBroker) -> float:
    """Every Vault call the broker has finished (any operation, any outcome)."""
    return sum(sample.value for metric in b.broker.metrics.registry.collect()
               if metric.name == "broker_vault_requests" for sample in metric.samples
               if sample.name == "broker_vault_requests_total")


CREATE = "/v1/auth/token/create"


async def test_stalled_openbao_never_stalls_fetches(brokers: BrokerFactory, private_openbao: OpenBaoDevServer,
                                                    proxy: TcpProxy) -> None:
    """OpenBao fully stalled (the proxy holds every byte) in the middle of a rotation: fetches
    are still answered, from the cache, without a single Vault call finishing meanwhile."""
    b = await brokers.start({"demo": {**FAST, "rotate_after": "20s", "check_interval": "30s"}},
                            vault=private_openbao, vault_address=proxy.address,
                            vault_timeout="60s")  # the held call must not time out while the test looks
    first = await b.get_token()
    proxy.hold()
    on_the_wire = proxy.request_seen(CREATE)
    rotation = asyncio.create_task(b.request("POST", "/v1/tokens/demo/rotate", cert="ops"))
    try:
        await asyncio.wait_for(on_the_wire.wait(), timeout=10)  # the rotation now waits on OpenBao
        calls = vault_requests(b)
        for _ in range(20):
            body = await asyncio.wait_for(b.get_token(), timeout=10)
            assert body["token"] == first["token"] and body["generation"] == 1
        assert not rotation.done(), "the rotation is still stuck at OpenBao"
        assert vault_requests(b) == calls, "no fetch waited on (or went to) OpenBao"
        assert b.metric("broker_token_requests_total", profile="demo", outcome="served") >= 21
    finally:
        proxy.release()
    status, body, _ = await asyncio.wait_for(rotation, timeout=20)
    assert status == 200 and body["generation"] == 2, body
    assert vault_requests(b) > calls
    assert (await b.get_token())["generation"] == 2


async def test_connection_cut_mid_request_fails_the_rotation_then_recovers(
    brokers: BrokerFactory, private_openbao: OpenBaoDevServer, proxy: TcpProxy
) -> None:
    b = await brokers.start({"demo": {**FAST, "rotate_after": "20s"}}, vault=private_openbao,
                            vault_address=proxy.address)
    first = await b.get_token()
    proxy.hold()
    on_the_wire = proxy.request_seen(CREATE)
    rotation = asyncio.create_task(b.request("POST", "/v1/tokens/demo/rotate", cert="ops"))
    await asyncio.wait_for(on_the_wire.wait(), timeout=10)
    proxy.cut()  # the create request is on the wire: drop it
    proxy.release()
    status, body, headers = await rotation
    assert status == 503 and set(body) == {"error", "message"} and body["error"] == "unavailable"
    assert body["message"].startswith("rotating profile demo failed (cannot connect to Vault")
    assert "the current token (generation 1, " in body["message"], "the admin learns jobs are still served"
    assert body["message"].endswith("retry later") and first["token"] not in body["message"]
    assert int(headers["Retry-After"]) >= 1 and headers["Cache-Control"] == "no-store"
    assert (await b.get_token())["token"] == first["token"]
    assert b.metric("broker_rotations_total", profile="demo", outcome="failure") >= 1
    proxy.heal()
    await b.wait_for(lambda: b.generation() >= 2, timeout=5, what="the retried rotation")
    await _assert_recovers(b, within=5)


# --- found by the reliability review ---------------------------------------------------------

CREATE = "/v1/auth/token/create"


async def test_a_slow_mint_never_makes_a_token_look_longer_lived_than_vault_holds_it(
        brokers: BrokerFactory, private_openbao: OpenBaoDevServer, proxy: TcpProxy) -> None:
    """Vault's TTL runs from when it minted; counted from the (late) answer, the broker served
    tokens as valid for as long as the answer took after Vault had expired them."""
    b = await brokers.start({"demo": {"ttl": "60s", "grace": "3s", "rotate_after": "40s"}},
                            vault=private_openbao, vault_address=proxy.address, vault_timeout="15s")
    proxy.delay = 1.0  # every chunk, both ways: the create answer comes ≥ 1 s after it was minted
    status, body, _ = await b.request("POST", "/v1/tokens/demo/rotate", cert="ops")
    proxy.delay = 0.0
    assert status == 200, body
    token = b.broker.cache.get("demo").current
    info = root_client(b.vault).auth.token.lookup(token.value)["data"]
    at_vault = datetime.fromisoformat(info["expire_time"].replace("Z", "+00:00")).timestamp()
    assert token.expires_at <= at_vault + 0.5, (token.expires_at, at_vault)


async def test_a_min_ttl_fetch_does_not_call_vault_during_an_outage_the_checks_found(
        brokers: BrokerFactory, private_openbao: OpenBaoDevServer, proxy: TcpProxy) -> None:
    b = await brokers.start({"demo": {"ttl": "30s", "grace": "3s", "rotate_after": "20s", "check_interval": "1s"}},
                            vault=private_openbao, vault_address=proxy.address, vault_timeout="3s")
    proxy.cut()
    await b.wait_for(lambda: _state(b).consecutive_failures >= 1, timeout=10, what="a failed check")
    minted = proxy.request_seen(CREATE)
    started = time.monotonic()
    status, body, headers = await b.request("GET", "/v1/tokens/demo?min_ttl=29")
    assert status == 503 and "Retry-After" in headers, body
    assert time.monotonic() - started < 1.0, "answered at once, not after a Vault timeout"
    assert not minted.is_set(), "no mint was tried"
    proxy.heal()
    assert (await b.get_token())["profile"] == "demo", "the current token is still served"


async def test_a_token_role_that_is_not_orphan_is_refused_with_the_fix(
        brokers: BrokerFactory, openbao: OpenBaoDevServer) -> None:
    """Its tokens would be children of the broker's login, revoked under the jobs at every
    re-login and clean stop: never served, revoked at once, and the reason says what to set."""
    role = f"not-orphan-{time.time_ns() % 10**9}"
    openbao.bao("policy", "write", f"{role}-policy", "-", stdin='path "secret/data/x/*" { capabilities = ["read"] }\n')
    openbao.bao("write", f"auth/token/roles/{role}", f"allowed_policies={role}-policy", "orphan=false",
                "renewable=false", "token_explicit_max_ttl=1h")
    b = await brokers.start({"demo": {}, "jobs": {"mode": "per-job", "ttl": "30s", "grace": "3s",
                                                  "allow": ["cn:job"]}},
                            roles={"demo": role, "jobs": role}, wait_ready=False)
    await b.wait_for(lambda: any(e["event"] == "rotation_rolled_back" for e in b.audit_events()),
                     what="the first mint rolled back")
    fix = f"set orphan=true on it (bao write auth/token/roles/{role} orphan=true)"
    rolled_back = [e for e in b.audit_events() if e["event"] == "rotation_rolled_back"]
    assert fix in rolled_back[0]["reason"] and rolled_back[0]["reason"].startswith("verify: ")
    status, body, _ = await b.request("GET", "/v1/tokens/demo")
    assert status == 503 and fix in body["message"], body
    status, body, _ = await b.request("POST", "/v1/tokens/jobs")
    assert status == 503 and fix in body["message"], body
    await b.wait_for(lambda: len([e for e in b.audit_events() if e["event"] == "token_revoked"
                                  and e["reason"] == "rolled_back" and e["outcome"] == "ok"]) >= 2,
                     what="both minted tokens revoked")
    await b.wait_for(lambda: _state(b).unhealthy, what="the profile reported unhealthy")
    status, ready = await b.ops("/readyz")
    assert status == 503 and any(fix in reason for reason in ready["profiles"]["demo"]["reasons"]), ready
