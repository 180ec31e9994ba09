"""The closed-form Jacobian Gram of TransformerLens attention layers.

Checked against two independent references: the exact-probe Grams of ``dh.collect`` (both
model families, residual or not, every combination of input and output positions) and a
brute-force ``torch.func.jacrev`` of the attention block over stacked samples.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch

import degen_hooks as dh
from degen_hooks.transformer_lens import attention_section, attention_section_sites
from tests.cases import tl_model
from tests.reference import assert_same_bases, assert_spectrum_close

from .conftest import (
    D_VOCAB,
    N_CTX,
    config_only,
    hook_state,
    perturbed,
    requires_hooked,
    toy_config,
    warmed_up,
)

RTOL = 1e-10
POSITIONS = [(None, "last"), (None, None), ("last", "last"), (slice(1, 4), [0, 2]), (2, None)]


def readout(d_out: int = 8, r: int = 3) -> torch.Tensor:
    return torch.randn(d_out, r, generator=torch.Generator().manual_seed(4), dtype=torch.float64)


def exact_gram(model, tokens, site: dh.Site, target: dh.Site, read) -> dh.SecondMoment:
    with dh.collect(model, [site], jacobians="exact", target=target, readout=read) as run:
        model(tokens)
        run.backward()
    return run.stats[site.key].grads


@pytest.mark.parametrize("positions", POSITIONS, ids=[f"{i}->{o}" for i, o in POSITIONS])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "attn"])
@pytest.mark.parametrize("layer", [0, 1])
def test_equals_exact_probes(plain_model, tokens, residual, layer, positions):
    source, target = attention_section_sites(plain_model, layer, residual=residual)
    site, out = dh.Site(source, positions=positions[0]), dh.Site(target, positions=positions[1])
    section = attention_section(plain_model, layer, residual=residual)
    for read in (None, readout()):
        exact = exact_gram(plain_model, tokens, site, out, read)
        closed = section.gram_pass(plain_model, tokens.split(4), site, out, read, progress=False)
        assert closed.n_samples == exact.n_samples
        torch.testing.assert_close(
            closed.second_moment(), exact.second_moment(), rtol=RTOL, atol=1e-13
        )


@pytest.mark.parametrize("norm", ["LN", "LNPre", "RMS", "RMSPre"])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "attn"])
def test_norm_before_attention_equals_exact_probes(build, family, tokens, norm, residual):
    """The norm's Jacobian (recomputed from resid_pre) and its gain are part of the section."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dh.transformer_lens.ProcessedWeightsWarning)
        model = build[family]("gelu", norm)
        source, target = attention_section_sites(model, 1, residual=residual)
        site, out = dh.Site(source), dh.Site(target, positions=[1, 4])
        exact = exact_gram(model, tokens, site, out, readout())
    section = attention_section(model, 1, residual=residual)
    assert section.norm == norm and source.endswith("hook_resid_pre")
    closed = section.gram_pass(model, [tokens], site, out, readout(), progress=False)
    # The bridge's native RMSNorm rounds at the ~1e-7 level (its own hook_out differs from
    # x / rms(x) * w by 3e-7): the section follows the mathematical norm.
    closed, exact = closed.second_moment(), exact.second_moment()
    if family == "bridge" and norm.startswith("RMS"):
        assert (closed - exact).abs().max() <= 1e-6 * exact.abs().max()
    else:
        torch.testing.assert_close(closed, exact, rtol=RTOL, atol=1e-13)


@requires_hooked  # calls the HookedTransformer attention module directly
def test_equals_jacrev_over_stacked_samples(build, tokens):
    """Brute force: the full Jacobian of resid_mid[-1] w.r.t. resid_pre, one sample at a time."""
    model = build["hooked"]("relu", None)
    block = model.blocks[0]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    read = readout()
    reference = torch.zeros(8, 8, dtype=torch.float64)
    for x in cache["blocks.0.hook_resid_pre"]:

        def last(x: torch.Tensor) -> torch.Tensor:
            y = x[None] + block.attn(x[None], x[None], x[None])
            return y[0, -1] @ read  # (r,)

        jac = torch.func.jacrev(last)(x)  # (r, pos, d)
        for j in range(N_CTX):
            reference += jac[:, j].T @ jac[:, j]
    reference /= tokens.numel()
    section = attention_section(model, 0)
    site, out = (
        dh.Site("blocks.0.hook_resid_pre"),
        dh.Site("blocks.0.hook_resid_mid", positions="last"),
    )
    closed = section.gram_pass(model, [tokens], site, out, read, progress=False)
    torch.testing.assert_close(closed.second_moment(), reference, rtol=RTOL, atol=1e-13)


