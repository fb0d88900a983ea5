"""Per-job token families against a real OpenBao over real mTLS: create, refresh, retry,
reuse detection (three ways), release, expiry, restart, and ending a family while Vault or the
state disk fails."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import stat
import time
from collections.abc import Callable
from typing import Any

import hvac
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from broker.tokens import families as families_module
from tests.conftest import BrokerFactory, RunningBroker, assert_error, assert_still_serving, raw, token_is_valid
from tests.fakes import FakeClock
from tests.faults import TcpProxy

PER_JOB = {"mode": "per-job", "ttl": "60s", "grace": "3s", "reuse_interval": "2s",
           "allow": ["cn:job", "cn:job-other"]}
# For a fake clock: nothing falls due unless the test moves time, and a grace long enough to
# tell "revoked now" from "revoked when the grace ends".
SLOW = {**PER_JOB, "ttl": "1h", "grace": "10m"}
FAMILY_KEYS = {"profile", "token", "expires_at", "refresh_token", "refresh_expires_at", "family", "generation"}
INVALID = "unknown refresh token, or its family has ended"
REUSED = "this refresh token was used before, or presented from another client certificate, so the whole token family has been revoked"


async def _create(b: RunningBroker, cert: str = "job", profile: str = "deploy") -> dict[str, Any]:
    status, body, headers = await b.request("POST", f"/v1/tokens/{profile}", cert=cert)
    assert status == 200, body
    b.seen_secrets.add(body["refresh_token"])
    assert headers.get("Cache-Control") == "no-store", "the answer carries a token and a refresh token"
    return body  # type: ignore[no-any-return]


async def _refresh(b: RunningBroker, refresh_token: str, cert: str = "job") -> tuple[int, dict[str, Any]]:
    status, body, headers = await b.request("POST", "/v1/refresh", cert=cert, json={"refresh_token": refresh_token})
    if status == 200:
        b.seen_secrets.add(body["refresh_token"])
        assert headers.get("Cache-Control") == "no-store", "the answer carries a token and a refresh token"
    return status, body


async def _refused(b: RunningBroker, refresh_token: str, code: str, needle: str, cert: str = "job") -> None:
    answer = await raw(b, "POST", "/v1/refresh", cert=cert, json={"refresh_token": refresh_token})
    assert_error(answer, 401, code, needle)


async def _assert_still_serving(b: RunningBroker) -> None:
    """A new family still starts, and its token works at Vault."""
    assert token_is_valid(b.vault, (await _create(b))["token"])


def _events(b: RunningBroker, name: str) -> list[dict[str, Any]]:
    return [e for e in b.audit_events() if e["event"] == name]


def _mode(path: Any) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_create_refresh_refresh(brokers: BrokerFactory) -> None:
    b = await brokers.start({"deploy": PER_JOB})
    first = await _create(b)
    assert set(first) == FAMILY_KEYS and first["generation"] == 1 and first["family"].startswith("fam_")
    assert token_is_valid(b.vault, first["token"])
    status, second = await _refresh(b, first["refresh_token"])
    assert status == 200 and second["generation"] == 2 and second["family"] == first["family"]
    assert second["token"] != first["token"] and second["refresh_token"] != first["refresh_token"]
    status, third = await _refresh(b, second["refresh_token"])
    assert status == 200 and third["generation"] == 3
    assert token_is_valid(b.vault, third["token"])
    assert token_is_valid(b.vault, first["token"]), "the old Vault token lives through grace"
    await b.wait_for(lambda: not token_is_valid(b.vault, first["token"]), timeout=6, what="revocation after grace")
    assert [e["generation"] for e in _events(b, "family_refreshed")] == [2, 3]
    # The code audits a family's first token as family_created (there is no separate token_minted).
    created = [(e["profile"], e["identity"], e["generation"], e["family"], e["token_fp"])
               for e in _events(b, "family_created")]
    assert created == [("deploy", "cn:job", 1, first["family"], hashlib.sha256(first["token"].encode()).hexdigest()[:16])]
    state_dir = b.broker.config.state.dir
    state = (state_dir / "families.json").read_text()
    assert first["refresh_token"] not in state and third["refresh_token"] not in state
    assert [e["id"] for e in json.loads(state)] == [first["family"]] and state.count("\n") == 3, "one line a family"
    assert {name: _mode(state_dir / name) for name in ("families.json", "revocations.json")} == {
        "families.json": 0o600, "revocations.json": 0o600}


async def test_shared_profile_get_and_per_job_post_are_told_apart(brokers: BrokerFactory) -> None:
    b = await brokers.start({"demo": {}, "deploy": PER_JOB})
    assert_error(await raw(b, "GET", "/v1/tokens/deploy"), 400, "bad_request",
                 "profile deploy is per-job", "POST /v1/tokens/deploy")
    assert_error(await raw(b, "POST", "/v1/tokens/demo"), 400, "bad_request",
                 "profile demo is shared", "GET /v1/tokens/demo")
    assert_error(await raw(b, "POST", "/v1/tokens/deploy", cert="stranger"), 403, "forbidden",
                 "may not fetch that profile")
    await assert_still_serving(b)
    await _assert_still_serving(b)


async def test_retry_within_the_interval_returns_the_same_pair(brokers: BrokerFactory) -> None:
    b = await brokers.start({"deploy": PER_JOB})
    first = await _create(b)
    status, second = await _refresh(b, first["refresh_token"])
    status, again = await _refresh(b, first["refresh_token"])  # the answer was "lost": the job retries
    assert status == 200 and again == second, "the already-issued pair, no new mint"
    refreshed = _events(b, "family_refreshed")
    assert [e.get("reason") for e in refreshed] == [None, "retried: the pair already issued for this refresh token"]
    assert refreshed[0]["token_fp"] == refreshed[1]["token_fp"] and refreshed[1]["generation"] == 2
    assert refreshed[1]["identity"] == "cn:job"
    status, third = await _refresh(b, second["refresh_token"])
    assert status == 200 and third["generation"] == 3


async def test_family_events_name_the_identity_the_allow_list_admits(brokers: BrokerFactory) -> None:
    """job's first identity is cn:job; only its uri: is allowed, and both events say so."""
    b = await brokers.start({"deploy": {**PER_JOB, "allow": ["uri:spiffe://ci.example/runner/*"]}})
    first = await _create(b)
    status, second = await _refresh(b, first["refresh_token"])
    status, again = await _refresh(b, first["refresh_token"])  # a retry: audited too
    assert status == 200 and again == second
    identities = [(e["event"], e["identity"]) for e in b.audit_events() if e["event"].startswith("family_")]
    assert identities == [("family_created", "uri:spiffe://ci.example/runner/1")] + [
        ("family_refreshed", "uri:spiffe://ci.example/runner/1")] * 2


