"""degen_hooks on Hugging Face ``transformers`` models: GPT-2 and Llama-style decoders.

Every test builds tiny float64 models from configs (no download) with random, perturbed
weights, and checks :mod:`degen_hooks.families.hf` against brute force: residual-stream
statistics against ``output_hidden_states``, MLP statistics against a hand-written MLP,
Jacobian Grams against autograd, writes (``dh.ablate`` at each kind of site) against a
hand-written decoder layer, and the user's model unchanged after every block.

The models use transformers' default attention (SDPA), which computes in float64; its
"eager" attention of Llama-style models takes the softmax in float32, where the float64
mask minimum becomes -inf, so a left-padded row turns to NaN there.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import degen_hooks as dh
from degen_hooks.families import hf

transformers = pytest.importorskip("transformers")
# torch has no vmap batching rule for the CPU SDPA backward (the batched exact probes): slower,
# not wrong.
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

VOCAB, N_POS, N_LAYERS, D_MODEL = 50, 7, 2, 16
RTOL, ATOL = 1e-10, 1e-10
_LLAMA_CONFIG = dict(
    hidden_size=D_MODEL,
    intermediate_size=32,
    num_hidden_layers=N_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=32,
    pad_token_id=0,
)
# family: (config class, model class, config keyword arguments)
FAMILIES: dict[str, tuple[str, str, dict]] = {
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(
            n_layer=N_LAYERS,
            n_embd=D_MODEL,
            n_head=2,
            vocab_size=VOCAB,
            n_positions=16,
            bos_token_id=0,
            eos_token_id=0,
        ),
    ),
    "llama": ("LlamaConfig", "LlamaForCausalLM", _LLAMA_CONFIG),
    "mistral": ("MistralConfig", "MistralForCausalLM", _LLAMA_CONFIG),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _LLAMA_CONFIG),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**_LLAMA_CONFIG, "head_dim": 4}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {**_LLAMA_CONFIG, "head_dim": 4}),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", _LLAMA_CONFIG),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", _LLAMA_CONFIG),
}
MAIN = ["gpt2", "llama"]
LLAMA_STYLE = [f for f in FAMILIES if f not in MAIN]
FINAL_NORM = {"gpt2": "transformer.ln_f", "gpt_neox": "gpt_neox.final_layer_norm"}


# -- models and batches ----------------------------------------------------------------------
def build(family: str, seed: int = 0, **overrides: Any) -> nn.Module:
    """A float64 model of ``family`` in eval mode, with every parameter perturbed."""
    config_class, model_class, kwargs = FAMILIES[family]
    config = getattr(transformers, config_class)(**{**kwargs, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config).double().eval()
    # Fresh models have zero biases and unit norm gains, which hide layout mistakes (a
    # forgotten gain, a transposed weight): give every parameter a random offset.
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return model


def padded_batches(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Two batches of 5 rows: one right-padded, one left-padded (one row unpadded in each)."""
    generator = torch.Generator().manual_seed(seed)
    right = torch.ones(5, N_POS, dtype=torch.long)
    right[1, 4:], right[2, 2:], right[3, 6:] = 0, 0, 0
    left = torch.ones(5, N_POS, dtype=torch.long)
    left[0, :3], left[2, :5], left[4, :1] = 0, 0, 0
    batches = []
    for attention_mask in (right, left):
        ids = torch.randint(1, VOCAB, (5, N_POS), generator=generator)
        batches.append({"input_ids": ids * attention_mask, "attention_mask": attention_mask})
    return batches


def final_norm(model: nn.Module) -> nn.Module:
    return model.get_submodule(FINAL_NORM.get(model.config.model_type, "model.norm"))


def collected(model: nn.Module, sites: list, batches: list[dict], **kwargs) -> dh.Statistics:
    """Statistics of ``sites`` over ``batches``, each with its padding mask."""
    with dh.collect(model, sites, **kwargs) as run, torch.no_grad():
        for batch in batches:
            run.set_mask(hf.mask(batch))
            hf.forward(model, batch)
    return run.stats


