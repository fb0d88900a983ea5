"""Stopping: opt-in revocation on shutdown, and SIGKILL in the middle of a rotation."""

from __future__ import annotations

import asyncio
import json
import resource
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from broker.devserver import OpenBaoDevServer
from tests.conftest import BrokerFactory, Pki, token_is_valid
from tests.faults import TcpProxy
from tests.processes import serve_config

CREATE = "/v1/auth/token/create"


async def _shutdown_waits_on_a_request(server: Any) -> None:
    """Return once aiohttp's shutdown is waiting for a request still in progress (the point
    where a broker that did not let in-flight requests finish would cancel it)."""
    while not any(getattr(handler, "_handler_waiter", None) is not None for handler in server.connections):
        await asyncio.sleep(0.02)


async def test_revoke_on_shutdown_revokes_everything_handed_out(brokers: BrokerFactory) -> None:
    b = await brokers.start(server_extra="revoke_on_shutdown = true")
    first = await b.get_token()
    await b.request("POST", "/v1/tokens/demo/rotate", cert="ops")
    second = await b.get_token()
    assert token_is_valid(b.vault, first["token"]) and token_is_valid(b.vault, second["token"])
    await b.shutdown()
    assert not token_is_valid(b.vault, first["token"]) and not token_is_valid(b.vault, second["token"])
    assert b.broker.store.load_revocations() == []
    reasons = {e["reason"] for e in b.audit_events() if e["event"] == "token_revoked"}
    assert reasons == {"shutdown"}


async def test_sigkill_mid_rotation_then_restart(tmp_path: Path, pki: Pki, openbao: OpenBaoDevServer) -> None:
    proxy = await TcpProxy("127.0.0.1", openbao.port).start()
    serve = serve_config(tmp_path, pki, openbao, "sigkill",
                         {"ttl": "60s", "grace": "3s", "rotate_after": "40s"}, vault_address=proxy.address)
    await serve.start()
    try:
        _, first = await serve.request("/v1/tokens/demo")
        status, _ = await serve.request("/v1/tokens/demo/rotate", cert="ops", method="POST")
        assert status == 200
        _, second = await serve.request("/v1/tokens/demo")
        proxy.hold()  # OpenBao stalls: the next rotation's create call is on the wire when the broker is killed
        on_the_wire = proxy.request_seen(CREATE)
        rotation = asyncio.create_task(serve.request("/v1/tokens/demo/rotate", cert="ops", method="POST"))
        await asyncio.wait_for(on_the_wire.wait(), timeout=10)
        assert serve.proc is not None and not rotation.done()
        serve.proc.send_signal(signal.SIGKILL)
        await serve.proc.wait()
        with pytest.raises(aiohttp.ClientError):  # the admin call in flight never got an answer
            await asyncio.wait_for(rotation, timeout=10)
        proxy.cut()  # drop the held create call: it never reaches OpenBao
        proxy.release()
        proxy.heal()
    finally:
        await serve.stop()

    with open(serve.audit_path, "a") as f:
        f.write('{"ts":"2026-01-01T00:00:00Z","event":"token_rot')  # what a kill mid-write would leave
    assert token_is_valid(openbao, first["token"]), "grace of gen 1 not over when the broker died"

    await serve.start()
    try:
        status, third = await serve.request("/v1/tokens/demo")
        assert status == 200 and third["generation"] == 3 and token_is_valid(openbao, third["token"])
        for _ in range(100):  # gen 1 was overdue; gen 2 (served before the kill) gets one grace window
            if not token_is_valid(openbao, first["token"]) and not token_is_valid(openbao, second["token"]):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("pending revocations were not carried out after the restart")
        assert token_is_valid(openbao, third["token"])
        metrics = await serve.metrics_text()
    finally:
        assert await serve.stop() == 0
        await proxy.stop()
    text = serve.audit_path.read_text()
    events = [json.loads(line) for line in text.splitlines()]  # every line parses: no torn line
    assert events[-1]["event"] != "token_rot"
    for token in (first["token"], second["token"], third["token"]):
        assert token not in text
    serve.assert_no_leaks(metrics)  # stderr of both runs, audit, state, metrics, error answers


