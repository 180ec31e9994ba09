"""Errors that teach (issue #15, item 7): what was wrong, the values, and how to fix it.

One-shot data given to multi-pass entry points, gradients that cannot reach a site (frozen
models, sites at the model input), data of the wrong width for the behavioural count, 0-d site
tensors, and empty batches (a no-op: no rows change no statistic).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import degen_hooks as dh
from degen_hooks.graph import min_edges
from tests.cases import inputs, position_mixer, relu_mlp

F64 = torch.float64


def batches(n: int = 4, size: int = 16, d: int = 5) -> list[torch.Tensor]:
    return list(inputs(n * size, d, seed=1).split(size))


def snapshot(stats: dh.Statistics):
    """Everything a statistic holds: tensors, batch counts (metadata aside)."""
    tensors = {k: v.clone() for k, v in stats.state_dict().items()}
    return tensors, {k: s.n_batches for k, s in stats.items()}


def assert_same(before, after) -> None:
    assert before[0].keys() == after[0].keys()
    for key, value in before[0].items():
        assert torch.equal(value, after[0][key]), key
    assert before[1] == after[1]


# -- one-shot data ---------------------------------------------------------------------------
@pytest.mark.parametrize(("variant", "n_passes"), [("lib", 3), ("global", 2)])
def test_build_bases_refuses_a_generator_it_would_iterate_again(variant, n_passes):
    data = batches()
    match = (
        rf"build_bases makes {n_passes} passes over data, but data is a one-shot iterator "
        r"\(generator\).*list\(data\).*DataLoader"
    )
    with pytest.raises(ValueError, match=match):
        dh.build_bases(
            relu_mlp(),
            ["1", "3"],
            (b for b in data),
            variant=variant,
            sections=None,
            progress=False,
        )


def test_build_bases_refuses_an_iterator_before_any_pass():
    model = relu_mlp()
    data = batches()
    stream = iter(data)
    with pytest.raises(ValueError, match=r"one-shot iterator \(list_iterator\)"):
        dh.build_bases(model, ["1", "3"], stream, sections=None, progress=False)
    assert len(list(stream)) == len(data)  # refused before any pass: nothing was consumed


def test_build_bases_takes_a_generator_when_it_makes_one_pass():
    model, data = relu_mlp(), batches()
    from_list = dh.build_bases(model, ["1", "3"], data, variant="pca", progress=False)
    from_gen = dh.build_bases(model, ["1", "3"], (b for b in data), variant="pca", progress=False)
    for key in ("1", "3"):
        torch.testing.assert_close(from_gen.rotations_[key], from_list.rotations_[key])


class OneShot:
    """Re-iterable in form (``iter(self) is not self``) but exhausted after one pass."""

    def __init__(self, items: list[torch.Tensor]) -> None:
        self._stream = iter(items)

    def __iter__(self):
        yield from self._stream


def test_build_bases_names_data_exhausted_after_the_first_pass():
    model = relu_mlp()
    with pytest.raises(
        dh.EmptyStatisticsError,
        match=r"'jacobians 3'.*saw no batches.*4 batches in the first pass.*list of batches",
    ):
        dh.build_bases(model, ["1", "3"], OneShot(batches()), sections=None, progress=False)


def test_build_bases_names_empty_data():
    with pytest.raises(
        dh.EmptyStatisticsError,
        match=r"build_bases saw no samples at site '1' \(0 batches\).*data is empty",
    ):
        dh.build_bases(relu_mlp(), ["1", "3"], [], progress=False)


def test_node_ablation_curve_refuses_a_generator():
    model, data = relu_mlp(), batches()
    basis = dh.build_bases(model, ["1"], data, variant="pca", progress=False)
    with pytest.raises(
        ValueError, match=r"node_ablation_curve makes several passes over data.*one-shot"
    ):
        dh.node_ablation_curve(
            model,
            {"PCA": basis},
            "1",
            (b for b in data),
            metric=lambda y, b: y.sum(-1),
            progress=False,
        )


def test_min_edges_refuses_a_generator():
    model, data = relu_mlp(), batches()
    basis = dh.build_bases(model, ["1", "3"], data, variant="pca", progress=False)
    graph = dh.InteractionGraph().fit(model, basis, data, progress=False)
    with pytest.raises(ValueError, match=r"min_edges makes several passes over data.*one-shot"):
        min_edges(model, graph, 0, (b for b in data), metric=lambda y, b: y.sum(-1), tolerance=0.1)


# -- gradients that cannot reach a site -------------------------------------------------------
BUILD_FIX = r"forward=lambda model, batch: model\(batch\.requires_grad_\(\)\)"


@pytest.mark.parametrize("variant", ["lib", "global"])
def test_build_bases_on_a_frozen_model_suggests_forward(variant):
    model = relu_mlp().requires_grad_(False)
    with pytest.raises(
        dh.GradientError,
        match=r"Jacobians of site '\d'.*model is frozen.*"
        + BUILD_FIX
        + r".*requires_grad_\(True\)",
    ) as info:
        dh.build_bases(model, ["1", "3"], batches(), variant=variant, sections=None, progress=False)
    message = str(info.value)
    # What a build_bases user cannot do is not suggested.
    assert "x.requires_grad_()" not in message and "run.backward" not in message
    assert isinstance(info.value.__cause__, dh.GradientError)


def test_build_bases_at_a_model_input_site_suggests_forward():
    model = relu_mlp()
    site = dh.Site("0", io="input")
    with pytest.raises(dh.GradientError, match=r"site '0:input'.*model input.*" + BUILD_FIX):
        dh.build_bases(model, [site, "1"], batches(), sections=None, progress=False)


@pytest.mark.parametrize("frozen", [False, True], ids=["input-site", "frozen"])
def test_the_suggested_forward_works(frozen):
    model = relu_mlp().requires_grad_(not frozen)
    sites = [dh.Site("0", io="input"), "1"] if not frozen else ["1", "3"]
    basis = dh.build_bases(
        model,
        sites,
        batches(),
        sections=None,
        progress=False,
        forward=lambda model, batch: model(batch.requires_grad_()),
    )
    assert basis.sites_ == [s.key if isinstance(s, dh.Site) else s for s in sites]


def test_build_bases_under_no_grad_says_where_gradients_went():
    with (
        torch.no_grad(),
        pytest.raises(
            dh.GradientError,
            match=r"build_bases.*backward passes.*gradients are disabled.*torch\.no_grad\(\)",
        ),
    ):
        dh.build_bases(relu_mlp(), ["1", "3"], batches(), sections=None, progress=False)


def test_build_bases_forward_that_disables_gradients_is_named():
    def forward(model, batch):
        with torch.no_grad():
            return model(batch)

    with pytest.raises(dh.GradientError, match=r"forward= ran the model without gradients"):
        dh.build_bases(
            relu_mlp(), ["1", "3"], batches(), sections=None, progress=False, forward=forward
        )


def test_collect_on_a_frozen_model_names_both_fixes():
    model = relu_mlp().requires_grad_(False)
    with pytest.raises(
        dh.GradientError,
        match=r"frozen.*model\(x\.requires_grad_\(\)\).*requires_grad_\(True\)",
    ):
        with dh.collect(model, ["1"], jacobians="exact") as run:
            run.backward(model(inputs(8, 5)))


# -- degeneracy_report with data of the wrong width -------------------------------------------
def collected(model: nn.Module, x: torch.Tensor, sites: list[str]) -> dh.Statistics:
    with dh.collect(model, sites) as run:
        model(x)
    return run.stats


@pytest.mark.parametrize("as_list", [False, True], ids=["tensor", "batches"])
def test_degeneracy_report_names_the_data_width(as_list):
    model = relu_mlp()
    stats = collected(model, inputs(32, 5), ["1"])
    wrong = inputs(10, 4)
    with pytest.raises(
        dh.ShapeMismatchError,
        match=r"data= has width 4 \(a batch of shape "
        r"\(10, 4\)\).*Linear\(in_features=5\).*shape \(n_samples, 5\)",
    ):
        dh.degeneracy_report(stats, model=model, data=[wrong] if as_list else wrong)


def test_degeneracy_report_explains_a_model_that_refuses_the_data():
    model = position_mixer()  # not a Sequential: its input width is not read off a Linear
    stats = collected(model, inputs(8, 4, n_pos=5), ["act"])
    with pytest.raises(
        dh.ShapeMismatchError,
        match=r"could not run PositionMixer on data= \(batch shapes \[\(8, 5, 3\)\]\).*inputs the",
    ) as info:
        dh.degeneracy_report(stats, model=model, data=inputs(8, 3, n_pos=5))
    assert isinstance(info.value.__cause__, RuntimeError)


def test_degeneracy_report_consumes_a_generator_once():
    model = relu_mlp()
    x = inputs(32, 5)
    stats = collected(model, x, ["1"])
    expected = dh.degeneracy_report(stats, model=model, data=list(x.split(8))).behavioural
    got = dh.degeneracy_report(stats, model=model, data=(b for b in x.split(8))).behavioural
    assert got == expected


# -- 0-d site tensors -------------------------------------------------------------------------
class SumLoss(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x**2).sum()


class WithLoss(nn.Module):
    """``Linear(3, 2)`` then a loss module returning a 0-d tensor (site ``"loss"``)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2).double()
        self.loss = SumLoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.loss(self.linear(x))


