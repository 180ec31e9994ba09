"""Closed forms of language-model blocks on TransformerLens models (#16): norms before the
MLP, gated MLPs, MLP-internal sites, the final norm and unembedding.

Each section's Gram equals the Gram of exact backward probes at rtol 1e-10 (float64, random
read-outs, perturbed weights so that gains, biases and layouts matter), on
``HookedTransformer`` and ``TransformerBridge``; ``build_bases(sections="auto")`` finds them
and equals the backward passes end to end.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import degen_hooks as dh
from degen_hooks.normed_section import NormedMLPSection
from degen_hooks.transformer_lens import (
    block_mlp_section,
    find_sections,
    mlp_output_section,
    unembed_section,
)
from tests.reference import assert_same_bases, assert_same_edges

from .conftest import BUILDERS, D_VOCAB, N_CTX, perturbed, toy_config

F64 = torch.float64
ARCHITECTURES = {  # name -> config overrides
    "gpt2": dict(act_fn="gelu_new", normalization_type="LN"),
    "llama": dict(act_fn="silu", normalization_type="RMS", gated_mlp=True),
    "gqa-rotary": dict(
        act_fn="silu",
        normalization_type="RMS",
        gated_mlp=True,
        n_key_value_heads=1,
        positional_embedding_type="rotary",
        rotary_dim=4,
    ),  # fmt: skip
    "gqa": dict(
        act_fn="silu",
        normalization_type="RMS",
        gated_mlp=True,
        n_heads=4,
        d_head=2,
        n_key_value_heads=2,
    ),  # fmt: skip
    "plain": dict(act_fn="relu", normalization_type=None),
    "geglu-nonorm": dict(act_fn="gelu", normalization_type=None, gated_mlp=True),
    "lnpre": dict(act_fn="gelu", normalization_type="LNPre"),
}


def build(family: str, architecture: str):
    config = {**toy_config(), **ARCHITECTURES[architecture]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if family == "hooked":
            from transformer_lens import HookedTransformer, HookedTransformerConfig

            model = HookedTransformer(HookedTransformerConfig(**config, dtype=F64))
        else:
            from transformer_lens.model_bridge import TransformerBridge

            model = TransformerBridge.boot_native(config, dtype=F64)
            _norms_in_float64(model)
    return perturbed(model, 5)


def _norms_in_float64(model) -> None:
    """The bridge's Llama-style RMSNorm takes the variance in float32 whatever the dtype (as
    Hugging Face's does): the model's own Jacobian is then exact to ~1e-7 only. Compute it in
    the input's dtype, so that exact probes test the closed form at float64 precision."""

    def forward(self, x):
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed * self.weight if hasattr(self, "weight") else normed

    for module in model.modules():
        if type(module).__name__ in ("NativeRMSNorm", "NativeRMSNormPre"):
            module.forward = forward.__get__(module)


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, D_VOCAB, (7, N_CTX), generator=torch.Generator().manual_seed(4))


def readout_for(width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(width, max(1, width - 3), generator=torch.Generator().manual_seed(seed),
                       dtype=F64)  # fmt: skip


def exact(model, tokens, site, readout, **target):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dh.transformer_lens.ProcessedWeightsWarning)
        with dh.collect(model, [site], jacobians="exact", readout=readout, **target) as run:
            run.backward(model(tokens))
    return run.stats[site.key].grads.second_moment()


def assert_gram(actual, expected, rtol=1e-10):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


def gram(section, model, tokens, site, target, readout):
    return section.gram_pass(model, list(tokens.split(4)), site, target, readout, progress=False)


PAIRS = [("hook_resid_post", None), ("mlp.hook_pre", None), ("mlp.hook_post", None),
         ("hook_resid_post", "last")]  # fmt: skip


@pytest.mark.parametrize("family", list(BUILDERS))
@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
@pytest.mark.parametrize(("output", "positions"), PAIRS)
def test_block_mlp_section_equals_exact_probes(family, architecture, output, positions, tokens):
    model = build(family, architecture)
    section = block_mlp_section(model, 1, output=output.removeprefix("mlp."))
    site = dh.Site("blocks.1.hook_resid_mid", positions=positions)
    target = dh.Site(f"blocks.1.{output}", positions=positions)
    width = section.d_out
    readout = readout_for(width)
    closed = gram(section, model, tokens, site, target, readout)
    assert closed.n_samples == tokens.shape[0] * (1 if positions else N_CTX)
    assert_gram(closed.second_moment(), exact(model, tokens, site, readout, target=target))


