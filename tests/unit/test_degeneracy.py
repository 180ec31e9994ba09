"""Degeneracy report and the exact behavioural null dimension (lib_math §4.3, T1, T2, T9, T13).

The exact counts are checked on one-hidden-layer ReLU nets built so the conditions of
lib_math hold: linearly independent weights, strict margins, data spanning the input space
on every neuron's on-region. Ranks are checked against brute-force Jacobians.
"""

from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

import degen_hooks as dh
from degen_hooks.degeneracy import (
    DegeneracyReport,
    behavioural_null_dimension,
    degeneracy_report,
)
from tests.cases import mlp_transformer

H, D_IN, D_OUT = 6, 4, 5
EPS = torch.finfo(torch.float64).eps


def generic_net(n: int = 400, seed: int = 0) -> tuple[nn.Sequential, torch.Tensor]:
    """``Linear(4, 6) -> ReLU -> Linear(6, 5)`` and inputs with |x_0| in [1, 2].

    The hidden hyperplanes lean little on x_0 (its weight column is scaled by 0.2), so every
    generic neuron cuts through both halves ``x_0 > 0`` and ``x_0 < 0`` of the data.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, D_IN, generator=g, dtype=torch.float64) * 2 - 1
    sign = torch.where(torch.rand(n, generator=g, dtype=torch.float64) < 0.5, -1.0, 1.0)
    x[:, 0] = sign * (1 + torch.rand(n, generator=g, dtype=torch.float64))
    model = nn.Sequential(nn.Linear(D_IN, H), nn.ReLU(), nn.Linear(H, D_OUT)).double()
    with torch.no_grad():
        w_in = torch.randn(H, D_IN, generator=g, dtype=torch.float64)
        w_in[:, 0] *= 0.2
        model[0].weight.copy_(w_in)
        model[0].bias.copy_(torch.randn(H, generator=g, dtype=torch.float64) * 0.3)
        model[2].weight.copy_(torch.randn(D_OUT, H, generator=g, dtype=torch.float64))
        model[2].bias.copy_(torch.randn(D_OUT, generator=g, dtype=torch.float64))
    return model, x


def synchronized_net(k: int) -> tuple[nn.Sequential, torch.Tensor]:
    """T13: neurons ``0..k-1`` fire iff ``x_0 > 0`` with linearly independent weights.

    Neuron i's pre-activation is ``a_i x_0 + (delta_i . x_rest + beta_i)`` with ``a_i`` in
    [1, 2] and every entry of ``delta_i, beta_i`` in [-0.1, 0.1]: the small part is at most
    0.4 in size, below the margin ``a_i |x_0| >= 1``, so the firing set is exactly
    ``{x_0 > 0}``, with margin >= 0.6.
    """
    model, x = generic_net()
    g = torch.Generator().manual_seed(100 + k)
    with torch.no_grad():
        for i in range(k):
            row = torch.rand(D_IN + 1, generator=g, dtype=torch.float64) * 0.2 - 0.1
            row[0] = 1 + torch.rand((), generator=g, dtype=torch.float64)
            model[0].weight[i] = row[:D_IN]
            model[0].bias[i] = row[D_IN]
    return model, x


def stats_of(model, x, sites=("0", "1"), **kw):
    with dh.collect(model, list(sites), firing=True, **kw) as run:
        for part in torch.tensor_split(x, 3):
            out = model(part)
            if kw.get("jacobians"):
                run.backward(out)
    return run.stats


def brute_jacobian(model, x, names=None) -> torch.Tensor:
    params = {n: p.detach() for n, p in model.named_parameters() if names is None or n in names}
    jac = jacrev(lambda p: functional_call(model, p, (x,)).reshape(-1))(params)
    return torch.cat([j.reshape(j.shape[0], -1) for j in jac.values()], dim=1)


# -- T13: synchronized group of k ReLUs ----------------------------------------------------------
@pytest.mark.parametrize(("k", "expected"), [(1, 6), (2, 8), (3, 12), (4, 18)])
def test_t13_null_dimension_is_h_plus_k_squared_minus_k(k, expected):
    model, x = synchronized_net(k)
    pre = model[0](x).detach()
    # Preconditions of lib_math T13, checked rather than assumed.
    fires = pre > 0
    assert torch.equal(fires[:, :k], (x[:, :1] > 0).expand(-1, k))
    assert pre[:, :k].abs().min() > 0.5  # strict margin
    rates = fires.double().mean(0)
    assert ((rates[k:] > 0.2) & (rates[k:] < 0.8)).all()  # generic neurons cut the data
    incoming = torch.cat([model[0].weight, model[0].bias[:, None]], dim=1).detach()
    assert torch.linalg.matrix_rank(incoming[:k]) == k
    assert torch.linalg.matrix_rank(model[2].weight[:, :k].detach()) == k

    null_dim, n_params, singular_values = behavioural_null_dimension(model, x)
    assert (null_dim, n_params) == (expected, H * D_IN + H + D_OUT * H + D_OUT)
    rank = n_params - null_dim
    relative = singular_values / singular_values[0]
    assert relative[rank - 1] > 1e-6 and relative[rank:].max() < 1e-12  # a clean gap

    report = degeneracy_report(stats_of(model, x), model=model, data=x)
    assert report.behavioural.null_dim == expected
    for row in report.sites:
        assert row.groups == ([list(range(k))] if k >= 2 else [])
        assert row.group_directions == k * k - k
        assert row.dead == [] and row.always_on == []


def test_t9_mixing_a_synchronized_group_leaves_outputs_unchanged():
    model, x = synchronized_net(3)
    g = torch.Generator().manual_seed(0)
    mix = torch.eye(3, dtype=torch.float64) + 0.05 * torch.randn(
        3, 3, generator=g, dtype=torch.float64
    )
    mixed, _ = synchronized_net(3)
    with torch.no_grad():
        mixed[0].weight[:3] = mix @ model[0].weight[:3]
        mixed[0].bias[:3] = mix @ model[0].bias[:3]
        mixed[2].weight[:, :3] = model[2].weight[:, :3] @ torch.linalg.inv(mix)
    torch.testing.assert_close(mixed(x), model(x), rtol=1e-12, atol=1e-12)
    assert (mixed[0](x) - model[0](x)).abs().max() > 1e-2  # activations did change


# -- T1 / T2: duplicated and dead neurons --------------------------------------------------------
def test_t1_duplicated_neuron_rank_deficiency_and_overlap():
    model, x = generic_net()
    with torch.no_grad():
        model[0].weight[1] = model[0].weight[0]
        model[0].bias[1] = model[0].bias[0]
    report = degeneracy_report(stats_of(model, x), model=model, data=x)
    post = report.sites[1]
    assert (post.site, post.d_site, post.activation_rank) == ("1", H, H - 1)
    assert (post.d_next, post.free_outgoing) == (D_OUT, D_OUT)
    assert post.groups == [[0, 1]] and post.group_directions == 2
    # Exact count: (h - 2) + (d_out + 2) = h + d_out, not h + d_out + 2 (mechanisms overlap).
    assert report.behavioural.null_dim == H + D_OUT
    # Mechanism (i) alone is exact for the next layer's weights and bias.
    assert behavioural_null_dimension(model, x, params="2")[0] == post.free_outgoing
    assert behavioural_null_dimension(model, x, params="2.weight")[0] == D_OUT


def test_t2_dead_neuron_frees_incoming_and_outgoing_weights():
    model, x = generic_net()
    with torch.no_grad():
        model[0].bias[0] = -100.0
    stats = stats_of(model, x, jacobians="exact")
    report = degeneracy_report(stats, model=model, data=x)
    pre, post = report.sites
    assert post.dead == [0] and pre.dead == [0]
    assert post.activation_deficiency == 1 and post.free_outgoing == D_OUT
    assert pre.jacobian_deficiency == 1  # no gradient flows through a dead neuron
    assert pre.jacobians == "exact"
    assert report.behavioural.null_dim == (H - 1) + (D_IN + 1) + D_OUT


def test_jacobian_gram_rank_matches_brute_force():
    model, x = generic_net(n=120)
    with torch.no_grad():
        model[2].weight[:, 1] = model[2].weight[:, 0]  # neurons 0 and 1 write the same vector
    stats = stats_of(model, x, sites=["0"], jacobians="exact")
    relu = (model[0](x) > 0).double()
    per_sample = model[2].weight.detach()[None] * relu[:, None, :]  # d out / d pre, (n, 5, 6)
    gram = torch.einsum("noi,noj->ij", per_sample, per_sample) / len(x)
    torch.testing.assert_close(stats["0"].grads.second_moment(), gram, rtol=1e-10, atol=1e-12)
    row = degeneracy_report(stats, model=model).sites[0]
    assert row.jacobian_rank == torch.linalg.matrix_rank(gram) == H
    assert row.d_next is None and row.free_outgoing is None  # a pre-activation site


# -- behavioural_null_dimension ------------------------------------------------------------------
def test_behavioural_matches_brute_force_svd_over_batches():
    model, x = synchronized_net(2)
    null_dim, n_params, singular_values = behavioural_null_dimension(
        model, list(torch.tensor_split(x, 4))
    )
    reference = torch.linalg.svdvals(brute_jacobian(model, x))
    torch.testing.assert_close(singular_values, reference, rtol=0, atol=1e-10 * reference[0])
    assert n_params - null_dim == torch.linalg.matrix_rank(brute_jacobian(model, x))


def test_behavioural_deep_linear_network_and_float32_model_untouched():
    deep_linear = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 2, bias=False))
    before = {n: p.detach().clone() for n, p in deep_linear.named_parameters()}
    null_dim, n_params, singular_values = behavioural_null_dimension(
        deep_linear, torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
    )
    assert (null_dim, n_params) == (20 - 6, 20)  # the 2 x 3 product has 6 entries
    assert singular_values.dtype == torch.float64 and len(singular_values) == 20
    for name, p in deep_linear.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, before[name])


def test_behavioural_rtol_and_params_errors():
    model, x = generic_net(n=50)
    full = behavioural_null_dimension(model, x)[0]
    assert behavioural_null_dimension(model, x, rtol=0.5)[0] > full
    with pytest.raises(dh.SiteNotFoundError, match=r"'2.weigth'.*Did you mean '2.weight'"):
        behavioural_null_dimension(model, x, params="2.weigth")
    with pytest.raises(ValueError, match="inputs is empty"):
        behavioural_null_dimension(model, [])


# -- the report ----------------------------------------------------------------------------------
def test_report_text_html_and_dict():
    model, x = generic_net(n=60)
    report = degeneracy_report(stats_of(model, x), model=model, data=x)
    assert isinstance(report, DegeneracyReport)
    text = str(report)
    assert text == report.summary()
    assert text.splitlines()[0].split()[:4] == ["site", "d", "rank(cov)", "deficiency"]
    assert "overlap and are NOT additive" in text
    assert "Behavioural Gauss-Newton null dimension: 6 of 65 parameters" in text
    assert "<table>" in report._repr_html_() and "NOT additive" in report._repr_html_()
    as_dict = json.loads(json.dumps(report.to_dict()))
    assert as_dict["behavioural"]["null_dim"] == 6
    assert as_dict["sites"][1]["free_outgoing"] == 0
    assert as_dict["sites"][1]["activation_rtol"] == pytest.approx(10 * H * EPS)
    assert "NOT additive" in as_dict["note"]
    bare = str(degeneracy_report(stats_of(model, x)))
    assert "not computed (pass model= and data=" in bare
    assert "pass next_widths={site: width}" in bare


def test_report_calls_a_row_limited_count_an_upper_bound():
    model, x = generic_net(n=60)
    enough = degeneracy_report(stats_of(model, x), model=model, data=x)
    assert not enough.behavioural.is_upper_bound
    assert "exact on these data" in str(enough)
    assert enough.to_dict()["behavioural"]["is_upper_bound"] is False
    # 4 samples x 5 outputs = 20 rows for 65 parameters: every row is independent.
    few = degeneracy_report(stats_of(model, x[:4]), model=model, data=x[:4])
    b = few.behavioural
    assert (b.rank, b.n_rows, b.null_dim) == (20, 20, 45) and b.is_upper_bound
    text = str(few)
    assert "at most 45 of 65 parameters, an upper bound, not the exact count" in text
    assert "rank 20 equals its 20 output rows" in text and "exact on these data" not in text
    assert few.to_dict()["behavioural"]["is_upper_bound"] is True


def test_report_random_probes_are_flagged():
    model, x = generic_net(n=30)
    report = degeneracy_report(stats_of(model, x, sites=["0"], jacobians="rademacher"))
    assert report.sites[0].jacobians == "rademacher"
    assert "lower bound of the exact rank" in report.summary()


def test_next_width_inference_and_override():
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(3, 6), nn.ReLU())
    model = nn.Sequential(inner, nn.Dropout(0.0), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    sites = ["0.0", "0.1", dh.Site("2", io="input"), "3"]
    with dh.collect(model, sites) as run:
        model(torch.randn(20, 3))
    rows = {r.site: r for r in degeneracy_report(run.stats, model=model).sites}
    assert rows["0.0"].d_next is None  # a pre-activation: the ReLU comes next
    assert rows["0.1"].d_next == 4  # last child of the inner Sequential, Dropout skipped
    assert rows["2:input"].d_next == 4
    assert rows["3"].d_next == 2
    overridden = degeneracy_report(run.stats, "0.0", model=model, next_widths={"0.0": 7})
    assert overridden.sites[0].d_next == 7


class TransformerLensLikeMLP(nn.Module):
    """Weights as parameters read through hook points, the TransformerLens layout."""

    def __init__(self) -> None:
        super().__init__()
        self.W_in = nn.Parameter(torch.randn(3, 5))
        self.W_out = nn.Parameter(torch.randn(5, 3))
        self.hook_pre, self.hook_post = nn.Identity(), nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hook_post(torch.relu(self.hook_pre(x @ self.W_in))) @ self.W_out


def test_next_width_of_transformer_lens_hook_post():
    model = nn.Sequential(OrderedDict(mlp=TransformerLensLikeMLP()))
    with dh.collect(model, ["mlp.hook_pre", "mlp.hook_post"]) as run:
        model(torch.randn(10, 3))
    rows = degeneracy_report(run.stats, model=model).sites
    assert [r.d_next for r in rows] == [None, 3]


def test_report_errors_teach():
    model, x = generic_net(n=20)
    stats = stats_of(model, x)
    with pytest.raises(dh.SiteNotFoundError, match=r"'l'.*Available: \['0', '1'\]"):
        degeneracy_report(stats, ["l"])
    with pytest.raises(dh.SiteNotFoundError, match="No statistics for site '2'"):
        degeneracy_report(stats, next_widths={"2": 3})
    with pytest.raises(ValueError, match="next_widths\\['1'\\] must be a positive int"):
        degeneracy_report(stats, next_widths={"1": 0})
    with pytest.raises(ValueError, match="data= was given without model="):
        degeneracy_report(stats, data=x)


def test_rtol_is_used_for_the_site_ranks():
    model, x = generic_net(n=80)
    stats = stats_of(model, x, sites=["1"])
    default = degeneracy_report(stats).sites[0]
    assert default.activation_rank == H and default.activation_rtol == 10 * H * EPS
    loose = degeneracy_report(stats, rtol=0.99).sites[0]
    assert loose.activation_rank == 1 and loose.activation_rtol == 0.99


def test_constant_neuron_counts_through_the_centred_covariance():
    # A neuron constant on the data is linearly dependent on the next layer's bias: the
    # centred covariance sees it (the uncentred second moment would not).
    model, x = generic_net(n=100)
    with torch.no_grad():
        model[0].weight[2] = 0.0
        model[0].bias[2] = 1.0
    row = degeneracy_report(stats_of(model, x, sites=["1"]), model=model).sites[0]
    assert row.activation_deficiency == 1 and row.free_outgoing == D_OUT
    assert row.always_on == [2]
    assert behavioural_null_dimension(model, x, params="2")[0] == D_OUT


@pytest.mark.slow
def test_transformer_lens_report():
    pytest.importorskip("transformer_lens")
    model = mlp_transformer(n_ctx=4, d_vocab=7)
    tokens = torch.randint(0, 7, (30, 4), generator=torch.Generator().manual_seed(0))
    sites = ["blocks.0.mlp.hook_pre", "blocks.0.mlp.hook_post"]
    with dh.collect(model, sites, firing=True, jacobians="exact") as run:
        run.backward(model(tokens))
    report = degeneracy_report(run.stats, model=model, data=tokens)
    pre, post = report.sites
    cfg = model.cfg
    assert pre.activation_rank <= cfg.d_model  # pre-activations are affine in the residual
    assert (pre.d_next, post.d_next) == (None, cfg.d_model)  # read through mlp.W_out
    n_params = sum(p.numel() for p in model.parameters())
    assert report.behavioural.n_params == n_params
    assert 0 < report.behavioural.null_dim < n_params
