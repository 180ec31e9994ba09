"""Closed-form interaction-graph edges of TransformerLens models (#19).

Attention (LayerNorm, RMSNorm, rotary, ALiBi, attention-only), residual MLP and unembedding
sections of both model families give the same edges as backward passes (``sections=None``)
at ``rtol=1e-10`` in float64: exact and stochastic edges, the gradient rule and integrated
gradients, any input and output positions, padded batches.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import degen_hooks as dh
from degen_hooks.graph import InteractionGraph
from degen_hooks.transformer_lens import attention_section, mlp_section, mlp_section_sites
from tests.cases import tl_model
from tests.unit.test_graph_closed_form import peak_torch_bytes

from .conftest import D_VOCAB, N_CTX, hook_state, requires_hooked, toy_config, warmed_up
from .test_attention_section import HF_ROTARY, float64_softmax, hf_bridge, rotary_model  # noqa: F401

RTOL = 1e-10
RULES = {
    "exact": {},
    "stochastic": {"method": "stochastic", "n_sources": 2, "seed": 5},
    "gauss-legendre": {"integration": "gauss-legendre", "n_intervals": 2},
}
# (resid_pre, resid_mid and later) positions
POSITIONS = [(None, None), (None, "last"), ([0, 2], [1, 3]), (slice(1, 4), [0, 2])]


@pytest.fixture
def batches() -> list[torch.Tensor]:
    tokens = torch.randint(0, D_VOCAB, (10, N_CTX), generator=torch.Generator().manual_seed(3))
    return list(tokens.split(4))


def block_sites(positions: tuple, n_layers: int = 2) -> list[dh.Site]:
    """The residual stream of the toy, earliest first: ``resid_pre`` and ``resid_mid`` of
    each block, then the last ``resid_post``. ``resid_mid -> next resid_pre`` (named as the
    next block's input, the same tensor as ``resid_post``) is the residual MLP."""
    first, later = positions
    sites = []
    for layer in range(n_layers):
        sites.append(
            dh.Site(f"blocks.{layer}.hook_resid_pre", positions=first if not sites else later)
        )
        sites.append(dh.Site(f"blocks.{layer}.hook_resid_mid", positions=later))
    sites.append(dh.Site(f"blocks.{n_layers - 1}.hook_resid_post", positions=later))
    return sites


def pairs_of(sites):
    return list(zip(sites[:-1], sites[1:], strict=True))


def assert_same_graph(model, basis, data, rule, *, rtol=RTOL, sections="auto", **kw):
    closed = InteractionGraph(**rule).fit(model, basis, data, sections=sections, **kw)
    backward = InteractionGraph(**rule).fit(model, basis, data, sections=None, **kw)
    assert backward.closed_form_ == [] and closed.n_rows_ == backward.n_rows_
    for pair in closed.pairs_:
        expected = backward.edges_[pair]
        torch.testing.assert_close(
            closed.edges_[pair], expected, rtol=rtol, atol=rtol * 1e-4 * float(expected.max())
        )
    return closed


def quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kw)


@pytest.mark.parametrize("positions", POSITIONS, ids=["all", "last", "lists", "slice"])
def test_every_section_kind_equals_backward_passes(model, batches, positions):
    """Attention, residual MLP and unembedding pairs of every family x activation x norm."""
    sites = block_sites(positions)
    kw = {"output": True, "output_positions": positions[1], "progress": False}
    basis = quiet(
        dh.build_bases, model, sites, batches, output_positions=positions[1], progress=False
    )
    graph = quiet(assert_same_graph, model, basis, batches, {}, **kw)
    attention = [(a.key, b.key) for a, b in pairs_of(sites) if "resid_pre" in a.name]
    mlp = [(a.key, b.key) for a, b in pairs_of(sites) if "resid_mid" in a.name]
    mlp.append((sites[-1].key, "output"))  # the unembedding
    expected = attention + mlp  # with a norm too: NormedMLPSection pairs (#16)
    assert sorted(graph.closed_form_) == sorted(expected)


@pytest.mark.parametrize("rule", list(RULES.values())[1:], ids=list(RULES)[1:])
def test_stochastic_and_integrated_edges(plain_model, batches, rule):
    sites = block_sites((None, [1, 4]))
    # Block 1 read at every position: block 0's MLP pair changes positions, no closed form.
    sites[2] = dh.Site("blocks.1.hook_resid_pre")
    kw = {"output": True, "output_positions": [1, 4], "progress": False}
    basis = quiet(
        dh.build_bases, plain_model, sites, batches, output_positions=[1, 4], progress=False
    )
    graph = assert_same_graph(plain_model, basis, batches, rule, **kw)
    # Closed-form and backward pairs draw their signs from one generator, in pair order.
    assert graph.pairs_[1] not in graph.closed_form_
    assert len(graph.closed_form_) == len(graph.pairs_) - 1


