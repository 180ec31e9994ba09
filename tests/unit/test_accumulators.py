"""Streaming accumulators against stacked brute force, merge algebra, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import degen_hooks as dh

F64 = torch.float64


def fed(acc, batches):
    for b in batches:
        acc.update(torch.as_tensor(b, dtype=F64))
    return acc


def stream(n_batches=5, n=20, d=4, seed=0, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g, dtype=F64) * scale + shift for _ in range(n_batches)]


def assert_same_state(a, b, rtol=1e-12, atol=1e-12):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=rtol, atol=atol, msg=key)


def check_accumulator(factory):
    """Merge algebra every accumulator must satisfy."""
    a, b, c = stream(seed=1), stream(seed=2), stream(seed=3)
    # commutativity
    assert_same_state(
        fed(factory(), a).merge(fed(factory(), b)), fed(factory(), b).merge(fed(factory(), a))
    )
    # associativity
    left = fed(factory(), a).merge(fed(factory(), b)).merge(fed(factory(), c))
    right = fed(factory(), a).merge(fed(factory(), b).merge(fed(factory(), c)))
    assert_same_state(left, right)
    # the empty accumulator is the identity, on both sides
    assert_same_state(factory().merge(fed(factory(), a)), fed(factory(), a), rtol=0, atol=0)
    assert_same_state(fed(factory(), a).merge(factory()), fed(factory(), a), rtol=0, atol=0)
    # other is unchanged
    other = fed(factory(), b)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    fed(factory(), a).merge(other)
    for key, value in other.state_dict().items():
        assert torch.equal(value, before[key])
    # state dict round trip is exact
    full = fed(factory(), a + b)
    assert_same_state(factory().load_state_dict(full.state_dict()), full, rtol=0, atol=0)
    # merging equals a single pass
    assert_same_state(
        fed(factory(), a).merge(fed(factory(), b)), fed(factory(), a + b), rtol=1e-10, atol=1e-10
    )


@pytest.mark.parametrize(
    "factory",
    [dh.Covariance, dh.SecondMoment, lambda: dh.CoFiring(threshold=0.1)],
    ids=["covariance", "second_moment", "cofiring"],
)
def test_merge_algebra(factory):
    check_accumulator(factory)


def test_covariance_matches_torch_cov():
    batches = stream()
    x = torch.cat(batches)
    acc = fed(dh.Covariance(), batches)
    torch.testing.assert_close(acc.mean(), x.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(acc.cov(), torch.cov(x.T, correction=0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(acc.cov(correction=1), torch.cov(x.T), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(acc.second_moment(), x.T @ x / len(x), rtol=1e-12, atol=1e-12)
    assert acc.n_samples == len(x) and acc.d == 4


def test_weighted_and_masked_covariance():
    x = torch.cat(stream())
    g = torch.Generator().manual_seed(5)
    w = torch.rand(len(x), generator=g, dtype=F64)
    mask = torch.rand(len(x), generator=g) > 0.3
    acc = dh.Covariance()
    for xs, ws, ms in zip(x.split(17), w.split(17), mask.split(17), strict=True):
        acc.update(xs, weights=ws, mask=ms)
    xm, wm = x[mask], w[mask]
    mean = (wm[:, None] * xm).sum(0) / wm.sum()
    centred = xm - mean
    cov = (centred * wm[:, None]).T @ centred / wm.sum()
    torch.testing.assert_close(acc.mean(), mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(acc.cov(), cov, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        acc.cov(), torch.cov(xm.T, correction=0, aweights=wm), rtol=1e-12, atol=1e-12
    )
    assert acc.n_samples == int(mask.sum())


def test_masks_over_positions():
    x = torch.randn(3, 5, 4, dtype=F64)
    mask = torch.rand(3, 5) > 0.4
    acc = dh.Covariance().update(x, mask=mask)
    torch.testing.assert_close(
        acc.cov(), torch.cov(x[mask].T, correction=0), rtol=1e-12, atol=1e-12
    )


def test_large_mean_keeps_relative_accuracy():
    batches = stream(n_batches=20, n=50, d=3, scale=1e-2, shift=1e4)
    x = torch.cat(batches)
    reference = torch.cov(x.T - x.mean(0)[:, None], correction=0)  # centred first: exact
    acc = fed(dh.Covariance(), batches)
    torch.testing.assert_close(acc.cov(), reference, rtol=1e-7, atol=1e-12)
    # float32 input is cast before accumulating: still accurate relative to the spread
    acc32 = fed(dh.Covariance(), [b.float() for b in batches])
    x32 = torch.cat([b.float().double() for b in batches])
    ref32 = torch.cov((x32 - x32.mean(0)).T, correction=0)
    torch.testing.assert_close(acc32.cov(), ref32, rtol=1e-7, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(arrays(np.float64, (3, 4), elements=st.floats(-10, 10)), min_size=2, max_size=6),
    st.integers(min_value=1, max_value=10**6),
)
def test_merge_matches_single_pass(batches, cut):
    cut = 1 + cut % (len(batches) - 1)
    left, whole = fed(dh.Covariance(), batches[:cut]), fed(dh.Covariance(), batches)
    merged = left.merge(fed(dh.Covariance(), batches[cut:]))
    torch.testing.assert_close(merged.cov(), whole.cov(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(merged.mean(), whole.mean(), rtol=1e-9, atol=1e-9)


def test_second_moment_counts_probes_per_sample():
    g = torch.randn(4, 6, 3, dtype=F64)  # 4 probes x 6 samples
    acc = dh.SecondMoment().update(g.reshape(-1, 3), count=6)
    torch.testing.assert_close(acc.second_moment(), torch.einsum("psi,psj->ij", g, g) / 6)
    assert acc.n_samples == 6


def test_cofiring_matches_brute_force():
    z = torch.randn(200, 7, dtype=F64)
    z[:, 3] = z[:, 1] * 2.0  # synchronized with neuron 1
    acc = dh.CoFiring().update(z[:90]).update(z[90:])
    fires = (z > 0).double().numpy()
    np.testing.assert_array_equal(acc.cofire_counts().numpy(), fires.T @ fires)
    np.testing.assert_array_equal(acc.counts().numpy(), fires.sum(0))
    disagree = (fires[:, :, None] != fires[:, None, :]).mean(0)
    np.testing.assert_allclose(acc.disagreement().numpy(), disagree, atol=1e-15)
    assert acc.disagreement()[1, 3] == 0


def test_accumulators_stay_on_device_and_move():
    acc = dh.Covariance().update(torch.randn(5, 2))
    assert acc.cov().dtype == F64 and acc.cov().device.type == "cpu"
    assert acc.to("meta").device.type == "meta"


# -- errors ---------------------------------------------------------------------------------


def test_nonfinite_batch_is_refused_and_state_kept():
    acc = dh.Covariance().update(torch.randn(10, 3, dtype=F64))
    before = {k: v.clone() for k, v in acc.state_dict().items()}
    bad = torch.randn(8, 3, dtype=F64)
    bad[2, 1], bad[5, 0] = float("nan"), float("inf")
    with pytest.raises(
        dh.NonFiniteError, match=r"2 of 8 rows .*2 NaN/inf entries.*nonfinite='skip'"
    ):
        acc.update(bad)
    for key, value in acc.state_dict().items():
        assert torch.equal(value, before[key])


def test_nonfinite_first_batch_leaves_accumulator_empty():
    acc = dh.Covariance()
    with pytest.raises(dh.NonFiniteError):
        acc.update(torch.full((2, 3), float("nan")))
    assert acc.d is None and acc.n_samples == 0


def test_skip_policy_drops_and_counts():
    x = torch.randn(10, 3, dtype=F64)
    bad = x.clone()
    bad[4] = float("nan")
    acc = dh.Covariance(nonfinite="skip").update(bad)
    assert acc.n_skipped == 1 and acc.n_samples == 9
    torch.testing.assert_close(acc.cov(), torch.cov(torch.cat([x[:4], x[5:]]).T, correction=0))


def test_width_change_is_refused():
    acc = dh.Covariance().update(torch.randn(4, 3))
    with pytest.raises(dh.ShapeMismatchError, match="width 5, but earlier batches had width 3"):
        acc.update(torch.randn(4, 5))
    assert acc.n_samples == 4


def test_empty_statistics_error():
    with pytest.raises(dh.EmptyStatisticsError, match="seen no samples"):
        dh.Covariance().cov()
    with pytest.raises(dh.EmptyStatisticsError):
        dh.CoFiring().firing_rate()


def test_merge_of_different_widths_is_refused():
    a = dh.Covariance().update(torch.randn(4, 3))
    b = dh.Covariance().update(torch.randn(4, 5))
    with pytest.raises(
        dh.ShapeMismatchError, match=r"Covariance\(d_site=5\) into Covariance\(d_site=3\)"
    ):
        a.merge(b)
    with pytest.raises(TypeError, match="same kind"):
        a.merge(dh.SecondMoment().update(torch.randn(2, 3)))


def test_bad_weights_and_masks():
    with pytest.raises(dh.ShapeMismatchError, match="weights has shape"):
        dh.Covariance().update(torch.randn(4, 3), weights=torch.ones(5))
    with pytest.raises(ValueError, match="non-negative"):
        dh.Covariance().update(torch.randn(4, 3), weights=-torch.ones(4))
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        dh.Covariance(nonfinite="ignore")


def test_cofiring_thresholds_must_agree_to_merge():
    a = dh.CoFiring(threshold=0.0).update(torch.randn(4, 3))
    b = dh.CoFiring(threshold=0.5).update(torch.randn(4, 3))
    with pytest.raises(
        dh.ShapeMismatchError, match=r"threshold=0.5\) into CoFiring\(threshold=0.0\)"
    ):
        a.merge(b)
