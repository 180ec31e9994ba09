"""Closed-form interaction-graph edges (#19): equal to the backward passes, memory flat.

Every case fits the same graph twice, once with the closed-form sections (``sections="auto"``,
the default, or an explicit mapping) and once with backward passes everywhere
(``sections=None``), and compares the edges at ``rtol=1e-10`` (float64): exact and stochastic
edges (the same random signs), the gradient rule and integrated gradients.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import degen_hooks as dh
from degen_hooks.graph import InteractionGraph
from tests.cases import deep_linear, gelu_mlp, inputs, relu_mlp, residual_mlp

RTOL = 1e-10
RULES = {
    "exact": {},
    "stochastic": {"method": "stochastic", "n_sources": 3, "seed": 2},
    "gauss-legendre": {"integration": "gauss-legendre", "n_intervals": 3},
    "stochastic-trapezoidal": {
        "method": "stochastic",
        "n_sources": 2,
        "integration": "trapezoidal",
        "n_intervals": 2,
    },
}


def assert_same_graph(model, basis, data, rule, sections="auto", **kw) -> InteractionGraph:
    """Fit with ``sections`` and with backward passes; the edges agree. Returns the first."""
    closed = InteractionGraph(**rule).fit(model, basis, data, sections=sections, **kw)
    backward = InteractionGraph(**rule).fit(model, basis, data, sections=None, **kw)
    assert backward.closed_form_ == []
    assert closed.pairs_ == backward.pairs_ and closed.n_rows_ == backward.n_rows_
    for pair in closed.pairs_:
        expected = backward.edges_[pair]
        torch.testing.assert_close(
            closed.edges_[pair], expected, rtol=RTOL, atol=1e-14 * float(expected.max())
        )
    for key, lam in backward.lambdas_.items():
        torch.testing.assert_close(closed.lambdas_[key], lam, rtol=1e-12, atol=0)
    return closed


@pytest.mark.parametrize("rule", RULES.values(), ids=RULES.keys())
@pytest.mark.parametrize("variant", ["lib", "pca"])
def test_sequential_mlp_sections_equal_backward_passes(rule, variant):
    model, x = relu_mlp(seed=0), inputs(120, 5, seed=1)
    data = x.split(40)
    if variant == "lib":
        basis = dh.build_bases(model, ["1", "3"], data, progress=False)
    else:
        basis = dh.build_bases(model, ["1", "3"], data, variant=variant, progress=False)
    graph = assert_same_graph(model, basis, data, rule, output=True, progress=False)
    # ReLU -> Linear -> ReLU (1 -> 3), then the linear read-out (3 -> output)
    assert graph.closed_form_ == [("1", "3"), ("3", "output")]
    assert list(graph.timings_) == [
        "edges 1 -> 3 (closed form)",
        "edges 3 -> output (closed form)",
        "reads",
    ]


@pytest.mark.parametrize(
    "hook",
    [lambda m, a, out: out * (out > 0.5), lambda m, a, out: out.detach() / 2 + out / 2],
    ids=["ablation", "half-detached"],
)
def test_a_hook_on_an_mlp_is_followed_not_ignored(hook):
    """A forward hook of the user's on a module of an ``nn.Sequential`` MLP (an ablation of
    small activations, or half of the output detached, which keeps every value but halves
    the gradient): the
    closed form cannot see what it does to the Jacobian, so ``build_bases`` and the graph
    leave that pair to backward passes, which follow it, and say so; the other pairs keep
    their closed forms. Before, both silently returned the unhooked model's Jacobians."""
    model, x = relu_mlp(seed=0), inputs(120, 5, seed=1)
    data = x.split(40)
    basis = dh.build_bases(model, ["1", "3"], data, progress=False)
    handle = model[2].register_forward_hook(hook)  # the Linear between the two sites
    try:
        with pytest.warns(UserWarning, match=r"1 -> 3: a hook of yours on \['2'\]"):
            auto = dh.build_bases(model, ["1", "3"], data, progress=False)
        assert "jacobians 1 (closed form)" not in auto.timings_
        slow = dh.build_bases(model, ["1", "3"], data, sections=None, progress=False)
        for key in slow.sites_:
            torch.testing.assert_close(auto.lambdas_[key], slow.lambdas_[key], rtol=1e-10, atol=0)
        with pytest.warns(UserWarning, match="hook of yours"):
            graph = assert_same_graph(model, basis, data, {}, output=True, progress=False)
        assert graph.closed_form_ == [("3", "output")]
    finally:
        handle.remove()


