"""Interaction graph: edges, edge ablation, sparsity and modularity (lib_math §4.5, §7, §10)."""

from __future__ import annotations

import json

import matplotlib
import pytest
import torch
from safetensors.torch import load, save
from torch import nn

import degen_hooks as dh
from degen_hooks.graph import (
    InteractionGraph,
    ablate_edges,
    edge_ablation_curve,
    edges_for_mass,
    gini,
    integration_points,
    interaction_network,
    interaction_sparsity,
    louvain_communities,
    min_edges,
    modularity,
    sparsity_table,
    top_edges_mask,
)
from tests.cases import deep_linear, inputs, position_mixer, relu_mlp
from tests.reference import assert_spectrum_close

matplotlib.use("Agg")

F64 = torch.float64


def reference_edges(next_features, features: torch.Tensor) -> torch.Tensor:
    """Brute force: ``jacrev`` per sample of ``next_features`` ((S, r) -> (T, r')), squared."""
    jac = torch.func.vmap(torch.func.jacrev(next_features))(features)  # (n, T, r', S, r)
    attribution = torch.einsum("ntisj,nsj->ntij", jac, features)
    return attribution.square().sum((0, 1)) / (features.shape[0] * features.shape[1])


# -- exact edges against brute force, T3 and T6 ---------------------------------------------


@pytest.fixture(scope="module")
def mlp_graph():
    model, x = relu_mlp(seed=0), inputs(300, 5, seed=1)
    basis = dh.build_bases(model, ["1", "3"], x.split(100), progress=False)
    graph = InteractionGraph().fit(model, basis, x.split(100), output=True, progress=False)
    return model, x, basis, graph


def test_edges_match_brute_force_jacobians(mlp_graph):
    model, x, basis, graph = mlp_graph
    assert graph.sites_ == ["1", "3", "output"]
    assert graph.pairs_ == [("1", "3"), ("3", "output")]
    c1p, mu1 = basis.pinv_["1"], basis.means_["1"]
    c3, mu3 = basis.rotations_["3"], basis.means_["3"]

    def next_features(z: torch.Tensor) -> torch.Tensor:  # (1, r1) -> (1, r3)
        return (torch.relu(model[2](z @ c1p + mu1)) - mu3) @ c3

    feats = basis.transform(torch.relu(model[0](x)).detach(), "1")[:, None]
    expected = reference_edges(next_features, feats).detach()
    edges = graph.edges_[("1", "3")]
    assert edges.shape == (basis.widths_["3"], basis.widths_["1"]) and edges.dtype == F64
    torch.testing.assert_close(
        edges, expected, rtol=1e-10, atol=1e-14 * float(expected.max().detach())
    )
    assert bool((edges >= 0).all())


def test_linear_section_column_sums_equal_lambda_and_relu_does_not(mlp_graph):
    _, _, basis, graph = mlp_graph
    sums = graph.edges_[("3", "output")].sum(0)  # T6: Linear(6, 3) after site "3"
    assert_spectrum_close(sums, basis.lambdas_["3"], rtol=1e-9)
    ratio = graph.edges_[("1", "3")].sum(0) / basis.lambdas_["1"]  # Linear + ReLU
    assert (ratio - 1).abs().max() > 0.05


