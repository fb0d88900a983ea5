"""Per-job families at scale: what the state writes of one family operation cost the event loop.

    python -m bench.families                      # N = 100, 1,000, 10,000; about 30 s
    python -m bench.families --families 1000 --ops 200

Every start, refresh and release of a family rewrites ``[state] dir/families.json`` before the
job gets its answer, and a refresh also queues the old token's revocation, which rewrites
``revocations.json`` (0600, atomic, fsync). The writes run on a worker thread; what runs on the
event loop (turning entries into JSON) stalls every other request meanwhile, shared-profile
fetches included. This measures exactly those two paths, ``FamilyManager._persist`` with N
families live and ``RevocationQueue.schedule`` with N revocations pending, on a real state
directory: per operation, the wall time (what the job waits) and the longest event-loop stall
seen by a 1 ms ticker (what everyone else waits). Vault is not involved: a mint costs the same
with 10 families or 10,000.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as ``python bench/families.py``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import CollectorRegistry  # noqa: E402

from broker.clock import SystemClock  # noqa: E402
from broker.metrics import Metrics  # noqa: E402
from broker.tokens.families import Family, FamilyManager, LiveToken, new_family_id  # noqa: E402
from broker.tokens.revocations import RevocationQueue  # noqa: E402
from broker.tokens.store import PendingRevocation, StateStore  # noqa: E402

UNUSED: Any = None  # collaborators the measured paths never touch (Vault, audit, ...)


def _family(i: int, now: float) -> Family:
    """A family as a job five refreshes in leaves it: three spent refresh-token hashes."""
    return Family(
        id=new_family_id(), profile="deploy", owner_fp=f"{i:064x}", owner_identity=f"uri:spiffe://ci/job/{i}",
        created_at=now, expires_at=now + 86400, generation=5,
        current=LiveToken(accessor=f"acc{i:021d}", generation=5, token_fp=f"{i:016x}", expires_at=now + 1800),
        current_hash=f"{i:064x}", previous_hash=f"{i + 1:064x}", previous_spent_at=now,
        spent_hashes=tuple(f"{i + k:064x}" for k in range(2, 5)),
    )


def _revocation(i: int, now: float) -> PendingRevocation:
    return PendingRevocation(accessor=f"acc{i:021d}", profile="deploy", generation=5, token_fp=f"{i:016x}",
                             revoke_at=now + 120, family=f"fam_{i:016d}")


def _families_op(state: Path, count: int) -> Callable[[int], Awaitable[None]]:
    """A refresh's families.json write, with ``count`` families live."""
    manager = FamilyManager({}, UNUSED, UNUSED, UNUSED, StateStore(state), UNUSED, UNUSED, UNUSED)
    now = time.time()
    manager._families = {f.id: f for f in (_family(i, now) for i in range(count))}
    ids = list(manager._families)

    async def op(n: int) -> None:
        family = manager._families[ids[n % len(ids)]]
        manager._families[family.id] = dataclasses.replace(family, generation=family.generation + 1)
        await manager._persist()

    return op


def _revocations_op(state: Path, count: int) -> Callable[[int], Awaitable[None]]:
    """A refresh's revocations.json write (its old token queued for after grace), with ``count``
    revocations pending."""
    queue = RevocationQueue(StateStore(state), UNUSED, UNUSED, SystemClock(), UNUSED, Metrics(CollectorRegistry()))
    now = time.time()
    queue._pending = [_revocation(i, now) for i in range(count)]

    async def op(n: int) -> None:
        await queue.schedule(_revocation(count + n, now))

    return op


async def _measure(make: Callable[[Path, int], Callable[[int], Awaitable[None]]], count: int, ops: int,
                   file: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        op = make(Path(tmp), count)
        await op(0)  # the file exists, as in a running broker
        stalls: list[float] = []
        done = asyncio.Event()

        async def ticker() -> None:
            loop = asyncio.get_running_loop()
            while not done.is_set():
                before = loop.time()
                await asyncio.sleep(0.001)
                stalls.append(loop.time() - before - 0.001)

        tick = asyncio.create_task(ticker())
        walls = []
        for n in range(1, ops + 1):
            started = time.perf_counter()
            await op(n)
            walls.append(time.perf_counter() - started)
        done.set()
        await tick
        size = (Path(tmp) / file).stat().st_size
    return {"count": count, "wall_p50_ms": statistics.median(walls) * 1e3, "stall_max_ms": max(stalls) * 1e3,
            "file_kb": size / 1e3}


def _table(title: str, rows: list[dict[str, float]]) -> None:
    print(f"| {title} | file | per operation, wall p50 | longest event-loop stall |")
    print("|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['count']:,.0f} | {row['file_kb']:,.0f} kB | {row['wall_p50_ms']:.1f} ms "
              f"| {row['stall_max_ms']:.1f} ms |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.families", description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default="100,1000,10000",
                        help="comma-separated counts of live families (and of pending revocations)")
    parser.add_argument("--ops", type=int, default=50, help="operations per count")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.families.split(",")]
    _table("live families (families.json)",
           [asyncio.run(_measure(_families_op, n, args.ops, "families.json")) for n in counts])
    print()
    _table("pending revocations (revocations.json)",
           [asyncio.run(_measure(_revocations_op, n, args.ops, "revocations.json")) for n in counts])
    return 0


if __name__ == "__main__":
    sys.exit(main())