@pytest.mark.parametrize("rule", RULES.values(), ids=RULES.keys())
def test_gelu_and_deep_linear_sections(rule):
    model, x = gelu_mlp(seed=3), inputs(90, 5, seed=4)
    basis = dh.build_bases(model, ["0", "1"], x.split(30), progress=False)
    # Linear output -> GELU output: a [activation] section has no Linear first: backward.
    graph = assert_same_graph(model, basis, x.split(30), rule, output=True, progress=False)
    assert graph.closed_form_ == [("1", "output")]
    model = deep_linear(seed=0, widths=(4, 6, 5, 3))
    x = inputs(100, 4, seed=5)
    basis = dh.build_bases(model, ["0", "1"], x.split(50), rotate_output=True, progress=False)
    graph = assert_same_graph(model, basis, x.split(50), rule, output=True, progress=False)
    assert graph.closed_form_ == [("0", "1"), ("1", "output")]


@pytest.mark.parametrize("rule", RULES.values(), ids=RULES.keys())
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("positions", [None, "last", [0, 2]], ids=["all", "last", "list"])
def test_residual_section_with_positions(rule, activation, positions):
    """``y = x + MLP(x)`` acting on every position of ``(batch, pos, d)`` activations."""
    model = residual_mlp(seed=1, activation=activation)
    x = inputs(40, 6, seed=2, n_pos=4)
    data = x.split(16)
    sites = [dh.Site("resid_pre", positions=positions), dh.Site("resid", positions=positions)]
    section = dh.MLPSection.from_modules(
        model.linear_in, model.act, model.linear_out, residual=True
    )
    sections = {sites[0].key: (section, "linear_in")}
    basis = dh.build_bases(
        model, sites, data, output_positions=positions, sections=sections, progress=False
    )
    kw = {"output": True, "output_positions": positions, "progress": False}
    graph = assert_same_graph(model, basis, data, rule, sections=sections, **kw)
    assert graph.closed_form_ == [(sites[0].key, sites[1].key)]  # the head: not given


def test_pairs_without_a_closed_form_keep_the_backward_passes():
    model = residual_mlp(seed=1)
    x = inputs(24, 6, seed=2, n_pos=4)
    sites = [dh.Site("resid_pre"), dh.Site("resid", positions="last")]
    basis = dh.build_bases(model, sites, [x], variant="pca", progress=False)
    section = dh.MLPSection.from_modules(
        model.linear_in, model.act, model.linear_out, residual=True
    )
    # All positions in, the last out: a position-wise section does not map one to the other.
    graph = assert_same_graph(
        model, basis, [x], {}, sections={"resid_pre": (section, "linear_in")}, progress=False
    )
    assert graph.closed_form_ == []
    assert list(graph.timings_) == ["edges resid_pre -> resid"]


def test_closed_form_edges_equal_brute_force_jacobians():
    """Independent of the backward path: ``jacrev`` through the rebuilt input."""
    model, x = relu_mlp(seed=0), inputs(60, 5, seed=1)
    basis = dh.build_bases(model, ["1", "3"], x.split(30), progress=False)
    graph = InteractionGraph().fit(model, basis, x.split(30), progress=False)
    c1p, mu1 = basis.pinv_["1"], basis.means_["1"]
    c3, mu3 = basis.rotations_["3"], basis.means_["3"]

    def next_features(z: torch.Tensor) -> torch.Tensor:
        return (torch.relu(model[2](z @ c1p + mu1)) - mu3) @ c3

    feats = basis.transform(torch.relu(model[0](x)).detach(), "1")
    jac = torch.func.vmap(torch.func.jacrev(next_features))(feats)  # (n, r3, r1)
    expected = (jac * feats[:, None, :]).square().mean(0).detach()
    torch.testing.assert_close(graph.edges_[("1", "3")], expected, rtol=RTOL, atol=1e-16)


