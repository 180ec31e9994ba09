"""Node ablation: rewriting a site through a basis, and ablation curves."""

from __future__ import annotations

import pytest
import torch

import degen_hooks as dh
from tests.cases import inputs, position_mixer, relu_mlp

F64 = torch.float64


@pytest.fixture(scope="module")
def fitted():
    model, x = relu_mlp(seed=0), inputs(300, 5, seed=3)
    lib = dh.build_bases(model, ["1", "3"], x.split(100), progress=False)
    pca = dh.InteractionBasis(variant="pca").fit(lib.stats_)
    neurons = dh.InteractionBasis(variant="neuron").fit(lib.stats_)
    return model, x, {"LIB": lib, "PCA": pca, "neurons": neurons}


def mse_to(reference):
    return lambda out, batch: ((out - reference[: len(out)]) ** 2).sum(-1)


def test_keeping_every_feature_reproduces_the_model(fitted):
    model, x, bases = fitted
    reference = model(x).detach()
    for basis in (bases["PCA"], bases["neurons"]):
        with dh.ablate(model, basis, "1"):
            torch.testing.assert_close(model(x), reference, rtol=1e-10, atol=1e-10)
    # LIB keeps only what the next layer reads: the output is still exact
    with dh.ablate(model, bases["LIB"], "1"):
        torch.testing.assert_close(model(x), reference, rtol=1e-8, atol=1e-8)


def test_keeping_nothing_sets_the_site_to_its_mean(fitted):
    model, x, bases = fitted
    with dh.ablate(model, bases["PCA"], "1", keep=0):
        act = model[1](model[0](x))
    mean = bases["PCA"].means_["1"]
    torch.testing.assert_close(act, mean.expand_as(act))


def test_drop_removes_chosen_features_only(fitted):
    model, x, bases = fitted
    pca = bases["PCA"]
    acts = torch.relu(model[0](x)).detach()
    with dh.ablate(model, pca, "1", drop=[0]):
        act = model[1](model[0](x))
    z = pca.transform(act.detach(), "1")
    assert z[:, 0].abs().max() < 1e-10
    torch.testing.assert_close(z[:, 1:], pca.transform(acts, "1")[:, 1:], rtol=1e-9, atol=1e-9)


def test_hooks_removed_after_ablation_even_on_error(fitted):
    model, x, bases = fitted
    reference = model(x)
    with pytest.raises(RuntimeError):
        with dh.ablate(model, bases["PCA"], "1", keep=1):
            raise RuntimeError("boom")
    assert all(not m._forward_hooks for m in model.modules())
    assert torch.equal(model(x), reference)


def test_node_ablation_curve_side_by_side(fitted):
    model, x, bases = fitted
    reference = model(x).detach()
    curve = dh.node_ablation_curve(model, bases, "1", [x], metric=mse_to(reference), progress=False)
    assert curve.baseline == 0.0
    for name, basis in bases.items():
        assert curve.n_kept[name] == list(range(basis.widths_["1"] + 1))
        assert curve.values[name][-1] < 1e-12  # all features kept: the full model
        assert curve.values[name][0] > 0
    assert curve.min_features(1e-9, higher_is_better=False)["LIB"] == bases["LIB"].widths_["1"]
    # the interaction basis needs no more features than PCA to reproduce the output
    lib_k = curve.min_features(1e-9, higher_is_better=False)["LIB"]
    assert lib_k <= curve.min_features(1e-9, higher_is_better=False)["PCA"]


def test_ablation_at_selected_positions():
    model = position_mixer(seed=0)
    x = inputs(50, 4, seed=1, n_pos=5)
    with dh.collect(model, [dh.Site("embed", positions="last")]) as run:
        model(x)
    pca = dh.InteractionBasis(variant="pca").fit(run.stats)
    with dh.ablate(model, pca, "embed", keep=0):
        act = model.embed(x)
    reference = model.embed(x)
    torch.testing.assert_close(act[:, :-1], reference[:, :-1], rtol=0, atol=0)
    torch.testing.assert_close(act[:, -1], pca.means_["embed"].expand(50, -1).to(act.dtype))


def test_bad_keep_values(fitted):
    model, _, bases = fitted
    with pytest.raises(ValueError, match="outside 0"):
        with dh.ablate(model, bases["PCA"], "1", keep=99):
            pass
    with pytest.raises(dh.SiteNotFoundError, match="no rotation for site"):
        with dh.ablate(model, bases["PCA"], "nope"):
            pass


def test_bisection_finds_the_exact_minimum_on_a_coarse_schedule(fitted):
    model, x, bases = fitted
    reference = model(x).detach()
    metric = mse_to(reference)
    full = dh.node_ablation_curve(model, bases, "1", [x], metric=metric, progress=False)
    coarse = dh.node_ablation_curve(
        model,
        bases,
        "1",
        [x],
        metric=metric,
        n_kept=[0, 8],
        tolerance=1e-3,
        higher_is_better=False,
        progress=False,
    )
    exact = full.min_features(1e-3, higher_is_better=False)
    assert coarse.min_features(1e-3, higher_is_better=False) == exact
    for name in bases:
        assert coarse.n_kept[name] == sorted(coarse.n_kept[name])
        assert len(coarse.n_kept[name]) < len(full.n_kept[name])
