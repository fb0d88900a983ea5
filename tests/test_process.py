"""`broker serve` as a real process: start, serve, SIGHUP cert reload, SIGTERM clean exit."""

from __future__ import annotations

import asyncio
import shutil
import signal
import ssl
import sys
from pathlib import Path

import aiohttp
from cryptography import x509

from broker import certs
from broker.devserver import OpenBaoDevServer, setup_approle, setup_token_role
from tests.conftest import Pki, token_is_valid, write_config


async def _wait_ready(ops_url: str, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(ops_url + "/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError("broker serve never became ready")
            await asyncio.sleep(0.1)


def _server_serial(ctx: ssl.SSLContext, port: int) -> int:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


async def test_serve_reloads_cert_on_sighup_and_exits_cleanly_on_sigterm(
    tmp_path: Path, pki: Pki, openbao: OpenBaoDevServer
) -> None:
    from broker.devserver import free_port

    # The broker's own copy of the server cert, so this test can replace it.
    own = tmp_path / "certs"
    own.mkdir()
    for name in ("ca.pem", "ca.key", "server.pem", "server.key"):
        shutil.copy2(pki.dir / name, own / name)
    role = "proc-role"
    setup_token_role(openbao, role, ["proc-policy"])
    files = setup_approle(openbao, [role], tmp_path / "secrets", role_name="proc-broker")
    api_port, ops_port = free_port(), free_port()
    config = write_config(tmp_path, pki, openbao.address,
                          [{"method": "approle", "role_id_file": str(files.role_id_file),
                            "secret_id_file": str(files.secret_id_file)}],
                          {"demo": {"token_role": role, "policies": ["proc-policy"], "ttl": "30s",
                                    "grace": "5s", "rotate_after": "20s", "allow": ["cn:job"]}})
    text = config.read_text().replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{api_port}"', 1)
    text = text.replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{ops_port}"', 1)
    text = text.replace(f'cert = "{pki.dir}/server.pem"', f'cert = "{own}/server.pem"')
    text = text.replace(f'key = "{pki.dir}/server.key"', f'key = "{own}/server.key"')
    config.write_text(text)

    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "broker", "serve", "--config", str(config),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        await _wait_ready(f"http://127.0.0.1:{ops_port}")
        ctx = pki.client_context("job")
        connector = aiohttp.TCPConnector(ssl=ctx)  # keep-alive: this connection must survive the reload
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.get(f"https://localhost:{api_port}/v1/tokens/demo") as response:
                assert response.status == 200
                token = (await response.json())["token"]
            before = await asyncio.to_thread(_server_serial, ctx, api_port)

            certs.issue_server(own, force=True)
            new_serial = x509.load_pem_x509_certificate((own / "server.pem").read_bytes()).serial_number
            assert new_serial != before
            proc.send_signal(signal.SIGHUP)
            for _ in range(50):
                if await asyncio.to_thread(_server_serial, ctx, api_port) == new_serial:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the new server cert was not served after SIGHUP")
            async with session.get(f"https://localhost:{api_port}/v1/tokens/demo") as response:
                assert response.status == 200, "the open keep-alive connection still works"

        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), timeout=20)
        assert proc.returncode == 0, err.decode()
        log = err.decode()
        assert "tls_reloaded" in log and "shutdown" in log
        assert token not in log and token not in out.decode()
        assert token_is_valid(openbao, token), "a clean stop does not revoke tokens jobs still hold"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
