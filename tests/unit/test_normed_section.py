"""NormedMLPSection: a norm (LayerNorm, RMSNorm or none) then a plain or gated MLP (#16).

The Gram of one forward pass must equal the Gram of exact backward probes (``dh.collect(...,
jacobians="exact")``) and of stacked ``torch.func.jacrev`` Jacobians, in float64, for every
combination of norm, gating, activation, residual, read-out and positions.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import degen_hooks as dh
from degen_hooks.normed_section import NormedMLPSection

F64 = torch.float64
D, D_MLP = 6, 10


class Block(nn.Module):
    """``y = [x +] W_out h(W_in n(x) + b) + b_out`` written out by hand (the reference)."""

    def __init__(self, norm: str | None, gated: bool, activation: str, residual: bool) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)

        def rand(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.randn(*shape, generator=gen, dtype=F64) / shape[-1] ** 0.5)

        self.norm, self.gated, self.activation, self.residual = norm, gated, activation, residual
        self.gain, self.beta = nn.Parameter(1 + 0.3 * rand(D)), rand(D)
        self.w_in = rand(D_MLP * (2 if gated else 1), D)
        self.b_in = rand(D_MLP * (2 if gated else 1))
        self.w_out, self.b_out = rand(D, D_MLP), rand(D)
        self.eps = 1e-5
        self.inp, self.out = nn.Identity(), nn.Identity()  # the sites
        self.unused = nn.Identity()  # a site that never fires

    def act(self, z: torch.Tensor) -> torch.Tensor:
        return {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "identity": lambda t: t}[
            self.activation
        ](z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        if self.norm == "LN":
            n = F.layer_norm(x, (D,), self.gain, self.beta, self.eps)
        elif self.norm == "RMS":
            n = x / (x.square().mean(-1, keepdim=True) + self.eps).sqrt() * self.gain
        else:
            n = x
        z = n @ self.w_in.T + self.b_in
        if self.gated:
            gate, up = z.chunk(2, -1)
            h = self.act(gate) * up
        else:
            h = self.act(z)
        y = h @ self.w_out.T + self.b_out
        return self.out(x + y if self.residual else y)

    def section(self) -> NormedMLPSection:
        w = self.w_in.detach()
        gain = self.gain.detach() if self.norm else torch.ones(D, dtype=F64)
        beta = self.beta.detach() if self.norm == "LN" else torch.zeros(D, dtype=F64)
        return NormedMLPSection(
            w * gain,
            self.w_out.detach(),
            bias=w @ beta + self.b_in.detach(),
            activation=self.activation,
            norm=self.norm,
            eps=self.eps,
            residual=self.residual,
            gated=self.gated,
        )


def exact_gram(model, x, site, target, readout):
    with dh.collect(model, [site], jacobians="exact", target=target, readout=readout) as run:
        _ = model(x.clone().requires_grad_(True))
        run.backward()
    return run.stats[site.key].grads.second_moment().detach()


def jacrev_gram(model, x, readout):
    """Stacked per-row Jacobians of the whole block (rows: x of shape (n, D))."""
    jac = torch.vmap(torch.func.jacrev(lambda row: model(row[None])[0]))(x)  # (n, D, D)
    if readout is not None:
        jac = readout.T @ jac
    return (torch.einsum("nij,nik->jk", jac, jac) / x.shape[0]).detach()


def assert_gram(actual, expected, rtol=1e-10):
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


CASES = [
    (norm, gated, act, residual)
    for norm in ("LN", "RMS", None)
    for gated, act in ((False, "gelu"), (False, "relu"), (False, "identity"), (True, "silu"))
    for residual in (False, True)
]


@pytest.mark.parametrize(("norm", "gated", "activation", "residual"), CASES)
@pytest.mark.parametrize("with_readout", [False, True])
def test_gram_equals_exact_probes_and_jacrev(norm, gated, activation, residual, with_readout):
    model = Block(norm, gated, activation, residual)
    x = torch.randn(40, D, generator=torch.Generator().manual_seed(1), dtype=F64) * 2 + 0.5
    readout = None
    if with_readout:
        readout = torch.randn(D, 4, generator=torch.Generator().manual_seed(2), dtype=F64)
    site, target = dh.Site("inp"), dh.Site("out")
    closed = model.section().gram_pass(
        model, list(x.split(16)), site, target, readout, progress=False
    )
    assert closed.n_samples == 40
    expected = exact_gram(model, x, site, target, readout)
    assert_gram(closed.second_moment(), expected)
    assert_gram(closed.second_moment(), jacrev_gram(model, x, readout))


@pytest.mark.parametrize("positions", [None, "last", [0, 2]])
def test_positions_are_the_samples(positions):
    model = Block("LN", True, "silu", True)
    x = torch.randn(7, 3, D, generator=torch.Generator().manual_seed(3), dtype=F64)
    site, target = dh.Site("inp", positions=positions), dh.Site("out", positions=positions)
    closed = model.section().gram_pass(model, [x[:4], x[4:]], site, target, progress=False)
    assert_gram(closed.second_moment(), exact_gram(model, x, site, target, None))


def test_hidden_output_without_w_out():
    """A section ending at the hidden layer (``w_out=None``): the norm and ``W_in`` (+ sigma)."""
    model = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, D_MLP), nn.GELU()).double()
    section = NormedMLPSection(
        model[1].weight.detach() * model[0].weight.detach(),
        None,
        bias=model[1].weight.detach() @ model[0].bias.detach() + model[1].bias.detach(),
        activation="gelu",
    )
    x = torch.randn(30, D, generator=torch.Generator().manual_seed(4), dtype=F64)
    site, target = dh.Site("0", io="input"), dh.Site("2")
    closed = section.gram_pass(model, [x], site, target, progress=False).second_moment()
    assert_gram(closed, exact_gram(model, x, site, target, None))


def test_the_pass_stops_at_the_input():
    """Only the section's input is needed: nothing after it runs."""
    ran = []
    model = Block("RMS", False, "gelu", False)
    model.out.register_forward_hook(lambda *_: ran.append(1))
    model.section().gram_pass(model, [torch.randn(5, D, dtype=F64)], dh.Site("inp"),
                              dh.Site("out"), progress=False)  # fmt: skip
    assert ran == []


