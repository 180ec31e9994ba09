"""Benchmark: co-firing counts and synchronized-neuron grouping at GPT-2 MLP width (d = 3072).

Measures

* ``CoFiring.update`` throughput (rows per second) on random pre-activations, the cost the
  hooks add per batch when ``dh.collect(..., firing=True)``;
* ``SynchronizedNeurons.fit`` on d = 3072 counts with planted groups, exact (tolerance 0)
  and with complete-linkage clustering (tolerance > 0), and checks the planted groups come
  back;
* as a reference, exact grouping by ``np.unique`` over *stored* firing patterns (what one
  does without streaming counts; needs every sample in memory).

The update is compared with the bare float32 product ``f.T @ f`` of the same firing pattern
(the GEMM it cannot avoid). :func:`main` returns the rows (``python -m benchmarks`` collects
them); run standalone for the printout.

Usage::

    .venv/bin/python benchmarks/bench_cofiring.py            # d=3072 on CPU
    .venv/bin/python benchmarks/bench_cofiring.py --device cuda --rows 16384
"""

from __future__ import annotations

import argparse
import resource
import time
from typing import Any

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


def main(
    quick: bool = False,
    *,
    d: int = 3072,
    rows: int | None = None,
    samples: int | None = None,
    tolerance: float = 0.02,
    device: str = "cpu",
    verbose: bool = False,
) -> list[dict[str, Any]]:
    """Run the measurements; returns one row per measurement (``verbose``: print as well).

    Args:
        quick: Fewer rows and samples (2,048 / 4,096), still at ``d`` neurons.
        d: Neurons (``d_mlp``).
        rows: Rows per update batch (default 4,096).
        samples: Samples behind the fit (default 8,192).
        tolerance: Clustering tolerance of the second fit.
        device: Where the counts live.
        verbose: Print each measurement as it is taken.

    Returns:
        Rows with ``name``, ``ours_s``, ``baseline_s`` (where there is one), ``ratio``,
        ``target``, ``met`` and ``note``.
    """
    rows = rows or (2048 if quick else 4096)
    samples = samples or (4096 if quick else 8192)
    device_ = torch.device(device)
    say = print if verbose else (lambda *_args, **_kw: None)
    say(f"torch {torch.__version__}, device {device_}, threads {torch.get_num_threads()}, d={d}")
    out: list[dict[str, Any]] = []

    # -- CoFiring.update throughput against the bare float32 product of the same pattern ------
    z = torch.randn(rows, d, device=device_)
    acc = CoFiring().update(z)  # allocate outside the timing
    seconds = timed(lambda: acc.update(z))
    pattern = (z > 0).to(torch.float32)
    bare = timed(lambda: pattern.T @ pattern)
    say(
        f"CoFiring.update: {rows} x {d} float32 rows in {seconds * 1e3:.1f} ms "
        f"-> {rows / seconds:,.0f} rows/s ({2 * rows * d**2 / seconds / 1e9:.1f} "
        "GFLOP/s); state 2 x d^2 float64 = "
        f"{acc.state_dict()['co'].numel() * 8 / 2**20:.0f} MiB"
    )
    out.append(
        {
            "name": f"CoFiring.update, {rows} x {d} rows vs bare float32 product f.T @ f",
            "ours_s": seconds,
            "baseline_s": bare,
            "ratio": seconds / bare,
            "target": "",
            "met": None,
            "note": f"{rows / seconds:,.0f} rows/s; exact counts accumulated in float64",
        }
    )

    # -- fit on d = 3072 counts -------------------------------------------------------------------
    fires, planted = planted_patterns(samples, d)
    firing = CoFiring().update(fires.to(device_))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    exact = SynchronizedNeurons()
    seconds_exact = timed(lambda: exact.fit(firing))
    recovered = exact.groups_ == planted
    say(
        f"SynchronizedNeurons(tolerance=0).fit: {seconds_exact:.3f} s, {len(exact.groups_)} "
        f"groups ({'planted recovered' if recovered else 'PLANTED NOT RECOVERED'}), "
        f"{len(exact.dead_)} dead"
    )
    clustered = SynchronizedNeurons(tolerance=tolerance)
    seconds_clustered = timed(lambda: clustered.fit(firing), repeats=2)
    kept = set(planted) <= set(clustered.groups_) or len(clustered.groups_) >= len(planted)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    say(
        f"SynchronizedNeurons(tolerance={tolerance}).fit: {seconds_clustered:.3f} s, "
        f"{len(clustered.groups_)} groups; peak RSS grew by {(rss_after - rss_before) / 1024:.0f} "
        "MiB during the fits"
    )

    # -- reference: exact groups from stored patterns ----------------------------------------------
    stored = fires.numpy()

    def unique_columns() -> None:
        np.unique(stored, axis=1, return_inverse=True)

    seconds_unique = timed(unique_columns, repeats=1)
    say(
        f"reference np.unique over stored (n={samples}, d={d}) patterns: {seconds_unique:.3f} s "
        f"({stored.nbytes / 2**20:.0f} MiB of samples held; the counts need none)"
    )
    out.append(
        {
            "name": f"SynchronizedNeurons(tolerance=0).fit, d={d} vs np.unique on stored patterns",
            "ours_s": seconds_exact,
            "baseline_s": seconds_unique,
            "ratio": seconds_exact / seconds_unique,
            "target": "planted groups recovered",
            "met": recovered,
            "note": (
                f"{len(exact.groups_)} groups, {len(exact.dead_)} dead; the reference holds "
                f"{stored.nbytes / 2**20:.0f} MiB of samples ({samples}), the counts none"
            ),
        }
    )
    out.append(
        {
            "name": f"SynchronizedNeurons(tolerance={tolerance}).fit, d={d} (complete linkage)",
            "ours_s": seconds_clustered,
            "target": "planted groups kept",
            "met": kept,
            "note": (
                f"{len(clustered.groups_)} groups; peak RSS grew by "
                f"{(rss_after - rss_before) / 1024:.0f} MiB during the fits"
            ),
        }
    )
    return out


def _cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=3072, help="neurons (d_mlp)")
    parser.add_argument("--rows", type=int, default=4096, help="rows per update batch")
    parser.add_argument("--samples", type=int, default=8192, help="samples behind the fit")
    parser.add_argument("--tolerance", type=float, default=0.02)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer rows and samples")
    args = parser.parse_args()
    main(
        quick=args.quick,
        d=args.d,
        rows=None if args.quick else args.rows,
        samples=None if args.quick else args.samples,
        tolerance=args.tolerance,
        device=args.device,
        verbose=True,
    )


if __name__ == "__main__":
    _cli()