async def test_every_refused_refresh_token_is_counted(brokers: BrokerFactory) -> None:
    b = await brokers.start({"deploy": PER_JOB})
    first = await _create(b)
    garbage = [("fam_unknown.secret", "_any"),  # no family the broker knows
               ("é" * 10, "_any"),  # not ASCII: refused before any lookup
               ("x" * 300, "_any"),  # longer than any refresh token
               (first["family"] + ".forged", "deploy")]  # a live family's id, a secret never issued
    for token, profile in garbage:
        before = b.metric("broker_token_requests_total", profile=profile, outcome="refresh_invalid") or 0
        await _refused(b, token, "refresh_token_invalid", "unknown refresh token")
        assert b.metric("broker_token_requests_total", profile=profile, outcome="refresh_invalid") == before + 1, token
    await _assert_still_serving(b)


async def _assert_family_revoked(b: RunningBroker, bodies: list[dict[str, Any]]) -> None:
    for body in bodies:
        assert not token_is_valid(b.vault, body["token"]), f"generation {body['generation']} still valid"
    assert b.metric("broker_token_reuse_detected_total", profile="deploy") == 1
    reuse = _events(b, "reuse_detected")
    assert len(reuse) == 1 and reuse[0]["family"] == bodies[0]["family"]
    assert reuse[0]["owner_identity"] == "cn:job" and reuse[0]["identity"]
    assert _events(b, "family_revoked")[0]["reason"] == "reuse_detected"
    await _refused(b, bodies[-1]["refresh_token"], "refresh_token_invalid", INVALID)  # the family is gone
    await _assert_still_serving(b)


async def test_replay_after_the_interval_revokes_the_family(brokers: BrokerFactory) -> None:
    b = await brokers.start({"deploy": {**PER_JOB, "reuse_interval": "1s"}})
    first = await _create(b)
    _, second = await _refresh(b, first["refresh_token"])
    await asyncio.sleep(1.2)
    await _refused(b, first["refresh_token"], "refresh_token_reused", REUSED)
    await _assert_family_revoked(b, [first, second])


async def test_replay_of_an_older_generation_revokes_the_family(brokers: BrokerFactory) -> None:
    b = await brokers.start({"deploy": PER_JOB})
    first = await _create(b)
    _, second = await _refresh(b, first["refresh_token"])
    _, third = await _refresh(b, second["refresh_token"])
    await _refused(b, first["refresh_token"], "refresh_token_reused", REUSED)  # two generations back: never a retry
    await _assert_family_revoked(b, [first, second, third])


async def test_live_refresh_token_from_another_certificate_revokes_the_family(brokers: BrokerFactory) -> None:
    b = await brokers.start({"deploy": PER_JOB})
    first = await _create(b)
    await _refused(b, first["refresh_token"], "refresh_token_reused", REUSED, cert="job-other")
    await _assert_family_revoked(b, [first])
    reuse = _events(b, "reuse_detected")[0]
    assert reuse["identity"] == "cn:job-other" and reuse["same_certificate"] is False
    # Which certificate presented it, even when two share a name (openssl x509 -fingerprint -sha256).
    other_der = x509.load_pem_x509_certificate(b.pki.pair("job-other")[0].read_bytes()).public_bytes(Encoding.DER)
    assert reuse["certificate_fp"] == hashlib.sha256(other_der).hexdigest()[:16]


async def test_bad_refresh_requests(brokers: BrokerFactory) -> None:
    b = await brokers.start({"deploy": PER_JOB})
    first = await _create(b)
    cases = [
        ({"data": b"not json", "headers": {"Content-Type": "application/json"}}, 400, "bad_request", "not valid JSON"),
        ({"data": b'{"refresh_token": 1}', "headers": {"Content-Type": "application/json"}}, 400, "bad_request",
         'string "refresh_token"'),
        ({"data": b"[]", "headers": {"Content-Type": "application/json"}}, 400, "bad_request", "JSON object"),
        ({"data": b"refresh_token=x", "headers": {"Content-Type": "application/x-www-form-urlencoded"}}, 415,
         "unsupported_media_type", "application/json"),
        ({"json": {"refresh_token": "fam_nope.abc"}}, 401, "refresh_token_invalid", "unknown refresh token"),
        ({"json": {"refresh_token": first["family"] + ".forged"}}, 401, "refresh_token_invalid",
         "unknown refresh token"),
        ({"json": {"refresh_token": "x" * 5000}}, 401, "refresh_token_invalid", "unknown refresh token"),
    ]
    for kwargs, status, code, message in cases:
        got, body, headers = await b.request("POST", "/v1/refresh", **kwargs)
        assert (got, body["error"]) == (status, code), (kwargs, body)
        assert message in body["message"] and headers["Cache-Control"] == "no-store"
    # None of that touched the family: a forged secret with a known family id revokes nothing,
    # but is audited (the id is public in logs: someone is guessing); unknown ids are not.
    assert token_is_valid(b.vault, first["token"])
    denied = [(e["family"], e["identity"], e["reason"], e["certificate_fp"]) for e in _events(b, "token_denied")]
    job_der = x509.load_pem_x509_certificate(b.pki.pair("job")[0].read_bytes()).public_bytes(Encoding.DER)
    job_fp = hashlib.sha256(job_der).hexdigest()[:16]
    assert denied == [(first["family"], "cn:job", "refresh token not issued for this family", job_fp)]
    status, second = await _refresh(b, first["refresh_token"])
    assert status == 200 and second["generation"] == 2