@pytest.mark.parametrize("rule", RULES.values(), ids=RULES.keys())
@pytest.mark.parametrize("norm", ["LN", "RMS"])
def test_norms_before_attention_and_mlp(build, family, batches, norm, rule):
    """The norm before attention is part of the attention section; an MLP section starts at
    ``ln2.hook_normalized`` (``mlp_section``, not residual) when given explicitly."""
    model = quiet(build[family], "gelu", norm)
    source, pre, target = mlp_section_sites(model, 0)
    # The bridge's native RMSNorm rounds at the ~1e-7 level (see test_attention_section).
    rtol = 1e-6 if family == "bridge" and norm == "RMS" else RTOL
    attention = [dh.Site("blocks.0.hook_resid_pre"), dh.Site("blocks.0.hook_resid_mid")]
    mlp = [dh.Site(source), dh.Site(target)]
    cases = [(attention, (attention_section(model, 0), None))]
    if not (family == "bridge" and norm == "RMS"):
        # No gradient reaches a write at a bridge RMSNorm's hook_normalized (it rebuilds its
        # output from the hooked values): the backward reference cannot run there.
        cases.append((mlp, (mlp_section(model, 0), dh.Site(pre))))
    for sites, section in cases:
        sections = {sites[0].key: section}
        basis = quiet(dh.build_bases, model, sites, batches, variant="pca", progress=False)
        graph = assert_same_graph(
            model, basis, batches, rule, rtol=rtol, sections=sections, progress=False
        )
        assert graph.closed_form_ == [(sites[0].key, sites[1].key)]


@pytest.mark.parametrize("norm", [None, "LN"], ids=["nonorm", "LN"])
def test_rotary_attention(family, batches, norm):
    """A bridge's section rotates its unrotated q and k itself (native tables)."""
    model = rotary_model(family, **toy_config("gelu", norm))
    sites = [
        dh.Site("blocks.1.hook_resid_pre"),
        dh.Site("blocks.1.hook_resid_mid", positions=[1, 3]),
    ]
    basis = dh.build_bases(model, sites, batches, output_positions=[1, 3], progress=False)
    for rule in RULES.values():
        graph = assert_same_graph(model, basis, batches, rule, progress=False)
        assert graph.closed_form_ == [(sites[0].key, sites[1].key)]


@pytest.mark.parametrize("name", ["llama-yarn", "qwen3"])
def test_rotary_attention_on_a_hugging_face_bridge(float64_softmax, name):  # noqa: F811
    """The (cos, sin) a Hugging Face model passes its attention are read in the edges' pass
    (Qwen 3: its q and k normed per head, and normed again at each integration point)."""
    config_class, model_class, overrides = HF_ROTARY[name]
    model = hf_bridge(config_class, model_class, **overrides)
    tokens = torch.randint(0, D_VOCAB, (10, 7), generator=torch.Generator().manual_seed(3))
    batches = list(tokens.split(4))
    sites = [
        dh.Site("blocks.1.hook_resid_pre"),
        dh.Site("blocks.1.hook_resid_mid", positions=[1, 3]),
    ]
    basis = quiet(dh.build_bases, model, sites, batches, output_positions=[1, 3], progress=False)
    for rule in RULES.values():
        graph = quiet(assert_same_graph, model, basis, batches, rule, progress=False)
        assert graph.closed_form_ == [(sites[0].key, sites[1].key)]


@requires_hooked
def test_qk_normed_rotary_attention(batches):
    """``use_qk_norm`` on a HookedTransformer: the edges norm the moved q and k again."""
    config = {**toy_config("silu", "RMS"), "use_qk_norm": True, "n_key_value_heads": 1}
    model = rotary_model("hooked", **config)
    sites = [
        dh.Site("blocks.1.hook_resid_pre"),
        dh.Site("blocks.1.hook_resid_mid", positions="last"),
    ]
    basis = dh.build_bases(model, sites, batches, output_positions="last", progress=False)
    for rule in RULES.values():
        graph = assert_same_graph(model, basis, batches, rule, progress=False)
        assert graph.closed_form_ == [(sites[0].key, sites[1].key)]


