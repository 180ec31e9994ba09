"""Cross-check estimate_llc against devinterp's samplers on the same model and settings.

Both run the same update, Δw = (ε/2)(−nβ∇L − γ(w − w*)) + N(0, εI), on the behavioural
MSE loss of a small tanh MLP, with the same batches in the same order and the same noise
seed per chain. They should therefore agree to rounding, which this script reports along
with the LLC estimates and the time per step. Three rows: SGLD (``devinterp.optim.SGLD``),
RMSProp-SGLD (``SGMCMC.rmsprop_sgld`` against ``RMSPropSGLD(adapt="always")``), and
``preset="devinterp"`` against devinterp left at its default nβ = B/log B (its numbers on
its settings). If devinterp cannot be imported, the script says so and exits with status
0; devinterp 2.x's optimisers import without its data dependencies, e.g. from an unpacked
wheel on ``PYTHONPATH``.

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

from degen_hooks.llc import RMSPropSGLD, estimate_llc


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
    sampler: str = "sgld",
) -> tuple[np.ndarray, np.ndarray]:
    """LLC per chain and loss traces from devinterp's optimizers, behavioural MSE loss."""
    from devinterp.optim import SGLD, SGMCMC

    with torch.no_grad():
        references = [model(batch) for batch in data]
    # The same per-chain seeds as estimate_llc (an implementation detail, copied here).
    chain_seeds = np.random.SeedSequence(seed).generate_state(n_chains)
    traces = np.zeros((n_chains, n_draws))
    for chain, chain_seed in enumerate(chain_seeds):
        sampled = copy.deepcopy(model)
        with warnings.catch_warnings():  # SGLD works but warns that SGMCMC replaces it
            warnings.simplefilter("ignore", DeprecationWarning)
            settings = dict(lr=step_size, nbeta=n_beta, localization=gamma)
            if sampler == "sgld":
                optimizer = SGLD(sampled.parameters(), **settings)
            else:
                optimizer = SGMCMC.rmsprop_sgld(sampled.parameters(), **settings)
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


def _compare(
    name: str,
    model: nn.Module,
    data: list[torch.Tensor],
    ours_settings: dict[str, Any],
    theirs_settings: dict[str, Any],
    say: Any,
) -> dict[str, Any]:
    """One row: our estimate and devinterp's, timed, with the largest trace difference."""
    n_steps = ours_settings["n_chains"] * (ours_settings["n_draws"] + theirs_settings["n_burnin"])
    with warnings.catch_warnings():  # short runs: diagnostics are beside the point here
        warnings.simplefilter("ignore", RuntimeWarning)
        estimate_llc(model, data, progress=False, **{**ours_settings, "n_draws": 2})  # warm-up
        start = time.perf_counter()
        ours = estimate_llc(model, data, progress=False, **ours_settings)
        ours_seconds = time.perf_counter() - start
    row: dict[str, Any] = {
        "name": name,
        "ours_s": ours_seconds,
        "target": "identical loss traces and LLC (max |diff| <= 1e-6)",
        "llc": float(ours.llc),
        "n_steps": n_steps,
    }
    devinterp_llc(model, data, **{**theirs_settings, "n_draws": 2})  # warm-up
    start = time.perf_counter()
    per_chain, traces = devinterp_llc(model, data, **theirs_settings)
    theirs_seconds = time.perf_counter() - start
    gap = float(np.abs(traces - ours.loss_traces.numpy()).max())
    llc_gap = abs(float(per_chain.mean()) - ours.llc)
    say(
        f"{name}: LLC {ours.llc:.4f} vs devinterp {per_chain.mean():.4f} (nβ {ours.n_beta:.1f}); "
        f"max |trace diff| {gap:.3g}; {1e6 * ours_seconds / n_steps:.0f} vs "
        f"{1e6 * theirs_seconds / n_steps:.0f} us/step"
    )
    return {
        **row,
        "baseline_s": theirs_seconds,
        "ratio": ours_seconds / theirs_seconds,
        "met": gap <= 1e-6 and llc_gap <= 1e-6 * max(1.0, abs(ours.llc)),
        "llc_devinterp": float(per_chain.mean()),
        "max_trace_diff": gap,
        "note": (
            f"LLC {ours.llc:.4f} vs {per_chain.mean():.4f} (nβ {ours.n_beta:.2f}); max |loss "
            f"trace diff| {gap:.1e}; {n_steps} steps, {1e6 * ours_seconds / n_steps:.0f} vs "
            f"{1e6 * theirs_seconds / n_steps:.0f} us/step"
        ),
    }


def main(quick: bool = False, verbose: bool = False) -> list[dict[str, Any]]:
    """Run both libraries three ways; returns one row each (``verbose``: print them too).

    Args:
        quick: 50 draws after 10 burn-in steps per chain (instead of 400 after 100).
        verbose: Print settings, estimates and times.

    Returns:
        Rows with ``name``, ``ours_s``, ``baseline_s`` (devinterp; absent when it cannot be
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
    say(f"model: 8-32-32-4 tanh MLP, float32; data: {n_samples} samples in batches of 256")
    say(", ".join(f"{key}={value:.6g}" for key, value in settings.items()))
    try:  # devinterp's first import takes seconds (torch._dynamo, sympy): not timed
        from devinterp.optim import SGLD  # noqa: F401
        from devinterp.utils import default_nbeta
    except Exception as err:  # any import failure means: not available here
        say(f"devinterp is unavailable ({type(err).__name__}: {err}); nothing to compare.")
        return [
            {
                "name": "LLC: estimate_llc vs devinterp SGLD (same batches and noise)",
                "met": None,
                "note": f"devinterp unavailable ({type(err).__name__})",
            }
        ]
    rmsprop = {**settings, "step_size": 2e-6}
    devinterp_defaults = {**settings, "n_beta": float(default_nbeta(256))}
    preset = {k: v for k, v in settings.items() if k != "n_beta"}
    return [
        _compare(
            "LLC: estimate_llc vs devinterp SGLD (same batches and noise)",
            model,
            data,
            settings,
            settings,
            say,
        ),
        _compare(
            "LLC: RMSPropSGLD(adapt='always') vs devinterp SGMCMC.rmsprop_sgld",
            model,
            data,
            {**rmsprop, "sampler": RMSPropSGLD(adapt="always")},
            {**rmsprop, "sampler": "rmsprop"},
            say,
        ),
        _compare(
            "LLC: preset='devinterp' vs devinterp at its default nbeta = B/log B",
            model,
            data,
            {**preset, "preset": "devinterp"},
            devinterp_defaults,
            say,
        ),
    ]


def _cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer draws, for a smoke run")
    args = parser.parse_args(argv)
    main(quick=args.quick, verbose=True)
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