@pytest.mark.parametrize(
    "extra",
    [
        {"attn_only": True},
        # TransformerLens 4's native bridge has no ALiBi: HookedTransformer only.
        pytest.param({"positional_embedding_type": "alibi"}, marks=requires_hooked),
        pytest.param({"positional_embedding_type": "shortformer"}, marks=requires_hooked),
    ],
    ids=["attn_only", "alibi", "shortformer"],
)
def test_attention_only_and_alibi_models(extra):
    """Attention-only blocks map to hook_resid_post; ALiBi biases the scores by constants;
    shortformer position embeddings add constants to the input of q and k. Each batch's
    checks of q, k, v and the pattern accept them."""
    tokens = torch.randint(0, D_VOCAB, (5, N_CTX), generator=torch.Generator().manual_seed(5))
    model = tl_model(**{**toy_config(), "n_layers": 1, **extra})
    source, target = attention_section_sites(model, 0)
    assert target.endswith("hook_resid_post" if "attn_only" in extra else "hook_resid_mid")
    site, out = dh.Site(source), dh.Site(target, positions="last")
    exact = exact_gram(model, tokens, site, out, None)
    closed = attention_section(model, 0).gram_pass(model, [tokens], site, out, progress=False)
    torch.testing.assert_close(closed.second_moment(), exact.second_moment(), rtol=RTOL, atol=1e-13)


def rotary_model(family: str, **config) -> torch.nn.Module:
    """A perturbed float64 toy of ``family`` with ``config`` (rotary settings) on top."""
    config = {**toy_config(), "positional_embedding_type": "rotary", "rotary_dim": 4, **config}
    if family == "hooked":
        return perturbed(tl_model(**config))
    from transformer_lens.model_bridge import TransformerBridge

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return perturbed(TransformerBridge.boot_native(config, dtype=torch.float64))


@pytest.mark.parametrize("rotary_dim", [4, 2], ids=["full", "partial"])
@pytest.mark.parametrize("adjacent", [False, True], ids=["halves", "adjacent"])
@pytest.mark.parametrize("norm", [None, "LN"], ids=["nonorm", "LN"])
def test_rotary_attention_equals_exact_probes(family, tokens, rotary_dim, adjacent, norm):
    """q and k rotated per position (M_t): the scores' derivatives go through M_t^T. A native
    bridge hooks only the unrotated q and k: the section rotates them by its module's tables
    (always adjacent pairs there, whatever ``rotary_adjacent_pairs`` says)."""
    config = {**toy_config("gelu", norm), "rotary_dim": rotary_dim}
    model = rotary_model(family, **config, rotary_adjacent_pairs=adjacent)
    for residual in (True, False):
        source, target = attention_section_sites(model, 1, residual=residual)
        section = attention_section(model, 1, residual=residual)
        assert section.rotary is not None
        assert section.rotates == (family == "bridge")
        assert section.hooks[0].endswith("hook_q" if section.rotates else "hook_rot_q")
        assert_positions_equal_exact_probes(model, tokens, section, source, target)


def assert_positions_equal_exact_probes(model, tokens, section, source, target):
    """The section's Gram equals exact probes at three (input, output) position choices."""
    for positions in POSITIONS[:2] + POSITIONS[3:4]:
        site = dh.Site(source, positions=positions[0])
        out = dh.Site(target, positions=positions[1])
        exact = exact_gram(model, tokens, site, out, readout())
        closed = section.gram_pass(model, [tokens], site, out, readout(), progress=False)
        torch.testing.assert_close(
            closed.second_moment(), exact.second_moment(), rtol=RTOL, atol=1e-13
        )


@requires_hooked
@pytest.mark.parametrize("kv_heads", [None, 1], ids=["mha", "mqa"])
def test_qk_normed_rotary_attention_equals_exact_probes(tokens, kv_heads):
    """``use_qk_norm`` (Qwen 3 on a HookedTransformer): each head's q and k RMS-normed before
    the rotation. The section norms the raw ``hook_q``/``hook_k`` itself and checks both
    against the rotated hooks."""
    config = {**toy_config("silu", "RMS"), "use_qk_norm": True, "n_key_value_heads": kv_heads}
    model = rotary_model("hooked", **config, rotary_adjacent_pairs=False)
    for block in model.blocks:  # gains other than 1
        for norm in (block.attn.q_norm, block.attn.k_norm):
            norm.w.data = 1 + 0.3 * torch.randn_like(norm.w)
    for residual in (True, False):
        source, target = attention_section_sites(model, 1, residual=residual)
        section = attention_section(model, 1, residual=residual)
        assert section.qk_norm is not None and not section.rotates
        assert_positions_equal_exact_probes(model, tokens, section, source, target)


