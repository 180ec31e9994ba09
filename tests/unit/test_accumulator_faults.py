"""Accumulators under faults: bad arguments, overflow and widths that cannot fit in memory.

Every refused call must leave the accumulator exactly as it was (its ``state_dict``, width
and device), and say what was wrong with the value.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

import degen_hooks as dh

F64 = torch.float64
NAN, INF = float("nan"), float("inf")


def batch(n=6, d=3, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=F64) * scale


def snapshot(acc):
    return (
        {k: v.clone() for k, v in acc.state_dict().items()},
        acc.d,
        acc.device,
        acc.n_samples,
        acc.n_skipped,
    )


def assert_unchanged(acc, before):
    state, d, device, n_samples, n_skipped = before
    now = acc.state_dict()
    assert now.keys() == state.keys()
    for key, value in now.items():
        assert value.dtype == state[key].dtype and value.shape == state[key].shape, key
        assert torch.equal(value, state[key]) or (
            torch.isnan(value).equal(torch.isnan(state[key]))
            and torch.equal(value.nan_to_num(), state[key].nan_to_num())
        ), key
    assert (acc.d, acc.device, acc.n_samples, acc.n_skipped) == (d, device, n_samples, n_skipped)


FACTORIES = {
    "covariance": dh.Covariance,
    "second_moment": dh.SecondMoment,
    "cofiring": lambda d=None, **kw: dh.CoFiring(d, threshold=0.1, **kw),
}


def good_state(kind, d=3):
    return FACTORIES[kind]().update(batch(d=d, seed=9)).state_dict()


def with_field(kind, name, value):
    state = good_state(kind)
    state[name] = value
    return state


def without(kind, name):
    state = good_state(kind)
    del state[name]
    return state


# (accumulator kind, call on a fed accumulator, error, message)
BAD_CALLS = {
    # -- update: activations --------------------------------------------------------------
    "x_list": ("covariance", lambda a: a.update([[1.0, 2.0, 3.0]]), dh.ShapeMismatchError, "list"),
    "x_scalar": (
        "second_moment",
        lambda a: a.update(torch.tensor(1.0)),
        dh.ShapeMismatchError,
        "0-dimensional",
    ),
    "x_width": ("covariance", lambda a: a.update(batch(d=5)), dh.ShapeMismatchError, "width 5"),
    "x_complex": (
        "covariance",
        lambda a: a.update(batch().to(torch.complex128)),
        TypeError,
        "complex128",
    ),
    "sm_x_width": (
        "second_moment",
        lambda a: a.update(batch(d=4)),
        dh.ShapeMismatchError,
        "width 4",
    ),
    "cf_z_width": ("cofiring", lambda a: a.update(batch(d=2)), dh.ShapeMismatchError, "width 2"),
    "cf_z_complex": (
        "cofiring",
        lambda a: a.update(batch().to(torch.complex64)),
        TypeError,
        "complex64",
    ),
    "x_nan": (
        "covariance",
        lambda a: a.update(batch().index_fill_(0, torch.tensor([1]), NAN)),
        dh.NonFiniteError,
        "1 of 6 rows",
    ),
    "sm_x_inf": (
        "second_moment",
        lambda a: a.update(batch().index_fill_(0, torch.tensor([2]), INF)),
        dh.NonFiniteError,
        "1 of 6 rows",
    ),
    "cf_z_nan": (
        "cofiring",
        lambda a: a.update(batch().index_fill_(0, torch.tensor([0]), NAN)),
        dh.NonFiniteError,
        "1 of 6 rows",
    ),
    # -- update: weights ------------------------------------------------------------------
    "weights_shape": (
        "covariance",
        lambda a: a.update(batch(), weights=torch.ones(5)),
        dh.ShapeMismatchError,
        r"weights has shape \(5,\)",
    ),
    "weights_negative": (
        "covariance",
        lambda a: a.update(batch(), weights=torch.tensor([1.0] * 5 + [-2.5])),
        ValueError,
        r"non-negative.*-2\.5",
    ),
    "weights_nan": (
        "covariance",
        lambda a: a.update(batch(), weights=torch.tensor([1.0] * 5 + [NAN])),
        dh.NonFiniteError,
        "1 of 6 rows",
    ),
    "weights_complex": (
        "covariance",
        lambda a: a.update(batch(), weights=torch.ones(6, dtype=torch.complex64)),
        TypeError,
        "complex64",
    ),
    "weights_str": (
        "covariance",
        lambda a: a.update(batch(), weights="heavy"),
        TypeError,
        "weights",
    ),
    "sm_weights_negative": (
        "second_moment",
        lambda a: a.update(batch(), weights=-torch.ones(6)),
        ValueError,
        r"non-negative.*-1",
    ),
    "sm_weights_shape": (
        "second_moment",
        lambda a: a.update(batch(), weights=torch.ones(2, 3)),
        dh.ShapeMismatchError,
        "weights has shape",
    ),
    # -- update: mask ---------------------------------------------------------------------
    "mask_shape": (
        "covariance",
        lambda a: a.update(batch(), mask=torch.ones(7, dtype=torch.bool)),
        dh.ShapeMismatchError,
        r"mask has shape \(7,\)",
    ),
    "mask_fraction": (
        "covariance",
        lambda a: a.update(batch(), mask=torch.full((6,), 0.5)),
        ValueError,
        r"mask.*0\.5",
    ),
    "mask_indices": (
        "covariance",
        lambda a: a.update(batch(), mask=torch.tensor([0, 2, 1, 0, 0, 1])),
        ValueError,
        r"mask.*2",
    ),
    "cf_mask_shape": (
        "cofiring",
        lambda a: a.update(batch(), mask=torch.ones(3, dtype=torch.bool)),
        dh.ShapeMismatchError,
        "mask has shape",
    ),
    "cf_mask_fraction": (
        "cofiring",
        lambda a: a.update(batch(), mask=torch.full((6,), 0.25)),
        ValueError,
        r"mask.*0\.25",
    ),
    # -- update: count --------------------------------------------------------------------
    "count_nan": (
        "second_moment",
        lambda a: a.update(batch(), count=NAN),
        ValueError,
        "count.*nan",
    ),
    "count_inf": (
        "second_moment",
        lambda a: a.update(batch(), count=INF),
        ValueError,
        "count.*inf",
    ),
    "count_negative": (
        "second_moment",
        lambda a: a.update(batch(), count=-3),
        ValueError,
        "count.*-3",
    ),
    "count_str": ("second_moment", lambda a: a.update(batch(), count="3"), TypeError, "count.*str"),
    "count_bool": (
        "second_moment",
        lambda a: a.update(batch(), count=True),
        TypeError,
        "count.*bool",
    ),
    "count_vector": (
        "second_moment",
        lambda a: a.update(batch(), count=torch.ones(2)),
        TypeError,
        "count",
    ),
    "count_nan_tensor": (
        "second_moment",
        lambda a: a.update(batch(), count=torch.tensor(NAN)),
        ValueError,
        "count.*nan",
    ),
    # -- merge ----------------------------------------------------------------------------
    "merge_kind": (
        "covariance",
        lambda a: a.merge(dh.SecondMoment().update(batch())),
        TypeError,
        "same kind",
    ),
    "merge_not_accumulator": (
        "second_moment",
        lambda a: a.merge({"sum": torch.eye(3)}),
        TypeError,
        "dict",
    ),
    "merge_width": (
        "second_moment",
        lambda a: a.merge(dh.SecondMoment().update(batch(d=4))),
        dh.ShapeMismatchError,
        r"d_site=4\) into SecondMoment\(d_site=3\)",
    ),
    "merge_threshold": (
        "cofiring",
        lambda a: a.merge(dh.CoFiring(threshold=0.5).update(batch())),
        dh.ShapeMismatchError,
        "threshold=0.5",
    ),
    # -- load_state_dict ------------------------------------------------------------------
    "load_not_mapping": ("covariance", lambda a: a.load_state_dict([1, 2]), TypeError, "list"),
    "load_missing": (
        "covariance",
        lambda a: a.load_state_dict(without("covariance", "mean")),
        dh.ShapeMismatchError,
        "mean",
    ),
    "load_missing_count": (
        "second_moment",
        lambda a: a.load_state_dict(without("second_moment", "n_samples")),
        dh.ShapeMismatchError,
        "n_samples",
    ),
    "load_unknown_key": (
        "covariance",
        lambda a: a.load_state_dict({**good_state("covariance"), "m3": torch.ones(1)}),
        dh.ShapeMismatchError,
        "m3",
    ),
    "load_bad_mean_shape": (
        "covariance",
        lambda a: a.load_state_dict(with_field("covariance", "mean", torch.zeros(5))),
        dh.ShapeMismatchError,
        r"'mean' has shape \(5,\), expected \(3,\)",
    ),
    "load_bad_counts_shape": (
        "cofiring",
        lambda a: a.load_state_dict(with_field("cofiring", "counts", torch.zeros(4))),
        dh.ShapeMismatchError,
        "'counts' has shape",
    ),
    "load_nonsquare": (
        "second_moment",
        lambda a: a.load_state_dict(with_field("second_moment", "sum", torch.zeros(3, 4))),
        dh.ShapeMismatchError,
        r"\(3, 4\)",
    ),
    "load_nan_m2": (
        "covariance",
        lambda a: a.load_state_dict(with_field("covariance", "m2", torch.full((3, 3), NAN))),
        dh.NonFiniteError,
        "m2",
    ),
    "load_inf_sum": (
        "second_moment",
        lambda a: a.load_state_dict(
            with_field("second_moment", "sum", torch.eye(3, dtype=F64) * INF)
        ),
        dh.NonFiniteError,
        "sum",
    ),
    "load_nan_count": (
        "second_moment",
        lambda a: a.load_state_dict(with_field("second_moment", "count", torch.tensor(NAN))),
        dh.NonFiniteError,
        "count",
    ),
    "load_negative_count": (
        "second_moment",
        lambda a: a.load_state_dict(
            with_field("second_moment", "count", torch.tensor(-2.0, dtype=F64))
        ),
        ValueError,
        "count.*-2",
    ),
    "load_negative_weight_sum": (
        "covariance",
        lambda a: a.load_state_dict(with_field("covariance", "weight_sum", torch.tensor(-1.0))),
        ValueError,
        "weight_sum.*-1",
    ),
    "load_negative_cofire": (
        "cofiring",
        lambda a: a.load_state_dict(with_field("cofiring", "co", -torch.ones(3, 3, dtype=F64))),
        ValueError,
        "co.*-1",
    ),
    "load_negative_n_samples": (
        "covariance",
        lambda a: a.load_state_dict(with_field("covariance", "n_samples", torch.tensor(-4))),
        ValueError,
        "n_samples.*-4",
    ),
    "load_fractional_n_skipped": (
        "cofiring",
        lambda a: a.load_state_dict(with_field("cofiring", "n_skipped", torch.tensor(1.5))),
        ValueError,
        r"n_skipped.*1\.5",
    ),
    "load_vector_n_samples": (
        "second_moment",
        lambda a: a.load_state_dict(with_field("second_moment", "n_samples", torch.tensor([1, 2]))),
        dh.ShapeMismatchError,
        "n_samples",
    ),
    "load_complex": (
        "covariance",
        lambda a: a.load_state_dict(
            with_field("covariance", "mean", torch.zeros(3, dtype=torch.complex128))
        ),
        TypeError,
        "complex128",
    ),
    "load_not_tensor": (
        "covariance",
        lambda a: a.load_state_dict(with_field("covariance", "m2", "eye")),
        TypeError,
        "m2",
    ),
    # -- to -------------------------------------------------------------------------------
    "to_nonsense": ("covariance", lambda a: a.to("nonsense"), RuntimeError, "nonsense"),
    "to_wrong_type": ("cofiring", lambda a: a.to(3.5), TypeError, "3.5"),
}


@pytest.mark.parametrize("fed", [True, False], ids=["fed", "empty"])
@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_refused_call_leaves_state_unchanged(case, fed):
    kind, call, error, match = BAD_CALLS[case]
    acc = FACTORIES[kind]()
    if fed:
        acc.update(batch(seed=1)).update(batch(seed=2))
    elif "width" in case:
        acc.update(batch(seed=1))  # an empty accumulator takes any width
    before = snapshot(acc)
    with pytest.raises(error, match=match):
        call(acc)
    assert_unchanged(acc, before)
    # ... and the accumulator still works
    acc.update(batch(seed=3))


def test_skip_policy_refuses_bad_arguments_too():
    # nonfinite="skip" drops bad *data*; a bad argument is still an error.
    acc = dh.SecondMoment(nonfinite="skip").update(batch())
    before = snapshot(acc)
    for count in (NAN, -1.0):
        with pytest.raises(ValueError, match="count"):
            acc.update(batch(), count=count)
    with pytest.raises(ValueError, match="non-negative"):
        acc.update(batch(), weights=-torch.ones(6))
    assert_unchanged(acc, before)


def test_valid_masks_and_counts_still_work():
    x = batch(n=8)
    mask = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1])  # 0/1 integers, as from an attention mask
    acc = dh.Covariance().update(x, mask=mask)
    torch.testing.assert_close(acc.cov(), torch.cov(x[mask.bool()].T, correction=0))
    acc = dh.SecondMoment().update(x, count=torch.tensor(4))
    torch.testing.assert_close(acc.second_moment(), x.T @ x / 4)
    assert dh.SecondMoment().update(x, count=0).count == 0.0


def test_constructor_arguments_are_validated():
    with pytest.raises(ValueError, match="d must be a positive integer.*-3"):
        dh.Covariance(-3)
    with pytest.raises(TypeError, match="d must be a positive integer.*2.5"):
        dh.SecondMoment(2.5)
    with pytest.raises(TypeError, match="floating-point dtype.*torch.int64"):
        dh.Covariance(dtype=torch.int64)
    with pytest.raises(ValueError, match="threshold.*nan"):
        dh.CoFiring(threshold=NAN)


def test_from_matrix_is_validated():
    with pytest.raises(dh.ShapeMismatchError, match=r"square.*\(2, 3\)"):
        dh.SecondMoment.from_matrix(torch.zeros(2, 3), 4)
    with pytest.raises(ValueError, match="count.*-1"):
        dh.SecondMoment.from_matrix(torch.eye(2), -1)
    with pytest.raises(dh.NonFiniteError):
        dh.SecondMoment.from_matrix(torch.eye(2) * NAN, 2)


def test_load_state_dict_of_an_empty_accumulator_empties_it():
    acc = dh.Covariance().update(batch())
    acc.load_state_dict(dh.Covariance().state_dict())
    assert acc.d is None and acc.n_samples == 0
    assert acc.state_dict().keys() == {"n_samples", "n_skipped"}
    acc.update(batch(d=5))  # any width again


# -- overflow: finite inputs whose statistics do not fit in float64 --------------------------


@pytest.mark.parametrize("kind", ["covariance", "second_moment"])
def test_finite_batch_whose_squares_overflow_is_refused(kind):
    acc = FACTORIES[kind]().update(batch(seed=1))
    before = snapshot(acc)
    big = batch(seed=2) * 1e200  # finite, but its squares are inf
    with pytest.raises(dh.NonFiniteError, match=r"largest \|value\| [0-9.]+e\+200.*[Rr]escale"):
        acc.update(big)
    assert_unchanged(acc, before)
    assert torch.isfinite(acc.state_dict()[acc._tensor_fields[-1]]).all()


@pytest.mark.parametrize("kind", ["covariance", "second_moment"])
def test_overflow_on_the_first_batch_leaves_the_accumulator_empty(kind):
    acc = FACTORIES[kind]()
    with pytest.raises(dh.NonFiniteError, match="overflow"):
        acc.update(torch.full((2, 3), 1e300, dtype=F64) * torch.tensor([[1.0], [-1.0]]))
    assert acc.d is None and acc.n_samples == 0


def test_finite_batch_whose_sum_overflows_is_refused():
    # Every value is finite and so is each square's *exponent* budget: the plain sum overflows.
    x = torch.full((4, 2), 1.5e308, dtype=F64)
    for acc in (dh.Covariance(), dh.SecondMoment()):
        with pytest.raises(dh.NonFiniteError, match=r"1\.5e\+308"):
            acc.update(x)
        assert acc.d is None


def test_huge_weights_that_overflow_are_refused():
    acc = dh.Covariance().update(batch())
    before = snapshot(acc)
    with pytest.raises(dh.NonFiniteError, match=r"largest weight 1e\+300"):
        acc.update(batch(seed=4) * 1e10, weights=torch.full((6,), 1e300, dtype=F64))
    assert_unchanged(acc, before)


def test_overflow_against_the_state_already_held_is_refused():
    # The trace may not pass finfo.max / 16 (1.1e307): 9e306 is held, 9e306 more is refused.
    acc = dh.SecondMoment().update(torch.tensor([[3e153, 0.0]], dtype=F64))
    before = snapshot(acc)
    with pytest.raises(dh.NonFiniteError, match="overflow"):
        acc.update(torch.tensor([[3e153, 0.0]], dtype=F64))
    assert_unchanged(acc, before)


def test_large_but_representable_values_are_accepted():
    x = batch(n=50, d=4) * 1e150
    acc = dh.Covariance().update(x[:20]).update(x[20:])
    reference = torch.cov((x / 1e150).T, correction=0) * 1e300
    torch.testing.assert_close(acc.cov(), reference, rtol=1e-9, atol=0)
    sm = dh.SecondMoment().update(x)
    torch.testing.assert_close(sm.second_moment(), (x / 1e150).T @ (x / 1e150) / 50 * 1e300)


def test_skip_drops_rows_whose_own_contribution_overflows():
    x = batch(n=10, d=3)
    bad = x.clone()
    bad[3] = 1e200  # finite, square inf
    acc = dh.Covariance(nonfinite="skip").update(bad)
    keep = torch.arange(10) != 3
    assert acc.n_skipped == 1 and acc.n_samples == 9
    torch.testing.assert_close(acc.cov(), torch.cov(x[keep].T, correction=0), rtol=1e-12, atol=0)
    sm = dh.SecondMoment(nonfinite="skip").update(bad)
    assert sm.n_skipped == 1
    torch.testing.assert_close(sm.second_moment(), x[keep].T @ x[keep] / 9)


def test_skip_cannot_help_when_the_sum_of_finite_rows_overflows():
    # Each row's own square (4e306) fits; their sum (4e308) does not: dropping cannot help.
    x = torch.tensor([[2e153], [-2e153]] * 50, dtype=F64)
    for acc in (dh.Covariance(nonfinite="skip"), dh.SecondMoment(nonfinite="skip")):
        acc.update(batch(d=1))
        before = snapshot(acc)
        with pytest.raises(dh.NonFiniteError, match="skipping cannot help"):
            acc.update(x)
        assert_unchanged(acc, before)


def test_skipped_nan_rows_are_not_counted_when_the_batch_then_overflows():
    acc = dh.Covariance(nonfinite="skip").update(batch())
    before = snapshot(acc)
    x = torch.tensor([[NAN] * 3] + [[1e153] * 3, [-1e153] * 3] * 50, dtype=F64)
    with pytest.raises(dh.NonFiniteError, match="skipping cannot help"):
        acc.update(x)
    assert_unchanged(acc, before)


@pytest.mark.parametrize("kind", ["covariance", "second_moment"])
def test_merge_that_overflows_is_refused(kind):
    # Each holds a trace of about 8e306 and 9.7e306; their sum passes finfo.max / 16.
    x = torch.tensor([[2e153, 1.0], [-2e153, 2.0]], dtype=F64)
    a, b = FACTORIES[kind]().update(x), FACTORIES[kind]().update(x * 1.1)
    before, before_b = snapshot(a), snapshot(b)
    with pytest.raises(dh.NonFiniteError, match="merge.*overflow"):
        a.merge(b)
    assert_unchanged(a, before)
    assert_unchanged(b, before_b)


def test_skip_keeps_second_moment_count_unbiased():
    # 2 probes x 3 samples: with a dropped probe row, the 5 clean rows stand for 2.5 samples,
    # so the estimate stays sum over clean rows / (rows per sample x clean rows).
    g = batch(n=6, d=3)
    bad = g.clone()
    bad[4, 0] = NAN
    acc = dh.SecondMoment(nonfinite="skip").update(bad, count=3)
    clean = torch.cat([g[:4], g[5:]])
    assert acc.n_skipped == 1 and acc.count == pytest.approx(2.5)
    torch.testing.assert_close(acc.second_moment(), 2 * clean.T @ clean / 5, rtol=1e-12, atol=0)


# -- memory ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_width_that_cannot_fit_is_refused_before_allocating(kind):
    d = 10**7  # a (d, d) float64 matrix is 800 TB
    with pytest.raises(MemoryError, match=rf"d_site={d}.*GiB.*available.*narrower site") as info:
        FACTORIES[kind](d)
    assert isinstance(info.value, dh.DegenHooksError)
    estimate = float(re.search(r"needs about ([0-9,.]+) GiB", str(info.value))[1].replace(",", ""))
    assert estimate >= 8 * d * d / 2**30  # at least one (d, d) float64 matrix
    # through update: a (0, d) batch costs nothing, the state would
    acc = FACTORIES[kind]()
    with pytest.raises(MemoryError, match="narrower site"):
        acc.update(torch.zeros(0, d))
    assert acc.d is None and acc.n_samples == 0


def test_ordinary_widths_are_not_refused():
    assert dh.Covariance().to("meta").device.type == "meta"  # meta holds no memory to check
    acc = dh.Covariance(512).update(batch(d=512))
    assert math.isfinite(acc.cov().sum().item())


@pytest.mark.cuda
def test_gpu_width_that_cannot_fit_and_gpu_overflow_are_refused():
    d = 10**6  # 8 TB of float64 (d, d) state: more than any GPU holds
    with pytest.raises(MemoryError, match=rf"d_site={d}.*available on cuda"):
        dh.Covariance(d, device="cuda")
    acc = dh.SecondMoment().update(batch().cuda())
    before = snapshot(acc)
    with pytest.raises(dh.NonFiniteError, match="overflow"):
        acc.update(batch().cuda() * 1e200)
    assert_unchanged(acc, before)
    skip = dh.Covariance(nonfinite="skip").update(torch.cat([batch(), batch()[:1] * 1e200]).cuda())
    assert skip.n_skipped == 1 and skip.n_samples == 6
