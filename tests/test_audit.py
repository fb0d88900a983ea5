"""The audit log: format, mode, torn-line repair, and what happens when it cannot be written."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from broker.audit import AuditLog, repair_torn_tail
from tests.conftest import BrokerFactory, token_is_valid
from tests.fakes import FakeClock

AUDIT_KEYS = {"ts", "event", "profile", "identity", "generation", "token_fp", "outcome", "reason"}


def test_events_are_json_lines_mode_0600(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl", FakeClock())
    audit.open()
    audit.event("token_served", profile="demo", identity="cn:job", generation=3, token_fp="0123456789abcdef")
    audit.event("vault_login", method="approle")
    audit.close()
    assert stat.S_IMODE(os.stat(tmp_path / "audit.jsonl").st_mode) == 0o600
    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert AUDIT_KEYS <= set(lines[0]) and lines[0]["generation"] == 3 and lines[0]["ts"].endswith("Z")
    assert lines[1]["method"] == "approle"


def test_reopen_moves_to_a_new_file_and_keeps_the_old_one_if_it_cannot(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, FakeClock())
    audit.open()
    audit.event("vault_login", method="approle")
    path.rename(tmp_path / "audit.jsonl.1")
    audit.reopen()
    audit.event("token_minted", profile="demo")
    assert [json.loads(line)["event"] for line in path.read_text().splitlines()] == ["token_minted"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    path.rename(tmp_path / "audit.jsonl.2")
    path.mkdir()  # nothing can be opened at the path now
    with caplog.at_level(logging.ERROR, logger="broker.audit"):
        audit.reopen()
    assert "audit_reopen_failed" in caplog.text and "writing to the file already open" in caplog.text
    audit.event("token_rotated", profile="demo")  # still written, to the file already open
    assert audit.healthy
    audit.close()
    assert [json.loads(line)["event"] for line in (tmp_path / "audit.jsonl.2").read_text().splitlines()] == [
        "token_minted", "token_rotated"]


def test_unknown_event_names_are_refused(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl", FakeClock())
    audit.open()
    try:
        audit.event("token_sold")
    except ValueError as exc:
        assert "token_sold" in str(exc)
    else:
        raise AssertionError("an unknown event was written")


def test_a_torn_last_line_is_cut_on_open(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text('{"event":"token_served"}\n{"event":"token_rot')
    audit = AuditLog(path, FakeClock())
    audit.open()
    audit.event("token_rotated", profile="demo")
    audit.close()
    lines = path.read_text().splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["token_served", "token_rotated"]
    assert not repair_torn_tail(path), "nothing left to repair"


async def _start_with_audit(brokers: BrokerFactory, tmp_path: Path, on_failure: str):  # type: ignore[no-untyped-def]
    directory = tmp_path / f"audit-{on_failure}"
    directory.mkdir()
    (directory / "audit.jsonl").symlink_to("/dev/full")  # every write fails with ENOSPC, as on a full disk
    return await brokers.start(directory=directory, audit_on_failure=on_failure)


async def test_full_disk_refuses_tokens_it_cannot_audit(brokers: BrokerFactory, tmp_path: Path) -> None:
    b = await _start_with_audit(brokers, tmp_path, "refuse")
    status, body, headers = await b.request("GET", "/v1/tokens/demo")
    assert status == 503 and body["error"] == "audit_unavailable"
    assert "audit log" in body["message"] and headers["Retry-After"]
    assert b.metric("broker_token_requests_total", profile="demo", outcome="audit_unavailable") == 1
    b.broker.audit.reopen()  # SIGHUP (logrotate) while the disk is still full: still not ready
    status, ready = await b.ops("/readyz")
    assert status == 503 and "audit log cannot be written" in ready["problems"] and ready["audit"] == "failing"
    assert b.broker.cache.get("demo").current is not None, "rotation goes on; only serving stops"
    assert (await b.ops("/healthz"))[0] == 200


async def test_on_failure_continue_keeps_serving(brokers: BrokerFactory, tmp_path: Path) -> None:
    b = await _start_with_audit(brokers, tmp_path, "continue")
    body = await b.get_token()
    assert token_is_valid(b.vault, body["token"])
    status, ready = await b.ops("/readyz")
    assert status == 200 and ready["audit"] == "failing"


def test_token_and_login_values_never_show_in_repr_or_str() -> None:
    from broker.tokens.model import Token
    from broker.tokens.store import PendingRevocation
    from broker.vault.client import Login, Minted

    secret = "s.SuperSecretTokenValue1234567890"
    objects = [
        Token(value=secret, accessor="acc-SECRET", generation=1, issued_at=0, expires_at=10, rotate_at=5),
        Login(token=secret, accessor="acc-SECRET", ttl=10, renewable=True),
        Minted(token=secret, accessor="acc-SECRET", ttl=10, orphan=True),
        PendingRevocation(accessor="acc-SECRET", profile="demo", generation=1, token_fp="f", revoke_at=1),
    ]
    for obj in objects:
        for text in (repr(obj), str(obj)):
            assert secret not in text and "acc-SECRET" not in text, text


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_directories_made_for_the_audit_log_are_0700(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)  # the usual umask, which left them 0755
    try:
        tmp_path.chmod(0o755)
        audit = AuditLog(tmp_path / "logs" / "broker" / "audit.jsonl", FakeClock())
        audit.open()
        audit.event("token_served", profile="demo")
        audit.close()
    finally:
        os.umask(old_umask)
    assert audit.healthy
    assert (_mode(tmp_path / "logs"), _mode(tmp_path / "logs" / "broker")) == (0o700, 0o700)
    assert _mode(tmp_path) == 0o755, "a directory that was there already is left alone"
    assert _mode(tmp_path / "logs" / "broker" / "audit.jsonl") == 0o600


def test_directories_made_for_state_files_are_0700(tmp_path: Path) -> None:
    from broker.files import write_atomic

    old_umask = os.umask(0o022)
    try:
        write_atomic(tmp_path / "var" / "state" / "families.json", b"[]")
    finally:
        os.umask(old_umask)
    assert (_mode(tmp_path / "var"), _mode(tmp_path / "var" / "state")) == (0o700, 0o700)
    assert _mode(tmp_path / "var" / "state" / "families.json") == 0o600


def test_the_state_store_makes_its_directory_and_parents_0700(tmp_path: Path) -> None:
    from broker.tokens.store import StateStore

    old_umask = os.umask(0o022)
    try:
        StateStore(tmp_path / "srv" / "broker" / "state").prepare()
    finally:
        os.umask(old_umask)
    assert [_mode(tmp_path / p) for p in ("srv", "srv/broker", "srv/broker/state")] == [0o700] * 3


async def test_a_broker_keeps_its_state_directory_private(brokers: BrokerFactory) -> None:
    b = await brokers.start()
    assert _mode(b.broker.config.state.dir) == 0o700
    assert _mode(b.audit_path) == 0o600


SHORT_WRITE = """
import json, os, resource, signal, sys
from pathlib import Path
from broker.audit import AuditLog
from broker.errors import AuditUnavailable
from tests.fakes import FakeClock
path = Path(sys.argv[1])
audit = AuditLog(path, FakeClock())
audit.open()
audit.event("vault_login", method="approle")
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit is cut short, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size + 20, resource.RLIM_INFINITY))
try:
    audit.event("token_served", profile="demo", identity="cn:job", generation=1, token_fp="0123456789abcdef")
except AuditUnavailable:
    print("refused")
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
audit.event("token_rotated", profile="demo")
"""


def test_a_line_a_full_disk_cut_short_is_taken_back(tmp_path: Path) -> None:
    """Not left in the middle of the file for the next event to be glued onto."""
    path = tmp_path / "audit.jsonl"
    ran = subprocess.run([sys.executable, "-c", SHORT_WRITE, str(path)], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parent.parent)
    assert ran.returncode == 0 and ran.stdout == "refused\n", ran
    assert [json.loads(line)["event"] for line in path.read_text().splitlines()] == ["vault_login", "token_rotated"]


def test_an_existing_audit_file_others_can_read_is_made_0600(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text('{"ts":"2026-01-01T00:00:00.000Z","event":"token_served"}\n')
    path.chmod(0o644)
    audit = AuditLog(path, FakeClock())
    audit.open()
    audit.event("token_served", profile="demo")
    audit.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(path.read_text().splitlines()) == 2, "appended, the old line kept"


def test_timestamps_are_utc_whatever_the_local_time_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from broker.audit import rfc3339

    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        assert rfc3339(0.25) == "1970-01-01T00:00:00.250Z"
        assert rfc3339(1_800_000_000.5) == "2027-01-15T08:00:00.500Z"
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
