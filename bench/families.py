"""Per-job families at scale: what one family operation costs the event loop with N families live.

    python -m bench.families                      # N = 100, 1,000, 10,000; about 30 s
    python -m bench.families --families 1000 --ops 200

Every start, refresh and release of a family rewrites ``[state] dir/families.json`` (0600,
atomic, fsync) before the job gets its answer. The write itself runs on a worker thread; what
runs on the event loop (turning the families into JSON) stalls every other request meanwhile,
shared-profile fetches included. This measures exactly that path, ``FamilyManager._persist``,
on a real state directory: per operation, the wall time (what the job waits) and the longest
event-loop stall seen by a 1 ms ticker (what everyone else waits). Vault is not involved; the
mint of a refresh is the same with 10 families or 10,000.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as ``python bench/families.py``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker.tokens.families import Family, FamilyManager, LiveToken, new_family_id  # noqa: E402
from broker.tokens.store import StateStore  # noqa: E402


def _family(i: int, now: float) -> Family:
    """A family as a job five refreshes in leaves it: three spent refresh-token hashes."""
    return Family(
        id=new_family_id(), profile="deploy", owner_fp=f"{i:064x}", owner_identity=f"uri:spiffe://ci/job/{i}",
        created_at=now, expires_at=now + 86400, generation=5,
        current=LiveToken(accessor=f"acc{i:021d}", generation=5, token_fp=f"{i:016x}", expires_at=now + 1800),
        current_hash=f"{i:064x}", previous_hash=f"{i + 1:064x}", previous_spent_at=now,
        spent_hashes=tuple(f"{i + k:064x}" for k in range(2, 5)),
    )


def _manager(state: Path, families: int) -> FamilyManager:
    # Only the store and the families take part in persisting; the rest is never touched here.
    none: Any = None
    manager = FamilyManager({}, none, none, none, StateStore(state), none, none, none)
    now = time.time()
    manager._families = {f.id: f for f in (_family(i, now) for i in range(families))}
    return manager


async def _measure(families: int, ops: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        manager = _manager(Path(tmp), families)
        await manager._persist()  # the file exists, as in a running broker
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
        ids = list(manager._families)
        for n in range(ops):
            family = manager._families[ids[n % len(ids)]]
            manager._families[family.id] = dataclasses.replace(family, generation=family.generation + 1)
            started = time.perf_counter()
            await manager._persist()
            walls.append(time.perf_counter() - started)
        done.set()
        await tick
        size = (Path(tmp) / "families.json").stat().st_size
    return {"families": families, "wall_p50_ms": statistics.median(walls) * 1e3,
            "stall_max_ms": max(stalls) * 1e3, "file_kb": size / 1e3}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.families", description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default="100,1000,10000", help="comma-separated counts of live families")
    parser.add_argument("--ops", type=int, default=50, help="family operations per count")
    args = parser.parse_args(argv)
    rows = [asyncio.run(_measure(int(n), args.ops)) for n in args.families.split(",")]
    print("| live families | families.json | per operation, wall p50 | longest event-loop stall |")
    print("|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['families']:,.0f} | {row['file_kb']:,.0f} kB | {row['wall_p50_ms']:.1f} ms "
              f"| {row['stall_max_ms']:.1f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
