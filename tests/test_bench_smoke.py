"""The benchmark harness (bench/run.py) runs end to end with tiny durations and produces its table.

No performance number is asserted here (DESIGN §8: benchmarks live in bench/, not in timed
tests); only that one run starts OpenBao, the broker and bao proxy, measures every row, writes
bench/results.md's table, and stops everything it started.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.run import ROWS

pytestmark = pytest.mark.load

ROOT = Path(__file__).resolve().parent.parent
SIDE_BY_SIDE = 11  # the first rows have a broker and a bao proxy value; the rest are the broker's alone


def table(text: str) -> list[list[str]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| metric | broker | bao proxy |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_quick_run_produces_every_row(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "bench.run", "--quick", "--seconds", "0.5", "--warmup", "0.1",
            "--connections", "4", "--fresh-concurrency", "2", "--idle-connections", "20", "--repeat", "2",
            "--rotation-seconds", "4", "--rotation-ttl", "6", "--rotation-after", "2", "--rotation-grace", "2.5",
            "--rotation-rate", "100", "--rotation-connections", "2",
            "--output-dir", str(tmp_path), "--no-plot", "--timeout", "150"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-4000:]

    text = (tmp_path / "results.md").read_text()
    rows = table(text)
    assert len(rows) == len(ROWS), rows
    for cells in rows:
        assert len(cells) == 5 and cells[0] and cells[1], cells
    for cells in rows[:SIDE_BY_SIDE]:
        assert "n/a" not in cells[1:4], cells  # both servers were measured
    assert rows[-1][0].startswith("p99 around a rotation")
    assert table(done.stdout) == rows  # the same table on stdout
    assert not (tmp_path / "latency.png").exists()  # --no-plot
    [spread] = [line for line in text.splitlines() if "side-by-side run(s) per mode" in line]
    assert spread.count("µs") + spread.count(" ms") == 8, spread  # 2 runs x 2 servers x 2 modes


def test_the_families_benchmark_prints_a_row_per_count() -> None:
    run = subprocess.run([sys.executable, "-m", "bench.families", "--families", "3,30", "--ops", "4"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    rows = [line for line in run.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split("|")[1].strip() for row in rows] == ["3", "30"] * 2, "families.json, then revocations.json"
    assert all(row.count(" ms ") == 2 for row in rows), run.stdout


def test_the_hot_route_benchmark_answers_every_request_kind() -> None:
    run = subprocess.run([sys.executable, "-m", "bench.hotroute", "--rounds", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    rows = [line.split() for line in run.stdout.splitlines()[1:]]
    assert [" ".join(row[:-4]) for row in rows] == ["no Accept", "axios Accept", "text/plain"], run.stdout
    assert all(row[-3] == "µs" and float(row[-4]) > 0 for row in rows), run.stdout
