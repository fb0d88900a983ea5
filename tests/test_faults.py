"""Vault unreachable, a rolled-back rotation, and a restart with pending revocations."""

from __future__ import annotations

import asyncio
import stat

import pytest

from broker.devserver import broker_policy
from broker.tokens.store import StateStore
from tests.conftest import BrokerFactory, token_is_valid
from tests.faults import TcpProxy


async def test_vault_unreachable_serves_cached_token_reports_and_recovers(brokers: BrokerFactory,
                                                                         proxy: TcpProxy) -> None:
    b = await brokers.start(
        {"demo": {"ttl": "40s", "rotate_after": "4s", "grace": "2s", "check_interval": "1s", "alert_threshold": 2}},
        vault_address=proxy.address,
    )
    first = await b.get_token()
    proxy.cut()
    state = lambda: b.broker.cache.get("demo")  # noqa: E731
    await b.wait_for(lambda: state().unhealthy, timeout=10, what="the profile to turn unhealthy")

    # Still served: the cached token is valid for a long while yet.
    assert (await b.get_token())["token"] == first["token"]
    status, ready = await b.ops("/readyz")
    assert status == 503 and ready["ready"] is False
    assert ready["profiles"]["demo"]["consecutive_failures"] >= 2
    assert "consecutive failures: " in ready["problems"][0]
    assert b.metric("broker_rotation_consecutive_failures", profile="demo") >= 2
    assert 'broker_vault_requests_total{operation="' in b.metrics_text()
    assert any('outcome="unavailable"' in line for line in b.metrics_text().splitlines()
               if line.startswith("broker_vault_requests_total"))
    status, text = await b.ops("/healthz")
    assert status == 200, "alive while not ready"

    await b.wait_for(lambda: (b.metric("broker_rotations_total", profile="demo", outcome="failure") or 0) >= 1,
                     timeout=10, what="a missed rotation while Vault is away")
    assert b.generation() == 1 and (await b.get_token())["token"] == first["token"]
    assert any(e["event"] == "rotation_failed" for e in b.audit_events())

    proxy.heal()
    await b.wait_for(lambda: not state().unhealthy and b.generation() >= 2, timeout=4,
                     what="recovery within check_interval + a few seconds")
    status, ready = await b.ops("/readyz")
    assert status == 200 and ready["ready"] is True
    assert b.metric("broker_rotation_consecutive_failures", profile="demo") == 0
    body = await b.get_token()
    assert body["generation"] >= 2 and token_is_valid(b.vault, body["token"])


async def test_no_valid_token_gives_503_with_retry_after(brokers: BrokerFactory, proxy: TcpProxy) -> None:
    proxy.cut()
    b = await brokers.start({"demo": {"check_interval": "2s"}}, vault_address=proxy.address, wait_ready=False)
    await b.wait_for(lambda: b.broker.cache.get("demo").consecutive_failures >= 1, what="a failed first mint")
    status, body, headers = await b.request("GET", "/v1/tokens/demo")
    assert status == 503
    assert body["error"] == "unavailable" and "no valid token for profile demo" in body["message"]
    assert 1 <= int(headers["Retry-After"]) <= 2
    assert headers["Cache-Control"] == "no-store"
    status, ready = await b.ops("/readyz")
    assert status == 503 and "no valid current token" in ready["problems"][0]
    proxy.heal()
    await b.wait_for(lambda: b.generation() == 1, timeout=5, what="the first token once Vault is back")
    assert (await b.get_token())["generation"] == 1


