"""Time, injected: the rotator and the revocation queue never read the system clock directly.

``now()`` is wall-clock seconds since the epoch (token expiry is wall-clock time at Vault);
``monotonic()`` is for measuring durations. Tests inject ``FakeClock`` from ``tests``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float: ...

    def monotonic(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


async def sleep_or_wake(clock: Clock, seconds: float, wake: asyncio.Event) -> bool:
    """Sleep on ``clock`` for ``seconds`` unless ``wake`` is set first; True if woken.

    The event is cleared on wake-up, so each ``set()`` wakes the sleeper once.
    """
    if wake.is_set():
        wake.clear()
        return True
    sleeper = asyncio.ensure_future(clock.sleep(seconds))
    waiter = asyncio.ensure_future(wake.wait())
    try:
        await asyncio.wait({sleeper, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (sleeper, waiter):
            task.cancel()
    woken = wake.is_set()
    wake.clear()
    return woken
