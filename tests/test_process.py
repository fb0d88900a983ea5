"""`broker serve` as a real process: start, serve, SIGHUP cert reload, SIGTERM clean exit."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import ssl
import sys
from pathlib import Path

import aiohttp
from cryptography import x509

from broker import certs
from broker.devserver import OpenBaoDevServer
from tests.conftest import Pki, token_is_valid
from tests.processes import serve_config


def _server_serial(ctx: ssl.SSLContext, port: int) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


async def test_serve_reloads_cert_on_sighup_and_exits_cleanly_on_sigterm(
    tmp_path: Path, pki: Pki, openbao: OpenBaoDevServer
) -> None:
    own = tmp_path / "certs"  # the broker's own copy of the server cert, so this test can replace it
    own.mkdir()
    for name in ("ca.pem", "ca.key", "server.pem", "server.key"):
        shutil.copy2(pki.dir / name, own / name)
    serve = serve_config(tmp_path, pki, openbao, "proc", {"ttl": "30s", "grace": "5s", "rotate_after": "20s"},
                         cert_dir=own)
    await serve.start(stderr=asyncio.subprocess.PIPE)
    proc = serve.proc
    assert proc is not None
    try:
        ctx = pki.client_context("job")
        connector = aiohttp.TCPConnector(ssl=ctx)  # keep-alive: this connection must survive the reload
        async with aiohttp.ClientSession(connector=connector) as session:
            url = f"https://localhost:{serve.api_port}/v1/tokens/demo"
            async with session.get(url) as response:
                assert response.status == 200
                token = (await response.json())["token"]
            before = await asyncio.to_thread(_server_serial, ctx, serve.api_port)

            certs.issue_server(own, force=True)
            new_serial = x509.load_pem_x509_certificate((own / "server.pem").read_bytes()).serial_number
            assert new_serial != before
            proc.send_signal(signal.SIGHUP)
            for _ in range(50):
                if await asyncio.to_thread(_server_serial, ctx, serve.api_port) == new_serial:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the new server cert was not served after SIGHUP")
            async with session.get(url) as response:
                assert response.status == 200, "the open keep-alive connection still works"

        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), timeout=20)
        assert proc.returncode == 0, err.decode()
        log = err.decode()
        assert "tls_reloaded" in log and "shutdown" in log
        assert token not in log
        assert token_is_valid(openbao, token), "a clean stop does not revoke tokens jobs still hold"
    finally:
        await serve.stop()


async def test_serve_refuses_to_start_with_a_group_readable_secret(
    tmp_path: Path, pki: Pki, openbao: OpenBaoDevServer
) -> None:
    serve = serve_config(tmp_path, pki, openbao, "perms", {"ttl": "30s", "grace": "5s", "rotate_after": "20s"})
    secret_id = tmp_path / "secrets" / "secret_id"
    secret_id.chmod(0o640)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker", "serve", "--config", str(serve.config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=20)
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 2 and out == b""
    assert len(lines) == 1 and "secret_id" in lines[0] and "chmod 600" in lines[0], lines
    assert "Traceback" not in err.decode()


async def test_sighup_reopens_the_audit_log_after_logrotate_renamed_it(
    tmp_path: Path, pki: Pki, openbao: OpenBaoDevServer
) -> None:
    """logrotate's default rotation: rename the file, then SIGHUP. Events before the signal go
    to the renamed file (the descriptor follows it), events after it to a new 0600 file."""
    serve = serve_config(tmp_path, pki, openbao, "reopen", {"ttl": "30s", "grace": "5s", "rotate_after": "20s"})
    await serve.start()
    assert serve.proc is not None
    try:
        assert (await serve.request("/v1/tokens/demo"))[0] == 200
        rotated = serve.audit_path.with_name("audit.jsonl.1")
        serve.audit_path.rename(rotated)
        assert (await serve.request("/v1/tokens/demo"))[0] == 200  # before the signal: still the old file
        served_before = _events(rotated).count("token_served")
        serve.proc.send_signal(signal.SIGHUP)
        for _ in range(100):
            if serve.audit_path.exists():
                break
            await asyncio.sleep(0.05)
        assert (await serve.request("/v1/tokens/demo"))[0] == 200
        assert _events(serve.audit_path) == ["token_served"]
        assert _events(rotated).count("token_served") == served_before == 2
        assert serve.audit_path.stat().st_mode & 0o777 == 0o600
        assert "audit_reopened" in serve.stderr_path.read_text()
        serve.assert_no_leaks()
    finally:
        await serve.stop()


def _events(path: Path) -> list[str]:
    return [json.loads(line)["event"] for line in path.read_text().splitlines()]
