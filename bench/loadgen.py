"""Load generator for ``bench/run.py``: one process, one event loop, meant to be pinned to one core.

Standalone on purpose (standard library, plus uvloop when installed): it imports nothing from
``broker``, so the same client measures the broker and its peer. It speaks just enough
HTTP/1.1 (Content-Length and chunked bodies) over the stdlib ``ssl`` module to keep its own
cost per fetch low; a general-purpose client such as aiohttp's would saturate the load core
before the server core.

Run by ``bench/run.py`` as ``python loadgen.py SPEC_JSON``; it talks to its parent over
stdin/stdout so the parent can read the server's CPU time exactly around the measured window:

    loadgen -> "READY {json}"      connections are open and warmed up
    parent  -> "GO"                start the measured window
    loadgen -> "DONE"              the window is over and every in-flight fetch has finished
    loadgen -> "RESULT {json}"     summary; then it closes its connections and exits

Modes:

- ``keepalive``: ``connections`` TLS connections, each issuing requests back-to-back (closed
  loop) for ``seconds``; with ``rate`` > 0, paced instead: each connection sends on a fixed
  schedule, and a fetch held back by a late previous response is timed from when it should
  have been sent (so a server stall is not hidden: no coordinated omission).
- ``fresh``: ``connections`` concurrent workers, each doing TCP connect + full TLS 1.3 mTLS
  handshake + one request (``Connection: close``) + close, back-to-back: one CI job = one
  handshake. No session resumption.
- ``idle``: open ``connections`` TLS connections (handshake complete, no request), report
  READY, hold them until GO, then report how many were still open.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import resource
import ssl
import sys
import time
from typing import Any

HEAD_END = b"\r\n\r\n"


class ResponseError(Exception):
    pass


class HttpConn(asyncio.Protocol):
    """One HTTP/1.1 connection: ``request(bytes)`` returns a future of (status, body)."""

    __slots__ = ("loop", "transport", "buf", "waiter", "closed", "want_body")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.closed = False
        self.want_body = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.waiter is not None:
            self._parse()

    def eof_received(self) -> bool | None:
        return None  # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            self.waiter = None
            waiter.set_exception(ConnectionError(f"connection closed before the response ({exc!r})"))

    def request(self, data: bytes) -> asyncio.Future[tuple[int, bytes]]:
        if self.closed or self.transport is None:
            raise ConnectionError("connection is closed")
        self.waiter = self.loop.create_future()
        self.transport.write(data)
        if self.buf:
            self._parse()
        return self.waiter

    def _parse(self) -> None:
        buf = self.buf
        end = buf.find(HEAD_END)
        if end < 0:
            return
        head = bytes(buf[:end]).lower()
        try:
            status = int(head[9:12])
        except ValueError:
            self._fail(ResponseError(f"not an HTTP response: {bytes(buf[:40])!r}"))
            return
        start = end + 4
        i = head.find(b"\r\ncontent-length:")
        if i >= 0:
            j = head.find(b"\r\n", i + 2)
            length = int(head[i + 17:j if j >= 0 else len(head)])
            total = start + length
            if len(buf) < total:
                return
            body = bytes(buf[start:total]) if self.want_body else b""
        elif b"\r\ntransfer-encoding: chunked" in head:
            pos, chunks = start, bytearray()
            while True:
                k = buf.find(b"\r\n", pos)
                if k < 0:
                    return
                size = int(bytes(buf[pos:k]).split(b";")[0], 16)
                if size == 0:
                    t = buf.find(HEAD_END, k)
                    if t < 0:
                        return
                    total = t + 4
                    break
                if len(buf) < k + 2 + size + 2:
                    return
                chunks += buf[k + 2:k + 2 + size]
                pos = k + 2 + size + 2
            body = bytes(chunks)
        else:
            total, body = start, b""
        del buf[:total]
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result((status, body))

    def _fail(self, exc: Exception) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()


def client_context(spec: dict[str, Any]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(spec["ca"])
    ctx.load_cert_chain(spec["cert"], spec["key"])
    return ctx


def build_request(spec: dict[str, Any], close: bool) -> bytes:
    body = spec.get("body", "").encode()
    lines = [f"{spec['method']} {spec['path']} HTTP/1.1", f"Host: {spec['server_name']}:{spec['port']}",
             "User-Agent: broker-bench", "Accept: application/json"]
    lines += [f"{k}: {v}" for k, v in spec.get("headers", {}).items()]
    if body or spec["method"] in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def quantile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[index]


class Stats:
    def __init__(self, keep_samples: bool) -> None:
        self.latencies: list[float] = []
        self.starts: list[float] = []  # perf_counter of each fetch's start (kept only if samples wanted)
        self.keep_samples = keep_samples
        self.errors: dict[str, int] = {}
        self.statuses: dict[int, int] = {}
        self.bad_body = 0
        self.late = 0  # paced mode: sends the client itself made > 5 ms late
        self.last_done = 0.0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


class Runner:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.loop = asyncio.get_running_loop()
        self.ctx = client_context(spec)
        self.req_keepalive = build_request(spec, close=False)
        self.req_close = build_request(spec, close=True)
        self.expect = spec.get("expect", "").encode()
        self.wall_offset = time.time() - time.perf_counter()

    async def connect(self) -> HttpConn:
        _, proto = await self.loop.create_connection(
            lambda: HttpConn(self.loop), self.spec["host"], self.spec["port"], ssl=self.ctx,
            server_hostname=self.spec["server_name"], ssl_handshake_timeout=10)
        return proto

    def _check(self, stats: Stats, status: int, body: bytes, checked: bool) -> bool:
        stats.statuses[status] = stats.statuses.get(status, 0) + 1
        if status != 200:
            return False
        if not checked and self.expect and self.expect not in body:
            stats.bad_body += 1
            return False
        return True

    # --- keep-alive ------------------------------------------------------------------------

    async def keepalive_worker(self, conn: HttpConn, index: int, t0: float, deadline: float,
                               stats: Stats) -> HttpConn:
        rate = float(self.spec.get("rate", 0) or 0)
        n = int(self.spec["connections"])
        interval = n / rate if rate > 0 else 0.0
        intended = t0 + index * (interval / n) if rate > 0 else 0.0
        req = self.req_keepalive
        checked = False
        pc = time.perf_counter
        lat, starts, keep = stats.latencies, stats.starts, stats.keep_samples
        prev_done = 0.0
        while True:
            if rate > 0:
                if intended >= deadline:
                    break
                now = pc()
                if now < intended:
                    await asyncio.sleep(intended - now)
                sent = pc()
                if prev_done > intended:
                    start = intended  # held back by the server's previous answer: count the wait
                else:
                    start = sent  # timer slop is the client's, not the server's
                    if sent - intended > 0.005:
                        stats.late += 1
                intended += interval
            else:
                start = pc()
                if start >= deadline:
                    break
            try:
                if conn.closed:
                    conn = await self.connect()
                    checked = False
                conn.want_body = not checked
                status, body = await conn.request(req)
            except (OSError, ConnectionError, ResponseError, ssl.SSLError) as exc:
                stats.error(type(exc).__name__)
                await asyncio.sleep(0.01)
                continue
            done = pc()
            prev_done = done
            if self._check(stats, status, body, checked):
                checked = True
                lat.append(done - start)
                if keep:
                    starts.append(start)
        stats.last_done = max(stats.last_done, pc())
        return conn  # possibly a replacement: the caller reuses or closes it

    # --- fresh connection per fetch --------------------------------------------------------

    async def fresh_worker(self, deadline: float, stats: Stats) -> None:
        pc = time.perf_counter
        req = self.req_close
        checked = False
        while True:
            start = pc()
            if start >= deadline:
                break
            try:
                conn = await self.connect()
                conn.want_body = not checked
                status, body = await conn.request(req)
            except (OSError, ConnectionError, ResponseError, ssl.SSLError, asyncio.TimeoutError) as exc:
                stats.error(type(exc).__name__)
                await asyncio.sleep(0.01)
                continue
            done = pc()
            if conn.transport is not None:
                conn.transport.close()
            if self._check(stats, status, body, checked):
                checked = True
                stats.latencies.append(done - start)
                if stats.keep_samples:
                    stats.starts.append(start)
        stats.last_done = max(stats.last_done, pc())

    async def run_fresh(self, seconds: float, stats: Stats) -> None:
        deadline = time.perf_counter() + seconds
        await asyncio.gather(*(self.fresh_worker(deadline, stats) for _ in range(int(self.spec["connections"]))))

    async def open_many(self, count: int, parallel: int) -> tuple[list[HttpConn], dict[str, int]]:
        gate = asyncio.Semaphore(parallel)
        errors: dict[str, int] = {}

        async def one() -> HttpConn | None:
            async with gate:
                try:
                    return await self.connect()
                except (OSError, ssl.SSLError, asyncio.TimeoutError) as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    return None

        conns = [c for c in await asyncio.gather(*(one() for _ in range(count))) if c is not None]
        return conns, errors


async def read_line() -> str:
    return (await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)).strip()


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def summary(stats: Stats, elapsed: float, cpu: float, waited: float) -> dict[str, Any]:
    ordered = sorted(stats.latencies)
    n = len(ordered)
    return {
        "fetches": n, "elapsed": elapsed, "fetches_per_s": n / elapsed if elapsed > 0 else 0.0,
        "p50": quantile(ordered, 0.50), "p90": quantile(ordered, 0.90), "p99": quantile(ordered, 0.99),
        "max": ordered[-1] if ordered else None, "mean": sum(ordered) / n if n else None,
        "errors": stats.errors, "statuses": {str(k): v for k, v in stats.statuses.items()},
        "bad_body": stats.bad_body, "late_sends": stats.late,
        "client_cpu_s": cpu, "client_busy": cpu / elapsed if elapsed > 0 else 0.0, "client_cpu_wait_s": waited,
    }


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def run_delay(pid: int | str = "self") -> float:
    """Seconds this process's threads spent runnable but waiting for a CPU (other work on the core)."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[1])
            except (OSError, IndexError, ValueError):
                continue
    except OSError:
        return 0.0
    return total / 1e9