ZERO_D = r"Site 'loss' produced a 0-d tensor \(shape \(\)\).*Choose a site with a feature"


def test_site_rows_refuses_a_0d_tensor():
    with pytest.raises(dh.ShapeMismatchError, match=ZERO_D):
        dh.Site("loss").rows(torch.tensor(1.0))


@pytest.mark.parametrize("jacobians", [None, "exact"])
def test_collect_refuses_a_0d_site(jacobians):
    model = WithLoss()
    with pytest.raises(dh.ShapeMismatchError, match=ZERO_D):
        with dh.collect(model, ["linear", "loss"], jacobians=jacobians) as run:
            out = model(inputs(4, 3))
            if jacobians:
                run.backward(out)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_build_bases_refuses_a_0d_site():
    with pytest.raises(dh.ShapeMismatchError, match=ZERO_D):
        dh.build_bases(WithLoss(), ["linear", "loss"], [inputs(4, 3)], progress=False)


# -- empty batches: a no-op -------------------------------------------------------------------
@pytest.mark.parametrize("first", [False, True], ids=["after-a-batch", "first"])
@pytest.mark.parametrize(
    "settings",
    [{}, {"firing": True}, {"derivatives": {"0": "relu"}}, {"jacobians": "exact"}],
    ids=["acts", "firing", "derivs", "jacobians"],
)
def test_an_empty_batch_changes_no_statistic(settings, first):
    model = relu_mlp()
    with dh.collect(model, ["0", "1"], **settings) as run:
        if not first:
            out = model(inputs(8, 5))
            if "jacobians" in settings:
                run.backward(out)
        before = snapshot(run.stats)
        out = model(torch.empty(0, 5, dtype=F64))
        if "jacobians" in settings:
            run.backward(out)  # nothing to push back: a no-op, not an error
        assert_same(before, snapshot(run.stats))
    assert_same(before, snapshot(run.stats))