@requires_hooked
def test_rotary_with_offset_positions_is_refused(tokens):
    """Left padding makes TransformerLens rotate at shifted positions: refused, not wrong."""
    config = {**toy_config(), "positional_embedding_type": "rotary", "rotary_dim": 4}
    model = perturbed(tl_model(**config))
    source, target = attention_section_sites(model, 0)
    mask = torch.ones_like(tokens)
    mask[:, :2] = 0  # two padding tokens on the left

    def padded(model, batch):
        return model(batch, attention_mask=mask[: len(batch)])

    section = attention_section(model, 0)
    site, out = dh.Site(source), dh.Site(target, positions="last")
    with pytest.raises(ValueError, match="positions other than 0, 1, ..., n-1"):
        section.gram_pass(model, [tokens], site, out, forward=padded, progress=False)
    section.gram_pass(model, [tokens], site, out, progress=False)  # plain positions: fine


def test_rotary_at_shifted_positions_on_a_bridge_is_refused(tokens):
    """A bridge rotated by other position_ids than 0 .. n-1: its pattern is not the softmax of
    the q and k the section rotates, so the batch is refused, not wrong."""
    model = rotary_model("bridge")
    source, target = attention_section_sites(model, 0)
    shifted = (torch.arange(N_CTX) - 2).clamp(min=0)[None]  # as left padding would

    def moved(model, batch):
        return model(batch, position_ids=shifted.expand(len(batch), -1))

    section = attention_section(model, 0)
    site, out = dh.Site(source), dh.Site(target, positions="last")
    with pytest.raises(ValueError, match="positions other than 0, 1, ..., n-1"):
        section.gram_pass(model, [tokens], site, out, forward=moved, progress=False)
    section.gram_pass(model, [tokens], site, out, progress=False)  # plain positions: fine


# -- TransformerBridge around a Hugging Face model ---------------------------------------------
HF_ROTARY = {  # name: (config class, model class, config overrides)
    # grouped-query attention, RMSNorm, YaRN tables (rescaled, cos and sin times a factor)
    "llama-yarn": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=2,
        rope_scaling={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 4},
    )),
    # partial rotary (half of d_head), a fused QKV projection, LayerNorm
    "neox-partial": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(
        rotary_pct=0.5, use_parallel_residual=False
    )),
    # RMSNorms of each head's q and k before the rotation, grouped-query attention
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=4, num_key_value_heads=2)),
}  # fmt: skip


def hf_bridge(config_class: str, model_class: str, **overrides) -> torch.nn.Module:
    """A perturbed float64 ``TransformerBridge`` around a random Hugging Face model (offline:
    a word-level tokenizer built here), computing in float64 throughout."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from transformer_lens.model_bridge import TransformerBridge

    config = getattr(transformers, config_class)(
        vocab_size=D_VOCAB, hidden_size=16, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=16, **overrides,
    )  # fmt: skip
    torch.manual_seed(0)
    hf_model = getattr(transformers, model_class)(config).double().eval()
    vocab = {f"t{i}": i for i in range(D_VOCAB)}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0")),
        unk_token="t0",
        pad_token="t0",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = TransformerBridge.boot_transformers(
            "tiny", hf_model=hf_model, tokenizer=tokenizer, dtype=torch.float64
        )

    # Hugging Face's RMSNorm takes its variance in float32: in float64 here, so that exact
    # probes test the closed form at float64 precision.
    def forward(self, x):
        return self.weight * (
            x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        )

    for module in model.modules():
        if type(module).__name__ in ("LlamaRMSNorm", "Qwen3RMSNorm"):
            module.forward = forward.__get__(module)
    return perturbed(model, 3)


@pytest.fixture
def float64_softmax(monkeypatch):
    """A bridge takes the attention softmax in float32: keep float64 inputs in float64."""
    softmax = torch.nn.functional.softmax

    def in_float64(input, dim=None, _stacklevel=3, dtype=None):
        return softmax(input, dim=dim, dtype=None if input.dtype == torch.float64 else dtype)

    monkeypatch.setattr(torch.nn.functional, "softmax", in_float64)


@pytest.mark.parametrize("name", list(HF_ROTARY))
def test_rotary_on_a_hugging_face_bridge_equals_exact_probes(name, float64_softmax):
    """The (cos, sin) the model passes its attention, read in each forward pass, rotate the
    bridge's unrotated q and k (key heads shared by query heads, part of d_head rotated)."""
    model = hf_bridge(HF_ROTARY[name][0], HF_ROTARY[name][1], **HF_ROTARY[name][2])
    tokens = torch.randint(0, D_VOCAB, (6, 7), generator=torch.Generator().manual_seed(5))
    read = readout(16)
    for residual in (True, False):
        source, target = attention_section_sites(model, 1, residual=residual)
        section = attention_section(model, 1, residual=residual)
        assert section.rotates and section.rotary_tables[0].endswith("attn.hook_cos")
        assert (section.qk_norm is not None) == (name == "qwen3")
        for positions in POSITIONS[:2]:
            site = dh.Site(source, positions=positions[0])
            out = dh.Site(target, positions=positions[1])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", dh.transformer_lens.ProcessedWeightsWarning)
                exact = exact_gram(model, tokens, site, out, read)
            closed = section.gram_pass(model, tokens.split(4), site, out, read, progress=False)
            torch.testing.assert_close(
                closed.second_moment(), exact.second_moment(), rtol=RTOL, atol=1e-13
            )


