"""Diagnostics of LLC chains: what went wrong, how sure we are, and what to change.

Every check reads the traces ``t_ci = nβ·(L_i(w_ci) − L_i(w*))`` of draw i in chain c. For a
homogeneous potential at equilibrium, nβ·(L − L*) follows a Gamma(λ, 1) law, so its mean
is λ and its variance is also λ: a trace whose variance is far below its mean has not
explored (:data:`STUCK_RATIO`). The chain statistics follow Gelman & Rubin 1992 (the
potential scale reduction factor R̂) and Vehtari et al. 2021, "Rank-normalization, folding,
and localization: an improved R̂" (the multi-chain effective sample size with Geyer's
initial monotone sequence); the trend test is Geweke's 1992 comparison of the first 10 %
and the last 50 % of the draws.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

import numpy as np

__all__ = [
    "Diagnostic",
    "DiagnosticKind",
    "diagnose",
    "effective_sample_size",
    "potential_scale_reduction",
]

R_HAT_LIMIT = 1.1
"""Chains disagree when R̂ exceeds this (Gelman & Rubin's classic threshold)."""
ESS_MIN = 100.0
"""Fewer effective draws than this (over all chains) make R̂ and the trend test unreliable."""
STUCK_RATIO = 0.01
"""A trace whose variance is below this fraction of its mean has barely moved (see above)."""
TREND_Z = 4.0
"""The trend test flags a difference of more than this many standard errors..."""
TREND_RELATIVE = 0.1
"""... which is also more than this fraction of the estimate."""


class DiagnosticKind(str, Enum):
    """What a :class:`Diagnostic` found."""

    DIVERGENCE = "divergence"
    NEGATIVE = "negative"
    STUCK = "stuck"
    CHAINS_DISAGREE = "chains_disagree"
    LOW_ESS = "low_ess"
    NOT_FLAT = "not_flat"


@dataclass(frozen=True)
class Diagnostic:
    """One problem found in the chains of an LLC estimate.

    Attributes:
        kind: What was found (a :class:`DiagnosticKind` value, e.g. ``"stuck"``).
        message: What is wrong, the numbers, the likely cause and what to change.
        value: The statistic behind it (R̂, the ESS, a z-score, ...); NaN if none.
        chains: The chains concerned; empty for all.
        step: For a divergence, the step (burn-in included) where it happened; else -1.

    Examples:
        >>> d = Diagnostic("low_ess", "Only 12 effective draws.", value=12.0)
        >>> d.label
        'low ESS (12)'
        >>> Diagnostic.from_dict(d.to_dict()) == d
        True
    """

    kind: str
    message: str
    value: float = math.nan
    chains: tuple[int, ...] = ()
    step: int = -1

    @property
    def label(self) -> str:
        """A few words for a plot legend: the kind and its statistic."""
        if self.kind == DiagnosticKind.DIVERGENCE.value and self.chains:
            names = ", ".join(map(str, self.chains))
            return f"chain{'s' * (len(self.chains) > 1)} {names} diverged (red cross)"
        labels = {
            "negative": "negative LLC",
            "stuck": "step too small to move",
            "chains_disagree": "chains disagree (R̂ {:.2f})",
            "low_ess": "low ESS ({:.0f})",
            "not_flat": "trace not flat (z {:.1f})",
        }
        return labels.get(self.kind, self.kind).format(self.value)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (NaN becomes ``None``)."""
        out = asdict(self)
        out["chains"] = list(self.chains)
        out["value"] = self.value if math.isfinite(self.value) else None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Diagnostic:
        """Rebuild from :meth:`to_dict`."""
        value = data.get("value")
        return cls(
            kind=str(data["kind"]),
            message=str(data["message"]),
            value=math.nan if value is None else float(value),
            chains=tuple(int(c) for c in data.get("chains", ())),
            step=int(data.get("step", -1)),
        )


def potential_scale_reduction(traces: np.ndarray) -> float:
    """Gelman-Rubin R̂ of ``traces`` (shape ``(n_chains, n_draws)``); NaN for one chain.

    R̂ = sqrt(((n−1)/n·W + B/n) / W), with W the mean within-chain variance and B/n the
    variance of the chain means. Near 1 when the chains sample the same distribution.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> round(potential_scale_reduction(rng.normal(size=(4, 1000))), 2)
        1.0
        >>> shifted = rng.normal(size=(4, 1000)) + np.arange(4)[:, None]
        >>> potential_scale_reduction(shifted) > 1.5
        True
    """
    n_chains, n_draws = traces.shape
    if n_chains < 2 or n_draws < 2:
        return math.nan
    within = float(traces.var(axis=1, ddof=1).mean())
    between = float(traces.mean(axis=1).var(ddof=1))  # B/n
    if within == 0:
        return 1.0 if between == 0 else math.inf
    return math.sqrt(((n_draws - 1) / n_draws * within + between) / within)


def effective_sample_size(traces: np.ndarray) -> float:
    """Effective number of independent draws in ``traces`` (``(n_chains, n_draws)``).

    The multi-chain estimate of Vehtari et al. 2021 (as in Stan and ArviZ): autocorrelations
    from FFT autocovariances, combined across chains, summed over Geyer's initial monotone
    sequence of pair sums. Independent draws give about ``n_chains * n_draws``.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> 3000 < effective_sample_size(rng.normal(size=(4, 1000))) < 5000
        True
        >>> walk = rng.normal(size=(4, 1000)).cumsum(axis=1)  # strongly autocorrelated
        >>> effective_sample_size(walk) < 100
        True
    """
    n_chains, n_draws = traces.shape
    if n_draws < 4:
        return math.nan
    centred = traces - traces.mean(axis=1, keepdims=True)
    size = 1 << (2 * n_draws - 1).bit_length()
    spectrum = np.fft.rfft(centred, n=size, axis=1)
    autocov = np.fft.irfft(spectrum * np.conj(spectrum), n=size, axis=1)[:, :n_draws] / n_draws
    chain_var = autocov[:, 0] * n_draws / (n_draws - 1)
    within = chain_var.mean()
    var_plus = within * (n_draws - 1) / n_draws
    if n_chains > 1:
        var_plus += traces.mean(axis=1).var(ddof=1)
    if var_plus <= 0:
        return math.nan
    rho = 1 - (within - autocov.mean(axis=0)) / var_plus
    rho[0] = 1.0
    # Geyer: sum pairs (rho_2k + rho_2k+1) while positive, made monotone non-increasing.
    n_pairs = n_draws // 2
    pairs = rho[: 2 * n_pairs].reshape(n_pairs, 2).sum(axis=1)
    positive = np.flatnonzero(pairs <= 0)
    pairs = pairs[: positive[0]] if positive.size else pairs
    pairs = np.minimum.accumulate(pairs)
    tau = -1 + 2 * pairs.sum()
    tau = max(tau, 1 / math.log10(max(n_chains * n_draws, 10)))
    return float(n_chains * n_draws / tau)


def trend_z(traces: np.ndarray) -> tuple[float, float]:
    """Geweke's z of the first 10 % against the last 50 % of the draws, and the difference.

    Each window mean's standard error assumes the autocorrelation time of the whole trace
    (from its ESS), which a trend lengthens: the test only errs on the side of silence.

    Returns:
        ``(z, difference)``: difference = mean(last half) − mean(first tenth) over all
        chains; z divides it by its standard error.
    """
    n_chains, n_draws = traces.shape
    head, tail = max(n_draws // 10, 2), n_draws - n_draws // 2
    ess = effective_sample_size(traces)
    if n_draws < 2 * head + 2 or not math.isfinite(ess) or ess <= 0:
        return math.nan, math.nan
    difference = float(traces[:, n_draws // 2 :].mean() - traces[:, :head].mean())
    tau = n_chains * n_draws / ess  # draws per effective draw
    variance = float(traces.var(ddof=1)) * tau / n_chains
    se = math.sqrt(variance / head + variance / tail)
    if se == 0:
        return (0.0 if difference == 0 else math.copysign(math.inf, difference)), difference
    return difference / se, difference


def diagnose(
    llc_traces: np.ndarray,
    llc: float,
    *,
    max_displacement: np.ndarray,
    settings: dict[str, Any],
) -> tuple[list[Diagnostic], float, float]:
    """Run every check on ``llc_traces`` = nβ·(L − L*) per draw, ``(n_chains, n_draws)``.

    Args:
        llc_traces: The per-draw contributions to the estimate.
        llc: The estimate λ̂.
        max_displacement: Largest |w − w*| per chain at the end of the run.
        settings: The run's hyperparameters (for the advice in the messages).

    Returns:
        ``(diagnostics, r_hat, ess)``.
    """
    found: list[Diagnostic] = []
    n_chains, n_draws = llc_traces.shape
    step_size, gamma = settings.get("step_size"), settings.get("gamma")
    r_hat = potential_scale_reduction(llc_traces)
    ess = effective_sample_size(llc_traces)
    mean, variance = float(llc_traces.mean()), float(llc_traces.var())
    moved = float(max_displacement.max()) if max_displacement.size else math.nan
    is_stuck = variance <= STUCK_RATIO * abs(mean) or (variance == 0 and mean == 0)
    if is_stuck:
        found.append(
            Diagnostic(
                DiagnosticKind.STUCK.value,
                f"The chains barely moved: nβ·(L − L*) has mean {mean:.3g} and variance "
                f"{variance:.3g} over the draws, where a chain at equilibrium has the two "
                f"about equal, and no parameter moved more than {moved:.3g} from w*. The "
                f"step_size ({step_size:g}) is too small to move the parameters (or the loss "
                "does not depend on them): increase step_size tenfold at a time until the "
                "estimate stops changing, or until the chains diverge.",
                value=variance / abs(mean) if mean else 0.0,
            )
        )
    if llc < 0:
        found.append(
            Diagnostic(
                DiagnosticKind.NEGATIVE.value,
                f"The LLC estimate is negative ({llc:.3g}): the chains found lower loss than at "
                "w*, so w* is not a local minimum of this loss (an under-trained checkpoint, "
                "or a task loss at a point the optimiser left). Train to convergence, use the "
                "behavioural loss (minimal at w* by construction), or raise gamma (now "
                f"{gamma:g}) to keep the chains closer to w*."
                + (
                    " With preset='devinterp' the loss at w* is also averaged over other "
                    "batches than the draws', which can shift the estimate by its noise."
                    if settings.get("preset") == "devinterp"
                    else ""
                ),
                value=llc,
            )
        )
    if math.isfinite(r_hat) and r_hat > R_HAT_LIMIT and not is_stuck:
        per_chain = llc_traces.mean(axis=1)
        found.append(
            Diagnostic(
                DiagnosticKind.CHAINS_DISAGREE.value,
                f"The chains disagree: R̂ = {r_hat:.3f} > {R_HAT_LIMIT} (chain estimates from "
                f"{per_chain.min():.3g} to {per_chain.max():.3g}). They have not mixed, or "
                "found different basins: run more draws (n_draws), a larger step_size if the "
                "traces drift slowly, or a larger gamma to keep every chain near w*.",
                value=r_hat,
                chains=(int(per_chain.argmin()), int(per_chain.argmax())),
            )
        )
    if math.isfinite(ess) and ess < ESS_MIN and not is_stuck:
        found.append(
            Diagnostic(
                DiagnosticKind.LOW_ESS.value,
                f"Only {ess:.0f} effective draws out of {n_chains * n_draws} (fewer than "
                f"{ESS_MIN:.0f}): the traces are strongly autocorrelated, so R̂ and the trend "
                "test are unreliable. Run more draws (n_draws) or more chains, or a larger "
                "step_size.",
                value=ess,
            )
        )
    z, difference = trend_z(llc_traces)
    is_trend = abs(z) > TREND_Z and abs(difference) > TREND_RELATIVE * abs(llc)
    if math.isfinite(difference) and is_trend and not is_stuck:
        rising = "still rising" if difference > 0 else "still falling"
        found.append(
            Diagnostic(
                DiagnosticKind.NOT_FLAT.value,
                f"The loss trace had not flattened by the end of burn-in: nβ·(L − L*) is "
                f"{rising} through the draws (last half minus first tenth: {difference:.3g}, "
                f"z = {z:.1f}). Use more burn-in steps (n_burnin, now "
                f"{settings.get('n_burnin')}) or a larger step_size.",
                value=z,
            )
        )
    return found, r_hat, ess
