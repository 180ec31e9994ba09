"""Writes reach every consumer on a TransformerLens bridge, as on ``HookedTransformer``.

On a ``TransformerBridge``, ``blocks.{i}.hook_resid_mid`` is the input of ``ln2``: a tensor
replaced there reached the MLP branch but not the skip connection around it, so ablations,
edges and every other write at the residual stream's middle silently differed from
``HookedTransformer``. These tests write at every residual, MLP and attention site of a bridge
and of a ``HookedTransformer`` with the same weights and compare the outputs (rtol 1e-10); on
TransformerLens 4 (no ``HookedTransformer``) they check the residual identity
``resid_post = resid_mid + mlp_out`` under a write.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import degen_hooks as dh
from degen_hooks._hooks import SiteHook
from degen_hooks.graph import InteractionGraph
from degen_hooks.sites import resolve_bypass, resolve_sites
from degen_hooks.zoo import _bridge_layout

from .conftest import HAS_HOOKED, build_bridge, build_hooked, requires_hooked, toy_config

SITES = [
    "hook_embed",
    "hook_pos_embed",
    "blocks.0.hook_resid_pre",
    "blocks.0.hook_attn_out",
    "blocks.0.hook_resid_mid",
    "blocks.0.mlp.hook_pre",
    "blocks.0.mlp.hook_post",
    "blocks.0.hook_mlp_out",
    "blocks.0.hook_resid_post",
    "blocks.1.hook_resid_mid",
    "blocks.1.attn.hook_z",
    "blocks.1.attn.hook_v",
    "blocks.1.hook_resid_post",
]


def twins(act_fn: str = "relu", norm: str | None = None) -> tuple[torch.nn.Module, ...]:
    """A ``HookedTransformer`` and a bridge with the same float64 weights."""
    hooked = build_hooked(act_fn, norm)
    bridge = build_bridge(act_fn, norm)
    weights = hooked.state_dict()
    state = _bridge_layout(weights, toy_config())
    for key, value in weights.items():  # LayerNorm gains and biases: w, b -> weight, bias
        if key.endswith((".ln1.w", ".ln2.w", "ln_final.w", ".ln1.b", ".ln2.b", "ln_final.b")):
            state[key[:-1] + ("weight" if key.endswith("w") else "bias")] = value
    result = bridge.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    return hooked, bridge.eval()


VARIANTS = [("relu", None), ("gelu", "LN")]


def shifted(model, site: str, tokens, shift: torch.Tensor) -> torch.Tensor:
    """The model output with ``shift`` added at ``site`` through the library's writes."""
    ((resolved, module),) = resolve_sites(model, [site])
    bypass = resolve_bypass(model, resolved)

    def write(act: torch.Tensor) -> torch.Tensor:
        # Per-head hooks are (batch, pos, heads, d_head) on HookedTransformer and
        # (batch, pos, heads * d_head) on a bridge: the same shift either way.
        return act + shift.reshape(act.shape[2:]).to(act)

    with SiteHook(model, resolved, module, write, writes=True, bypass=bypass), torch.no_grad():
        return model(tokens)


@requires_hooked
@pytest.mark.parametrize("variant", VARIANTS, ids=["relu", "gelu-LN"])
@pytest.mark.parametrize("site", SITES)
def test_a_write_at_every_site_matches_hooked_transformer(site, variant, tokens):
    hooked, bridge = twins(*variant)
    with torch.no_grad():
        torch.testing.assert_close(bridge(tokens), hooked(tokens), rtol=1e-10, atol=1e-10)
    generator = torch.Generator().manual_seed(7)
    shift = torch.randn(_width(bridge, site, tokens), generator=generator).double()
    expected = shifted(hooked, site, tokens, shift)
    assert not torch.allclose(expected, hooked(tokens))  # the write changes the output
    torch.testing.assert_close(shifted(bridge, site, tokens, shift), expected, rtol=1e-10, atol=0)


@requires_hooked
@pytest.mark.parametrize("site", SITES)
def test_differentiating_through_a_write_matches_hooked_transformer(site, tokens):
    """Gradients of the output with respect to what is written at the site (as edges take)."""
    grads = {}
    models = twins("gelu", "LN")
    width = _width(models[1], site, tokens)  # the bridge's: heads * d_head for per-head hooks
    for name, model in zip(("hooked", "bridge"), models, strict=True):
        ((resolved, module),) = resolve_sites(model, [site])
        leaf = torch.zeros(width, dtype=torch.float64, requires_grad=True)

        def write(act: torch.Tensor, leaf: torch.Tensor = leaf) -> torch.Tensor:
            return act + leaf.reshape(act.shape[2:])

        bypass = resolve_bypass(model, resolved)
        with SiteHook(model, resolved, module, write, writes=True, bypass=bypass):
            out = model(tokens)
        weights = torch.linspace(-1, 1, out.shape[-1], dtype=torch.float64)
        (grads[name],) = torch.autograd.grad((out * weights).sum(), leaf)
    assert grads["hooked"].abs().max() > 0
    torch.testing.assert_close(grads["bridge"], grads["hooked"], rtol=1e-10, atol=1e-12)


def _width(model, site, tokens) -> int:
    with dh.collect(model, [site]) as run, torch.no_grad():
        model(tokens)
    return run.stats[site].acts.d