async def main_async(spec: dict[str, Any]) -> None:
    runner = Runner(spec)
    mode = spec["mode"]
    seconds = float(spec.get("seconds", 5))
    warmup = float(spec.get("warmup", 0.5))
    n = int(spec["connections"])

    if mode == "idle":
        t = time.perf_counter()
        conns, errors = await runner.open_many(n, int(spec.get("parallel", 32)))
        say("READY " + json.dumps({"open": len(conns), "errors": errors, "open_seconds": time.perf_counter() - t}))
        await read_line()
        still = sum(1 for c in conns if not c.closed)
        say("DONE")
        say("RESULT " + json.dumps({"opened": len(conns), "still_open": still, "errors": errors}))
        for c in conns:
            if c.transport is not None:
                c.transport.close()
        await asyncio.sleep(0.2)
        return

    if mode == "keepalive":
        conns = []
        for _ in range(n):  # one at a time: the server is not measured yet, no need to hurry it
            conns.append(await runner.connect())
        warm = Stats(False)
        t = time.perf_counter()
        conns = list(await asyncio.gather(*(runner.keepalive_worker(c, i, t, t + warmup, warm)
                                            for i, c in enumerate(conns))))
        say("READY " + json.dumps({"warmup_fetches": len(warm.latencies), "warmup_errors": warm.errors}))
        await read_line()
        stats = Stats(bool(spec.get("samples")))
        cpu0, wait0 = cpu_seconds(), run_delay()
        t0 = time.perf_counter()
        conns = list(await asyncio.gather(*(runner.keepalive_worker(c, i, t0, t0 + seconds, stats)
                                            for i, c in enumerate(conns))))
    elif mode == "fresh":
        warm = Stats(False)
        await runner.run_fresh(warmup, warm)
        say("READY " + json.dumps({"warmup_fetches": len(warm.latencies), "warmup_errors": warm.errors}))
        await read_line()
        stats = Stats(bool(spec.get("samples")))
        cpu0, wait0 = cpu_seconds(), run_delay()
        t0 = time.perf_counter()
        await runner.run_fresh(seconds, stats)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    elapsed = max(stats.last_done, time.perf_counter()) - t0
    cpu, waited = cpu_seconds() - cpu0, run_delay() - wait0
    say("DONE")
    result = summary(stats, elapsed, cpu, waited)
    if spec.get("samples"):
        off = runner.wall_offset
        with open(spec["samples"], "w") as f:
            json.dump({"start": [s + off for s in stats.starts], "latency": stats.latencies}, f)
    say("RESULT " + json.dumps(result))
    if mode == "keepalive":
        for c in conns:
            if c.transport is not None:
                c.transport.close()
    await asyncio.sleep(0.1)  # let the close_notify alerts go out


def main() -> None:
    spec = json.loads(sys.argv[1])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = int(spec.get("connections", 0)) + 256
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard) if hard != resource.RLIM_INFINITY else want, hard))
    try:
        import uvloop
    except ImportError:
        asyncio.run(main_async(spec))
    else:
        uvloop.run(main_async(spec))


if __name__ == "__main__":
    main()
