"""Tests for degen_hooks.llc: known learning coefficients, model hygiene, errors.

Synthetic cases use a module whose output is a potential K(w) of its parameters, with the
loss ``outputs.sum()``, so the sampler explores exactly K and λ is known. All of them use
n = 10^4 samples (nβ = n/log n ≈ 1086) and a localisation γ small against nβ. The
expected numbers quoted in comments include the SGLD discretisation bias, measured with
a 4000-chain numpy run of the same update rule.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from degen_hooks._errors import (
    DivergenceError,
    EmptyStatisticsError,
    NonFiniteError,
    SiteNotFoundError,
)
from degen_hooks.llc import LLCResult, estimate_llc

pytestmark = pytest.mark.filterwarnings("ignore:.*(effective draws|not flattened|disagree)")

N_SYNTHETIC = 10_000
N_BETA_SYNTHETIC = N_SYNTHETIC / math.log(N_SYNTHETIC)  # ≈ 1085.7


class Potential(nn.Module):
    """Outputs K(w) whatever the input, so that ``potential_loss`` is exactly K(w)."""

    def __init__(self, potential, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(d, dtype=torch.float64))
        self.potential = potential

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.potential(self.w).reshape(1)


pytestmark = pytest.mark.usefixtures("one_thread")


def potential_loss(outputs, batch, reference):
    return outputs.sum()


def synthetic_llc(potential, d: int, **settings) -> LLCResult:
    """LLC of K at w* = 0 with n = 10^4 samples (only their number matters)."""
    data = [torch.zeros(N_SYNTHETIC, 1, dtype=torch.float64)]
    return estimate_llc(
        Potential(potential, d), data, loss=potential_loss, progress=False, **settings
    )


def uniform(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, d, generator=g, dtype=torch.float64) * 2 - 1


def relu_mlp(variant: str = "alive") -> nn.Sequential:
    """2-4-1 ReLU MLP with kinks inside [-1, 1]^2; one neuron can be dead or duplicated."""
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 1.0], [1.0, 1.0]]))
        model[0].bias.copy_(torch.tensor([0.2, -0.1, 0.3, -0.2]))
        model[2].weight.copy_(torch.tensor([[1.0, -1.0, 1.0, 1.0]]))
        model[2].bias.fill_(0.1)
        if variant == "dead":  # never fires on [-1, 1]^2: its 4 parameters are free
            model[0].bias[3] = -20.0
        elif variant == "duplicate":  # neuron 3 copies neuron 2, the output weight is split
            model[0].weight[3] = model[0].weight[2]
            model[0].bias[3] = model[0].bias[2]
            model[2].weight[0, 2:] = 0.5
    return model


def exact_cross_llc(n_beta: float, gamma: float) -> float:
    """nβ(E_p[K] − K(0)) for K = w1²w2², p ∝ exp(−nβK − γ|w|²/2), on a 2-D grid.

    p is even in each coordinate, so the quadrant suffices. The nodes crowd towards the
    axes, where the ridges of p are narrowest (width ~ 1/(sqrt(2nβ)·|w|)).
    """
    nodes = 8 / math.sqrt(gamma) * np.linspace(0.0, 1.0, 2001) ** 2
    w1, w2 = np.meshgrid(nodes, nodes, indexing="ij")
    potential = (w1 * w2) ** 2
    density = np.exp(-n_beta * potential - gamma / 2 * (w1**2 + w2**2))

    def integral(f: np.ndarray) -> float:
        return float(np.trapezoid(np.trapezoid(f, nodes, axis=1), nodes))

    return n_beta * integral(potential * density) / integral(density)


# --- known learning coefficients ------------------------------------------------------------


def test_regular_quadratic_gives_half_the_dimension():
    # K = |w|², d = 6: λ = 3. γ = 1 lowers it by 0.05%, ε·nβ·2 = 0.22 raises it by 5.7%.
    result = synthetic_llc(
        lambda w: w.square().sum(), 6, step_size=1e-4, gamma=1.0, n_draws=1000, n_burnin=100
    )
    assert result.n_params == 6
    assert result.n_beta == pytest.approx(N_BETA_SYNTHETIC)
    assert result.llc == pytest.approx(3.0, rel=0.15)
    assert result.n_eff == pytest.approx(2 * result.llc)


@pytest.mark.slow
def test_quadratic_plus_quartic_gives_three_quarters():
    # K = w1² + w2⁴: λ = 1/2 + 1/4. Expected with this ε and γ: 0.777.
    result = synthetic_llc(
        lambda w: w[0] ** 2 + w[1] ** 4, 2, step_size=1e-4, gamma=1.0, n_draws=5000, n_burnin=500
    )
    assert result.llc == pytest.approx(0.75, rel=0.15)


@pytest.mark.slow
def test_sextic_gives_one_sixth():
    # K = w⁶: λ = 1/6. γ must be small against nβ^(1/3) ≈ 10. Expected with this ε: 0.176.
    result = synthetic_llc(
        lambda w: w[0] ** 6, 1, step_size=3e-3, gamma=0.1, n_draws=6000, n_burnin=500
    )
    assert result.llc == pytest.approx(1 / 6, rel=0.15)


def test_cross_quadrature_matches_its_closed_form():
    # Integrating w2 out analytically leaves a 1-D integral: a check of the 2-D grid.
    n_beta, gamma = N_BETA_SYNTHETIC, 20.0
    w1 = np.linspace(0.0, 8 / math.sqrt(gamma), 200_001)
    marginal = np.exp(-gamma / 2 * w1**2) / np.sqrt(2 * n_beta * w1**2 + gamma)
    conditional = n_beta * w1**2 / (2 * n_beta * w1**2 + gamma)  # nβ·E[K | w1]
    closed_form = np.trapezoid(conditional * marginal, w1) / np.trapezoid(marginal, w1)
    assert exact_cross_llc(n_beta, gamma) == pytest.approx(closed_form, rel=1e-4)


@pytest.mark.slow
def test_cross_matches_the_tempered_posterior_by_quadrature():
    # K = w1²w2² has λ = 1/2 (multiplicity 2) only as n → ∞; at nβ ≈ 1086 and γ = 20 the
    # localised posterior gives 0.234. Expected with this ε: 0.245.
    expected = exact_cross_llc(N_BETA_SYNTHETIC, 20.0)
    assert expected == pytest.approx(0.2344, abs=1e-3)
    result = synthetic_llc(
        lambda w: (w[0] * w[1]) ** 2,
        2,
        step_size=1e-3,
        gamma=20.0,
        n_draws=5000,
        n_burnin=500,
    )
    assert result.llc == pytest.approx(expected, rel=0.15)


def test_linear_model_behavioural_llc_is_half_its_parameter_count():
    # nn.Linear(3, 2): d = 8, the behavioural loss is a full-rank quadratic, λ = 4.
    model = nn.Linear(3, 2).double()
    data = list(uniform(4096, 3, seed=0).mul(1.7).split(256))  # about unit variance
    result = estimate_llc(
        model, data, step_size=2e-4, gamma=1.0, n_draws=1000, n_burnin=100, progress=False
    )
    assert result.n_params == 8
    assert result.init_loss == 0.0
    assert result.llc == pytest.approx(4.0, rel=0.15)


def test_task_loss_of_least_squares_fit_is_half_its_parameter_count():
    x = uniform(4096, 3, seed=1).mul(1.7)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64) + 0.3 * uniform(4096, 1, 2)
    model = nn.Linear(3, 1).double()
    with torch.no_grad():  # w* = the least-squares solution, a minimum of the task loss
        solution = torch.linalg.lstsq(torch.cat([x, torch.ones(4096, 1)], 1), y).solution
        model.weight.copy_(solution[:3].T)
        model.bias.copy_(solution[3])
    result = estimate_llc(
        model,
        list(zip(x.split(256), y.split(256), strict=True)),
        loss="task",
        task_loss=lambda outputs, targets: (outputs - targets).square().mean(),
        step_size=2e-4,
        gamma=1.0,
        n_draws=1000,
        n_burnin=100,
        progress=False,
    )
    assert result.init_loss > 0
    assert result.llc == pytest.approx(2.0, rel=0.15)


def test_softmax_shift_invariance_lowers_the_logits_llc():
    # KL between softmaxes ignores a shift shared by all logits: of Linear(3, 3)'s 12
    # parameters, 4 directions are free, so λ = (12 - 4)/2 = 4.
    model = nn.Linear(3, 3).double()
    data = list(uniform(4096, 3, seed=3).mul(1.7).split(256))
    result = estimate_llc(
        model,
        data,
        output_kind="logits",
        step_size=1e-3,
        gamma=1.0,
        n_draws=600,
        n_burnin=100,
        progress=False,
    )
    assert result.llc == pytest.approx(4.0, rel=0.15)


def test_dead_neuron_lowers_the_behavioural_llc():
    # The dead neuron's 4 parameters are free. The same seed gives both models the same
    # noise, so chain by chain the difference is much less noisy than either estimate.
    data = list(uniform(8192, 2, seed=1).split(256))
    settings = dict(
        step_size=1.5e-4, gamma=10.0, n_chains=2, n_draws=800, n_burnin=200, progress=False
    )
    alive = estimate_llc(relu_mlp("alive"), data, **settings)
    dead = estimate_llc(relu_mlp("dead"), data, **settings)
    assert (alive.llc_per_chain > dead.llc_per_chain).all()
    assert alive.llc - dead.llc > 0.3  # a quadratic approximation predicts 5.88 - 4.69


@pytest.mark.slow
def test_duplicated_neuron_lowers_the_behavioural_llc():
    data = list(uniform(8192, 2, seed=1).split(256))
    settings = dict(step_size=1.5e-4, gamma=10.0, n_draws=3000, n_burnin=500, progress=False)
    alive = estimate_llc(relu_mlp("alive"), data, **settings)
    duplicate = estimate_llc(relu_mlp("duplicate"), data, **settings)
    assert (alive.llc_per_chain > duplicate.llc_per_chain).all()


# --- per-layer LLC --------------------------------------------------------------------------


def tanh_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).double()


def test_params_restricts_sampling_to_the_chosen_layer():
    model = tanh_mlp()
    data = list(uniform(2048, 2, seed=4).split(256))
    seen = {"0.weight": [], "2.weight": []}

    def forward(m: nn.Sequential, batch: torch.Tensor) -> torch.Tensor:
        seen["0.weight"].append(m[0].weight.detach().clone())
        seen["2.weight"].append(m[2].weight.detach().clone())
        return m(batch)

    settings = dict(step_size=1e-4, gamma=10.0, n_chains=2, n_draws=300, progress=False)
    # One chain at a time: under vmap, forward would see (and keep) batched tensors.
    last = estimate_llc(model, data, params="2", forward=forward, parallel=False, **settings)
    assert last.param_names == ("2.weight", "2.bias")
    assert last.n_params == 5
    assert all(torch.equal(w, model[0].weight) for w in seen["0.weight"])
    assert not all(torch.equal(w, model[2].weight) for w in seen["2.weight"])
    full = estimate_llc(model, data, **settings)
    assert full.n_params == 17
    assert last.llc < full.llc


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ("0", ("0.weight", "0.bias")),
        ("2.weight", ("2.weight",)),
        ("*.bias", ("0.bias", "2.bias")),
        (["2", "0.weight"], ("0.weight", "2.weight", "2.bias")),
    ],
    ids=["module", "parameter", "glob", "mixed-list"],
)
def test_params_accepts_modules_parameters_and_globs(params, expected):
    data = [uniform(64, 2, seed=0)]
    result = estimate_llc(
        tanh_mlp(), data, params=params, n_chains=1, n_draws=2, n_burnin=0, progress=False
    )
    assert result.param_names == expected


def test_unknown_params_suggest_close_names():
    data = [uniform(64, 2, seed=0)]
    with pytest.raises(
        SiteNotFoundError, match=r"'2.weigth' matches no .* Did you mean '2.weight'"
    ):
        estimate_llc(tanh_mlp(), data, params="2.weigth", progress=False)
    with pytest.raises(SiteNotFoundError, match=r"'1' holds no parameters"):
        estimate_llc(tanh_mlp(), data, params="1", progress=False)


# --- the user's model and the global state are left alone ---------------------------------


def test_model_rng_and_grad_mode_are_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.ReLU(), nn.Linear(4, 2)
    )
    model[0].weight.requires_grad_(False)
    model(torch.randn(8, 3)).sum().backward()  # leaves .grad on the trainable parameters
    model[2].eval()  # mixed modes must come back as they were
    before = copy.deepcopy(model)  # deepcopy drops .grad: keep the gradients separately
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    assert any(g is not None for g in grads)
    identities = [id(p) for p in model.parameters()]
    dataset = torch.utils.data.TensorDataset(torch.randn(64, 3))
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, shuffle=True)
    rng_state = torch.get_rng_state()

    with torch.no_grad():
        result = estimate_llc(model, loader, n_chains=2, n_draws=20, progress=False)
        assert not torch.is_grad_enabled()

    assert torch.equal(torch.get_rng_state(), rng_state)
    assert math.isfinite(result.llc) and result.n_samples == 64
    assert [id(p) for p in model.parameters()] == identities
    named = zip(model.named_parameters(), before.parameters(), grads, strict=True)
    for (name, p), q, grad in named:
        assert torch.equal(p, q), name
        assert p.requires_grad == q.requires_grad, name
        assert (p.grad is None and grad is None) or torch.equal(p.grad, grad), name
    for (name, b), c in zip(model.named_buffers(), before.buffers(), strict=True):
        assert torch.equal(b, c), name
    assert [m.training for m in model.modules()] == [m.training for m in before.modules()]


def test_tied_parameters_are_sampled_once_under_every_name():
    shared = nn.Linear(2, 2).double()
    model = nn.Sequential(shared, nn.Tanh(), shared)  # "0.weight" is "2.weight"
    seen = []

    def forward(m: nn.Sequential, batch: torch.Tensor) -> torch.Tensor:
        seen.append(m[0].weight is m[2].weight)
        return m(batch)

    result = estimate_llc(
        model, [uniform(64, 2, seed=0)], forward=forward, n_chains=1, n_draws=5, progress=False
    )
    assert result.param_names == ("0.weight", "0.bias")
    assert result.n_params == 6
    assert all(seen)


def test_same_seed_same_result_other_seed_other_result():
    data = list(uniform(512, 2, seed=5).split(128))
    run = dict(n_chains=2, n_draws=50, progress=False)
    first = estimate_llc(tanh_mlp(), data, seed=3, **run)
    again = estimate_llc(tanh_mlp(), data, seed=3, **run)
    other = estimate_llc(tanh_mlp(), data, seed=4, **run)
    assert torch.equal(first.loss_traces, again.loss_traces)
    assert not torch.equal(first.loss_traces, other.loss_traces)


def test_float32_model_and_dict_batches_with_forward():
    model = nn.Linear(3, 2)
    data = [{"x": torch.randn(32, 3)} for _ in range(2)]
    result = estimate_llc(
        model, data, forward=lambda m, batch: m(batch["x"]), n_draws=20, progress=False
    )
    assert result.n_samples == 64
    assert result.loss_traces.dtype == torch.float64
    assert result.loss_traces.shape == (4, 20)
    assert math.isfinite(result.llc)


# --- divergence and bad inputs ------------------------------------------------------------


def test_exploding_chain_raises_with_chain_draw_and_advice():
    with pytest.raises(
        DivergenceError,
        match=r"SGLD chain \d diverged at burn-in step \d+: batch loss .* smaller step_size "
        r"\(now 0.1\) or a larger gamma",
    ) as caught:
        synthetic_llc(lambda w: w.square().sum(), 2, step_size=0.1)
    partial = caught.value.result  # the traces up to the divergence, for a trace plot
    assert [d.kind for d in partial.diagnostics] == ["divergence"]
    assert math.isnan(partial.llc)
    figure = partial.plot_trace()
    assert any("diverged" in text.get_text() for text in figure.axes[0].texts)


def test_nan_loss_raises_divergence():
    def potential(w):  # NaN once |w| leaves 0.01, as the first noisy step does
        return torch.where(w.abs() < 0.01, w.square(), torch.nan).sum()

    with pytest.raises(DivergenceError, match=r"chain 0 diverged at draw 1: batch loss nan"):
        synthetic_llc(potential, 1, step_size=1.0, n_burnin=0)


def test_non_finite_loss_at_w_star_is_reported_as_such():
    with pytest.raises(NonFiniteError, match=r"loss at the trained parameters w\* is nan"):
        synthetic_llc(lambda w: w.sum() * torch.nan, 1)


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        ([], EmptyStatisticsError, "no samples"),
        ([torch.zeros(0, 2)], EmptyStatisticsError, "no samples"),
        (iter([torch.zeros(4, 2)]), ValueError, "one-shot iterator"),
        (torch.zeros(4, 2), ValueError, r"single tensor .* list\(x.split\(256\)\)"),
        ([object()], TypeError, "Cannot count the samples"),
    ],
    ids=["empty-list", "empty-batch", "iterator", "bare-tensor", "unknown-batch"],
)
def test_bad_data_raises_clear_errors(data, error, match):
    with pytest.raises(error, match=match):
        estimate_llc(nn.Linear(2, 1), data, progress=False)


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"loss": "behavioral"}, "Did you mean 'behavioural'"),
        ({"output_kind": "logit"}, "Did you mean 'logits'"),
        ({"step_size": 0.0}, "step_size must be a finite number > 0"),
        ({"gamma": -1.0}, "gamma must be a finite number >= 0"),
        ({"n_beta": float("nan")}, "n_beta must be"),
        ({"n_chains": 0}, "n_chains must be an integer >= 1"),
        ({"params": []}, "params is empty"),
    ],
    ids=["loss", "output-kind", "step-size", "gamma", "n-beta", "n-chains", "params"],
)
def test_bad_settings_raise_clear_errors(settings, match):
    with pytest.raises(ValueError, match=match):
        estimate_llc(nn.Linear(2, 1), [torch.zeros(4, 2)], progress=False, **settings)


def test_model_and_loss_outputs_are_checked():
    data = [torch.zeros(4, 2)]
    with pytest.raises(TypeError, match="returned tuple, not a tensor"):
        estimate_llc(nn.LSTM(2, 3, batch_first=True), [torch.zeros(4, 5, 2)], progress=False)
    with pytest.raises(ValueError, match=r"scalar tensor, got \(4, 1\)"):
        estimate_llc(nn.Linear(2, 1), data, loss=lambda out, b, ref: out, progress=False)
    with pytest.raises(TypeError, match=r"needs \(inputs, targets\) batches"):
        estimate_llc(nn.Linear(2, 1), data, loss="task", progress=False)


# --- the result -----------------------------------------------------------------------------


def test_result_round_trips_through_json_and_plots():
    data = [uniform(256, 2, seed=6)]
    result = estimate_llc(tanh_mlp(), data, n_chains=1, n_draws=30, progress=False)
    assert math.isnan(result.llc_std_err)
    metadata = json.loads(json.dumps(result.metadata(), allow_nan=False))
    restored = LLCResult.from_state_dict(result.state_dict(), metadata)
    assert math.isnan(restored.llc_std_err)
    for key in ["llc", "init_loss", "n_beta", "n_samples", "n_params", "param_names"]:
        assert getattr(restored, key) == getattr(result, key), key
    assert restored.hyperparameters == result.hyperparameters
    assert restored.hyperparameters["n_beta_source"] == "n/log(n)"
    assert torch.equal(restored.loss_traces, result.loss_traces)
    assert torch.equal(restored.burnin_traces, result.burnin_traces)
    assert restored.diagnostics == result.diagnostics
    assert restored.ess == result.ess
    assert repr(result).startswith("LLCResult(llc=")

    from matplotlib.figure import Figure

    figure = result.plot_trace()
    assert isinstance(figure, Figure)
    assert len(figure.axes[0].lines) == 3  # the chain's draws, its burn-in, the loss at w*
    assert figure._repr_png_().startswith(b"\x89PNG")  # what a notebook displays


def test_progress_bar_is_shown_on_request(capfd):
    estimate_llc(nn.Linear(2, 1), [torch.zeros(4, 2)], n_chains=1, n_draws=3, n_burnin=0)
    assert "SGLD" in capfd.readouterr().err
