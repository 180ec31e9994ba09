"""Closed-form sections on padded batches (#16): padding is no sample and no probe.

``build_bases(mask=...)`` and ``section.gram_pass(..., mask=...)`` take the padding mask of
each batch, as ``run.over(..., mask=...)`` does. The attention sections recompute (Hugging
Face) or read (TransformerLens) the masked pattern, weight each (sequence, output position)
probe and each input sample by the mask, and equal exact probes under the same mask at rtol
1e-10: right and left padding, every position selection, ``"last"`` the last real token of
each row. Before, every own-pass section refused a mask.
"""

from __future__ import annotations

import pytest
import torch

import degen_hooks as dh
from degen_hooks.transformer_lens import attention_section, attention_section_sites
from tests.reference import assert_same_bases

from .conftest import D_VOCAB, N_CTX, perturbed, toy_config
from .test_attention_section import float64_softmax  # noqa: F401

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
F64 = torch.float64
RTOL = 1e-10
# (input positions, output positions)
POSITIONS = [(None, None), (None, "last"), ("last", "last"), ([0, 2, 2], [1, 3])]
POSITION_IDS = ["all", "to-last", "last", "lists"]


def readout_for(width: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(width, max(1, width - 3), generator=gen, dtype=F64)


def exact_gram(model, batches, site, target, readout, forward, mask, **kw) -> dh.SecondMoment:
    """The Jacobian Gram of exact probes, each batch with its padding mask."""
    with dh.collect(model, [site], jacobians="exact", target=target, readout=readout, **kw) as run:
        for batch in batches:
            run.set_mask(mask(batch))
            output = forward(model, batch)
            run.backward(None if target else output)
    return run.stats[site.key].grads


def assert_gram(closed: dh.SecondMoment, exact: dh.SecondMoment) -> None:
    assert closed.n_samples == exact.n_samples
    expected = exact.second_moment()
    torch.testing.assert_close(
        closed.second_moment(), expected, rtol=RTOL, atol=RTOL * float(expected.abs().max())
    )


def assert_closed_build(model, sites, batches, forward, mask) -> None:
    """``build_bases`` takes every pair in closed form, and equals backward passes."""
    common = {"forward": forward, "mask": mask, "progress": False}
    auto = dh.build_bases(model, sites, batches, **common)
    probed = dh.build_bases(model, sites, batches, sections=None, **common)
    closed = [label for label in auto.timings_ if label.endswith("(closed form)")]
    assert len(closed) == len(sites)
    assert_same_bases(auto, probed)


# -- Hugging Face ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("positions", POSITIONS, ids=POSITION_IDS)
def test_hf_attention_on_padded_batches_equals_exact_probes(family, positions):
    from degen_hooks.families import hf
    from degen_hooks.families.transformers import find_sections

    from .test_hf import build, padded_batches
    from .test_hf_sections import attention_pair, float64_norms

    model = float64_norms(build(family))
    batches = padded_batches()
    site, target = attention_pair(model, 1, positions)
    ((section, _),) = find_sections(model, [site], target).values()
    readout = readout_for(model.config.hidden_size)
    closed = section.gram_pass(model, batches, site, target, readout, forward=hf.forward,
                               mask=hf.mask, progress=False)  # fmt: skip
    assert_gram(closed, exact_gram(model, batches, site, target, readout, hf.forward, hf.mask))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("positions", [None, "last"])
def test_hf_norms_and_mlps_on_padded_batches_equal_exact_probes(family, positions):
    """The norm and MLP of a layer and the final norm and unembedding: a pass of their own,
    padding no sample."""
    from degen_hooks.families import hf
    from degen_hooks.families.transformers import find_sections

    from .test_hf import build, padded_batches
    from .test_hf_sections import float64_norms

    model = float64_norms(build(family))
    sites = hf.decoder_sites(model, ["resid_mid", "resid_post"], layers=[1], positions=positions)
    found = find_sections(model, sites, None, positions)
    batches = padded_batches()
    for site, target in zip(sites, [sites[1], None], strict=True):
        section, _ = found[site.key]
        readout = readout_for(section.d_out, seed=len(site.key))
        out = target or dh.Site("", positions=positions)
        closed = section.gram_pass(model, batches, site, out, readout, forward=hf.forward,
                                   mask=hf.mask, progress=False)  # fmt: skip
        kw = {} if target else {"target_positions": positions}
        exact = exact_gram(model, batches, site, target, readout, hf.forward, hf.mask, **kw)
        assert_gram(closed, exact)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.filterwarnings("ignore:Site .* has 52 samples:UserWarning")
def test_hf_build_on_padded_batches_equals_backward_passes(family):
    """Every pair in closed form (attention, norm and MLP, the unembedding) on padded
    batches: the same bases as backward passes under the same mask."""
    from degen_hooks.families import hf

    from .test_hf import build, padded_batches
    from .test_hf_sections import float64_norms

    model = float64_norms(build(family))
    sites = hf.decoder_sites(model, ["resid_pre", "resid_mid", "mlp_hidden", "resid_post"])
    assert_closed_build(model, sites, padded_batches(), hf.forward, hf.mask)


def test_hf_attention_refuses_a_mask_the_model_was_not_given():
    """A mask that is not the model's attention_mask would give another pattern: refused
    (with left padding: right padding hides no key from a real token's causal view)."""
    from degen_hooks.families import hf
    from degen_hooks.families.transformers import find_sections

    from .test_hf import build, padded_batches
    from .test_hf_sections import attention_pair

    model = build("llama")
    site, target = attention_pair(model, 1, (None, None))
    ((section, _),) = find_sections(model, [site], target).values()
    unpadded = [{"input_ids": batch["input_ids"]} for batch in padded_batches()]
    with pytest.raises(ValueError, match="differs from the closed form's.*mask="):
        section.gram_pass(model, unpadded, site, target, forward=hf.forward,
                          mask=lambda batch: padded_batches()[1]["attention_mask"].bool(),
                          progress=False)  # fmt: skip


# -- TransformerLens ------------------------------------------------------------------------
def tl_padded(rotary: bool = False, seed: int = 5) -> list[dict[str, torch.Tensor]]:
    """A right-padded batch, and (without rotary embeddings, which TransformerLens rotates
    at shifted positions under left padding) a left-padded one."""
    gen = torch.Generator().manual_seed(seed)
    right = torch.ones(6, N_CTX, dtype=torch.long)
    right[1, 3:], right[2, 1:], right[4, 4:] = 0, 0, 0
    left = torch.ones(6, N_CTX, dtype=torch.long)
    left[0, :2], left[3, :4], left[5, :1] = 0, 0, 0
    masks = [right] if rotary else [right, left]
    return [
        {"tokens": torch.randint(0, D_VOCAB, (6, N_CTX), generator=gen), "mask": mask}
        for mask in masks
    ]


def tl_forward(model, batch):
    return model(batch["tokens"], attention_mask=batch["mask"])


def tl_mask(batch):
    return batch["mask"].bool()


@pytest.mark.parametrize("positions", POSITIONS, ids=POSITION_IDS)
@pytest.mark.parametrize("norm", [None, "LN"], ids=["nonorm", "LN"])
def test_tl_attention_on_padded_batches_equals_exact_probes(family, build, positions, norm):
    model = build[family]("relu", norm)
    source, target_name = attention_section_sites(model, 1)
    site = dh.Site(source, positions=positions[0])
    target = dh.Site(target_name, positions=positions[1])
    section = attention_section(model, 1)
    batches, readout = tl_padded(), readout_for(model.cfg.d_model)
    closed = section.gram_pass(model, batches, site, target, readout, forward=tl_forward,
                               mask=tl_mask, progress=False)  # fmt: skip
    assert_gram(closed, exact_gram(model, batches, site, target, readout, tl_forward, tl_mask))


def test_tl_rotary_attention_on_right_padded_batches_equals_exact_probes(family):
    from tests.cases import tl_model

    if family != "hooked":
        pytest.skip("the bridge's rotary attention is covered on Hugging Face bridges")
    config = {**toy_config(), "positional_embedding_type": "rotary", "rotary_dim": 4}
    model = perturbed(tl_model(**config))
    source, target_name = attention_section_sites(model, 0)
    site, target = dh.Site(source), dh.Site(target_name, positions="last")
    batches, readout = tl_padded(rotary=True), readout_for(model.cfg.d_model)
    closed = attention_section(model, 0).gram_pass(
        model, batches, site, target, readout, forward=tl_forward, mask=tl_mask, progress=False
    )
    assert_gram(closed, exact_gram(model, batches, site, target, readout, tl_forward, tl_mask))


def test_tl_build_on_padded_batches_equals_backward_passes(family, build):
    """Attention, the norm and MLP, W_out and the unembedding, all in closed form."""
    model = build[family]("gelu", "LN")
    kinds = ["hook_resid_pre", "hook_resid_mid", "mlp.hook_post", "hook_resid_post"]
    sites = [f"blocks.1.{kind}" for kind in kinds]  # the last one to the logits
    assert_closed_build(model, sites, tl_padded(), tl_forward, tl_mask)


def test_a_section_whose_gram_pass_takes_no_mask_is_refused_one():
    """A section written before gram_pass took mask= would count padding: refused before
    any pass, with what to do."""
    from types import SimpleNamespace

    from degen_hooks.families import hf
    from degen_hooks.families.transformers import find_sections

    from .test_hf import build, padded_batches

    model = build("gpt2")
    sites = hf.decoder_sites(model, ["resid_mid", "mlp_hidden"], layers=[1])
    ((section, _),) = find_sections(model, sites[:1], sites[1]).values()

    def gram_pass(model, data, site, target, readout=None, *, forward=None, progress=True):
        return section.gram_pass(model, data, site, target, readout, forward=forward)

    old = SimpleNamespace(gram_pass=gram_pass, edge_batch=section.edge_batch)
    with pytest.raises(ValueError, match=r"no padding mask \(no mask= parameter\).*sections=None"):
        dh.build_bases(model, sites, padded_batches(), sections={sites[0].key: (old, None)},
                       forward=hf.forward, mask=hf.mask, progress=False)  # fmt: skip


def test_rotary_on_a_padded_hugging_face_bridge(float64_softmax):  # noqa: F811
    """Right padding: a bridge rotates the real tokens at 0 .. n-1, and the closed form masks
    the padding keys as its Hugging Face attention does. Left padding: the bridge rotates
    each row at its own positions, which one rotation per position cannot follow: refused."""
    from .test_attention_section import HF_ROTARY, hf_bridge

    model = hf_bridge(*HF_ROTARY["llama-yarn"][:2])
    right, left = tl_padded()
    source, target_name = attention_section_sites(model, 1)
    site, target = dh.Site(source), dh.Site(target_name, positions="last")
    section, readout = attention_section(model, 1), readout_for(16)
    run = {"forward": tl_forward, "mask": tl_mask, "progress": False}
    closed = section.gram_pass(model, [right], site, target, readout, **run)
    assert_gram(closed, exact_gram(model, [right], site, target, readout, tl_forward, tl_mask))
    with pytest.raises(ValueError, match="differ across the batch"):
        section.gram_pass(model, [left], site, target, readout, **run)


@pytest.mark.parametrize("positions", [None, "last"])
def test_tl_mlp_section_gram_pass_on_padded_batches(plain_model, positions):
    """An MLP section's own pass (``gram_pass``) collects its derivative moments over real
    tokens only, as ``build_bases`` does in its activation pass."""
    from degen_hooks.transformer_lens import mlp_section, mlp_section_sites

    source, pre, target = mlp_section_sites(plain_model, 1)
    section = mlp_section(plain_model, 1).with_pre(pre)
    site = dh.Site(source, positions=positions)
    out = dh.Site(target, positions=positions)
    batches, readout = tl_padded(), readout_for(plain_model.cfg.d_model)
    closed = section.gram_pass(plain_model, batches, site, out, readout, forward=tl_forward,
                               mask=tl_mask, progress=False)  # fmt: skip
    exact = exact_gram(plain_model, batches, site, out, readout, tl_forward, tl_mask)
    assert_gram(closed, exact)