def test_sections_argument_is_checked():
    model, x = relu_mlp(seed=0), inputs(40, 5, seed=1)
    basis = dh.build_bases(model, ["1", "3"], [x], progress=False)
    with pytest.raises(ValueError, match="sections must be a mapping, 'auto' or None"):
        InteractionGraph().fit(model, basis, [x], sections="all", progress=False)
    with pytest.raises(dh.ShapeMismatchError, match=r"names \['3'\], which start no layer pair"):
        InteractionGraph().fit(model, basis, [x], sections={"3": (None, None)}, progress=False)
    with pytest.raises(TypeError, match="must be \\(section, pre_activation_site\\) pairs"):
        InteractionGraph().fit(model, basis, [x], sections={"1": "relu"}, progress=False)
    # A section of another kind (no edge method) keeps the backward passes.
    graph = InteractionGraph().fit(
        model, basis, [x], sections={"1": (object(), None)}, progress=False
    )
    assert graph.closed_form_ == []


def test_saved_graph_records_its_closed_form_pairs(tmp_path):
    model, x = relu_mlp(seed=0), inputs(40, 5, seed=1)
    basis = dh.build_bases(model, ["1", "3"], [x], progress=False)
    graph = InteractionGraph().fit(model, basis, [x], output=True, progress=False)
    dh.save(graph, tmp_path / "graph")
    again = dh.load(tmp_path / "graph")
    assert again.closed_form_ == graph.closed_form_ == [("1", "3"), ("3", "output")]
    assert again.metadata() == graph.metadata()


def test_hooks_removed_and_model_untouched():
    model, x = relu_mlp(seed=0), inputs(40, 5, seed=1)
    basis = dh.build_bases(model, ["1", "3"], [x], progress=False)
    before = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    expected = model(x).detach()
    InteractionGraph().fit(model, basis, [x], output=True, progress=False)
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == before
    assert torch.equal(model(x).detach(), expected)
    assert all(p.grad is None for p in model.parameters())

    def failing(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        model(batch)
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):  # a failing forward still removes the hooks
        InteractionGraph().fit(model, basis, [x], output=True, forward=failing, progress=False)
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == before


# -- memory: bounded by the edges and one batch, whatever the number of samples -----------------
def peak_torch_bytes(fn) -> int:
    """Peak of the bytes torch's CPU allocator holds while ``fn`` runs (profiler events).

    Deterministic (no timing, no RSS): every allocation is charged to the op that made it,
    every free is a ``[memory]`` event; the peak of their running sum in time order.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = []
    for event in prof.events():
        change = event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        if change:
            deltas.append((event.time_range.start, change))
    current = peak = 0
    for _, change in sorted(deltas, key=lambda d: d[0]):
        current += change
        peak = max(peak, current)
    return peak


def test_peak_memory_is_flat_as_samples_grow_8x():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 6)
    ).double()
    batch = 256
    x = inputs(8 * 4 * batch, 8, seed=3)
    basis = dh.build_bases(model, ["1", "3"], x.split(batch), progress=False)

    def fit(n_batches: int, sections: str | None) -> None:
        data = list(x[: n_batches * batch].split(batch))
        InteractionGraph().fit(model, basis, data, output=True, sections=sections, progress=False)

    fit(1, "auto")  # warm-up
    small, large = (
        peak_torch_bytes(lambda: fit(4, "auto")),
        peak_torch_bytes(lambda: fit(32, "auto")),
    )
    assert 0 < large <= 1.05 * small + 2**16, (small, large)
    # What a dense per-sample buffer of the 8x samples would hold, (n, r_next, r) float64:
    dense = 32 * batch * basis.widths_["3"] * basis.widths_["1"] * 8
    assert large < dense / 4


@pytest.mark.parametrize("rule", RULES.values(), ids=RULES.keys())
def test_small_chunks(rule, monkeypatch):
    monkeypatch.setattr("degen_hooks.closed_form.EDGE_ELEMENTS", 1)
    model = residual_mlp(seed=1, activation="gelu")
    x = inputs(12, 6, seed=2, n_pos=3)
    sites = [dh.Site("resid_pre"), dh.Site("resid")]
    section = dh.MLPSection.from_modules(
        model.linear_in, model.act, model.linear_out, residual=True
    )
    sections = {"resid_pre": (section, "linear_in")}
    basis = dh.build_bases(model, sites, x.split(5), sections=sections, progress=False)
    assert_same_graph(model, basis, x.split(5), rule, sections=sections, progress=False)