@pytest.mark.parametrize("family", list(BUILDERS))
@pytest.mark.parametrize("architecture", ["gpt2", "llama", "plain"])
@pytest.mark.parametrize("source", ["hook_post", "hook_pre"])
def test_mlp_output_section_equals_exact_probes(family, architecture, source, tokens):
    model = build(family, architecture)
    if source == "hook_pre" and ARCHITECTURES[architecture].get("gated_mlp"):
        with pytest.raises(ValueError, match="[Gg]ated"):
            mlp_output_section(model, 0, source=source)
        return
    section = mlp_output_section(model, 0, source=source)
    site, target = dh.Site(f"blocks.0.mlp.{source}"), dh.Site("blocks.0.hook_resid_post")
    readout = readout_for(section.w_out.shape[0], 1)
    derivs = None
    if not section.is_linear:
        with dh.collect(model, [site], derivatives={site.key: section.activation}) as run:
            model(tokens)
        derivs = run.stats[site.key].derivs
    closed = section.jacobian_gram(derivs, readout)
    assert_gram(closed, exact(model, tokens, site, readout, target=target))


@pytest.mark.parametrize("family", list(BUILDERS))
@pytest.mark.parametrize("architecture", ["gpt2", "llama", "plain", "lnpre"])
@pytest.mark.parametrize("positions", [None, "last"])
def test_unembed_section_equals_exact_probes(family, architecture, positions, tokens):
    model = build(family, architecture)
    section = unembed_section(model)
    assert isinstance(section, NormedMLPSection) == (architecture != "plain")
    site = dh.Site("blocks.1.hook_resid_post", positions=positions)
    readout = readout_for(D_VOCAB, 2)
    expected = exact(model, tokens, site, readout, target_positions=positions)
    if isinstance(section, NormedMLPSection):
        target = dh.Site("", positions=positions)
        closed = gram(section, model, tokens, site, target, readout).second_moment()
    else:
        closed = section.jacobian_gram(None, readout)
    assert_gram(closed, expected)


def lm_sites(n_layers: int = 2, mlp: str | None = "mlp.hook_post") -> list[dh.Site]:
    hooks = ["hook_resid_pre", "hook_resid_mid", *([mlp] if mlp else []), "hook_resid_post"]
    sites = [dh.Site(f"blocks.{layer}.{hook}") for layer in range(n_layers) for hook in hooks]
    return [s for s in sites if s.name != "blocks.0.hook_resid_post"]  # = blocks.1's resid_pre


def test_find_sections_covers_a_gpt2_and_a_llama_block(family):
    gpt2 = find_sections(build(family, "gpt2"), lm_sites())
    names = {key: type(section).__name__ for key, (section, _) in gpt2.items()}
    assert names == {
        "blocks.0.hook_resid_pre": "AttentionSection",
        "blocks.0.hook_resid_mid": "NormedMLPSection",  # -> mlp.hook_post
        "blocks.0.mlp.hook_post": "MLPSection",  # -> hook_resid_post (= blocks.1 resid_pre)
        "blocks.1.hook_resid_pre": "AttentionSection",
        "blocks.1.hook_resid_mid": "NormedMLPSection",
        "blocks.1.mlp.hook_post": "MLPSection",
        "blocks.1.hook_resid_post": "NormedMLPSection",  # final norm + unembedding
    }
    llama = find_sections(build(family, "llama"), lm_sites(mlp=None))
    assert type(llama["blocks.1.hook_resid_mid"][0]).__name__ == "NormedMLPSection"
    assert llama["blocks.1.hook_resid_mid"][0].gated


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_auto_build_equals_backward_passes(family, architecture, tokens):
    """Every pair of a GPT-2 block in closed form (no backward pass), a Llama block's MLP."""
    model = build(family, architecture)
    sites = lm_sites()
    data = list(tokens.split(4))
    auto = dh.build_bases(model, sites, data, progress=False)
    probed = dh.build_bases(model, sites, data, sections=None, progress=False)
    closed = [label for label in auto.timings_ if label.endswith("(closed form)")]
    if architecture == "gpt2":
        assert len(closed) == len(sites)  # no backward pass at all
    assert "jacobians blocks.1.hook_resid_mid (closed form)" in closed
    assert auto.sites_ == probed.sites_
    assert_same_bases(auto, probed)


@pytest.fixture(params=list(BUILDERS))
def family(request) -> str:
    return request.param


@pytest.mark.parametrize("family", list(BUILDERS))
@pytest.mark.parametrize("architecture", ["gqa", "gqa-rotary"])
@pytest.mark.parametrize("positions", [(None, None), (None, "last")])
def test_grouped_query_attention_equals_exact_probes(family, architecture, positions, tokens):
    """Grouped-query attention (#16): each of 2 key/value heads serves 2 of 4 query heads."""
    from degen_hooks.transformer_lens import attention_section

    model = build(family, architecture)
    section = attention_section(model, 1)
    assert (section.rotary is not None) == ("rotary" in architecture)
    site = dh.Site("blocks.1.hook_resid_pre", positions=positions[0])
    target = dh.Site("blocks.1.hook_resid_mid", positions=positions[1])
    readout = readout_for(8, 3)
    closed = gram(section, model, tokens, site, target, readout)
    assert_gram(closed.second_moment(), exact(model, tokens, site, readout, target=target))