async def test_a_token_that_fails_verification_is_rolled_back_and_never_served(brokers: BrokerFactory) -> None:
    # This broker may mint but not look tokens up, so every new token fails verification.
    roles = {"demo": "rollback-role"}
    brokers.openbao.bao("write", "auth/token/roles/rollback-role", "allowed_policies=default", "orphan=true")
    no_lookup = broker_policy(["rollback-role"]).replace('path "auth/token/lookup" { capabilities = ["update"] }', "")
    b = await brokers.start({"demo": {"policies": [], "check_interval": "2s", "alert_threshold": 1}},
                            roles=roles, broker_policy=no_lookup, wait_ready=False)
    state = lambda: b.broker.cache.get("demo")  # noqa: E731
    await b.wait_for(lambda: b.metric("broker_rotations_total", profile="demo", outcome="rolled_back") == 1,
                     what="a rolled-back rotation")
    assert state().current is None and state().unhealthy
    rolled = [e for e in b.audit_events() if e["event"] == "rotation_rolled_back"]
    assert rolled and rolled[0]["generation"] == 1 and rolled[0]["outcome"] == "failure"
    revoked = [e for e in b.audit_events() if e["event"] == "token_revoked"]
    assert revoked and revoked[0]["token_fp"] == rolled[0]["token_fp"] and revoked[0]["reason"] == "rolled_back"
    status, body, headers = await b.request("GET", "/v1/tokens/demo")
    assert status == 503 and set(body) == {"error", "message"} and body["error"] == "unavailable"
    assert body["message"].startswith("no valid token for profile demo right now (")
    assert body["message"].endswith("retry later")
    assert int(headers["Retry-After"]) >= 1 and headers["Cache-Control"] == "no-store"
    # Nothing else broke: the API and the ops listener still answer.
    status, whoami, _ = await b.request("GET", "/v1/whoami")
    assert status == 200 and whoami["profiles"] == ["demo"]
    assert (await b.ops("/healthz"))[0] == 200


async def test_restart_performs_pending_revocations(brokers: BrokerFactory) -> None:
    profile = {"demo": {"ttl": "60s", "rotate_after": "40s", "grace": "2s"}}
    b = await brokers.start(profile)
    first = await b.get_token()
    await b.request("POST", "/v1/tokens/demo/rotate", cert="ops")
    second = await b.get_token()
    await b.shutdown()  # previous (gen 1) is due for revocation in 2 s; nobody is running to do it
    assert token_is_valid(b.vault, first["token"])
    assert len(b.broker.store.load_revocations()) == 1
    state = b.broker.config.state.dir
    for name in ("revocations.json", "profiles.json"):  # they name tokens (accessors): owner only
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE(b.audit_path.stat().st_mode) == 0o600
    await asyncio.sleep(2.2)
    assert token_is_valid(b.vault, first["token"]), "nothing revoked while the broker was down"

    again = await brokers.start(profile, directory=b.dir, roles=b.roles, auth=b.auth_entries())
    await again.wait_for(lambda: not token_is_valid(b.vault, first["token"]), timeout=5,
                         what="the overdue revocation after restart")
    # The token served before the restart keeps one grace window, then is revoked too.
    assert token_is_valid(b.vault, second["token"])
    await again.wait_for(lambda: not token_is_valid(b.vault, second["token"]), timeout=5,
                         what="the pre-restart current token to be retired after grace")
    third = await again.get_token()
    assert third["generation"] == 3, "generations continue across a restart"
    await again.wait_for(lambda: again.metric("broker_revocations_pending") == 0, timeout=5,
                         what="the queue to record the revocations")
    again.seen_secrets |= b.seen_secrets


async def test_profiles_that_rotate_together_are_all_recorded_and_retired_after_a_restart(
        brokers: BrokerFactory) -> None:
    # Every profile mints its first token at start, all at once: each must reach profiles.json,
    # or a restart neither retires that token nor continues its generations.
    profiles = {name: {"ttl": "60s", "rotate_after": "40s", "grace": "2s"} for name in ("demo", "other", "third")}
    b = await brokers.start(profiles)
    served = {name: (await b.get_token(name))["token"] for name in profiles}
    assert set(StateStore(b.broker.config.state.dir).load_issued()) == set(profiles)
    await b.shutdown()
    again = await brokers.start(profiles, directory=b.dir, roles=b.roles, auth=b.auth_entries())
    again.seen_secrets |= b.seen_secrets
    assert {name: again.generation(name) for name in profiles} == dict.fromkeys(profiles, 2)
    await again.wait_for(lambda: not any(token_is_valid(b.vault, t) for t in served.values()), timeout=6,
                         what="every pre-restart token retired after its grace")


