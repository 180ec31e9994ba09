"""Shared helpers of the benchmarks: interleaved repeats (best time per variant), and a
measurement in a fresh process (peak memory)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def best_times(
    variants: Mapping[str, Callable[[], Any]], repeats: int | Mapping[str, int]
) -> dict[str, float]:
    """Minimum wall time of each variant over ``repeats`` rounds, the variants interleaved.

    Interleaving makes the comparison fair on a shared, noisy machine: every variant sees
    the same background load. ``repeats`` may differ per variant (a slow baseline once).
    """
    counts = dict(repeats) if isinstance(repeats, Mapping) else dict.fromkeys(variants, repeats)
    best = dict.fromkeys(variants, float("inf"))
    for round_index in range(max(counts.values())):
        for name, fn in variants.items():
            if round_index < counts[name]:
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def in_fresh_process(code: str) -> Any:
    """Run ``code`` in a fresh Python process (one thread, the repository as working
    directory) and return the JSON value its last printed line holds."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=Path(__file__).resolve().parents[1],
    )
    return json.loads(done.stdout.strip().splitlines()[-1])
