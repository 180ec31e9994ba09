"""Benchmark: co-firing counts and synchronized-neuron grouping at GPT-2 MLP width (d = 3072).

Measures

* ``CoFiring.update`` throughput (rows per second) on random pre-activations, the cost the
  hooks add per batch when ``dh.collect(..., firing=True)``;
* ``SynchronizedNeurons.fit`` on d = 3072 counts with planted groups, exact (tolerance 0)
  and with complete-linkage clustering (tolerance > 0), and checks the planted groups come
  back;
* as a reference, exact grouping by ``np.unique`` over *stored* firing patterns (what one
  does without streaming counts; needs every sample in memory).

Usage::

    .venv/bin/python benchmarks/bench_cofiring.py            # d=3072 on CPU
    .venv/bin/python benchmarks/bench_cofiring.py --device cuda --rows 16384
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import sklearn.cluster  # noqa: F401 - imported up front so its import time is not timed
import torch

from degen_hooks.accumulators import CoFiring
from degen_hooks.synchronized import SynchronizedNeurons


def planted_patterns(n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, list[frozenset]]:
    """Random firing patterns ``(n, d)`` with planted groups, dead and always-on neurons."""
    g = torch.Generator().manual_seed(seed)
    rates = torch.rand(d, generator=g) * 0.5 + 0.05
    fires = torch.rand(n, d, generator=g) < rates
    planted = []
    start = 0
    for size in (2, 2, 3, 4, 8):  # neurons start .. start+size-1 copy neuron start
        fires[:, start + 1 : start + size] = fires[:, start : start + 1]
        planted.append(frozenset(range(start, start + size)))
        start += size
    fires[:, start : start + 5] = False  # dead
    fires[:, start + 5 : start + 8] = True  # always on: one more group
    planted.append(frozenset(range(start + 5, start + 8)))
    return fires, sorted(planted, key=lambda s: (-len(s), min(s)))


def timed(fn, repeats: int = 3) -> float:
    """Best wall time of ``repeats`` calls, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=3072, help="neurons (d_mlp)")
    parser.add_argument("--rows", type=int, default=4096, help="rows per update batch")
    parser.add_argument("--samples", type=int, default=8192, help="samples behind the fit")
    parser.add_argument("--tolerance", type=float, default=0.02)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, d={args.d}"
    )

    # -- CoFiring.update throughput ------------------------------------------------------------
    z = torch.randn(args.rows, args.d, device=device)
    acc = CoFiring().update(z)  # allocate outside the timing
    seconds = timed(lambda: acc.update(z))
    print(
        f"CoFiring.update: {args.rows} x {args.d} float32 rows in {seconds * 1e3:.1f} ms "
        f"-> {args.rows / seconds:,.0f} rows/s ({2 * args.rows * args.d**2 / seconds / 1e9:.1f} "
        "GFLOP/s); state 2 x d^2 float64 = "
        f"{acc.state_dict()['co'].numel() * 8 / 2**20:.0f} MiB"
    )

    # -- fit on d = 3072 counts -------------------------------------------------------------------
    fires, planted = planted_patterns(args.samples, args.d)
    firing = CoFiring().update(fires.to(device))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    exact = SynchronizedNeurons()
    seconds = timed(lambda: exact.fit(firing))
    assert exact.groups_ == planted, "planted groups not recovered"
    print(
        f"SynchronizedNeurons(tolerance=0).fit: {seconds:.3f} s, {len(exact.groups_)} groups "
        f"(planted recovered), {len(exact.dead_)} dead"
    )
    clustered = SynchronizedNeurons(tolerance=args.tolerance)
    seconds = timed(lambda: clustered.fit(firing), repeats=2)
    assert set(planted) <= set(clustered.groups_) or len(clustered.groups_) >= len(planted)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        f"SynchronizedNeurons(tolerance={args.tolerance}).fit: {seconds:.3f} s, "
        f"{len(clustered.groups_)} groups; peak RSS grew by {(rss_after - rss_before) / 1024:.0f} "
        "MiB during the fits"
    )

    # -- reference: exact groups from stored patterns ----------------------------------------------
    stored = fires.numpy()

    def unique_columns() -> None:
        np.unique(stored, axis=1, return_inverse=True)

    seconds = timed(unique_columns, repeats=1)
    print(
        f"reference np.unique over stored (n={args.samples}, d={args.d}) patterns: {seconds:.3f} s "
        f"({stored.nbytes / 2**20:.0f} MiB of samples held; the counts need none)"
    )


if __name__ == "__main__":
    main()
