"""The benchmark suite runs (a quick smoke run) and its numerical checks hold.

Speed ratios are not asserted: shared machines are noisy, and ``BENCHMARKS.md`` records them
from a full run. What must hold on any machine is that every benchmark runs and that the
fast paths compute the same numbers as their baselines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_benchmark_run(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "benchmarks", "--quick", "--no-write", "--json", str(out)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    diffs = {row["benchmark"]: row["max_rel_diff"] for row in rows if "max_rel_diff" in row}
    assert len(diffs) >= 6
    assert all(diff <= 1e-10 for diff in diffs.values()), diffs
