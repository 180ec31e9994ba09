"""Interaction bases of language-model-shaped transformers with no backward pass (#16).

One thread (``OMP_NUM_THREADS=1``). Randomly initialised TransformerLens models, built offline:

* **GPT-2-small-shaped**: 12 layers, ``d_model=768``, 12 heads of 64, ``d_mlp=3072``,
  ``gelu_new``, LayerNorm, a 1,000-token vocabulary;
* **Llama-shaped** (smaller, so that a run stays short): 4 layers, ``d_model=512``, 8 query
  heads sharing 2 key/value heads (grouped-query attention), rotary embeddings, RMSNorm and a
  SwiGLU MLP of width 1,376;

both in float64, so that the reference's Grams agree to rounding.

The build is ``dh.build_bases`` (LIB, float64 statistics) at ``hook_resid_pre``,
``hook_resid_mid`` and ``mlp.hook_post`` of every block plus the last ``hook_resid_post``,
the logits (every position) after it. ``sections="auto"`` finds a closed form for every pair
(attention, the norm and MLP, ``W_out``, the final norm and unembedding), so no backward
pass runs: every site's Jacobian Gram comes from a forward pass.

Reported, measured in the same run:

* tokens per second of the whole build;
* the **fraction of the float64 matrix-product limit**: the matrix-product FLOPs the build
  executes (counted by ``torch.utils.flop_counter`` during the timed build, whose dispatch
  overhead is then in the time; everything is float64), divided by its wall time and by the
  float64 matrix-product rate of this thread (a ``1024 x 1024`` product, best of several,
  before and after). Target: at least 25 %. The builds read ``BUILD_SEQUENCES`` sequences of
  8 tokens (1,024 tokens): with fewer, each basis has at most as many features as tokens and
  the eigendecompositions of the 3,072-wide sites, whose cost does not depend on the tokens,
  take most of the time;
* against a **per-feature reference** (one ``torch.autograd.grad`` per output position and
  read-out feature, dense per-sample buffers, as ``bench_build`` writes it) on the last
  block's sites, the ones it can finish: the same Grams (max relative difference) and the
  speedup per site. Target: at least 100x. The reference's cost grows with the context (one
  pass per position and feature, each through every position) and ours does not, so the
  attention, MLP-input and ``W_out`` sites are compared on one sequence of ``LONG_CONTEXT``
  tokens (a language model's context, read out by the build's ``REFERENCE_FEATURES``
  leading features); the unembedding (a thousand features) on the build's first 128 tokens;
* **peak memory flat in the number of tokens**: the peak RSS increase of a 2-layer build in
  fresh processes with 4x more tokens.

Run ``python -m benchmarks.bench_lm`` (``--quick``: 2 layers, fewer tokens); :func:`main`
returns the rows.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Iterable, Iterator, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

import degen_hooks as dh  # noqa: E402
from benchmarks._timing import in_fresh_process  # noqa: E402
from benchmarks.bench_build import _capture  # noqa: E402

F64 = torch.float64
LIMIT_FRACTION = 0.25
REFERENCE_SPEEDUP = 100.0
MEMORY_GROWTH = 1.25
MEMORY_SLACK_MIB = 16  # the allocator's noise floor
D_VOCAB = 1000
LONG_CONTEXT = 128
BUILD_SEQUENCES = 128  # of 8 tokens: 1,024 tokens
REFERENCE_FEATURES = 127  # of the build's features, read out in the reference rows


def gpt2_shaped(n_layers: int, n_ctx: int, d_vocab: int = D_VOCAB) -> nn.Module:
    from tests.cases import tl_model

    return tl_model(
        F64, n_layers=n_layers, d_model=768, n_heads=12, d_head=64, d_mlp=3072,
        n_ctx=n_ctx, d_vocab=d_vocab, act_fn="gelu_new", normalization_type="LN", seed=0,
    )  # fmt: skip


def llama_shaped(n_layers: int, n_ctx: int, d_vocab: int = D_VOCAB) -> nn.Module:
    from tests.cases import tl_model

    return tl_model(
        F64, n_layers=n_layers, d_model=512, n_heads=8, d_head=64, d_mlp=1376,
        n_key_value_heads=2, n_ctx=n_ctx, d_vocab=d_vocab, act_fn="silu",
        normalization_type="RMS", gated_mlp=True, positional_embedding_type="rotary",
        rotary_dim=64, seed=0,
    )  # fmt: skip


def lm_sites(n_layers: int) -> list[dh.Site]:
    hooks = ("hook_resid_pre", "hook_resid_mid", "mlp.hook_post")
    sites = [dh.Site(f"blocks.{layer}.{hook}") for layer in range(n_layers) for hook in hooks]
    return [*sites, dh.Site(f"blocks.{n_layers - 1}.hook_resid_post")]


def build(model: nn.Module, batches: Sequence[torch.Tensor]) -> dh.InteractionBasis:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        n_layers = model.cfg.n_layers
        return dh.build_bases(model, lm_sites(n_layers), list(batches), progress=False)


# -- the limit --------------------------------------------------------------------------------
def float64_rate(size: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of one float64 ``size x size`` matrix product on this thread (best of repeats)."""
    a = torch.randn(size, size, dtype=F64)
    b = torch.randn(size, size, dtype=F64)
    out = torch.empty(size, size, dtype=F64)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def flop_counter() -> Any:
    """A ``torch.utils.flop_counter`` mode that counts the matrix products a build executes,
    the in-place products of the accumulators included (the model and every statistic are
    float64, so all of them are float64 products)."""
    from torch.utils.flop_counter import FlopCounterMode

    def products(_out: Any, left: Sequence[int], right: Sequence[int], *_: Any, **__: Any) -> int:
        return 2 * math.prod(left) * right[-1]  # (..., m, k) @ (..., k, n)

    # The in-place products (the accumulators' addmm_, baddbmm_) are not in torch's registry.
    aten = torch.ops.aten
    return FlopCounterMode(
        display=False, custom_mapping={aten.addmm_: products, aten.baddbmm_: products}
    )


