"""Vault calls run on worker threads (hvac blocks). A burst of per-job family starts must not
starve the broker's own work (shared-profile rotations and checks, its login, revocations), and
time spent waiting for a free worker must not count against a call's timeout."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import CollectorRegistry

from broker.devserver import OpenBaoDevServer
from broker.errors import VaultUnavailable
from broker.metrics import Metrics
from broker.vault.client import VaultClient, VaultClientConfig
from tests.conftest import BrokerFactory, LogLines, root_client
from tests.faults import TcpProxy

PER_JOB = {"mode": "per-job", "ttl": "60s", "grace": "3s", "allow": ["cn:job"]}
BURST = 16  # family starts at once: 32 Vault calls of about a second each


async def test_a_burst_of_family_starts_neither_fails_nor_starves_shared_rotation(
        brokers: BrokerFactory, proxy: TcpProxy, log_lines: LogLines) -> None:
    # Every call through the proxy takes about a second (the delay applies to the request and
    # again to the answer): well under the per-call bound of 2 * 2 s + 1 s, but 32 of them
    # queued on a handful of threads take much longer than that.
    b = await brokers.start({"demo": {"check_interval": "1s"}, "deploy": PER_JOB}, vault_address=proxy.address,
                            vault_timeout="2s")
    seen = len(log_lines)
    proxy.delay = 0.5

    async def start_family() -> tuple[int, float]:
        began = time.monotonic()
        status, body, _ = await b.request("POST", "/v1/tokens/deploy")
        if status == 200:
            b.seen_secrets.add(body["refresh_token"])
        return status, time.monotonic() - began

    starts = [asyncio.create_task(start_family()) for _ in range(BURST)]
    await proxy.request_seen("/v1/auth/token/create").wait()  # the burst is on its way to Vault
    began = time.monotonic()
    status, body, _ = await b.request("POST", "/v1/tokens/demo/rotate", cert="ops")
    rotate_took = time.monotonic() - began
    results = await asyncio.gather(*starts)
    proxy.delay = 0

    # The shared profile's rotation does not queue behind the per-job burst.
    assert status == 200 and body["generation"] == 2, (status, body)
    assert rotate_took < 4.5, f"the rotation waited {rotate_took:.1f}s behind per-job calls"
    # Waiting for a worker is not Vault being slow: every family start succeeds.
    assert [s for s, _ in results] == [200] * BURST, results
    assert max(t for _, t in results) > 5, "the burst did queue (longer than one call's bound)"
    problems = [line for line in log_lines[seen:] if "check_failed" in line or "rotation_failed" in line]
    assert not problems, problems
    assert b.metric("broker_vault_requests_total", operation="create_token", outcome="unavailable") is None


def _client(address: str, **settings: float) -> tuple[VaultClient, Metrics]:
    metrics = Metrics(CollectorRegistry())
    vault = VaultClient(VaultClientConfig(address=address, **settings), metrics)  # type: ignore[arg-type]
    vault.use_token("root")
    return vault, metrics


async def test_time_waiting_for_a_worker_is_not_part_of_a_calls_timeout(
        openbao: OpenBaoDevServer, proxy: TcpProxy) -> None:
    accessor = root_client(openbao).auth.token.create(ttl="5m")["auth"]["accessor"]
    # One worker; each call takes 0.5 to 0.75 s (the delay applies to the request and again to
    # the answer), within its bound of 2 * 1 s + 1 s; the eighth waits at least 3.5 s for the
    # worker first.
    vault, metrics = _client(proxy.address, timeout=1.0, workers=1)
    proxy.delay = 0.25
    try:
        began = time.monotonic()
        answers = await asyncio.gather(*(vault.lookup_accessor(accessor) for _ in range(8)))
        took = time.monotonic() - began
    finally:
        proxy.delay = 0
        vault.close()
    assert len(answers) == 8 and all(a.ttl > 0 for a in answers)
    assert took > 3.5, "the calls did take turns on the one worker"
    # The duration histogram measures time at Vault, not time in the queue: the four together
    # took about as long as the calls ran one after another.
    count = metrics.registry.get_sample_value("broker_vault_request_duration_seconds_count",
                                              {"operation": "lookup_accessor"})
    total = metrics.registry.get_sample_value("broker_vault_request_duration_seconds_sum",
                                              {"operation": "lookup_accessor"})
    assert count == 8 and total is not None and total < took + 0.2, (total, took)


async def test_a_call_that_never_gets_a_worker_fails_after_the_queue_bound(
        openbao: OpenBaoDevServer, proxy: TcpProxy) -> None:
    accessor = root_client(openbao).auth.token.create(ttl="5m")["auth"]["accessor"]
    vault, metrics = _client(proxy.address, timeout=2.0, workers=1, queue_timeout=0.5)
    proxy.hold()  # the first call holds the only worker until its HTTP timeout
    try:
        first = asyncio.ensure_future(vault.lookup_accessor(accessor))
        await proxy.request_seen("/v1/auth/token/lookup-accessor").wait()
        began = time.monotonic()
        with pytest.raises(VaultUnavailable) as caught:
            await vault.lookup_accessor(accessor)
        waited = time.monotonic() - began
        proxy.release()
        await first
    finally:
        proxy.release()
        vault.close()
    assert 0.4 < waited < 1.5, waited
    assert str(caught.value) == ("vault lookup_accessor: no free Vault worker within 0.5s "
                                 "(every worker is busy with slower calls)")
    assert metrics.registry.get_sample_value("broker_vault_requests_total",
                                             {"operation": "lookup_accessor", "outcome": "unavailable"}) == 1
    assert metrics.registry.get_sample_value("broker_vault_request_duration_seconds_count",
                                             {"operation": "lookup_accessor"}) == 1, "no Vault time to measure"