@pytest.mark.parametrize("positions", [None, "last", slice(0, 2)])
def test_a_batch_with_no_rows_at_a_site_changes_nothing(positions):
    model = position_mixer()
    site = dh.Site("act", positions=positions)
    with dh.collect(model, [site], jacobians="exact") as run:
        run.backward(model(inputs(2, 4, n_pos=5)))
        before = snapshot(run.stats)
        run.set_mask(torch.zeros(2, 5, dtype=torch.bool))  # every position is padding
        run.backward(model(inputs(2, 4, n_pos=5)))
        run.set_mask(None)
        run.backward(model(torch.empty(0, 5, 4, dtype=F64)))  # no samples
    assert_same(before, snapshot(run.stats))


def test_last_position_of_no_positions_is_no_rows():
    act = torch.empty(3, 0, 4, dtype=F64)
    assert dh.Site("x", positions="last").rows(act).shape == (0, 4)


def test_build_bases_ignores_empty_batches():
    model, data = relu_mlp(), batches()
    empty = torch.empty(0, 5, dtype=F64)
    plain = dh.build_bases(model, ["1", "3"], data, sections=None, progress=False)
    padded = dh.build_bases(model, ["1", "3"], [empty, *data, empty], sections=None, progress=False)
    for key in ("1", "3"):
        torch.testing.assert_close(
            padded.rotations_[key], plain.rotations_[key], rtol=1e-9, atol=1e-12
        )
        assert padded.stats_[key].acts.n_samples == plain.stats_[key].acts.n_samples


@pytest.mark.parametrize("empty", [[], (), torch.tensor([], dtype=torch.long)])
def test_a_site_that_keeps_no_position_is_refused_when_made(empty):
    """``positions=[]`` keeps nothing: refused at once with what to write instead, not an
    IndexError from deep inside a pass (the attention section raised one)."""
    with pytest.raises(ValueError, match=r"keeps no position.*positions=None"):
        dh.Site("blocks.0.hook_resid_mid", positions=empty)
