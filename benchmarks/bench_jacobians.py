"""Speed and memory of Jacobian Grams: exact probes, a per-coordinate loop, the closed form.

One thread (``OMP_NUM_THREADS=1``), float64. Four comparisons, each measured in this run:

* **Exact probes vs a per-coordinate loop.** ``dh.collect(jacobians="exact")`` pushes ``chunk``
  one-hot probes per backward with ``torch.vmap`` over ``torch.autograd.grad``. The baseline
  is the straightforward implementation (the reference code's): one ``autograd.grad`` per
  output coordinate, filling a dense per-sample buffer ``(batch, n_outputs, ..., d_site)``, then
  its Gram. Same FLOPs; only per-call overhead and memory traffic differ. Target: >= 5x faster,
  same result (max relative difference reported). Three regimes: a small MLP (per-call
  overhead dominates), a 64-128-128-128-10 MLP (float64 matmuls dominate) and a two-block
  causal-attention toy with 16 positions (many output coordinates).
* **Closed form vs exact probes** on a 64-128-128-128-10 ReLU MLP with 4096 samples: the
  Jacobian Grams of every layer's input w.r.t. the next layer's input (and of the last
  layer's input w.r.t. the output). Closed form: one forward pass collecting ReLU derivative
  moments, then ``MLPSection.jacobian_gram`` (lib_math §12). Target: >= 50x faster, same result
  to 1e-10 (relative, max-abs).
* **Closed-form attention vs exact probes** on a GPT-2-small-shaped layer (TransformerLens,
  LayerNorm, 12 heads of 64, ``d_model=768``, float64; 16 sequences of 32 tokens): the Gram of
  ``blocks.0.hook_resid_pre`` (every position a sample) read through 64 orthonormal features
  of ``blocks.0.hook_resid_mid`` at the last position.
  :func:`degen_hooks.transformer_lens.attention_section` reads the layer's q, k, v, pattern
  and the LayerNorm input in one forward pass; exact probes run one backward per feature.
  Both end in the same ``(rows, 768)`` Gram product, which bounds the speedup. Target: the
  same Gram to 1e-10 (relative, max-abs); the speedup is reported.
* **Peak memory** (increase of the peak RSS, ``VmHWM``, over the collection; each
  configuration in a fresh subprocess after a warm-up) of exact probes for several chunks,
  output sizes and numbers of samples, against the per-coordinate loop's dense buffer.
  Target: the exact-probe peak grows with ``chunk`` but not with the number of samples or
  outputs. The table also lists the size of one ``(chunk, batch, pos, 4 d)`` gradient tensor
  of the widest layer (exact; several are alive during a vmapped backward) or of the dense
  ``(batch, n_outputs, pos, d_site)`` buffer (loop).

Timings are minima over repeats, interleaved so that load from other processes hits every
variant alike. Run ``python -m benchmarks.bench_jacobians`` (``--quick`` for a smoke run);
:func:`main` returns the rows.
"""

from __future__ import annotations

import os

# Set before torch is imported (when run as a script); main() also pins torch's own pool.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

import degen_hooks as dh  # noqa: E402
from benchmarks._timing import best_times, in_fresh_process
from degen_hooks.sites import _site_modules  # noqa: E402

F64 = torch.float64


