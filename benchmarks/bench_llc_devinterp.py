"""Cross-check estimate_llc against devinterp's SGLD on the same model and settings.

Both samplers run the same update, Δw = (ε/2)(−nβ∇L − γ(w − w*)) + N(0, εI), on the
behavioural MSE loss of a small tanh MLP, with the same batches in the same order and
the same noise seed per chain. They should therefore agree to rounding, which this
script reports along with the LLC estimates and the time per step. If devinterp cannot
be imported, the script says so and exits with status 0.

Run with ``OMP_NUM_THREADS=1 python benchmarks/bench_llc_devinterp.py [--quick]``;
:func:`main` returns the row (``python -m benchmarks`` collects it).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from degen_hooks.llc import estimate_llc


def make_problem(n_samples: int, batch_size: int) -> tuple[nn.Module, list[torch.Tensor]]:
    """An 8-32-32-4 tanh MLP (1,476 parameters) and uniform inputs, in float32.

    float32, because devinterp draws its noise in the default dtype: with float64
    parameters the two noise streams would differ.
    """
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)
    )
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n_samples, 8, generator=g) * 2 - 1
    return model, list(x.split(batch_size))


def devinterp_llc(
    model: nn.Module,
    data: list[torch.Tensor],
    *,
    step_size: float,
    n_beta: float,
    gamma: float,
    n_chains: int,
    n_draws: int,
    n_burnin: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """LLC per chain and loss traces from devinterp's SGLD optimizer, behavioural MSE loss."""
    from devinterp.optim import SGLD

    with torch.no_grad():
        references = [model(batch) for batch in data]
    # The same per-chain seeds as estimate_llc (an implementation detail, copied here).
    chain_seeds = np.random.SeedSequence(seed).generate_state(n_chains)
    traces = np.zeros((n_chains, n_draws))
    for chain, chain_seed in enumerate(chain_seeds):
        sampled = copy.deepcopy(model)
        with warnings.catch_warnings():  # SGLD works but warns that SGMCMC replaces it
            warnings.simplefilter("ignore", DeprecationWarning)
            optimizer = SGLD(sampled.parameters(), lr=step_size, nbeta=n_beta, localization=gamma)
        generator = torch.Generator().manual_seed(int(chain_seed))
        for step in range(n_burnin + n_draws):
            batch, reference = data[step % len(data)], references[step % len(data)]
            loss = (sampled(batch) - reference).square().sum(-1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step(noise_generator=generator)
            if step >= n_burnin:
                traces[chain, step - n_burnin] = loss.item()
    return n_beta * traces.mean(axis=1), traces  # the loss at w* is 0


def main(quick: bool = False, verbose: bool = False) -> list[dict[str, Any]]:
    """Run both samplers; returns one row (``verbose``: print the comparison as well).

    Args:
        quick: 50 draws after 10 burn-in steps per chain (instead of 400 after 100).
        verbose: Print settings, estimates and times.

    Returns:
        One row with ``name``, ``ours_s``, ``baseline_s`` (devinterp; absent when it cannot be
        imported), ``ratio``, ``target`` (identical loss traces), ``met``, ``llc``,
        ``llc_devinterp``, ``max_trace_diff`` and ``note``.
    """
    torch.set_num_threads(1)
    say = print if verbose else (lambda *_args, **_kw: None)
    n_draws, n_burnin = (50, 10) if quick else (400, 100)
    model, data = make_problem(n_samples=4096, batch_size=256)
    n_samples = sum(len(batch) for batch in data)
    settings = dict(
        step_size=2e-5,
        n_beta=n_samples / math.log(n_samples),
        gamma=100.0,
        n_chains=4,
        n_draws=n_draws,
        n_burnin=n_burnin,
        seed=0,
    )
    n_steps = settings["n_chains"] * (n_draws + n_burnin)
    say(f"model: 8-32-32-4 tanh MLP, float32; data: {n_samples} samples in batches of 256")
    say(", ".join(f"{key}={value:.6g}" for key, value in settings.items()))

    estimate_llc(model, data, progress=False, **{**settings, "n_draws": 2})  # warm-up
    start = time.perf_counter()
    ours = estimate_llc(model, data, progress=False, **settings)
    ours_seconds = time.perf_counter() - start
    say(f"{'':12s}{'LLC':>10s}{'± s.e.':>10s}{'us/step':>10s}   per chain")
    say(
        f"{'degen_hooks':12s}{ours.llc:10.4f}{ours.llc_std_err:10.4f}"
        f"{1e6 * ours_seconds / n_steps:10.0f}   {np.round(ours.llc_per_chain.numpy(), 3)}"
    )
    row: dict[str, Any] = {
        "name": "LLC: estimate_llc vs devinterp SGLD (same batches and noise)",
        "ours_s": ours_seconds,
        "target": "identical loss traces (max |diff| <= 1e-6)",
        "llc": float(ours.llc),
        "n_steps": n_steps,
    }

    try:  # devinterp's first import takes seconds (torch._dynamo, sympy): not timed
        from devinterp.optim import SGLD  # noqa: F401
        from devinterp.utils import default_nbeta
    except Exception as err:  # any import failure means: not available here
        say(f"devinterp is unavailable ({type(err).__name__}: {err}); nothing to compare.")
        return [{**row, "met": None, "note": f"devinterp unavailable ({type(err).__name__})"}]
    devinterp_llc(model, data, **{**settings, "n_draws": 2})  # warm-up
    start = time.perf_counter()
    per_chain, traces = devinterp_llc(model, data, **settings)
    theirs_seconds = time.perf_counter() - start
    std_err = per_chain.std(ddof=1) / math.sqrt(len(per_chain))
    say(
        f"{'devinterp':12s}{per_chain.mean():10.4f}{std_err:10.4f}"
        f"{1e6 * theirs_seconds / n_steps:10.0f}   {np.round(per_chain, 3)}"
    )
    gap = float(np.abs(traces - ours.loss_traces.numpy()).max())
    say(
        f"max |loss trace difference| = {gap:.3g}; time ratio ours/devinterp = "
        f"{ours_seconds / theirs_seconds:.2f}"
    )
    say(
        f"(devinterp's own default nβ would be B/log B = {default_nbeta(256):.1f}, "
        f"against n/log n = {settings['n_beta']:.1f} here.)"
    )
    return [
        {
            **row,
            "baseline_s": theirs_seconds,
            "ratio": ours_seconds / theirs_seconds,
            "met": gap <= 1e-6,
            "llc_devinterp": float(per_chain.mean()),
            "max_trace_diff": gap,
            "note": (
                f"LLC {ours.llc:.4f} vs {per_chain.mean():.4f}; max |loss trace diff| "
                f"{gap:.1e}; {n_steps} SGLD steps, {1e6 * ours_seconds / n_steps:.0f} vs "
                f"{1e6 * theirs_seconds / n_steps:.0f} us/step"
            ),
        }
    ]


def _cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer draws, for a smoke run")
    args = parser.parse_args(argv)
    main(quick=args.quick, verbose=True)
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