async def test_release_revokes_the_family_only_for_its_own_certificate(brokers: BrokerFactory) -> None:
    b = await brokers.start({"deploy": PER_JOB})
    first = await _create(b)
    _, second = await _refresh(b, first["refresh_token"])
    foreign = await raw(b, "DELETE", f"/v1/families/{first['family']}", cert="job-other")
    assert_error(foreign, 404, "not_found", f"no live token family {first['family']!r} for this client certificate")
    unknown = await raw(b, "DELETE", "/v1/families/fam_unknown")
    assert_error(unknown, 404, "not_found", "no live token family with that id for this client certificate")
    assert token_is_valid(b.vault, second["token"])
    await _assert_still_serving(b)
    status, body, _ = await b.request("DELETE", f"/v1/families/{first['family']}")
    assert status == 200 and body == {"family": first["family"], "profile": "deploy", "revoked": True,
                                     "pending_revocations": 0}
    assert not token_is_valid(b.vault, first["token"]) and not token_is_valid(b.vault, second["token"])
    assert _events(b, "family_revoked")[0]["reason"] == "released"
    assert b.metric("broker_token_requests_total", profile="deploy", outcome="released") == 1
    assert b.metric("broker_rotations_total", profile="deploy", outcome="success") is None, "per-job: no rotations"
    await _refused(b, second["refresh_token"], "refresh_token_invalid", INVALID)
    await _assert_still_serving(b)


async def test_families_end_at_their_maximum_age(brokers: BrokerFactory) -> None:
    b = await brokers.start({"deploy": {**PER_JOB, "family_max_age": "3s"}})
    first = await _create(b)
    assert first["expires_at"] <= first["refresh_expires_at"], "a token never outlives its family"
    await b.wait_for(lambda: bool(_events(b, "family_revoked")), timeout=8, what="the family to expire")
    assert _events(b, "family_revoked")[0]["reason"] == "expired"
    assert not token_is_valid(b.vault, first["token"])
    await _refused(b, first["refresh_token"], "refresh_token_invalid", INVALID)
    await _assert_still_serving(b)


async def test_restart_keeps_families_and_refuses_spent_tokens(brokers: BrokerFactory) -> None:
    profiles = {"deploy": {**PER_JOB, "reuse_interval": "0s"}}
    b = await brokers.start(profiles)
    first = await _create(b)
    _, second = await _refresh(b, first["refresh_token"])
    await b.shutdown()
    again = await brokers.start(profiles, directory=b.dir, roles=b.roles, auth=b.auth_entries())
    again.seen_secrets |= b.seen_secrets
    await _refused(again, first["refresh_token"], "refresh_token_reused", REUSED)  # spent before the restart
    assert not token_is_valid(b.vault, second["token"])
    b2 = await _create(again)
    status, third = await _refresh(again, b2["refresh_token"])
    assert status == 200 and third["generation"] == 2


async def test_restart_keeps_a_live_family_working(brokers: BrokerFactory) -> None:
    profiles = {"deploy": PER_JOB}
    b = await brokers.start(profiles)
    first = await _create(b)
    await b.shutdown()
    again = await brokers.start(profiles, directory=b.dir, roles=b.roles, auth=b.auth_entries())
    again.seen_secrets |= b.seen_secrets
    status, second = await _refresh(again, first["refresh_token"])
    assert status == 200 and second["generation"] == 2 and token_is_valid(b.vault, second["token"])
    status, body, _ = await again.request("DELETE", f"/v1/families/{first['family']}")
    assert status == 200


@pytest.mark.parametrize("cert", ["job"])
async def test_concurrent_refreshes_with_one_token_mint_once(brokers: BrokerFactory, cert: str) -> None:
    b = await brokers.start({"deploy": PER_JOB})
    first = await _create(b)
    results = await asyncio.gather(*(_refresh(b, first["refresh_token"], cert=cert) for _ in range(5)))
    assert {status for status, _ in results} == {200}
    assert {body["generation"] for _, body in results} == {2}
    assert len({body["refresh_token"] for _, body in results}) == 1
    refreshed = _events(b, "family_refreshed")
    assert [e.get("reason") is None for e in refreshed].count(True) == 1, "one mint; the others are retries"
    assert len(refreshed) == 5 and len({e["token_fp"] for e in refreshed}) == 1


async def test_family_requests_while_logged_out_do_not_each_start_a_login(brokers: BrokerFactory,
                                                                           private_openbao) -> None:  # type: ignore[no-untyped-def]
    b = await brokers.start({"deploy": PER_JOB}, vault=private_openbao)
    await _create(b)
    private_openbao.restart_empty()  # the broker's token and its AppRole are gone: logins fail

    def logins() -> float:
        return sum(value for line, value in _samples(b, "broker_vault_requests_total")
                   if 'operation="login_approle"' in line)

    before = logins()
    for _ in range(15):
        answer = await raw(b, "POST", "/v1/tokens/deploy")
        assert_error(answer, 503, "unavailable", "cannot mint a token right now", "retry later")
        assert answer.headers["Retry-After"] == "2"
    assert logins() - before <= 3, "a burst of job requests did not turn into a burst of logins"
    assert b.metric("broker_token_requests_total", profile="deploy", outcome="unavailable") == 15
    status, _ = await b.ops("/healthz")
    assert status == 200, "still serving: the process answers, and jobs get a clear 503 until Vault is back"


def _samples(b: RunningBroker, name: str) -> list[tuple[str, float]]:
    return [(line, float(line.rsplit(" ", 1)[1])) for line in b.metrics_text().splitlines()
            if line.startswith(name + "{")]


# --- ending a family is "revoke now", even while Vault or the state disk fails ---------------

