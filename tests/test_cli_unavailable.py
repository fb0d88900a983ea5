"""`broker get` against a broker that has no valid token: bounded retries, then one line, exit 1.

The retry schedule is checked on ``BrokerClient`` with an injected sleep that records the
delays instead of waiting (against the real broker's 503s, and against a port that refuses
connections); one real ``broker get`` run checks the line it prints and its exit code.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
from collections.abc import Iterator

import pytest

from broker.client import MAX_RETRY_AFTER, Answer, BrokerClient, ClientConfig, ClientError
from tests.conftest import BrokerFactory, Pki, RunningBroker, assert_still_serving
from tests.faults import TcpProxy
from tests.test_cli import assert_one_line_error, broker_cli, job_env

UNAVAILABLE = "no valid token for profile demo"


async def _without_token(brokers: BrokerFactory, proxy: TcpProxy) -> RunningBroker:
    proxy.cut()  # Vault unreachable from the start: the broker never gets a token
    b = await brokers.start({"demo": {"check_interval": "1s"}}, vault_address=proxy.address, wait_ready=False)
    await b.wait_for(lambda: b.broker.cache.get("demo").consecutive_failures >= 1, what="a failed first mint")
    return b


async def _recovers(b: RunningBroker, proxy: TcpProxy) -> None:
    proxy.heal()
    await b.wait_for(lambda: b.generation() >= 1, timeout=10, what="a first token once Vault is back")
    await assert_still_serving(b)


def _client(pki: Pki, url: str, retries: int, sleeps: list[float], rng: random.Random | None = None) -> BrokerClient:
    cert, key = pki.pair("job")
    return BrokerClient(ClientConfig(url=url, cert=cert, key=key, ca=pki.ca, retries=retries),
                        sleep=sleeps.append, rng=rng)


class _Edge(random.Random):
    """Full jitter's draws pinned to one end of the range, to read the schedule's bounds."""

    def __init__(self, top: bool) -> None:
        super().__init__(0)
        self.top = top

    def uniform(self, a: float, b: float) -> float:
        return b if self.top else a


def _answers_seen(client: BrokerClient, b: RunningBroker) -> list[Answer]:
    """Every answer ``client`` gets from now on, in order (each one really sent and received;
    also recorded for the leak scan)."""
    answers: list[Answer] = []
    once = client._once

    def spy(*args: object) -> Answer:
        answer = once(*args)  # type: ignore[arg-type]
        answers.append(answer)
        b.record_answer(answer.status, answer.body.decode())
        return answer

    client._once = spy  # type: ignore[method-assign]
    return answers


async def test_client_sleeps_what_retry_after_says_between_503s(brokers: BrokerFactory, proxy: TcpProxy) -> None:
    b = await _without_token(brokers, proxy)
    sleeps: list[float] = []
    client = _client(b.pki, b.url, retries=2, sleeps=sleeps)
    answers = _answers_seen(client, b)
    with pytest.raises(ClientError) as failure:
        await asyncio.to_thread(client.get_token, "demo")
    assert str(failure.value).startswith(f"broker answered 503 unavailable: {UNAVAILABLE}")
    assert failure.value.exit_code == 1
    assert [a.status for a in answers] == [503, 503, 503], "one try and two retries"
    advertised = [a.headers["retry-after"] for a in answers]
    assert all(value.isdigit() and int(value) >= 1 for value in advertised), advertised
    assert sleeps == [float(value) for value in advertised[:2]], "slept what Retry-After said, not after the last"
    assert b.metric("broker_token_requests_total", profile="demo", outcome="unavailable") == 3
    await _recovers(b, proxy)


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A loopback port that is bound (so nobody else gets it) but refuses connections."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.mark.parametrize(("top", "expected"), [(True, [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]), (False, [0.0] * 6)])
def test_client_backs_off_with_capped_full_jitter_when_unreachable(pki: Pki, refusing_port: int, top: bool,
                                                                  expected: list[float]) -> None:
    """Without a Retry-After the delay is drawn from [0, min(8 s, 0.5 s doubling)]: full jitter."""
    sleeps: list[float] = []
    client = _client(pki, f"https://127.0.0.1:{refusing_port}", retries=6, sleeps=sleeps, rng=_Edge(top))
    with pytest.raises(ClientError) as failure:
        client.get_token("demo")
    assert str(failure.value).startswith(f"cannot reach the broker at https://127.0.0.1:{refusing_port} "
                                         "after 7 attempts (ConnectionRefusedError")
    assert sleeps == expected


@pytest.mark.parametrize(("header", "delay"), [("3", 3.0), ("0", 0.0), ("-5", 0.0), ("120", MAX_RETRY_AFTER),
                                               ("soon", 1.0), ("1e999", MAX_RETRY_AFTER)])
def test_retry_after_is_honoured_within_bounds(pki: Pki, header: str, delay: float) -> None:
    """A usable Retry-After is followed (capped at 30 s); one that is not a number falls back
    to the jittered backoff (attempt 2: at most 1 s, pinned to the top here)."""
    client = _client(pki, "https://localhost:8443", retries=3, sleeps=[], rng=_Edge(top=True))
    assert client._backoff(2, header) == delay


async def test_get_without_retries_prints_the_503_in_one_line(brokers: BrokerFactory, proxy: TcpProxy) -> None:
    b = await _without_token(brokers, proxy)
    run = await broker_cli("get", "demo", "--retries", "0", env=job_env(b))
    assert_one_line_error(run, 1, "503", "unavailable", UNAVAILABLE, "retry later")
    assert b.metric("broker_token_requests_total", profile="demo", outcome="unavailable") == 1
    await _recovers(b, proxy)


async def test_client_retries_429_and_sleeps_what_retry_after_says(brokers: BrokerFactory) -> None:
    """A rate of one request per 100 s: the first fetch spends the burst, every later one gets
    429 with Retry-After 100, which the client caps at 30 s (and sleeps on the fake clock)."""
    b = await brokers.start({"demo": {}}, server_extra="rate_limit = 0.01\nrate_limit_burst = 1")
    sleeps: list[float] = []
    client = _client(b.pki, b.url, retries=2, sleeps=sleeps)
    b.record_answer(200, json.dumps(await asyncio.to_thread(client.get_token, "demo")))
    answers = _answers_seen(client, b)
    with pytest.raises(ClientError) as failure:
        await asyncio.to_thread(client.get_token, "demo")
    assert str(failure.value).startswith("broker answered 429 rate_limited: too many requests")
    assert [a.status for a in answers] == [429, 429, 429], "one try and two retries"
    assert [a.headers["retry-after"] for a in answers] == ["100"] * 3
    assert sleeps == [MAX_RETRY_AFTER, MAX_RETRY_AFTER]


async def test_get_without_retries_prints_the_429_in_one_line(brokers: BrokerFactory) -> None:
    b = await brokers.start({"demo": {}}, server_extra="rate_limit = 0.01\nrate_limit_burst = 1")
    first = await broker_cli("get", "demo", env=job_env(b))
    assert first.code == 0, first
    b.seen_secrets.add(first.out.strip())
    run = await broker_cli("get", "demo", "--retries", "0", env=job_env(b))
    assert_one_line_error(run, 1, "429", "rate_limited", "retry in 100s", secrets=b.seen_secrets)
