"""Speed of activation statistics: ``dh.collect`` against the bare computation and scikit-learn.

One thread (``OMP_NUM_THREADS=1``), a small MLP (64 -> 256 -> 256 -> 64, ReLU) and a stream of
float32 batches; statistics at both ReLU outputs (width 256). Three ways to get them:

* ``collect``: ``with dh.collect(model, sites)`` around the forward passes: float64 mean and
  centred covariance (Chan merges, NaN/inf checks, hooks).
* ``bare``: the same forward, written out layer by layer without hooks, plus the bare float64
  Gram product ``h.double().T @ h.double()`` of the same tensors: the least any float64
  second-moment collection must do. Target: ``collect / bare <= 1.3``.
* ``IncrementalPCA``: the same forward plus ``sklearn.decomposition.IncrementalPCA.partial_fit``
  per site, the usual streaming PCA. Target: at least 3x slower than ``collect``, and the
  same covariance to 1e-10 (relative, max-abs). ``get_covariance()`` normalises by
  ``n - 1`` (``explained_variance_ = S**2 / (n - 1)``), so it is compared with
  ``acts.cov(correction=1)``; with all components kept, its noise variance is 0 and the
  covariance is exact.

Each timing is the minimum over repeats, interleaved so that load from other processes hits
every variant alike. Run ``python -m benchmarks.bench_stats``; :func:`main` returns the rows.
"""

from __future__ import annotations

import os

# Set before torch is imported (when run as a script); main() also pins torch's own pool.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import degen_hooks as dh  # noqa: E402
from benchmarks._timing import best_times

SITES = ("1", "3")  # the two ReLU outputs


def _model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 64),
    )


def _stream(n_batches: int, batch_size: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(batch_size, 64, generator=gen) for _ in range(n_batches)]


def _bare_forward(model: torch.nn.Sequential, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The model's forward without hooks, returning the site activations."""
    h1 = model[1](model[0](x))
    h3 = model[3](model[2](h1))
    model[4](h3)
    return h1, h3


def run_collect(model: torch.nn.Sequential, batches: list[torch.Tensor]) -> dh.Statistics:
    """Activation statistics through ``dh.collect``."""
    with dh.collect(model, list(SITES)) as run, torch.no_grad():
        for x in batches:
            model(x)
    return run.stats


def run_bare(model: torch.nn.Sequential, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """Bare forward plus float64 Gram products of the same activations."""
    grams = [torch.zeros(256, 256, dtype=torch.float64) for _ in SITES]
    with torch.no_grad():
        for x in batches:
            for gram, h in zip(grams, _bare_forward(model, x), strict=True):
                h = h.double()
                gram += h.T @ h
    return grams


def run_ipca(model: torch.nn.Sequential, batches: list[torch.Tensor]) -> list[Any]:
    """Bare forward plus ``IncrementalPCA.partial_fit`` at each site (float64)."""
    from sklearn.decomposition import IncrementalPCA

    fits = [IncrementalPCA() for _ in SITES]
    with torch.no_grad():
        for x in batches:
            for fit, h in zip(fits, _bare_forward(model, x), strict=True):
                fit.partial_fit(h.double().numpy())
    return fits


def main(
    quick: bool = False,
    n_batches: int | None = None,
    batch_size: int = 2048,
    repeats: int | None = None,
) -> list[dict[str, Any]]:
    """Time the three variants; returns one row per comparison.

    Args:
        quick: 8 batches and 3 repeats (a smoke run).
        n_batches: Batches in the stream (default 20, or 8 with ``quick``).
        batch_size: Rows per batch.
        repeats: Timing repeats of ``collect`` and ``bare`` (default 7, or 3 with ``quick``;
            IncrementalPCA: 2, or 1 with ``quick``).

    Returns:
        Rows with ``benchmark``, ``ours_s``, ``baseline``, ``baseline_s``, ``ratio``
        (``ours_s / baseline_s``), ``speedup`` (its inverse), ``target``, ``met`` and, for
        IncrementalPCA, ``max_rel_diff`` (of the covariances).
    """
    torch.set_num_threads(1)
    n_batches = n_batches or (8 if quick else 20)
    repeats = repeats or (3 if quick else 7)
    model, batches = _model(), _stream(n_batches, batch_size)
    run_collect(model, batches[:2])  # warm-up: first-call allocations, lazy imports
    run_bare(model, batches[:2])
    run_ipca(model, batches[:2])
    times = best_times(
        {
            "collect": lambda: run_collect(model, batches),
            "bare": lambda: run_bare(model, batches),
            "ipca": lambda: run_ipca(model, batches),
        },
        {"collect": repeats, "bare": repeats, "ipca": 1 if quick else 2},
    )
    stats, fits = run_collect(model, batches), run_ipca(model, batches)
    cov_diff = 0.0
    for site, fit in zip(SITES, fits, strict=True):
        ours = stats[site].acts.cov(correction=1).numpy()
        cov_diff = max(
            cov_diff, float(np.abs(ours - fit.get_covariance()).max() / np.abs(ours).max())
        )
    n_samples = n_batches * batch_size
    common = {"n_samples": n_samples, "sites": len(SITES), "d_site": 256}
    vs_bare = times["collect"] / times["bare"]
    vs_ipca = times["collect"] / times["ipca"]
    return [
        {
            "benchmark": "activation stats: collect vs bare forward + float64 Gram",
            "ours_s": times["collect"],
            "baseline": "bare",
            "baseline_s": times["bare"],
            "ratio": vs_bare,
            "speedup": 1 / vs_bare,
            "target": "ratio <= 1.3",
            "met": vs_bare <= 1.3,
            "note": f"MLP 64-256-256-64, {n_samples} samples, 2 sites of width 256",
            **common,
        },
        {
            "benchmark": "activation stats: collect vs sklearn IncrementalPCA.partial_fit",
            "ours_s": times["collect"],
            "baseline": "IncrementalPCA",
            "baseline_s": times["ipca"],
            "ratio": vs_ipca,
            "speedup": 1 / vs_ipca,
            "target": "ratio <= 1/3 and covariance rel diff <= 1e-10",
            "met": vs_ipca <= 1 / 3 and cov_diff <= 1e-10,
            "max_rel_diff": cov_diff,
            "note": f"covariance max rel diff {cov_diff:.1e}",
            **common,
        },
    ]


if __name__ == "__main__":
    for row in main():
        extra = f", cov diff {row['max_rel_diff']:.1e}" if "max_rel_diff" in row else ""
        print(
            f"{row['benchmark']}: {row['ours_s']:.3f} s vs {row['baseline_s']:.3f} s "
            f"({row['baseline']}), ratio {row['ratio']:.2f} [{row['target']}: "
            f"{'met' if row['met'] else 'MISSED'}]{extra}"
        )