@pytest.mark.parametrize("how", ["release", "reuse"])
async def test_a_family_ended_while_vault_is_down_has_every_token_revoked_once_vault_is_back(
        brokers: BrokerFactory, proxy: TcpProxy, how: str) -> None:
    clock = FakeClock()
    b = await brokers.start({"deploy": SLOW}, clock=clock, vault_address=proxy.address)
    queue = b.broker.revocations
    first = await _create(b)
    _, second = await _refresh(b, first["refresh_token"])
    assert [(e.generation, e.revoke_at > clock.now()) for e in queue.pending] == [(1, True)], "1 is in its grace"
    [grace_ends] = [e.revoke_at for e in queue.pending]
    proxy.cut()
    if how == "release":
        status, body, _ = await b.request("DELETE", f"/v1/families/{first['family']}")
        assert status == 200 and body["revoked"] is False and body["pending_revocations"] == 2, body
        [ended] = [e for e in b.audit_events() if e["event"] == "family_revoked"]
        assert ended["outcome"] == "failure" and ended["pending_revocations"] == 2, ended
    else:
        await _refused(b, second["refresh_token"], "refresh_token_reused", REUSED, cert="job-other")
    pending = [e for e in queue.pending if e.family == first["family"]]
    assert sorted(e.generation for e in pending) == [1, 2], "Vault confirmed nothing: both stay queued"
    assert all(e.revoke_at <= clock.now() for e in pending), "due now, not when generation 1's grace ends"
    proxy.heal()
    # Fake time moves on only while the queue's retries need it, and stays far inside the grace.
    for _ in range(100):
        if not token_is_valid(b.vault, first["token"]) and not token_is_valid(b.vault, second["token"]):
            break
        await clock.advance(5)
        await asyncio.sleep(0.02)  # the retry's Vault call runs on a thread
    else:
        raise AssertionError("generation 1 or 2 still valid at Vault 500 s after Vault came back")
    assert clock.now() < grace_ends, "revoked before generation 1's grace would have ended"
    await b.wait_for(lambda: not [e for e in queue.pending if e.family == first["family"]], what="the queue emptied")
    await _assert_still_serving(b)


async def test_a_family_is_forgotten_only_once_its_tokens_are_queued(brokers: BrokerFactory,
                                                                       proxy: TcpProxy) -> None:
    b = await brokers.start({"deploy": SLOW}, vault_address=proxy.address, vault_timeout="30s")
    first = await _create(b)
    _, second = await _refresh(b, first["refresh_token"])
    state_dir = b.broker.config.state.dir
    [family] = json.loads((state_dir / "families.json").read_text())
    current = family["current"]["accessor"]
    revoking = proxy.request_seen("/v1/auth/token/revoke-accessor")
    proxy.hold()  # Vault stalls on the first revocation: a crash now leaves the disk as it is
    release = asyncio.create_task(b.request("DELETE", f"/v1/families/{first['family']}"))
    try:
        await asyncio.wait_for(revoking.wait(), timeout=20)
        families = json.loads((state_dir / "families.json").read_text())
        queued = json.loads((state_dir / "revocations.json").read_text())
        seen_at = time.time()
    finally:
        proxy.release()
    tracked = {f["current"]["accessor"] for f in families} | {e["accessor"] for e in queued}
    assert current in tracked, "the family's current token was on disk neither in the family nor in the queue"
    assert sorted(e["generation"] for e in queued if e["family"] == first["family"]) == [1, 2]
    assert all(e["revoke_at"] <= seen_at for e in queued), "generation 1 made due now, not left in its grace"
    status, body, _ = await release
    assert status == 200 and body["revoked"] is True
    assert not token_is_valid(b.vault, first["token"]) and not token_is_valid(b.vault, second["token"])
    await _assert_still_serving(b)


async def test_unknown_family_ids_leave_no_lock_behind(brokers: BrokerFactory) -> None:
    b = await brokers.start({"deploy": PER_JOB})
    manager = b.broker.families
    assert manager is not None
    for i in range(20):
        await _refused(b, f"fam_guess{i}.secret", "refresh_token_invalid", INVALID)
        answer = await raw(b, "DELETE", f"/v1/families/fam_guess{i}")
        assert_error(answer, 404, "not_found", "no live token family with that id for this client certificate")
    assert manager.lock_count == 0, "a lock per guessed family id is memory anyone with a cert can fill"
    first = await _create(b)
    _, second = await _refresh(b, first["refresh_token"])
    assert manager.lock_count == 1
    status, _, _ = await b.request("DELETE", f"/v1/families/{first['family']}")
    assert status == 200 and manager.lock_count == 0, "a released family's lock goes with it"
    other = await _create(b)
    _, _ = await _refresh(b, other["refresh_token"])
    await _refused(b, other["refresh_token"], "refresh_token_reused", REUSED, cert="job-other")
    assert manager.lock_count == 0, "so does the lock of a family ended by reuse"
    await _assert_still_serving(b)


async def test_a_failing_state_write_in_the_expiry_loop_does_not_stop_the_broker(brokers: BrokerFactory) -> None:
    clock = FakeClock()
    quiet = {"ttl": "1h", "grace": "10m", "rotate_after": "40m", "check_interval": "30m"}
    b = await brokers.start({"demo": quiet, "deploy": {**SLOW, "family_max_age": "10m"}}, clock=clock)
    manager = b.broker.families
    assert manager is not None
    first = await _create(b)
    families_file = b.broker.config.state.dir / "families.json"
    families_file.unlink()
    families_file.mkdir()  # from now on every write of it fails (EISDIR), as on a full or read-only disk
    await clock.settle()  # the loop has gone to sleep until the family's maximum age
    await clock.advance(601)
    await b.wait_for(lambda: not token_is_valid(b.vault, first["token"]), timeout=10, what="the expired family revoked")
    await b.wait_for(lambda: manager.retry_at is not None, timeout=10, what="the loop backing off")
    assert not b.task.done(), "the broker is still running"
    assert manager.retry_at - clock.now() <= 1.0 + 1e-6, "first failure: full jitter within 1 s"
    await assert_still_serving(b)
    assert (await b.ops("/healthz"))[0] == 200
    families_file.rmdir()
    await clock.advance(manager.retry_at - clock.now())
    await b.wait_for(lambda: manager.retry_at is None, timeout=10, what="the retried write to succeed")
    assert json.loads(families_file.read_text()) == [] and _mode(families_file) == 0o600
    await _assert_still_serving(b)


