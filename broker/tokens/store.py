"""What must survive a restart: pending revocations and each profile's last generation.

Only accessors, fingerprints and times are stored (never token values), in 0600 JSON files
replaced atomically (temp file, fsync, rename, fsync of the directory), so a crash at any
moment leaves either the old file or the new one.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Generic, TypeVar

from broker.errors import BrokerError
from broker.files import make_private_dir, write_atomic


class StateCorrupt(BrokerError):
    """A state file exists but is not what the broker writes. Starting anyway would mean
    guessing which revocations were promised, so the broker refuses to start and says which
    file to fix or move aside (the CLI prints this one line and exits 1)."""


def read_json(path: Path) -> Any:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return json.loads(data)
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
        raise _corrupt(path, f"it is not valid JSON ({exc})") from None


def _corrupt(path: Path, problem: str) -> StateCorrupt:
    return StateCorrupt(
        f"state file {path} is unusable: {problem}; restore it from a backup, or move it aside and "
        "start again (tokens it lists for revocation are then left to expire at their TTL)")


@dataclass(frozen=True)
class PendingRevocation:
    accessor: str = field(repr=False)
    profile: str
    generation: int
    token_fp: str
    revoke_at: float
    family: str | None = None  # set for a per-job family's tokens
    reason: str = "grace_ended"  # why it is revoked, for the audit line when the queue does it


@dataclass(frozen=True)
class IssuedRecord:
    """The profile's current token as a restart needs to know it: to revoke it after grace."""

    accessor: str = field(repr=False)
    generation: int
    token_fp: str
    expires_at: float


_TYPES: dict[str, tuple[type, ...]] = {
    "accessor": (str,), "profile": (str,), "generation": (int,), "token_fp": (str,),
    "revoke_at": (int, float), "expires_at": (int, float), "family": (str, type(None)),
    "reason": (str,),
}
Record = TypeVar("Record", PendingRevocation, IssuedRecord)
Parsed = TypeVar("Parsed")


def checked_fields(item: Any, types: Mapping[str, tuple[type, ...]], required: Iterable[str],
                   where: str) -> dict[str, Any]:
    """``item`` if it is a JSON object with only these keys, at least the required ones, each of
    its type; ValueError naming what is wrong otherwise (a wrong entry is named, not guessed at)."""
    if not isinstance(item, dict):
        raise ValueError(f"{where} is not a JSON object")
    unknown = sorted(set(item) - set(types))
    if unknown:
        raise ValueError(f"{where} has unknown keys {', '.join(unknown)}")
    missing = sorted(set(required) - set(item))
    if missing:
        raise ValueError(f"{where} lacks {', '.join(missing)}")
    for key, value in item.items():
        if isinstance(value, bool) or not isinstance(value, types[key]):  # bool is an int to Python
            raise ValueError(f"{where} has a {type(value).__name__} for {key}")
    return item


def _record(cls: type[Record], item: Any, path: Path, where: str) -> Record:
    """One entry of a state file, checked field by field."""
    names = [f.name for f in fields(cls)]
    required = [f.name for f in fields(cls) if f.default is MISSING]  # files older than a field lack it
    try:
        return cls(**checked_fields(item, {name: _TYPES[name] for name in names}, required, where))
    except ValueError as exc:
        raise _corrupt(path, str(exc)) from None


def json_line(item: Mapping[str, Any]) -> str:
    return json.dumps(item, separators=(",", ":"))


def json_list(lines: list[str]) -> bytes:
    """A JSON list with one item a line: ``grep`` finds an accessor's or a family's entry."""
    return ("[\n" + ",\n".join(lines) + "\n]\n").encode()


Entry = TypeVar("Entry")


class EncodedLines(Generic[Entry]):
    """Each entry's line of a state file, kept while the entry is the same (frozen) object: the
    file is rewritten on every change, and encoding thousands of unchanged entries each time
    stalled the event loop for tens of milliseconds (bench/families.py)."""

    def __init__(self, key: Callable[[Entry], str], encode: Callable[[Entry], str]) -> None:
        self._key = key
        self._encode = encode
        self._known: dict[str, tuple[Entry, str]] = {}

    def __call__(self, entries: Iterable[Entry]) -> list[str]:
        """The lines of ``entries``, in order; only entries new since the last call are encoded."""
        known: dict[str, tuple[Entry, str]] = {}
        for entry in entries:
            key = self._key(entry)
            seen = self._known.get(key)
            known[key] = seen if seen is not None and seen[0] is entry else (entry, self._encode(entry))
        self._known = known
        return [line for _, line in known.values()]