@pytest.mark.parametrize("family", list(BUILDERS))
def test_grouped_query_attention_edges_equal_backward_passes(family, tokens):
    from degen_hooks.graph import InteractionGraph

    model = build(family, "gqa-rotary")
    sites = [dh.Site("blocks.1.hook_resid_pre"), dh.Site("blocks.1.hook_resid_mid")]
    data = list(tokens.split(4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        basis = dh.build_bases(model, sites, data, progress=False)
        closed = InteractionGraph().fit(model, basis, data, progress=False)
        backward = InteractionGraph().fit(model, basis, data, sections=None, progress=False)
    assert closed.closed_form_ == closed.pairs_
    for pair in closed.pairs_:
        expected = backward.edges_[pair]
        torch.testing.assert_close(
            closed.edges_[pair], expected, rtol=1e-10, atol=1e-14 * float(expected.max())
        )


@pytest.mark.parametrize("family", list(BUILDERS))
@pytest.mark.parametrize("architecture", ["gpt2", "llama", "plain"])
@pytest.mark.parametrize("hook", ["mlp.hook_post", "hook_mlp_out"])
def test_a_hook_that_changes_the_mlp_is_refused_not_ignored(family, architecture, hook, tokens):
    """A hook of the user's (steering, ablation, patching) on the MLP's hidden activation or
    on its output makes the model differ from the section's weights. The section given by
    hand (``find_sections``' own, a plain MLP's too) refuses the batch instead of returning
    the unhooked model's Jacobians (without the hook the checks pass: hook_post is the
    section's h, plus b_in after a gated product; hook_resid_post x + h W_out + b_out);
    ``build_bases`` and the graph, finding sections themselves, leave the hooked pair to
    backward passes, which follow the hook, and say so."""
    from degen_hooks.graph import InteractionGraph

    model = build(family, architecture)
    site, target = dh.Site("blocks.1.hook_resid_mid"), dh.Site("blocks.1.hook_resid_post")
    section, pre = find_sections(model, [site, target])[site.key]
    data = list(tokens.split(4))
    assert pre is None  # the section runs (and checks) a pass of its own
    gram(section, model, tokens, site, target, None)  # unhooked: accepted
    basis = dh.build_bases(model, [site, target], data, progress=False)
    unhooked = InteractionGraph().fit(model, basis, data, progress=False)
    assert unhooked.closed_form_ == unhooked.pairs_
    model.add_hook(f"blocks.1.{hook}", lambda act, hook: act * 1.5)
    try:
        with pytest.raises(ValueError, match=r"(hidden activation|output).*differs.*hook"):
            gram(section, model, tokens, site, target, None)
        assert_follows_the_hook(model, [site, target], data, basis)
    finally:
        model.reset_hooks()


def assert_follows_the_hook(model, sites, data, basis, warned=True):
    """``sections="auto"`` leaves the hooked pair to backward passes (with a warning): the
    bases and edges equal those of ``sections=None``."""
    from degen_hooks.graph import InteractionGraph

    expect = (
        pytest.warns(UserWarning, match="hook of yours") if warned else warnings.catch_warnings()
    )
    with expect:
        auto = dh.build_bases(model, sites, data, progress=False)
    assert not any(label.endswith("(closed form)") for label in auto.timings_ if "mid" in label)
    assert_same_bases(auto, dh.build_bases(model, sites, data, sections=None, progress=False))
    with pytest.warns(UserWarning, match="hook of yours"):
        graph = InteractionGraph().fit(model, basis, data, progress=False)
    assert graph.closed_form_ == []
    assert_same_edges(
        graph, InteractionGraph().fit(model, basis, data, sections=None, progress=False)
    )


@pytest.mark.parametrize("family", list(BUILDERS))
def test_a_hook_that_keeps_values_but_cuts_the_gradient_is_followed(family, tokens):
    """``act.detach()`` on the norm's scale (a frozen LayerNorm) leaves every value as it was,
    so no check of values sees it, but it changes the Jacobian: ``sections="auto"`` sees the
    hook itself and leaves the pair to backward passes, which follow it."""
    model = build(family, "gpt2")
    sites = [dh.Site("blocks.1.hook_resid_mid"), dh.Site("blocks.1.hook_resid_post")]
    data = list(tokens.split(4))
    basis = dh.build_bases(model, sites, data, progress=False)
    model.add_hook("blocks.1.ln2.hook_scale", lambda act, hook: act.detach())
    try:
        assert_follows_the_hook(model, sites, data, basis)
    finally:
        model.reset_hooks()
