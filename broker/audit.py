"""Append-only JSON Lines audit log: one object per token event, written and flushed per event.

Each line goes out in a single ``write`` on an ``O_APPEND`` descriptor, so concurrent writers
never interleave and a crash leaves at most one partial last line, which ``open`` repairs.
Callers pass token *fingerprints*, never values: ``token_fp`` is the only token field here.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import stat
import time
from pathlib import Path
from typing import Any

from broker.clock import Clock
from broker.errors import AuditUnavailable
from broker.files import make_private_dir

log = logging.getLogger("broker.audit")

EVENTS = frozenset({
    "token_served", "token_denied", "token_minted", "token_rotated", "token_revoked",
    "rotation_failed", "rotation_rolled_back", "vault_login", "vault_login_failed", "vault_logout",
    "admin_rotate", "admin_revoke", "family_created", "family_refreshed", "family_revoked",
    "reuse_detected", "token_invalidated", "secret_id_rotated", "check_failed",
})


def rfc3339(ts: float) -> str:
    """UTC with milliseconds, e.g. 2026-11-26T01:55:27.123Z."""
    seconds = int(ts)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int((ts - seconds) * 1000):03d}Z"


# One encoder, built once: json.dumps(..., separators=...) builds a new JSONEncoder per call.
_LINE_ENCODER = json.JSONEncoder(separators=(",", ":"))
_FIELDS = ("event", "profile", "identity", "generation", "token_fp", "outcome", "reason")  # after "ts"


def _render_fields(key: tuple[Any, ...]) -> str:
    return _LINE_ENCODER.encode(dict(zip(_FIELDS, key)))


def repair_torn_tail(path: Path) -> bool:
    """Cut a partial last line left by a crash mid-write; returns True if something was cut."""
    try:
        with open(path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return False
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return False
            keep = 0
            chunk_end = size
            while chunk_end > 0 and keep == 0:
                start = max(0, chunk_end - 65536)
                f.seek(start)
                nl = f.read(chunk_end - start).rfind(b"\n")
                if nl >= 0:
                    keep = start + nl + 1
                chunk_end = start
            f.truncate(keep)
            return True
    except FileNotFoundError:
        return False


class AuditLog:
    """``refuse_on_failure``: an event that cannot be written raises AuditUnavailable (and the
    API hands out no token); otherwise the failure is logged and the event dropped."""

    RENDERED_LIMIT = 4096  # distinct events kept rendered

    def __init__(self, path: Path, clock: Clock, refuse_on_failure: bool = True) -> None:
        self.path = path
        self._clock = clock
        self._refuse = refuse_on_failure
        self._fd: int | None = None
        self.healthy = True
        self._second = -1
        self._second_text = ""
        # Everything but the timestamp, JSON-encoded once per distinct event: every fetch of a
        # profile by one identity writes the same fields until the next rotation.
        self._render = functools.lru_cache(maxsize=self.RENDERED_LIMIT)(_render_fields)

    def open(self) -> None:
        """Open for appending; a failure here is reported like a failed write, not fatal,
        so the broker starts, says what is wrong, and recovers once the file is writable."""
        try:
            self._fd = self._open_path()
            self.healthy = True
        except OSError as exc:
            self._fd = None
            self.healthy = False
            log.error("audit_open_failed path=%s error=%s", self.path, exc.strerror or exc)

    def reopen(self) -> None:
        """Write to whatever file is at ``path`` now (SIGHUP, after logrotate renamed the old
        one). The old descriptor is closed only once the new one is open, so no event is lost;
        if the new one cannot be opened, events keep going where they went."""
        try:
            fd = self._open_path()
        except OSError as exc:
            log.error("audit_reopen_failed path=%s error=%s action=writing to the file already open",
                      self.path, exc.strerror or exc)
            return
        old, self._fd = self._fd, fd
        if old is not None:
            os.close(old)
        # ``healthy`` stays what the last write made it: opening a file on a full disk works,
        # and readiness must not flip to ready until an event is written again.
        log.info("audit_reopened path=%s", self.path)

    def _open_path(self) -> int:
        make_private_dir(self.path.parent)
        if repair_torn_tail(self.path):
            log.warning("audit_repaired path=%s reason=partial last line from an interrupted write was removed",
                        self.path)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                os.fchmod(fd, 0o600)
        except OSError:
            os.close(fd)
            raise
        return fd

    def _timestamp(self) -> str:
        """rfc3339(now), with the part before the milliseconds formatted once per second:
        every served token writes a line."""
        now = self._clock.now()
        second = int(now)
        if second != self._second:
            self._second, self._second_text = second, rfc3339(second)[:-5]
        return f"{self._second_text}.{int((now - second) * 1000):03d}Z"

    def _cut_partial(self, written: int) -> None:
        """Take back the start of a line a full disk cut short: left there, the next event would
        be glued onto it and both lost to JSON Lines readers (a torn *last* line is repaired at
        start; this one would sit in the middle of the file)."""
        if self._fd is None or written <= 0:
            return
        try:
            os.ftruncate(self._fd, os.lseek(self._fd, 0, os.SEEK_END) - written)
        except OSError as exc:
            log.error("audit_repair_failed path=%s error=%s", self.path, exc.strerror or exc)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def event(
        self,
        event: str,
        *,
        profile: str | None = None,
        identity: str | None = None,
        generation: int | None = None,
        token_fp: str | None = None,
        outcome: str = "ok",
        reason: str | None = None,
        **extra: str | int | list[str] | None,
    ) -> None:
        """Write one event; raises AuditUnavailable if it could not be written durably."""
        if event not in EVENTS:
            raise ValueError(f"unknown audit event {event!r}")
        key = (event, profile, identity, generation, token_fp, outcome, reason)
        if extra:
            rest = _LINE_ENCODER.encode({**dict(zip(_FIELDS, key)), **extra})
        else:
            rest = self._render(key)
        line = f'{{"ts":"{self._timestamp()}",{rest[1:]}\n'.encode()
        try:
            if self._fd is None:
                self.open()
            if self._fd is None:
                raise OSError("the audit log could not be opened")
            written = os.write(self._fd, line)
            if written != len(line):
                self._cut_partial(written)
                raise OSError(f"short write ({written} of {len(line)} bytes)")
        except OSError as exc:
            self.healthy = False
            log.error("audit_write_failed path=%s event=%s error=%s", self.path, event, exc.strerror or exc)
            if self._refuse:
                raise AuditUnavailable(f"cannot write audit log {self.path}: {exc.strerror or exc}") from None
            return
        self.healthy = True
