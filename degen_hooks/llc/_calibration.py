"""Potentials with known learning coefficients, to check the LLC estimator against the truth.

For a potential K ≥ 0 with K(0) = 0, the estimator targets nβ·E_p[K] under
p(w) ∝ exp(−nβ·K(w) − γ/2·|w|²). For a sum of monomials w_i^(2k_i) in separate
coordinates and γ = 0 this is Σ 1/(2k_i) exactly, at every nβ (nβ·w^(2k) follows a
Gamma(1/(2k), 1) law); that is the learning coefficient λ. The normal crossing
K = w1²·w2² has λ = 1/2 with multiplicity 2 only as nβ → ∞ (its free energy carries a
log log n term), so it is checked against its exact finite-nβ value, which integrating w2
out reduces to a one-dimensional integral. :func:`exact_llc` computes the value at the
case's γ by quadrature (numpy only), which is how the small bias of γ > 0 is known.

``python -m benchmarks --only llc_calibration`` runs every case (see BENCHMARKS.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._samplers import make_sampler

__all__ = [
    "CalibrationCase",
    "calibration_cases",
    "exact_llc",
    "exact_monomial_llc",
    "exact_normal_crossing_llc",
]

N_SAMPLES = 10_000
"""The n the calibration stands for: nβ = n/log(n) ≈ 1085.7, the default rule."""


def _trapezoid(values: np.ndarray, nodes: np.ndarray) -> float:
    integrate = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only trapz
    return float(integrate(values, nodes))


def exact_monomial_llc(power: int, n_beta: float, gamma: float) -> float:
    """nβ·E[w^power] for p(w) ∝ exp(−nβ·w^power − γ/2·w²), by quadrature (power even).

    Examples:
        >>> round(exact_monomial_llc(6, 1000.0, 0.0), 10)  # = 1/6 for γ = 0
        0.1666666667
        >>> exact_monomial_llc(2, 1000.0, 10.0)  # (1/2)·2nβ/(2nβ + γ)
        0.4975124378109...
    """
    if power < 2 or power % 2:
        raise ValueError(f"power must be an even integer >= 2, got {power}.")
    # The density is negligible where nβ·w^power > 60; it is even and smooth, so the
    # trapezoid rule on the half line converges very fast.
    edge = (60.0 / n_beta) ** (1.0 / power)
    nodes = np.linspace(0.0, edge, 200_001)
    potential = nodes**power
    density = np.exp(-n_beta * potential - gamma / 2 * nodes**2)
    return n_beta * _trapezoid(potential * density, nodes) / _trapezoid(density, nodes)


def exact_normal_crossing_llc(n_beta: float, gamma: float) -> float:
    """nβ·E[w1²w2²] for p ∝ exp(−nβ·w1²w2² − γ/2·|w|²), by 1-D quadrature (needs γ > 0).

    Given w1, w2 is Gaussian with precision a = 2nβ·w1² + γ, so E[w2² | w1] = 1/a, and
    w1 has the marginal density ∝ exp(−γ/2·w1²)/√a. What is left is one smooth integral.

    Examples:
        >>> round(exact_normal_crossing_llc(1085.7, 20.0), 4)
        0.2344
    """
    if not gamma > 0:
        raise ValueError(
            f"The normal crossing needs gamma > 0 (got {gamma}): its zero set, the two axes, "
            "is not compact, so without localisation the posterior is improper."
        )
    nodes = np.linspace(0.0, 12.0 / math.sqrt(gamma), 400_001)
    precision = 2 * n_beta * nodes**2 + gamma
    marginal = np.exp(-gamma / 2 * nodes**2) / np.sqrt(precision)
    conditional = n_beta * nodes**2 / precision  # nβ·E[K | w1]
    return _trapezoid(conditional * marginal, nodes) / _trapezoid(marginal, nodes)


@dataclass(frozen=True)
class CalibrationCase:
    """A potential K(w) with a known learning coefficient, and the settings it is run at.

    Attributes:
        name: A short description, e.g. ``"w1^2 + w2^4"``.
        potential: ``K(w)`` of a tensor ``w`` of shape ``(d,)``.
        d: Number of parameters.
        truth: The value the estimate is compared with: λ (analytic) for the monomials,
            the exact finite-nβ value for the normal crossing.
        exact: nβ·E[K] under the localised posterior at the case's nβ and γ, by
            quadrature: the truth plus the (small) bias of γ.
        kind: ``"analytic"`` or ``"quadrature"``: where ``truth`` comes from.
        settings: Keyword arguments of :func:`~degen_hooks.llc.estimate_llc`.
    """

    name: str
    potential: Callable[[Tensor], Tensor]
    d: int
    truth: float
    exact: float
    kind: str
    settings: dict[str, Any] = field(default_factory=dict)

    def run(self, **overrides: Any) -> Any:
        """Estimate this case's LLC (an :class:`~degen_hooks.llc.LLCResult`)."""
        from ._estimate import estimate_llc

        at = torch.zeros(self.d, dtype=torch.float64)
        return estimate_llc(self.potential, at=at, **{**self.settings, **overrides})


