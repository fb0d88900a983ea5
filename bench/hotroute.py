"""The Python share of one shared-profile fetch, without sockets, TLS or a load generator.

    python -m bench.hotroute                 # about 10 s
    python -m bench.hotroute --rounds 30

Times ``HotRoute.parse`` and ``HotRoute.answer`` — what ``api/fastpath.py`` runs for each
keep-alive fetch once TLS has decrypted it: the request head (remembered parsed), the
allow-list, the answer (rendered once per second), one audit line written to a real file and
two metrics. Each round answers 20,000 fetches; the best round is the least disturbed one, so
compare best against best between two versions of the code (``PYTHONPATH=/path/to/other/tree``
runs another checkout's broker with this script). ``python -m bench.run`` measures the whole
fetch side by side with ``bao proxy``; this isolates the part a change to the hot route moves.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

if __package__ in (None, ""):  # run as ``python bench/hotroute.py``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import CollectorRegistry  # noqa: E402

from broker.api.app import ApiDeps  # noqa: E402
from broker.api.fastpath import HotRoute  # noqa: E402
from broker.audit import AuditLog  # noqa: E402
from broker.clock import SystemClock  # noqa: E402
from broker.config import ProfileConfig  # noqa: E402
from broker.identity import Caller  # noqa: E402
from broker.metrics import Metrics  # noqa: E402
from broker.tokens.model import Token  # noqa: E402

FETCHES_PER_ROUND = 20_000
HEADS = {
    "no Accept": b"GET /v1/tokens/demo HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "axios Accept": (b"GET /v1/tokens/demo HTTP/1.1\r\nHost: localhost\r\n"
                     b"Accept: application/json, text/plain, */*\r\n\r\n"),
    "text/plain": b"GET /v1/tokens/demo HTTP/1.1\r\nHost: localhost\r\nAccept: text/plain\r\n\r\n",
}


def route_for(directory: Path) -> HotRoute:
    """A hot route serving profile demo to cn:job, its audit log in ``directory``. The rotator
    is a stand-in holding one token: only ``state.current`` is read on this path."""
    clock = SystemClock()
    now = clock.now()
    token = Token(value="s." + "x" * 24, accessor="accessor", generation=1, issued_at=now, expires_at=now + 3600,
                  rotate_at=now + 2400)
    profile = ProfileConfig(name="demo", token_role="demo", ttl=3600, grace=600, rotate_after=2400, allow=("cn:job",))
    audit = AuditLog(directory / "audit.jsonl", clock)
    audit.open()
    rotator = SimpleNamespace(state=SimpleNamespace(current=token))
    deps = ApiDeps(profiles={"demo": profile}, admin_allow=(), cache=None, rotators={"demo": rotator},  # type: ignore[arg-type]
                   audit=audit, metrics=Metrics(CollectorRegistry()), clock=clock)
    return HotRoute(deps)


def one_round(route: HotRoute, caller: Caller, head: bytes) -> float:
    """Microseconds per fetch over one round."""
    started = time.perf_counter()
    for _ in range(FETCHES_PER_ROUND):
        message = route.parse(head)
        assert message is not None
        route.answer(caller, message)
    return (time.perf_counter() - started) / FETCHES_PER_ROUND * 1e6


async def run(rounds: int) -> None:
    caller = Caller(identities=("cn:job",), fingerprint="f" * 64)
    with tempfile.TemporaryDirectory() as directory:
        route = route_for(Path(directory))
        print(f"{'request':14s} {'best':>9s} {'median':>9s}   ({rounds} rounds of {FETCHES_PER_ROUND:,} fetches)")
        for name, head in HEADS.items():
            times = [one_round(route, caller, head) for _ in range(rounds)]
            print(f"{name:14s} {min(times):7.2f} µs {statistics.median(times):7.2f} µs")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.hotroute", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="rounds per request kind (default 15)")
    args = parser.parse_args()
    asyncio.run(run(args.rounds))  # the route's parser wants a running loop


if __name__ == "__main__":
    main()
