"""Sites on the models researchers bring: keyword inputs, structured outputs, shared modules,
conv feature maps, checkpointed and compiled models, and tensors that are not real features.

Each test reads with ``dh.collect`` and writes with ``dh.ablate`` (or the graph) and checks
both against a hand-written forward pass: reads and writes agree on which tensor a site is.
"""

from __future__ import annotations

import collections
import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import degen_hooks as dh
from degen_hooks.graph import InteractionGraph


def x_batch(n: int = 64, d: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def pca_of(model: nn.Module, site: dh.Site | str, x: torch.Tensor) -> dh.InteractionBasis:
    with dh.collect(model, [site]) as run, torch.no_grad():
        model(x)
    return dh.InteractionBasis(variant="pca").fit(run.stats)


def mean_rows(rows: torch.Tensor) -> torch.Tensor:
    return rows.mean(0, keepdim=True).expand_as(rows)


# -- outputs of any structure --------------------------------------------------------------
Pair = collections.namedtuple("Pair", ["mask", "hidden"])


class Structured(nn.Module):
    """A linear layer whose output comes wrapped as ``kind`` says."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind, self.linear = kind, nn.Linear(4, 5)

    def forward(self, x: torch.Tensor):
        h = self.linear(x)
        if self.kind == "list":
            return [h]
        if self.kind == "none-first":
            return (None, h)
        if self.kind == "dict":
            return {"mask": torch.ones(3), "hidden": h}
        if self.kind == "namedtuple":
            return Pair(torch.ones(3), h)
        from transformers.modeling_outputs import BaseModelOutput

        return BaseModelOutput(last_hidden_state=h)


class Consumer(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.inner, self.head = Structured(kind), nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        if isinstance(out, dict):
            h = out["hidden"] if "hidden" in out else out["last_hidden_state"]
        else:
            h = out[-1] if not hasattr(out, "hidden") else out.hidden
        return self.head(h)


KINDS = ["list", "none-first", "dict", "namedtuple", "model-output"]
ELEMENT = {"list": None, "none-first": None, "dict": "hidden", "namedtuple": 1}


@pytest.mark.parametrize("kind", KINDS)
def test_structured_outputs_are_read_and_written_at_the_same_element(kind):
    if kind == "model-output":
        pytest.importorskip("transformers")
    torch.manual_seed(0)
    model, x = Consumer(kind).double().eval(), x_batch()
    site = dh.Site("inner", element=ELEMENT.get(kind))
    h = model.inner.linear(x).detach()
    with dh.collect(model, [site]) as run, torch.no_grad():
        model(x)
    torch.testing.assert_close(run.stats["inner"].acts.mean(), h.mean(0), rtol=1e-12, atol=1e-12)
    pca = dh.InteractionBasis(variant="pca").fit(run.stats)
    with dh.ablate(model, pca, "inner", keep=0), torch.no_grad():
        ablated = model(x)
    # keep=0: every sample is the mean, so the head sees the mean activation.
    expected = model.head(mean_rows(h))
    torch.testing.assert_close(ablated, expected, rtol=1e-12, atol=1e-12)


def test_a_named_element_that_is_missing_says_which_exist():
    model = Consumer("dict").double().eval()
    with pytest.raises(dh.ShapeMismatchError, match=r"element 'hiddn'.*\['mask', 'hidden'\]"):
        with dh.collect(model, [dh.Site("inner", element="hiddn")]), torch.no_grad():
            model(x_batch())


# -- module inputs passed by keyword ---------------------------------------------------------
class Mixer(nn.Module):
    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return hidden_states * attention_mask[..., None]


class KeywordModel(nn.Module):
    """Calls its submodules by keyword, as Hugging Face decoder layers do."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.mixer, self.down = nn.Linear(4, 6), Mixer(), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = torch.ones(x.shape[0])
        h = self.mixer(attention_mask=mask, hidden_states=torch.tanh(self.up(x)))
        return self.down(h)


def test_keyword_inputs_are_read_and_written_by_name():
    torch.manual_seed(0)
    model, x = KeywordModel().double().eval(), x_batch()
    hidden = torch.tanh(model.up(x)).detach()
    site = dh.Site("mixer", io="input", arg="hidden_states")
    with dh.collect(model, [site]) as run, torch.no_grad():
        model(x)
    acts = run.stats["mixer:input"].acts
    assert acts.d == 6  # not the (n,) attention mask
    torch.testing.assert_close(acts.mean(), hidden.mean(0), rtol=1e-12, atol=1e-12)
    pca = dh.InteractionBasis(variant="pca").fit(run.stats)
    with dh.ablate(model, pca, "mixer:input", keep=0), torch.no_grad():
        ablated = model(x)
    torch.testing.assert_close(ablated, model.down(mean_rows(hidden)), rtol=1e-12, atol=1e-12)


def test_several_keyword_tensors_without_arg_are_refused():
    model = KeywordModel().double().eval()
    with pytest.raises(dh.ShapeMismatchError, match="arg='attention_mask'|arg='hidden_states'"):
        with dh.collect(model, [dh.Site("mixer", io="input")]), torch.no_grad():
            model(x_batch())


def test_edges_from_a_keyword_input_site():
    torch.manual_seed(0)
    model, x = KeywordModel().double().eval(), x_batch()
    sites = [dh.Site("mixer", io="input", arg="hidden_states"), dh.Site("down")]
    with dh.collect(model, sites) as run, torch.no_grad():
        model(x)
    pca = dh.InteractionBasis(variant="pca").fit(run.stats)
    graph = InteractionGraph().fit(model, pca, [x], progress=False)
    edges = graph.edges_[("mixer:input", "down")]
    # Reference: the edge of a linear map W from centred features f C to g C' is
    # mean_x ((C'^T W C_pinv^T)_ij f_j)^2 with the features of the data.
    rot_in, pinv_in, mean_in = pca._get("mixer:input")
    rot_out = pca._get("down")[0]
    features = (torch.tanh(model.up(x)).detach() - mean_in) @ rot_in
    jacobian = rot_out.T @ model.down.weight.detach() @ pinv_in.T
    reference = ((jacobian[None] * features[:, None, :]) ** 2).mean(0)
    torch.testing.assert_close(edges, reference, rtol=1e-10, atol=1e-12)


# -- a module called several times per forward ----------------------------------------------
class SharedReLU(nn.Module):
    """torchvision style: one ``self.relu`` used twice."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.relu = nn.Linear(4, 4), nn.Linear(4, 4), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.b(self.relu(self.a(x))))


def test_a_shared_module_warns_and_call_selects_one_call():
    torch.manual_seed(0)
    model, x = SharedReLU().double().eval(), x_batch()
    first = torch.relu(model.a(x)).detach()
    second = torch.relu(model.b(first)).detach()
    with pytest.warns(UserWarning, match=r"ran 2 times.*call=0"):
        with dh.collect(model, ["relu"]) as run, torch.no_grad():
            model(x)
    assert run.stats["relu"].acts.n_samples == 128
    sites = [
        dh.Site("relu", call=0, label="first"),
        dh.Site("relu", call=1, label="second"),
        dh.Site("relu", call="all", label="both"),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with dh.collect(model, sites) as run, torch.no_grad():
            model(x)
    for key, rows in (("first", first), ("second", second)):
        torch.testing.assert_close(run.stats[key].acts.mean(), rows.mean(0), rtol=1e-12, atol=0)
        torch.testing.assert_close(
            run.stats[key].acts.cov(), rows.T.cov(correction=0), rtol=1e-10, atol=1e-12
        )
    assert run.stats["both"].acts.n_samples == 128
    # A write at call 1 leaves call 0 alone.
    pca = dh.InteractionBasis(variant="pca").fit(run.stats)
    with dh.ablate(model, pca, "second", keep=0), torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, mean_rows(second), rtol=1e-12, atol=1e-12)


def test_a_site_that_never_fires_raises_at_the_end_of_the_first_pass():
    model, x = SharedReLU().double().eval(), x_batch()
    unused = nn.Linear(4, 4)
    model.unused = unused
    with dh.collect(model, ["a", "unused", dh.Site("relu", call=5)]) as run:
        with pytest.raises(dh.SiteNotFiredError, match=r"'unused' \(its module never ran\)"):
            with torch.no_grad():
                model(x)
    assert run.stats["a"].acts.n_samples == 0  # the failed batch left nothing behind
    with dh.collect(model, [dh.Site("relu", call=5)]):
        with pytest.raises(dh.SiteNotFiredError, match="ran 2 time.*call=5"):
            with torch.no_grad():
                model(x)


def test_a_site_not_fired_with_jacobians_is_named_not_a_backward_error():
    model, x = SharedReLU().double().eval(), x_batch()
    model.unused = nn.Linear(4, 4)
    with pytest.raises(dh.SiteNotFiredError, match="'unused'"):
        with dh.collect(model, ["a", "unused"], jacobians="exact") as run:
            run.backward(model(x))


# -- the feature axis --------------------------------------------------------------------------
class Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)))


def test_conv_channels_are_features_with_feature_axis():
    torch.manual_seed(0)
    model = Conv().double().eval()
    x = torch.randn(5, 2, 6, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    maps = model.conv(x).detach()  # (5, 3, 6, 7)
    rows = maps.permute(0, 2, 3, 1).reshape(-1, 3)
    with pytest.warns(UserWarning, match="feature_axis=1"):
        with dh.collect(model, ["conv"]) as run, torch.no_grad():
            model(x)
    assert run.stats["conv"].acts.d == 7  # the width axis, which the warning names
    with dh.collect(model, [dh.Site("conv", feature_axis=1)]) as run, torch.no_grad():
        model(x)
    acts = run.stats["conv"].acts
    torch.testing.assert_close(acts.mean(), rows.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(acts.cov(), rows.T.cov(correction=0), rtol=1e-10, atol=1e-12)
    pca = dh.InteractionBasis(variant="pca").fit(run.stats)
    with dh.ablate(model, pca, "conv", keep=0), torch.no_grad():
        out = model(x)
    channel_mean = rows.mean(0)[None, :, None, None].expand_as(maps)
    torch.testing.assert_close(out, model.head(torch.relu(channel_mean)), rtol=1e-12, atol=1e-12)


def test_edges_between_conv_feature_maps():
    torch.manual_seed(0)
    model = Conv().double().eval()
    x = torch.randn(4, 2, 5, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sites = [dh.Site("conv", feature_axis=1), dh.Site("head", feature_axis=1)]
    with dh.collect(model, sites) as run, torch.no_grad():
        model(x)
    pca = dh.InteractionBasis(variant="pca").fit(run.stats)
    graph = InteractionGraph().fit(model, pca, [x], progress=False)
    assert graph.edges_[("conv", "head")].shape == (1, 3)
    assert bool((graph.edges_[("conv", "head")] > 0).all())


# -- tensors that are not real features --------------------------------------------------------
class Odd(nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype, self.source = dtype, nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = torch.complex(x, x) if self.dtype.is_complex else (100 * x).to(self.dtype)
        self.source(value)
        return x


@pytest.mark.parametrize(
    ("dtype", "advice"), [(torch.complex128, "view_as_real"), (torch.int64, "embedding")]
)
def test_complex_and_integer_activations_are_refused(dtype, advice):
    model = Odd(dtype)
    with dh.collect(model, ["source"]) as run:
        with pytest.raises(dh.UnsupportedDtypeError, match=advice):
            model(x_batch())
    assert run.stats["source"].acts.n_samples == 0


# -- checkpointed and compiled models ---------------------------------------------------------
class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.first = nn.Linear(4, 6)
        self.middle = nn.Sequential(nn.Tanh(), nn.Linear(6, 6), nn.Tanh())
        self.last = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        if self.reentrant is None:
            h = self.middle(h)
        else:
            h = checkpoint(self.middle, h, use_reentrant=self.reentrant)
        return self.last(h)


SITES = ["first", "middle.1", "middle.2"]


def collected(model: nn.Module, x: torch.Tensor, **kwargs) -> dh.Statistics:
    with dh.collect(model, SITES, **kwargs) as run:
        for batch in x.split(16):
            if kwargs.get("jacobians"):
                run.backward(model(batch))
            else:
                model(batch).sum().backward()  # training-style: the recomputation runs
    return run.stats


def assert_same_stats(stats: dh.Statistics, reference: dh.Statistics) -> None:
    for key in SITES:
        for kind in ("acts", "grads"):
            ours, ref = getattr(stats[key], kind), getattr(reference[key], kind)
            if ref is None:
                continue
            assert ours.n_samples == ref.n_samples, (key, kind)
            torch.testing.assert_close(ours.state_dict(), ref.state_dict(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_checkpointed_activations_are_counted_once(reentrant):
    torch.manual_seed(0)
    plain = Checkpointed(None).double()
    model = Checkpointed(reentrant).double()
    model.load_state_dict(plain.state_dict())
    x = x_batch(48).requires_grad_(reentrant)  # reentrant checkpoints need an input with grad
    assert_same_stats(collected(model, x), collected(plain, x))


def test_checkpointed_jacobians_equal_the_plain_model_and_the_next_backward_works():
    torch.manual_seed(0)
    plain, model = Checkpointed(None).double(), Checkpointed(False).double()
    model.load_state_dict(plain.state_dict())
    x = x_batch(48)
    assert_same_stats(
        collected(model, x, jacobians="exact"), collected(plain, x, jacobians="exact")
    )


def test_reentrant_checkpointing_with_jacobians_says_what_to_do():
    model = Checkpointed(True).double()
    x = x_batch(16).requires_grad_(True)
    with pytest.raises(dh.GradientError, match="use_reentrant=False"):
        with dh.collect(model, SITES, jacobians="exact") as run:
            run.backward(model(x))


@pytest.mark.parametrize("name", ["2", "_orig_mod.2"])
def test_a_compiled_model_is_read_and_written_after_its_first_call(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    compiled = torch.compile(model, backend="eager")
    x = x_batch()
    with torch.no_grad():
        before = compiled(x)  # compiled before any hook: hooks added later are ignored
    with dh.collect(compiled, [name]) as run, torch.no_grad():
        compiled(x)
    rows = model(x).detach()
    torch.testing.assert_close(run.stats["2"].acts.mean(), rows.mean(0), rtol=1e-12, atol=0)
    pca = dh.InteractionBasis(variant="pca").fit(run.stats)
    with dh.ablate(compiled, pca, "2", keep=0), torch.no_grad():
        torch.testing.assert_close(compiled(x), mean_rows(rows), rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), before, rtol=0, atol=0)
    assert "forward" in compiled.__dict__  # compiled again after the blocks


# -- sites the way people name them ----------------------------------------------------------
def test_sites_as_modules_and_name_filters():
    model = SharedReLU().double().eval()
    assert dh.find_sites(model, model.b) == ["b"]
    assert dh.find_sites(model, lambda name: name in ("a", "b")) == ["a", "b"]
    with dh.collect(model, [model.a, lambda name: name == "b"]) as run, torch.no_grad():
        model(x_batch())
    assert list(run.stats) == ["a", "b"]
    with pytest.raises(dh.SiteNotFoundError, match="not a submodule"):
        dh.find_sites(model, nn.Linear(2, 2))
    with pytest.raises(dh.SiteNotFoundError, match="matched none of the 3 site names"):
        dh.find_sites(model, lambda name: name.startswith("z"))


class PositionModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x)


def test_a_stale_mask_warns_and_over_sets_one_mask_per_batch():
    model = PositionModel().double()
    batches = [torch.randn(2, 4, 2, dtype=torch.float64) for _ in range(3)]
    masks = [torch.rand(2, 4, generator=torch.Generator().manual_seed(i)) > 0.4 for i in range(3)]
    with dh.collect(model, ["embed"]) as run, torch.no_grad():
        run.set_mask(masks[0])
        model(batches[0])
        with pytest.warns(UserWarning, match="second forward pass"):
            model(batches[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with dh.collect(model, ["embed"]) as run:
            pairs = list(zip(batches, masks, strict=True))
            run.over(pairs, forward=lambda m, b: m(b[0]), mask=lambda b: b[1], progress=False)
        with dh.collect(model, ["embed"]) as fixed, torch.no_grad():
            fixed.set_mask(masks[0], every_pass=True)
            model(batches[0])
            model(batches[0])
    rows = torch.cat([model.embed(x)[m] for x, m in zip(batches, masks, strict=True)]).detach()
    torch.testing.assert_close(run.stats["embed"].acts.mean(), rows.mean(0), rtol=1e-12, atol=0)
    assert run._mask is None  # cleared after the loop


@pytest.mark.filterwarnings("ignore:Site 'embed' has 3 samples:UserWarning")
def test_ablation_with_padding_writes_the_last_real_token():
    model = PositionModel().double()
    x = torch.randn(3, 5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    site = dh.Site("embed", positions="last")
    with dh.collect(model, [site]) as run, torch.no_grad():
        run.set_mask(mask)
        model(x)
    pca = dh.InteractionBasis(variant="pca").fit(run.stats)
    clean = model(x).detach()
    with dh.ablate(model, pca, "embed", keep=0, mask=mask), torch.no_grad():
        out = model(x)
    written = torch.zeros(3, 5, dtype=torch.bool)
    written[0, 2] = written[1, 4] = written[2, 4] = True
    torch.testing.assert_close(out[~written], clean[~written], rtol=0, atol=0)
    mean = run.stats["embed"].acts.mean()
    torch.testing.assert_close(out[written], mean.expand(3, 3), rtol=1e-12, atol=1e-12)
    batches = [(x, mask)]
    curve = dh.node_ablation_curve(
        model,
        {"PCA": pca},
        "embed",
        batches,
        metric=lambda out, batch: out[batch[1]].sum(-1),
        forward=lambda m, batch: m(batch[0]),
        mask=lambda batch: batch[1],
        n_kept=[0],
        progress=False,
    )
    expected = (clean[mask].sum(-1).sum() - clean[written].sum() + mean.sum() * 3) / mask.sum()
    assert abs(curve.values["PCA"][0] - float(expected)) < 1e-12


def test_a_bypass_that_names_no_module_is_refused_with_suggestions():
    model, x = KeywordModel().double().eval(), x_batch()
    site = dh.Site("up", bypass="dwn")
    pca = pca_of(model, site, x)
    with pytest.raises(dh.SiteNotFoundError, match=r"bypass='dwn'.*Did you mean 'down'"):
        with dh.ablate(model, pca, "up", keep=0):
            model(x)
