"""`broker serve` as a real child process, for tests that signal or kill it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from broker.devserver import OpenBaoDevServer, setup_approle, setup_token_role
from tests.conftest import Pki, record_answer, write_config


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


LISTENING = re.compile(rb"listening api=https://\S+:(\d+) ops=http://\S+:(\d+)")
TO_FILE: Any = object()  # ServeProcess.start's default: stderr appended to ServeProcess.stderr_path


def listening_ports(text: bytes) -> tuple[int, int] | None:
    """(api port, ops port) from a broker's "listening api=… ops=…" log line, if ``text`` has one."""
    match = LISTENING.search(text)
    return (int(match[1]), int(match[2])) if match else None


def serve_env() -> dict[str, str]:
    """The environment for a `broker serve` child: INFO logging at least, for its listening line."""
    env = dict(os.environ)
    if env.get("BROKER_LOG_LEVEL", "INFO").upper() not in ("DEBUG", "INFO"):
        env["BROKER_LOG_LEVEL"] = "INFO"
    return env


@dataclass
class ServeProcess:
    """A `broker serve` child. Its config listens on port 0; the ports it got are read from its
    log line at each start (no port picked here and bound later by the child). Its stderr goes
    to ``stderr_path`` (appended across restarts); ``assert_no_leaks`` scans that, the audit
    log, the state files, /metrics and every non-200 answer for the tokens seen."""

    config: Path
    api_port: int
    ops_port: int
    pki: Pki
    proc: asyncio.subprocess.Process | None = None
    seen_secrets: set[str] = field(default_factory=set)
    error_bodies: list[str] = field(default_factory=list)

    @property
    def audit_path(self) -> Path:
        return self.config.parent / "audit.jsonl"

    @property
    def stderr_path(self) -> Path:
        return self.config.parent / "serve.stderr"

    async def start(self, stderr: Any = TO_FILE) -> None:
        """Start and wait until ready. stderr goes to ``stderr_path`` by default, or to a PIPE
        (``asyncio.subprocess.PIPE``: the caller reads what follows the listening line)."""
        argv = [sys.executable, "-m", "broker", "serve", "--config", str(self.config)]
        if stderr is TO_FILE:
            offset = self.stderr_path.stat().st_size if self.stderr_path.exists() else 0
            with self.stderr_path.open("ab") as sink:
                self.proc = await asyncio.create_subprocess_exec(*argv, env=serve_env(),
                                                                 stdout=asyncio.subprocess.DEVNULL, stderr=sink)
            await self._ports_from_file(offset)
        elif stderr == asyncio.subprocess.PIPE:
            self.proc = await asyncio.create_subprocess_exec(*argv, env=serve_env(),
                                                             stdout=asyncio.subprocess.DEVNULL, stderr=stderr)
            await self._ports_from_pipe()
        else:
            raise ValueError("stderr must go to the default file or a PIPE: the ports are read from it")
        await self.wait_ready()

    async def _ports_from_file(self, offset: int, timeout: float = 20.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            with self.stderr_path.open("rb") as f:
                f.seek(offset)
                ports = listening_ports(f.read())
            if ports is not None:
                self.api_port, self.ops_port = ports
                return
            assert self.proc is not None
            if self.proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
        raise AssertionError(f"broker serve never said where it listens: {self.stderr_path.read_text()[-2000:]}")

    async def _ports_from_pipe(self, timeout: float = 20.0) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        seen = b""
        deadline = asyncio.get_running_loop().time() + timeout
        while (remaining := deadline - asyncio.get_running_loop().time()) > 0:
            line = await asyncio.wait_for(self.proc.stderr.readline(), remaining)
            if not line:
                break
            seen += line
            ports = listening_ports(line)
            if ports is not None:
                self.api_port, self.ops_port = ports
                return
        raise AssertionError(f"broker serve never said where it listens: {seen[-2000:]!r}")

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

    def record_answer(self, status: int, text: str) -> None:
        record_answer(self.seen_secrets, self.error_bodies, status, text)

    async def request(self, path: str, cert: str = "job", method: str = "GET") -> tuple[int, Any]:
        connector = aiohttp.TCPConnector(ssl=self.pki.client_context(cert), force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.request(method, f"https://localhost:{self.api_port}{path}") as response:
                text = await response.text()
        self.record_answer(response.status, text)
        return response.status, json.loads(text)

    async def metrics_text(self) -> str:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{self.ops_port}/metrics") as response:
                assert response.status == 200
                return await response.text()

    def assert_no_leaks(self, metrics: str = "", extra_secrets: Iterable[str] = ()) -> None:
        """No token seen (nor the AppRole secret_id) in stderr, audit, state, ``metrics``
        (take it with ``metrics_text`` while the child runs) or any error answer."""
        secrets = set(self.seen_secrets) | set(extra_secrets)
        secret_id = self.config.parent / "secrets" / "secret_id"
        if secret_id.is_file():
            secrets.add(secret_id.read_text().strip())
        state = self.config.parent / "state"
        haystacks = {
            "stderr": self.stderr_path.read_text() if self.stderr_path.exists() else "",
            "audit": self.audit_path.read_text() if self.audit_path.exists() else "",
            "state": "".join(p.read_text() for p in state.glob("*.json")) if state.is_dir() else "",
            "metrics": metrics,
            "error answers": "\n".join(self.error_bodies),
        }
        leaks = [(where, secret[:4] + "…") for secret in secrets if secret
                 for where, text in haystacks.items() if secret in text]
        assert not leaks, f"token values leaked into: {leaks}"

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
                 server_extra: str = "", vault_timeout: str = "2s") -> ServeProcess:
    """A config for `broker serve` (listening on port 0), with its own token role and AppRole."""
    role = f"{name}-role"
    setup_token_role(openbao, role, [f"{name}-policy"])
    files = setup_approle(openbao, [role], tmp_path / "secrets", role_name=f"{name}-broker")
    settings = {"token_role": role, "policies": [f"{name}-policy"], "allow": ["cn:job"], **profile}
    config = write_config(tmp_path, pki, vault_address or openbao.address,
                          [{"method": "approle", "role_id_file": str(files.role_id_file),
                            "secret_id_file": str(files.secret_id_file)}], {"demo": settings},
                          server_extra=server_extra, vault_timeout=vault_timeout)
    text = config.read_text()  # both listeners on port 0: the child reports what it bound
    if cert_dir is not None:
        text = text.replace(f'cert = "{pki.dir}/server.pem"', f'cert = "{cert_dir}/server.pem"')
        text = text.replace(f'key = "{pki.dir}/server.key"', f'key = "{cert_dir}/server.key"')
    config.write_text(text)
    return ServeProcess(config, 0, 0, pki)
