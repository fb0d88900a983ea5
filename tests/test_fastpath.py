"""The hot route's own protocol (broker/api/fastpath.py) over real mTLS sockets: keep-alive,
pipelining, hand-over to aiohttp mid-connection, slow readers, idle timeout and shutdown.
Requests are written by hand so that what reaches the broker is exactly what the test says."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import ssl
import threading
import time

import pytest

from broker.api import fastpath
from broker.service import TLSSockSite
from tests.conftest import BrokerFactory, RunningBroker, assert_still_serving

FETCH = b"GET /v1/tokens/demo HTTP/1.1\r\nHost: localhost\r\n\r\n"
PLAIN = b"GET /v1/tokens/demo HTTP/1.1\r\nHost: localhost\r\nAccept: text/plain\r\n\r\n"
WHOAMI = b"GET /v1/whoami HTTP/1.1\r\nHost: localhost\r\n\r\n"


class Conn:
    """One keep-alive mTLS connection that reads HTTP/1.1 answers by Content-Length. Every
    answer goes to the broker's leak scan (a non-200 body is scanned, a served token is looked for)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, b: RunningBroker) -> None:
        self.reader, self.writer, self.b = reader, writer, b

    @classmethod
    async def open(cls, b: RunningBroker, cert: str = "job") -> Conn:
        reader, writer = await asyncio.open_connection("127.0.0.1", b.broker.api_port, limit=2**20,
                                                       ssl=b.pki.client_context(cert), server_hostname="localhost")
        return cls(reader, writer, b)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self) -> tuple[int, dict[str, str], bytes]:
        """The next final answer (an interim 100 Continue is skipped)."""
        lines = ["HTTP/1.1 100"]
        while lines[0].split()[1].startswith("1"):
            head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
            lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        body = await self.reader.readexactly(int(headers["content-length"]))
        status = int(lines[0].split()[1])
        self.b.record_answer(status, body.decode("utf-8", "replace"))
        return status, headers, body

    async def closed_by_server(self, within: float) -> bool:
        try:
            return await asyncio.wait_for(self.reader.read(1), within) == b""
        except (asyncio.TimeoutError, ConnectionError):
            return False

    def close(self) -> None:
        self.writer.close()


def served(b: RunningBroker) -> int:
    return sum(1 for e in b.audit_events() if e["event"] == "token_served")


async def test_one_connection_serves_fetches_then_other_routes_then_fetches_again(brokers: BrokerFactory) -> None:
    b = await brokers.start()
    conn = await Conn.open(b)
    for _ in range(3):
        await conn.send(FETCH)
        status, headers, body = await conn.answer()
        assert status == 200 and json.loads(body)["profile"] == "demo"
        assert headers["cache-control"] == "no-store" and "connection" not in headers
    await conn.send(WHOAMI)  # not the hot route: aiohttp's handler takes the connection over
    status, _, body = await conn.answer()
    assert status == 200 and json.loads(body)["identities"][0] == "cn:job"
    await conn.send(FETCH)
    status, _, body = await conn.answer()
    assert status == 200 and json.loads(body)["token"]
    conn.close()
    assert served(b) == 4
    assert b.metric("broker_token_requests_total", profile="demo", outcome="served") == 4
    assert b.metric("broker_request_duration_seconds_count", route="/v1/tokens/{profile}") == 4
    b.seen_secrets.add(json.loads(body)["token"])


def vault_requests(b: RunningBroker) -> float:
    return sum(sample.value for metric in b.broker.metrics.registry.collect()
               if metric.name == "broker_vault_requests" for sample in metric.samples
               if sample.name == "broker_vault_requests_total")


async def test_shared_fetches_touch_no_vault(brokers: BrokerFactory) -> None:
    b = await brokers.start({"demo": {"ttl": "1h", "grace": "10m", "rotate_after": "40m"}},
                            server_extra="rate_limit = 0")
    before = vault_requests(b)
    assert before > 0  # the first mint and its verification were counted
    conn = await Conn.open(b)
    for _ in range(300):
        await conn.send(FETCH)
        assert (await conn.answer())[0] == 200
    conn.close()
    assert vault_requests(b) == before
    assert served(b) == 300


