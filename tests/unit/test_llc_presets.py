"""Presets (degen_hooks and devinterp conventions), samplers, and potentials without a model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from degen_hooks.llc import SGLD, RMSPropSGLD, estimate_llc

pytestmark = pytest.mark.filterwarnings("ignore:.*(effective draws|not flattened|disagree)")


pytestmark = pytest.mark.usefixtures("one_thread")


def least_squares_problem() -> tuple[nn.Linear, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Linear(3, 1) at the least-squares fit of noisy data, 8 batches of 64."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(512, 3, generator=g, dtype=torch.float64) * 2 - 1
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64)
    y = y + 0.3 * torch.randn(512, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(3, 1).double()
    with torch.no_grad():
        solution = torch.linalg.lstsq(torch.cat([x, torch.ones(512, 1)], 1), y).solution
        model.weight.copy_(solution[:3].T)
        model.bias.copy_(solution[3])
    return model, list(zip(x.split(64), y.split(64), strict=True))


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (outputs - targets).square().mean()


# --- presets -------------------------------------------------------------------------------


def test_devinterp_preset_uses_devinterps_defaults_and_init_loss():
    model, data = least_squares_problem()
    result = estimate_llc(
        model,
        data,
        loss="task",
        task_loss=mse,
        preset="devinterp",
        step_size=1e-3,
        n_chains=3,
        n_draws=50,
        progress=False,
    )
    assert result.n_beta == pytest.approx(64 / math.log(64))  # B/log B, B = 64
    settings = result.hyperparameters
    assert (settings["gamma"], settings["n_burnin"], settings["preset"]) == (0.0, 0, "devinterp")
    assert settings["n_beta_source"] == "B/log(B), B = 64"
    with torch.no_grad():  # devinterp's init_loss: the first n_chains batches at w*
        init_loss = np.mean([mse(model(x), y).item() for x, y in data[:3]])
    assert result.init_loss == pytest.approx(init_loss, rel=1e-12)
    expected = result.n_beta * (result.loss_traces.mean(dim=1) - init_loss)
    torch.testing.assert_close(result.llc_per_chain, expected, rtol=1e-12, atol=1e-12)


def test_presets_share_the_update_and_differ_only_in_conventions():
    model, data = least_squares_problem()
    settings = dict(
        loss="task",
        task_loss=mse,
        step_size=1e-3,
        n_beta=20.0,
        gamma=5.0,
        n_burnin=0,
        n_chains=2,
        n_draws=40,
        progress=False,
    )
    ours = estimate_llc(model, data, **settings)
    theirs = estimate_llc(model, data, preset="devinterp", **settings)
    torch.testing.assert_close(ours.loss_traces, theirs.loss_traces, rtol=0, atol=0)
    assert ours.llc != theirs.llc  # paired differences against one mean loss at w*


def test_default_preset_uses_n_over_log_n_and_localisation():
    model, data = least_squares_problem()
    result = estimate_llc(model, data, loss="task", task_loss=mse, n_draws=5, progress=False)
    assert result.n_beta == pytest.approx(512 / math.log(512))
    assert (result.hyperparameters["gamma"], result.hyperparameters["n_burnin"]) == (100.0, 50)
    assert result.hyperparameters["step_size"] == 1e-4


def test_devinterp_rmsprop_adapts_at_every_step_like_devinterp():
    model, data = least_squares_problem()
    result = estimate_llc(
        model,
        data,
        loss="task",
        task_loss=mse,
        preset="devinterp",
        sampler="rmsprop",
        step_size=1e-4,
        n_chains=1,
        n_draws=5,
        progress=False,
    )
    assert result.hyperparameters["rmsprop_adapt"] == "always"


def test_unknown_preset_and_sampler_suggest_the_closest():
    model, data = least_squares_problem()
    with pytest.raises(ValueError, match="Unknown preset 'devinterpp'.*Did you mean 'devinterp'"):
        estimate_llc(model, data, preset="devinterpp", progress=False)
    with pytest.raises(ValueError, match="Unknown sampler 'rmsprp'.*Did you mean 'rmsprop'"):
        estimate_llc(model, data, sampler="rmsprp", progress=False)
    with pytest.raises(TypeError, match="sampler must be"):
        estimate_llc(model, data, sampler=torch.optim.SGD, progress=False)


# --- samplers ------------------------------------------------------------------------------


def test_sampler_settings_are_validated_and_recorded():
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\)"):
        RMSPropSGLD(alpha=1.5)
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        RMSPropSGLD(eps=0.0)
    with pytest.raises(ValueError, match="adapt must be 'burnin'"):
        RMSPropSGLD(adapt="never")
    model, data = least_squares_problem()
    result = estimate_llc(
        model,
        data,
        sampler=RMSPropSGLD(alpha=0.9, eps=0.01),
        n_chains=1,
        n_draws=5,
        progress=False,
    )
    settings = result.hyperparameters
    assert (settings["sampler"], settings["rmsprop_alpha"], settings["rmsprop_eps"]) == (
        "rmsprop",
        0.9,
        0.01,
    )
    assert (
        estimate_llc(model, data, sampler=SGLD(), n_draws=5, progress=False).hyperparameters[
            "sampler"
        ]
        == "sgld"
    )


def test_rmsprop_gives_half_the_dimension_on_a_regular_quadratic():
    # K = |w|^2 in d = 4: λ = 2. ε·G ≈ 1e-5·7: bias ~ +0.4 %; s.e. ~ 3 % (16 chains).
    result = estimate_llc(
        lambda w: w.square().sum(),
        at=torch.zeros(4, dtype=torch.float64),
        n_beta=1085.7,
        sampler="rmsprop",
        step_size=1e-5,
        gamma=1.0,
        n_chains=16,
        n_draws=2000,
        n_burnin=500,
        progress=False,
    )
    assert abs(result.llc - 2.0) < 4 * result.llc_std_err + 0.02
    assert result.llc_std_err < 0.1


# --- potentials: a loss that is a function of the parameters -----------------------------


def test_a_potential_needs_no_model_and_a_dict_names_its_parameters():
    def potential(w: dict[str, torch.Tensor]) -> torch.Tensor:
        return w["a"].square().sum() + w["b"].pow(4).sum()

    at = {"a": torch.zeros(2, dtype=torch.float64), "b": torch.zeros(1, dtype=torch.float64)}
    result = estimate_llc(
        potential, at=at, n_beta=1085.7, step_size=1e-4, gamma=1.0, n_draws=50, progress=False
    )
    assert result.param_names == ("a", "b")
    assert result.n_params == 3 and result.n_samples is None
    assert result.hyperparameters["loss"] == "output"
    only_b = estimate_llc(
        potential, at=at, params="b", n_beta=1085.7, step_size=1e-3, n_draws=5, progress=False
    )
    assert only_b.param_names == ("b",)
    assert torch.equal(at["a"], torch.zeros(2, dtype=torch.float64))  # w* is only read


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (dict(n_beta=10.0), ValueError, "needs at="),
        (dict(at=torch.zeros(2)), ValueError, "pass n_beta"),
        (dict(at=torch.zeros(2), n_beta=10.0, data=[torch.zeros(1)]), ValueError, "takes no data"),
        (dict(at=torch.zeros(2, dtype=torch.long), n_beta=10.0), TypeError, "floating-point"),
        (dict(at={"a.b": torch.zeros(2)}, n_beta=10.0), ValueError, "without dots"),
        (dict(at=torch.zeros(2), n_beta=10.0, loss="task"), ValueError, "its own loss"),
    ],
    ids=["no-at", "no-n-beta", "data", "integer-at", "dotted-name", "loss"],
)
def test_potential_misuse_raises_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        estimate_llc(lambda w: w.square().sum(), progress=False, **call)


def test_model_misuse_raises_clear_errors():
    with pytest.raises(ValueError, match="data is needed"):
        estimate_llc(nn.Linear(2, 1), progress=False)
    with pytest.raises(ValueError, match="at= is the point to sample a potential"):
        estimate_llc(nn.Linear(2, 1), [torch.zeros(4, 2)], at=torch.zeros(2), progress=False)
    with pytest.raises(TypeError, match="nn.Module or a potential"):
        estimate_llc(3.0, progress=False)
    with pytest.raises(ValueError, match=r"single number \(a 0-d tensor\), got \(2,\)"):
        estimate_llc(lambda w: w, at=torch.zeros(2), n_beta=10.0, progress=False)