def test_rotary_on_a_hugging_face_bridge_refusals(float64_softmax):
    """Norms of q and k the closed form does not cover (after the rotation): refused with
    their name. Samples rotated at different positions (per-sample position_ids): the batch
    is refused."""
    qwen3 = hf_bridge("Qwen3Config", "Qwen3ForCausalLM", head_dim=4)
    qwen3.cfg.qk_norm_after_rope = True
    with pytest.raises(ValueError, match=r"qk_norm_after_rope.*exact probes"):
        attention_section(qwen3, 0)
    model = hf_bridge(*HF_ROTARY["llama-yarn"][:2])
    tokens = torch.randint(0, D_VOCAB, (2, 7), generator=torch.Generator().manual_seed(5))
    positions = torch.stack([torch.arange(7), (torch.arange(7) - 2).clamp(min=0)])
    source, target = attention_section_sites(model, 0)
    section = attention_section(model, 0)
    site, out = dh.Site(source), dh.Site(target)

    def moved(model, batch):
        return model(batch, position_ids=positions)

    with pytest.raises(ValueError, match="positions other than 0, 1, ..., n-1"):
        section.gram_pass(model, [tokens], site, out, forward=moved, progress=False)


def test_build_bases_with_attention_section(plain_model, tokens):
    """The section replaces the backward passes of its site: the same basis, no probes."""
    site = dh.Site("blocks.1.hook_resid_pre")
    output = dh.Site("blocks.1.hook_resid_mid", positions="last")
    data = list(tokens.split(3))
    sections = {site.key: (attention_section(plain_model, 1), None)}
    fast = dh.build_bases(
        plain_model, [site], data, output=output, sections=sections, progress=False
    )
    slow = dh.build_bases(plain_model, [site], data, output=output, sections=None, progress=False)
    assert list(fast.timings_) == ["activations", "jacobians blocks.1.hook_resid_pre (closed form)"]
    assert_spectrum_close(fast.lambdas_[site.key], slow.lambdas_[site.key], rtol=1e-9)
    torch.testing.assert_close(
        fast.projector(site.key), slow.projector(site.key), rtol=1e-8, atol=1e-10
    )


def test_model_untouched_and_hooks_removed(plain_model, tokens):
    model = warmed_up(plain_model, tokens)
    before = hook_state(model)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad():
        expected = model(tokens)
    section = attention_section(model, 0)
    site, out = (dh.Site(name) for name in attention_section_sites(model, 0))
    section.gram_pass(model, [tokens], site, out, progress=False)
    assert hook_state(model) == before
    with pytest.raises(ZeroDivisionError):  # a failing forward still removes the hooks

        def failing(model, batch):  # the pass stops once it has read: fail before
            raise ZeroDivisionError

        section.gram_pass(model, [tokens], site, out, forward=failing, progress=False)
    assert hook_state(model) == before
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters()) and not model.training
    with torch.no_grad():
        assert torch.equal(model(tokens), expected)


ATTENTION_HOOKS = ["attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_attn_scores",
                   "attn.hook_pattern", "attn.hook_z", "hook_attn_out"]  # fmt: skip


@pytest.mark.parametrize("hook", ATTENTION_HOOKS)
def test_a_hook_that_changes_the_heads_is_refused_not_ignored(plain_model, tokens, hook):
    """A hook anywhere in the layer (steering q, k or v, editing scores or the pattern, a
    head ablation at ``hook_z``, a patch of ``hook_attn_out``) makes the model differ from
    the section's weights: the section's Gram pass refuses the batch instead of returning
    the unhooked model's Jacobians (it reads q, k, v and the pattern after the hooks, so each
    is checked against what the weights make of its input); ``build_bases`` and the graph,
    finding sections themselves, leave the hooked layer to backward passes, which follow
    the hook, and say so."""
    from degen_hooks.graph import InteractionGraph

    model = plain_model
    section = attention_section(model, 0)
    site, out = (dh.Site(name) for name in attention_section_sites(model, 0))
    unhooked = section.gram_pass(model, [tokens], site, out, progress=False)  # accepted
    basis = dh.build_bases(model, [site, out], [tokens], progress=False)
    assert InteractionGraph().fit(model, basis, [tokens], progress=False).closed_form_

    def ablate(act, hook):  # zero head 1 (or query 1 of the pattern), or scale the output
        if act.ndim == 4:
            act = act.clone()
            act[:, :, 1] = 0
            return act
        return act * (1 + act.detach().abs().mean())

    with torch.no_grad():
        before = model(tokens)
    model.add_hook(f"blocks.0.{hook}", ablate)
    try:
        with torch.no_grad():
            changed = not torch.equal(model(tokens), before)
        if not changed:  # an edit the model never uses (a bridge's scores and pattern)
            try:  # refusing is safe; accepting must give the unhooked model's Gram
                hooked = section.gram_pass(model, [tokens], site, out, progress=False)
            except ValueError:
                return
            torch.testing.assert_close(hooked.second_moment(), unhooked.second_moment())
            return
        with pytest.raises(ValueError, match=r"differs from the closed form.*hook"):
            section.gram_pass(model, [tokens], site, out, progress=False)
        # Finding its sections itself, a build leaves the hooked layer to backward passes.
        with pytest.warns(UserWarning, match="hook of yours"):
            auto = dh.build_bases(model, [site, out], [tokens], progress=False)
        slow = dh.build_bases(model, [site, out], [tokens], sections=None, progress=False)
        assert_same_bases(auto, slow)
        with pytest.warns(UserWarning, match="hook of yours"):
            graph = InteractionGraph().fit(model, basis, [tokens], progress=False)
        assert graph.closed_form_ == []
    finally:
        model.reset_hooks()


