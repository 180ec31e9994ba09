"""Interaction bases of Hugging Face decoder models with no backward pass (#16).

One thread (``OMP_NUM_THREADS=1``). ``bench_lm`` measures TransformerLens models; this one the
same shapes as plain ``transformers`` models, built offline from configs, in float64:

* **GPT-2-small-shaped** ``GPT2LMHeadModel``: ``n_embd=768``, 12 heads, ``n_inner=3072``,
  ``LAYERS`` decoder layers, a 1,000-token vocabulary;
* **Llama-shaped** ``LlamaForCausalLM``: ``hidden_size=512``, 8 query heads sharing 2
  key/value heads, rotary embeddings, RMSNorm, SwiGLU of width 1,376;
* **Qwen3-shaped** ``Qwen3ForCausalLM``: the Llama shape (``head_dim=64``) with Qwen 3's
  RMSNorm of each head's q and k before the rotation.

Llama's and Qwen 3's RMSNorms take their variance in float32 whatever the dtype; they are
computed in float64 here (as in the tests), so the reference's Grams agree with the closed
form to rounding.

The build is ``dh.build_bases`` at ``resid_pre``, ``resid_mid`` and ``mlp_hidden`` of every
layer plus the last ``resid_post`` (``hf.decoder_sites``), the logits after it:
``sections="auto"`` finds a closed form for every pair, attention included, so no backward
pass runs. Reported, in the same run: tokens per second, the fraction of the float64
matrix-product limit (as ``bench_lm``), and the last layer's Grams against a per-feature
reference (one ``torch.autograd.grad`` per output position and read-out feature, the
build's ``REFERENCE_FEATURES`` leading features, on one sequence of ``LONG_CONTEXT`` tokens):
the same Gram and the speedup (ours the best of ``OURS_REPEATS`` calls, the reference once).
Targets as ``bench_lm``: 25 % of the limit, 100x the reference.

Run ``python -m benchmarks.bench_lm_hf`` (``--quick``: one small layer); :func:`main` returns
the rows.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Iterator, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

import degen_hooks as dh  # noqa: E402
from benchmarks.bench_lm import (  # noqa: E402
    REFERENCE_SPEEDUP,
    _rel_diff,
    bench_build,
    probed_gram,
)
from degen_hooks.families import hf  # noqa: E402

F64 = torch.float64
D_VOCAB = 1000
LAYERS = {"GPT-2-small-shaped": 4, "Llama-shaped": 2, "Qwen3-shaped": 2}
BUILD_SEQUENCES = 128  # of 8 tokens: 1,024 tokens
LONG_CONTEXT = 128
REFERENCE_FEATURES = 127
OURS_REPEATS = 3  # ours is timed as the best of 3 calls; the reference (minutes) once
KINDS = ("resid_pre", "resid_mid", "mlp_hidden")


def gpt2_shaped(n_layers: int, d_vocab: int = D_VOCAB, width: int = 768) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=n_layers, n_embd=width, n_head=max(1, width // 64), n_inner=4 * width,
        vocab_size=d_vocab,
        n_positions=LONG_CONTEXT, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).double().eval()


def llama_shaped(n_layers: int, d_vocab: int = D_VOCAB, width: int = 512) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=width, intermediate_size=width * 43 // 16, num_hidden_layers=n_layers,
        num_attention_heads=8, num_key_value_heads=2, vocab_size=d_vocab,
        max_position_embeddings=LONG_CONTEXT, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return float64_norms(LlamaForCausalLM(config).double().eval())


def qwen3_shaped(n_layers: int, d_vocab: int = D_VOCAB, width: int = 512) -> nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        hidden_size=width, intermediate_size=width * 43 // 16, num_hidden_layers=n_layers,
        num_attention_heads=8, num_key_value_heads=2, head_dim=width // 8, vocab_size=d_vocab,
        max_position_embeddings=LONG_CONTEXT, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).double().eval()
    with torch.no_grad():  # gains other than 1 for the norms of q and k
        for layer in model.model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                norm.weight.uniform_(0.5, 1.5)
    return float64_norms(model)


def float64_norms(model: nn.Module) -> nn.Module:
    """Llama's RMSNorm in float64 (it takes its variance in float32 whatever the dtype)."""

    def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.variance_epsilon))

    for module in model.modules():
        if "RMSNorm" in type(module).__name__:
            module.forward = forward.__get__(module)
    return model


def lm_sites(model: nn.Module) -> list[dh.Site]:
    return [*hf.decoder_sites(model, KINDS), *hf.decoder_sites(model, "resid_post", layers=-1)]


def build(model: nn.Module, batches: Sequence[torch.Tensor]) -> dh.InteractionBasis:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dh.build_bases(
            model, lm_sites(model), list(batches), forward=hf.forward, progress=False
        )


