"""What must survive a restart: pending revocations and each profile's last generation.

Only accessors, fingerprints and times are stored (never token values), in 0600 JSON files
replaced atomically (temp file, fsync, rename, fsync of the directory), so a crash at any
moment leaves either the old file or the new one.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from broker.files import write_atomic


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


@dataclass(frozen=True)
class PendingRevocation:
    accessor: str = field(repr=False)
    profile: str
    generation: int
    token_fp: str
    revoke_at: float
    family: str | None = None  # set for a per-job family's tokens


@dataclass(frozen=True)
class IssuedRecord:
    """The profile's current token as a restart needs to know it: to revoke it after grace."""

    accessor: str = field(repr=False)
    generation: int
    token_fp: str
    expires_at: float


class StateStore:
    """Writes go to a worker thread (two fsyncs cost milliseconds, and the event loop serves
    fetches meanwhile), one at a time per file and in call order, so the newest snapshot always
    lands last. The caller awaits the write: nothing is published before it is durable."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._revocations = directory / "revocations.json"
        self._profiles = directory / "profiles.json"
        self._families = directory / "families.json"
        self._issued: dict[str, IssuedRecord] | None = None
        self._locks: dict[Path, asyncio.Lock] = {}

    def prepare(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    async def _write(self, path: Path, data: bytes) -> None:
        async with self._locks.setdefault(path, asyncio.Lock()):
            await asyncio.to_thread(write_atomic, path, data)

    def load_revocations(self) -> list[PendingRevocation]:
        return [PendingRevocation(**item) for item in read_json(self._revocations) or []]

    async def save_revocations(self, pending: list[PendingRevocation]) -> None:
        await self._write(self._revocations, json.dumps([asdict(p) for p in pending], indent=1).encode())

    def load_issued(self) -> dict[str, IssuedRecord]:
        if self._issued is None:
            raw = read_json(self._profiles) or {}
            self._issued = {name: IssuedRecord(**item) for name, item in raw.items()}
        return dict(self._issued)

    async def set_issued(self, profile: str, record: IssuedRecord) -> None:
        issued = self.load_issued()
        issued[profile] = record
        self._issued = issued
        await self._write(self._profiles, json.dumps({k: asdict(v) for k, v in issued.items()}, indent=1).encode())

    def load_families(self) -> list[dict[str, Any]]:
        return list(read_json(self._families) or [])

    async def save_families(self, families: list[dict[str, Any]]) -> None:
        await self._write(self._families, json.dumps(families, indent=1).encode())