# -- models ------------------------------------------------------------------------------------
def mlp(widths: Sequence[int], seed: int = 0) -> nn.Sequential:
    """``Linear -> ReLU -> ... -> Linear`` in float64; module ``2k`` is the k-th Linear."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for index, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if index < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).to(F64)


class _Attention(nn.Module):
    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.qkv, self.out, self.n_heads = nn.Linear(d, 3 * d), nn.Linear(d, d), n_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, p, d = x.shape
        q, k, v = self.qkv(x).view(b, p, 3, self.n_heads, d // self.n_heads).unbind(2)
        scores = torch.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(d // self.n_heads)
        causal = torch.ones(p, p, dtype=torch.bool, device=x.device).triu(1)
        pattern = scores.masked_fill(causal, float("-inf")).softmax(-1)
        return self.out(torch.einsum("bhqk,bkhe->bqhe", pattern, v).reshape(b, p, d))


class _Block(nn.Module):
    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.attn = _Attention(d, n_heads)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.resid_mid, self.resid_post = nn.Identity(), nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resid_mid(x + self.attn(x))
        return self.resid_post(x + self.mlp(x))


class ToyTransformer(nn.Module):
    """``(batch, pos, d_in) -> (batch, pos, d_out)``: embed, causal-attention blocks, unembed."""

    def __init__(self, d_in: int = 16, d: int = 32, n_heads: int = 4, d_out: int = 32):
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList([_Block(d, n_heads), _Block(d, n_heads)])
        self.unembed = nn.Linear(d, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.unembed(x)


def toy_transformer(d_out: int = 32, seed: int = 0) -> ToyTransformer:
    torch.manual_seed(seed)
    return ToyTransformer(d_out=d_out).to(F64)


def _batches(n: int, batch: int, shape: tuple[int, ...], seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=gen, dtype=F64)
    return list(x.split(batch))


# -- the two implementations of exact Grams ------------------------------------------------------
def exact_grams(
    model: nn.Module,
    batches: list[torch.Tensor],
    sites: Sequence[str | dh.Site],
    *,
    target: str | None = None,
    chunk: int = 64,
    last_only: bool = False,
) -> dict[str, torch.Tensor]:
    """Jacobian Grams with ``dh.collect(jacobians="exact")`` (``last_only``: last position)."""
    with dh.collect(
        model,
        list(sites),
        jacobians="exact",
        target=target,
        chunk=chunk,
        target_positions="last" if last_only else None,
    ) as run:
        for x in batches:
            out = model(x)
            run.backward(None if target else out)
    return {key: run.stats[key].grads.second_moment() for key in run.stats}


def loop_grams(
    model: nn.Module, batches: list[torch.Tensor], sites: Sequence[str], last_only: bool = False
) -> dict[str, torch.Tensor]:
    """The straightforward way: one ``autograd.grad`` per output coordinate, a dense buffer.

    For each batch, ``buffer[site]`` has shape ``(batch, n_outputs, *site_shape[1:])`` (every
    output coordinate's per-sample gradient); the Gram is ``rows^T rows`` over its rows, with
    input positions as samples. ``last_only`` keeps the outputs at the last position.
    """
    modules = _site_modules(model)  # a TransformerLens bridge: its hook aliases too
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(sites, 0)
    for x in batches:
        seen: dict[str, torch.Tensor] = {}
        handles = [
            modules[s].register_forward_hook(
                lambda _m, _a, out, s=s, seen=seen: seen.__setitem__(s, out)
            )
            for s in sites
        ]
        try:
            out = model(x)
        finally:
            for handle in handles:
                handle.remove()
        flat = (out[:, -1] if last_only else out).reshape(out.shape[0], -1)
        acts = [seen[s] for s in sites]
        buffers = [a.new_zeros(a.shape[0], flat.shape[1], *a.shape[1:]) for a in acts]
        for coordinate in range(flat.shape[1]):
            grads = torch.autograd.grad(flat[:, coordinate].sum(), acts, retain_graph=True)
            for buffer, g in zip(buffers, grads, strict=True):
                buffer[:, coordinate] = g
        for site, buffer, act in zip(sites, buffers, acts, strict=True):
            rows = buffer.reshape(-1, buffer.shape[-1])
            sums[site] = sums.get(site, 0) + rows.T @ rows
            counts[site] += act[..., 0].numel()
    return {s: sums[s] / counts[s] for s in sites}


def _max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max()) for k in b)


# -- 1. exact probes vs the per-coordinate loop ------------------------------------------------
def bench_exact_vs_loop(quick: bool, repeats: int) -> list[dict[str, Any]]:
    """Speed of exact probes against the per-coordinate loop in three regimes."""
    scale = 4 if quick else 1
    cases = [
        ("MLP 8-16-16-16, batch 16", mlp((8, 16, 16, 16)), (8,), 1024 // scale, 16, ["1", "3"]),
        (
            "MLP 64-128-128-128-10, batch 512",
            mlp((64, 128, 128, 128, 10)),
            (64,),
            4096 // scale,
            512,
            ["1", "3", "5"],
        ),
        (
            "attention toy, 16 pos, d 32, 512 outputs, batch 16",
            toy_transformer(),
            (16, 16),
            128 // scale,
            16,
            ["blocks.0.resid_post", "blocks.1.resid_mid"],
        ),
    ]
    rows = []
    for label, model, shape, n, batch, sites in cases:
        batches = _batches(n, batch, shape)
        exact_grams(model, batches[:1], sites)  # warm-up
        loop_grams(model, batches[:1], sites)
        times = best_times(
            {
                "exact": lambda m=model, b=batches, s=sites: exact_grams(m, b, s),
                "loop": lambda m=model, b=batches, s=sites: loop_grams(m, b, s),
            },
            repeats,
        )
        diff = _max_rel_diff(exact_grams(model, batches, sites), loop_grams(model, batches, sites))
        speedup = times["loop"] / times["exact"]
        rows.append(
            {
                "benchmark": f"exact probes vs per-coordinate loop: {label}",
                "ours_s": times["exact"],
                "baseline": "loop of autograd.grad + dense buffer",
                "baseline_s": times["loop"],
                "ratio": times["exact"] / times["loop"],
                "speedup": speedup,
                "target": "speedup >= 5 and max rel diff <= 1e-10",
                "met": speedup >= 5 and diff <= 1e-10,
                "max_rel_diff": diff,
                "n_samples": n,
                "note": f"{n} samples, float64; max rel diff {diff:.1e}",
            }
        )
    return rows


# -- 2. closed form vs exact probes -------------------------------------------------------------
MLP_WIDTHS = (64, 128, 128, 128, 10)


def closed_form_grams(model: nn.Sequential, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every layer input's Gram w.r.t. the next layer input (the last: w.r.t. the output)."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    pre_sites = [str(2 * k) for k in range(len(linears) - 1)]  # pre-activations
    with dh.collect(model, pre_sites, derivatives=dict.fromkeys(pre_sites, "relu")) as run:
        with torch.no_grad():
            for x in batches:
                model(x)
    grams = {}
    for k, site in enumerate(pre_sites):
        # Section: input of Linear k -> ReLU output (the next Linear's input): w_out = I.
        identity = torch.eye(linears[k].out_features, dtype=F64)
        section = dh.MLPSection(linears[k].weight, identity, "relu")
        grams[f"layer{k}"] = section.jacobian_gram(run.stats[site].derivs)
    last = linears[-1].weight.detach()  # a linear section: M' = W^T W, no data needed
    grams[f"layer{len(linears) - 1}"] = last.T @ last
    return grams


def exact_layer_grams(
    model: nn.Sequential, batches: list[torch.Tensor], chunk: int = 64
) -> dict[str, torch.Tensor]:
    """The same Grams with exact probes: one collection per layer (each has its own target)."""
    n_linear = (len(model) + 1) // 2
    inputs = [b.clone().requires_grad_(True) for b in batches]  # layer 0's input is the data
    grams = {}
    for k in range(n_linear):
        site = dh.Site(str(2 * k), io="input")
        target = str(2 * k + 1) if k < n_linear - 1 else None  # the next ReLU output
        result = exact_grams(model, inputs, [site], target=target, chunk=chunk)
        grams[f"layer{k}"] = result[site.key]
    return grams


def bench_closed_form(quick: bool, repeats: int) -> list[dict[str, Any]]:
    """Closed form vs exact probes on the 64-128-128-128-10 ReLU MLP, 4096 samples."""
    n = 1024 if quick else 4096
    model = mlp(MLP_WIDTHS)
    batches = _batches(n, 512, (MLP_WIDTHS[0],))
    closed_form_grams(model, batches[:1])  # warm-up
    exact_layer_grams(model, batches[:1])
    times = best_times(
        {
            "closed": lambda: closed_form_grams(model, batches),
            "exact": lambda: exact_layer_grams(model, batches),
        },
        repeats,
    )
    diff = _max_rel_diff(closed_form_grams(model, batches), exact_layer_grams(model, batches))
    speedup = times["exact"] / times["closed"]
    return [
        {
            "benchmark": "closed form vs exact probes: ReLU MLP 64-128-128-128-10, all 4 layers",
            "ours_s": times["closed"],
            "baseline": "exact probes (chunk 64)",
            "baseline_s": times["exact"],
            "ratio": times["closed"] / times["exact"],
            "speedup": speedup,
            "target": "speedup >= 50 and max rel diff <= 1e-10",
            "met": speedup >= 50 and diff <= 1e-10,
            "max_rel_diff": diff,
            "n_samples": n,
            "note": f"{n} samples, float64; max rel diff {diff:.1e}",
        }
    ]


# -- 3. closed-form attention vs exact probes ------------------------------------------------
def bench_attention_closed_form(quick: bool, repeats: int) -> list[dict[str, Any]]:
    """Closed-form attention section vs exact probes on a GPT-2-small-shaped layer."""
    from benchmarks.bench_transformer import gpt2_small_shaped
    from degen_hooks.transformer_lens import attention_section, attention_section_sites

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = gpt2_small_shaped(n_ctx=32, n_layers=1, dtype=F64)
    n_sequences, r = (4, 64) if quick else (16, 64)
    tokens = torch.randint(0, 1000, (n_sequences, 32), generator=torch.Generator().manual_seed(0))
    batches = list(tokens.split(4))
    gen = torch.Generator().manual_seed(1)
    readout = torch.linalg.qr(torch.randn(768, r, generator=gen, dtype=F64))[0]
    source, target = attention_section_sites(model, 0)
    site, out = dh.Site(source), dh.Site(target, positions="last")
    section = attention_section(model, 0)

    def closed(data: list[torch.Tensor]) -> torch.Tensor:
        return section.gram_pass(model, data, site, out, readout, progress=False).second_moment()

    def exact(data: list[torch.Tensor]) -> torch.Tensor:
        with dh.collect(model, [site], jacobians="exact", target=out, readout=readout) as run:
            for batch in data:
                model(batch)
                run.backward()
        return run.stats[site.key].grads.second_moment()

    closed(batches[:1])  # warm-up
    exact(batches[:1])
    times = best_times(
        {"closed": lambda: closed(batches), "exact": lambda: exact(batches)}, repeats
    )
    want, got = exact(batches), closed(batches)
    diff = float((got - want).abs().max() / want.abs().max())
    speedup = times["exact"] / times["closed"]
    n = tokens.numel()
    gram_gflop = 2 * 768**2 * n * r / 1e9
    return [
        {
            "benchmark": "closed form vs exact probes: attention section, GPT-2-small-shaped layer",
            "ours_s": times["closed"],
            "baseline": "exact probes (chunk auto)",
            "baseline_s": times["exact"],
            "ratio": times["closed"] / times["exact"],
            "speedup": speedup,
            "target": "max rel diff <= 1e-10",
            "met": diff <= 1e-10,
            "max_rel_diff": diff,
            "n_samples": n,
            "note": (
                f"LayerNorm, 12 heads of 64, d 768; {n} tokens, {r} features at the last "
                f"position, float64; max rel diff {diff:.1e}; both end in the same "
                f"{gram_gflop:.0f}-GFLOP Gram product"
            ),
        }
    ]


# -- 4. peak memory -----------------------------------------------------------------------------
MEMORY_SITE = "blocks.0.resid_post"


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def _reset_peak_rss() -> None:
    # Linux >= 4.0: writing 5 resets VmHWM (the peak RSS) to the current RSS. Needed because
    # ru_maxrss survives fork + exec: a child would start at its parent's peak.
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass


def _peak_rss_mb() -> float:
    peak = _status_mb("VmHWM")
    if peak is None:  # not Linux: fall back to getrusage (kilobytes on Linux, bytes on macOS)
        scale = 2**20 if sys.platform == "darwin" else 2**10
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale
    return peak


def measure_memory(method: str, chunk: int, last_only: bool, n: int, batch: int) -> dict[str, Any]:
    """Peak-RSS increase of one collection (run in a fresh process by :func:`bench_memory`).

    The target is the attention toy's output, all 16 positions x 32 features (512 output
    coordinates) or only the last position (``last_only``: 32).
    """
    torch.set_num_threads(1)
    model = toy_transformer()
    batches = _batches(n, batch, (16, 16))
    # Warm-up on two samples: lazy initialisation (vmap, autograd) is not part of the peak.
    if method == "exact":
        exact_grams(model, [batches[0][:2]], [MEMORY_SITE], chunk=2)
    else:
        loop_grams(toy_transformer(d_out=1), [batches[0][:2]], [MEMORY_SITE], last_only=True)
    _reset_peak_rss()
    before = _peak_rss_mb()
    if method == "exact":
        exact_grams(model, batches, [MEMORY_SITE], chunk=chunk, last_only=last_only)
    else:
        loop_grams(model, batches, [MEMORY_SITE], last_only=last_only)
    d_site, n_pos = 32, 16
    n_outputs = 32 if last_only else n_pos * 32
    # One per-call tensor: exact: a (chunk, batch, pos, 4 d) gradient of the widest layer;
    # loop: the dense (batch, n_outputs, pos, d_site) buffer.
    predicted = (
        chunk * batch * n_pos * 4 * d_site * 8 / 2**20
        if method == "exact"
        else batch * n_outputs * n_pos * d_site * 8 / 2**20
    )
    return {
        "method": method,
        "chunk": chunk,
        "n_outputs": n_outputs,
        "n_samples": n,
        "peak_increase_mb": _peak_rss_mb() - before,
        "largest_buffer_mb": predicted,
    }


def bench_memory(quick: bool) -> list[dict[str, Any]]:
    """Peak RSS of exact probes vs the loop, each configuration in a fresh subprocess."""
    batch = 32
    n = batch if quick else 2 * batch
    configs = [
        ("exact", 8, False, n),
        ("exact", 64, False, n),  # 8x the chunk
        ("exact", 8, False, 4 * n),  # 4x the samples
        ("exact", 8, True, n),  # 16x fewer outputs
        ("loop", 0, False, batch),  # the loop's buffer is per batch: one batch shows it
        ("loop", 0, True, batch),
    ]
    results = []
    for method, chunk, last_only, n_samples in configs:
        code = (
            "import json, benchmarks.bench_jacobians as b; "
            f"print(json.dumps(b.measure_memory({method!r}, {chunk}, {last_only}, {n_samples}, "
            f"{batch})))"
        )
        results.append(in_fresh_process(code))
    by_key = {(r["method"], r["chunk"], r["n_outputs"], r["n_samples"]): r for r in results}
    base = by_key[("exact", 8, 512, n)]["peak_increase_mb"]
    more_samples = by_key[("exact", 8, 512, 4 * n)]["peak_increase_mb"]
    fewer_outputs = by_key[("exact", 8, 32, n)]["peak_increase_mb"]
    big_chunk = by_key[("exact", 64, 512, n)]["peak_increase_mb"]
    loop_big = by_key[("loop", 0, 512, batch)]["peak_increase_mb"]
    loop_small = by_key[("loop", 0, 32, batch)]["peak_increase_mb"]
    # Bounded by the chunk: 4x the samples or 16x the outputs change the peak by < 25%
    # (+ 8 MiB of allocator noise), while 8x the chunk grows it.
    flat = max(more_samples, base) <= 1.25 * min(more_samples, base) + 8
    flat &= max(fewer_outputs, base) <= 1.25 * min(fewer_outputs, base) + 8
    bounded = flat and big_chunk > 2 * base
    rows = [
        {
            "benchmark": (
                f"peak memory, {r['method']}"
                + (f" chunk {r['chunk']}" if r["method"] == "exact" else "")
                + f": {r['n_outputs']} outputs, {r['n_samples']} samples"
            ),
            "ours_mib": r["peak_increase_mb"],
            "met": None,
            "note": f"peak RSS increase; one tensor {r['largest_buffer_mb']:.1f} MiB",
            **r,
        }
        for r in results
    ]
    rows.append(
        {
            "benchmark": "peak memory bounded by chunk, not samples x outputs",
            "target": "exact peak grows with chunk, not with samples or outputs",
            "met": bounded,
            "exact_base_mb": base,
            "exact_4x_samples_mb": more_samples,
            "exact_outputs_div16_mb": fewer_outputs,
            "exact_8x_chunk_mb": big_chunk,
            "loop_mb": loop_big,
            "loop_outputs_div16_mb": loop_small,
            "ours_mib": more_samples,
            "baseline_mib": base,
            "ratio": more_samples / base,
            "note": (
                f"exact chunk 8: {base:.0f} MiB; 4x samples {more_samples:.0f}; outputs/16 "
                f"{fewer_outputs:.0f}; chunk 64 {big_chunk:.0f}; loop {loop_big:.0f} "
                f"(outputs/16: {loop_small:.0f})"
            ),
        }
    )
    return rows


# -- entry points -------------------------------------------------------------------------------
def main(quick: bool = False, repeats: int | None = None) -> list[dict[str, Any]]:
    """Run the four benchmarks; returns one row per measurement.

    Args:
        quick: Smaller problems and one repeat (a smoke run, not for the numbers).
        repeats: Timing repeats (default 3, or 1 with ``quick``).

    Returns:
        Rows with ``benchmark``, and for timings ``ours_s``, ``baseline``, ``baseline_s``,
        ``ratio`` (``ours_s / baseline_s``), ``speedup``, ``target``, ``met``,
        ``max_rel_diff``; for memory the peak-RSS increases in MiB.
    """
    torch.set_num_threads(1)
    repeats = repeats or (1 if quick else 3)
    rows = bench_exact_vs_loop(quick, repeats)
    rows += bench_closed_form(quick, repeats)
    rows += bench_attention_closed_form(quick, repeats)
    rows += bench_memory(quick)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    """Print the timing rows and the memory rows as two plain-text tables."""
    print(f"{'benchmark':<84} {'ours s':>8} {'base s':>8} {'speedup':>8} {'rel diff':>9}  target")
    for row in rows:
        if "ours_s" not in row:
            continue
        verdict = "met" if row["met"] else "MISSED"
        print(
            f"{row['benchmark']:<84} {row['ours_s']:>8.3f} {row['baseline_s']:>8.3f} "
            f"{row['speedup']:>7.1f}x {row['max_rel_diff']:>9.1e}  {row['target']}: {verdict}"
        )
    print()
    print(f"{'peak memory (fresh process)':<60} {'peak +MiB':>10} {'one tensor MiB':>15}")
    for row in rows:
        if "peak_increase_mb" in row:
            print(
                f"{row['benchmark']:<60} {row['peak_increase_mb']:>10.1f} "
                f"{row['largest_buffer_mb']:>15.1f}"
            )
        elif "exact_base_mb" in row:
            print(f"{row['benchmark']}: {'met' if row['met'] else 'MISSED'} ({row['target']})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    print_table(main(quick=args.quick, repeats=args.repeats))