def test_errors(plain_model, tokens):
    section = attention_section(plain_model, 0)
    site, out = (dh.Site(name) for name in attention_section_sites(plain_model, 0))
    with pytest.raises(dh.ShapeMismatchError, match="maps 'blocks.0.hook_resid_pre'"):
        section.gram_pass(plain_model, [tokens], dh.Site("blocks.1.hook_resid_pre"), out)
    with pytest.raises(dh.ShapeMismatchError, match=r"must be a \(d_out, r\) = \(8, r\)"):
        section.gram_pass(plain_model, [tokens], site, out, torch.ones(5, 2))
    with pytest.raises(RuntimeError, match="never reached"):
        section.gram_pass(plain_model, [tokens], site, out, forward=lambda m, b: None)
    with pytest.raises(dh.SiteNotFoundError, match="n_layers=2"):
        attention_section(plain_model, 2)


def test_unsupported_attention_is_refused():
    base = {**toy_config(), "n_layers": 1}
    for extra, message in (
        ({"use_dynamic_ntk_rope": True}, "use_dynamic_ntk_rope"),
        ({"attn_scores_soft_cap": 30.0}, "attn_scores_soft_cap=30.0"),
        ({"original_architecture": "Olmo2ForCausalLM"}, r"whole q and k projections \(OLMo 2\)"),
        ({"use_qk_norm": True}, "use_qk_norm without rotary embeddings"),
    ):
        model = config_only({**base, **extra})
        with pytest.raises(ValueError, match=message):
            attention_section_sites(model, 0)


def test_an_empty_readout_gives_a_zero_gram(plain_model, tokens):
    """A next site whose basis kept no feature reads the section through a (d, 0) matrix:
    the Gram is zero over the site's samples (it used to crash in a reshape)."""
    source, target = attention_section_sites(plain_model, 0, residual=True)
    site, out = dh.Site(source, positions=[1, 3]), dh.Site(target, positions="last")
    section = attention_section(plain_model, 0, residual=True)
    empty = torch.zeros(8, 0, dtype=torch.float64)
    gram = section.gram_pass(plain_model, tokens.split(4), site, out, empty, progress=False)
    assert gram.n_samples == 2 * tokens.shape[0]
    assert torch.equal(gram.second_moment(), torch.zeros(8, 8, dtype=torch.float64))


@requires_hooked
def test_rotary_gram_pass_takes_the_pieces(tokens, monkeypatch):
    """Rotary attention's Gram comes from its pieces, never from one row per probe (which
    cost ``P K r d^2`` per sample): ``jacobian_rows`` is not called, and the Gram still
    equals exact probes (a causal mask: an output never reads a later input)."""
    config = {**toy_config(), "positional_embedding_type": "rotary", "rotary_dim": 4}
    model = perturbed(tl_model(torch.float64, **config))
    source, target = attention_section_sites(model, 0, residual=True)
    site, out = dh.Site(source), dh.Site(target)
    section = attention_section(model, 0, residual=True)

    def refused(*args, **kwargs):
        raise AssertionError("the rows were formed")

    monkeypatch.setattr(type(section), "jacobian_rows", refused)
    closed = section.gram_pass(model, [tokens], site, out, readout(), progress=False)
    exact = exact_gram(model, tokens, site, out, readout())
    torch.testing.assert_close(closed.second_moment(), exact.second_moment(), rtol=RTOL, atol=1e-13)


