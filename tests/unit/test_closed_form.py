"""The closed-form Jacobian Gram of MLP sections (lib_math §12) against exact probes and jacrev.

A section ``x -> Linear -> sigma -> Linear (-> + x)`` has
``M' = W_in^T ((W_out^T R R^T W_out) * E[sigma' sigma'^T]) W_in``: the derivative moments come
from ``dh.collect(..., derivatives={pre_site: "relu"})`` in a forward pass, and the result must
equal the Gram of exact backward probes and of stacked ``torch.func.jacrev`` Jacobians.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import degen_hooks as dh
from degen_hooks.closed_form import activation_derivative
from tests import reference as ref
from tests.cases import build, gelu_mlp, inputs, relu_mlp, residual_mlp

RTOL = 1e-9


def assert_gram(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


def closed_and_exact(model, x, *, section, pre, x_site, target, derivative, readout=None):
    """Closed-form M' (derivative moments at ``pre``) and exact-probe M' at ``x_site``."""
    x = x.clone().requires_grad_(True)  # the section input may be the model input
    with dh.collect(
        model,
        [x_site, pre],
        jacobians="exact",
        target=target,
        readout=readout,
        derivatives={pre: derivative},
        firing=True,
        chunk=2,
    ) as run:
        for part in (x[:7], x[7:]):
            model(part)
            run.backward()
    closed = section.jacobian_gram(run.stats[pre].derivs, readout=readout)
    return closed, run


# -- closed form == exact probes == jacrev -----------------------------------------------------
@pytest.mark.parametrize("with_readout", [False, True], ids=["identity", "readout"])
def test_relu_section(with_readout):
    model, x = build("relu_mlp", n=20)
    readout = inputs(6, 3, seed=3) if with_readout else None
    section = dh.MLPSection.from_modules(model[0], model[1], model[2])
    closed, run = closed_and_exact(
        model, x, section=section, pre="0", x_site=dh.Site("0", io="input"), target="2",
        derivative="relu", readout=readout,
    )  # fmt: skip
    jac = ref.site_jacobians(model, x, "0", io="input", target="2")
    assert_gram(closed, ref.jacobian_gram(jac, readout=readout))
    assert_gram(closed, run.stats["0:input"].grads.second_moment())
    # For ReLU, E[sigma' sigma'^T] is the co-firing matrix of the pre-activations.
    assert_gram(run.stats["0"].derivs.second_moment(), run.stats["0"].firing.cofiring())


def test_relu_section_in_the_middle_of_a_deeper_net():
    model, x = build("relu_mlp", n=20)  # section: input of "2" -> "2" -> ReLU "3" -> "4"
    section = dh.MLPSection(model[2].weight, model[4].weight, "relu")
    closed, run = closed_and_exact(
        model, x, section=section, pre="2", x_site=dh.Site("2", io="input"), target="4",
        derivative="relu",
    )  # fmt: skip
    assert_gram(closed, run.stats["2:input"].grads.second_moment())
    jac = ref.site_jacobians(model, x, "2", io="input", target="4")
    assert_gram(closed, ref.jacobian_gram(jac))


@pytest.mark.parametrize("with_readout", [False, True], ids=["identity", "readout"])
def test_gelu_section(with_readout):
    model = gelu_mlp(seed=1)
    x = inputs(20, 5, seed=4)
    readout = inputs(4, 2, seed=5) if with_readout else None
    section = dh.MLPSection.from_modules(model[0], model[1], model[2])
    assert section.activation == "gelu"
    closed, run = closed_and_exact(
        model, x, section=section, pre="0", x_site=dh.Site("0", io="input"), target="2",
        derivative="gelu", readout=readout,
    )  # fmt: skip
    assert_gram(closed, run.stats["0:input"].grads.second_moment())
    jac = ref.site_jacobians(model, x, "0", io="input", target="2")
    assert_gram(closed, ref.jacobian_gram(jac, readout=readout))


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("with_readout", [False, True], ids=["identity", "readout"])
def test_residual_section(activation, with_readout):
    model = residual_mlp(seed=2, activation=activation)
    x = inputs(20, 6, seed=6)
    readout = inputs(6, 4, seed=7) if with_readout else None
    section = dh.MLPSection.from_modules(
        model.linear_in, model.act, model.linear_out, residual=True
    )
    closed, run = closed_and_exact(
        model, x, section=section, pre="linear_in", x_site="resid_pre", target="resid",
        derivative=activation, readout=readout,
    )  # fmt: skip
    assert_gram(closed, run.stats["resid_pre"].grads.second_moment())
    jac = ref.site_jacobians(model, x, "resid_pre", target="resid")
    assert_gram(closed, ref.jacobian_gram(jac, readout=readout))


def test_closed_form_with_positions():
    # A per-position MLP on (batch, pos, d) inputs: positions are samples on both sides.
    model = relu_mlp(seed=3)
    x = inputs(12, 5, seed=8, n_pos=3)
    section = dh.MLPSection.from_modules(model[0], model[1], model[2])
    closed, run = closed_and_exact(
        model, x, section=section, pre="0", x_site=dh.Site("0", io="input"), target="2",
        derivative="relu",
    )  # fmt: skip
    assert_gram(closed, run.stats["0:input"].grads.second_moment())


def test_dead_and_duplicated_neurons_in_the_cofiring_matrix():
    model = relu_mlp(seed=0)
    with torch.no_grad():
        model[0].weight[1] = model[0].weight[0]  # neuron 1 duplicates neuron 0
        model[0].bias[1] = model[0].bias[0]
        model[0].weight[2] = 0.0  # neuron 2 is dead
        model[0].bias[2] = -1.0
    x = inputs(30, 5, seed=9)
    with dh.collect(model, ["0"], derivatives={"0": "relu"}) as run:
        model(x)
    second = run.stats["0"].derivs.second_moment()
    assert torch.equal(second[0], second[1])
    assert torch.all(second[2] == 0)


# -- activation derivatives --------------------------------------------------------------------
FUNCTIONS = {
    "relu": torch.relu,
    "gelu": nn.functional.gelu,
    "gelu_new": lambda z: nn.functional.gelu(z, approximate="tanh"),
    "silu": nn.functional.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "identity": lambda z: z,
}


@pytest.mark.parametrize("name", FUNCTIONS)
def test_named_derivatives_match_autograd(name):
    z = inputs(64, 1, seed=10).flatten() * 3
    expected = torch.func.vmap(torch.func.grad(FUNCTIONS[name]))(z)
    assert_gram(activation_derivative(name)(z), expected, rtol=1e-12)


@pytest.mark.parametrize(
    "module",
    [nn.ReLU(), nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(), nn.Tanh(), nn.Sigmoid()],
    ids=["relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid"],
)
def test_module_derivatives_match_autograd(module):
    z = inputs(64, 1, seed=11).flatten() * 3
    expected = torch.func.vmap(torch.func.grad(lambda t: module(t)))(z)
    assert_gram(activation_derivative(module)(z), expected, rtol=1e-12)


def test_callable_derivative_in_place_and_inference_mode():
    z = inputs(16, 3, seed=12)
    leaky = activation_derivative(nn.LeakyReLU(0.1, inplace=True))
    softplus = activation_derivative(nn.functional.softplus)
    with torch.inference_mode():
        slopes = leaky(z)
        smooth = softplus(z)
    expected = torch.ones_like(z)
    expected[z <= 0] = 0.1
    assert torch.equal(slopes, expected)
    assert_gram(smooth, torch.sigmoid(z), rtol=1e-12)


def test_callable_derivative_collected_without_grad():
    model, x = build("gelu_mlp", n=10)
    with dh.collect(model, ["0"], derivatives={"0": lambda z: torch.tanh(z)}) as run:
        with torch.inference_mode():
            model(x)
    pre = ref.activations(model, x, "0")
    expected = ref.covariance(1 - torch.tanh(pre) ** 2)
    assert_gram(run.stats["0"].derivs.cov(), expected)


# -- errors ------------------------------------------------------------------------------------
def test_errors():
    w_in, w_out = torch.ones(4, 3), torch.ones(2, 4)
    with pytest.raises(dh.ShapeMismatchError, match=r"disagree on d_mlp"):
        dh.MLPSection(w_in, torch.ones(2, 5))
    with pytest.raises(dh.ShapeMismatchError, match=r"residual section needs d_out == d_in"):
        dh.MLPSection(w_in, w_out, residual=True)
    section = dh.MLPSection(w_in, w_out)
    derivs = dh.Covariance().update(torch.rand(5, 4, dtype=torch.float64))
    with pytest.raises(dh.ShapeMismatchError, match=r"Readout of shape \(3, 1\).*width 2"):
        section.jacobian_gram(derivs, readout=torch.ones(3, 1))
    with pytest.raises(dh.ShapeMismatchError, match=r"width 6, but the section's hidden width"):
        section.jacobian_gram(dh.Covariance().update(torch.rand(5, 6)))
    with pytest.raises(ValueError, match=r"Unknown activation 'relu6'"):
        activation_derivative("relu6")
    with pytest.raises(ValueError, match=r"No closed form known for activation Softplus"):
        dh.MLPSection.from_modules(nn.Linear(3, 4), nn.Softplus(), nn.Linear(4, 2))


def test_jacobian_gram_is_symmetric_psd():
    model = relu_mlp(seed=4)
    x = inputs(40, 5, seed=13)
    with dh.collect(model, ["0"], derivatives={"0": "relu"}) as run:
        model(x)
    gram = dh.MLPSection.from_modules(model[0], model[1], model[2]).jacobian_gram(
        run.stats["0"].derivs
    )
    torch.testing.assert_close(gram, gram.T, rtol=0, atol=0)
    assert float(torch.linalg.eigvalsh(gram).min()) > -1e-12 * math.sqrt(float(gram.trace()))


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("identity_in", [False, True])
@pytest.mark.parametrize("with_readout", [False, True])
def test_linear_section_gram_is_jt_q_j(residual, identity_in, with_readout):
    """A linear section's Gram is ``J^T Q J`` with ``J = [I +] W_out W_in``, identity
    ``W_in`` (an unembedding ``(eye(d_model), W_U)``) and residual ones included. The cost is
    tested below."""
    gen = torch.Generator().manual_seed(0)
    d, d_mlp = 5, 5 if identity_in else 7
    w_in = torch.eye(d) if identity_in else torch.randn(d_mlp, d, generator=gen)
    w_out = torch.randn(d, d_mlp, generator=gen)
    section = dh.MLPSection(w_in.double(), w_out.double(), "identity", residual=residual)
    readout = torch.randn(d, 3, generator=gen, dtype=torch.float64) if with_readout else None
    jac = w_out.double() @ w_in.double() + (torch.eye(d, dtype=torch.float64) if residual else 0)
    q = torch.eye(d, dtype=torch.float64) if readout is None else readout @ readout.T
    assert_gram(section.jacobian_gram(None, readout), jac.T @ q @ jac, rtol=1e-12)


@pytest.mark.parametrize("with_readout", [False, True])
def test_linear_gram_takes_no_cubic_product_in_the_hidden_width(with_readout):
    """``mlp.hook_post -> hook_resid_post`` is ``(eye(d_mlp), W_out)``: its Gram costs
    ``O(d_mlp^2 d_out)``, not the ``2 d_mlp^3`` of ``W_in^T (K * S) W_in`` (counted FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    d_mlp, d_out = 120, 4
    gen = torch.Generator().manual_seed(1)
    w_out = torch.randn(d_out, d_mlp, generator=gen, dtype=torch.float64)
    section = dh.MLPSection(torch.eye(d_mlp, dtype=torch.float64), w_out, "identity")
    readout = torch.randn(d_out, 3, generator=gen, dtype=torch.float64) if with_readout else None
    counter = FlopCounterMode(display=False)
    with counter:
        gram = section.jacobian_gram(None, readout)
    assert counter.get_total_flops() < d_mlp**3
    q = torch.eye(d_out, dtype=torch.float64) if readout is None else readout @ readout.T
    assert_gram(gram, w_out.T @ q @ w_out, rtol=1e-12)