# -- the per-feature reference ----------------------------------------------------------------
def _site_tensors(model: nn.Module, sites: Sequence[dh.Site]) -> tuple[dict, list]:
    """Hooks that keep each site's tensor in the autograd graph: a layer's ``hidden_states``
    input, a module's input, or a module's (first) output."""
    store: dict[str, torch.Tensor] = {}
    handles = []
    for site in sites:
        module = model.get_submodule(site.name)
        if site.io == "input":

            def pre(_m: nn.Module, args: Any, kwargs: Any, key: str = site.key) -> None:
                store[key] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        else:

            def post(_m: nn.Module, _args: Any, out: Any, key: str = site.key) -> None:
                store[key] = out[0] if isinstance(out, tuple) else out

            handles.append(module.register_forward_hook(post))
    return store, handles


def reference_gram(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    site: dh.Site,
    target: dh.Site | None,
    readout: torch.Tensor,
) -> torch.Tensor:
    """``M'`` of ``site`` through ``target`` (``None``: the logits), one ``autograd.grad``
    per (output position, feature), every position a sample (``bench_lm``'s reference)."""

    def passes() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in batches:
            store, handles = _site_tensors(model, [site] + ([target] if target else []))
            try:
                out = hf.forward(model, batch)
            finally:
                for handle in handles:
                    handle.remove()
            yield store[site.key], store[target.key] if target else out

    return probed_gram(passes(), readout)


def bench_reference(
    name: str,
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    basis: dh.InteractionBasis,
    n_features: int,
) -> list[dict[str, Any]]:
    """The last layer's pairs (attention, the norm and MLP, the output projection, the
    unembedding) against the per-feature reference, with the build's read-outs."""
    from degen_hooks.families.transformers import find_sections

    sites = [*hf.decoder_sites(model, KINDS, layers=-1), hf.decoder_sites(model, "resid_post")[-1]]
    sections = find_sections(model, sites)
    rows = []
    for site, target in zip(sites, [*sites[1:], None], strict=True):
        if target is None:
            readout = torch.eye(model.config.vocab_size, dtype=F64)[:, :n_features]
        else:
            readout = basis.rotations_[target.key][:, :n_features]
        section, _ = sections[site.key]
        ours_s = float("inf")
        for _ in range(OURS_REPEATS):  # cheap: the best of a few (noise only adds time)
            started = time.perf_counter()
            if isinstance(section, dh.MLPSection):  # linear: no data
                ours = section.jacobian_gram(None, readout)
            else:
                out = target if target else dh.Site("")
                gram = section.gram_pass(
                    model, batches, site, out, readout, forward=hf.forward, progress=False
                )
                ours = gram.second_moment()
            ours_s = min(ours_s, time.perf_counter() - started)
        started = time.perf_counter()
        ref = reference_gram(model, batches, site, target, readout)
        ref_s = time.perf_counter() - started
        diff, speedup = _rel_diff(ours, ref), ref_s / ours_s
        pair = f"{site.key} -> {target.key if target else 'logits'}"
        rows.append(
            {
                "name": f"  {name} (transformers): {pair} vs per-feature reference",
                "ours_s": ours_s,
                "baseline_s": ref_s,
                "speedup": speedup,
                "max_rel_diff": diff,
                "benchmark": f"lm_hf: {name} {pair} Gram vs per-feature reference",
                "target": f"speedup >= {REFERENCE_SPEEDUP:g}, same Gram (rel 1e-10)",
                "met": speedup >= REFERENCE_SPEEDUP and diff <= 1e-10,
                "note": f"{type(section).__name__}, {readout.shape[1]} read-out features, "
                f"{sum(b.numel() for b in batches)} tokens ({len(batches)} x "
                f"{tuple(batches[0].shape)}); max rel diff {diff:.1e}",
            }
        )
    return rows


def main(quick: bool = False) -> list[dict[str, Any]]:
    """Every row (see the module docstring); ``quick``: one narrow layer, 32 tokens."""
    torch.set_num_threads(1)
    n_seq, d_vocab = (4, 50) if quick else (BUILD_SEQUENCES, D_VOCAB)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, d_vocab, (n_seq, 8), generator=gen)
    batches = list(tokens.split(8))
    context, n_features = (16, 8) if quick else (LONG_CONTEXT, REFERENCE_FEATURES)
    long = [torch.randint(0, d_vocab, (1, context), generator=gen)]
    rows: list[dict[str, Any]] = []
    shapes = (
        ("GPT-2-small-shaped", gpt2_shaped),
        ("Llama-shaped", llama_shaped),
        ("Qwen3-shaped", qwen3_shaped),
    )
    for name, shaped in shapes:
        depth = 1 if quick else LAYERS[name]
        model = shaped(depth, d_vocab, 64) if quick else shaped(depth, d_vocab)
        built, basis = bench_build(f"{name} (transformers)", model, batches, build, depth)
        for row in built:
            row["name"] = row["name"].replace("LM build", "HF build")
        rows += built
        rows += bench_reference(name, model, long, basis, n_features)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    for row in main(quick=parser.parse_args().quick):
        print(json.dumps(row, default=str))