class StateStore:
    """Writes go to a worker thread (two fsyncs cost milliseconds, and the event loop serves
    fetches meanwhile), one at a time per file and in call order, so the newest snapshot always
    lands last. The caller awaits the write: nothing is published before it is durable.

    Loading validates every entry and raises ``StateCorrupt`` naming the file."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._revocations = directory / "revocations.json"
        self._profiles = directory / "profiles.json"
        self._families = directory / "families.json"
        self._issued: dict[str, IssuedRecord] | None = None
        self._locks: dict[Path, asyncio.Lock] = {}
        self._revocation_lines = EncodedLines[PendingRevocation](lambda e: e.accessor, lambda e: json_line(asdict(e)))

    def prepare(self) -> None:
        make_private_dir(self.directory)

    def _lock(self, path: Path) -> asyncio.Lock:
        return self._locks.setdefault(path, asyncio.Lock())

    async def _write(self, path: Path, data: bytes | Callable[[], bytes]) -> None:
        """``data``, or a function making it on the worker thread (a large file is assembled
        there, not on the event loop)."""
        async with self._lock(path):
            await self._write_locked(path, data)

    @staticmethod
    async def _write_locked(path: Path, data: bytes | Callable[[], bytes]) -> None:
        await asyncio.to_thread(lambda: write_atomic(path, data() if callable(data) else data))

    def load_revocations(self) -> list[PendingRevocation]:
        raw = read_json(self._revocations)
        if raw is None:
            return []
        if not isinstance(raw, list):
            raise _corrupt(self._revocations, "it is not a JSON list")
        return [_record(PendingRevocation, item, self._revocations, f"entry {i + 1}") for i, item in enumerate(raw)]

    async def save_revocations(self, pending: list[PendingRevocation]) -> None:
        lines = self._revocation_lines(pending)
        await self._write(self._revocations, lambda: json_list(lines))

    def load_issued(self) -> dict[str, IssuedRecord]:
        if self._issued is None:
            raw = read_json(self._profiles)
            if raw is None:
                raw = {}
            if not isinstance(raw, dict):
                raise _corrupt(self._profiles, "it is not a JSON object")
            self._issued = {name: _record(IssuedRecord, item, self._profiles, f"profile {name[:64]!r}")
                            for name, item in raw.items()}
        return dict(self._issued)

    async def set_issued(self, profile: str, record: IssuedRecord) -> None:
        await self._change_issued(lambda issued: {**issued, profile: record})

    async def forget_issued(self, profiles: Iterable[str]) -> None:
        gone = set(profiles)
        await self._change_issued(lambda issued: {k: v for k, v in issued.items() if k not in gone})

    async def _change_issued(self, change: Callable[[dict[str, IssuedRecord]], dict[str, IssuedRecord]]) -> None:
        # Read, change and write under the file's lock: two profiles rotating at once (every
        # start) must not each write a file without the other's record.
        async with self._lock(self._profiles):
            issued = change(self.load_issued())
            data = json.dumps({k: asdict(v) for k, v in issued.items()}, indent=1).encode()
            await self._write_locked(self._profiles, data)
            # Only now: a failed write leaves the file, and so what a restart retires, unchanged.
            self._issued = issued

    def load_families(self, parse: Callable[[Any, str], Parsed]) -> list[Parsed]:
        """Each entry through ``parse(item, where)``, which raises ValueError for a bad one."""
        raw = read_json(self._families)
        if raw is None:
            return []
        if not isinstance(raw, list):
            raise _corrupt(self._families, "it is not a JSON list")
        try:
            return [parse(item, f"entry {i + 1}") for i, item in enumerate(raw)]
        except ValueError as exc:
            raise _corrupt(self._families, str(exc)) from None

    async def save_families(self, lines: Callable[[], list[str]]) -> None:
        """``lines()``: each family as one line of JSON (``json_line``), asked for on the event
        loop once the file's lock is held. A snapshot taken earlier, while another write waited
        on the lock, could put on disk a change that write's failure then took back."""
        async with self._lock(self._families):
            data = lines()
            await self._write_locked(self._families, lambda: json_list(data))
