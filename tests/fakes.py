"""Fakes for pure logic and time only (the project's rule): a clock tests drive by hand."""

from __future__ import annotations

import asyncio
import heapq
import itertools


class FakeClock:
    """``sleep`` waits until a test calls ``advance``; nothing ever sleeps in real time."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._start = start
        self._now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self.sleeps: list[float] = []  # every duration asked for, for assertions on backoff

    def now(self) -> float:
        return self._now

    @property
    def waiting(self) -> int:
        """Sleeps not yet woken: a test advancing time before a task has gone to sleep would
        leave that task sleeping from the later time."""
        return sum(1 for _, _, future in self._sleepers if not future.done())

    def monotonic(self) -> float:
        return self._now - self._start

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + max(0.0, seconds), next(self._seq), future))
        await future

    async def settle(self) -> None:
        """Let every task that can run, run (including work on Vault's threads)."""
        for _ in range(20):
            await asyncio.sleep(0)

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking every sleeper due by then, including sleepers that woken
        tasks start along the way. Epoch-sized floats lose ~1e-7 s in ``now + (t - now)``, so
        "due" allows that much."""
        target = self._now + seconds
        while True:
            while self._sleepers and self._sleepers[0][0] <= target + EPSILON:
                due, _, future = heapq.heappop(self._sleepers)
                self._now = max(self._now, min(due, target))
                if not future.done():
                    future.set_result(None)
                await self.settle()
            self._now = max(self._now, target)
            await self.settle()
            if not (self._sleepers and self._sleepers[0][0] <= target + EPSILON):
                return


EPSILON = 1e-6
