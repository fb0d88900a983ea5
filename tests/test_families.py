"""Per-job token families against a real OpenBao over real mTLS: create, refresh, retry,
reuse detection (three ways), release, expiry, restart."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.conftest import BrokerFactory, RunningBroker, token_is_valid

PER_JOB = {"mode": "per-job", "ttl": "60s", "grace": "3s", "rotate_after": "40s", "reuse_interval": "2s",
           "allow": ["cn:job", "cn:job-other"]}
FAMILY_KEYS = {"profile", "token", "expires_at", "refresh_token", "refresh_expires_at", "family", "generation"}


async def _create(b: RunningBroker, cert: str = "job") -> dict[str, Any]:
    status, body, _ = await b.request("POST", "/v1/tokens/deploy", cert=cert)
    assert status == 200, body
    b.seen_secrets.add(body["refresh_token"])
    return body  # type: ignore[no-any-return]


async def _refresh(b: RunningBroker, refresh_token: str, cert: str = "job") -> tuple[int, dict[str, Any]]:
    status, body, _ = await b.request("POST", "/v1/refresh", cert=cert, json={"refresh_token": refresh_token})
    if status == 200:
        b.seen_secrets.add(body["refresh_token"])
    return status, body


def _events(b: RunningBroker, name: str) -> list[dict[str, Any]]:
    return [e for e in b.audit_events() if e["event"] == name]


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
    assert _events(b, "family_created")[0]["identity"] == "cn:job"
    state = (b.broker.config.state.dir / "families.json").read_text()
    assert first["refresh_token"] not in state and third["refresh_token"] not in state


async def test_shared_profile_get_and_per_job_post_are_told_apart(brokers: BrokerFactory) -> None:
    b = await brokers.start({"demo": {}, "deploy": PER_JOB})
    status, body, _ = await b.request("GET", "/v1/tokens/deploy")
    assert status == 400 and "per-job" in body["message"] and "POST /v1/tokens/deploy" in body["message"]
    status, body, _ = await b.request("POST", "/v1/tokens/demo")
    assert status == 400 and "shared" in body["message"]
    status, body, _ = await b.request("POST", "/v1/tokens/deploy", cert="stranger")
    assert status == 403 and body["error"] == "forbidden"


async def test_retry_within_the_interval_returns_the_same_pair(brokers: BrokerFactory) -> None:
    b = await brokers.start({"deploy": PER_JOB})
    first = await _create(b)
    status, second = await _refresh(b, first["refresh_token"])
    status, again = await _refresh(b, first["refresh_token"])  # the answer was "lost": the job retries
    assert status == 200 and again == second, "the already-issued pair, no new mint"
    assert len(_events(b, "family_refreshed")) == 1
    status, third = await _refresh(b, second["refresh_token"])
    assert status == 200 and third["generation"] == 3


async def _assert_family_revoked(b: RunningBroker, bodies: list[dict[str, Any]]) -> None:
    for body in bodies:
        assert not token_is_valid(b.vault, body["token"]), f"generation {body['generation']} still valid"
    assert b.metric("broker_token_reuse_detected_total", profile="deploy") == 1
    reuse = _events(b, "reuse_detected")
    assert len(reuse) == 1 and reuse[0]["family"] == bodies[0]["family"]
    assert reuse[0]["owner_identity"] == "cn:job" and reuse[0]["identity"]
    assert _events(b, "family_revoked")[0]["reason"] == "reuse_detected"
    status, body = await _refresh(b, bodies[-1]["refresh_token"])
    assert status == 401 and body["error"] == "refresh_token_invalid", "the family is gone"


async def test_replay_after_the_interval_revokes_the_family(brokers: BrokerFactory) -> None:
    b = await brokers.start({"deploy": {**PER_JOB, "reuse_interval": "1s"}})
    first = await _create(b)
    _, second = await _refresh(b, first["refresh_token"])
    await asyncio.sleep(1.2)
    status, body = await _refresh(b, first["refresh_token"])
    assert status == 401 and body["error"] == "refresh_token_reused"
    assert "whole token family has been revoked" in body["message"]
    await _assert_family_revoked(b, [first, second])


async def test_replay_of_an_older_generation_revokes_the_family(brokers: BrokerFactory) -> None:
    b = await brokers.start({"deploy": PER_JOB})
    first = await _create(b)
    _, second = await _refresh(b, first["refresh_token"])
    _, third = await _refresh(b, second["refresh_token"])
    status, body = await _refresh(b, first["refresh_token"])  # two generations back: never a retry
    assert status == 401 and body["error"] == "refresh_token_reused"
    await _assert_family_revoked(b, [first, second, third])


async def test_live_refresh_token_from_another_certificate_revokes_the_family(brokers: BrokerFactory) -> None:
    b = await brokers.start({"deploy": PER_JOB})
    first = await _create(b)
    status, body = await _refresh(b, first["refresh_token"], cert="job-other")
    assert status == 401 and body["error"] == "refresh_token_reused"
    await _assert_family_revoked(b, [first])
    reuse = _events(b, "reuse_detected")[0]
    assert reuse["identity"] == "cn:job-other" and reuse["same_certificate"] is False


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
    # None of that touched the family: a forged secret with a known family id revokes nothing.
    assert token_is_valid(b.vault, first["token"])
    status, second = await _refresh(b, first["refresh_token"])
    assert status == 200 and second["generation"] == 2


async def test_release_revokes_the_family_only_for_its_own_certificate(brokers: BrokerFactory) -> None:
    b = await brokers.start({"deploy": PER_JOB})
    first = await _create(b)
    _, second = await _refresh(b, first["refresh_token"])
    status, body, _ = await b.request("DELETE", f"/v1/families/{first['family']}", cert="job-other")
    assert status == 404 and body["error"] == "not_found"
    status, body, _ = await b.request("DELETE", "/v1/families/fam_unknown")
    assert status == 404 and body["error"] == "not_found"
    assert token_is_valid(b.vault, second["token"])
    status, body, _ = await b.request("DELETE", f"/v1/families/{first['family']}")
    assert status == 200 and body == {"family": first["family"], "profile": "deploy", "revoked": True}
    assert not token_is_valid(b.vault, first["token"]) and not token_is_valid(b.vault, second["token"])
    assert _events(b, "family_revoked")[0]["reason"] == "released"
    status, body = await _refresh(b, second["refresh_token"])
    assert status == 401 and body["error"] == "refresh_token_invalid"


async def test_families_end_at_their_maximum_age(brokers: BrokerFactory) -> None:
    b = await brokers.start({"deploy": {**PER_JOB, "family_max_age": "3s"}})
    first = await _create(b)
    assert first["expires_at"] <= first["refresh_expires_at"], "a token never outlives its family"
    await b.wait_for(lambda: bool(_events(b, "family_revoked")), timeout=8, what="the family to expire")
    assert _events(b, "family_revoked")[0]["reason"] == "expired"
    assert not token_is_valid(b.vault, first["token"])
    status, body = await _refresh(b, first["refresh_token"])
    assert status == 401 and body["error"] == "refresh_token_invalid"


async def test_restart_keeps_families_and_refuses_spent_tokens(brokers: BrokerFactory) -> None:
    profiles = {"deploy": {**PER_JOB, "reuse_interval": "0s"}}
    b = await brokers.start(profiles)
    first = await _create(b)
    _, second = await _refresh(b, first["refresh_token"])
    await b.shutdown()
    again = await brokers.start(profiles, directory=b.dir, roles=b.roles, auth=b.auth_entries())
    again.seen_secrets |= b.seen_secrets
    status, body = await _refresh(again, first["refresh_token"])  # spent before the restart
    assert status == 401 and body["error"] == "refresh_token_reused"
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
    assert len(_events(b, "family_refreshed")) == 1


async def test_family_requests_while_logged_out_do_not_each_start_a_login(brokers: BrokerFactory,
                                                                           private_openbao) -> None:  # type: ignore[no-untyped-def]
    b = await brokers.start({"deploy": PER_JOB}, vault=private_openbao)
    await _create(b)
    private_openbao.restart_empty()  # the broker's token and its AppRole are gone: logins fail

    def logins() -> float:
        return sum(value for line, value in _samples(b, "broker_vault_requests_total")
                   if 'operation="login_approle"' in line)

    before = logins()
    statuses = [(await b.request("POST", "/v1/tokens/deploy"))[0] for _ in range(15)]
    assert set(statuses) == {503}
    assert logins() - before <= 3, "a burst of job requests did not turn into a burst of logins"


def _samples(b: RunningBroker, name: str) -> list[tuple[str, float]]:
    return [(line, float(line.rsplit(" ", 1)[1])) for line in b.metrics_text().splitlines()
            if line.startswith(name + "{")]