# -- the per-feature reference ----------------------------------------------------------------
def reference_gram(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    site: str,
    target: str | None,
    readout: torch.Tensor,
) -> torch.Tensor:
    """``M'`` of ``site`` through ``target`` (``None``: the logits) read out by ``readout``:
    one ``autograd.grad`` per (output position, feature), dense ``(features, batch, pos,
    d)`` buffers, every position a sample and every (position, feature) a probe."""

    def passes() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in batches:
            store, handles = _capture(model, [site] + ([target] if target else []), detach=False)
            try:
                out = model(batch)
            finally:
                for handle in handles:
                    handle.remove()
            yield store[site], store[target] if target else out

    return probed_gram(passes(), readout)


def probed_gram(
    passes: Iterable[tuple[torch.Tensor, torch.Tensor]], readout: torch.Tensor
) -> torch.Tensor:
    """The per-feature reference's Gram from ``(x, y)`` of each forward pass (``y`` in the
    autograd graph of ``x``): one ``autograd.grad`` per (output position, feature) of
    ``y @ readout``, a dense buffer of one position's probes at a time."""
    gram, n_rows = None, 0
    for x, y in passes:
        features = y.to(F64) @ readout.to(F64)  # (batch, pos, r)
        buffer = x.new_zeros(features.shape[2], *x.shape, dtype=F64)  # one position's probes
        for position in range(features.shape[1]):
            for j in range(features.shape[2]):
                (grad,) = torch.autograd.grad(features[:, position, j].sum(), x, retain_graph=True)
                buffer[j] = grad.to(F64)
            rows = buffer.reshape(-1, x.shape[-1])
            gram = rows.T @ rows if gram is None else gram + rows.T @ rows
        n_rows += x.shape[0] * x.shape[1]
    return gram / n_rows


def _rel_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