def test_deep_linear_edges_are_diagonal_with_lambda():
    model = deep_linear(seed=0, widths=(4, 6, 5, 3))
    mix = torch.randn(4, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    x = inputs(400, 4, seed=5) @ mix
    basis = dh.build_bases(model, ["0", "1"], x.split(200), rotate_output=True, progress=False)
    graph = InteractionGraph().fit(model, basis, x.split(200), output=True, progress=False)
    lam = basis.lambdas_["0"]
    assert graph.output_rotation_ is not None
    assert_spectrum_close(graph.lambdas_["output"], lam, rtol=1e-9)
    for pair in graph.pairs_:  # T3: identity map between layers, E = diag(Lambda)
        edges = graph.edges_[pair]
        assert_spectrum_close(torch.diagonal(edges), lam, rtol=1e-9)
        off = edges - torch.diag(torch.diagonal(edges))
        assert float(off.abs().max()) < 1e-12 * float(lam.max())


# -- the block-diagonal network (T12) ---------------------------------------------------------


def block_linear(d_in: int, d_out: int, gen: torch.Generator) -> nn.Linear:
    """A Linear layer acting block-diagonally on two halves."""
    layer = nn.Linear(2 * d_in, 2 * d_out).double()
    weight = torch.zeros(2 * d_out, 2 * d_in, dtype=F64)
    for rows, cols in ((slice(0, d_out), slice(0, d_in)), (slice(d_out, None), slice(d_in, None))):
        weight[rows, cols] = torch.randn(d_out, d_in, generator=gen, dtype=F64) / d_in**0.5
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(0.3 * torch.randn(2 * d_out, generator=gen, dtype=F64))
    return layer


@pytest.fixture(scope="module")
def modular():
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(
        block_linear(2, 4, gen),
        nn.Tanh(),
        block_linear(4, 4, gen),
        nn.Tanh(),
        block_linear(4, 2, gen),
    ).eval()
    a = torch.randn(20, 2, generator=gen, dtype=F64)
    b = 2 * torch.randn(20, 2, generator=gen, dtype=F64)
    # Cartesian product: every a with every b, so the cross-covariance is exactly 0.
    x = torch.cat([a.repeat_interleave(20, 0), b.repeat(20, 1)], dim=1)
    basis = dh.build_bases(model, ["1", "3"], x.split(200), progress=False)
    graph = InteractionGraph().fit(model, basis, x.split(200), output=True, progress=False)
    return model, x, basis, graph


def feature_blocks(rotation: torch.Tensor) -> torch.Tensor:
    half = rotation.shape[0] // 2
    mass_a, mass_b = rotation[:half].square().sum(0), rotation[half:].square().sum(0)
    impurity = torch.minimum(mass_a, mass_b) / (mass_a + mass_b)
    assert float(impurity.max()) < 1e-20
    return (mass_b > mass_a).long()


def test_block_diagonal_network_has_no_cross_block_edges(modular):
    _, _, basis, graph = modular
    blocks = {key: feature_blocks(basis.rotations_[key]) for key in basis.sites_}
    blocks["output"] = torch.tensor([0, 0, 1, 1])
    for (a, b), edges in graph.edges_.items():
        cross = blocks[b][:, None] != blocks[a][None, :]
        assert cross.any() and (~cross).any()
        assert float(edges[cross].max()) < 1e-12 * float(edges.max())


def test_louvain_finds_the_two_blocks(modular):
    _, _, basis, graph = modular
    network = interaction_network(graph)
    assert network.number_of_nodes() == sum(len(v) for v in graph.lambdas_.values())
    communities = louvain_communities(network, seed=0)
    connected = [c for c in communities if len(c) > 1]
    assert len(connected) == 2
    blocks = {key: feature_blocks(basis.rotations_[key]) for key in basis.sites_}
    blocks["output"] = torch.tensor([0, 0, 1, 1])
    for community in connected:
        assert len({int(blocks[site][j]) for site, j in community}) == 1
    q = modularity(network, communities)
    assert 0.3 < q <= 0.5 + 1e-12  # two equal, disconnected halves give Q = 1/2 at most
    one = [set(network.nodes)]
    assert abs(modularity(network, one)) < 1e-12


# -- stochastic sources (T15) and integrated gradients ------------------------------------------


@pytest.fixture(scope="module")
def mixer():
    model, x = position_mixer(seed=0), inputs(64, 4, seed=3, n_pos=5)
    sites = [dh.Site("embed"), dh.Site("act", positions="last")]
    basis = dh.build_bases(model, sites, x.split(32), progress=False)
    return model, x, basis


def test_stochastic_equals_exact_with_one_output_position(mixer):
    model, x, basis = mixer
    kw = {"output": True, "output_positions": "last", "progress": False}
    exact = InteractionGraph().fit(model, basis, x.split(32), **kw)
    stochastic = InteractionGraph(method="stochastic", n_sources=1, seed=3).fit(
        model, basis, x.split(32), **kw
    )
    for pair in exact.pairs_:  # phi^2 = 1
        torch.testing.assert_close(stochastic.edges_[pair], exact.edges_[pair], rtol=1e-12, atol=0)
    assert exact.n_rows_[("embed", "act")] == 64 * 5  # input rows: every position


def test_positions_sum_inside_for_inputs_and_outside_for_outputs(mixer):
    model, x, _ = mixer
    data = x.split(32)
    basis = dh.build_bases(model, ["embed", "act"], data, variant="pca", progress=False)
    edges = (
        InteractionGraph().fit(model, basis, data, progress=False, chunk=5).edges_[("embed", "act")]
    )
    c_pinv, mu = basis.pinv_["embed"], basis.means_["embed"]
    c_next, mu_next = basis.rotations_["act"], basis.means_["act"]

    def next_features(z: torch.Tensor) -> torch.Tensor:  # (5 positions, r) -> (5, r_next)
        f = (z @ c_pinv + mu)[None]
        return (model.act(model.mix(f))[0] - mu_next) @ c_next

    feats = basis.transform(model.embed(x).detach(), "embed")
    expected = reference_edges(next_features, feats).detach()
    torch.testing.assert_close(edges, expected, rtol=1e-10, atol=1e-14 * float(expected.max()))


def test_stochastic_edges_converge_with_more_sources(mixer):
    model, x, _ = mixer
    data = x.split(32)
    basis = dh.build_bases(model, ["embed", "act"], data, variant="pca", progress=False)
    exact = InteractionGraph().fit(model, basis, data, progress=False).edges_[("embed", "act")]

    def error(n_sources: int) -> float:  # 5 output positions mixed causally
        graph = InteractionGraph(method="stochastic", n_sources=n_sources, seed=1)
        edges = graph.fit(model, basis, data, progress=False).edges_[("embed", "act")]
        return float((edges - exact).norm() / exact.norm())

    errors = [error(n) for n in (1, 16, 256)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.1


def test_integrated_gradients_on_linear_and_nonlinear_sections(mlp_graph):
    model, x, basis, graph = mlp_graph
    data = x.split(150)
    rules = {
        "trap": InteractionGraph(integration="trapezoidal", n_intervals=40),
        "gl": InteractionGraph(integration="gauss-legendre", n_intervals=6),
    }
    fitted = {k: g.fit(model, basis, data, output=True, progress=False) for k, g in rules.items()}
    # A linear section has a constant Jacobian: every rule gives the gradient edges.
    for g in fitted.values():
        torch.testing.assert_close(
            g.edges_[("3", "output")], graph.edges_[("3", "output")], rtol=1e-10, atol=1e-14
        )
    trap, gl = fitted["trap"].edges_[("1", "3")], fitted["gl"].edges_[("1", "3")]
    assert float((trap - gl).norm() / gl.norm()) < 0.02  # both converge to the same integral
    assert float((gl - graph.edges_[("1", "3")]).norm() / gl.norm()) > 0.01


def test_integration_points():
    alphas, weights = integration_points("gauss-legendre", 3)
    assert len(alphas) == 4 and abs(weights.sum() - 1) < 1e-14
    assert abs((weights * alphas**5).sum() - 1 / 6) < 1e-14  # exact for degree <= 7
    with pytest.raises(ValueError, match="needs n_intervals >= 1"):
        integration_points("trapezoidal", 0)
    with pytest.raises(ValueError, match="evaluates one point"):
        integration_points("gradient", 3)


# -- edge ablation ------------------------------------------------------------------------------


class Capture:
    """A metric that records the outputs it sees."""

    def __init__(self) -> None:
        self.outputs: list[torch.Tensor] = []

    def __call__(self, output: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        self.outputs.append(output.detach().clone())
        return output.sum(-1)

    def output(self) -> torch.Tensor:
        return torch.cat(self.outputs)


def test_edge_ablation_with_all_edges_reproduces_the_model(mlp_graph):
    model, x, _, graph = mlp_graph
    for pair in graph.pairs_:
        capture = Capture()
        ablate_edges(model, graph, pair, x.split(100), metric=capture, feature_chunk=2)
        torch.testing.assert_close(capture.output(), model(x).detach(), rtol=1e-10, atol=1e-10)


def test_edge_ablation_matches_a_brute_force_recomputation(mlp_graph):
    model, x, basis, graph = mlp_graph
    edges = graph.edges_[("1", "3")]
    mask = top_edges_mask(edges, 7)
    assert int(mask.sum()) == 7 and float(edges[mask].min()) >= float(edges[~mask].max())
    capture = Capture()
    ablate_edges(model, graph, ("1", "3"), x.split(100), metric=capture, mask=mask, feature_chunk=2)
    feats = basis.transform(torch.relu(model[0](x)).detach(), "1")
    columns = []
    for i in range(edges.shape[0]):  # each output feature from its own masked input
        f1 = basis.inverse_transform(feats * mask[i].to(F64), "1")
        columns.append(basis.transform(torch.relu(model[2](f1)), "3")[:, i])
    f3 = basis.inverse_transform(torch.stack(columns, dim=1), "3")
    torch.testing.assert_close(capture.output(), model[4](f3).detach(), rtol=1e-10, atol=1e-10)
    # and it did change something
    assert (capture.output() - model(x)).abs().max() > 1e-3


def accuracy_like(model: nn.Module):
    """Higher is better: minus the squared distance to the clean output."""

    def metric(output: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        return -(output - model(batch)).square().sum(-1)

    return metric


def test_min_edges_agrees_with_a_brute_force_scan(mlp_graph):
    model, x, _, graph = mlp_graph
    data, metric, pair = x.split(150), accuracy_like(model), ("1", "3")
    total = graph.edges_[pair].numel()
    scan = [
        ablate_edges(model, graph, pair, data, metric=metric, n_edges=k) for k in range(total + 1)
    ]
    tolerance = 0.05 * abs(scan[0])
    ok = [v >= -tolerance for v in scan]
    result = min_edges(model, graph, pair, data, metric=metric, tolerance=tolerance)
    assert result.baseline == 0.0 and result.n_total == total
    k = result.n_edges
    assert ok[k] and (k == 0 or not ok[k - 1])  # a boundary of the scan
    assert k == min(j for j in range(total + 1) if all(ok[j:]))  # the last crossing
    ordered = graph.edges_[pair].reshape(-1).sort(descending=True).values
    assert result.threshold == float(ordered[k - 1])
    assert len(result.evaluations) < total / 2


def test_edge_ablation_curve_compares_bases(mlp_graph):
    model, x, basis, graph = mlp_graph
    data = x.split(150)
    pca = dh.build_bases(model, ["1", "3"], data, variant="pca", progress=False)
    graphs = {
        "LIB": graph,
        "PCA": InteractionGraph().fit(model, pca, data, output=True, progress=False),
    }
    metric = accuracy_like(model)
    curve = edge_ablation_curve(
        model, graphs, ("3", "output"), data, metric=metric, tolerance=0.1, progress=False
    )
    assert curve.baseline == 0.0 and set(curve.values) == {"LIB", "PCA"}
    for name in graphs:
        assert curve.n_edges[name][0] == 0 and curve.n_edges[name][-1] == curve.n_total[name]
        assert abs(curve.values[name][-1]) < 1e-15
        assert curve.min_edges[name].n_edges is not None
    json.dumps(curve.to_dict())
    rows, fitted = interaction_sparsity(
        model, {"LIB": basis, "PCA": pca}, data, mass=0.99, output=True, progress=False
    )
    assert set(fitted) == {"LIB", "PCA"}
    for row, other in zip(rows, sparsity_table(graphs), strict=True):
        assert row["n_edges_mass"] == other["n_edges_mass"] and row["shape"] == other["shape"]
        assert abs(row["gini"] - other["gini"]) < 1e-9
    assert [r["pair"] for r in rows] == ["1 -> 3", "3 -> output"] * 2
    json.dumps(rows)


# -- sparsity, persistence, plots, errors -------------------------------------------------------


def test_sparsity_measures():
    edges = torch.tensor([[6.0, 0.0, 3.0], [0.5, 0.5, 0.0]])
    assert edges_for_mass(edges, 0.5) == 1
    assert edges_for_mass(edges, 0.9) == 2
    assert edges_for_mass(edges, 1.0) == 4
    assert edges_for_mass(torch.zeros(2, 2)) == 0
    torch.testing.assert_close(gini(torch.ones(5)), 0.0)
    torch.testing.assert_close(gini(torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0])), 0.8)
    assert 0 < gini(edges) < 1
    with pytest.raises(ValueError, match="must be >= 0"):
        gini(-edges)
    with pytest.raises(ValueError, match=r"mass must be in \(0, 1\]"):
        edges_for_mass(edges, 0.0)


def test_state_round_trip(mlp_graph, tmp_path):
    model, x, basis, graph = mlp_graph
    state = load(save(graph.state_dict()))
    metadata = json.loads(json.dumps(graph.metadata()))
    loaded = InteractionGraph.from_state(state, metadata)
    assert loaded.pairs_ == graph.pairs_ and loaded.sites_ == graph.sites_
    for pair in graph.pairs_:
        assert torch.equal(loaded.edges_[pair], graph.edges_[pair])
    assert loaded.n_rows_ == graph.n_rows_ and loaded.output_ == graph.output_
    from degen_hooks.io import load as load_result
    from degen_hooks.io import save as save_result

    save_result(graph, tmp_path / "graph")  # the library registry knows the type
    again = load_result(tmp_path / "graph")
    assert isinstance(again, InteractionGraph) and again.metadata() == graph.metadata()
    for key in graph.sites_:
        assert torch.equal(again.lambdas_[key], graph.lambdas_[key])
    with pytest.raises(dh.NotFittedError, match="pass the basis"):
        ablate_edges(model, loaded, 0, [x], metric=Capture())
    capture = Capture()
    ablate_edges(model, loaded, "3", [x], metric=capture, basis=basis)
    torch.testing.assert_close(capture.output(), model(x).detach(), rtol=1e-10, atol=1e-10)


def test_plots_return_figures(modular):
    from matplotlib.figure import Figure

    from degen_hooks.plotting import plot_interaction_graph

    model, x, basis, graph = modular
    communities = louvain_communities(interaction_network(graph), seed=0)
    assert isinstance(plot_interaction_graph(graph, communities), Figure)
    assert isinstance(plot_interaction_graph(graph), Figure)
    metric = accuracy_like(model)
    curve = edge_ablation_curve(
        model, {"LIB": graph}, 1, [x], metric=metric, n_edges=[0, 4, 16], progress=False
    )
    assert isinstance(curve.plot(), Figure)
    node = dh.node_ablation_curve(model, {"LIB": basis}, "3", [x], metric=metric, progress=False)
    assert isinstance(node.plot(), Figure)
    import matplotlib.pyplot as plt

    plt.close("all")


def test_errors_teach(mlp_graph):
    model, x, basis, graph = mlp_graph
    with pytest.raises(ValueError, match="method must be one of"):
        InteractionGraph(method="sampled").fit(model, basis, [x], progress=False)
    with pytest.raises(ValueError, match="n_sources must be at least 1"):
        InteractionGraph(method="stochastic", n_sources=0).fit(model, basis, [x], progress=False)
    with pytest.raises(dh.NotFittedError, match="not fitted yet"):
        InteractionGraph().fit(model, dh.InteractionBasis(), [x])
    one = dh.build_bases(model, ["1"], [x], variant="pca", progress=False)
    with pytest.raises(dh.ShapeMismatchError, match="at least two node layers"):
        InteractionGraph().fit(model, one, [x], progress=False)
    backwards = dh.build_bases(model, ["3", "1"], [x], variant="pca", progress=False)
    with pytest.raises(dh.GradientError, match="forward order"):
        InteractionGraph().fit(model, backwards, [x], progress=False)
    with pytest.raises(dh.SiteNotFoundError, match="No layer pair"):
        graph.pair(("3", "1"))
    with pytest.raises(ValueError, match=r"mask has shape \(2, 2\)"):
        ablate_edges(model, graph, 0, [x], metric=Capture(), mask=torch.ones(2, 2, dtype=bool))
    with pytest.raises(ValueError, match="n_edges=99 is outside"):
        ablate_edges(model, graph, 1, [x], metric=Capture(), n_edges=99)
