"""Soak: streaming 10^6 samples through dh.collect takes no more memory than 10^5.

Each size runs in a fresh subprocess that reports its peak resident set size
(``getrusage().ru_maxrss``). glibc's malloc otherwise keeps freed batch buffers in its heap
and moves its mmap threshold at run time, so peak RSS would wander by tens of MB between
identical runs; a fixed ``MALLOC_MMAP_THRESHOLD_`` returns every large buffer to the system
on free, so the peak reflects what is actually alive.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = """
import resource, sys
import torch
import degen_hooks as dh

n_samples = int(sys.argv[1])
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU())
gen = torch.Generator().manual_seed(1)
# Activations, firing counts and Jacobian Grams (two random probes): every accumulator and
# the backward path, where a retained autograd graph would leak.
with dh.collect(model, ["0", "1"], firing=True, jacobians="rademacher", n_probes=2) as run:
    for _ in range(n_samples // 10_000):
        run.backward(model(torch.randn(10_000, 64, generator=gen)))
assert run.stats["0"].acts.n_samples == n_samples, run.stats
assert run.stats["1"].grads.n_samples == n_samples, run.stats
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _peak_rss_kib(n_samples: int) -> int:
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="131072")
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(n_samples)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[-1])


@pytest.mark.slow
def test_memory_is_constant_in_the_number_of_samples() -> None:
    small = _peak_rss_kib(100_000)
    large = _peak_rss_kib(1_000_000)
    assert large <= 1.05 * small, (
        f"peak RSS grew from {small / 1024:.1f} MiB (10^5 samples) to "
        f"{large / 1024:.1f} MiB (10^6 samples)"
    )