async def test_a_generation_the_state_dir_cannot_record_is_revoked_not_served(brokers: BrokerFactory) -> None:
    """families.json cannot be written (full or read-only disk): neither a new family nor a
    refresh hands out a token the broker could not retire after a restart. The minted token is
    revoked at once, the job gets a clear 503, and the refresh token it holds stays valid."""
    b = await brokers.start({"deploy": PER_JOB})
    first = await _create(b)
    live_before = _live_deploy_tokens(b)  # OpenBao is shared with other tests: compare, don't count
    assert live_before.count(first["family"]) == 1
    families_file = b.broker.config.state.dir / "families.json"
    families_file.unlink()
    families_file.mkdir()  # every write of it fails (EISDIR) from now on
    try:
        for method, path, body in (("POST", "/v1/tokens/deploy", None),
                                   ("POST", "/v1/refresh", {"refresh_token": first["refresh_token"]})):
            answer = await raw(b, method, path, json=body)
            assert_error(answer, 503, "unavailable", "the broker cannot write its state directory")
        # Each minted token was audited before the state write was tried (a token that cannot be
        # audited is never served), then revoked as rolled_back: the trail shows both.
        minted = [e["token_fp"] for e in b.audit_events() if e["event"] in ("family_created", "family_refreshed")]
        rolled_back = [e["token_fp"] for e in b.audit_events()
                       if e["event"] == "token_revoked" and e["reason"] == "rolled_back"]
        assert len(minted) == 3 and rolled_back == minted[1:], (minted, rolled_back)
        assert sorted(_live_deploy_tokens(b)) == sorted(live_before), "both minted tokens are revoked at Vault"
        # Ops see why: no family can start or refresh, so the per-job profile is not ready.
        status, ready = await b.ops("/readyz")
        assert status == 503 and ready["state"]["ok"] is False, ready
        assert ready["profiles"]["deploy"]["reasons"] == ["cannot write families.json: Is a directory"], ready
    finally:
        families_file.rmdir()
    # The families loop writes the file again with backoff (about a second at first); that ends it.
    await b.wait_for(lambda: b.broker.families.state_error is None, timeout=5, what="families.json written again")
    status, ready = await b.ops("/readyz")
    assert status == 200 and ready["state"] == {"ok": True, "last_error": None}, ready
    status, second = await _refresh(b, first["refresh_token"])
    assert status == 200 and second["generation"] == 2, second
    await _assert_still_serving(b)


def _live_deploy_tokens(b: RunningBroker) -> list[str]:
    """The family of every valid token this broker minted for its per-job profile, per Vault.
    Told apart by the token role, which is this test's own: other tests' tokens in the shared
    OpenBao expire at their own pace while this one runs."""
    root = hvac.Client(url=b.vault.address, token="root")
    families = []
    for accessor in root.auth.token.list_accessors()["data"]["keys"]:
        try:
            data = root.auth.token.lookup_accessor(accessor)["data"]
        except hvac.exceptions.InvalidRequest:
            continue  # revoked while we listed
        if data.get("role") == b.roles["deploy"]:
            families.append((data.get("meta") or {})["family"])
    return families


async def test_readyz_counts_a_per_job_profile_ready_only_while_the_broker_can_log_in(
        brokers: BrokerFactory, proxy: TcpProxy) -> None:
    """A per-job profile holds no token between jobs: it is ready while the broker holds a
    Vault login to mint with. A broker with only per-job profiles is not ready before that."""
    clock = FakeClock()
    proxy.cut()
    b = await brokers.start({"deploy": SLOW}, clock=clock, vault_address=proxy.address, wait_ready=False)
    await b.wait_for(lambda: b.broker.auth.last_error is not None, what="the first login to fail")
    status, ready = await b.ops("/readyz")
    assert status == 503, ready
    assert ready["profiles"]["deploy"]["mode"] == "per-job" and not ready["profiles"]["deploy"]["ready"]
    assert ready["problems"] and ready["problems"][0].startswith("profile deploy: no Vault login to mint with")
    answer = await raw(b, "POST", "/v1/tokens/deploy")
    assert_error(answer, 503, "unavailable")
    proxy.heal()
    for _ in range(200):
        if (await b.ops("/readyz"))[0] == 200:
            break
        await clock.advance(1)
        await asyncio.sleep(0.02)  # the login's Vault call runs on a thread
    else:
        raise AssertionError("not ready 200 s (fake) after Vault came back")
    status, ready = await b.ops("/readyz")
    assert ready["profiles"]["deploy"] == {"ready": True, "mode": "per-job", "reasons": []}
    await _create(b)


async def test_a_family_as_short_as_the_shortest_token_starts(brokers: BrokerFactory) -> None:
    """family_max_age = 1s (the least broker check accepts with reuse_interval 0s): the first token
    gets exactly that second, reckoned from the same instant as the family's end. Reckoned from a
    later one it was 0.99..s, refused as "maximum age", and that RefreshRejected answered 500."""
    b = await brokers.start({"deploy": {**PER_JOB, "reuse_interval": "0s", "family_max_age": "1s"}})
    first = await _create(b)
    assert first["generation"] == 1 and first["expires_at"] <= first["refresh_expires_at"]
    await b.wait_for(lambda: bool(_events(b, "family_revoked")), timeout=8, what="the family to expire")
    await _assert_still_serving(b)


async def test_a_family_with_no_room_for_a_token_is_503_not_500(brokers: BrokerFactory) -> None:
    # broker check refuses such a profile; should one get here anyway, creating a family is a
    # failed mint (503), never an unhandled RefreshRejected (500).
    b = await brokers.start({"deploy": PER_JOB})
    manager = b.broker.families
    assert manager is not None
    healthy = manager._profiles["deploy"]  # noqa: SLF001 - a profile broker check would refuse
    manager._profiles["deploy"] = dataclasses.replace(healthy, family_max_age=0.5)  # noqa: SLF001
    answer = await raw(b, "POST", "/v1/tokens/deploy")
    assert_error(answer, 503, "unavailable", "family_max_age leaves no time for a token")
    assert answer.headers.get("Retry-After")
    assert not _events(b, "family_created") and not manager.families
    manager._profiles["deploy"] = healthy  # noqa: SLF001
    await _assert_still_serving(b)


# --- found in review: audit, pasted refresh tokens, removed profiles, retries after a restart --

