"""The rotator on an injected clock: schedule and backoff without sleeping in real time.

Vault is real (through a proxy we can cut); only time is fake, so the test decides when the
rotator wakes and reads back every delay it asked for.
"""

from __future__ import annotations

import pytest

from tests.conftest import BrokerFactory, raw, root_client
from tests.fakes import FakeClock
from tests.faults import TcpProxy

PROFILE = {"demo": {"ttl": "1h", "grace": "10m", "rotate_after": "40m", "check_interval": "10m",
                    "alert_threshold": 3}}


async def test_rotation_is_scheduled_by_the_clock_with_jitter(brokers: BrokerFactory) -> None:
    clock = FakeClock()
    b = await brokers.start(PROFILE, clock=clock)
    current = b.broker.cache.get("demo").current
    assert 36 * 60 <= current.rotate_at - current.issued_at <= 44 * 60, "rotate_after 40m ±10 %"
    await clock.advance(current.rotate_at - clock.now() - 1)
    assert b.generation() == 1, "not a second early"
    await clock.advance(2)
    await b.wait_for(lambda: b.generation() == 2, what="the rotation at rotate_at")
    state = b.broker.cache.get("demo")
    assert state.previous.generation == 1
    assert state.grace_until == pytest.approx(state.current.issued_at + 600, abs=1)


async def test_backoff_grows_with_full_jitter_caps_and_marks_unhealthy(brokers: BrokerFactory,
                                                                       proxy: TcpProxy) -> None:
    clock = FakeClock()
    # check_interval above rotate_after: only rotations fail here, and the cap is the default 5 min.
    profile = {"demo": {**PROFILE["demo"], "check_interval": "1h"}}
    b = await brokers.start(profile, clock=clock, vault_address=proxy.address)
    rotator = b.broker.rotators["demo"]
    current = b.broker.cache.get("demo").current
    proxy.cut()
    await clock.advance(current.rotate_at - clock.now())
    delays = []
    attempts = 11
    for attempt in range(1, attempts + 1):
        await b.wait_for(lambda: b.broker.cache.get("demo").consecutive_failures == attempt,
                         what=f"failure {attempt}")
        delay = rotator.retry_at - clock.now()
        delays.append(delay)
        ceiling = min(300.0, 2.0 ** (attempt - 1))
        assert 0.05 - 1e-6 <= delay <= ceiling + 1e-6, (attempt, delay)  # epoch floats lose ~1e-7
        assert b.broker.cache.get("demo").unhealthy == (attempt >= 3)
        if attempt < attempts:
            await clock.advance(delay)
    assert max(delays) > 8, "the ceiling grew (full jitter can still draw small values)"
    assert b.generation() == 1 and b.broker.cache.get("demo").current is current, "still serving the old one"

    proxy.heal()
    await clock.advance(rotator.retry_at - clock.now())
    await b.wait_for(lambda: b.generation() == 2, what="recovery")
    assert not b.broker.cache.get("demo").unhealthy


async def test_backoff_never_sleeps_past_the_current_tokens_expiry(brokers: BrokerFactory,
                                                                   proxy: TcpProxy) -> None:
    clock = FakeClock()
    b = await brokers.start(PROFILE, clock=clock, vault_address=proxy.address)
    rotator = b.broker.rotators["demo"]
    current = b.broker.cache.get("demo").current
    proxy.cut()
    # Jump to 3 s before expiry: every retry from here must land at or before the expiry.
    await clock.advance(current.expires_at - 3 - clock.now())
    for attempt in range(4):
        await b.wait_for(lambda: rotator.retry_at is not None and rotator.retry_at > clock.now(),
                         what="a scheduled retry")
        if clock.now() < current.expires_at:
            assert rotator.retry_at <= current.expires_at + 1e-6
        await clock.advance(rotator.retry_at - clock.now())
    status, body, headers = await b.request("GET", "/v1/tokens/demo")
    assert status == 503 and "Retry-After" in headers
    proxy.heal()


QUIET = {"ttl": "1h", "grace": "10m", "rotate_after": "40m", "check_interval": "10m"}


async def test_min_ttl_fetches_during_an_outage_do_not_each_mint(brokers: BrokerFactory, proxy: TcpProxy) -> None:
    clock = FakeClock()
    b = await brokers.start(clock=clock, vault_address=proxy.address)  # ttl 30s
    await b.get_token()
    await clock.advance(5)
    proxy.cut()
    for _ in range(6):
        answer = await raw(b, "GET", "/v1/tokens/demo?min_ttl=29")
        assert answer.status == 503
    assert b.metric("broker_rotations_total", profile="demo", outcome="failure") == 1, "one attempt, then backoff"
    proxy.heal()


async def test_token_list_says_unhealthy_past_the_alert_threshold(brokers: BrokerFactory, proxy: TcpProxy) -> None:
    clock = FakeClock()
    b = await brokers.start({"demo": {**QUIET, "check_interval": "1h", "alert_threshold": 2}}, clock=clock,
                            vault_address=proxy.address)
    rotator = b.broker.rotators["demo"]
    proxy.cut()
    await clock.advance(b.broker.cache.get("demo").current.rotate_at - clock.now())
    await b.wait_for(lambda: b.broker.cache.get("demo").consecutive_failures == 1, what="failure 1")
    await clock.advance(rotator.retry_at - clock.now())
    await b.wait_for(lambda: b.broker.cache.get("demo").consecutive_failures == 2, what="failure 2")
    status, body, _ = await b.request("GET", "/v1/tokens")
    assert status == 200 and [p["healthy"] for p in body["profiles"]] == [False]
    proxy.heal()


async def test_an_invalidated_token_is_not_served_when_its_replacement_fails(brokers: BrokerFactory) -> None:
    clock = FakeClock()
    b = await brokers.start({"demo": QUIET}, clock=clock)
    served = await b.get_token()
    root = root_client(b.vault)
    root.auth.token.revoke(served["token"])
    root.delete(f"auth/token/roles/{b.roles['demo']}")  # the replacement mint fails
    await clock.advance(601)  # past check_interval: the check finds the token gone
    await b.wait_for(lambda: any(e["event"] == "token_invalidated" for e in b.audit_events()),
                     what="token_invalidated")
    answer = await raw(b, "GET", "/v1/tokens/demo")
    assert answer.status == 503, f"the revoked token must not be served (got {answer.status})"