# -- brute force ------------------------------------------------------------------------------
def reference_residuals(model: nn.Module, batch: dict) -> list[torch.Tensor]:
    """The residual stream before every layer, then after the last: ``n_layers + 1`` tensors.

    From ``output_hidden_states``, whose last entry is the final norm's output: the last
    layer's output is read at the final norm's input instead (and checked against it).
    """
    captured = []
    handle = final_norm(model).register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        with torch.no_grad():
            out = model(**batch, output_hidden_states=True, use_cache=False)
    finally:
        handle.remove()
    hidden = list(out.hidden_states)
    assert len(hidden) == model.config.num_hidden_layers + 1
    with torch.no_grad():
        torch.testing.assert_close(hidden[-1], final_norm(model)(captured[0]), rtol=0, atol=0)
    return hidden[:-1] + captured


def rows(acts: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The real tokens of ``acts`` (batch, pos, d) as rows (n, d)."""
    return acts[attention_mask.bool()]


def last_real(acts: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Each row's last real token, found one row at a time."""
    picked = []
    for row in range(acts.shape[0]):
        real = [p for p in range(acts.shape[1]) if attention_mask[row, p]]
        picked.append(acts[row, max(real)])
    return torch.stack(picked)


def assert_moments(stats, reference: torch.Tensor) -> None:
    assert stats.n_samples == reference.shape[0]
    torch.testing.assert_close(stats.mean(), reference.mean(0), rtol=RTOL, atol=1e-12)
    cov = torch.cov(reference.T, correction=0)
    torch.testing.assert_close(stats.cov(), cov, rtol=RTOL, atol=1e-12)


def handwritten_mlp(family: str, layer: nn.Module, resid_mid: torch.Tensor) -> dict:
    """The MLP of ``layer`` written out from its weights: normalised input, hidden, output."""
    h = resid_mid
    if family == "gpt2":
        norm, mlp = layer.ln_2, layer.mlp
        centred = h - h.mean(-1, keepdim=True)
        scale = torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + norm.eps)
        x = centred / scale * norm.weight + norm.bias
        pre = x @ mlp.c_fc.weight + mlp.c_fc.bias  # Conv1D: weight is (in, out)
        inner = math.sqrt(2 / math.pi) * (pre + 0.044715 * pre**3)
        hidden = 0.5 * pre * (1 + torch.tanh(inner))  # gelu_new
        out = hidden @ mlp.c_proj.weight + mlp.c_proj.bias
    else:
        norm, mlp = layer.post_attention_layernorm, layer.mlp
        # transformers' LlamaRMSNorm computes in float32 (and back): do the same.
        h32 = h.float()
        x = norm.weight * (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(h)
        gate, up = x @ mlp.gate_proj.weight.T, x @ mlp.up_proj.weight.T
        hidden = gate * torch.sigmoid(gate) * up  # silu(gate) * up
        out = hidden @ mlp.down_proj.weight.T
    return {"resid_mid": h, "mlp_in": x, "mlp_hidden": hidden, "mlp_out": out}


Edit = Callable[[torch.Tensor], torch.Tensor]


def layer_by_hand(layer: nn.Module, args: tuple, kwargs: dict, edits: dict[str, Edit]) -> Any:
    """One decoder layer computed from its submodules, with ``edits[kind]`` applied to the
    tensor of that kind. ``"resid_mid"`` is edited once, for the MLP and the skip alike;
    ``"resid_mid_mlp_only"`` edits it on the MLP's input only (a write without bypass)."""
    bound = inspect.signature(layer.forward).bind(*args, **kwargs)
    arguments = dict(bound.arguments)
    arguments.update(arguments.pop("kwargs", {}))
    x = arguments.pop("hidden_states")
    for unused in ("encoder_hidden_states", "encoder_attention_mask"):
        arguments.pop(unused, None)
    keep = lambda t: t  # noqa: E731
    x = edits.get("resid_pre", keep)(x)
    if hasattr(layer, "ln_1"):  # GPT-2
        attn, _ = layer.attn(layer.ln_1(x), **arguments)
        norm = layer.ln_2
    else:  # Llama-style
        attn, _ = layer.self_attn(hidden_states=layer.input_layernorm(x), **arguments)
        norm = layer.post_attention_layernorm
    h = edits.get("resid_mid", keep)(x + attn)
    mlp_in = edits.get("mlp_in", keep)(norm(edits.get("resid_mid_mlp_only", keep)(h)))
    mlp = layer.mlp
    if "mlp_hidden" in edits:
        if hasattr(mlp, "c_fc"):
            hidden, down = mlp.act(mlp.c_fc(mlp_in)), mlp.c_proj
        elif hasattr(mlp, "gate_up_proj"):  # Phi-3: one fused projection
            gate, up = mlp.gate_up_proj(mlp_in).chunk(2, dim=-1)
            hidden, down = up * mlp.activation_fn(gate), mlp.down_proj
        else:
            hidden = mlp.act_fn(mlp.gate_proj(mlp_in)) * mlp.up_proj(mlp_in)
            down = mlp.down_proj
        out = down(edits["mlp_hidden"](hidden))
    else:
        out = mlp(mlp_in)
    return edits.get("resid_post", keep)(h + edits.get("mlp_out", keep)(out))


def by_hand(model: nn.Module, batch: dict, edits: dict[int, dict[str, Edit]]) -> torch.Tensor:
    """Logits with every decoder layer replaced by :func:`layer_by_hand` (edits by layer)."""
    handles = []
    for index, name in enumerate(hf.decoder_layers(model)):
        replace = _replacement(edits.get(index, {}))
        handles.append(model.get_submodule(name).register_forward_hook(replace, with_kwargs=True))
    try:
        with torch.no_grad():
            return hf.forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()


def _replacement(edits: dict[str, Edit]) -> Callable:
    def replace(layer: nn.Module, args: tuple, kwargs: dict, _output: Any) -> Any:
        return layer_by_hand(layer, args, kwargs, edits)

    return replace


def forward_reading(
    model: nn.Module, names: list[str], batch: dict
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits, and the first positional input of each module in ``names``, by plain hooks."""
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda _m, args, seen=captured[name]: seen.append(args[0])
        )
        for name in names
    ]
    try:
        logits = model(**batch, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    assert all(len(seen) == 1 for seen in captured.values())
    return logits, [captured[name][0] for name in names]


def read_input(model: nn.Module, name: str, batch: dict) -> torch.Tensor:
    """The first positional input of module ``name`` in a forward pass."""
    with torch.no_grad():
        return forward_reading(model, [name], batch)[1][0]


def projection(basis: dh.InteractionBasis, key: str, keep: int) -> Edit:
    """What ``dh.ablate(model, basis, key, keep=keep)`` does to a tensor, written out."""
    projector, mean = basis.projector(key, keep=keep), basis.means_[key]
    return lambda t: (t - mean) @ projector + mean


def hook_state(model: nn.Module) -> list[tuple[str, int, int, int]]:
    return [
        (name, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
        for name, m in model.named_modules(remove_duplicate=False)
    ]


@pytest.fixture(params=MAIN)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def model(family: str) -> nn.Module:
    return build(family)


@pytest.fixture
def batches() -> list[dict[str, torch.Tensor]]:
    return padded_batches()


# -- sites ------------------------------------------------------------------------------------
def test_decoder_layers_and_labels(model, family):
    prefix = {"gpt2": "transformer.h", "llama": "model.layers"}[family]
    assert hf.decoder_layers(model) == [f"{prefix}.0", f"{prefix}.1"]
    sites = hf.decoder_sites(model, hf.SITE_KINDS)
    keys = [site.key for site in sites]
    assert keys == [f"{prefix}.{i}.{kind}" for i in range(N_LAYERS) for kind in hf.SITE_KINDS]
    # The tensors are where the module docstring says they are.
    down = {"gpt2": "mlp.c_proj", "llama": "mlp.down_proj"}[family]
    norm = {"gpt2": "ln_2", "llama": "post_attention_layernorm"}[family]
    layer1 = {site.key.rsplit(".", 1)[-1]: site for site in sites[len(hf.SITE_KINDS) :]}
    assert (layer1["resid_pre"].name, layer1["resid_pre"].io) == (f"{prefix}.1", "input")
    assert layer1["resid_pre"].arg == "hidden_states"
    assert (layer1["resid_mid"].name, layer1["resid_mid"].io) == (f"{prefix}.1.{norm}", "input")
    assert layer1["resid_mid"].bypass == f"{prefix}.1"
    assert (layer1["resid_post"].name, layer1["resid_post"].io) == (f"{prefix}.1", "output")
    assert (layer1["mlp_in"].name, layer1["mlp_in"].io) == (f"{prefix}.1.mlp", "input")
    assert (layer1["mlp_hidden"].name, layer1["mlp_hidden"].io) == (f"{prefix}.1.{down}", "input")
    assert (layer1["mlp_out"].name, layer1["mlp_out"].io) == (f"{prefix}.1.mlp", "output")
    assert all(site.bypass is None for site in sites if not site.key.endswith("resid_mid"))


def test_layers_and_positions_select(model):
    sites = hf.decoder_sites(model, ["mlp_out", "resid_pre"], layers=[-1], positions="last")
    assert [site.key.split(".", 2)[-1] for site in sites] == ["1.mlp_out", "1.resid_pre"]
    assert all(site.positions == "last" for site in sites)
    assert len(hf.decoder_sites(model, "resid_post", layers=0)) == 1


# -- statistics vs brute force ---------------------------------------------------------------
def test_residual_stream_matches_hidden_states(model, batches):
    sites = hf.decoder_sites(model, ["resid_pre", "resid_post"])
    last = hf.decoder_sites(model, "resid_post", positions="last")
    last = [dh.Site(s.name, positions="last", label=s.key + ".last") for s in last]
    stats = collected(model, sites + last, batches)
    references = [reference_residuals(model, batch) for batch in batches]
    masks = [batch["attention_mask"] for batch in batches]
    for i, name in enumerate(hf.decoder_layers(model)):
        pre = torch.cat([rows(ref[i], m) for ref, m in zip(references, masks, strict=True)])
        post = torch.cat([rows(ref[i + 1], m) for ref, m in zip(references, masks, strict=True)])
        assert pre.shape[0] == sum(int(m.sum()) for m in masks)  # padding is no sample
        assert_moments(stats[f"{name}.resid_pre"].acts, pre)
        assert_moments(stats[f"{name}.resid_post"].acts, post)
        tokens = [last_real(ref[i + 1], m) for ref, m in zip(references, masks, strict=True)]
        assert_moments(stats[f"{name}.resid_post.last"].acts, torch.cat(tokens))


def test_last_real_token_with_right_and_left_padding(model, batches):
    sites = hf.decoder_sites(model, "resid_mid", positions="last")
    for batch in batches:
        stats = collected(model, sites, [batch])
        for site in sites:
            resid_mid = read_input(model, site.name, batch)  # the input of the norm
            assert_moments(stats[site.key].acts, last_real(resid_mid, batch["attention_mask"]))


def test_mlp_statistics_match_handwritten_mlp(model, family, batches):
    kinds = ["resid_mid", "mlp_in", "mlp_hidden", "mlp_out"]
    stats = collected(model, hf.decoder_sites(model, kinds), batches)
    for i, name in enumerate(hf.decoder_layers(model)):
        layer = model.get_submodule(name)
        expected: dict[str, list[torch.Tensor]] = {kind: [] for kind in kinds}
        for batch in batches:
            # The residual after attention, read with a plain hook.
            norm = "ln_2" if family == "gpt2" else "post_attention_layernorm"
            resid_mid = read_input(model, f"{name}.{norm}", batch)
            with torch.no_grad():
                written = handwritten_mlp(family, layer, resid_mid)
            # The hand-written MLP is the model's: the residual after it is the next one.
            post = reference_residuals(model, batch)[i + 1]
            torch.testing.assert_close(
                written["resid_mid"] + written["mlp_out"], post, rtol=RTOL, atol=ATOL
            )
            for kind in kinds:
                expected[kind].append(rows(written[kind], batch["attention_mask"]))
        for kind in kinds:
            assert_moments(stats[f"{name}.{kind}"].acts, torch.cat(expected[kind]))


# -- writes vs a hand-written decoder layer ------------------------------------------------------
def test_handwritten_layer_is_the_model(model, batches):
    for batch in batches:
        with torch.no_grad():
            logits = hf.forward(model, batch)
        torch.testing.assert_close(by_hand(model, batch, {}), logits, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kind", hf.SITE_KINDS)
def test_ablate_matches_handwritten_layer(model, batches, kind):
    sites = hf.decoder_sites(model, kind)
    basis = dh.InteractionBasis(variant="pca").fit(collected(model, sites, batches))
    for index, site in enumerate(sites):
        keep = max(1, basis.widths_[site.key] // 3)
        edit = projection(basis, site.key, keep)
        for batch in batches:
            with dh.ablate(model, basis, site.key, keep=keep), torch.no_grad():
                ablated = hf.forward(model, batch)
            expected = by_hand(model, batch, {index: {kind: edit}})
            torch.testing.assert_close(ablated, expected, rtol=RTOL, atol=ATOL)
            assert not torch.allclose(ablated, hf.forward(model, batch))  # the write mattered


def test_resid_mid_write_reaches_the_skip_connection(model, batches):
    """The residual after attention feeds the MLP and the skip around it: a write at the
    norm's input alone (no bypass) changes the model differently from a write to both."""
    (site,) = hf.decoder_sites(model, "resid_mid", layers=0)
    basis = dh.InteractionBasis(variant="pca").fit(collected(model, [site], batches))
    edit = projection(basis, site.key, keep=2)
    batch = batches[1]
    with dh.ablate(model, basis, site.key, keep=2), torch.no_grad():
        ablated = hf.forward(model, batch)
    both = by_hand(model, batch, {0: {"resid_mid": edit}})
    mlp_only = by_hand(model, batch, {0: {"resid_mid_mlp_only": edit}})
    torch.testing.assert_close(ablated, both, rtol=RTOL, atol=ATOL)
    assert (mlp_only - both).abs().max() > 1e-3
    # The same site without its bypass writes the MLP's input only.
    alone = dataclasses.replace(site, bypass=None)
    basis = dh.InteractionBasis(variant="pca").fit(collected(model, [alone], batches))
    with dh.ablate(model, basis, site.key, keep=2), torch.no_grad():
        torch.testing.assert_close(hf.forward(model, batch), mlp_only, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("family", LLAMA_STYLE)
@pytest.mark.parametrize("kind", ["resid_mid", "mlp_hidden"])
def test_llama_style_families(family, kind):
    model, batches = build(family), padded_batches()
    sites = hf.decoder_sites(model, kind, layers=-1)
    assert sites[0].key == f"model.layers.{N_LAYERS - 1}.{kind}"
    basis = dh.InteractionBasis(variant="pca").fit(collected(model, sites, batches))
    edit = projection(basis, sites[0].key, keep=3)
    for batch in batches:
        torch.testing.assert_close(by_hand(model, batch, {}), hf.forward(model, batch))
        with dh.ablate(model, basis, sites[0].key, keep=3), torch.no_grad():
            ablated = hf.forward(model, batch)
        expected = by_hand(model, batch, {N_LAYERS - 1: {kind: edit}})
        torch.testing.assert_close(ablated, expected, rtol=RTOL, atol=ATOL)


def test_residual_stream_of_any_decoder_model():
    """resid_pre / resid_post need only the layer list: GPT-NeoX, whose layout is unknown."""
    config = transformers.GPTNeoXConfig(
        hidden_size=D_MODEL,
        intermediate_size=32,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(config).double().eval()
    batches = padded_batches()
    stats = collected(model, hf.decoder_sites(model, ["resid_pre", "resid_post"]), batches)
    for i, name in enumerate(hf.decoder_layers(model)):
        for kind, offset in (("resid_pre", 0), ("resid_post", 1)):
            reference = [
                rows(reference_residuals(model, b)[i + offset], b["attention_mask"])
                for b in batches
            ]
            assert_moments(stats[f"{name}.{kind}"].acts, torch.cat(reference))
    with pytest.raises(dh.SiteNotFoundError, match="does not know the layer layout.*gpt_neox"):
        hf.decoder_sites(model, "resid_mid")


# -- Jacobians ---------------------------------------------------------------------------------
def test_jacobian_grams_match_autograd(model, batches, one_thread):
    """Exact probes through a padded batch: every real (position, logit) of the output is
    probed, every real token (or each row's last) of a site is a sample."""
    sites = hf.decoder_sites(model, "resid_mid", positions="last")
    sites += hf.decoder_sites(model, "mlp_hidden", layers=0)
    with dh.collect(model, sites, jacobians="exact") as run:
        run.over(batches, forward=hf.forward, mask=hf.mask, progress=False)
    grams = {site.key: 0.0 for site in sites}
    n_rows = dict.fromkeys(grams, 0)
    for batch in batches:
        real = batch["attention_mask"].bool()
        logits, inputs = forward_reading(model, [site.name for site in sites], batch)
        for site in sites:
            n_rows[site.key] += real.shape[0] if site.positions == "last" else int(real.sum())
        for position in range(N_POS):
            for logit in range(VOCAB):
                probe = torch.zeros_like(logits)
                probe[:, position, logit] = real[:, position].to(probe)
                grads = torch.autograd.grad(logits, inputs, probe, retain_graph=True)
                for site, grad in zip(sites, grads, strict=True):
                    g = last_real(grad, real) if site.positions == "last" else grad[real]
                    grams[site.key] = grams[site.key] + g.T @ g
    for site in sites:
        expected = grams[site.key] / n_rows[site.key]
        got = run.stats[site.key].grads.second_moment()
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12 * expected.abs().max())


# -- the user's model is unchanged ------------------------------------------------------------
def test_model_unchanged_after_collect_and_ablate(model, batches):
    batch = batches[1]
    with torch.no_grad():
        logits = hf.forward(model, batch)
    params = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = hook_state(model)
    sites = hf.decoder_sites(model, hf.SITE_KINDS)
    with dh.collect(model, sites) as run, torch.no_grad():
        run.set_mask(hf.mask(batch))
        inside = hf.forward(model, batch)
    assert torch.equal(inside, logits)  # hooks only read
    assert hook_state(model) == hooks
    basis = dh.InteractionBasis(variant="pca").fit(run.stats)
    with dh.ablate(model, basis, sites[1].key, keep=1), torch.no_grad():
        assert not torch.allclose(hf.forward(model, batch), logits)
    assert hook_state(model) == hooks
    with pytest.raises(RuntimeError, match="inside the block"):
        with dh.collect(model, sites):
            raise RuntimeError("inside the block")
    with pytest.raises(RuntimeError, match="inside the block"):
        with dh.ablate(model, basis, sites[1].key, keep=1):
            raise RuntimeError("inside the block")
    assert hook_state(model) == hooks
    with torch.no_grad():
        assert torch.equal(hf.forward(model, batch), logits)
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())


# -- forward and mask -------------------------------------------------------------------------
def test_forward_and_mask(model, batches):
    batch = batches[0]
    with torch.no_grad():
        expected = model(**batch).logits
        torch.testing.assert_close(hf.forward(model, batch), expected, rtol=0, atol=0)
        assert hf.forward(model, batch["input_ids"]).shape == (5, N_POS, VOCAB)
        base = model.get_submodule("transformer" if hasattr(model, "transformer") else "model")
        assert hf.forward(base, batch).shape == (5, N_POS, D_MODEL)  # last_hidden_state
    assert torch.equal(hf.mask(batch), batch["attention_mask"].bool())
    assert hf.mask({"input_ids": batch["input_ids"]}) is None
    assert hf.mask(batch["input_ids"]) is None


def test_run_over_with_mask_equals_set_mask(model, batches):
    sites = hf.decoder_sites(model, ["resid_mid", "mlp_hidden"], positions="last")
    expected = collected(model, sites, batches)
    with dh.collect(model, sites) as run:
        run.over(batches, forward=hf.forward, mask=hf.mask, progress=False)
    for site in sites:
        got, want = run.stats[site.key].acts, expected[site.key].acts
        assert got.n_samples == want.n_samples == 10
        torch.testing.assert_close(got.cov(), want.cov(), rtol=RTOL, atol=1e-12)


# -- errors that teach ------------------------------------------------------------------------
def test_errors(model):
    with pytest.raises(ValueError, match="Unknown site kind 'resid_mdi'. Did you mean 'resid_mid'"):
        hf.decoder_sites(model, "resid_mdi")
    with pytest.raises(ValueError, match="No site kind given"):
        hf.decoder_sites(model, [])
    with pytest.raises(ValueError, match="Layer 2 is out of range: the model has 2 decoder"):
        hf.decoder_sites(model, "resid_pre", layers=[0, 2])
    with pytest.raises(ValueError, match="layers must be ints"):
        hf.decoder_sites(model, "resid_pre", layers=["0"])
    with pytest.raises(TypeError, match="expects a Hugging Face transformers model.*Sequential"):
        hf.decoder_sites(nn.Sequential(nn.Linear(2, 2)), "resid_pre")
    with pytest.raises(TypeError, match="a dict of model inputs.*got list"):
        hf.mask([[1, 1]])
    with pytest.raises(TypeError, match="a dict of model inputs.*got list"):
        hf.forward(model, [[1, 1]])
    with pytest.raises(dh.ShapeMismatchError, match=r"shape \(2, 1, 3, 3\).*2-d"):
        hf.mask({"attention_mask": torch.ones(2, 1, 3, 3)})


def test_errors_on_unexpected_layouts(model):
    layers = hf.decoder_layers(model)
    model.config.num_hidden_layers = 3
    with pytest.raises(dh.SiteNotFoundError, match="found no nn.ModuleList of 3 layers"):
        hf.decoder_layers(model)
    model.config.num_hidden_layers = N_LAYERS
    layer = model.get_submodule(layers[0])
    del layer.mlp
    with pytest.raises(dh.SiteNotFoundError, match="has no submodule 'mlp'"):
        hf.decoder_sites(model, "mlp_out")
    assert len(hf.decoder_sites(model, "resid_post")) == N_LAYERS  # needs no layout


def test_gradient_checkpointing_counts_each_batch_once(batches):
    """Training with gradient checkpointing runs each layer's submodules again in the
    backward pass: the statistics are those of the plain model all the same."""
    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    plain, checkpointed = build("gpt2", **no_dropout), build("gpt2", **no_dropout)
    # transformers 5 renamed gradient_checkpointing_enable (deprecated) to activation_...
    enable = getattr(checkpointed, "activation_checkpointing_enable", None)
    (enable or checkpointed.gradient_checkpointing_enable)({"use_reentrant": False})
    checkpointed.train()
    sites = hf.decoder_sites(plain, ["resid_mid", "mlp_hidden", "resid_post"])
    runs, calls = [], []
    for model in (plain, checkpointed):
        norm = model.get_submodule(sites[0].name)
        handle = norm.register_forward_pre_hook(lambda *_, seen=calls: seen.append(1))
        try:
            with dh.collect(model, sites, jacobians="rademacher", n_probes=2) as run:
                run.over(batches, forward=hf.forward, mask=hf.mask, progress=False)
        finally:
            handle.remove()
        runs.append(run.stats)
    assert len(calls) == 2 + 4  # the checkpointed layer ran its submodules twice a batch
    for site in sites:
        want, got = runs[0][site.key], runs[1][site.key]
        assert got.acts.n_samples == want.acts.n_samples == 52
        assert got.n_batches == want.n_batches == 2
        torch.testing.assert_close(got.acts.cov(), want.acts.cov(), rtol=RTOL, atol=1e-12)
        want_gram, got_gram = want.grads.second_moment(), got.grads.second_moment()
        torch.testing.assert_close(got_gram, want_gram, rtol=1e-9, atol=1e-12)
