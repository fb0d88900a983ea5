"""`broker serve` as a real child process, for tests that signal or kill it."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import aiohttp

from broker.devserver import OpenBaoDevServer, free_port, setup_approle, setup_token_role
from tests.conftest import Pki, write_config


@dataclass(frozen=True)
class Ran:
    """How a child process ended: exit code, stdout, stderr."""

    code: int
    out: str
    err: str

    @property
    def both(self) -> str:
        return self.out + self.err


async def run_process(argv: list[str], env: Mapping[str, str], cwd: Path | None = None,
                      timeout: float = 30.0) -> Ran:
    """Run a command to completion without blocking the event loop (a broker may be serving
    in this very loop); killed and reported if it takes longer than ``timeout``."""
    proc = await asyncio.create_subprocess_exec(
        *argv, env=dict(env), cwd=cwd, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"{' '.join(argv)} did not finish in {timeout}s") from None
    assert proc.returncode is not None
    return Ran(proc.returncode, out.decode(), err.decode())


@dataclass
class ServeProcess:
    config: Path
    api_port: int
    ops_port: int
    pki: Pki
    proc: asyncio.subprocess.Process | None = None

    @property
    def audit_path(self) -> Path:
        return self.config.parent / "audit.jsonl"

    async def start(self, stderr: int | None = asyncio.subprocess.DEVNULL) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "broker", "serve", "--config", str(self.config),
            stdout=asyncio.subprocess.DEVNULL, stderr=stderr,
        )
        await self.wait_ready()

    async def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        async with aiohttp.ClientSession() as session:
            while asyncio.get_running_loop().time() < deadline:
                assert self.proc is not None and self.proc.returncode is None, "broker serve exited"
                try:
                    async with session.get(f"http://127.0.0.1:{self.ops_port}/readyz") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise AssertionError("broker serve never became ready")

    async def request(self, path: str, cert: str = "job", method: str = "GET") -> tuple[int, Any]:
        connector = aiohttp.TCPConnector(ssl=self.pki.client_context(cert), force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.request(method, f"https://localhost:{self.api_port}{path}") as response:
                return response.status, await response.json()

    async def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, wait, return the exit code (killing it if it does not stop in time)."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        return self.proc.returncode  # type: ignore[return-value]


def serve_config(tmp_path: Path, pki: Pki, openbao: OpenBaoDevServer, name: str, profile: dict[str, Any],
                 vault_address: str | None = None, cert_dir: Path | None = None,
                 server_extra: str = "") -> ServeProcess:
    """A config on fixed free ports for `broker serve`, with its own token role and AppRole."""
    role = f"{name}-role"
    setup_token_role(openbao, role, [f"{name}-policy"])
    files = setup_approle(openbao, [role], tmp_path / "secrets", role_name=f"{name}-broker")
    api_port, ops_port = free_port(), free_port()
    settings = {"token_role": role, "policies": [f"{name}-policy"], "allow": ["cn:job"], **profile}
    config = write_config(tmp_path, pki, vault_address or openbao.address,
                          [{"method": "approle", "role_id_file": str(files.role_id_file),
                            "secret_id_file": str(files.secret_id_file)}], {"demo": settings},
                          server_extra=server_extra)
    text = config.read_text().replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{api_port}"', 1)
    text = text.replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{ops_port}"', 1)
    if cert_dir is not None:
        text = text.replace(f'cert = "{pki.dir}/server.pem"', f'cert = "{cert_dir}/server.pem"')
        text = text.replace(f'key = "{pki.dir}/server.key"', f'key = "{cert_dir}/server.key"')
    config.write_text(text)
    return ServeProcess(config, api_port, ops_port, pki)
