"""Load across rotations: 200 concurrent clients, >= 10 rotations, OpenBao paused once and a
token revoked behind the broker's back. A checker keeps every fetch and then proves:

- 0 failed fetches (a valid token existed the whole time: the TTL outlasts the pause),
- 0 tokens served past their expiry,
- 0 tokens served after the broker revoked them (audit ``token_revoked``), and 0 served more
  than check_interval + slack after an external revoke.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import aiohttp
import hvac
import pytest

from broker.devserver import OpenBaoDevServer
from tests.conftest import Pki, token_is_valid
from tests.processes import serve_config

CLIENTS = int(os.environ.get("BROKER_LOAD_CLIENTS", "200"))
DURATION = float(os.environ.get("BROKER_LOAD_SECONDS", "30"))
CHECK_INTERVAL = 1.0
SLACK = 1.5  # one lookup round trip, a backoff step and scheduling on a busy 2-core machine


@dataclass(frozen=True)
class Fetch:
    started: float
    finished: float
    status: int
    token: str
    expires_at: float


def _fp(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def _ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def _client(session: aiohttp.ClientSession, url: str, until: float, out: list[Fetch]) -> None:
    while time.time() < until:
        started = time.time()
        try:
            async with session.get(url) as response:
                body = await response.json() if response.status == 200 else {}
                status = response.status
        except (aiohttp.ClientError, asyncio.TimeoutError):
            status, body = 0, {}
        finished = time.time()
        expires = _ts(body["expires_at"]) if body else 0.0
        out.append(Fetch(started, finished, status, body.get("token", ""), expires))
        await asyncio.sleep(0.02)


@pytest.mark.load
async def test_load_across_rotations_with_a_pause_and_an_external_revoke(
    tmp_path: Path, pki: Pki, private_openbao: OpenBaoDevServer
) -> None:
    serve = serve_config(tmp_path, pki, private_openbao, "load",
                         {"ttl": "12s", "rotate_after": "1500ms", "grace": "2s", "check_interval": "1s"},
                         server_extra="rate_limit = 0  # 200 clients share one certificate here")
    await serve.start()
    fetches: list[Fetch] = []
    revoked_externally: dict[str, float] = {}
    try:
        until = time.time() + DURATION
        connector = aiohttp.TCPConnector(ssl=pki.client_context("job"), limit=CLIENTS)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as session:
            url = f"https://localhost:{serve.api_port}/v1/tokens/demo"
            clients = [asyncio.create_task(_client(session, url, until, fetches)) for _ in range(CLIENTS)]

            await asyncio.sleep(DURATION * 0.3)
            private_openbao.pause()
            await asyncio.sleep(3.0)  # longer than a rotation interval
            private_openbao.resume()

            await asyncio.sleep(DURATION * 0.2)
            victim = next(f.token for f in reversed(fetches) if f.status == 200)
            revoked_at = time.time()
            await asyncio.to_thread(hvac.Client(url=private_openbao.address, token="root").auth.token.revoke, victim)
            revoked_externally[victim] = revoked_at
            await asyncio.gather(*clients)
        status, metrics_text = await _metrics(serve.ops_port)
        assert status == 200
    finally:
        assert await serve.stop() == 0

    events = [json.loads(line) for line in serve.audit_path.read_text().splitlines()]
    revoked_by_broker = {e["token_fp"]: _ts(e["ts"]) for e in events if e["event"] == "token_revoked"}
    rotations = sum(1 for e in events if e["event"] == "token_rotated")

    failed = [f for f in fetches if f.status != 200]
    past_expiry = [f for f in fetches if f.status == 200 and f.expires_at <= f.started]
    after_broker_revoke = [f for f in fetches if f.status == 200 and _fp(f.token) in revoked_by_broker
                           and f.started > revoked_by_broker[_fp(f.token)]]
    after_external_revoke = [f for f in fetches if f.token in revoked_externally
                             and f.started > revoked_externally[f.token] + CHECK_INTERVAL + SLACK]
    distinct = {f.token for f in fetches if f.status == 200}
    print(f"\nload: {len(fetches)} fetches by {CLIENTS} clients in {DURATION:.0f}s, {rotations} rotations, "
          f"{len(distinct)} distinct tokens; failed={len(failed)} past_expiry={len(past_expiry)} "
          f"after_broker_revoke={len(after_broker_revoke)} after_external_revoke={len(after_external_revoke)}")

    assert rotations >= 10
    assert len(fetches) > CLIENTS * 5
    assert not failed, failed[:3]
    assert not past_expiry, past_expiry[:3]
    assert not after_broker_revoke, after_broker_revoke[:3]
    assert not after_external_revoke, after_external_revoke[:3]
    # The revoked token is either replaced after a check (token_invalidated) or rotated out
    # first; either way after_external_revoke above is 0.
    assert "rotation_failed" in {e["event"] for e in events} or "check_failed" in {e["event"] for e in events}
    assert 'broker_token_requests_total{outcome="served",profile="demo"}' in metrics_text
    # Every token still current at the end is valid at OpenBao.
    last = max(fetches, key=lambda f: f.started)
    assert token_is_valid(private_openbao, last.token)
    # No token served during the run is in the child's stderr, audit, state, metrics or errors.
    serve.seen_secrets.update(distinct)
    serve.assert_no_leaks(metrics_text)


async def _metrics(port: int) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
            return response.status, await response.text()