@pytest.mark.parametrize("norm", [None, "LN", "RMS"])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize(
    ("inputs", "outputs", "weights"),
    [
        ([0, 1, 2, 3, 4], [0, 2, 4], [1.0, 2.0, 1.0]),
        ([1, 1, 3], [1, 3], [3.0, 1.0]),
        ([4], [0], [1.0]),
        ([0, 1, 2], [0, 2], [1.0, 2.0]),  # 3 keys < d_head: the query terms over (h, l)
        ([1, 1, 2], [1, 2], [3.0, 1.0]),
    ],
)
def test_gram_from_pieces_equals_the_rows(norm, residual, inputs, outputs, weights):
    """The factorised Gram (``_attention_gram``) equals the Gram of the rows, an algebraic
    identity that holds for any q, k, v and pattern: random ones, masked entries included.
    With 5 positions the query terms go through ``E_hp`` (more keys than ``d_head = 4``),
    with 3 through the (head, key) pairs."""
    from dataclasses import replace

    from degen_hooks.attention._gram import lowrank_gram

    gen = torch.Generator().manual_seed(7)
    base = attention_section(build_hooked_or_bridge(), 0, residual=residual)
    section = replace(base, norm=norm)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    b, n_pos, h, e = 3, 5 if max(inputs + outputs) > 2 else 3, 2, 4
    q, k, v = rand(b, n_pos, h, e), rand(b, n_pos, h, e), rand(b, n_pos, h, e)
    pattern = torch.softmax(rand(b, h, n_pos, n_pos), -1) * (rand(b, h, n_pos, n_pos) > -0.5)
    x, read = rand(b, n_pos, 8), rand(8, 3)
    args = (q, k, v, pattern, read, torch.tensor(inputs), torch.tensor(outputs),
            torch.tensor(weights, dtype=torch.float64))  # fmt: skip
    rows = section.jacobian_rows(*args, x=x).reshape(-1, 8)
    torch.testing.assert_close(
        lowrank_gram(section, *args, x=x), rows.T @ rows, rtol=1e-10, atol=1e-12
    )
    # Per-sequence weights (a padding mask's zeros among them) weight each row.
    per_bp, per_bj = padding_weights(gen, b, len(outputs), len(inputs))
    ones = torch.ones(len(outputs), dtype=torch.float64)
    rows = weighted_rows(section.jacobian_rows(*args[:-1], ones, x=x), per_bp, per_bj)
    gram = lowrank_gram(section, *args[:-1], per_bp, x=x, input_weights=per_bj)
    torch.testing.assert_close(gram, rows.T @ rows, rtol=1e-10, atol=1e-12)


def padding_weights(gen, b, n_out, n_in):
    """Random ``(b, P)`` probe and ``(b, K)`` sample weights, a quarter of them zero."""

    def draw(*shape):
        values = torch.rand(*shape, generator=gen, dtype=torch.float64) * 3
        return values * (torch.rand(*shape, generator=gen) > 0.25)

    return draw(b, n_out), draw(b, n_in)


def weighted_rows(rows, per_bp, per_bj):
    """Rows ``(b, P, K, r, d)`` times ``sqrt(w_bp u_bj)``, flattened to ``(-1, d)``."""
    root = (per_bp[:, :, None] * per_bj[:, None, :]).sqrt()[..., None, None]
    return (rows * root).reshape(-1, rows.shape[-1])


ROTARY_CASES = [  # (inputs, outputs, weights, positions)
    ([0, 1, 2, 3, 4, 5, 6], [0, 3, 6], [1.0, 2.0, 1.0], 7),  # 7 keys > d_head: through E_hp
    ([1, 1, 3], [1, 3], [3.0, 1.0], 5),  # 5 keys < d_head = 6: the (head, key) pairs
    ([4], [0], [1.0], 5),  # no pair p = j
    ([2, 5, 6], [6, 2, 4], [1.0, 1.0, 2.0], 7),
]