def test_bad_inputs_teach():
    model = Block("LN", False, "gelu", False)
    section = model.section()
    with pytest.raises(ValueError, match="norm must be"):
        NormedMLPSection(section.w_in, section.w_out, norm="batch")
    with pytest.raises(dh.ShapeMismatchError, match="same positions"):
        section.gram_pass(model, [], dh.Site("inp", positions="last"), dh.Site("out"))
    with pytest.raises(dh.ShapeMismatchError, match=r"\(d_out, r\)"):
        section.gram_pass(model, [], dh.Site("inp"), dh.Site("out"), torch.eye(3, dtype=F64))
    with pytest.raises(dh.ShapeMismatchError, match="even number"):
        NormedMLPSection(torch.ones(3, D), torch.ones(D, 1), gated=True)
    with pytest.raises(dh.ShapeMismatchError, match="residual"):
        NormedMLPSection(torch.ones(4, D), None, residual=True)
    with pytest.raises(RuntimeError, match="never reached"):
        section.gram_pass(model, [torch.randn(2, D, dtype=F64)], dh.Site("unused"), dh.Site("out"))


GRAPH_RULES = {
    "exact": {},
    "stochastic": {"method": "stochastic", "n_sources": 3, "seed": 2},
    "gauss-legendre": {"integration": "gauss-legendre", "n_intervals": 3},
}


@pytest.mark.parametrize(("norm", "gated", "activation", "residual"), CASES)
@pytest.mark.parametrize("rule", GRAPH_RULES.values(), ids=GRAPH_RULES.keys())
@pytest.mark.parametrize("positions", [None, "last"])
def test_graph_edges_equal_backward_passes(norm, gated, activation, residual, rule, positions):
    """Closed-form edges (#19) of every section kind, with positions and integration."""
    from degen_hooks.graph import InteractionGraph

    model = Block(norm, gated, activation, residual)
    x = torch.randn(24, 3, D, generator=torch.Generator().manual_seed(5), dtype=F64) + 0.3
    data = list(x.split(8))
    sites = [dh.Site("inp", positions=positions), dh.Site("out", positions=positions)]
    sections = {sites[0].key: (model.section(), None)}
    basis = dh.build_bases(model, sites, data, sections=sections, progress=False)
    common = {"output": False, "progress": False}
    closed = InteractionGraph(**rule).fit(model, basis, data, sections=sections, **common)
    backward = InteractionGraph(**rule).fit(model, basis, data, sections=None, **common)
    assert closed.closed_form_ == closed.pairs_ and backward.closed_form_ == []
    for pair in closed.pairs_:
        expected = backward.edges_[pair]
        torch.testing.assert_close(
            closed.edges_[pair], expected, rtol=1e-10, atol=1e-14 * float(expected.max())
        )