def exact_llc(powers: list[int], n_beta: float, gamma: float) -> float:
    """nβ·E[K] for K = Σ_i w_i^powers[i] (separate coordinates): a sum of 1-D integrals."""
    return sum(exact_monomial_llc(power, n_beta, gamma) for power in powers)


def _quadratic(w: Tensor) -> Tensor:
    return w.square().sum()


def _quadratic_quartic(w: Tensor) -> Tensor:
    return w[0] ** 2 + w[1] ** 4


def _sextic(w: Tensor) -> Tensor:
    return w[0] ** 6


def _normal_crossing(w: Tensor) -> Tensor:
    return (w[0] * w[1]) ** 2


def calibration_cases(sampler: str | Any = "sgld", *, quick: bool = False) -> list[CalibrationCase]:
    """The calibration potentials at their documented settings (nβ = n/log n, n = 10^4).

    Every case runs 128 or 256 chains together from w* = 0 at nβ ≈ 1085.7. The step size
    keeps the SGLD discretisation bias (about ε·nβ·h/4 along curvature h) near 0.5 %, and
    γ is small enough that its bias is below 0.4 % (see ``exact``); the normal crossing
    needs γ > 0 and is compared with its exact value at that γ. The draws are enough for a
    standard error near 1 % (the slowly mixing quartic and sextic directions need the
    most). ``"rmsprop"`` runs :class:`~degen_hooks.llc.RMSPropSGLD` with the step sizes
    divided by 10, since its preconditioner (at most 1/eps = 10) scales the steps up.

    Args:
        sampler: ``"sgld"``, ``"rmsprop"`` or a sampler instance (such as
            ``RMSPropSGLD(adapt="always")``, devinterp's variant).
        quick: Far fewer draws, for a smoke test (the estimates are then not calibrated).

    Returns:
        The four cases: a regular quadratic in 4 dimensions, w1² + w2⁴, w⁶ and the
        normal crossing w1²w2².

    Examples:
        >>> for case in calibration_cases():
        ...     print(f"{case.name}: {case.truth:.4f} ({case.kind})")
        regular quadratic |w|^2, d = 4: 2.0000 (analytic)
        w1^2 + w2^4: 0.7500 (analytic)
        w^6: 0.1667 (analytic)
        normal crossing w1^2 w2^2: 0.2344 (quadrature)
        >>> result = calibration_cases(quick=True)[2].run()  # w^6, too short to be calibrated
        >>> result.n_params, result.hyperparameters["n_chains"]
        (1, 8)
    """
    n_beta = N_SAMPLES / math.log(N_SAMPLES)
    scale = 1.0 if make_sampler(sampler).name == "sgld" else 0.1

    def settings(step_size: float, gamma: float, n_chains: int, n_draws: int) -> dict:
        n_burnin = n_draws // 8
        if quick:
            n_chains, n_draws, n_burnin = 8, max(n_draws // 100, 20), max(n_burnin // 100, 5)
        return dict(
            n_beta=n_beta,
            step_size=step_size * scale,
            gamma=gamma,
            n_chains=n_chains,
            n_draws=n_draws,
            n_burnin=n_burnin,
            sampler=sampler,
            seed=0,
            progress=False,
        )

    regular = settings(step_size=4e-6, gamma=1.0, n_chains=128, n_draws=20_000)
    mixed = settings(step_size=1e-5, gamma=1.0, n_chains=256, n_draws=32_000)
    sextic = settings(step_size=3e-4, gamma=0.1, n_chains=256, n_draws=20_000)
    crossing = settings(step_size=1e-4, gamma=20.0, n_chains=256, n_draws=20_000)
    return [
        CalibrationCase(
            "regular quadratic |w|^2, d = 4",
            _quadratic,
            4,
            2.0,
            exact_llc([2] * 4, n_beta, regular["gamma"]),
            "analytic",
            regular,
        ),
        CalibrationCase(
            "w1^2 + w2^4",
            _quadratic_quartic,
            2,
            0.75,
            exact_llc([2, 4], n_beta, mixed["gamma"]),
            "analytic",
            mixed,
        ),
        CalibrationCase(
            "w^6", _sextic, 1, 1 / 6, exact_llc([6], n_beta, sextic["gamma"]), "analytic", sextic
        ),
        CalibrationCase(
            "normal crossing w1^2 w2^2",
            _normal_crossing,
            2,
            exact_normal_crossing_llc(n_beta, crossing["gamma"]),
            exact_normal_crossing_llc(n_beta, crossing["gamma"]),
            "quadrature",
            crossing,
        ),
    ]