async def test_sigterm_lets_in_flight_requests_finish(brokers: BrokerFactory, openbao: OpenBaoDevServer) -> None:
    proxy = await TcpProxy("127.0.0.1", openbao.port).start()
    try:
        b = await brokers.start(vault_address=proxy.address, vault_timeout="60s")
        first = await b.get_token()
        proxy.hold()  # the rotation below waits on OpenBao until the shutdown is under way
        on_the_wire = proxy.request_seen(CREATE)
        rotation = asyncio.create_task(b.request("POST", "/v1/tokens/demo/rotate", cert="ops"))
        await asyncio.wait_for(on_the_wire.wait(), timeout=10)
        api_server = b.broker._runners[0].server  # the API runner's; the shutdown forgets the runners
        b.stop.set()  # what SIGTERM does
        await asyncio.wait_for(_shutdown_waits_on_a_request(api_server), timeout=10)
        assert not rotation.done()
        with pytest.raises(OSError):  # the listener is already closed while the request is in flight
            await asyncio.open_connection("127.0.0.1", b.broker.api_port)
        proxy.release()
        status, body, _ = await rotation
        assert status == 200 and body["generation"] == 2, "the request in flight was answered"
        await asyncio.wait_for(b.task, timeout=20)
        assert token_is_valid(b.vault, first["token"]), "a plain stop revokes nothing"
        with pytest.raises(OSError):  # and the listener is closed
            await asyncio.open_connection("127.0.0.1", b.broker.api_port)
    finally:
        await proxy.stop()


RAISE_NOFILE = """
import resource
from broker.service import raise_open_files_limit
print(*raise_open_files_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


def test_serve_raises_a_low_open_files_limit_to_the_hard_one() -> None:
    """`ulimit -n 64` (or systemd's 1024) would make a busy listener refuse connections silently."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    wanted = 1 << 16 if hard == resource.RLIM_INFINITY else min(hard, 1 << 16)
    assert wanted > 64, "the machine's hard limit leaves nothing to raise"

    def low() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))

    ran = subprocess.run([sys.executable, "-c", RAISE_NOFILE], capture_output=True, text=True, timeout=60,
                         preexec_fn=low)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split() == ["64", str(wanted), str(wanted)]


async def test_sigterm_with_vault_calls_stuck_exits_within_its_own_deadlines(
        tmp_path: Path, pki: Pki, openbao: OpenBaoDevServer) -> None:
    """requests bounds each socket read, not a call: a stalled Vault keeps a worker thread in
    its call, and Python waited for it at exit — here for the 60 s [vault] timeout, past
    systemd's TimeoutStopSec. The broker now exits once its own deadlines are kept."""
    proxy = await TcpProxy("127.0.0.1", openbao.port).start()
    serve = serve_config(tmp_path, pki, openbao, "stuck-exit",
                         {"ttl": "60s", "grace": "3s", "rotate_after": "40s", "check_interval": "1s"},
                         vault_address=proxy.address, vault_timeout="60s")
    await serve.start()
    try:
        await serve.wait_ready()
        on_the_wire = proxy.request_seen("/v1/auth/token/lookup-accessor")
        proxy.hold()  # the next check's lookup reaches the proxy and stays there
        await asyncio.wait_for(on_the_wire.wait(), timeout=10)
        started = asyncio.get_running_loop().time()
        code = await serve.stop(timeout=40)
        took = asyncio.get_running_loop().time() - started
    finally:
        proxy.release()
        await proxy.stop()
    assert code == 0
    assert took < 15, f"{took:.1f}s: the logout's 5 s and a second for the threads, not the 60 s Vault timeout"
    log = serve.stderr_path.read_text()
    assert "shutdown_left_vault_calls threads=" in log and "Traceback" not in log