@pytest.mark.parametrize(
    "extra",
    [
        {"attn_only": True},
        pytest.param({"positional_embedding_type": "alibi"}, marks=requires_hooked),
        pytest.param({"positional_embedding_type": "shortformer"}, marks=requires_hooked),
    ],
    ids=["attn_only", "alibi", "shortformer"],
)
def test_attention_only_and_alibi(batches, extra):
    model = tl_model(**{**toy_config(), "n_layers": 1, **extra})
    mid = "hook_resid_post" if "attn_only" in extra else "hook_resid_mid"
    sites = [dh.Site("blocks.0.hook_resid_pre"), dh.Site(f"blocks.0.{mid}", positions="last")]
    basis = dh.build_bases(model, sites, batches, output_positions="last", progress=False)
    graph = assert_same_graph(model, basis, batches, {}, progress=False)
    assert graph.closed_form_[0] == (sites[0].key, sites[1].key)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batches(plain_model, batches, side):
    """An attention mask: masked keys get no attention, in both paths alike."""
    mask = torch.ones(4, N_CTX, dtype=torch.long)
    lengths = torch.tensor([5, 3, 4, 2])
    for row, length in enumerate(lengths.tolist()):
        if side == "right":
            mask[row, length:] = 0
        else:
            mask[row, : N_CTX - length] = 0

    def padded(model, batch):
        return model(batch, attention_mask=mask[: len(batch)])

    sites = block_sites((None, "last"), n_layers=1)
    kw = {"forward": padded, "progress": False}
    basis = dh.build_bases(plain_model, sites, batches, output_positions="last", **kw)
    for rule in RULES.values():
        graph = assert_same_graph(
            plain_model, basis, batches, rule, output=True, output_positions="last", **kw
        )
        assert graph.closed_form_ == graph.pairs_[:2]  # block 0 of 2: no unembedding


def test_attention_without_the_residual(plain_model, batches):
    """``resid_pre -> attn_out`` (``residual=False``), given explicitly."""
    sites = [
        dh.Site("blocks.0.hook_resid_pre", positions=[0, 2]),
        dh.Site("blocks.0.hook_attn_out"),
    ]
    sections = {sites[0].key: (attention_section(plain_model, 0, residual=False), None)}
    basis = dh.build_bases(plain_model, sites, batches, variant="pca", progress=False)
    graph = assert_same_graph(plain_model, basis, batches, {}, sections=sections, progress=False)
    assert graph.closed_form_ == [(sites[0].key, sites[1].key)]


def test_hooks_removed_and_model_untouched(plain_model, batches):
    model = warmed_up(plain_model, batches[0])
    sites = block_sites((None, "last"), n_layers=1)
    basis = dh.build_bases(model, sites, batches, output_positions="last", progress=False)
    before = hook_state(model)
    with torch.no_grad():
        expected = model(batches[0])
    graph = InteractionGraph().fit(
        model, basis, batches, output=True, output_positions="last", progress=False
    )
    assert len(graph.closed_form_) == 2
    assert hook_state(model) == before
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(batches[0]), expected)


def test_modadd_graph_equals_backward_passes():
    """The papers' graph: every pair in closed form, the backward path's edges."""
    from degen_hooks.modadd import build_modadd_bases
    from degen_hooks.zoo import load_modadd

    model, data = load_modadd(0, dtype=torch.float64)
    tokens = data.train_tokens[:256]
    basis = build_modadd_bases(model, tokens, batch_size=128, progress=False)
    kw = {"output": True, "output_positions": "last", "progress": False}
    graph = assert_same_graph(model, basis, tokens.split(128), {}, **kw)
    assert len(graph.closed_form_) == 3 and all(
        "closed form" in k for k in list(graph.timings_)[:3]
    )


def test_peak_memory_is_flat_as_samples_grow_8x(plain_model):
    tokens = torch.randint(
        0, D_VOCAB, (8 * 4 * 16, N_CTX), generator=torch.Generator().manual_seed(1)
    )
    sites = block_sites((None, "last"), n_layers=1)
    basis = dh.build_bases(
        plain_model, sites, tokens.split(16), output_positions="last", progress=False
    )

    def fit(n_batches: int) -> None:
        data = list(tokens[: 16 * n_batches].split(16))
        InteractionGraph().fit(
            plain_model, basis, data, output=True, output_positions="last", progress=False
        )

    fit(1)  # warm-up (a bridge wires its hooks on first use)
    small, large = peak_torch_bytes(lambda: fit(4)), peak_torch_bytes(lambda: fit(32))
    assert 0 < large <= 1.05 * small + 2**16, (small, large)


@pytest.mark.parametrize("rule", RULES.values(), ids=RULES.keys())
def test_small_chunks_split_samples_and_output_positions(plain_model, batches, rule, monkeypatch):
    """Chunks of one sample and one output position give the same edges."""
    monkeypatch.setattr("degen_hooks.closed_form.EDGE_ELEMENTS", 1)
    sites = block_sites(([0, 1, 3], None), n_layers=2)
    kw = {"output": True, "progress": False}
    basis = quiet(dh.build_bases, plain_model, sites, batches, progress=False)
    graph = assert_same_graph(plain_model, basis, batches, rule, **kw)
    assert graph.closed_form_ == graph.pairs_  # every pair, the MLP of block 0 included
