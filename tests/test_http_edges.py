"""Malformed and oversized HTTP that aiohttp rejects before routing still gets a JSON error,
plus the per-identity rate limit."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import pytest

from tests.conftest import BrokerFactory, RunningBroker, assert_still_serving
from tests.fakes import FakeClock
from tests.faults import TcpProxy


def _raw_tls(b: RunningBroker, request: bytes) -> bytes:
    """Send ``request`` as written, read to EOF; a non-200 answer joins the leak scan."""
    ctx = b.pki.client_context("job")
    with socket.create_connection(("127.0.0.1", b.broker.api_port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(request)
            chunks = []
            while chunk := tls.recv(65536):
                chunks.append(chunk)
    answer = b"".join(chunks)
    if not answer.startswith(b"HTTP/1.1 200 "):
        b.error_bodies.append(answer.decode("latin-1"))
    return answer


def _parse(answer: bytes) -> tuple[int, dict[str, str], dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, json.loads(body)


async def _json_400(b: RunningBroker, request_bytes: bytes) -> dict[str, Any]:
    """Send ``request_bytes`` over mTLS; the answer must be a 400 with a JSON no-store body."""
    status, headers, body = _parse(await asyncio.to_thread(_raw_tls, b, request_bytes))
    assert status == 400
    assert headers["content-type"].startswith("application/json") and headers["cache-control"] == "no-store"
    return body


@pytest.mark.parametrize("request_bytes", [
    pytest.param(b"GET /v1/whoami HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
                 id="oversized-header"),
    pytest.param(b"GET /v1/whoami HTTP/1.1\r\nHost: localhost\r\nBad Header\r\n\r\n", id="header-without-colon"),
    pytest.param(b"GET /v1/whoami HTTP/1.1\r\nHost: localhost\r\nX-A: a\rb\r\n\r\n", id="bare-cr-injection"),
    pytest.param(b"GET /v1/" + b"a" * 40000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n", id="request-line-40k"),
    pytest.param(b"GET /v1/whoami HTTP/9.9\r\nHost: localhost\r\n\r\n", id="bad-version"),
])
async def test_malformed_http_gets_a_json_400(brokers: BrokerFactory, request_bytes: bytes) -> None:
    b = await brokers.start()
    body = await _json_400(b, request_bytes)
    assert body["error"] == "bad_request" and body["message"].startswith("malformed HTTP request")
    assert (await b.get_token())["profile"] == "demo"


@pytest.mark.parametrize("request_bytes", [
    pytest.param(b"GET /v1/tokens/demo HTTP/2.0\r\nHost: localhost\r\n\r\n", id="http-2.0"),
    pytest.param(b"GET /v1/tokens/demo\r\n\r\n", id="http-0.9"),
    pytest.param(b"GET /v1/whoami HTTP/2.0\r\nHost: localhost\r\n\r\n", id="http-2.0-other-route"),
])
async def test_only_http_1x_is_served(brokers: BrokerFactory, request_bytes: bytes) -> None:
    """aiohttp's parser reads these request lines without complaint; nothing is served on them."""
    b = await brokers.start()
    body = await _json_400(b, request_bytes)
    assert body == {"error": "bad_request", "message": "only HTTP/1.0 and HTTP/1.1 are served"}
    assert not [e for e in b.audit_events() if e["event"] == "token_served"]
    await assert_still_serving(b)


async def test_header_injection_in_the_profile_name_is_not_reflected(brokers: BrokerFactory) -> None:
    b = await brokers.start()
    status, body, headers = await b.request("GET", "/v1/tokens/demo%0d%0aSet-Cookie:%20x=1")
    assert status == 403 and headers["Cache-Control"] == "no-store"
    assert set(body) == {"error", "message"} and body["error"] == "forbidden"
    assert "may not fetch" in body["message"] and "Set-Cookie" not in body["message"]
    assert "Set-Cookie" not in headers
    await assert_still_serving(b)


async def test_rate_limit_per_client_certificate(brokers: BrokerFactory) -> None:
    """The limiter reads the broker's clock: a fake one here, so however long the real requests
    take, the bucket refills only when the test moves time."""
    clock = FakeClock()
    b = await brokers.start({"demo": {"allow": ["cn:job", "cn:job-other"]}}, clock=clock,
                            server_extra="rate_limit = 1\nrate_limit_burst = 3")

    async def limited(expected_retry_after: str) -> None:
        status, body, headers = await b.request("GET", "/v1/tokens/demo")
        assert status == 429 and set(body) == {"error", "message"} and body["error"] == "rate_limited"
        assert f"too many requests from this client certificate; retry in {expected_retry_after}s" == body["message"]
        assert headers["Retry-After"] == expected_retry_after and headers["Cache-Control"] == "no-store"

    for _ in range(3):
        assert (await b.request("GET", "/v1/tokens/demo"))[0] == 200
    await limited("1")
    assert b.metric("broker_token_requests_total", profile="_any", outcome="rate_limited") == 1
    # Another certificate has its own bucket.
    assert (await b.request("GET", "/v1/tokens/demo", cert="job-other"))[0] == 200
    await clock.advance(0.5)  # half a request refilled: still limited (a refused request spends nothing)
    await limited("1")
    assert b.metric("broker_token_requests_total", profile="_any", outcome="rate_limited") == 2
    await clock.advance(0.5)  # one whole request refilled
    await assert_still_serving(b)
    await limited("1")  # and spent again
    assert b.metric("broker_token_requests_total", profile="_any", outcome="rate_limited") == 3


def test_token_bucket_refills_at_the_rate_and_caps_at_the_burst() -> None:
    from broker.api.ratelimit import RateLimiter, take

    bucket, wait = take(None, now=0.0, rate=2.0, burst=2.0)
    assert wait == 0 and bucket.tokens == 1.0
    bucket, wait = take(bucket, now=0.0, rate=2.0, burst=2.0)
    assert wait == 0 and bucket.tokens == 0.0
    bucket, wait = take(bucket, now=0.25, rate=2.0, burst=2.0)
    assert wait == pytest.approx(0.25)
    bucket, wait = take(bucket, now=100.0, rate=2.0, burst=2.0)
    assert wait == 0 and bucket.tokens == 1.0, "refill caps at the burst"
    limiter = RateLimiter(rate=1.0, burst=1.0)
    assert limiter.check("a", 0.0) == 0 and limiter.check("a", 0.0) > 0 and limiter.check("b", 0.0) == 0


async def test_min_ttl_during_an_outage_says_the_early_rotation_failed_not_that_no_token_exists(
        brokers: BrokerFactory, proxy: TcpProxy) -> None:
    clock = FakeClock()
    b = await brokers.start(clock=clock, vault_address=proxy.address)  # ttl 30s
    first = await b.get_token()
    await clock.advance(5)  # 25 s left
    proxy.cut()
    status, body, headers = await b.request("GET", "/v1/tokens/demo?min_ttl=29")
    assert status == 503 and set(body) == {"error", "message"} and body["error"] == "unavailable", body
    message = body["message"]
    assert message.startswith("no token of profile demo with at least 29s left right now: the early rotation failed (")
    assert message.endswith("the current token has 25s left; retry later or ask for a smaller min_ttl"), message
    assert "no valid token" not in message
    assert int(headers["Retry-After"]) >= 1 and headers["Cache-Control"] == "no-store"
    assert b.metric("broker_token_requests_total", profile="demo", outcome="unavailable") == 1
    assert (await b.get_token())["token"] == first["token"]  # the current token is still served
    await assert_still_serving(b)