@pytest.mark.parametrize("norm", [None, "LN", "RMS"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("rotary_dim", [6, 4], ids=["full", "partial"])
@pytest.mark.parametrize("adjacent", [False, True], ids=["halves", "adjacent"])
@pytest.mark.parametrize("case", ROTARY_CASES, ids=["all", "repeated", "off", "subset"])
def test_rotary_gram_from_pieces_equals_the_rows(norm, kv_heads, rotary_dim, adjacent, case):
    """With rotary embeddings the factorised Gram (``_attention_gram_rotary``) equals the
    Gram of the rows, for random weights, q, k, v and tables (a rotation scaled as YaRN's
    ``attention_scaling`` does) and a causal pattern with more masked entries; key/value
    heads shared by 1, 2 or 4 query heads, full and partial rotation, both pair flips."""
    assert_rotary_pieces_equal_the_rows(norm, kv_heads, rotary_dim, adjacent, case, False)


@pytest.mark.parametrize("norm", [None, "RMS"])
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("rotary_dim", [6, 4], ids=["full", "partial"])
@pytest.mark.parametrize("case", ROTARY_CASES, ids=["all", "repeated", "off", "subset"])
def test_qk_normed_gram_from_pieces_equals_the_rows(norm, kv_heads, rotary_dim, case):
    """Norms of each head's q and k before the rotation (Qwen 3): the factorised Gram still
    equals the Gram of the rows (whose own exactness the Hugging Face tests check against
    exact probes), with random gains and raw projections."""
    assert_rotary_pieces_equal_the_rows(norm, kv_heads, rotary_dim, False, case, True)


def rotary_case(kv_heads, rotary_dim, adjacent, n_pos, qk, gen):
    """Random weights, q, k, v, tables and causal pattern of a rotary section (and its q/k
    norms with ``qk``): ``(section, q, k, v, pattern, x, read)``."""
    from dataclasses import replace

    from degen_hooks.attention.qk_norm import QKNorm
    from degen_hooks.attention.rotary import Rotary

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    b, h, e, d = 2, 4, 6, 8
    shared = [w.repeat_interleave(h // kv_heads, 0) for w in (rand(kv_heads, d, e),) * 2]
    angles = torch.arange(n_pos, dtype=torch.float64)[:, None] * rand(rotary_dim // 2).exp()
    angles = angles.repeat_interleave(2, 1) if adjacent else angles.repeat(1, 2)
    rotary = Rotary(cos=1.3 * angles.cos(), sin=1.3 * angles.sin(), adjacent_pairs=adjacent)
    base = attention_section(build_hooked_or_bridge(), 0, residual=True)
    q, k, v = rand(b, n_pos, h, e), rand(b, n_pos, h, e), rand(b, n_pos, h, e)
    norms = None
    if qk:  # q and k normed per head before the rotation, from raw projections
        raw_k = rand(b, n_pos, kv_heads, e).repeat_interleave(h // kv_heads, 2)
        norms = QKNorm(rand(e), rand(e), 1e-3).of_batch(q, raw_k)
        frames = norms.frames()
        q, k = frames.q.normalized, frames.k.normalized
    q, k = rotary.rotate(q), rotary.rotate(k)
    causal = torch.ones(n_pos, n_pos).tril().bool() & (rand(b, h, n_pos, n_pos) > -1.0)
    pattern = torch.softmax(rand(b, h, n_pos, n_pos).masked_fill(~causal, -torch.inf), -1)
    pattern = pattern.nan_to_num(0.0)  # a row with every key masked
    x, read = rand(b, n_pos, d), rand(d, 3)
    section = replace(
        base, w_q=rand(h, d, e), w_k=shared[0], w_v=shared[1], w_o=rand(h, e, d),
        scale=1.7, rotary=rotary, qk_norm=norms,
    )  # fmt: skip
    return section, q, k, v, pattern, x, read


def assert_rotary_pieces_equal_the_rows(norm, kv_heads, rotary_dim, adjacent, case, qk):
    from dataclasses import replace

    from degen_hooks.attention._gram import lowrank_gram

    gen = torch.Generator().manual_seed(11)
    inputs, outputs, weights, n_pos = case
    base, q, k, v, pattern, x, read = rotary_case(kv_heads, rotary_dim, adjacent, n_pos, qk, gen)
    b, d = q.shape[0], x.shape[-1]
    args = (q, k, v, pattern, read, torch.tensor(inputs), torch.tensor(outputs),
            torch.tensor(weights, dtype=torch.float64))  # fmt: skip
    for residual in (True, False):
        section = replace(base, residual=residual, norm=norm)
        rows = section.jacobian_rows(*args, x=x).reshape(-1, d)
        gram = lowrank_gram(section, *args, x=x)
        torch.testing.assert_close((gram + gram.T) / 2, rows.T @ rows, rtol=1e-10, atol=1e-12)
        per_bp, per_bj = padding_weights(gen, b, len(outputs), len(inputs))
        ones = torch.ones(len(outputs), dtype=torch.float64)
        rows = weighted_rows(section.jacobian_rows(*args[:-1], ones, x=x), per_bp, per_bj)
        gram = lowrank_gram(section, *args[:-1], per_bp, x=x, input_weights=per_bj)
        torch.testing.assert_close((gram + gram.T) / 2, rows.T @ rows, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("qk", [False, True], ids=["rotary", "qk_norm"])
def test_direct_attributions_equal_the_rows(qk):
    """Without a norm before it, the edges sum a section's attributions over input positions
    inside their products (``_direct_attributions``); they equal the rows of
    ``jacobian_rows`` times the features, summed (``_rows_attributions``)."""
    gen = torch.Generator().manual_seed(3)
    section, q, k, v, pattern, x, read = rotary_case(2, 4, False, 5, qk, gen)
    section = replace(section, residual=False)
    inputs, outputs = torch.arange(5), torch.tensor([1, 4])
    f = torch.randn(q.shape[0], 5, x.shape[-1], generator=gen, dtype=torch.float64)
    frames = section._frames()
    wor = torch.einsum("hed,dr->her", section.w_o, read)
    values = torch.einsum("hje,her->hrj", section.w_v, wor)
    direct = section._direct_attributions(
        q[:, outputs], k, v, pattern[:, :, outputs], wor, values, f, f[:, outputs], outputs,
        frames,
    )  # fmt: skip
    rows = section._rows_attributions(q, k, v, pattern, x, None, read, inputs, outputs, f, frames)
    torch.testing.assert_close(direct, rows, rtol=1e-10, atol=1e-12)


def build_hooked_or_bridge():
    return tl_model(torch.float64, **{**toy_config(), "n_layers": 1})


@pytest.mark.parametrize("norm", [None, "LN"], ids=["nonorm", "LN"])
@pytest.mark.parametrize("rotary", [False, True], ids=["pieces", "rotary"])
def test_memory_per_call_is_bounded_in_the_context(tokens, monkeypatch, rotary, norm):
    """A sample's work is split over its output positions once it exceeds the budget: no
    call holds more than the budget (beyond one output position of one sample), whatever the
    context, and the Gram is the same. Before, one sample's P^2 h r temporaries were formed
    whole (about 2.4 GB a call for a GPT-2-small layer at 128 tokens)."""
    from degen_hooks.attention import _gram as _attention_gram

    config = {**toy_config("relu", norm), "n_layers": 1}
    if rotary:
        config.update(positional_embedding_type="rotary", rotary_dim=4)
    model = perturbed(tl_model(torch.float64, **config))
    source, target = attention_section_sites(model, 0, residual=True)
    site, out = dh.Site(source), dh.Site(target)
    section = attention_section(model, 0, residual=True)
    read = readout()
    whole = section.gram_pass(model, [tokens], site, out, read, progress=False)
    n_pos, r = tokens.shape[1], read.shape[1]
    calls = []
    block = _attention_gram._add_block
    per_output = per_output_elements(section, n_pos, r, rotary)

    def recording(s, sums, cross, batch, *args):
        calls.append((batch.q.shape[0], len(args[-2]), per_output))  # (b, P, per output)
        return block(s, sums, cross, batch, *args)

    monkeypatch.setattr(_attention_gram, "_add_block", recording)
    budget = 2 * per_output
    monkeypatch.setattr(_attention_gram, "_ELEMENTS", budget)
    split = section.gram_pass(model, [tokens], site, out, read, progress=False)
    assert calls and max(n_out for _, n_out, _ in calls) < n_pos  # outputs were split
    # as large as the budget allows: the section counts an output as this test does
    assert max(n_out for _, n_out, _ in calls) == budget // per_output
    assert all(b * n_out * per <= budget or (b, n_out) == (1, 1) for b, n_out, per in calls)
    assert sum(n_out for b, n_out, _ in calls if b == 1) >= n_pos  # every output visited
    assert split.n_samples == whole.n_samples
    torch.testing.assert_close(split.second_moment(), whole.second_moment(), rtol=1e-12, atol=0)


def per_output_elements(section, n_pos: int, r: int, rotary: bool) -> int:
    """The elements one output position of one sample costs (as the section counts them),
    every position an input: the pattern rows and ``g`` (and with rotary embeddings ``u``, the
    grouped ``s u`` and ``Qbar``), and the pairs' rows."""
    n_heads, d_head, d_in = section.w_q.shape[0], section.w_q.shape[2], section.d_in
    if rotary:
        return n_heads * n_pos * (n_heads * d_head + r + max(r, d_head)) + r * d_in
    return n_heads * 2 * n_pos * max(r, d_head) + r * d_in


@pytest.mark.parametrize("rotary", [False, True], ids=["plain", "rotary"])
def test_a_single_head_equals_exact_probes(tokens, rotary):
    """One head: the stacked value rows of the heads are one (r, d) block, a transposed view
    the Gram must not assume contiguous."""
    config = {**toy_config("gelu", "LN"), "n_heads": 1, "d_head": 8}
    if rotary:
        config.update(positional_embedding_type="rotary", rotary_dim=8)
    model = tl_model(**config)
    source, target = attention_section_sites(model, 1)
    site, out = dh.Site(source), dh.Site(target, positions=[1, 4])
    exact = exact_gram(model, tokens, site, out, readout())
    section = attention_section(model, 1)
    closed = section.gram_pass(model, [tokens], site, out, readout(), progress=False)
    scale = float(exact.second_moment().abs().max())
    torch.testing.assert_close(
        closed.second_moment(), exact.second_moment(), rtol=RTOL, atol=1e-12 * scale
    )