@requires_hooked
def test_ablation_and_edges_at_resid_mid_match_hooked_transformer(tokens):
    hooked, bridge = twins()
    sites = ["blocks.0.hook_resid_mid", "blocks.0.hook_resid_post"]
    with dh.collect(hooked, sites) as run, torch.no_grad():
        hooked(tokens)
    pca = dh.InteractionBasis(variant="pca").fit(run.stats)
    outputs = {}
    for name, model in (("hooked", hooked), ("bridge", bridge)):
        with dh.ablate(model, pca, "blocks.0.hook_resid_mid", keep=3), torch.no_grad():
            outputs[name] = model(tokens)
    with torch.no_grad():
        assert not torch.allclose(outputs["hooked"], hooked(tokens))
    torch.testing.assert_close(outputs["bridge"], outputs["hooked"], rtol=1e-10, atol=0)
    edges = {
        name: InteractionGraph().fit(model, pca, [tokens], progress=False).edges_[tuple(sites)]
        for name, model in (("hooked", hooked), ("bridge", bridge))
    }
    torch.testing.assert_close(edges["bridge"], edges["hooked"], rtol=1e-10, atol=0)


def test_a_write_at_resid_mid_reaches_the_skip_connection(tokens):
    """Any TransformerLens: resid_post = resid_mid + mlp_out holds with resid_mid written."""
    bridge = build_bridge("gelu", "LN")
    site = "blocks.0.hook_resid_mid"
    ((resolved, module),) = resolve_sites(bridge, [site])
    read = {}
    readers = [
        (name, *resolve_sites(bridge, [name])[0])
        for name in ("blocks.0.hook_mlp_out", "blocks.0.hook_resid_post")
    ]
    shift = torch.linspace(-1, 1, 8, dtype=torch.float64)

    def write(act: torch.Tensor) -> torch.Tensor:
        read["written"] = act + shift
        return read["written"]

    hooks = [
        SiteHook(bridge, s, m, lambda act, name=name: read.__setitem__(name, act.clone()))
        for name, s, m in readers
    ]
    bypass = resolve_bypass(bridge, resolved)
    assert bypass is not None
    with SiteHook(bridge, resolved, module, write, writes=True, bypass=bypass):
        with hooks[0], hooks[1], torch.no_grad():
            bridge(tokens)
    torch.testing.assert_close(
        read["blocks.0.hook_resid_post"],
        read["written"] + read["blocks.0.hook_mlp_out"],
        rtol=1e-12,
        atol=1e-12,
    )


def test_non_sequential_blocks_refuse_writes_at_resid_mid():
    bridge = build_bridge("relu", None)
    block = bridge.blocks[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        block.mlp_reads_resid_directly = True
    try:
        ((resolved, _),) = resolve_sites(bridge, ["blocks.0.hook_resid_mid"])
        with pytest.raises(dh.SiteNotWritableError, match="blocks.0.hook_resid_pre"):
            resolve_bypass(bridge, resolved)
    finally:
        block.mlp_reads_resid_directly = False


ATTENTION_INSIDE = [
    "blocks.0.attn.hook_attn_scores",
    "blocks.0.attn.hook_pattern",
    "blocks.1.attn.hook_q",
    "blocks.1.attn.hook_k",
]


def noisy(model, site: str, tokens) -> torch.Tensor:
    """The output with seeded noise added at ``site`` (every entry)."""
    ((resolved, module),) = resolve_sites(model, [site])
    bypass = resolve_bypass(model, resolved)  # may refuse
    generator = torch.Generator().manual_seed(5)

    def write(act: torch.Tensor) -> torch.Tensor:
        return act + torch.randn(act.shape, generator=generator, dtype=act.dtype)

    with SiteHook(model, resolved, module, write, writes=True, bypass=bypass), torch.no_grad():
        return model(tokens)


@pytest.mark.parametrize("site", ATTENTION_INSIDE)
def test_writes_inside_attention_reach_the_output_or_are_refused(site, tokens):
    """Some bridges fire a hook beside an attention kernel that never reads it: a write there
    would silently change nothing, so it is refused, naming where to write instead."""
    _, bridge = twins("gelu", "LN") if HAS_HOOKED else (None, build_bridge("gelu", "LN"))
    try:
        written = noisy(bridge, site, tokens)
    except dh.SiteNotWritableError as err:
        assert "attn.hook_z" in str(err)
        return
    with torch.no_grad():
        assert not torch.allclose(written, bridge(tokens))
    if HAS_HOOKED:  # and then it is the write HookedTransformer makes
        hooked, _ = twins("gelu", "LN")
        shapes_agree = True
        try:
            expected = noisy(hooked, site, tokens)
        except RuntimeError:
            shapes_agree = False  # per-head layouts differ (q, k); outputs compared above
        if shapes_agree:
            torch.testing.assert_close(written, expected, rtol=1e-10, atol=1e-12)


def test_the_write_check_is_invisible_to_a_collection_around_it(tokens):
    bridge = build_bridge("relu", "LN")
    with dh.collect(bridge, ["blocks.0.hook_resid_post"]) as run, torch.no_grad():
        bridge(tokens)
        ((resolved, _),) = resolve_sites(bridge, ["blocks.1.hook_resid_mid"])
        assert resolve_bypass(bridge, resolved) == bridge.blocks[1].hook_out  # checked here
        bridge(tokens)
    assert run.stats["blocks.0.hook_resid_post"].n_batches == 2
    assert run.stats["blocks.0.hook_resid_post"].acts.n_samples == 2 * tokens.numel()
