"""Closed-form sections of Hugging Face decoder models (#16): attention (rotary, grouped-query)
and the norm and MLP of every layer (GPT-2's LayerNorm and ``Conv1D``, the SwiGLU of Llama,
Mistral and Qwen), the output projection and the final norm and unembedding, each equal to
exact probes at rtol 1e-10 (and their graph edges to backward passes);
``build_bases(sections="auto")`` finds them and equals backward passes end to end.
"""

from __future__ import annotations

import pytest
import torch

import degen_hooks as dh
from degen_hooks.families import hf
from degen_hooks.families.transformers import find_sections
from tests.reference import assert_same_bases, assert_same_edges

from .test_hf import build

pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
F64 = torch.float64
COVERED = ["gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma"]


def float64_norms(model):
    """Llama-style RMSNorm takes its variance in float32 whatever the dtype: the model's own
    Jacobian is then exact to ~1e-7. Compute it in float64, so exact probes test the closed
    form at float64 precision."""

    def forward(self, x):
        return self.weight * (
            x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        )

    def gemma(self, x):  # Gemma scales by 1 + weight
        return (1 + self.weight) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    for module in model.modules():
        if type(module).__name__ == "GemmaRMSNorm":
            module.forward = gemma.__get__(module)
        elif "RMSNorm" in type(module).__name__:
            module.forward = forward.__get__(module)
    return model


@pytest.fixture
def tokens():
    return torch.randint(1, 50, (6, 5), generator=torch.Generator().manual_seed(2))


def exact(model, tokens, site, readout, **target):
    with dh.collect(model, [site], jacobians="exact", readout=readout, **target) as run:
        run.backward(model(tokens).logits)
    return run.stats[site.key].grads.second_moment()


def assert_gram(actual, expected, rtol=1e-10):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


