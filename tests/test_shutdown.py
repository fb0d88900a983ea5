"""Stopping: opt-in revocation on shutdown, and SIGKILL in the middle of a rotation."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import aiohttp

from broker.devserver import OpenBaoDevServer, free_port, setup_approle, setup_token_role
from tests.conftest import BrokerFactory, Pki, token_is_valid, write_config
from tests.faults import TcpProxy


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


async def _ready(ops_port: int, timeout: float = 20) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    async with aiohttp.ClientSession() as session:
        while asyncio.get_running_loop().time() < deadline:
            try:
                async with session.get(f"http://127.0.0.1:{ops_port}/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("broker never became ready")


async def _fetch(pki: Pki, port: int, path: str, cert: str = "job", method: str = "GET") -> tuple[int, dict]:
    connector = aiohttp.TCPConnector(ssl=pki.client_context(cert), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.request(method, f"https://localhost:{port}{path}") as response:
            return response.status, await response.json()


async def test_sigkill_mid_rotation_then_restart(tmp_path: Path, pki: Pki, openbao: OpenBaoDevServer) -> None:
    proxy = await TcpProxy("127.0.0.1", openbao.port).start()
    role = "sigkill-role"
    setup_token_role(openbao, role, ["sigkill-policy"])
    files = setup_approle(openbao, [role], tmp_path / "secrets", role_name="sigkill-broker")
    api_port, ops_port = free_port(), free_port()
    config = write_config(
        tmp_path, pki, proxy.address,
        [{"method": "approle", "role_id_file": str(files.role_id_file), "secret_id_file": str(files.secret_id_file)}],
        {"demo": {"token_role": role, "policies": ["sigkill-policy"], "ttl": "60s", "grace": "3s",
                  "rotate_after": "40s", "allow": ["cn:job"]}},
    )
    text = config.read_text().replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{api_port}"', 1)
    config.write_text(text.replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{ops_port}"', 1))
    command = [sys.executable, "-m", "broker", "serve", "--config", str(config)]

    proc = await asyncio.create_subprocess_exec(*command, stderr=asyncio.subprocess.DEVNULL)
    try:
        await _ready(ops_port)
        _, first = await _fetch(pki, api_port, "/v1/tokens/demo")
        status, _ = await _fetch(pki, api_port, "/v1/tokens/demo/rotate", cert="ops", method="POST")
        assert status == 200
        _, second = await _fetch(pki, api_port, "/v1/tokens/demo")
        proxy.delay = 0.5  # the next rotation is on the wire when the broker is killed
        rotation = asyncio.create_task(_fetch(pki, api_port, "/v1/tokens/demo/rotate", cert="ops", method="POST"))
        await asyncio.sleep(0.4)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        rotation.cancel()
        proxy.delay = 0.0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    audit = tmp_path / "audit.jsonl"
    with open(audit, "a") as f:
        f.write('{"ts":"2026-01-01T00:00:00Z","event":"token_rot')  # what a kill mid-write would leave
    assert token_is_valid(openbao, first["token"]), "grace of gen 1 not over when the broker died"

    proc = await asyncio.create_subprocess_exec(*command, stderr=asyncio.subprocess.DEVNULL)
    try:
        await _ready(ops_port)
        status, third = await _fetch(pki, api_port, "/v1/tokens/demo")
        assert status == 200 and third["generation"] == 3 and token_is_valid(openbao, third["token"])
        for _ in range(100):  # gen 1 was overdue; gen 2 (served before the kill) gets one grace window
            if not token_is_valid(openbao, first["token"]) and not token_is_valid(openbao, second["token"]):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("pending revocations were not carried out after the restart")
        assert token_is_valid(openbao, third["token"])
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        await proxy.stop()
    events = [json.loads(line) for line in audit.read_text().splitlines()]  # every line parses: no torn line
    assert events[-1]["event"] != "token_rot"
    text = audit.read_text()
    for token in (first["token"], second["token"], third["token"]):
        assert token not in text
