"""Requests a certificate holder can send to hurt the broker rather than to get a token: bodies
that never finish, JSON nested to the recursion limit, odd Expect headers, clients that vanish
mid-request, HTTP versions the API does not speak, and malformed HTTP to the ops listener.
Each gets an exact JSON error (or none, if the client is gone), and the broker keeps serving.

One broker serves the module, with a short body-read bound (``ApiDeps.body_read_timeout``) so
that no test waits the real 10 s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from broker import service
from broker.api import app as api_app
from broker.devserver import OpenBaoDevServer
from tests.conftest import (BrokerFactory, Pki, RunningBroker, assert_error, assert_still_serving,
                            raw)
from tests.test_fastpath import Conn

pytestmark = pytest.mark.asyncio(loop_scope="module")

BODY_READ_TIMEOUT = 1.0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def b(tmp_path_factory: pytest.TempPathFactory, pki: Pki, openbao: OpenBaoDevServer,
            log_lines: list[str]) -> AsyncIterator[RunningBroker]:
    factory = BrokerFactory(tmp_path_factory.mktemp("hostile"), pki, openbao, log_lines)
    make_app = api_app.make_app
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(service, "make_app", lambda deps: make_app(
            dataclasses.replace(deps, body_read_timeout=BODY_READ_TIMEOUT)))
        running = await factory.start({"demo": {}})
    try:
        yield running
    finally:
        await factory.close()


def _answer(data: bytes) -> tuple[int, dict[str, str], dict[str, Any]]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body)


def assert_raw_error(b: RunningBroker, data: bytes, status: int, code: str, *needles: str) -> dict[str, Any]:
    """``assert_error`` for an answer read off a socket by hand (it joins the leak scan)."""
    b.record_answer(0, data.decode("latin-1"))
    got, headers, body = _answer(data)
    assert got == status, data
    assert headers["content-type"].startswith("application/json") and headers["cache-control"] == "no-store"
    assert set(body) == {"error", "message"} and body["error"] == code, body
    for needle in needles:
        assert needle in body["message"], body
    return body


REFRESH_HEAD = (b"POST /v1/refresh HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n")


# --- 1. a body that never finishes arriving -------------------------------------------------

async def _read_to_eof(conn: Conn) -> bytes:
    """Everything until the broker closes; it closes right after the 408, well within 5 s (left
    to aiohttp's lingering close it took 10 s more)."""
    return await asyncio.wait_for(conn.reader.read(), 5)


async def test_a_body_that_stops_arriving_is_408_and_the_connection_closed(b: RunningBroker) -> None:
    conn = await Conn.open(b)
    await conn.send(REFRESH_HEAD + b"{")
    data = await _read_to_eof(conn)  # EOF: the broker closed the connection after answering
    assert_raw_error(b, data, 408, "request_timeout", "request body did not arrive within 1s")
    conn.close()
    await assert_still_serving(b)


async def test_a_body_dripped_a_byte_at_a_time_is_still_bounded_as_a_whole(b: RunningBroker) -> None:
    """Each byte arrives well within the bound: only a bound on the whole body stops this."""
    conn = await Conn.open(b)
    await conn.send(REFRESH_HEAD)

    async def drip() -> None:
        for _ in range(99):  # never the 100th byte
            await conn.send(b" ")
            await asyncio.sleep(BODY_READ_TIMEOUT / 4)

    dripping = asyncio.create_task(drip())
    try:
        data = await _read_to_eof(conn)
    finally:
        dripping.cancel()
        await asyncio.gather(dripping, return_exceptions=True)
    assert_raw_error(b, data, 408, "request_timeout", "request body did not arrive within 1s")
    conn.close()
    await assert_still_serving(b)


# --- 2. JSON nested past the recursion limit -----------------------------------------------

@pytest.mark.parametrize("body", [b"[" * 30000 + b"]" * 30000, b'{"a":' * 10000 + b"1" + b"}" * 10000])
async def test_deeply_nested_json_is_400_not_500(b: RunningBroker, body: bytes) -> None:
    answer = await raw(b, "POST", "/v1/refresh", data=body, headers={"Content-Type": "application/json"})
    assert_error(answer, 400, "bad_request", "nested too deeply", "refresh_token")
    await assert_still_serving(b)


# --- 3. Expect headers ---------------------------------------------------------------------

@pytest.mark.parametrize(("method", "path"), [("POST", "/v1/refresh"), ("POST", "/v1/tokens/demo/rotate"),
                                              ("GET", "/v1/whoami"), ("GET", "/v1/tokens/demo"),
                                              ("GET", "/v1/no-such-route"), ("PUT", "/v1/whoami")])
async def test_an_unknown_expectation_is_a_json_417_that_echoes_nothing(b: RunningBroker, method: str,
                                                                        path: str) -> None:
    answer = await raw(b, method, path, headers={"Expect": "<script>FAKESECRET</script>"})
    assert_error(answer, 417, "expectation_failed", "only Expect header", "100-continue")
    assert "FAKESECRET" not in answer.text and "script" not in answer.text
    await assert_still_serving(b)


async def test_100_continue_still_works(b: RunningBroker) -> None:
    conn = await Conn.open(b)
    body = b'{"refresh_token": 5}'
    await conn.send(b"POST /v1/refresh HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                    b"Expect: 100-continue\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    interim = await asyncio.wait_for(conn.reader.readuntil(b"\r\n\r\n"), 10)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    await conn.send(body)
    status, _, answer = await conn.answer()
    error = json.loads(answer)  # the body was read: the handler words what is wrong with it
    assert status == 400 and error["error"] == "bad_request" and 'string "refresh_token"' in error["message"]
    conn.close()
    await assert_still_serving(b)


# --- 5. a client that goes away mid-request ------------------------------------------------

async def test_a_client_gone_mid_body_is_a_debug_line_not_an_internal_error(b: RunningBroker,
                                                                           log_lines: list[str]) -> None:
    seen = len(log_lines)
    conn = await Conn.open(b)
    await conn.send(REFRESH_HEAD + b'{"refresh_token": "')
    conn.writer.transport.abort()  # a reset, not a TLS close_notify
    await b.wait_for(lambda: any("client_gone route=/v1/refresh" in line for line in log_lines[seen:]),
                     what="the broker noticing the client is gone")
    assert [line for line in log_lines[seen:] if line.startswith("DEBUG broker.api client_gone")]
    assert not [line for line in log_lines[seen:] if line.startswith("ERROR")], log_lines[seen:]
    await assert_still_serving(b)


# --- 6. malformed HTTP to the ops listener -------------------------------------------------

def _raw_ops(b: RunningBroker, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", b.broker.ops_port), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("request_bytes", [
    pytest.param(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Vault-Token: s.FAKESECRET" + b"x" * 9000 + b"\r\n\r\n",
                 id="oversized-header"),
    pytest.param(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Vault-Token s.FAKESECRET\r\n\r\n", id="header-without-colon"),
    pytest.param(b"FOO /healthz?FAKESECRET HTTP/1.1\r\nHost: x\r\n\r\n", id="unknown-method"),
    pytest.param(b"GET /healthz?FAKESECRET HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n", id="bare-cr"),
])
async def test_malformed_http_to_the_ops_listener_is_json_and_quotes_nothing(
        b: RunningBroker, log_lines: list[str], request_bytes: bytes) -> None:
    seen = len(log_lines)
    data = await asyncio.to_thread(_raw_ops, b, request_bytes)
    body = assert_raw_error(b, data, 400, "bad_request", "malformed HTTP request")
    assert "FAKESECRET" not in data.decode("latin-1"), body
    assert not [line for line in log_lines[seen:] if "FAKESECRET" in line], "the request's bytes were logged"
    assert not [line for line in log_lines[seen:] if line.startswith("ERROR")], log_lines[seen:]
    assert (await b.ops("/healthz"))[0] == 200
    await assert_still_serving(b)


@pytest.mark.parametrize("head", [b"GET /healthz", b"GET /no-such-route", b"DELETE /metrics"])
async def test_an_unknown_expect_to_the_ops_listener_is_json_and_quotes_nothing(b: RunningBroker, head: bytes) -> None:
    data = await asyncio.to_thread(
        _raw_ops, b, head + b" HTTP/1.1\r\nHost: x\r\nExpect: FAKESECRET-please\r\n\r\n")
    assert_raw_error(b, data, 417, "expectation_failed", "only Expect header", "100-continue")
    assert "FAKESECRET" not in data.decode("latin-1")
    assert (await b.ops("/healthz"))[0] == 200
    await assert_still_serving(b)


@pytest.mark.parametrize("head, status, code, needles", [
    (b"GET /no-such-route?FAKESECRET", 404, "not_found", ["no such endpoint", "GET /healthz, GET /readyz, GET /metrics"]),
    (b"GET /FAKESECRET", 404, "not_found", ["no such endpoint"]),
    (b"POST /metrics", 405, "method_not_allowed", ["method POST not allowed here; use GET"]),
    (b"DELETE /readyz", 405, "method_not_allowed", ["method DELETE not allowed here; use GET"]),
])
async def test_unknown_routes_and_methods_on_the_ops_listener_are_json(
        b: RunningBroker, head: bytes, status: int, code: str, needles: list[str]) -> None:
    data = await asyncio.to_thread(_raw_ops, b, head + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert_raw_error(b, data, status, code, *needles)
    assert "FAKESECRET" not in data.decode("latin-1")
    if status == 405:
        assert b"\r\nAllow: GET" in data
    assert (await b.ops("/healthz"))[0] == 200
    await assert_still_serving(b)


# --- 8. HTTP versions other than 1.0 and 1.1 -----------------------------------------------

@pytest.mark.parametrize("request_bytes", [
    pytest.param(b"GET /healthz HTTP/2.0\r\nHost: x\r\n\r\n", id="http-2.0"),
    pytest.param(b"GET /healthz\r\n\r\n", id="http-0.9"),
])
async def test_the_ops_listener_serves_http_1x_only(b: RunningBroker, request_bytes: bytes) -> None:
    data = await asyncio.to_thread(_raw_ops, b, request_bytes)
    assert_raw_error(b, data, 400, "bad_request", "only HTTP/1.0 and HTTP/1.1")
    assert (await b.ops("/healthz"))[0] == 200
    await assert_still_serving(b)