def readout_for(width, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(width, max(1, width - 3), generator=gen, dtype=F64)


@pytest.mark.parametrize("family", COVERED)
@pytest.mark.parametrize("positions", [None, "last"])
def test_every_pair_equals_exact_probes(family, positions, tokens):
    model = float64_norms(build(family))
    kinds = ["resid_mid", "mlp_hidden", "resid_post"]
    sites = hf.decoder_sites(model, kinds, layers=[1], positions=positions)
    found = find_sections(model, sites, None, positions)
    assert list(found) == [site.key for site in sites]  # every pair, the unembedding included
    for site, target in zip(sites, [*sites[1:], None], strict=True):
        section, pre = found[site.key]
        assert pre is None
        width = (section.w_out if section.w_out is not None else section.w_in).shape[0]
        readout = readout_for(width)
        if target is None:
            expected = exact(model, tokens, site, readout, target_positions=positions)
            out = dh.Site("", positions=positions)
        else:
            expected = exact(model, tokens, site, readout, target=target)
            out = target
        if isinstance(section, dh.MLPSection):
            closed = section.jacobian_gram(None, readout)
        else:
            gram = section.gram_pass(model, [tokens[:4], tokens[4:]], site, out, readout,
                                     forward=lambda m, b: m(b), progress=False)  # fmt: skip
            closed = gram.second_moment()
        assert_gram(closed, expected)


def test_uncovered_layers_are_left_to_backward_passes():
    model = build("phi3")  # a fused gate_up_proj
    sites = hf.decoder_sites(model, ["resid_mid", "resid_post"], layers=[0])
    assert find_sections(model, sites) == {}
    gpt2 = build("gpt2")
    crossing = hf.decoder_sites(gpt2, ["resid_mid"], layers=[0, 1])  # two layers apart
    assert find_sections(gpt2, crossing[:1], crossing[1]) == {}


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen3", "gemma"])
def test_auto_build_equals_backward_passes(family, tokens):
    model = float64_norms(build(family))
    sites = hf.decoder_sites(model, ["resid_pre", "resid_mid", "mlp_hidden", "resid_post"])
    data = [tokens[:3], tokens[3:]]
    common = {"forward": hf.forward, "progress": False}
    auto = dh.build_bases(model, sites, data, **common)
    probed = dh.build_bases(model, sites, data, sections=None, **common)
    closed = {label for label in auto.timings_ if label.endswith("(closed form)")}
    # Every pair in closed form, layer 0's output -> layer 1's input (the same tensor) too.
    assert len(closed) == len(sites)
    assert auto.sites_ == probed.sites_
    assert_same_bases(auto, probed)


# -- attention ------------------------------------------------------------------------------
ATTENTION = ["gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma"]  # qwen3: q and k normed
# (resid_pre, resid_mid) positions
ATTENTION_POSITIONS = [(None, None), (None, "last"), ([0, 2], [1, 3]), ("last", None)]


def attention_pair(model, layer, positions, *, previous_output=False):
    first, later = positions
    pre, mid = hf.decoder_sites(model, ["resid_pre", "resid_mid"], layers=[layer])
    if previous_output:  # the same tensor, named as the previous layer's output
        pre = hf.decoder_sites(model, "resid_post", layers=[layer - 1])[0]
    return dh.Site(pre.name, pre.io, first, arg=pre.arg), dh.Site(
        mid.name, mid.io, later, bypass=mid.bypass
    )


@pytest.mark.parametrize("family", ATTENTION)
@pytest.mark.parametrize("positions", ATTENTION_POSITIONS, ids=["all", "last", "lists", "from"])
def test_attention_equals_exact_probes(family, positions, tokens):
    """Rotary (Llama, Mistral, Qwen 2 and 3), grouped-query (2 key/value heads for 4), biases
    (GPT-2, Qwen 2), LayerNorm and RMSNorm before it, Qwen 3's RMSNorm of each head's q and k:
    the Gram of exact probes at rtol 1e-10."""
    model = float64_norms(build(family))
    for layer, previous_output in ((0, False), (1, True)):
        site, target = attention_pair(model, layer, positions, previous_output=previous_output)
        ((section, pre),) = find_sections(model, [site], target).values()
        assert type(section).__name__ == "HFAttentionSection" and pre is None
        readout = readout_for(model.config.hidden_size, seed=layer)
        expected = exact(model, tokens, site, readout, target=target)
        gram = section.gram_pass(model, [tokens[:4], tokens[4:]], site, target, readout,
                                 forward=hf.forward, progress=False)  # fmt: skip
        assert_gram(gram.second_moment(), expected)


def test_attention_the_closed_form_does_not_cover_is_left_to_backward_passes():
    """A GPT-2 layer with cross attention adds it before the MLP; norms of q and k other than
    Qwen 3's per-head RMSNorms (a LayerNorm, or a norm of k alone) are not followed."""
    model = build("gpt2", add_cross_attention=True)
    sites = hf.decoder_sites(model, ["resid_pre", "resid_mid"], layers=[0])
    assert find_sections(model, sites[:1], sites[1]) == {}
    for change in ("layernorm", "k only"):
        model = build("qwen3")
        attn = model.model.layers[0].self_attn
        if change == "layernorm":
            attn.q_norm = torch.nn.LayerNorm(4).double()
        else:
            del attn.q_norm
        sites = hf.decoder_sites(model, ["resid_pre", "resid_mid"], layers=[0])
        assert find_sections(model, sites[:1], sites[1]) == {}
    with pytest.raises(ValueError, match=r"norms of q and k \['LayerNorm', 'Qwen3RMSNorm'\]"):
        from degen_hooks.attention.qk_norm import QKNorm

        QKNorm.of_modules(torch.nn.LayerNorm(4), attn.k_norm, 4)


def test_qwen3_attention_whose_norms_round_through_float32(tokens):
    """transformers' RMSNorm of q and k takes its variance in float32 even in a float64
    model: the batch is accepted (checked at float32's tolerance) and its Gram is the
    float64 norms' to float32 rounding."""
    site, target = attention_pair(build("qwen3"), 1, (None, "last"))
    readout = readout_for(16)
    grams = []
    for model in (build("qwen3"), float64_norms(build("qwen3"))):
        ((section, _),) = find_sections(model, [site], target).values()
        gram = section.gram_pass(model, [tokens], site, target, readout, forward=hf.forward,
                                 progress=False)  # fmt: skip
        grams.append(gram.second_moment())
    assert_gram(grams[0], grams[1], rtol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_attention_refuses_what_it_would_get_wrong(family, tokens):
    """Padding, per-row positions and dropout change the pattern: refused, never used."""
    from .test_hf import padded_batches

    model = build(family)
    site, target = attention_pair(model, 1, (None, None))
    ((section, _),) = find_sections(model, [site], target).values()
    run = {"forward": hf.forward, "progress": False}
    with pytest.raises(ValueError, match="differs from the closed form's.*padding"):
        section.gram_pass(model, padded_batches()[:1], site, target, **run)
    per_row = {"input_ids": tokens, "position_ids": torch.arange(5) + torch.arange(6)[:, None]}
    if family == "llama":
        with pytest.raises(ValueError, match="differ across the batch.*position_ids"):
            section.gram_pass(model, [per_row], site, target, **run)
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    if family == "gpt2":  # dropout on the pattern, then only after the output projection
        with pytest.raises(ValueError, match="heads' outputs.*eval mode"):
            section.gram_pass(model, [tokens], site, target, **run)
        model.get_submodule("transformer.h.1.attn.attn_dropout").p = 0.0
        with pytest.raises(ValueError, match="its output.*eval mode"):
            section.gram_pass(model, [tokens], site, target, **run)
    model.eval()
    with pytest.raises(dh.ShapeMismatchError, match="decoder_sites"):
        section.gram_pass(model, [tokens], target, site, **run)


def test_rotary_attention_at_shifted_positions(tokens):
    """position_ids shared by the batch: the section rotates by the tables the model was
    passed, so the Gram is still the exact probes'."""
    model = float64_norms(build("llama"))
    site, target = attention_pair(model, 1, (None, "last"))
    ((section, _),) = find_sections(model, [site], target).values()
    batch = {"input_ids": tokens, "position_ids": torch.arange(3, 8).expand(6, 5)}
    readout = readout_for(model.config.hidden_size)
    with dh.collect(model, [site], jacobians="exact", readout=readout, target=target) as run:
        run.backward(hf.forward(model, batch))
    expected = run.stats[site.key].grads.second_moment()
    gram = section.gram_pass(model, [batch], site, target, readout, forward=hf.forward,
                             progress=False)  # fmt: skip
    assert_gram(gram.second_moment(), expected)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_attention_in_float32(tokens, family):
    """A float32 model passes the check (its own rounding) and gives the float64 Gram to
    float32 precision."""
    model = build(family)
    site, target = attention_pair(model, 1, (None, None))
    ((section, _),) = find_sections(model, [site], target).values()
    run = {"forward": hf.forward, "progress": False}
    expected = section.gram_pass(model, [tokens], site, target, **run).second_moment()
    ((single, _),) = find_sections(model.float(), [site], target).values()
    actual = single.gram_pass(model, [tokens], site, target, **run).second_moment()
    assert_gram(actual, expected, rtol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen3"])
def test_attention_edges_equal_backward_passes(family, tokens):
    """Interaction-graph edges of every pair, attention included, in closed form: the
    backward path's at rtol 1e-10, exact, stochastic and integrated."""
    from degen_hooks.graph import InteractionGraph

    model = float64_norms(build(family))
    sites = [
        *attention_pair(model, 0, (None, "last")),
        *hf.decoder_sites(model, ["resid_post"], layers=[0], positions="last"),
    ]
    data = [tokens[:3], tokens[3:]]
    run = {"forward": hf.forward, "progress": False}
    basis = dh.build_bases(model, sites, data, **run)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for rule in ({}, {"method": "stochastic", "n_sources": 2, "seed": 5},
                 {"integration": "gauss-legendre", "n_intervals": 2}):  # fmt: skip
        closed = InteractionGraph(**rule).fit(model, basis, data, **run)
        backward = InteractionGraph(**rule).fit(model, basis, data, sections=None, **run)
        assert closed.closed_form_ == closed.pairs_ and backward.closed_form_ == []
        for pair in closed.pairs_:
            expected = backward.edges_[pair]
            torch.testing.assert_close(closed.edges_[pair], expected, rtol=1e-10,
                                       atol=1e-14 * float(expected.max()))  # fmt: skip
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in model.named_parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_closed_forms_on_an_fsdp2_sharded_model(family, tokens, shard):
    """FSDP2 leaves DTensor shards in the weights: the sections gather them whole, and a
    build with no backward pass equals the unsharded model's."""
    model, plain = float64_norms(build(family)), float64_norms(build(family))
    model = shard(model, [model.get_submodule(layer) for layer in hf.decoder_layers(model)])
    assert type(next(model.parameters())).__name__ == "DTensor"
    sites = hf.decoder_sites(model, ["resid_pre", "resid_mid", "mlp_hidden", "resid_post"])
    data, common = [tokens[:3], tokens[3:]], {"forward": hf.forward, "progress": False}
    sharded = dh.build_bases(model, sites, data, **common)
    assert all(label.endswith("(closed form)") for label in sharded.timings_ if "jac" in label)
    assert_same_bases(sharded, dh.build_bases(plain, sites, data, **common))


FSDP_WORKER = """
import sys
from datetime import timedelta
import torch, torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
import degen_hooks as dh
from degen_hooks.families import hf
from tests.integration.test_hf_sections import fsdp_case

torch.set_num_threads(1)
rank, world, port, out = sys.argv[1:5]
rank, world = int(rank), int(world)
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                        world_size=world, timeout=timedelta(seconds=600))
mesh = init_device_mesh("cpu", (world,))
model, sites, data = fsdp_case()
for layer in hf.decoder_layers(model):
    fully_shard(model.get_submodule(layer), mesh=mesh)
fully_shard(model, mesh=mesh)
basis = dh.build_bases(model, sites, data[rank::world], forward=hf.forward, distributed=True,
                       progress=False)
closed = [label for label in basis.timings_ if label.endswith("(closed form)")]
state = {f"projector/{key}": basis.projector(key) for key in basis.sites_}
state.update({f"lambdas/{key}": basis.lambdas_[key] for key in basis.sites_})
state["n_closed"] = torch.tensor(len(closed))
save_file(state, f"{out}/rank{rank}.safetensors")
dist.destroy_process_group()
"""


def fsdp_case():
    """The model, sites and batches of the two-rank FSDP2 build (each rank takes every
    other batch)."""
    model = float64_norms(build("llama"))
    sites = hf.decoder_sites(model, ["resid_pre", "resid_mid", "mlp_hidden", "resid_post"])
    tokens = torch.randint(1, 50, (16, 5), generator=torch.Generator().manual_seed(4))
    return model, sites, list(tokens.split(4))


def test_closed_forms_on_two_fsdp2_ranks(tmp_path):
    """Two ranks shard the model (FSDP2, gloo) and build on their own batches with no backward
    pass (distributed=True): each holds the basis of the whole model on all the batches."""
    from safetensors.torch import load_file

    from tests.unit.test_distributed import launch_workers

    dist = pytest.importorskip("torch.distributed")
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    pytest.importorskip("torch.distributed.fsdp", reason="fully_shard needs torch >= 2.6")
    logs = launch_workers(FSDP_WORKER, tmp_path)
    model, sites, data = fsdp_case()
    want = dh.build_bases(model, sites, data, forward=hf.forward, progress=False)
    for rank in range(2):
        path = tmp_path / f"rank{rank}.safetensors"
        assert path.exists(), f"rank {rank} saved nothing; its output:\n{logs[rank]}"
        got = load_file(str(path))
        assert int(got["n_closed"]) == len(sites)
        for key in want.sites_:
            scale = float(want.lambdas_[key].max())
            torch.testing.assert_close(got[f"lambdas/{key}"], want.lambdas_[key], rtol=0,
                                       atol=1e-9 * scale)  # fmt: skip
            torch.testing.assert_close(got[f"projector/{key}"], want.projector(key), rtol=0,
                                       atol=1e-7)  # fmt: skip


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_library_hooks_are_not_the_users(family, tokens):
    """transformers installs hooks of its own on the layers and attention once a forward
    asks for hidden states (recording only): the closed forms stay, with no warning."""
    import warnings

    model = float64_norms(build(family))
    with torch.no_grad():
        model(input_ids=tokens, output_hidden_states=True, output_attentions=True)
    assert any(m._forward_hooks for m in model.modules())  # transformers' output capturing
    sites = hf.decoder_sites(model, ["resid_pre", "resid_mid", "resid_post"], layers=[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        found = find_sections(model, sites)
    assert set(found) == {site.key for site in sites}  # the last one to the logits


ATTENTION_HOOKS = {
    "gpt2": ["ln_1", "attn.c_attn"],
    "llama": ["input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
}


@pytest.mark.parametrize(
    ("family", "module"),
    [(family, module) for family, modules in ATTENTION_HOOKS.items() for module in modules],
)
def test_a_hook_that_changes_q_k_or_v_is_refused_not_ignored(family, module, tokens):
    """A hook of the user's on the norm before attention or on a projection (steering q, k
    or v) changes what the section differentiates as ``norm(x) W + b``: the Gram pass and
    the edges refuse the batch instead of returning the unhooked model's Jacobians."""

    model, sites, section, basis, layer = unhooked_case(family, ["resid_pre", "resid_mid"], tokens)
    hook = layer.get_submodule(module).register_forward_hook(lambda m, a, out: out * 1.5)
    refused = r"differs from the closed form.*hook"
    try:
        with pytest.raises(ValueError, match=refused):
            section.gram_pass(model, [tokens], sites[0], sites[1], **RUN)
        assert_follows_the_hook(model, sites, tokens, basis)
    finally:
        hook.remove()


RUN = {"forward": hf.forward, "progress": False}


def unhooked_case(family, kinds, tokens):
    """``(model, sites, section of the first pair, basis, layer 1)``, built without hooks."""
    model = float64_norms(build(family))
    sites = hf.decoder_sites(model, kinds, layers=[1], positions="last")
    section, _ = find_sections(model, sites)[sites[0].key]
    basis = dh.build_bases(model, sites, [tokens], **RUN)
    return model, sites, section, basis, model.get_submodule(hf.decoder_layers(model)[1])


def assert_follows_the_hook(model, sites, tokens, basis):
    """Finding sections themselves, ``build_bases`` and the graph leave the hooked pair to
    backward passes (with a warning), which follow the hook."""
    from degen_hooks.graph import InteractionGraph

    with pytest.warns(UserWarning, match="hook of yours"):
        auto = dh.build_bases(model, sites, [tokens], **RUN)
    assert_same_bases(auto, dh.build_bases(model, sites, [tokens], sections=None, **RUN))
    with pytest.warns(UserWarning, match="hook of yours"):
        graph = InteractionGraph().fit(model, basis, [tokens], **RUN)
    assert graph.closed_form_ == []
    assert_same_edges(graph, InteractionGraph().fit(model, basis, [tokens], sections=None, **RUN))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("where", ["hidden", "output"])
def test_a_hook_that_changes_the_mlp_is_refused_not_ignored(family, where, tokens):
    """A hook of the user's (steering, ablation, patching) that changes the MLP's hidden
    activation (a pre-hook on the down projection) or its output (a hook on the MLP module)
    makes the model differ from the section's weights: the Gram pass and the edges refuse
    the batch instead of returning the unhooked model's Jacobians."""

    model, sites, section, basis, layer = unhooked_case(family, ["resid_mid", "resid_post"], tokens)
    if where == "hidden":
        down = layer.get_submodule("mlp.c_proj" if family == "gpt2" else "mlp.down_proj")
        handle = down.register_forward_pre_hook(lambda m, a: (a[0] * 1.5,))
    else:
        handle = layer.get_submodule("mlp").register_forward_hook(lambda m, a, out: out * 1.5)
    refused = r"(hidden activation|output).*differs.*hook"
    try:
        with pytest.raises(ValueError, match=refused):
            section.gram_pass(model, [tokens], sites[0], sites[1], **RUN)
        assert_follows_the_hook(model, sites, tokens, basis)
    finally:
        handle.remove()
