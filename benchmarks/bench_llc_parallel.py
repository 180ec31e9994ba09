"""LLC chains stacked (one vmapped pass a step) against the same chains one after another.

``estimate_llc(parallel=True)`` advances all chains together on stacked parameters;
``parallel=False`` runs them one at a time, as estimate_llc did before (#17). Both draw each
chain's noise from the same generator, so the estimates must agree to rounding (float64
here). Two models: the 2-4-1 ReLU MLP of the tests (about 0.3 ms a step, mostly overhead,
the case that motivated the change) and the 8-32-32-4 tanh MLP of ``bench_llc_devinterp``
(1,476 parameters, batch 256: one thread spends most of a step computing, so stacking
saves less). 8 chains each, minimum time over interleaved repeats.

Run with ``OMP_NUM_THREADS=1 python benchmarks/bench_llc_parallel.py [--quick]``.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any

import torch
from torch import nn

from benchmarks._timing import best_times
from degen_hooks.llc import estimate_llc

N_CHAINS = 8


def tiny_problem() -> tuple[nn.Module, list[torch.Tensor]]:
    """The 2-4-1 ReLU MLP (17 parameters) on 4096 uniform inputs in batches of 256."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1)).double()
    x = torch.rand(4096, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return model, list((2 * x - 1).split(256))


def mlp_problem() -> tuple[nn.Module, list[torch.Tensor]]:
    """The 8-32-32-4 tanh MLP (1,476 parameters) of bench_llc_devinterp, in float64."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)
    ).double()
    x = torch.rand(4096, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return model, list((2 * x - 1).split(256))


def compare(name: str, problem: Any, n_steps: int, repeats: int, target: bool) -> dict:
    """Time both ways on one problem; check that they give the same estimates."""
    model, data = problem()
    settings = dict(
        step_size=2e-5, n_chains=N_CHAINS, n_draws=n_steps, n_burnin=0, seed=0, progress=False
    )
    results: dict[bool, Any] = {}

    def run(parallel: bool) -> None:
        with warnings.catch_warnings():  # short runs: diagnostics are beside the point
            warnings.simplefilter("ignore", RuntimeWarning)
            results[parallel] = estimate_llc(model, data, parallel=parallel, **settings)

    run(True), run(False)  # warm-up
    times = best_times({"stacked": lambda: run(True), "sequential": lambda: run(False)}, repeats)
    stacked, sequential = results[True], results[False]
    trace_diff = float((stacked.loss_traces - sequential.loss_traces).abs().max())
    llc_diff = abs(stacked.llc - sequential.llc)
    speedup = times["sequential"] / times["stacked"]
    n_total = N_CHAINS * n_steps
    row = {
        "name": f"LLC: {N_CHAINS} chains stacked (vmap) vs one after another: {name}",
        "ours_s": times["stacked"],
        "baseline_s": times["sequential"],
        "speedup": speedup,
        "max_trace_diff": trace_diff,
        "llc_diff": llc_diff,
        "note": (
            f"{n_steps} steps x {N_CHAINS} chains, float64; "
            f"{1e6 * times['stacked'] / n_total:.0f} vs "
            f"{1e6 * times['sequential'] / n_total:.0f} us per chain-step; LLC "
            f"{stacked.llc:.6f} vs {sequential.llc:.6f} (|diff| {llc_diff:.1e}), max |loss "
            f"trace diff| {trace_diff:.1e}"
        ),
    }
    same = trace_diff <= 1e-10 and llc_diff <= 1e-10
    if target:
        row["target"] = "speedup >= 4 and same estimates (|diff| <= 1e-10)"
        row["met"] = speedup >= 4 and same
    else:
        row["target"] = "same estimates (|diff| <= 1e-10)"
        row["met"] = same
    return row


def main(quick: bool = False, verbose: bool = False) -> list[dict[str, Any]]:
    """Both comparisons; returns one row each (``verbose``: print them as well).

    Args:
        quick: 40 steps and 2 repeats (instead of 300 steps and 5 repeats).
        verbose: Print each row's note.

    Returns:
        Rows with ``name``, ``ours_s`` (stacked), ``baseline_s`` (one after another),
        ``speedup``, ``max_trace_diff``, ``llc_diff``, ``target``, ``met`` and ``note``.
    """
    torch.set_num_threads(1)
    n_steps, repeats = (40, 2) if quick else (300, 5)
    rows = [
        compare("2-4-1 ReLU MLP, batch 256", tiny_problem, n_steps, repeats, target=True),
        compare("8-32-32-4 tanh MLP, batch 256", mlp_problem, n_steps, repeats, target=False),
    ]
    if verbose:
        for row in rows:
            print(f"{row['name']}: {row['speedup']:.2f}x; {row['note']}")
    return rows


def _cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, for a smoke run")
    main(quick=parser.parse_args(argv).quick, verbose=True)
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
