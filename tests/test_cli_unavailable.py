"""`broker get` against a broker that has no valid token: bounded retries, then one line, exit 1."""

from __future__ import annotations

import time

from broker.devserver import OpenBaoDevServer
from tests.conftest import BrokerFactory
from tests.faults import TcpProxy
from tests.test_cli import assert_one_line_error, broker_cli, job_env


async def test_get_retries_on_503_then_fails_with_one_line(brokers: BrokerFactory, openbao: OpenBaoDevServer) -> None:
    proxy = await TcpProxy("127.0.0.1", openbao.port).start()
    try:
        proxy.cut()  # Vault unreachable from the start: the broker never gets a token
        b = await brokers.start({"demo": {"check_interval": "1s"}}, vault_address=proxy.address, wait_ready=False)
        started = time.monotonic()
        run = await broker_cli("get", "demo", "--retries", "2", env=job_env(b))
        waited = time.monotonic() - started
        assert_one_line_error(run, 1, "503", "unavailable", "no valid token for profile demo")
        assert waited >= 1.0, "it honoured Retry-After between attempts"
        requests = b.metric("broker_token_requests_total", profile="demo", outcome="unavailable")
        assert requests == 3, "one try and two retries"
    finally:
        await proxy.stop()
