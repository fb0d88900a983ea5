"""The rotator and the revocation queue when things go wrong: Vault refusing or unreachable
during an admin revoke, a state dir that cannot be written, min_ttl beyond what Vault grants,
a check racing an admin action, a bug in a background loop, corrupt state files.

Vault is a real OpenBao (through a proxy we can cut), the API is real mTLS; time is a
FakeClock wherever backoff or grace windows are involved, so nothing sleeps on a schedule.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from broker.devserver import OpenBaoDevServer, broker_policy, setup_approle, setup_token_role
from broker.ops.health import readiness
from broker.tokens import policy
from broker.tokens.model import ProfileState, fingerprint
from broker.tokens.store import StateStore
from tests.conftest import BrokerFactory, LogLines, Pki, RunningBroker, root_client, token_is_valid
from tests.fakes import FakeClock
from tests.faults import TcpProxy
from tests.processes import run_process, serve_config

PROFILE = {"demo": {"ttl": "1h", "grace": "10m", "rotate_after": "40m", "check_interval": "10m",
                    "alert_threshold": 3}}


async def drive(clock: FakeClock, done: Callable[[], bool], what: str, step: float = 1.0, steps: int = 400) -> None:
    """Move fake time on ``step`` at a time until ``done``; between steps, give Vault calls
    (on threads, in real time) a moment to land. Backoff is driven, never slept through."""
    for _ in range(steps):
        for _ in range(20):
            if done():
                return
            await asyncio.sleep(0.01)
        await clock.advance(step)
    raise AssertionError(f"{what} did not happen within {steps * step}s of fake time")


def break_file(path: Path) -> None:
    """A real OSError on the next write of ``path``: it becomes a non-empty directory, which
    the atomic rename cannot replace (chmod would not stop root, which runs these tests)."""
    path.unlink(missing_ok=True)
    path.mkdir()
    (path / "in-the-way").write_text("")


def pending_fps(b: RunningBroker) -> set[str]:
    return {e.token_fp for e in b.broker.revocations.pending}


async def still_serving(b: RunningBroker, token: str | None = None) -> None:
    body = await b.get_token()
    assert token is None or body["token"] == token
    assert not b.task.done(), "the broker stopped"


# --- 1. admin revoke while Vault cannot confirm --------------------------------------------

async def test_admin_revoke_during_an_outage_keeps_every_token_queued_and_says_so(brokers: BrokerFactory,
                                                                                    proxy: TcpProxy) -> None:
    clock = FakeClock()
    b = await brokers.start(PROFILE, clock=clock, vault_address=proxy.address)
    first = (await b.get_token())["token"]
    status, _, _ = await b.request("POST", "/v1/tokens/demo/rotate", cert="ops")
    assert status == 200
    second = (await b.get_token())["token"]
    leaked = {fingerprint(first), fingerprint(second)}

    proxy.cut()
    status, body, headers = await b.request("POST", "/v1/tokens/demo/revoke", cert="ops")
    assert status == 502 and body["error"] == "revocation_pending", body
    assert "queued but not confirmed" in body["message"] and "2 of 2" in body["message"]
    assert "Retry-After" not in headers
    assert token_is_valid(b.vault, first) and token_is_valid(b.vault, second)
    # Both are queued, due now, and on disk: a crash from here on still revokes them.
    on_disk = b.broker.store.load_revocations()
    assert {e.token_fp for e in on_disk} == leaked and all(e.revoke_at <= clock.now() for e in on_disk)
    assert {e.reason for e in on_disk} == {"admin_revoke"}
    # What a retrying client does: still not a success while Vault has not confirmed.
    status, body, _ = await b.request("POST", "/v1/tokens/demo/revoke", cert="ops")
    assert status == 502 and body["error"] == "revocation_pending"
    # Nothing is served meanwhile (both slots were emptied), and the broker is still up.
    status, body, _ = await b.request("GET", "/v1/tokens/demo")
    assert status == 503 and body["error"] == "unavailable"

    proxy.heal()
    await drive(clock, lambda: not pending_fps(b) & leaked, "the queued revocations")
    assert not token_is_valid(b.vault, first) and not token_is_valid(b.vault, second)
    assert not {e.token_fp for e in b.broker.store.load_revocations()} & leaked, "done, on disk too"
    # The queue's own retry is audited as what it is, not as the end of a grace window.
    done = {e["token_fp"]: e["reason"] for e in b.audit_events() if e["event"] == "token_revoked"}
    assert {done[fp] for fp in leaked} == {"admin_revoke"}, done
    await drive(clock, lambda: b.generation() >= 3, "a replacement token")
    third = await b.get_token()
    assert third["generation"] >= 3 and token_is_valid(b.vault, third["token"])


async def test_revoke_on_shutdown_while_vault_is_down_leaves_the_tokens_queued_for_the_next_start(
        brokers: BrokerFactory, proxy: TcpProxy, log_lines: list[str]) -> None:
    # A grace of 10 minutes: the restart retires the token it last served after a grace, and
    # that must not put off the revocation promised "now" at shutdown.
    long_grace = {"demo": {"ttl": "1h", "grace": "10m", "rotate_after": "40m"}}
    b = await brokers.start(long_grace, server_extra="revoke_on_shutdown = true", vault_address=proxy.address)
    token = (await b.get_token())["token"]
    proxy.cut()
    await b.shutdown()
    assert token_is_valid(b.vault, token)
    assert fingerprint(token) in {e.token_fp for e in b.broker.store.load_revocations()}
    failed = [line for line in log_lines if "shutdown_revoke_failed error=" in line]
    assert failed and failed[0].endswith("action=left queued in the state directory; the next start of the broker "
                                         "carries them out"), failed

    again = await brokers.start(long_grace, directory=b.dir, roles=b.roles, auth=b.auth_entries())  # Vault is back
    again.seen_secrets |= b.seen_secrets
    await again.wait_for(lambda: not token_is_valid(b.vault, token), what="the revocation left over at shutdown")
    revoked = [e for e in again.audit_events() if e["event"] == "token_revoked" and e["token_fp"] == fingerprint(token)]
    assert [e["reason"] for e in revoked] == ["shutdown"]
    await still_serving(again)


async def test_revoke_on_shutdown_with_vault_stalled_queues_everything_and_stops_at_its_deadline(
        brokers: BrokerFactory, proxy: TcpProxy, log_lines: list[str]) -> None:
    shared = {"ttl": "1h", "grace": "10m", "rotate_after": "40m"}
    per_job = {"ttl": "1h", "grace": "10m", "mode": "per-job", "allow": ["cn:job"]}
    b = await brokers.start({"demo": shared, "other": shared, "jobs": per_job},
                            server_extra="revoke_on_shutdown = true", vault_address=proxy.address)
    served = [(await b.get_token(name))["token"] for name in ("demo", "other")]
    status, first, _ = await b.request("POST", "/v1/tokens/jobs")
    assert status == 200, first
    b.seen_secrets.add(first["refresh_token"])
    status, second, _ = await b.request("POST", "/v1/refresh", json={"refresh_token": first["refresh_token"]})
    assert status == 200, second
    b.seen_secrets.add(second["refresh_token"])
    handed_out = {fingerprint(t) for t in (*served, first["token"], second["token"])}
    b.broker.shutdown_revoke_timeout = 0.5
    proxy.hold()  # Vault answers nothing: each revocation would wait out the 2 s Vault timeout
    started = time.monotonic()
    await b.shutdown()
    # Four sequential 2 s Vault timeouts, then the logout's, would take 10 s.
    assert time.monotonic() - started < 8
    assert all(token_is_valid(b.vault, t) for t in (*served, second["token"]))
    now = time.time()
    store = b.broker.store
    queued = {e.token_fp: e.revoke_at for e in store.load_revocations()}
    assert handed_out <= set(queued) and all(queued[fp] <= now for fp in handed_out), "all of it, due now"
    assert store.load_families(lambda data, where: data) == []
    ended = [e for e in b.audit_events() if e["event"] == "family_revoked"]
    # Audited once Vault had its chance: not "ok" while both of the family's tokens still live.
    assert [(e["family"], e["reason"], e["outcome"], e["pending_revocations"]) for e in ended] == [
        (first["family"], "shutdown", "failure", 2)]
    failed = [line for line in log_lines if "not confirmed revoked by Vault within 0.5s" in line]
    assert len(failed) == 1 and "shutdown_revoke_failed error=4 of 4 token(s)" in failed[0], failed


async def test_revoke_on_shutdown_waits_for_stalled_rotations_at_once_not_one_after_another(
        brokers: BrokerFactory, proxy: TcpProxy, log_lines: LogLines) -> None:
    """Each profile whose rotation is stuck on Vault may hold the shutdown for 1 s; six of them
    in turn took 6 s before any revocation was tried."""
    shared = {"ttl": "1h", "grace": "10m", "rotate_after": "40m"}
    names = [f"p{i}" for i in range(6)]
    b = await brokers.start({name: shared for name in names}, server_extra="revoke_on_shutdown = true",
                            vault_address=proxy.address, vault_timeout="30s")
    b.broker.shutdown_revoke_timeout = 0.5
    proxy.hold()  # every rotation below waits on Vault
    # Started as an admin rotation would, without an HTTP request the stop would drain first.
    rotations = [asyncio.create_task(rotator.rotate("admin")) for rotator in b.broker.rotators.values()]
    await b.wait_for(lambda: all(r._inflight is not None and not r._inflight.done()
                                 for r in b.broker.rotators.values()), what="six rotations waiting on Vault")
    started = time.monotonic()
    shutdown = asyncio.create_task(b.shutdown())
    await b.wait_for(lambda: any("shutdown_revoke_failed" in line for line in log_lines), timeout=20,
                     what="the revocations given up on")
    took = time.monotonic() - started
    assert took < 3.5, f"{took:.1f}s: the six 1 s waits ran one after another"
    proxy.cut()
    proxy.release()
    await asyncio.wait_for(shutdown, 30)
    for rotation in rotations:
        with contextlib.suppress(Exception):
            await rotation


async def test_a_min_ttl_fetch_during_the_swap_gets_the_new_token_not_an_unkept_promise(
        brokers: BrokerFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """While a rotation records its new token, the old one's revocation time (rotation + grace)
    is fixed already: promising the old token min_ttl seconds then would not be kept (it was
    revoked at Vault minutes before the promise). Such a fetch waits for the swap instead."""
    clock = FakeClock()
    b = await brokers.start({"demo": {**PROFILE["demo"], "grace": "5m"}}, clock=clock)
    old = b.broker.cache.get("demo").current
    store = b.broker.store
    set_issued = store.set_issued
    recording, go_on = asyncio.Event(), asyncio.Event()

    async def held(profile: str, record: Any) -> None:
        recording.set()
        await go_on.wait()
        await set_issued(profile, record)

    monkeypatch.setattr(store, "set_issued", held)
    await clock.advance(old.rotate_at - clock.now())  # the scheduled rotation starts
    await asyncio.wait_for(recording.wait(), 10)  # minted, verified, now recording
    min_ttl = int(old.expires_at - clock.now()) - 60  # far more than the 5 min grace
    fetch = asyncio.create_task(b.get_token(params={"min_ttl": str(min_ttl)}))
    await asyncio.sleep(0.2)
    assert not fetch.done(), "the fetch waits for the swap"
    go_on.set()
    body = await asyncio.wait_for(fetch, 10)
    assert body["generation"] == 2 and body["ttl"] >= min_ttl
    retiring = next(e for e in b.broker.revocations.pending if e.generation == 1)
    assert retiring.revoke_at <= clock.now() + 300 + 1, "no promise on the old token to keep"


async def test_revoke_on_shutdown_also_revokes_what_was_pending_from_before(brokers: BrokerFactory,
                                                                           proxy: TcpProxy) -> None:
    """A family released while Vault was unreachable left its token queued (the loop retries it
    with backoff). A shutdown that promises to revoke every pending token includes it."""
    clock = FakeClock()  # the queue's own retry never comes: only the shutdown can revoke it
    per_job = {"mode": "per-job", "ttl": "1h", "grace": "10m", "allow": ["cn:job"]}
    b = await brokers.start({"demo": PROFILE["demo"], "jobs": per_job}, clock=clock,
                            server_extra="revoke_on_shutdown = true", vault_address=proxy.address)
    status, family, _ = await b.request("POST", "/v1/tokens/jobs")
    assert status == 200, family
    b.seen_secrets.add(family["refresh_token"])
    proxy.cut()
    status, body, _ = await b.request("DELETE", f"/v1/families/{family['family']}")
    assert status == 200 and body["pending_revocations"] == 1, body
    proxy.heal()
    await b.shutdown()
    assert not token_is_valid(b.vault, family["token"])
    assert b.broker.store.load_revocations() == []


async def test_revoke_on_shutdown_does_not_wait_out_a_rotation_stalled_on_vault(
        brokers: BrokerFactory, proxy: TcpProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    """Queueing the served tokens is a local write, but a rotation in flight holds the profile's
    lock while its call waits on a stalled Vault (its whole timeout); the shutdown queues them
    after at most a second without the lock, so the stop fits its deadline."""
    clock = FakeClock()
    b = await brokers.start(PROFILE, clock=clock, vault_address=proxy.address, vault_timeout="6s",
                            server_extra="revoke_on_shutdown = true")
    served = (await b.get_token())["token"]
    loop = asyncio.get_running_loop()
    queued_at: list[float] = []
    queue_now = b.broker.revocations.queue_now

    async def timed_queue_now(*args: Any, **kwargs: Any) -> Any:
        queued_at.append(loop.time())
        return await queue_now(*args, **kwargs)

    monkeypatch.setattr(b.broker.revocations, "queue_now", timed_queue_now)
    proxy.hold()
    on_the_wire = proxy.request_seen("/v1/auth/token/create")
    await clock.advance(b.broker.cache.get("demo").current.rotate_at - clock.now())  # a rotation mints
    await asyncio.wait_for(on_the_wire.wait(), 10)
    stopped_at = loop.time()
    b.stop.set()  # SIGTERM
    await b.wait_for(lambda: bool(queued_at), timeout=30, what="the shutdown's queueing")
    assert queued_at[0] - stopped_at < 3, "not the 6 s Vault timeout of the stalled mint"
    proxy.release()
    await asyncio.wait_for(b.task, 30)
    assert fingerprint(served) in {e.token_fp for e in b.broker.store.load_revocations()} or not token_is_valid(
        b.vault, served)


# --- 2. changes made outside the loop wake it -----------------------------------------------

async def test_a_failed_admin_rotation_is_retried_at_its_retry_time(brokers: BrokerFactory, proxy: TcpProxy) -> None:
    clock = FakeClock()
    b = await brokers.start(PROFILE, clock=clock, vault_address=proxy.address)
    rotator = b.broker.rotators["demo"]
    first = (await b.get_token())["token"]
    proxy.cut()
    status, body, _ = await b.request("POST", "/v1/tokens/demo/rotate", cert="ops")
    assert status == 503 and body["error"] == "unavailable"
    assert rotator.retry_at is not None and rotator.retry_at - clock.now() <= 1.0 + 1e-6
    await still_serving(b, first)
    proxy.heal()
    # The loop was asleep until the next check (10 min away); the failure must wake it.
    await clock.advance(rotator.retry_at - clock.now())
    await b.wait_for(lambda: b.generation() == 2, timeout=5, what="the retry at retry_at")


# --- 3. a state write failing in the revocation loop ------------------------------------------

async def test_a_failing_state_write_in_the_revocation_loop_does_not_stop_the_broker(
        brokers: BrokerFactory, log_lines: list[str]) -> None:
    clock = FakeClock()
    b = await brokers.start(PROFILE, clock=clock)
    first = (await b.get_token())["token"]
    status, _, _ = await b.request("POST", "/v1/tokens/demo/rotate", cert="ops")
    assert status == 200
    second = (await b.get_token())["token"]
    revocations = b.broker.config.state.dir / "revocations.json"
    break_file(revocations)

    await clock.advance(601)  # grace over: the loop revokes gen 1, then cannot write the queue
    await b.wait_for(lambda: not token_is_valid(b.vault, first), what="the revocation at the end of grace")
    await b.wait_for(lambda: b.broker.revocations.state_error is not None, what="the write failure")
    assert "cannot write revocations.json" in b.broker.revocations.state_error
    assert any("state_write_failed file=revocations.json" in line for line in log_lines)
    await still_serving(b, second)
    status, ready = await b.ops("/readyz")
    assert status == 200 and ready["ready"] is True, "serving valid tokens: still ready"

    shutil.rmtree(revocations)  # the disk recovers: the loop writes the queue again, with backoff
    await drive(clock, lambda: b.broker.revocations.state_error is None, "the queue to be written again")
    assert b.broker.store.load_revocations() == []
    await still_serving(b, second)


def test_readiness_reports_a_state_write_failure_without_turning_unready() -> None:
    state = ProfileState("demo")
    result = readiness(0.0, [state], True, True, None, state_error="cannot write revocations.json: No space left")
    assert result.details["state"] == {"ok": False, "last_error": "cannot write revocations.json: No space left"}
    assert "cannot write" not in " ".join(result.details["problems"])  # type: ignore[arg-type]
    assert readiness(0.0, [], True, True, None).details["state"] == {"ok": True, "last_error": None}


# --- 4. a rotation whose state write fails -----------------------------------------------------

async def test_a_failed_queue_write_during_a_rotation_never_schedules_the_token_still_served(
        brokers: BrokerFactory) -> None:
    clock = FakeClock()
    b = await brokers.start(PROFILE, clock=clock)
    first = (await b.get_token())["token"]
    state_dir = b.broker.config.state.dir
    break_file(state_dir / "revocations.json")

    status, body, _ = await b.request("POST", "/v1/tokens/demo/rotate", cert="ops")
    assert status == 503 and body["error"] == "unavailable"
    assert "the state directory cannot be written (Is a directory)" in body["message"]
    assert str(state_dir) not in body["message"], "a job or admin is told what, not the broker's file layout"
    last_error = b.broker.cache.get("demo").last_error or ""
    assert last_error.startswith("record: the state directory cannot be written"), "not blamed on Vault's verify"
    assert b.generation() == 1
    assert fingerprint(first) not in pending_fps(b), "the current token must not be queued for revocation"
    issued = json.loads((state_dir / "profiles.json").read_text())
    assert issued["demo"]["token_fp"] == fingerprint(first), "profiles.json names the token still served"
    assert any(e["event"] == "rotation_rolled_back" for e in b.audit_events())
    await clock.advance(601)  # past where its grace would have ended
    assert token_is_valid(b.vault, first)
    await still_serving(b, first)

    shutil.rmtree(state_dir / "revocations.json")
    await drive(clock, lambda: b.generation() == 2, "the rotation once the disk is back")
    assert fingerprint(first) in pending_fps(b)


async def test_a_failed_profiles_write_during_a_rotation_takes_back_the_scheduled_revocation(
        brokers: BrokerFactory) -> None:
    clock = FakeClock()
    b = await brokers.start(PROFILE, clock=clock)
    first = (await b.get_token())["token"]
    state_dir = b.broker.config.state.dir
    break_file(state_dir / "profiles.json")

    status, body, _ = await b.request("POST", "/v1/tokens/demo/rotate", cert="ops")
    assert status == 503 and "the state directory cannot be written" in body["message"]
    assert body["message"].startswith("rotating profile demo failed (") and "(generation 1, " in body["message"]
    assert "s left) is still served; retry later" in body["message"], "not 'no valid token': jobs are served"
    assert b.metric("broker_token_requests_total", profile="demo", outcome="unavailable") in (None, 0.0)
    assert b.generation() == 1
    assert fingerprint(first) not in pending_fps(b)
    assert fingerprint(first) not in {e.token_fp for e in b.broker.store.load_revocations()}
    assert b.broker.store.load_issued()["demo"].token_fp == fingerprint(first), "the rolled-back token is not recorded"
    await still_serving(b, first)

    shutil.rmtree(state_dir / "profiles.json")
    await drive(clock, lambda: b.generation() == 2, "the rotation once the disk is back")
    assert b.broker.store.load_issued()["demo"].generation == 2


# --- 5. min_ttl -----------------------------------------------------------------------------------

async def test_min_ttl_beyond_what_vault_grants_is_refused_without_minting(brokers: BrokerFactory,
                                                                        openbao: OpenBaoDevServer,
                                                                        log_lines: list[str]) -> None:
    role = f"short-{os.urandom(4).hex()}"
    setup_token_role(openbao, role, [f"{role}-policy"], max_ttl="30m")  # the profile asks for 1h
    b = await brokers.start(PROFILE, clock=FakeClock(), roles={"demo": role})
    first = await b.get_token()
    assert first["ttl"] <= 1800
    capped = [line for line in log_lines if "ttl_capped profile=demo" in line]
    assert capped and capped[0].startswith("WARNING") and "asked=3600s granted=1800s" in capped[0], capped
    mints = lambda: b.metric("broker_vault_requests_total", operation="create_token", outcome="success")  # noqa: E731
    before = mints()

    for value in (2000, 3599):
        status, body, _ = await b.request("GET", f"/v1/tokens/demo?min_ttl={value}")
        assert status == 400 and body["error"] == "bad_request", body
        assert f"min_ttl {value}s is more than profile demo can give" in body["message"]
        assert "Vault grants its tokens 1800s" in body["message"] and "at most 1799s" in body["message"]
    assert mints() == before and b.generation() == 1, "no mint for a request no fresh token could satisfy"
    status, body, _ = await b.request("GET", "/v1/tokens/demo?min_ttl=1700")
    assert status == 200 and body["token"] == first["token"]
    await still_serving(b, first["token"])


async def test_a_min_ttl_promise_outlives_a_shorter_grace(brokers: BrokerFactory) -> None:
    clock = FakeClock()
    b = await brokers.start(PROFILE, clock=clock)
    first = b.broker.cache.get("demo").current
    await clock.advance(35 * 60)  # rotation is due at 36..44 min
    status, body, _ = await b.request("GET", "/v1/tokens/demo?min_ttl=1200")
    assert status == 200 and body["generation"] == 1
    promised = clock.now() + 1200  # 55 min: later than any rotation (<= 44 min) + grace (10 min)

    await clock.advance(first.rotate_at - clock.now())
    await drive(clock, lambda: b.generation() == 2, "the scheduled rotation")
    entry = next(e for e in b.broker.revocations.pending if e.token_fp == first.fp)
    assert entry.revoke_at >= promised - 1e-6
    assert entry.revoke_at <= first.expires_at
    assert b.broker.cache.get("demo").grace_until == pytest.approx(entry.revoke_at)
    await drive(clock, lambda: clock.now() >= promised + 1, "time to pass the promise", step=30.0)
    await b.wait_for(lambda: not token_is_valid(b.vault, body["token"]), what="the revocation after the promise")


# --- 6. races, late revocations, bugs in the loops ------------------------------------------

async def test_a_check_racing_an_admin_revoke_is_not_a_token_invalidated(brokers: BrokerFactory,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    b = await brokers.start(PROFILE, clock=clock)
    vault = b.broker.vault
    real_lookup = vault.lookup_accessor
    on_the_way, release = asyncio.Event(), asyncio.Event()

    async def held_lookup(accessor: str) -> Any:
        # The real lookup, against the real OpenBao, held back until the admin revoke is done.
        on_the_way.set()
        await release.wait()
        return await real_lookup(accessor)

    monkeypatch.setattr(vault, "lookup_accessor", held_lookup)
    await clock.advance(600)  # the check is due
    await asyncio.wait_for(on_the_way.wait(), 10)
    status, body, _ = await b.request("POST", "/v1/tokens/demo/revoke", cert="ops")
    assert status == 200 and body["generation"] == 2
    release.set()
    invalid = lambda: b.metric("broker_vault_requests_total", operation="lookup_accessor",  # noqa: E731
                               outcome="TokenInvalid") or 0
    await b.wait_for(lambda: invalid() >= 1, what="the late lookup of the revoked token")
    await asyncio.sleep(0)
    assert not [e for e in b.audit_events() if e["event"] == "token_invalidated"]
    assert b.generation() == 2, "no second rotation"
    await still_serving(b)


def test_the_revocation_queue_sleeps_until_the_next_due_entry_whatever_failed_before() -> None:
    now = 1_800_000_000.0
    # Nine failures before, but nothing due now: wake when the next entry is due, not after backoff.
    assert policy.revocation_delay(now, [now + 10.0], failures=9, jitter=0.99) == pytest.approx(10.0)
    # Something due keeps failing: backoff.
    assert policy.revocation_delay(now, [now - 1.0, now + 10.0], failures=9, jitter=0.5) == pytest.approx(
        policy.backoff_delay(9, 0.5, now, None))
    assert policy.revocation_delay(now, [now + 10.0, now + 5.0], failures=0, jitter=0.5) == pytest.approx(5.0)
    assert policy.revocation_delay(now, [], failures=3, jitter=0.5) == 3600.0


async def test_an_unexpected_error_in_the_rotator_loop_is_logged_counted_and_retried(
        brokers: BrokerFactory, monkeypatch: pytest.MonkeyPatch, log_lines: list[str]) -> None:
    clock = FakeClock()
    b = await brokers.start(PROFILE, clock=clock)
    first = (await b.get_token())["token"]
    vault = b.broker.vault
    real_lookup = vault.lookup_accessor
    calls: list[str] = []

    async def buggy_once(accessor: str) -> Any:
        calls.append(accessor)
        if len(calls) == 1:
            raise RuntimeError("a bug, not a Vault error")
        return await real_lookup(accessor)

    monkeypatch.setattr(vault, "lookup_accessor", buggy_once)
    state = lambda: b.broker.cache.get("demo")  # noqa: E731
    await clock.advance(600)  # the check is due
    await b.wait_for(lambda: state().consecutive_failures == 1, what="the bug counted as a failure")
    assert "internal error (RuntimeError)" in (state().last_error or "")
    logged = [line for line in log_lines if "rotator_internal_error profile=demo" in line]
    assert logged and "RuntimeError at test_rotator_faults.py:" in logged[0] and "a bug, not" not in logged[0]
    await still_serving(b, first)
    await drive(clock, lambda: len(calls) >= 2 and state().consecutive_failures == 0, "the retried check")
    await still_serving(b, first)


# --- 7. state files nobody should have to debug with a traceback --------------------------------

FAMILY: dict[str, Any] = {  # one valid families.json entry, as the broker writes it
    "id": "fam_AAAAAAAAAAAAAAAA", "profile": "demo", "owner_fp": "ab" * 32, "owner_identity": "cn:job",
    "created_at": 1.0, "expires_at": 2e9, "generation": 1,
    "current": {"accessor": "acc", "generation": 1, "token_fp": "0123456789abcdef", "expires_at": 2e9},
    "current_hash": "cd" * 32, "previous_hash": None, "previous_spent_at": None, "spent_hashes": [],
}


def test_the_families_entry_the_corrupt_cases_start_from_is_valid() -> None:
    from broker.tokens.families import Family

    family = Family.from_json(FAMILY, "entry 1")
    assert family.to_json() == FAMILY | {"spent_hashes": ()}


@pytest.mark.parametrize(("name", "content", "problem"), [
    ("revocations.json", "[{not json", "it is not valid JSON"),
    ("revocations.json", '[{"accessor": "a", "profile": "demo", "generation": "1", "token_fp": "f", "revoke_at": 1}]',
     "entry 1 has a str for generation"),
    ("profiles.json", '{"demo": {"accessor": "a", "generation": 1, "token_fp": "f"}}', "profile 'demo' lacks expires_at"),
    ("families.json", '{"fam": 1}', "it is not a JSON list"),
    ("families.json", json.dumps([{**FAMILY, "bogus": 1}]), "entry 1 has unknown keys bogus"),
    ("families.json", json.dumps([{k: v for k, v in FAMILY.items() if k != "current"}]), "entry 1 lacks current"),
    ("families.json", json.dumps([{**FAMILY, "expires_at": "never"}]), "entry 1 has a str for expires_at"),
    ("families.json", json.dumps([{**FAMILY, "current": {**FAMILY["current"], "generation": True}}]),
     "entry 1's current token has a bool for generation"),
    ("families.json", json.dumps([{**FAMILY, "spent_hashes": [1]}]), "entry 1's spent_hashes are not all strings"),
])
async def test_a_corrupt_state_file_stops_the_start_with_one_clear_line(tmp_path: Path, pki: Pki,
                                                                        openbao: OpenBaoDevServer, name: str,
                                                                        content: str, problem: str) -> None:
    mode = "per-job" if name == "families.json" else "shared"  # families.json is read only with a per-job profile
    serve = serve_config(tmp_path, pki, openbao, f"corrupt-{os.urandom(3).hex()}",
                         {"ttl": "30s", "grace": "5s", "mode": mode, **({"rotate_after": "20s"} if mode == "shared" else {})})
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / name).write_text(content)
    ran = await run_process([sys.executable, "-m", "broker", "serve", "--config", str(serve.config)],
                            env={**os.environ, "BROKER_LOG_LEVEL": "ERROR"})
    assert ran.code == 1, ran.both
    assert "Traceback" not in ran.both
    last = ran.err.strip().splitlines()[-1]
    assert last.startswith(f"broker serve: state file {state / name} is unusable: {problem}"), last
    assert "move it aside" in last


async def test_an_entry_vault_always_rejects_is_dropped_and_does_not_block_the_rest(
        brokers: BrokerFactory, openbao: OpenBaoDevServer, tmp_path: Path) -> None:
    created = root_client(openbao).auth.token.create(policies=["default"], ttl="1h")["auth"]
    token, accessor = created["client_token"], created["accessor"]
    directory = tmp_path / "broker-dropping"
    (directory / "state").mkdir(parents=True, mode=0o700)
    overdue = time.time() - 60
    (directory / "state" / "revocations.json").write_text(json.dumps([
        # Vault answers 400 "missing accessor" to this one, every time.
        {"accessor": "", "profile": "demo", "generation": 1, "token_fp": "0" * 16, "revoke_at": overdue},
        {"accessor": accessor, "profile": "demo", "generation": 2, "token_fp": fingerprint(token), "revoke_at": overdue},
    ]))
    b = await brokers.start(directory=directory)
    b.seen_secrets.add(token)
    await b.wait_for(lambda: not token_is_valid(openbao, token), what="the entry behind the rejected one")
    await b.wait_for(lambda: b.broker.store.load_revocations() == [], what="the queue to empty")
    dropped = [e for e in b.audit_events() if e["event"] == "token_revoked" and e.get("outcome") == "failure"]
    assert len(dropped) == 1 and dropped[0]["token_fp"] == "0" * 16
    assert "dropped from the queue: Vault rejected the revocation" in dropped[0]["reason"]
    revoked = [e for e in b.audit_events() if e["event"] == "token_revoked" and e["token_fp"] == fingerprint(token)]
    assert revoked and revoked[0].get("outcome") != "failure"
    await still_serving(b)


# --- DESIGN §6.2: a new token that fails verification, while a current one is served --------

async def test_a_rotation_that_fails_verification_keeps_serving_the_current_token(brokers: BrokerFactory) -> None:
    """The new token is revoked and never served; `current` stays, same generation; once the
    broker may look tokens up again, the next rotation goes through."""
    suffix = os.urandom(4).hex()
    role, approle = f"verify-{suffix}", f"broker-verify-{suffix}"
    setup_token_role(brokers.openbao, role, [f"{role}-policy"])
    b = await brokers.start({"demo": {"alert_threshold": 1}}, roles={"demo": role},
                            auth=_approle_auth(brokers, [role], approle))
    first = await b.get_token()
    no_lookup = broker_policy([role]).replace('path "auth/token/lookup" { capabilities = ["update"] }', "")
    assert no_lookup != broker_policy([role])
    brokers.openbao.bao("policy", "write", f"{approle}-policy", "-", stdin=no_lookup)

    status, body, _ = await b.request("POST", "/v1/tokens/demo/rotate", cert="ops")
    assert status == 503 and body["error"] == "unavailable", body
    rolled = [e for e in b.audit_events() if e["event"] == "rotation_rolled_back"]
    assert len(rolled) == 1 and rolled[0]["generation"] == 2 and rolled[0]["outcome"] == "failure"
    revoked = [e for e in b.audit_events() if e["event"] == "token_revoked" and e["reason"] == "rolled_back"]
    assert [e["token_fp"] for e in revoked] == [rolled[0]["token_fp"]], "the unverified token is revoked"
    assert b.generation() == 1
    await still_serving(b, first["token"])
    assert token_is_valid(b.vault, first["token"])

    brokers.openbao.bao("policy", "write", f"{approle}-policy", "-", stdin=broker_policy([role]))
    status, body, _ = await b.request("POST", "/v1/tokens/demo/rotate", cert="ops")
    assert status == 200 and body["generation"] == 2, body
    assert (await b.get_token())["token"] != first["token"]


async def test_a_family_token_that_fails_verification_is_revoked_and_the_family_unchanged(
        brokers: BrokerFactory) -> None:
    """The per-job path verifies what it mints as rotations do: a start or a refresh whose new
    token cannot be looked up answers 503, the token is revoked, and the family stays where it was."""
    suffix = os.urandom(4).hex()
    role, approle = f"verifyjob-{suffix}", f"broker-verifyjob-{suffix}"
    setup_token_role(brokers.openbao, role, [f"{role}-policy"])
    b = await brokers.start({"jobs": {"mode": "per-job", "ttl": "60s", "grace": "3s", "allow": ["cn:job"]}},
                            roles={"jobs": role}, auth=_approle_auth(brokers, [role], approle))
    status, first, _ = await b.request("POST", "/v1/tokens/jobs")
    assert status == 200, first
    no_lookup = broker_policy([role]).replace('path "auth/token/lookup" { capabilities = ["update"] }', "")
    brokers.openbao.bao("policy", "write", f"{approle}-policy", "-", stdin=no_lookup)

    status, body, _ = await b.request("POST", "/v1/tokens/jobs")
    assert status == 503 and body["error"] == "unavailable", body
    status, body, _ = await b.request("POST", "/v1/refresh", json={"refresh_token": first["refresh_token"]})
    assert status == 503 and body["error"] == "unavailable", body
    rolled_back = [e for e in b.audit_events() if e["event"] == "token_revoked" and e["reason"] == "rolled_back"]
    assert len(rolled_back) == 2 and all(e["outcome"] == "ok" for e in rolled_back), rolled_back
    assert [f.generation for f in b.broker.families.families] == [1], "nothing moved"

    brokers.openbao.bao("policy", "write", f"{approle}-policy", "-", stdin=broker_policy([role]))
    status, body, _ = await b.request("POST", "/v1/refresh", json={"refresh_token": first["refresh_token"]})
    assert status == 200 and body["generation"] == 2 and token_is_valid(b.vault, body["token"]), body
    await b.request("DELETE", f"/v1/families/{first['family']}")


async def test_a_revocation_due_while_the_broker_cannot_log_in_is_kept_not_dropped(brokers: BrokerFactory) -> None:
    """Its own login failing is not the entry's fault: the previous token is revoked once a
    login works again, instead of leaving the queue as 'Vault rejected it'."""
    suffix = os.urandom(4).hex()
    role, approle = f"keep-{suffix}", f"broker-keep-{suffix}"
    setup_token_role(brokers.openbao, role, [f"{role}-policy"])
    auth = _approle_auth(brokers, [role], approle)
    clock = FakeClock()
    b = await brokers.start({"demo": {"ttl": "1h", "grace": "10m", "rotate_after": "40m", "check_interval": "30m"}},
                            roles={"demo": role}, auth=auth, clock=clock)
    first = await b.get_token()
    status, _, _ = await b.request("POST", "/v1/tokens/demo/rotate", cert="ops")
    assert status == 200 and len(b.broker.revocations.pending) == 1
    root = root_client(b.vault)
    secret_id_file = Path(auth[0]["secret_id_file"])
    root.write(f"auth/approle/role/{approle}/secret-id/destroy", secret_id=secret_id_file.read_text().strip())
    root.auth.token.revoke(b.broker.auth._login.token)  # the next call needs a login, which now fails
    await clock.advance(601)  # the grace of generation 1 is over: its revocation is due
    await b.wait_for(lambda: any(e["event"] == "vault_login_failed" for e in b.audit_events()),
                     what="a failed login while the revocation was due")
    await clock.settle()
    assert len(b.broker.revocations.pending) == 1, "kept for a later try"
    assert not [e for e in b.audit_events() if e["event"] == "token_revoked"], "neither done nor dropped"
    assert token_is_valid(b.vault, first["token"])

    secret_id = root.write(f"auth/approle/role/{approle}/secret-id")["data"]["secret_id"]
    b.seen_secrets.add(secret_id)
    secret_id_file.write_text(secret_id + "\n")
    for _ in range(40):  # past the queue's backoff and the login's, a step at a time
        if not b.broker.revocations.pending:
            break
        await clock.advance(30)
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the kept revocation was not carried out once a login worked")
    assert not token_is_valid(b.vault, first["token"])
    revoked = [e for e in b.audit_events() if e["event"] == "token_revoked"]
    assert [(e["reason"], e["outcome"]) for e in revoked] == [("grace_ended", "ok")]


def _approle_auth(brokers: BrokerFactory, roles: list[str], approle: str) -> list[dict[str, str]]:
    directory = brokers.tmp_path / f"{approle}-secrets"
    files = setup_approle(brokers.openbao, roles, directory, role_name=approle)
    return [{"method": "approle", "role_id_file": str(files.role_id_file), "secret_id_file": str(files.secret_id_file)}]


def test_a_revocation_queue_written_before_reasons_were_kept_still_loads(tmp_path: Path) -> None:
    """revocations.json from an older broker has no "reason": its entries end a grace window."""
    entry = {"accessor": "acc", "profile": "demo", "generation": 3, "token_fp": "ab" * 8, "revoke_at": 1.5,
             "family": None}
    (tmp_path / "revocations.json").write_text(json.dumps([entry]))
    [loaded] = StateStore(tmp_path).load_revocations()
    assert loaded.reason == "grace_ended" and loaded.generation == 3
