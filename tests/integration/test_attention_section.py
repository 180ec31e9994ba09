"""The closed-form Jacobian Gram of TransformerLens attention layers.

Checked against two independent references: the exact-probe Grams of ``dh.collect`` (both
model families, residual or not, every combination of input and output positions) and a
brute-force ``torch.func.jacrev`` of the attention block over stacked samples.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import degen_hooks as dh
from degen_hooks.transformer_lens import attention_section, attention_section_sites
from tests.cases import tl_model
from tests.reference import assert_spectrum_close

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
    ],
    ids=["attn_only", "alibi"],
)
def test_attention_only_and_alibi_models(extra):
    """Attention-only blocks map to hook_resid_post; ALiBi biases the scores by constants."""
    tokens = torch.randint(0, D_VOCAB, (5, N_CTX), generator=torch.Generator().manual_seed(5))
    model = tl_model(**{**toy_config(), "n_layers": 1, **extra})
    source, target = attention_section_sites(model, 0)
    assert target.endswith("hook_resid_post" if "attn_only" in extra else "hook_resid_mid")
    site, out = dh.Site(source), dh.Site(target, positions="last")
    exact = exact_gram(model, tokens, site, out, None)
    closed = attention_section(model, 0).gram_pass(model, [tokens], site, out, progress=False)
    torch.testing.assert_close(closed.second_moment(), exact.second_moment(), rtol=RTOL, atol=1e-13)


@requires_hooked  # a bridge keeps no rotary tables: refused (below)
@pytest.mark.parametrize("rotary_dim", [4, 2], ids=["full", "partial"])
@pytest.mark.parametrize("adjacent", [False, True], ids=["halves", "adjacent"])
@pytest.mark.parametrize("norm", [None, "LN"], ids=["nonorm", "LN"])
def test_rotary_attention_equals_exact_probes(tokens, rotary_dim, adjacent, norm):
    """q and k rotated per position (M_t): the scores' derivatives go through M_t^T."""
    config = {
        **toy_config("gelu", norm),
        "positional_embedding_type": "rotary",
        "rotary_dim": rotary_dim,
        "rotary_adjacent_pairs": adjacent,
    }
    model = perturbed(tl_model(**config))
    for residual in (True, False):
        source, target = attention_section_sites(model, 1, residual=residual)
        section = attention_section(model, 1, residual=residual)
        assert section.rotary is not None and section.hooks[0].endswith("hook_rot_q")
        for positions in POSITIONS[:2] + POSITIONS[3:4]:
            site = dh.Site(source, positions=positions[0])
            out = dh.Site(target, positions=positions[1])
            exact = exact_gram(model, tokens, site, out, readout())
            closed = section.gram_pass(model, [tokens], site, out, readout(), progress=False)
            torch.testing.assert_close(
                closed.second_moment(), exact.second_moment(), rtol=RTOL, atol=1e-13
            )


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


def test_rotary_on_a_bridge_is_refused(build):
    config = {**toy_config(), "positional_embedding_type": "rotary", "rotary_dim": 4}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformer_lens.model_bridge import TransformerBridge

        bridge = TransformerBridge.boot_native(config, dtype=torch.float64)
    with pytest.raises(ValueError, match="no rotary_cos/rotary_sin tables"):
        attention_section(bridge, 0)


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

        def failing(model, batch):
            model(batch)
            raise ZeroDivisionError

        section.gram_pass(model, [tokens], site, out, forward=failing, progress=False)
    assert hook_state(model) == before
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters()) and not model.training
    with torch.no_grad():
        assert torch.equal(model(tokens), expected)


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
        ({"original_architecture": "Olmo2ForCausalLM"}, "use_qk_norm"),
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
def test_masked_inputs_give_no_rows(tokens, monkeypatch):
    """Rotary attention keeps one row per probe: an output never reads a later input (causal
    mask), whose rows are exact zeros and are left out of the product, with the same Gram."""
    config = {**toy_config(), "positional_embedding_type": "rotary", "rotary_dim": 4}
    model = perturbed(tl_model(torch.float64, **config))
    source, target = attention_section_sites(model, 0, residual=True)
    site, out = dh.Site(source), dh.Site(target)
    section = attention_section(model, 0, residual=True)
    seen = []
    update = dh.SecondMoment.update

    def counting(self, x, *args, **kw):
        seen.append(x.shape[0])
        return update(self, x, *args, **kw)

    monkeypatch.setattr(dh.SecondMoment, "update", counting)
    closed = section.gram_pass(model, [tokens], site, out, readout(), progress=False)
    n_pos = tokens.shape[1]
    assert sum(seen) == tokens.shape[0] * n_pos * (n_pos + 1) // 2 * 3  # (p, j <= p) x r
    monkeypatch.setattr(dh.SecondMoment, "update", update)
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
    ],
)
def test_gram_from_pieces_equals_the_rows(norm, residual, inputs, outputs, weights):
    """The factorised Gram (``_attention_gram``) equals the Gram of the rows, an algebraic
    identity that holds for any q, k, v and pattern: random ones, masked entries included."""
    from dataclasses import replace

    from degen_hooks.transformer_lens._attention_gram import lowrank_gram

    gen = torch.Generator().manual_seed(7)
    base = attention_section(build_hooked_or_bridge(), 0, residual=residual)
    section = replace(base, norm=norm)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    b, n_pos, h, e = 3, 5, 2, 4
    q, k, v = rand(b, n_pos, h, e), rand(b, n_pos, h, e), rand(b, n_pos, h, e)
    pattern = torch.softmax(rand(b, h, n_pos, n_pos), -1) * (rand(b, h, n_pos, n_pos) > -0.5)
    x, read = rand(b, n_pos, 8), rand(8, 3)
    args = (q, k, v, pattern, read, torch.tensor(inputs), torch.tensor(outputs),
            torch.tensor(weights, dtype=torch.float64))  # fmt: skip
    rows = section.jacobian_rows(*args, x=x).reshape(-1, 8)
    torch.testing.assert_close(
        lowrank_gram(section, *args, x=x), rows.T @ rows, rtol=1e-10, atol=1e-12
    )


def build_hooked_or_bridge():
    return tl_model(torch.float64, **{**toy_config(), "n_layers": 1})
