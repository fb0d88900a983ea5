"""What the client repeats when an answer is lost: real ``broker`` runs through a proxy that
lets a request reach the real broker, waits until the broker has carried it out, and then
drops the answer (the connection closes instead), as a network failure at the worst moment
would.

Starting a family and refreshing must not be repeated (a second family, or a refresh token
presented again); a release may be, and a retry that finds the family gone is a success.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tests.conftest import RunningBroker, module_broker, token_is_valid
from tests.test_cli import assert_one_line_error, broker_cli, job_env, secrets_of

pytestmark = pytest.mark.asyncio(loop_scope="module")

PER_JOB = {"mode": "per-job", "ttl": "60s", "grace": "2s", "allow": ["cn:job"]}

b = module_broker("cli-client", {"demo": {}, "deploy": PER_JOB})


class AnswerDropper:
    """A TCP proxy in front of the broker's API port. Bytes pass both ways, except the first
    answer bytes the broker sends once ``acted()`` holds: both connections are closed instead.
    With ``refuse_first``, the first connection is closed before a byte passes (that request
    certainly never reached the broker). TLS passes through untouched, so the client still
    verifies the real broker."""

    def __init__(self, broker_port: int, acted: Callable[[], bool] = lambda: False, *,
                 refuse_first: bool = False) -> None:
        self._broker_port = broker_port
        self._acted = acted
        self._refuse_first = refuse_first
        self.connections = 0
        self.dropped = 0

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[int]:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        try:
            yield server.sockets[0].getsockname()[1]
        finally:
            server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self._refuse_first and self.connections == 1:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._broker_port)
        pipes = [asyncio.create_task(self._pipe(reader, up_writer, answers=False)),
                 asyncio.create_task(self._pipe(up_reader, writer, answers=True))]
        await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        for pipe in pipes:
            pipe.cancel()
        for w in (writer, up_writer):
            w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, answers: bool) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if answers and not self.dropped and self._acted():
                    self.dropped += 1
                    return
                writer.write(data)
                await writer.drain()


def _count(b: RunningBroker, outcome: str) -> float:
    return b.metric("broker_token_requests_total", profile="deploy", outcome=outcome) or 0.0


def _live_families(b: RunningBroker) -> set[str]:
    assert b.broker.families is not None
    return {family.id for family in b.broker.families.families}


def _via(b: RunningBroker, port: int) -> dict[str, str]:
    return job_env(b, BROKER_URL=f"https://localhost:{port}")


async def _start(b: RunningBroker, refresh_file: Path) -> dict[str, object]:
    run = await broker_cli("get", "deploy", "--refresh-file", str(refresh_file), env=job_env(b))
    assert run.code == 0, run
    b.seen_secrets.add(run.out.strip())
    kept: dict[str, object] = json.loads(refresh_file.read_text())
    b.seen_secrets.add(str(kept["refresh_token"]))
    return kept


async def test_get_does_not_start_a_second_family_after_a_lost_answer(b: RunningBroker, tmp_path: Path) -> None:
    before = _count(b, "family_created")
    refresh_file = tmp_path / "deploy.refresh"
    dropper = AnswerDropper(b.broker.api_port, lambda: _count(b, "family_created") > before)
    async with dropper.running() as port:
        run = await broker_cli("get", "deploy", "--refresh-file", str(refresh_file), "--retries", "3",
                               env=_via(b, port))
    assert_one_line_error(run, 1, "closed the connection", "not retried", "family_max_age", secrets=secrets_of(b))
    assert dropper.dropped == 1 and dropper.connections == 1, "one try: the broker may have acted on it"
    assert _count(b, "family_created") == before + 1
    assert not refresh_file.exists()


async def test_refresh_is_not_repeated_after_a_lost_answer(b: RunningBroker, tmp_path: Path) -> None:
    refresh_file = tmp_path / "deploy.refresh"
    kept = await _start(b, refresh_file)
    refreshed, retried = _count(b, "refreshed"), _count(b, "refresh_retried")
    dropper = AnswerDropper(b.broker.api_port, lambda: _count(b, "refreshed") > refreshed)
    async with dropper.running() as port:
        run = await broker_cli("refresh", "--refresh-file", str(refresh_file), "--retries", "3", env=_via(b, port))
    assert_one_line_error(run, 1, "not retried", "run broker refresh again", "reuse_interval", secrets=secrets_of(b))
    assert dropper.dropped == 1 and dropper.connections == 1
    assert (_count(b, "refreshed"), _count(b, "refresh_retried")) == (refreshed + 1, retried)
    assert json.loads(refresh_file.read_text()) == kept, "the file still holds the refresh token just spent"

    # What the message advises: run it again now, and the broker answers with the pair it issued.
    run = await broker_cli("refresh", "--refresh-file", str(refresh_file), env=job_env(b))
    assert run.code == 0, run
    b.seen_secrets.add(run.out.strip())
    assert token_is_valid(b.vault, run.out.strip())
    assert (_count(b, "refreshed"), _count(b, "refresh_retried")) == (refreshed + 1, retried + 1)
    assert json.loads(refresh_file.read_text())["generation"] == 2
    assert (await broker_cli("release", "--refresh-file", str(refresh_file), env=job_env(b))).code == 0


async def test_release_retried_after_a_lost_answer_finds_the_family_gone(b: RunningBroker, tmp_path: Path) -> None:
    refresh_file = tmp_path / "deploy.refresh"
    family = (await _start(b, refresh_file))["family"]
    dropper = AnswerDropper(b.broker.api_port, lambda: family not in _live_families(b))
    async with dropper.running() as port:
        run = await broker_cli("release", "--refresh-file", str(refresh_file), "--retries", "2", env=_via(b, port))
    assert run.code == 0, run
    assert run.out == "" and "Traceback" not in run.err
    (line,) = run.err.splitlines()
    assert "already gone" in line and str(family) in line and str(refresh_file) in line
    assert dropper.dropped == 1 and dropper.connections == 2, "released by the first try, 404 to the retry"
    assert not refresh_file.exists()


async def test_release_after_a_refused_connection_still_reports_a_404(b: RunningBroker, tmp_path: Path) -> None:
    """A retry's 404 means "released already" only if an earlier try may have reached the
    broker; after a try that never got through the handshake, it is the broker's plain answer."""
    refresh_file = tmp_path / "deploy.refresh"
    await _start(b, refresh_file)
    copy = tmp_path / "copy.refresh"
    copy.write_text(refresh_file.read_text())
    assert (await broker_cli("release", "--refresh-file", str(refresh_file), env=job_env(b))).code == 0
    dropper = AnswerDropper(b.broker.api_port, refuse_first=True)
    async with dropper.running() as port:
        run = await broker_cli("release", "--refresh-file", str(copy), "--retries", "2", env=_via(b, port))
    assert_one_line_error(run, 1, "404", "not_found", "moved the refresh file to", secrets=secrets_of(b))
    assert dropper.connections == 2 and not copy.exists() and copy.with_name("copy.refresh.ended").exists()


@pytest.mark.parametrize(("action", "runs"), [("revoke", 1), ("rotate", 2)])
async def test_admin_revoke_is_not_repeated_after_a_lost_answer_rotate_is(b: RunningBroker, action: str,
                                                                         runs: int) -> None:
    """A second revoke would revoke the token the first one minted, which jobs may already hold;
    a second rotation is harmless."""
    b.remember_tokens()
    before = b.generation()
    dropper = AnswerDropper(b.broker.api_port, lambda: b.generation() > before)
    async with dropper.running() as port:
        env = job_env(b, "ops", BROKER_URL=f"https://localhost:{port}")
        run = await broker_cli(action, "demo", "--retries", "2", env=env)
    b.remember_tokens()
    assert dropper.dropped == 1 and dropper.connections == runs
    assert b.generation() == before + runs
    if action == "revoke":
        assert_one_line_error(run, 1, "not retried", "run broker revoke again", secrets=secrets_of(b))
    else:
        assert run.code == 0, run
        assert json.loads(run.out)["generation"] == before + 2

