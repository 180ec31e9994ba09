"""``build_bases(sections="auto")`` on TransformerLens models: every closed form it picks."""

from __future__ import annotations

import warnings

import pytest

import degen_hooks as dh
from degen_hooks.transformer_lens import find_sections
from tests.cases import tl_model
from tests.reference import assert_same_bases

from .conftest import requires_hooked, toy_config


def residual_sites(positions=None) -> list[dh.Site]:
    return [
        dh.Site(f"blocks.{layer}.{hook}", positions=positions)
        for layer in (0, 1)
        for hook in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")
    ]


def kinds(found) -> dict[str, str]:
    return {key: type(section).__name__ for key, (section, _) in found.items()}


def test_finds_every_section_of_a_model_without_norms(build, family):
    model = build[family]("relu", None)
    found = find_sections(model, residual_sites())
    assert kinds(found) == {
        "blocks.0.hook_resid_pre": "AttentionSection",
        # The plain MLP: a pass of its own, which checks hook_post and hook_resid_post
        "blocks.0.hook_resid_mid": "NormedMLPSection",
        # blocks.0.hook_resid_post -> blocks.1.hook_resid_pre is the identity: no section
        "blocks.1.hook_resid_pre": "AttentionSection",
        "blocks.1.hook_resid_mid": "NormedMLPSection",
        "blocks.1.hook_resid_post": "MLPSection",  # the unembedding, linear
    }
    mlp, pre = found["blocks.1.hook_resid_mid"]
    assert (mlp.norm, pre, mlp.hidden.name) == (None, None, "blocks.1.mlp.hook_post")
    assert found["blocks.1.hook_resid_post"][0].is_linear


def test_leaves_out_what_has_no_closed_form(build, family):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dh.transformer_lens.ProcessedWeightsWarning)
        normed = build[family]("relu", "LN")
    found = find_sections(normed, residual_sites())
    # Attention after ln1, the MLP after ln2 and the unembedding after ln_final (#16).
    assert kinds(found) == {
        "blocks.0.hook_resid_pre": "AttentionSection",
        "blocks.0.hook_resid_mid": "NormedMLPSection",
        "blocks.1.hook_resid_pre": "AttentionSection",
        "blocks.1.hook_resid_mid": "NormedMLPSection",
        "blocks.1.hook_resid_post": "NormedMLPSection",
    }
    plain = build[family]("relu", None)
    last = [dh.Site("blocks.0.hook_resid_mid"), dh.Site("blocks.0.hook_resid_post", positions=-1)]
    assert find_sections(plain, last) == {}  # the MLP acts per position: positions must agree
    output_last = find_sections(plain, [dh.Site("blocks.1.hook_resid_post")], None, "last")
    assert output_last == {}
    skipping = [dh.Site("blocks.0.hook_resid_pre"), dh.Site("blocks.1.hook_resid_mid")]
    assert find_sections(plain, skipping) == {}


@pytest.mark.parametrize("positions", [None, "last"])
def test_auto_build_equals_backward_passes(plain_model, tokens, positions):
    sites = residual_sites(positions)
    if positions == "last":
        sites[0] = dh.Site("blocks.0.hook_resid_pre")  # attention reads every position
    data = list(tokens.split(3))
    common = {"output_positions": positions, "progress": False}
    auto = dh.build_bases(plain_model, sites, data, **common)
    probed = dh.build_bases(plain_model, sites, data, sections=None, **common)
    closed = [label for label in auto.timings_ if label.endswith("(closed form)")]
    assert len(closed) == 5 and not any("closed" in label for label in probed.timings_)
    assert auto.sites_ == probed.sites_
    assert_same_bases(auto, probed)


@requires_hooked
@pytest.mark.parametrize("norm", [None, "LN", "RMS"])
def test_closed_forms_on_an_fsdp2_sharded_model(tokens, shard, norm):
    """FSDP2 leaves DTensor shards in the weights: the sections gather them whole, and a
    build with no backward pass equals the unsharded model's."""
    config = toy_config("gelu", norm)
    model, plain = tl_model(**config), tl_model(**config)
    plain.load_state_dict(model.state_dict())
    model = shard(model, list(model.blocks))
    assert type(model.blocks[0].attn.W_Q).__name__ == "DTensor"
    hooks = ("hook_resid_pre", "hook_resid_mid", "mlp.hook_post")
    sites = [f"blocks.{layer}.{hook}" for layer in (0, 1) for hook in hooks]
    sites.append("blocks.1.hook_resid_post")
    data = list(tokens.split(3))
    sharded = dh.build_bases(model, sites, data, progress=False)
    assert all(label.endswith("(closed form)") for label in sharded.timings_ if "jac" in label)
    assert_same_bases(sharded, dh.build_bases(plain, sites, data, progress=False))
