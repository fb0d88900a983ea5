"""Malformed and oversized HTTP that aiohttp rejects before routing still gets a JSON error,
plus the per-identity rate limit."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from tests.conftest import BrokerFactory, RunningBroker


def _raw_tls(b: RunningBroker, request: bytes) -> bytes:
    ctx = b.pki.client_context("job")
    with socket.create_connection(("127.0.0.1", b.broker.api_port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(request)
            chunks = []
            while chunk := tls.recv(65536):
                chunks.append(chunk)
    return b"".join(chunks)


def _parse(answer: bytes) -> tuple[int, dict[str, str], dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, json.loads(body)


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
    status, headers, body = _parse(await asyncio.to_thread(_raw_tls, b, request_bytes))
    assert status == 400
    assert headers["content-type"].startswith("application/json") and headers["cache-control"] == "no-store"
    assert body["error"] == "bad_request" and body["message"].startswith("malformed HTTP request")
    assert (await b.get_token())["profile"] == "demo"


async def test_header_injection_in_the_profile_name_is_not_reflected(brokers: BrokerFactory) -> None:
    b = await brokers.start()
    status, body, headers = await b.request("GET", "/v1/tokens/demo%0d%0aSet-Cookie:%20x=1")
    assert status == 403 and body["error"] == "forbidden"
    assert "Set-Cookie" not in headers
    assert (await b.get_token())["profile"] == "demo"


async def test_rate_limit_per_client_certificate(brokers: BrokerFactory) -> None:
    b = await brokers.start({"demo": {"allow": ["cn:job", "cn:job-other"]}},
                            server_extra="rate_limit = 1\nrate_limit_burst = 3")
    for _ in range(3):
        assert (await b.request("GET", "/v1/tokens/demo"))[0] == 200
    status, body, headers = await b.request("GET", "/v1/tokens/demo")
    assert status == 429 and body["error"] == "rate_limited"
    assert "too many requests from this client certificate" in body["message"]
    assert headers["Retry-After"] == "1" and headers["Cache-Control"] == "no-store"
    assert b.metric("broker_token_requests_total", profile="_any", outcome="rate_limited") == 1
    # Another certificate has its own bucket.
    assert (await b.request("GET", "/v1/tokens/demo", cert="job-other"))[0] == 200
    await asyncio.sleep(1.05)
    assert (await b.request("GET", "/v1/tokens/demo"))[0] == 200


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