async def test_pipelined_requests_are_answered_in_order_across_the_hand_over(brokers: BrokerFactory) -> None:
    b = await brokers.start()
    conn = await Conn.open(b)
    await conn.send(FETCH + PLAIN + WHOAMI + FETCH)
    answers = [await conn.answer() for _ in range(4)]
    assert [a[0] for a in answers] == [200, 200, 200, 200]
    token = json.loads(answers[0][2])["token"]
    b.seen_secrets.add(token)
    assert answers[1][1]["content-type"] == "text/plain; charset=utf-8" and answers[1][2].decode() == token
    assert "identities" in json.loads(answers[2][2])
    assert json.loads(answers[3][2])["token"] == token
    conn.close()
    assert served(b) == 3


def _records_in_one_send(b: RunningBroker, requests: list[bytes]) -> bytes:
    """Each request in its own TLS record, all records in one send(); what came back."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = b.pki.client_context("job").wrap_bio(incoming, outgoing, server_hostname="localhost")
    with socket.create_connection(("127.0.0.1", b.broker.api_port), timeout=10) as sock:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                incoming.write(sock.recv(65536))
        sock.sendall(outgoing.read())
        for request in requests:
            tls.write(request)
        sock.sendall(outgoing.read())
        answers = b""
        while answers.count(b"HTTP/1.1 200") < len(requests):
            try:
                answers += tls.read(65536)
            except ssl.SSLWantReadError:
                data = sock.recv(65536)
                assert data, f"connection closed after {answers.count(b'HTTP/1.1 ')} answers"
                incoming.write(data)
        return answers


async def test_records_arriving_together_are_all_answered(brokers: BrokerFactory) -> None:
    """The TLS engine stops reading when OpenSSL holds nothing more; four records in one
    segment must still give four answers, not one and a wait for more bytes."""
    b = await brokers.start()
    answers = await asyncio.to_thread(_records_in_one_send, b, [FETCH, PLAIN, FETCH, PLAIN])
    assert answers.count(b"HTTP/1.1 200 OK\r\n") == 4
    b.seen_secrets.update(json.loads(body)["token"] for body in re.findall(rb'\{"profile".*?\}', answers))
    assert served(b) == 4


async def test_hot_route_and_full_handler_answer_alike(brokers: BrokerFactory) -> None:
    """The same fetch, once on the fast path and once (a query sends it to aiohttp) on the full one."""
    b = await brokers.start()
    conn = await Conn.open(b)
    for accept in (b"application/json", b"text/plain"):
        hot, full = (b"GET /v1/tokens/demo" + query + b" HTTP/1.1\r\nHost: localhost\r\nAccept: " + accept + b"\r\n\r\n"
                     for query in (b"", b"?min_ttl=1"))
        await conn.send(hot)
        fast_answer = await conn.answer()
        other = await Conn.open(b)
        await other.send(full)
        full_answer = await other.answer()
        other.close()
        assert fast_answer[0] == full_answer[0] == 200
        assert fast_answer[1].keys() == full_answer[1].keys()
        for name in ("content-type", "cache-control"):
            assert fast_answer[1][name] == full_answer[1][name]
        if accept == b"text/plain":
            assert fast_answer[2] == full_answer[2]
            b.seen_secrets.add(fast_answer[2].decode())
        else:
            assert json.loads(fast_answer[2]).keys() == json.loads(full_answer[2]).keys()
    conn.close()


async def test_a_head_is_parsed_once_and_still_authorized_per_connection(
        brokers: BrokerFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Byte-identical heads are parsed by aiohttp once (HotRoute remembers the result); who may
    fetch is still decided for each connection's certificate. Long heads are not remembered."""
    parsed: list[int] = []
    parse = fastpath.parse_hot_head
    monkeypatch.setattr(fastpath, "parse_hot_head", lambda head: parsed.append(len(head)) or parse(head))
    b = await brokers.start()
    long_fetch = FETCH[:-2] + b"X-Padding: " + b"p" * 3000 + b"\r\n\r\n"
    for cert, request, status in (("job", FETCH, 200), ("job", FETCH, 200), ("stranger", FETCH, 403),
                                  ("job", long_fetch, 200), ("job", long_fetch, 200)):
        conn = await Conn.open(b, cert)
        await conn.send(request)
        answer = await conn.answer()
        assert answer[0] == status, (cert, answer)
        if status == 200:
            b.seen_secrets.add(json.loads(answer[2])["token"])
        conn.close()
    assert parsed.count(len(FETCH)) == 1
    assert parsed.count(len(long_fetch)) == 2
    assert served(b) == 4


