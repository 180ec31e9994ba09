"""LLC diagnostics: each one fires on a case made to trigger it and stays silent when healthy.

The cases are potentials K(w) sampled around w* = 0 at nβ ≈ 1086 (n = 10^4), where the
sampler's behaviour is known: a quadratic in d dimensions relaxes in about 1/(ε·2nβ)
steps, and at equilibrium nβ·K has mean d/2 and variance d/2. Every run is seeded; the
thresholds of the checks are far from the values these cases produce (quoted).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from degen_hooks.llc import (
    Diagnostic,
    LLCResult,
    effective_sample_size,
    estimate_llc,
    potential_scale_reduction,
)

N_BETA = 10_000 / math.log(10_000)


pytestmark = pytest.mark.usefixtures("one_thread")


def quadratic(w: torch.Tensor) -> torch.Tensor:
    return w.square().sum()


def run(potential=quadratic, d: int = 4, **settings) -> LLCResult:
    """The potential's LLC at w* = 0, collecting the warnings it raised."""
    settings = {"n_beta": N_BETA, "gamma": 1.0, "progress": False, **settings}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = estimate_llc(potential, at=torch.zeros(d, dtype=torch.float64), **settings)
    result.hyperparameters["warnings"] = [str(w.message) for w in caught]
    return result


def kinds(result: LLCResult) -> list[str]:
    return [d.kind for d in result.diagnostics]


def plotted_labels(result: LLCResult) -> str:
    figure = result.plot_trace()
    return " ".join(text.get_text() for text in figure.axes[0].texts)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_healthy_run_raises_no_diagnostic(seed):
    # Relaxation ~46 steps, 300 of burn-in; ESS ~ 1000 (limit 100), R̂ ~ 1.01 (limit 1.1).
    result = run(step_size=1e-4, n_chains=4, n_draws=2000, n_burnin=300, seed=seed)
    assert result.diagnostics == ()
    assert result.is_healthy
    assert result.hyperparameters["warnings"] == []
    assert result.r_hat < 1.05 and result.ess > 300
    assert plotted_labels(result) == ""


def test_a_step_too_small_to_move_is_reported_not_returned_as_zero():
    # ε = 1e-30: the parameters change by ~1e-15, the loss by ~1e-27; the LLC is ~0.
    result = run(step_size=1e-30, n_chains=4, n_draws=200)
    assert abs(result.llc) < 1e-20
    assert kinds(result) == ["stuck"]
    stuck = result.diagnostic("stuck")
    assert "too small to move" in stuck.message and "increase step_size" in stuck.message
    assert any("barely moved" in w for w in result.hyperparameters["warnings"])
    assert "step too small to move" in plotted_labels(result)


def test_a_step_slightly_too_small_is_also_reported():
    # ε = 1e-8 moves the chains, but 250 steps relax only ~1 % of the way.
    result = run(step_size=1e-8, n_chains=4, n_draws=200)
    assert 0 < result.llc < 0.05
    assert "stuck" in kinds(result)


def test_a_negative_estimate_names_its_likely_cause():
    # w* = 0 is not the minimum of (w - 0.05)^2: the chains find lower loss.
    result = run(lambda w: (w[0] - 0.05) ** 2, d=1, step_size=1e-4, n_draws=500)
    assert result.llc < -1
    assert kinds(result) == ["negative"]
    assert "not a local minimum" in result.diagnostic("negative").message
    assert "negative LLC" in plotted_labels(result)


def test_chains_that_disagree_are_reported_with_r_hat():
    # A quartic explored with a small step: each chain wanders on its own (R̂ = 1.28).
    result = run(
        lambda w: w[0] ** 4,
        d=1,
        step_size=1e-5,
        gamma=0.0,
        n_chains=4,
        n_draws=2000,
        n_burnin=2000,
        seed=2,
    )
    assert result.r_hat > 1.2
    disagree = result.diagnostic("chains_disagree")
    assert disagree is not None and disagree.value == pytest.approx(result.r_hat)
    assert "R̂" in plotted_labels(result)


def test_few_effective_draws_are_reported():
    # Relaxation ~230 steps against 300 draws per chain: ESS ~ 3 (limit 100).
    result = run(step_size=2e-6, n_chains=2, n_draws=300, n_burnin=2000)
    assert result.ess < 20
    assert "low_ess" in kinds(result)
    assert "low ESS" in plotted_labels(result)


def test_a_trace_still_rising_after_burn_in_is_reported():
    # d = 200 (λ = 100, spread ±7): without burn-in, the first draws climb from 0 to 100.
    result = run(d=200, step_size=1e-5, n_chains=4, n_draws=1000, n_burnin=0)
    flat = result.diagnostic("not_flat")
    assert flat is not None and flat.value > 4
    assert "still rising" in flat.message and "n_burnin" in flat.message
    # The same run with enough burn-in is quiet about it.
    settled = run(d=200, step_size=1e-5, n_chains=4, n_draws=1000, n_burnin=500)
    assert "not_flat" not in kinds(settled)
    assert "not flat" in plotted_labels(result)


def test_r_hat_and_ess_match_their_textbook_values():
    rng = np.random.default_rng(0)
    independent = rng.normal(size=(4, 4000))
    assert potential_scale_reduction(independent) == pytest.approx(1.0, abs=0.01)
    assert effective_sample_size(independent) == pytest.approx(16000, rel=0.1)
    # An AR(1) chain with coefficient φ has ESS = N (1 - φ) / (1 + φ).
    phi, ar = 0.9, np.zeros((4, 20000))
    noise = rng.normal(size=ar.shape)
    for t in range(1, ar.shape[1]):
        ar[:, t] = phi * ar[:, t - 1] + noise[:, t]
    assert effective_sample_size(ar) == pytest.approx(80000 * 0.1 / 1.9, rel=0.15)
    assert math.isnan(potential_scale_reduction(ar[:1]))


def test_diagnostics_survive_a_save_round_trip():
    result = run(step_size=1e-30, n_chains=2, n_draws=50)
    restored = LLCResult.from_state_dict(result.state_dict(), result.metadata())
    assert restored.diagnostics == result.diagnostics
    assert isinstance(restored.diagnostics[0], Diagnostic)


def test_a_model_returning_a_loss_is_not_silently_given_another_loss():
    # The case: a module whose output is K(w) = |w|^2 (λ = 3 for d = 6). Its
    # behavioural loss would be (K - K*)^2 = |w|^4, with λ = 1.5: refused, and loss="output"
    # samples K itself.
    class Loss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(6, dtype=torch.float64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.w.square().sum()

    data = [torch.zeros(10_000, 1, dtype=torch.float64)]
    with pytest.raises(ValueError, match=r'single number .* looks like a loss.* loss="output"'):
        estimate_llc(Loss(), data, progress=False)
    result = estimate_llc(
        Loss(),
        data,
        loss="output",
        step_size=1e-4,
        gamma=1.0,
        n_draws=1000,
        n_burnin=100,
        progress=False,
    )
    assert result.llc == pytest.approx(3.0, rel=0.15)  # bias +5.4 %, s.e. ~3 %
