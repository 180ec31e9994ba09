"""Synchronized neurons: firing counts streamed by real hooks, planted groups recovered exactly.

Every count is compared with brute force on stacked activations (boolean matrix products in
numpy); planted duplicated, scaled, synchronized (independent weights), dead and always-on
neurons must come back exactly, and tolerance grouping must follow its documented threshold.
"""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from safetensors.torch import load_file, save_file
from torch import nn

import degen_hooks as dh
from degen_hooks.synchronized import SynchronizedNeurons, find_synchronized
from tests.cases import mlp_transformer

D_IN = 4


def planted_inputs(n: int, seed: int = 0) -> torch.Tensor:
    """Inputs with |x_0| in [1, 2] (either sign) and the other coordinates in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, D_IN, generator=g, dtype=torch.float64) * 2 - 1
    sign = torch.where(torch.rand(n, generator=g, dtype=torch.float64) < 0.5, -1.0, 1.0)
    x[:, 0] = sign * (1 + torch.rand(n, generator=g, dtype=torch.float64))
    return x


def planted_model(inplace: bool = False) -> nn.Sequential:
    """Hidden layer of 13 ReLUs with planted structure on :func:`planted_inputs`.

    * 0, 1: duplicates (identical incoming weights and bias); 2: the same row times 3
      (a positive multiple: same firing set) -> group {0, 1, 2};
    * 3, 4, 5: ``a_i x_0 + small`` with linearly independent rows; the small terms stay
      below ``a_i * |x_0|`` (strict margin), so all fire iff ``x_0 > 0`` -> group {3, 4, 5};
    * 6: fires iff ``x_0 < 0`` (the complement: disagrees with 3, 4, 5 everywhere);
    * 7, 12: dead (bias -100); 8, 9: always on (bias +100) -> group {8, 9};
    * 10, 11: generic.
    """
    g = torch.Generator().manual_seed(1)
    h = 13
    w = torch.randn(h, D_IN, generator=g, dtype=torch.float64)
    w[:, 0] *= 0.2  # generic neurons cut through both halves of the data
    b = torch.randn(h, generator=g, dtype=torch.float64) * 0.2
    w[1], b[1] = w[0], b[0]
    w[2], b[2] = 3 * w[0], 3 * b[0]
    for i, a in zip((3, 4, 5, 6), (1.0, 1.5, 2.0, -1.2), strict=True):
        w[i] = torch.rand(D_IN, generator=g, dtype=torch.float64) * 0.2 - 0.1
        w[i, 0] = a
        b[i] = torch.rand((), generator=g, dtype=torch.float64) * 0.2 - 0.1
    b[[7, 12]] = -100.0
    b[[8, 9]] = 100.0
    model = nn.Sequential(nn.Linear(D_IN, h), nn.ReLU(inplace=inplace), nn.Linear(h, 3))
    model = model.double()
    with torch.no_grad():
        model[0].weight.copy_(w)
        model[0].bias.copy_(b)
    return model


EXPECTED_GROUPS = [frozenset({0, 1, 2}), frozenset({3, 4, 5}), frozenset({8, 9})]


def collected(model: nn.Module, x: torch.Tensor, sites=("0", "1"), firing=True, **kw):
    """Run ``x`` through ``model`` in three uneven batches, as (batch, pos, d) tensors."""
    x3 = x.reshape(-1, 2, x.shape[-1])  # positions are flattened into samples by collect
    with dh.collect(model, list(sites), firing=firing, **kw) as run:
        for part in torch.tensor_split(x3, [7, 40]):
            model(part)
    return run


def brute(z: np.ndarray, threshold: float = 0.0):
    """Counts, co-firing counts and disagreement counts from stacked values ``(n, d)``."""
    fires = (z > threshold).astype(np.int64)
    disagree = (fires[:, :, None] != fires[:, None, :]).sum(axis=0)
    return fires.sum(axis=0), fires.T @ fires, disagree


def identical_column_groups(fires: np.ndarray, include_dead: bool = False, min_size: int = 2):
    """Brute force exact groups: neurons with identical columns."""
    classes: dict[bytes, list[int]] = {}
    for j in range(fires.shape[1]):
        if include_dead or fires[:, j].any():
            classes.setdefault(fires[:, j].tobytes(), []).append(j)
    groups = [c for c in classes.values() if len(c) >= min_size]
    return [frozenset(c) for c in sorted(groups, key=lambda c: (-len(c), c[0]))]


# -- firing statistics streamed by the hooks ---------------------------------------------------
@pytest.mark.parametrize("site", ["0", "1"], ids=["pre-activation", "relu-output"])
def test_cofiring_counts_match_brute_force(site):
    model, x = planted_model(), planted_inputs(96)
    firing = collected(model, x).stats[site].firing
    counts, co, disagree = brute(model[0](x).detach().numpy())
    assert firing.n_samples == 96
    np.testing.assert_array_equal(firing.counts().numpy(), counts)
    np.testing.assert_array_equal(firing.cofire_counts().numpy(), co)
    np.testing.assert_array_equal((firing.disagreement() * 96).round().numpy(), disagree)


def test_relu_output_and_preactivation_sites_agree_with_inplace_relu():
    # An in-place ReLU overwrites the Linear's output after its hook has read it.
    x = planted_inputs(64)
    for inplace in (False, True):
        stats = collected(planted_model(inplace=inplace), x).stats
        torch.testing.assert_close(
            stats["0"].firing.cofire_counts(), stats["1"].firing.cofire_counts(), rtol=0, atol=0
        )


@pytest.mark.parametrize("threshold", [-0.1, 0.5])
def test_gelu_threshold_defines_what_fires(threshold):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.GELU(), nn.Linear(8, 2)).double()
    x = torch.randn(80, 3, dtype=torch.float64)
    stats = collected(model, x, sites=["0"], firing=threshold).stats
    firing = stats["0"].firing
    z = model[0](x).detach().numpy()
    counts, co, _ = brute(z, threshold)
    assert firing.threshold == threshold
    np.testing.assert_array_equal(firing.counts().numpy(), counts)
    np.testing.assert_array_equal(firing.cofire_counts().numpy(), co)
    assert not np.array_equal(counts, brute(z, 0.0)[0])  # the threshold matters
    sync = SynchronizedNeurons(min_size=1).fit(stats)
    assert sync.threshold_ == threshold
    np.testing.assert_array_equal(sync.firing_rate_.numpy(), counts / 80)


def test_gelu_output_at_threshold_zero_equals_preactivation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.GELU(), nn.Linear(8, 2)).double()
    stats = collected(model, torch.randn(40, 3, dtype=torch.float64)).stats
    torch.testing.assert_close(
        stats["0"].firing.cofire_counts(), stats["1"].firing.cofire_counts(), rtol=0, atol=0
    )


def test_merged_runs_give_the_single_run_groups():
    model, x = planted_model(), planted_inputs(120)
    whole = collected(model, x).stats
    merged = collected(model, x[:40]).stats.merge(collected(model, x[40:]).stats)
    assert SynchronizedNeurons().fit(merged, site="1").groups_ == EXPECTED_GROUPS
    torch.testing.assert_close(
        merged["1"].firing.cofire_counts(), whole["1"].firing.cofire_counts(), rtol=0, atol=0
    )


# -- planted structure recovered exactly --------------------------------------------------------
@pytest.mark.parametrize("site", ["0", "1"], ids=["pre-activation", "relu-output"])
def test_planted_groups_dead_and_always_on_recovered(site):
    model, x = planted_model(), planted_inputs(200)
    sync = SynchronizedNeurons().fit(collected(model, x).stats, site=site)
    assert sync.groups_ == EXPECTED_GROUPS
    assert sync.dead_ == [7, 12]
    assert sync.always_on_ == [8, 9]
    assert sync.agreement_ == [1.0, 1.0, 1.0]
    assert sync.degenerate_directions_ == 6 + 6 + 2
    assert sync.n_samples_ == 200 and sync.d_site_ == 13 and sync.site_ == site
    expected_labels = [0, 0, 0, 1, 1, 1, -1, -1, 2, 2, -1, -1, -1]
    assert sync.labels_.tolist() == expected_labels
    fires = (model[0](x) > 0).detach().numpy()
    np.testing.assert_array_equal(sync.firing_rate_.numpy(), fires.mean(axis=0))
    assert sync.groups_ == identical_column_groups(fires)
    # The planted group really has linearly independent incoming weights.
    assert torch.linalg.matrix_rank(model[0].weight[3:6].detach()) == 3


def test_include_dead_and_min_size():
    stats = collected(planted_model(), planted_inputs(100)).stats
    with_dead = SynchronizedNeurons(include_dead=True).fit(stats, site="1")
    assert with_dead.groups_ == [*EXPECTED_GROUPS[:2], frozenset({7, 12}), frozenset({8, 9})]
    assert with_dead.degenerate_directions_ == 6 + 6 + 2 + 2
    triples = SynchronizedNeurons(min_size=3).fit(stats, site="1")
    assert triples.groups_ == EXPECTED_GROUPS[:2]
    partition = SynchronizedNeurons(min_size=1).fit(stats, site="1")
    covered = sorted(i for g in partition.groups_ for i in g)
    assert covered == [i for i in range(13) if i not in (7, 12)]
    assert (partition.labels_[[7, 12]] == -1).all()


@settings(max_examples=60, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 6), st.integers(1, 12))), st.booleans())
def test_exact_groups_are_identical_columns(fires, include_dead):
    sync = SynchronizedNeurons(include_dead=include_dead).fit(
        dh.CoFiring().update(torch.from_numpy(fires))
    )
    assert sync.groups_ == identical_column_groups(fires, include_dead)
    assert sync.dead_ == np.flatnonzero(~fires.any(axis=0)).tolist()
    assert sync.always_on_ == np.flatnonzero(fires.all(axis=0)).tolist()
    # Any tolerance below one sample reproduces the exact groups.
    tiny = SynchronizedNeurons(tolerance=0.99 / len(fires), include_dead=include_dead)
    assert tiny.fit(dh.CoFiring().update(torch.from_numpy(fires))).groups_ == sync.groups_


# -- tolerance -----------------------------------------------------------------------------------
def near_synchronized(n: int = 1000) -> torch.Tensor:
    """Neuron 1 = neuron 0 flipped on 20 samples (2%), neuron 2 flipped on 30 others (3%)."""
    g = torch.Generator().manual_seed(0)
    base = torch.rand(n, generator=g) < 0.5
    one, two = base.clone(), base.clone()
    one[:20] = ~one[:20]
    two[20:50] = ~two[20:50]
    independent = torch.rand(n, generator=g) < 0.5
    return torch.stack([base, one, two, independent], dim=1)


@pytest.mark.parametrize(
    ("tolerance", "groups", "agreement"),
    [
        (0.0, [], []),
        (0.0199, [], []),
        (0.02, [{0, 1}], [0.98]),  # a pair exactly at the tolerance still merges
        (0.03, [{0, 1}], [0.98]),  # complete linkage: 1 and 2 disagree on 5%
        (0.05, [{0, 1, 2}], [0.95]),
    ],
)
def test_tolerance_groups_near_synchronized(tolerance, groups, agreement):
    firing = dh.CoFiring().update(near_synchronized())
    sync = SynchronizedNeurons(tolerance=tolerance).fit(firing)
    assert sync.groups_ == [frozenset(g) for g in groups]
    np.testing.assert_allclose(sync.agreement_, agreement, rtol=1e-12)
    assert sync.degenerate_directions_ == sum(len(g) ** 2 - len(g) for g in groups)


@settings(max_examples=40, deadline=None)
@given(
    arrays(np.bool_, st.tuples(st.integers(2, 30), st.integers(2, 10))),
    st.floats(0.01, 0.6),
)
def test_tolerance_matches_sklearn_on_rates(fires, tolerance):
    from sklearn.cluster import AgglomerativeClustering

    n = len(fires)
    sync = SynchronizedNeurons(tolerance=tolerance, include_dead=True, min_size=1)
    sync.fit(dh.CoFiring().update(torch.from_numpy(fires)))
    rates = (fires[:, :, None] != fires[:, None, :]).mean(axis=0)
    allowed = np.floor(tolerance * n * (1 + 1e-12))
    reference = AgglomerativeClustering(
        n_clusters=None,
        metric="precomputed",
        linkage="complete",
        distance_threshold=(allowed + 0.5) / n,
    ).fit_predict(rates)
    expected = {frozenset(np.flatnonzero(reference == c).tolist()) for c in set(reference)}
    assert set(sync.groups_) == expected
    for group, agreement in zip(sync.groups_, sync.agreement_, strict=True):
        idx = sorted(group)
        assert rates[np.ix_(idx, idx)].max() <= tolerance + 1e-12
        assert agreement == pytest.approx(1 - rates[np.ix_(idx, idx)].max(), rel=1e-12)


# -- inputs, outputs, errors --------------------------------------------------------------------
def test_accepts_statistics_site_statistics_and_cofiring():
    stats = collected(planted_model(), planted_inputs(60), sites=["1"]).stats
    for source, site in [
        (stats, None),
        (stats, "1"),
        (stats["1"], None),
        (stats["1"].firing, None),
    ]:
        assert SynchronizedNeurons().fit(source, site=site).groups_ == EXPECTED_GROUPS
    assert SynchronizedNeurons().fit(stats).site_ == "1"


def test_refit_discards_previous_state():
    sync = SynchronizedNeurons().fit(collected(planted_model(), planted_inputs(60)).stats, site="1")
    sync.fit(dh.CoFiring().update(torch.tensor([[True, False], [False, True]])))
    assert sync.groups_ == [] and sync.d_site_ == 2 and sync.labels_.tolist() == [-1, -1]


def test_find_synchronized_fits_every_site_with_firing():
    fitted = find_synchronized(collected(planted_model(), planted_inputs(60)).stats)
    assert list(fitted) == ["0", "1"]
    assert all(s.groups_ == EXPECTED_GROUPS for s in fitted.values())
    assert (
        find_synchronized(collected(planted_model(), planted_inputs(60)).stats, "0")["0"].site_
        == "0"
    )


def named_model() -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(fc=nn.Linear(3, 4), act=nn.ReLU(), out=nn.Linear(4, 2))
    ).double()


def test_error_without_firing_statistics_says_how_to_collect_them():
    model = named_model()
    with dh.collect(model, ["fc", "act"]) as run:
        model(torch.randn(5, 3, dtype=torch.float64))
    with pytest.raises(dh.EmptyStatisticsError, match=r"firing=True"):
        SynchronizedNeurons().fit(run.stats)
    with pytest.raises(
        dh.EmptyStatisticsError, match=r"No firing statistics at 'act'.*firing=True"
    ):
        SynchronizedNeurons().fit(run.stats, site="act")
    with pytest.raises(dh.EmptyStatisticsError, match=r"firing=True"):
        SynchronizedNeurons().fit(run.stats["act"])


def test_error_for_unknown_and_ambiguous_sites():
    model = named_model()
    with dh.collect(model, ["fc", "act"], firing=True) as run:
        model(torch.randn(5, 3, dtype=torch.float64))
    with pytest.raises(dh.SiteNotFoundError, match=r"'ac'.*Did you mean 'act'"):
        SynchronizedNeurons().fit(run.stats, site="ac")
    with pytest.raises(ValueError, match=r"Several sites.*\['fc', 'act'\].*find_synchronized"):
        SynchronizedNeurons().fit(run.stats)


def test_error_for_empty_counts_bad_params_and_types():
    with pytest.raises(dh.EmptyStatisticsError, match="no samples"):
        SynchronizedNeurons().fit(dh.CoFiring())
    firing = dh.CoFiring().update(torch.randn(4, 3))
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"tolerance must be a fraction.*\[0, 1\)"):
            SynchronizedNeurons(tolerance=bad).fit(firing)
    with pytest.raises(ValueError, match="min_size must be an int >= 1"):
        SynchronizedNeurons(min_size=0).fit(firing)
    with pytest.raises(TypeError, match="got Tensor"):
        SynchronizedNeurons().fit(torch.zeros(3, 3))


def test_not_fitted_errors_teach():
    sync = SynchronizedNeurons()
    for method in (sync.summary, sync.state_dict, sync.metadata):
        with pytest.raises(dh.NotFittedError, match=r"not fitted yet.*\.fit\(stats\)"):
            method()
    assert "not fitted" in sync._repr_html_()


def test_state_dict_round_trip_through_safetensors_and_json(tmp_path):
    sync = SynchronizedNeurons(tolerance=0.01).fit(
        collected(planted_model(), planted_inputs(100)).stats, site="0"
    )
    save_file(sync.state_dict(), tmp_path / "sync.safetensors")
    (tmp_path / "sync.json").write_text(json.dumps(sync.metadata()))
    loaded = SynchronizedNeurons.from_state_dict(
        load_file(tmp_path / "sync.safetensors"), json.loads((tmp_path / "sync.json").read_text())
    )
    for name in (
        "groups_",
        "agreement_",
        "dead_",
        "always_on_",
        "n_samples_",
        "d_site_",
        "degenerate_directions_",
        "site_",
        "threshold_",
    ):
        assert getattr(loaded, name) == getattr(sync, name), name
    assert torch.equal(loaded.labels_, sync.labels_)
    assert torch.equal(loaded.firing_rate_, sync.firing_rate_)
    assert loaded.get_params() == sync.get_params()
    with pytest.raises(dh.FormatError, match="Not a saved SynchronizedNeurons"):
        SynchronizedNeurons.from_state_dict({}, {"class": "InteractionBasis"})


def test_summary_html_and_repr():
    sync = SynchronizedNeurons().fit(
        collected(planted_model(), planted_inputs(100)).stats, site="1"
    )
    text = sync.summary()
    assert "SynchronizedNeurons at '1': d_site=13, n_samples=100" in text
    assert "3 groups (8 neurons), 14 degenerate directions" in text
    assert "2 dead, 2 always-on" in text
    assert text.splitlines()[2].split() == [
        "group",
        "size",
        "k^2-k",
        "firing",
        "rate",
        "min",
        "agreement",
        "neurons",
    ]
    assert text.splitlines()[4].split() == ["1", "3", "6", "0.5400", "1.0000", "3,", "4,", "5"]
    assert "<table>" in sync._repr_html_() and "3, 4, 5" in sync._repr_html_()
    assert repr(sync) == "SynchronizedNeurons(tolerance=0.0, min_size=2, include_dead=False)"
    assert sync.set_params(tolerance=0.1).tolerance == 0.1
    with pytest.raises(ValueError, match="Unknown parameter"):
        sync.set_params(tol=0.1)


@pytest.mark.slow
def test_transformer_lens_hook_pre_and_hook_post():
    pytest.importorskip("transformer_lens")
    model = mlp_transformer(n_ctx=6, d_vocab=13)
    tokens = torch.randint(0, 13, (10, 6), generator=torch.Generator().manual_seed(0))
    sites = ["blocks.0.mlp.hook_pre", "blocks.0.mlp.hook_post"]
    with dh.collect(model, sites, firing=True) as run:
        model(tokens)
    _, cache = model.run_with_cache(tokens)
    counts, co, _ = brute(cache["blocks.0.mlp.hook_pre"].reshape(-1, 16).double().numpy())
    for site in sites:
        np.testing.assert_array_equal(run.stats[site].firing.counts().numpy(), counts)
        np.testing.assert_array_equal(run.stats[site].firing.cofire_counts().numpy(), co)
    fitted = find_synchronized(run.stats)
    assert fitted[sites[0]].groups_ == fitted[sites[1]].groups_