async def test_a_head_split_across_records_is_waited_for(brokers: BrokerFactory) -> None:
    b = await brokers.start()
    conn = await Conn.open(b)
    for piece in (FETCH[:5], FETCH[5:20], FETCH[20:-2]):
        await conn.send(piece)
        await asyncio.sleep(0.05)
    await conn.send(FETCH[-2:])
    status, _, body = await conn.answer()
    assert status == 200
    b.seen_secrets.add(json.loads(body)["token"])
    conn.close()


@pytest.mark.parametrize("request_bytes", [
    pytest.param(b"GET /v1/tokens/demo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4\r\n\r\nabcd", id="body"),
    pytest.param(b"GET /v1/tokens/demo HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"2\r\nab\r\n0\r\n\r\n", id="chunked"),
    pytest.param(b"GET /v1/tokens/demo HTTP/1.0\r\nHost: localhost\r\n\r\n", id="http-1.0"),
    pytest.param(b"GET /v1/tokens/demo HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\n\r\n", id="expect"),
    pytest.param(b"GET /v1/tokens/de%6do HTTP/1.1\r\nHost: localhost\r\n\r\n", id="percent-encoded"),
])
async def test_unusual_fetches_are_answered_by_the_full_handler(brokers: BrokerFactory, request_bytes: bytes) -> None:
    b = await brokers.start()
    conn = await Conn.open(b)
    await conn.send(request_bytes)
    status, headers, body = await conn.answer()
    assert status == 200 and headers["cache-control"] == "no-store"
    b.seen_secrets.add(json.loads(body)["token"])
    conn.close()
    assert served(b) == 1
    assert (await b.get_token())["profile"] == "demo"


async def test_a_denied_fetch_is_audited_and_counted_once(brokers: BrokerFactory) -> None:
    b = await brokers.start()
    conn = await Conn.open(b)
    await conn.send(b"GET /v1/tokens/nope HTTP/1.1\r\nHost: localhost\r\n\r\n")
    status, headers, body = await conn.answer()
    assert status == 403 and headers["content-type"].startswith("application/json")
    assert headers["cache-control"] == "no-store"
    error = json.loads(body)
    assert set(error) == {"error", "message"} and error["error"] == "forbidden"
    assert "may not fetch" in error["message"]
    await conn.send(FETCH)  # the same connection still serves
    status, _, body = await conn.answer()
    assert status == 200 and json.loads(body)["profile"] == "demo"
    conn.close()
    assert [e["event"] for e in b.audit_events()].count("token_denied") == 1
    assert b.metric("broker_token_requests_total", profile="_unknown", outcome="forbidden") == 1
    await assert_still_serving(b)


async def test_a_client_that_does_not_read_gets_every_answer_once_it_does(brokers: BrokerFactory) -> None:
    b = await brokers.start(server_extra="rate_limit = 0")
    conn = await Conn.open(b)
    count = 3000  # ~1.3 MB of answers: well past the transport's write buffer limit
    await conn.send(FETCH * count)
    await asyncio.sleep(0.5)
    statuses = [(await conn.answer())[0] for _ in range(count)]
    assert statuses == [200] * count
    await conn.send(WHOAMI)
    assert (await conn.answer())[0] == 200
    conn.close()
    await b.wait_for(lambda: served(b) == count, what="every fetch audited")


async def test_a_client_that_never_reads_is_not_read_from_either(brokers: BrokerFactory) -> None:
    """Flow control: once its answers back up, the broker stops reading that connection, so a
    client pipelining without reading fills its own send buffer, not the broker's memory."""
    b = await brokers.start(server_extra="rate_limit = 0")

    def flood() -> str:
        with socket.create_connection(("127.0.0.1", b.broker.api_port), timeout=5) as raw:
            with b.pki.client_context("job").wrap_socket(raw, server_hostname="localhost") as tls:
                tls.settimeout(3)
                try:
                    tls.sendall(FETCH * 400_000)  # ~18 MB of requests, never reading an answer
                except (TimeoutError, socket.timeout):
                    return "send blocked"
                return "all sent"

    assert await asyncio.to_thread(flood) == "send blocked"
    assert (await b.get_token())["profile"] == "demo"


async def test_answers_held_for_one_write_still_meet_flow_control(brokers: BrokerFactory) -> None:
    """The TLS engine holds the answers to one read back to leave in one write, but only up to
    16 KiB: a read of thousands of pipelined fetches must not put megabytes of answers in the
    broker's write buffer before flow control can stop it."""
    b = await brokers.start(server_extra="rate_limit = 0")
    sent = threading.Event()

    def flood() -> None:
        with socket.create_connection(("127.0.0.1", b.broker.api_port), timeout=5) as raw:
            with b.pki.client_context("job").wrap_socket(raw, server_hostname="localhost") as tls:
                tls.settimeout(3)
                with contextlib.suppress(TimeoutError, socket.timeout):
                    tls.sendall(FETCH * 400_000)
                sent.set()
                time.sleep(1)  # keep the connection open while the broker's side is looked at

    flooding = asyncio.create_task(asyncio.to_thread(flood))
    await asyncio.to_thread(sent.wait, 30)
    [site] = [s for runner in b.broker._runners for s in runner.sites if isinstance(s, TLSSockSite)]
    assert site._connections is not None
    buffered = [c._transport.get_write_buffer_size() for c in site._connections.open if c._transport]
    assert buffered and max(buffered) < 128 * 1024, buffered
    await flooding


async def test_an_idle_connection_is_closed_after_the_keepalive_timeout(
        brokers: BrokerFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fastpath, "KEEPALIVE_TIMEOUT", 0.4)
    b = await brokers.start()
    silent = await Conn.open(b)  # never sends a request
    used = await Conn.open(b)
    await used.send(FETCH)
    b.seen_secrets.add(json.loads((await used.answer())[2])["token"])
    assert await silent.closed_by_server(within=3)
    assert await used.closed_by_server(within=3)
    busy = await Conn.open(b)
    for _ in range(6):  # active for longer than the timeout: stays open
        await busy.send(FETCH)
        assert (await busy.answer())[0] == 200
        await asyncio.sleep(0.1)
    busy.close()


async def test_shutdown_closes_idle_keepalive_connections_at_once(
        brokers: BrokerFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fastpath, "KEEPALIVE_TIMEOUT", 3600.0)  # only the shutdown can close it here
    b = await brokers.start()
    conn = await Conn.open(b)
    await conn.send(FETCH)
    assert (await conn.answer())[0] == 200
    stopping = asyncio.create_task(b.shutdown())  # bounded by its own wait_for
    assert await conn.closed_by_server(within=10), "the idle keep-alive connection was closed by the shutdown"
    await stopping
    assert b.task.done() and b.task.exception() is None


@pytest.mark.parametrize("request_bytes", [
    pytest.param(b"GET /v1/tokens/demo HTTP/1.1\nHost: localhost\n\n", id="lf-only"),
    pytest.param(b"GET /v1/tokens/demo HTTP/1.1\r\nHost: localhost\n\n", id="lf-after-crlf"),
])
async def test_a_head_with_bare_lf_is_handed_over_at_once(brokers: BrokerFactory, request_bytes: bytes) -> None:
    """It never ends in CRLFCRLF, so waiting for one would hold the connection until the
    keep-alive timeout; aiohttp's handler answers it the moment it arrives."""
    b = await brokers.start()
    conn = await Conn.open(b)
    await conn.send(request_bytes)
    status, headers, body = await conn.answer()  # Conn.answer waits 10 s at most, not 75
    assert status == 400 and headers["content-type"].startswith("application/json")
    assert headers["cache-control"] == "no-store"
    error = json.loads(body)
    assert set(error) == {"error", "message"} and error["error"] == "bad_request"
    assert error["message"].startswith("malformed HTTP request"), error
    assert served(b) == 0
    conn.close()
    await assert_still_serving(b)
