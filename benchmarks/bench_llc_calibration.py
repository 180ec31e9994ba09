"""Calibration of estimate_llc on potentials whose learning coefficient is known.

Four potentials K(w) around w* = 0 at nβ = n/log n, n = 10^4 (the default rule): a
regular quadratic |w|² in 4 dimensions (λ = 2), w1² + w2⁴ (λ = 3/4), w⁶ (λ = 1/6), each
against its analytic λ, and the normal crossing w1²w2² against its exact finite-nβ value
by quadrature (0.2344 at γ = 20). Settings per case: :func:`degen_hooks.llc.calibration_cases`.
Target: the estimate within 5 % of the truth, and the truth inside its error bar
(±2 standard errors across chains). Three samplers: SGLD, RMSProp-SGLD as degen_hooks runs
it (preconditioner adapted during burn-in, then fixed), and RMSProp-SGLD adapted at every
step as devinterp runs it (``RMSPropSGLD(adapt="always")``; reported, no target: its
stationary law is not the posterior, see :class:`~degen_hooks.llc.RMSPropSGLD`).

Run with ``OMP_NUM_THREADS=1 python benchmarks/bench_llc_calibration.py [--quick]``
(about 6 minutes; ``--quick`` only checks that every case runs).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from typing import Any

import torch

from degen_hooks.llc import RMSPropSGLD, calibration_cases

SAMPLERS: dict[str, Any] = {
    "sgld": "sgld",
    "rmsprop": "rmsprop",
    "rmsprop, devinterp's adapt='always'": RMSPropSGLD(adapt="always"),
}
TARGETED = {"sgld", "rmsprop"}


def main(quick: bool = False, verbose: bool = False) -> list[dict[str, Any]]:
    """Estimate every case with every sampler; one row each.

    Args:
        quick: 8 chains and about 1 % of the draws: only checks that the cases run.
        verbose: Print each row as it comes.

    Returns:
        Rows with ``name``, ``ours_s`` (the run's time), ``llc``, ``llc_std_err``, ``truth``,
        ``exact`` (at the case's γ), ``relative_error``, ``z`` (error over standard error),
        ``target``, ``met`` and ``note``.
    """
    torch.set_num_threads(1)
    rows = []
    for label, sampler in SAMPLERS.items():
        if quick and label not in TARGETED:
            continue
        for case in calibration_cases(sampler, quick=quick):
            start = time.perf_counter()
            with warnings.catch_warnings():  # diagnostics are reported in the row
                warnings.simplefilter("ignore", RuntimeWarning)
                result = case.run()
            seconds = time.perf_counter() - start
            error = result.llc - case.truth
            relative, z = error / case.truth, error / result.llc_std_err
            settings = case.settings
            kinds = [d.kind for d in result.diagnostics]
            flags = f"; diagnostics: {', '.join(kinds)}" if kinds else ""
            row = {
                "name": f"LLC calibration ({label}): {case.name}",
                "ours_s": seconds,
                "llc": result.llc,
                "llc_std_err": result.llc_std_err,
                "truth": case.truth,
                "exact": case.exact,
                "relative_error": relative,
                "z": z,
                "note": (
                    f"{result.llc:.4f} ± {result.llc_std_err:.4f} vs {case.kind} "
                    f"{case.truth:.4f} ({100 * relative:+.2f} %, {z:+.1f} s.e.); exact at γ: "
                    f"{case.exact:.4f}; ε {settings['step_size']:.0e}, γ {settings['gamma']:g}, "
                    f"{settings['n_chains']} chains x {settings['n_draws']} draws "
                    f"(+{settings['n_burnin']} burn-in); R̂ {result.r_hat:.3f}, ESS "
                    f"{result.ess:.0f}{flags}"
                ),
            }
            if label in TARGETED and not quick:
                row["target"] = "within 5 % of the truth, inside ±2 s.e."
                row["met"] = abs(relative) <= 0.05 and abs(z) <= 2
            if verbose:
                print(f"{row['name']}: {row['note']} [{seconds:.0f} s]", flush=True)
            rows.append(row)
    return rows


def _cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run, not calibrated")
    main(quick=parser.parse_args(argv).quick, verbose=True)
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