# -- the benchmarks ---------------------------------------------------------------------------
def bench_build(
    name: str,
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    build_fn: Any = build,
    n_layers: int | None = None,
) -> tuple[list[dict[str, Any]], dh.InteractionBasis]:
    """The build row: ``build_fn(model, batches)`` timed, its FLOPs counted, against the
    float64 matrix-product rate measured before and after."""
    n_tokens = sum(b.numel() for b in batches)
    n_layers = model.cfg.n_layers if n_layers is None else n_layers
    build_fn(model, batches[:1])  # warm-up: lazy initialisation
    rate = float64_rate()
    counter = flop_counter()
    started = time.perf_counter()
    with counter:
        basis = build_fn(model, batches)
    seconds = time.perf_counter() - started
    flops = float(counter.get_total_flops())
    rate_after = float64_rate()
    limit = max(rate, rate_after)
    fraction = flops / seconds / limit
    closed = [label for label in basis.timings_ if label.endswith("(closed form)")]
    slowest = sorted(basis.timings_.items(), key=lambda kv: -kv[1])[:3]
    rows = [
        {
            "name": f"LM build: full LIB, {name}, no backward pass",
            "ours_s": seconds,
            "tokens_per_s": n_tokens / seconds,
            "limit_fraction": fraction,
            "target": f">= {LIMIT_FRACTION:.0%} of the float64 matrix-product limit",
            "met": fraction >= LIMIT_FRACTION and len(closed) == len(basis.sites_),
            "note": (
                f"{n_layers} layers, {len(basis.sites_)} sites ({len(closed)} in closed form), "
                f"{n_tokens} tokens ({len(batches)} batches of {tuple(batches[0].shape)}): "
                f"{n_tokens / seconds:.1f} tokens/s; {flops / 1e9:.0f} float64 GFLOP at "
                f"{flops / seconds / 1e9:.1f} GFLOP/s, limit {limit / 1e9:.1f} GFLOP/s; slowest: "
                + ", ".join(f"{label} {s:.1f} s" for label, s in slowest)
            ),
        }
    ]
    return rows, basis


def bench_reference(
    name: str,
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    basis: dh.InteractionBasis,
    which: slice = slice(None),
    n_features: int | None = None,
) -> list[dict[str, Any]]:
    """The last block's Grams against the per-feature reference, with the build's readouts
    (their ``n_features`` leading features, when given).

    Both sides compute the Gram alone (the basis' eigendecompositions are left out): ours
    through the section ``sections="auto"`` finds (its forward pass, or no data for a linear
    section), the reference through its backward passes. ``which``: the pairs compared
    (attention, MLP input, ``W_out``, unembedding), on ``batches`` of ``model`` (the shape the
    basis was built for).
    """
    from degen_hooks.transformer_lens import find_sections

    last = model.cfg.n_layers - 1
    block = f"blocks.{last}"
    pairs = [
        (f"{block}.hook_resid_pre", f"{block}.hook_resid_mid"),
        (f"{block}.hook_resid_mid", f"{block}.mlp.hook_post"),
        (f"{block}.mlp.hook_post", f"{block}.hook_resid_post"),
        (f"{block}.hook_resid_post", None),
    ]
    sites = [dh.Site(site) for site, _ in pairs]
    sections = find_sections(model, sites)
    rows = []
    for site, target in pairs[which]:
        d_vocab = model.cfg.d_vocab
        readout = basis.rotations_[target] if target else torch.eye(d_vocab, dtype=F64)
        readout = readout[:, :n_features]
        if site not in sections:  # e.g. rotary attention on a TransformerLens 4 bridge
            continue
        section, _ = sections[site]
        started = time.perf_counter()
        if isinstance(section, dh.MLPSection):  # linear: no data
            ours = section.jacobian_gram(None, readout)
        else:
            out = dh.Site(target) if target else dh.Site("")
            gram = section.gram_pass(model, batches, dh.Site(site), out, readout, progress=False)
            ours = gram.second_moment()
        ours_s = time.perf_counter() - started
        started = time.perf_counter()
        ref = reference_gram(model, batches, site, target, readout)
        ref_s = time.perf_counter() - started
        diff = _rel_diff(ours, ref)
        speedup = ref_s / ours_s
        rows.append(
            {
                "name": f"  {name}: {site} -> {target or 'logits'} vs per-feature reference",
                "ours_s": ours_s,
                "baseline_s": ref_s,
                "speedup": speedup,
                "max_rel_diff": diff,
                "benchmark": f"lm: {name} {site} Gram vs per-feature reference",
                "target": f"speedup >= {REFERENCE_SPEEDUP:g}, same Gram (rel 1e-10)",
                "met": speedup >= REFERENCE_SPEEDUP and diff <= 1e-10,
                "note": f"{type(section).__name__}, {readout.shape[1]} read-out features, "
                f"{sum(b.numel() for b in batches)} tokens ({len(batches)} x "
                f"{tuple(batches[0].shape)}); max rel diff {diff:.1e}",
            }
        )
    return rows


