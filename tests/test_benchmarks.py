"""The benchmarks still run (small sizes): they wrap the appliers' internals to time
them, so a change there must not leave them broken. Figures are not checked here:
speed goals are read from the benchmarks' own output, never asserted by tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.root
def test_bench_iptables_runs_small():
    r = subprocess.run(
        [sys.executable, "benchmarks/bench_iptables.py", "--sizes", "1000", "--backends", "legacy", "--reps", "1",
         "--profile"],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout + r.stderr
    assert "warning" not in out, out[-2000:]
    row = next(line for line in out.splitlines() if line.split()[:2] == ["1000", "legacy"])
    assert " ok " in row, row  # the applier's kernel rules = the bare restore's + its jump rules
    assert "applier/bare = " in out and "namespaces left: none" in out