async def test_a_family_token_that_cannot_be_audited_is_not_served(brokers: BrokerFactory) -> None:
    """[audit] on_failure = "refuse" (the default) holds for families as for shared profiles:
    a full disk under the audit log means a 503, the minted token is revoked at once, and the
    refresh token the job holds stays the valid one."""
    b = await brokers.start({"deploy": PER_JOB})
    first = await _create(b)
    live_before = _live_deploy_tokens(b)
    assert live_before == [first["family"]]
    audit = b.broker.audit.path
    audit.rename(audit.with_name("audit.jsonl.1"))
    audit.symlink_to("/dev/full")  # every write fails with ENOSPC
    b.broker.audit.reopen()  # what SIGHUP does
    try:
        for method, path, body in (("POST", "/v1/tokens/deploy", None),
                                   ("POST", "/v1/refresh", {"refresh_token": first["refresh_token"]})):
            answer = await raw(b, method, path, json=body)
            assert_error(answer, 503, "audit_unavailable", "cannot write its audit log, so it hands out no tokens")
        assert sorted(_live_deploy_tokens(b)) == sorted(live_before), "both minted tokens are revoked at Vault"
        assert b.metric("broker_token_requests_total", profile="deploy", outcome="audit_unavailable") == 1
        assert b.metric("broker_token_requests_total", profile="_any", outcome="audit_unavailable") == 1
    finally:
        audit.unlink()
        b.broker.audit.reopen()
    status, second = await _refresh(b, first["refresh_token"])
    assert status == 200 and second["generation"] == 2
    assert b.audit_events()[0]["event"] == "family_refreshed"  # the new file, from the first event after


async def test_release_with_a_pasted_refresh_token_does_not_repeat_its_secret(brokers: BrokerFactory) -> None:
    b = await brokers.start({"deploy": PER_JOB})
    first = await _create(b)
    answer = await raw(b, "DELETE", f"/v1/families/{first['refresh_token']}")
    assert_error(answer, 404, "not_found", "looks like a refresh token (not repeated here)", "the part before the '.'")
    secret = first["refresh_token"].partition(".")[2]
    assert secret[:6] not in answer.text and first["family"] not in answer.text
    status, second = await _refresh(b, first["refresh_token"])  # nothing happened to the family
    assert status == 200 and second["generation"] == 2


@pytest.mark.parametrize("token", ["fam_x.\ud800", "fam_x.é", "fam_ｘ.abc"])
async def test_a_refresh_token_that_is_not_ascii_is_invalid_not_a_500(brokers: BrokerFactory, token: str) -> None:
    b = await brokers.start({"deploy": PER_JOB})
    first = await _create(b)
    body = json.dumps({"refresh_token": token.replace("fam_x", first["family"])})  # "\ud800" stays escaped
    answer = await raw(b, "POST", "/v1/refresh", data=body.encode(), headers={"Content-Type": "application/json"})
    assert_error(answer, 401, "refresh_token_invalid", INVALID)
    status, second = await _refresh(b, first["refresh_token"])
    assert status == 200 and second["generation"] == 2


async def test_a_family_of_a_profile_removed_from_the_config_ends_after_the_restart(brokers: BrokerFactory) -> None:
    before = {"deploy": PER_JOB, "gone": PER_JOB}
    b = await brokers.start(before)
    doomed = await _create(b, profile="gone")
    kept = await _create(b)
    await b.shutdown()
    again = await brokers.start({"deploy": PER_JOB}, directory=b.dir, roles={"deploy": b.roles["deploy"]},
                                auth=b.auth_entries())
    again.seen_secrets |= b.seen_secrets
    await again.wait_for(lambda: any(e["reason"] == "profile_removed" for e in _events(again, "family_revoked")),
                         timeout=10, what="the orphaned family to end")
    assert not token_is_valid(b.vault, doomed["token"])
    await _refused(again, doomed["refresh_token"], "refresh_token_invalid", INVALID)
    status, second = await _refresh(again, kept["refresh_token"])
    assert status == 200 and second["generation"] == 2


async def test_a_refresh_from_a_certificate_no_longer_allowed_ends_the_family(brokers: BrokerFactory) -> None:
    b = await brokers.start({"deploy": PER_JOB})
    first = await _create(b)
    await b.shutdown()
    narrowed = {"deploy": {**PER_JOB, "allow": ["cn:job-other"]}}
    again = await brokers.start(narrowed, directory=b.dir, roles=b.roles, auth=b.auth_entries())
    again.seen_secrets |= b.seen_secrets
    await _refused(again, first["refresh_token"], "refresh_token_invalid",
                   "no longer allowed for the family's profile; the family has ended")
    assert not token_is_valid(b.vault, first["token"]), "revoked now, not at the end of its TTL"
    assert [(e["family"], e["reason"]) for e in _events(again, "family_revoked")] == [(first["family"], "not_allowed")]
    assert token_is_valid(b.vault, (await _create(again, cert="job-other"))["token"])


async def test_families_of_a_removed_profile_end_even_with_no_per_job_profile_left(brokers: BrokerFactory) -> None:
    b = await brokers.start({"demo": {}, "gone": PER_JOB})
    doomed = await _create(b, profile="gone")
    await b.shutdown()
    again = await brokers.start({"demo": {}}, directory=b.dir, roles={"demo": b.roles["demo"]}, auth=b.auth_entries())
    again.seen_secrets |= b.seen_secrets
    await again.wait_for(lambda: not token_is_valid(b.vault, doomed["token"]), timeout=10,
                         what="the family of the removed per-job profile to end")
    assert [(e["family"], e["reason"]) for e in _events(again, "family_revoked")] == [
        (doomed["family"], "profile_removed")]
    assert again.broker.store.load_families(lambda data, where: data) == []
    status, ready = await again.ops("/readyz")
    assert status == 200 and "gone" not in ready["profiles"], ready


async def test_a_refresh_retried_again_and_again_after_a_restart_gets_one_new_pair(brokers: BrokerFactory) -> None:
    """The pair a lost answer carried is gone with the restart (only hashes are kept): the
    first retry gets a new pair, and every further retry within reuse_interval that same one."""
    profiles = {"deploy": {**PER_JOB, "reuse_interval": "60s"}}
    b = await brokers.start(profiles)
    first = await _create(b)
    _, lost = await _refresh(b, first["refresh_token"])  # the answer the job never saw
    await b.shutdown()
    again = await brokers.start(profiles, directory=b.dir, roles=b.roles, auth=b.auth_entries())
    again.seen_secrets |= b.seen_secrets
    status, retried = await _refresh(again, first["refresh_token"])
    assert status == 200 and retried["generation"] == 3
    for _ in range(2):
        status, same = await _refresh(again, first["refresh_token"])
        assert status == 200 and same == retried
    assert token_is_valid(b.vault, retried["token"])
    status, next_one = await _refresh(again, retried["refresh_token"])
    assert status == 200 and next_one["generation"] == 4
    await _refused(again, lost["refresh_token"], "refresh_token_reused", REUSED)  # never the job's: a copy
    assert not token_is_valid(b.vault, next_one["token"])