def measure_memory(n_batches: int) -> dict[str, Any]:
    """Peak-RSS increase of a narrow GPT-2-like build over ``n_batches`` batches of 8x8 tokens.

    Narrow (2 layers, ``d_model=64``, ``d_mlp=256``) so that a few hundred tokens already
    fill every basis: beyond that, only the number of tokens grows.
    """
    from benchmarks.bench_jacobians import _peak_rss_mb, _reset_peak_rss
    from tests.cases import tl_model

    torch.set_num_threads(1)
    model = tl_model(
        F64, n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=256, n_ctx=8, d_vocab=100,
        act_fn="gelu_new", normalization_type="LN", seed=0,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    batches = list(torch.randint(0, 100, (8 * n_batches, 8), generator=gen).split(8))
    build(model, batches[:1])  # warm-up: lazy initialisation, the model's own buffers
    _reset_peak_rss()
    before = _peak_rss_mb()
    build(model, batches)
    return {"n_tokens": 64 * n_batches, "peak_increase_mb": _peak_rss_mb() - before}


def bench_memory() -> list[dict[str, Any]]:
    small, large = 16, 64  # 1,024 and 4,096 tokens: every basis is full from the first
    code = "import json, benchmarks.bench_lm as b; print(json.dumps(b.measure_memory({})))"
    results = [in_fresh_process(code.format(n)) for n in (small, large)]
    ratio = results[1]["peak_increase_mb"] / max(results[0]["peak_increase_mb"], 1e-9)
    return [
        {
            "name": "  LM build: peak memory, 4x the tokens (fresh processes)",
            "ours_mib": results[1]["peak_increase_mb"],
            "baseline_mib": results[0]["peak_increase_mb"],
            "ratio": ratio,
            "target": f"<= {MEMORY_GROWTH:g}x + {MEMORY_SLACK_MIB} MiB (flat in the tokens)",
            "met": results[1]["peak_increase_mb"]
            <= MEMORY_GROWTH * results[0]["peak_increase_mb"] + MEMORY_SLACK_MIB,
            "note": f"2-layer GPT-2-like build (d_model 64, d_mlp 256), {results[0]['n_tokens']} "
            f"vs {results[1]['n_tokens']} tokens in batches of 8x8; VmHWM reset after a "
            "warm-up build",
        }
    ]


def main(quick: bool = False) -> list[dict[str, Any]]:
    """Every row (see the module docstring); ``quick``: 1 layer, 16 tokens, 50-token vocabulary
    for the builds (the memory rows are the same in both)."""
    torch.set_num_threads(1)
    n_layers, n_seq, n_ctx, d_vocab = (1, 4, 4, 50) if quick else (12, BUILD_SEQUENCES, 8, D_VOCAB)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, d_vocab, (n_seq, n_ctx), generator=gen)
    batches = list(tokens.split(8))
    long_context = 16 if quick else LONG_CONTEXT
    long = [torch.randint(0, d_vocab, (1, long_context), generator=gen)]
    rows: list[dict[str, Any]] = []
    for name, shaped, depth in (
        ("GPT-2-small-shaped", gpt2_shaped, n_layers),
        ("Llama-shaped", llama_shaped, 1 if quick else 4),
    ):
        model = shaped(depth, n_ctx, d_vocab)
        built, basis = bench_build(name, model, batches)
        rows += built
        at_length = shaped(depth, long_context, d_vocab)  # the same shapes, a longer context
        rows += bench_reference(name, at_length, long, basis, slice(0, 3), REFERENCE_FEATURES)
        rows += bench_reference(name, model, batches[:2], basis, slice(3, 4))
    return rows + bench_memory()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    for row in main(quick=parser.parse_args().quick):
        print(json.dumps(row, default=str))
