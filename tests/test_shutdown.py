"""Stopping: opt-in revocation on shutdown, and SIGKILL in the middle of a rotation."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import pytest

from broker.devserver import OpenBaoDevServer
from tests.conftest import BrokerFactory, Pki, token_is_valid
from tests.faults import TcpProxy
from tests.processes import serve_config


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
        proxy.delay = 0.5  # the next rotation is on the wire when the broker is killed
        rotation = asyncio.create_task(serve.request("/v1/tokens/demo/rotate", cert="ops", method="POST"))
        await asyncio.sleep(0.4)
        assert serve.proc is not None
        serve.proc.send_signal(signal.SIGKILL)
        await serve.proc.wait()
        rotation.cancel()
        proxy.delay = 0.0
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
    finally:
        assert await serve.stop() == 0
        await proxy.stop()
    text = serve.audit_path.read_text()
    events = [json.loads(line) for line in text.splitlines()]  # every line parses: no torn line
    assert events[-1]["event"] != "token_rot"
    for token in (first["token"], second["token"], third["token"]):
        assert token not in text


async def test_sigterm_lets_in_flight_requests_finish(brokers: BrokerFactory, openbao: OpenBaoDevServer) -> None:
    proxy = await TcpProxy("127.0.0.1", openbao.port).start()
    try:
        b = await brokers.start(vault_address=proxy.address)
        first = await b.get_token()
        proxy.delay = 0.4  # the rotation below takes a couple of seconds
        rotation = asyncio.create_task(b.request("POST", "/v1/tokens/demo/rotate", cert="ops"))
        await asyncio.sleep(0.3)
        b.stop.set()  # what SIGTERM does
        status, body, _ = await rotation
        assert status == 200 and body["generation"] == 2, "the request in flight was answered"
        await asyncio.wait_for(b.task, timeout=20)
        assert token_is_valid(b.vault, first["token"]), "a plain stop revokes nothing"
        with pytest.raises(OSError):  # and the listener is closed
            await asyncio.open_connection("127.0.0.1", b.broker.api_port)
    finally:
        await proxy.stop()