async def test_an_admin_revoke_of_a_per_job_profile_ends_every_family_of_it(brokers: BrokerFactory) -> None:
    """Incident response: every live family of the profile ends, its Vault tokens (those in
    grace too) dead at once; other profiles' families are untouched; new families can start."""
    b = await brokers.start({"deploy": PER_JOB, "other": PER_JOB})
    first = await _create(b)
    _, second = await _refresh(b, first["refresh_token"])  # the first token is in grace now
    another = await _create(b, cert="job-other")
    elsewhere = await _create(b, profile="other")
    denied = await raw(b, "POST", "/v1/tokens/deploy/revoke")  # a job's certificate
    assert_error(denied, 403, "forbidden", "admin actions need a certificate matching [admin].allow")
    status, body, _ = await b.request("POST", "/v1/tokens/deploy/revoke", cert="ops")
    assert status == 200 and body == {"profile": "deploy", "families_revoked": 2, "pending_revocations": 0}
    for token in (first["token"], second["token"], another["token"]):
        assert not token_is_valid(b.vault, token)
    assert token_is_valid(b.vault, elsewhere["token"])
    await _refused(b, second["refresh_token"], "refresh_token_invalid", INVALID)
    assert {e["reason"] for e in _events(b, "family_revoked")} == {"admin_revoke"}
    assert [e["identity"] for e in _events(b, "admin_revoke")] == ["cn:ops"]
    await _create(b)  # the profile keeps working for new jobs
    rotate = await raw(b, "POST", "/v1/tokens/deploy/rotate", cert="ops")
    assert_error(rotate, 404, "not_found", "profile deploy is per-job", "revoke ends all its families")


async def test_a_certificate_holds_at_most_max_families_per_client(brokers: BrokerFactory) -> None:
    b = await brokers.start({"deploy": {**PER_JOB, "max_families_per_client": 2}})
    answers = await asyncio.gather(*(raw(b, "POST", "/v1/tokens/deploy") for _ in range(4)))
    started = [a.json() for a in answers if a.status == 200]
    b.seen_secrets |= {body["refresh_token"] for body in started}
    assert len(started) == 2, "concurrent starts cannot overshoot the limit"
    for refused in (a for a in answers if a.status != 200):
        assert_error(refused, 409, "too_many_families", "already holds 2 live token families of profile deploy",
                     "max_families_per_client", "DELETE /v1/families/")
    assert len(_events(b, "family_created")) == 2, "a refused start mints nothing"
    denied = [(e["profile"], e["identity"], e["reason"]) for e in _events(b, "token_denied")]
    assert denied == [("deploy", "cn:job", "family limit reached")] * 2
    assert b.metric("broker_token_requests_total", profile="deploy", outcome="family_limit") == 2
    status, refreshed = await _refresh(b, started[0]["refresh_token"])
    assert status == 200, "refreshing a family at the limit is not starting one"
    assert token_is_valid(b.vault, (await _create(b, cert="job-other"))["token"]), "the limit is per certificate"
    status, _, _ = await b.request("DELETE", f"/v1/families/{started[1]['family']}")
    assert status == 200
    assert token_is_valid(b.vault, (await _create(b))["token"]), "a released family frees its place"
    assert_error(await raw(b, "POST", "/v1/tokens/deploy"), 409, "too_many_families")
    assert token_is_valid(b.vault, refreshed["token"])


async def test_a_refresh_rolled_back_after_a_failed_write_never_reaches_disk_through_another(
        brokers: BrokerFactory) -> None:
    """Family A's write fails and A is rolled back in memory; family B's write, queued behind it,
    must not put A's rolled-back generation on disk (after a restart the job's valid refresh
    token would look spent, and the token it holds would be tracked nowhere). The families loop,
    which would rewrite the file, is in its backoff: a failing disk puts it there."""
    clock = FakeClock()
    b = await brokers.start({"deploy": PER_JOB}, clock=clock)
    a, other = await _create(b), await _create(b, cert="job-other")
    store, families = b.broker.store, b.broker.families
    families_file = b.broker.config.state.dir / "families.json"
    write = store._write_locked
    disk = {"full": True, "hold_next": False}
    entered, go_on = asyncio.Event(), asyncio.Event()

    async def flaky(path: Any, data: Any) -> None:
        if path == families_file and disk["full"]:
            raise OSError(28, "No space left on device")
        if path == families_file and disk["hold_next"]:
            disk["hold_next"] = False
            entered.set()
            await go_on.wait()
            raise OSError(28, "No space left on device")
        await write(path, data)

    store._write_locked = flaky  # type: ignore[method-assign]
    status, _ = await _refresh(b, a["refresh_token"])
    assert status == 503
    await b.wait_for(lambda: families.retry_at is not None, what="the families loop in its backoff")
    disk.update(full=False, hold_next=True)
    refresh_a = asyncio.create_task(_refresh(b, a["refresh_token"]))
    await asyncio.wait_for(entered.wait(), 10)  # A's generation 2 is being written
    refresh_b = asyncio.create_task(_refresh(b, other["refresh_token"], cert="job-other"))
    await b.wait_for(lambda: any(f.id == other["family"] and f.generation == 2 for f in families.families),
                     what="B's write to wait behind A's")
    go_on.set()
    (status_a, _), (status_b, _) = await refresh_a, await refresh_b
    assert (status_a, status_b) == (503, 200)
    on_disk = {f["id"]: f["generation"] for f in json.loads(families_file.read_text())}
    assert on_disk == {a["family"]: 1, other["family"]: 2}, on_disk
    status, _ = await _refresh(b, a["refresh_token"])
    assert status == 200, "A's refresh token is still the valid one"