@pytest.mark.parametrize("now", [{}, {"mode": "per-job"}], ids=["removed", "made-per-job"])
async def test_the_last_token_of_a_shared_profile_gone_from_the_config_is_revoked_at_start(
        brokers: BrokerFactory, log_lines: list[str], now: dict[str, str]) -> None:
    # Nothing else would ever retire it: no rotator serves that name any more.
    before = {"demo": {}, "old": {"ttl": "1h", "grace": "10m", "rotate_after": "40m"}}  # revoked now, not in 10m
    b = await brokers.start(before)
    kept, dropped = (await b.get_token("demo"))["token"], (await b.get_token("old"))["token"]
    await b.shutdown()
    after = {"demo": {}, **({"old": now} if now else {})}
    again = await brokers.start(after, directory=b.dir, roles=b.roles, auth=b.auth_entries())
    again.seen_secrets |= b.seen_secrets
    await again.wait_for(lambda: not token_is_valid(b.vault, dropped), timeout=5,
                         what="the removed profile's last token revoked")
    revoked = [(e["profile"], e["reason"]) for e in again.audit_events() if e["event"] == "token_revoked"]
    assert ("old", "profile_removed") in revoked, revoked
    assert set(StateStore(b.broker.config.state.dir).load_issued()) == {"demo"}
    assert any("profile_removed profile=old generation=1" in line for line in log_lines)
    assert token_is_valid(b.vault, kept), "the profile still configured keeps its grace window"


async def test_fetches_during_an_outage_do_not_call_vault(brokers: BrokerFactory, proxy: TcpProxy) -> None:
    """With no valid token, requests get 503 at once; the rotator's backoff alone paces Vault."""
    proxy.cut()
    b = await brokers.start({"demo": {"check_interval": "5s"}}, vault_address=proxy.address, wait_ready=False)
    await b.wait_for(lambda: b.broker.cache.get("demo").consecutive_failures >= 1, what="a failed first mint")
    creates = lambda: sum(  # noqa: E731
        b.metric("broker_vault_requests_total", operation="create_token", outcome=o) or 0
        for o in ("unavailable", "success"))
    logins = lambda: b.metric("broker_vault_requests_total", operation="login_approle", outcome="unavailable") or 0  # noqa: E731
    before = creates() + logins()
    for _ in range(20):
        status, body, _ = await b.request("GET", "/v1/tokens/demo")
        assert status == 503 and body["error"] == "unavailable"
    assert creates() + logins() - before <= 2, "20 fetches did not turn into 20 Vault calls"
    proxy.heal()


async def test_vault_is_reached_through_the_proxy_named_in_the_environment(
        brokers: BrokerFactory, proxy: TcpProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Vault client reads HTTP(S)_PROXY / NO_PROXY once, at start (requests would re-read
    the whole environment on every call): an address only the proxy can reach still works."""
    for name in ("NO_PROXY", "no_proxy", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy.address)
    b = await brokers.start({"demo": {}}, vault_address="http://vault.invalid:8200",
                            vault_extra="allow_plaintext = true")  # the proxy is a loopback hop
    monkeypatch.delenv("HTTP_PROXY")  # read at start: the broker keeps using the proxy
    assert b.broker.vault._hvac.session.proxies == {"http": proxy.address}
    status, body, _ = await b.request("POST", "/v1/tokens/demo/rotate", cert="ops")  # a Vault call now
    assert status == 200 and body["generation"] == 2
    token = (await b.get_token())["token"]
    assert token_is_valid(brokers.openbao, token)

    monkeypatch.setenv("NO_PROXY", "vault.invalid")
    from broker.vault.client import VaultClient, VaultClientConfig
    direct = VaultClient(VaultClientConfig(address="http://vault.invalid:8200", timeout=1.0), b.broker.metrics)
    assert direct._hvac.session.proxies == {}  # NO_PROXY names it: straight to the address
    direct.close()
