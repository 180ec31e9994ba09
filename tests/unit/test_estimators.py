"""scikit-learn habits, checked with scikit-learn itself, and one name for each idea (#18)."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError as SklearnNotFittedError
from sklearn.utils.validation import check_is_fitted

import degen_hooks as dh
from tests.cases import inputs, relu_mlp

F64 = torch.float64


def data():
    return inputs(400, 5).split(100)


def fit_basis(estimator):
    return estimator.fit(dh.build_bases(relu_mlp(), ["1", "3"], data(), progress=False).stats_)


def fit_sync(estimator):
    model = relu_mlp()
    with dh.collect(model, ["0"], firing=True) as run:
        for x in data():
            model(x)
    return estimator.fit(run.stats)


def fit_graph(estimator):
    model = relu_mlp()
    basis = dh.build_bases(model, ["1", "3"], data(), progress=False)
    return estimator.fit(model, basis, data(), progress=False)


ESTIMATORS = {
    "InteractionBasis": (
        lambda: dh.InteractionBasis(variant="pca", center=False, rtol=1e-8, n_components=3),
        fit_basis,
        {"variant": "neuron", "n_components": 2},
    ),
    "SynchronizedNeurons": (
        lambda: dh.SynchronizedNeurons(tolerance=0.1, min_size=3, include_dead=True),
        fit_sync,
        {"tolerance": 0.0, "min_size": 2},
    ),
    "InteractionGraph": (
        lambda: dh.InteractionGraph(method="stochastic", n_sources=2, seed=3),
        fit_graph,
        {"method": "exact", "n_sources": 1},
    ),
}


@pytest.mark.parametrize("name", ESTIMATORS)
def test_get_params_lists_every_init_argument(name):
    make, _, _ = ESTIMATORS[name]
    estimator = make()
    names = [p for p in inspect.signature(type(estimator).__init__).parameters if p != "self"]
    params = estimator.get_params()
    assert list(params) == names
    assert params == estimator.get_params(deep=False)
    assert all(params[k] is getattr(estimator, k) for k in names)


@pytest.mark.parametrize("name", ESTIMATORS)
def test_sklearn_clone_gives_an_unfitted_copy_with_the_same_params(name):
    make, fit, _ = ESTIMATORS[name]
    fitted = fit(make())
    check_is_fitted(fitted)  # scikit-learn's own check: attributes ending in "_"
    copy = clone(fitted)
    assert type(copy) is type(fitted) and copy is not fitted
    assert copy.get_params() == fitted.get_params()
    with pytest.raises(SklearnNotFittedError):
        check_is_fitted(copy)
    refit = fit(copy)
    assert refit is copy
    check_is_fitted(refit)


@pytest.mark.parametrize("name", ESTIMATORS)
def test_set_params_round_trip_and_refusal(name):
    make, _, changes = ESTIMATORS[name]
    estimator = make()
    assert estimator.set_params(**changes) is estimator
    assert {k: estimator.get_params()[k] for k in changes} == changes
    again = clone(estimator).set_params(**make().get_params())
    assert again.get_params() == make().get_params()
    with pytest.raises(ValueError, match=rf"Unknown parameter\(s\) \['nope'\] for {name}"):
        estimator.set_params(nope=1)


def test_a_built_basis_clones_to_its_hyperparameters():
    basis = dh.build_bases(relu_mlp(), ["1", "3"], data(), n_components=4, progress=False)
    copy = clone(basis)
    assert copy.get_params() == {
        "variant": "lib",
        "center": True,
        "rtol": None,
        "atol": 0.0,
        "n_components": 4,
    }
    assert not hasattr(copy, "rotations_") and not hasattr(copy, "stats_")
    refit = copy.fit(basis.stats_)
    for key in basis.sites_:
        torch.testing.assert_close(refit.projector(key), basis.projector(key))


# -- one name for each idea -------------------------------------------------------------------
def test_build_bases_variant_is_lib_and_local_is_deprecated():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lib = dh.build_bases(relu_mlp(), ["1", "3"], data(), variant="lib", progress=False)
    with pytest.warns(DeprecationWarning, match=r'variant="local"\) is deprecated.*"lib"'):
        local = dh.build_bases(relu_mlp(), ["1", "3"], data(), variant="local", progress=False)
    assert lib.variant == local.variant == dh.InteractionBasis().variant == "lib"
    for key in lib.sites_:
        assert torch.equal(lib.rotations_[key], local.rotations_[key])
    with pytest.raises(ValueError, match=r"variant must be one of \('lib', 'global'"):
        dh.build_bases(relu_mlp(), ["1"], data(), variant="ica")


@pytest.mark.parametrize("rotate_output", [False, True])
def test_basis_stats_hold_the_sites_only(rotate_output):
    model = relu_mlp()
    basis = dh.build_bases(model, ["1", "3"], data(), rotate_output=rotate_output, progress=False)
    assert list(basis.stats_) == basis.sites_ == ["1", "3"]
    assert basis.stats_.metadata["sites"] == ["1", "3"]
    assert not any("#" in key for key in basis.stats_)
    # Widths fitted from them: the same sites, nothing else.
    for variant in ("lib", "pca", "neuron"):
        assert list(dh.InteractionBasis(variant=variant).fit(basis.stats_).widths_) == ["1", "3"]
    # The closed form's derivative moments (section "1" -> "3": ReLU of layer 2) are kept apart.
    assert list(basis.section_stats_) == ["1"]
    assert basis.section_stats_["1"].derivs.d == 6
    assert (basis.output_stats_ is not None) == rotate_output
    assert (basis.output_rotation_ is not None) == rotate_output


@pytest.mark.parametrize("variant", ["lib", "pca", "neuron"])
@pytest.mark.parametrize("center", [True, False])
def test_lambdas_are_the_feature_variances_for_every_variant(variant, center):
    model = relu_mlp()
    stats = dh.build_bases(model, ["1", "3"], data(), progress=False).stats_
    basis = dh.InteractionBasis(variant=variant, center=center).fit(stats)
    hidden = torch.relu(model[0](torch.cat(data()))).detach()
    features = basis.transform(hidden, "1")
    spread = features.var(0, correction=0) if center else features.square().mean(0)
    torch.testing.assert_close(spread, basis.lambdas_["1"], rtol=1e-9, atol=1e-12)


# -- fewer samples than the width ----------------------------------------------------------------
def single_site(n_samples: int, d_site: int, rank: int | None = None) -> dh.Statistics:
    acts = torch.randn(n_samples, rank or d_site, dtype=F64)
    if rank is not None:
        acts = acts @ torch.randn(rank, d_site, dtype=F64)
    return dh.Statistics({"h": dh.SiteStatistics(dh.Covariance().update(acts))})


def test_a_site_with_fewer_samples_than_its_width_warns():
    stats = single_site(20, 30)
    with pytest.warns(UserWarning, match=r"'h' has 20 samples for d_site=30: .* rank at most 19"):
        basis = dh.InteractionBasis(variant="pca").fit(stats)
    assert basis.widths_["h"] == 19
    with pytest.warns(UserWarning, match="rank at most 20"):
        dh.InteractionBasis(variant="pca", center=False).fit(stats)


def test_enough_samples_or_a_lower_rank_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dh.InteractionBasis(variant="pca").fit(single_site(31, 30))
        # 20 samples at width 30, but the activations span 5 directions: the width is the model's.
        assert dh.InteractionBasis(variant="pca").fit(single_site(20, 30, rank=5)).widths_["h"] == 5
        dh.InteractionBasis(variant="neuron").fit(single_site(20, 30))