async def test_a_family_remembers_a_bounded_number_of_spent_refresh_tokens(brokers: BrokerFactory,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # One line of families.json per family, re-encoded on every refresh: it must not grow without end.
    monkeypatch.setattr(families_module, "SPENT_HASHES_KEPT", 3)
    b = await brokers.start({"deploy": {**PER_JOB, "reuse_interval": "0s"}})
    issued = [await _create(b)]
    for _ in range(6):
        status, body = await _refresh(b, issued[-1]["refresh_token"])
        assert status == 200, body
        issued.append(body)
    (family,) = b.broker.families.families
    assert len(family.spent_hashes) == 3 and family.generation == 7
    await _refused(b, issued[0]["refresh_token"], "refresh_token_invalid", INVALID)  # forgotten: unknown
    assert token_is_valid(b.vault, issued[-1]["token"]), "an unknown token revokes nothing"
    await _refused(b, issued[3]["refresh_token"], "refresh_token_reused", REUSED)  # remembered: reuse


async def test_a_family_being_recorded_counts_once_against_the_limit(brokers: BrokerFactory,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """While the first start writes families.json, its family is tracked already: it must not
    also count as "starting", or a second start within the limit is refused."""
    b = await brokers.start({"deploy": {**PER_JOB, "max_families_per_client": 2}})
    store = b.broker.store
    save = store.save_families
    writing, go_on = asyncio.Event(), asyncio.Event()

    async def held_once(lines: Callable[[], list[str]]) -> None:
        if not writing.is_set():
            writing.set()
            await go_on.wait()
        await save(lines)

    monkeypatch.setattr(store, "save_families", held_once)
    first = asyncio.create_task(raw(b, "POST", "/v1/tokens/deploy"))
    await asyncio.wait_for(writing.wait(), 10)
    second = await raw(b, "POST", "/v1/tokens/deploy")
    go_on.set()
    answers = [await first, second]
    b.seen_secrets |= {a.json()["refresh_token"] for a in answers if a.status == 200}
    assert [a.status for a in answers] == [200, 200], [a.text for a in answers]
    assert_error(await raw(b, "POST", "/v1/tokens/deploy"), 409, "too_many_families")


async def test_a_certificate_lists_its_own_live_families_and_nothing_else(brokers: BrokerFactory) -> None:
    # The way back from 409 too_many_families when the ids were not kept: list, then release.
    b = await brokers.start({"deploy": PER_JOB, "other": PER_JOB})
    first, second = await _create(b), await _create(b, profile="other")
    theirs = await _create(b, cert="job-other")
    status, listed, headers = await b.request("GET", "/v1/families")
    assert status == 200 and headers.get("Cache-Control") == "no-store"
    assert [(f["family"], f["profile"], f["generation"]) for f in listed["families"]] == [
        (first["family"], "deploy", 1), (second["family"], "other", 1)], "its own, oldest first"
    assert set(listed["families"][0]) == {"family", "profile", "generation", "created_at", "refresh_expires_at"}
    assert listed["families"][0]["refresh_expires_at"] == first["refresh_expires_at"]
    status, body, _ = await b.request("GET", "/v1/families", cert="job-other")
    assert [f["family"] for f in body["families"]] == [theirs["family"]]
    status, body, _ = await b.request("GET", "/v1/families", cert="stranger")  # allowed for no profile
    assert status == 200 and body == {"families": []}
    status, _, _ = await b.request("DELETE", f"/v1/families/{first['family']}")
    assert status == 200
    status, listed, _ = await b.request("GET", "/v1/families")
    assert [f["family"] for f in listed["families"]] == [second["family"]]


async def test_the_family_limit_counts_families_kept_across_a_restart(brokers: BrokerFactory) -> None:
    profiles = {"deploy": {**PER_JOB, "max_families_per_client": 1}}
    b = await brokers.start(profiles)
    await _create(b)
    await b.shutdown()
    again = await brokers.start(profiles, directory=b.dir, roles=b.roles, auth=b.auth_entries())
    again.seen_secrets |= b.seen_secrets
    assert_error(await raw(again, "POST", "/v1/tokens/deploy"), 409, "too_many_families", "already holds 1 live")
    assert token_is_valid(again.vault, (await _create(again, cert="job-other"))["token"])


async def test_retry_window_starts_when_the_refresh_token_is_spent(brokers: BrokerFactory) -> None:
    clock = FakeClock()
    b = await brokers.start({"deploy": {**SLOW, "reuse_interval": "30s"}}, clock=clock)
    first = await _create(b)
    await clock.advance(120)  # the family is two minutes old
    status, second = await _refresh(b, first["refresh_token"])
    assert status == 200
    status, again = await _refresh(b, first["refresh_token"])  # a retry right after: within 30 s
    assert status == 200 and again == second


async def test_a_replay_several_generations_back_is_reuse_with_the_default_bound(brokers: BrokerFactory) -> None:
    b = await brokers.start({"deploy": {**PER_JOB, "reuse_interval": "0s"}})
    issued = [await _create(b)]
    for _ in range(6):
        status, body = await _refresh(b, issued[-1]["refresh_token"])
        assert status == 200
        issued.append(body)
    await _refused(b, issued[0]["refresh_token"], "refresh_token_reused", REUSED)


async def test_a_retried_refresh_is_answered_while_the_audit_log_fails(brokers: BrokerFactory) -> None:
    """Its pair was audited when issued. Refused (503), the job would retry past reuse_interval
    and the retry would be judged reuse: its family revoked and a security alert raised."""
    b = await brokers.start({"deploy": PER_JOB})
    first = await _create(b)
    status, second = await _refresh(b, first["refresh_token"])  # the answer is lost on its way
    assert status == 200
    audit = b.broker.audit.path
    audit.rename(audit.with_name("audit.jsonl.1"))
    audit.symlink_to("/dev/full")  # every write fails with ENOSPC
    b.broker.audit.reopen()
    try:
        status, again = await _refresh(b, first["refresh_token"])
    finally:
        audit.unlink()
        b.broker.audit.reopen()
    assert status == 200 and again == second
    assert not b.metric("broker_token_reuse_detected_total", profile="deploy")
    status, third = await _refresh(b, second["refresh_token"])
    assert status == 200 and third["generation"] == 3
