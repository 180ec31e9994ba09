"""Speed and memory of interaction graphs: closed-form edges against per-feature backward passes.

One thread (``OMP_NUM_THREADS=1``), float64, the shipped modular-addition model (seed 0) on
its training split (3,830 examples in batches of 1,024), the node layers of
:func:`degen_hooks.modadd.build_modadd_bases` (``hook_resid_pre`` at every position,
``hook_resid_mid`` and ``hook_resid_post`` at the last position) plus the output logits at
the last position: three layer pairs (attention, MLP, unembedding), the papers' graph.

* **Edges vs a per-feature backward reference** (#19). Ours:
  ``InteractionGraph().fit(model, lib, batches, output=True, output_positions="last")``:
  every pair has a closed-form section (``sections="auto"``), so no backward pass runs (the
  attention pair from one forward pass of the layer's q, k, v and pattern, the MLP pair from
  its input, each checked against what the model computed, the unembedding from its
  weights). The reference is the
  rib-style computation written out here with the same conventions (lib_math §7.1): per
  batch and pair, the input site rewritten from leaf features ``f C_pinv + mu``, then one
  ``torch.autograd.grad`` per (output position, output feature) filling a dense per-sample
  buffer ``(batch, P_out, r_next, r)`` of gradient x input attributions, squared and summed.
  Targets: >= 20x faster; peak memory <= 1/4 of the reference's; the same edges (max
  relative difference <= 1e-10 per pair); the edges take at most 2x the basis build they come
  from (``build_modadd_bases``, timed in the same run); the 99 %-mass edge counts of the LIB
  and PCA graphs.
  A row also times the library's own batched backward passes (``sections=None``), the
  path every pair took before.
* **Peak memory**: each variant in a fresh subprocess (the model, data and bases loaded and
  a warm-up graph on 64 examples first), the increase of the peak RSS (``VmHWM``, reset
  through ``/proc/self/clear_refs`` before the measured fit) over the process before it.
  torch's CPU allocations are invisible to ``tracemalloc``; RSS sees them all.

Timings are minima over repeats, interleaved so that load from other processes hits both
alike (the reference, slow, runs at most twice). Run ``python -m benchmarks.bench_graph``
(``--quick``: 512 training examples); :func:`main` returns the rows.
"""

from __future__ import annotations

import os

# Set before torch is imported (when run as a script); main() also pins torch's own pool.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

import degen_hooks as dh  # noqa: E402
from benchmarks._timing import in_fresh_process  # noqa: E402
from degen_hooks.graph import InteractionGraph, edges_for_mass  # noqa: E402
from degen_hooks.sites import _site_modules  # noqa: E402

F64 = torch.float64
BATCH_SIZE = 1024
QUICK_EXAMPLES = 512
SPEEDUP = 20.0
MEMORY_RATIO = 0.25
BASIS_RATIO = 2.0
EDGE_RTOL = 1e-10
MASS = 0.99


# -- the reference: one backward pass per output feature, dense per-sample buffers ------------
def _layer(basis: dh.InteractionBasis, key: str) -> dict[str, Any]:
    """Where a node layer is read and its feature map ``(x - mu) @ C``."""
    info = basis.site_info_[key]
    return {
        "name": info["name"],
        "last": info.get("positions") == "last",
        "rotation": basis.rotations_[key],
        "pinv": basis.pinv_[key],
        "mean": basis.means_[key],
    }


def reference_pair_edges(
    model: nn.Module, batch: torch.Tensor, src: dict[str, Any], dst: dict[str, Any] | None
) -> tuple[torch.Tensor, int]:
    """Un-normalised edges of one batch for one pair, and the input rows.

    ``dst=None``: the output logits at the last position, raw.
    """
    modules = _site_modules(model)
    leaves: list[torch.Tensor] = []
    stored: dict[str, torch.Tensor] = {}

    def rewrite(_module: nn.Module, _args: Any, out: torch.Tensor) -> torch.Tensor:
        x = out[:, -1:] if src["last"] else out
        features = ((x.detach() - src["mean"]) @ src["rotation"]).requires_grad_(True)
        leaves.append(features)
        new = out.detach().clone()
        rebuilt = features @ src["pinv"] + src["mean"]
        if src["last"]:
            new = torch.cat([new[:, :-1], rebuilt], dim=1)
        else:
            new = rebuilt
        return new

    def capture(_module: nn.Module, _args: Any, out: torch.Tensor) -> None:
        stored["y"] = out

    handles = [modules[src["name"]].register_forward_hook(rewrite)]
    if dst is not None:
        handles.append(modules[dst["name"]].register_forward_hook(capture))
    try:
        logits = model(batch)
    finally:
        for handle in handles:
            handle.remove()
    if dst is None:
        out = logits[:, -1:]
    else:
        y = stored["y"][:, -1:] if dst["last"] else stored["y"]
        out = (y - dst["mean"]) @ dst["rotation"]
    (leaf,) = leaves
    features = leaf.detach()
    n, n_out, r_next = out.shape
    buffer = features.new_zeros(n, n_out, r_next, features.shape[-1])
    for t in range(n_out):
        for i in range(r_next):
            # Samples are independent: the gradient of the batch sum is every sample's own.
            (grad,) = torch.autograd.grad(out[:, t, i].sum(), leaf, retain_graph=True)
            buffer[:, t, i] = (grad * features).sum(1)  # input positions inside the square
    return buffer.square().sum((0, 1)), features.shape[0] * features.shape[1]


def reference_edges(
    model: nn.Module, basis: dh.InteractionBasis, batches: Sequence[torch.Tensor]
) -> dict[tuple[str, str], torch.Tensor]:
    """Edges of every pair (the basis' sites, then the output logits), rib-style."""
    keys = list(basis.sites_)
    layers = [_layer(basis, key) for key in keys] + [None]
    pairs = list(zip(keys, [*keys[1:], "output"], strict=True))
    sums: dict[tuple[str, str], torch.Tensor] = {}
    rows = dict.fromkeys(pairs, 0)
    for batch in batches:
        for pair, src, dst in zip(pairs, layers[:-1], layers[1:], strict=True):
            partial, n_rows = reference_pair_edges(model, batch, src, dst)  # type: ignore[arg-type]
            sums[pair] = partial if pair not in sums else sums[pair] + partial
            rows[pair] += n_rows
    return {pair: sums[pair] / rows[pair] for pair in pairs}


# -- ours ---------------------------------------------------------------------------------------
def ours_edges(
    model: nn.Module, basis: dh.InteractionBasis, batches: Sequence[torch.Tensor], **kw: Any
) -> InteractionGraph:
    """The library's graph of the same pairs (closed form unless ``sections=None``)."""
    return InteractionGraph().fit(
        model, basis, batches, output=True, output_positions="last", progress=False, **kw
    )


def _setup(n_examples: int | None) -> tuple[nn.Module, torch.Tensor, dh.InteractionBasis]:
    from degen_hooks.modadd import build_modadd_bases
    from degen_hooks.zoo import load_modadd

    model, data = load_modadd(0, dtype=F64)
    tokens = data.train_tokens if n_examples is None else data.train_tokens[:n_examples]
    basis = build_modadd_bases(model, tokens, batch_size=BATCH_SIZE, progress=False)
    return model, tokens, basis


def _rel_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


def _short(pair: tuple[str, str]) -> str:
    return " -> ".join(key.rsplit(".", 1)[-1].removeprefix("hook_") for key in pair)


def bench_speed(quick: bool, repeats: int, reference_repeats: int) -> list[dict[str, Any]]:
    """Ours vs the reference, and vs the basis build, on the training split."""
    from degen_hooks.modadd import build_modadd_bases

    model, tokens, lib = _setup(QUICK_EXAMPLES if quick else None)
    batches = list(tokens.split(BATCH_SIZE))
    pca = dh.InteractionBasis(variant="pca").fit(lib.stats_, lib.sites_)
    ours_edges(model, lib, [tokens[:64]])  # warm-up: lazy initialisation
    reference_edges(model, lib, [tokens[:64]])
    best = {"ours": float("inf"), "basis": float("inf"), "reference": float("inf")}
    graph = ref = None
    for round_index in range(repeats):
        started = time.perf_counter()
        build_modadd_bases(model, tokens, batch_size=BATCH_SIZE, progress=False)
        best["basis"] = min(best["basis"], time.perf_counter() - started)
        started = time.perf_counter()
        fitted = ours_edges(model, lib, batches)
        seconds = time.perf_counter() - started
        if seconds < best["ours"]:
            best["ours"], graph = seconds, fitted
        if round_index < reference_repeats:  # slow: fewer repeats
            started = time.perf_counter()
            fitted_ref = reference_edges(model, lib, batches)
            seconds = time.perf_counter() - started
            if seconds < best["reference"]:
                best["reference"], ref = seconds, fitted_ref
    assert graph is not None and ref is not None
    diffs = {pair: _rel_diff(graph.edges_[pair], ref[pair]) for pair in graph.pairs_}
    counts = {pair: edges_for_mass(graph.edges_[pair], MASS) for pair in graph.pairs_}
    ref_counts = {pair: edges_for_mass(ref[pair], MASS) for pair in graph.pairs_}
    # Today's path before #19: the library's batched backward passes (sections=None).
    started = time.perf_counter()
    backward = ours_edges(model, lib, batches, sections=None)
    backward_s = time.perf_counter() - started
    backward_diff = max(_rel_diff(graph.edges_[p], backward.edges_[p]) for p in graph.pairs_)
    pca_graph = ours_edges(model, pca, batches)
    pca_counts = {pair: edges_for_mass(e, MASS) for pair, e in pca_graph.edges_.items()}
    # PCA against today's path (backward passes everywhere), full runs only: it is slow.
    pca_diff = None
    if not quick:
        slow = ours_edges(model, pca, batches, sections=None)
        pca_diff = max(_rel_diff(pca_graph.edges_[p], slow.edges_[p]) for p in slow.pairs_)
    speedup = best["reference"] / best["ours"]
    basis_ratio = best["ours"] / best["basis"]
    max_diff = max(diffs.values())
    closed = len(graph.closed_form_) == len(graph.pairs_)
    subset = f"first {len(tokens)}" if quick else f"all {len(tokens)}"
    lib_text = ", ".join(f"{_short(p)} {counts[p]}/{graph.edges_[p].numel()}" for p in counts)
    pca_text = ", ".join(
        f"{_short(p)} {pca_counts[p]}/{e.numel()}" for p, e in pca_graph.edges_.items()
    )
    rows = [
        {
            "name": "modadd graph (3 pairs): closed-form edges vs per-feature backward reference",
            "benchmark": "graph: modadd closed-form edges vs per-feature backward",
            "ours_s": best["ours"],
            "baseline": "autograd.grad per (position, feature), dense (batch, P, r', r) buffers",
            "baseline_s": best["reference"],
            "ratio": best["ours"] / best["reference"],
            "speedup": speedup,
            "target": f"speedup >= {SPEEDUP:g}, edges equal (rtol {EDGE_RTOL:g})",
            "met": speedup >= SPEEDUP and max_diff <= EDGE_RTOL and closed,
            "max_rel_diff": max_diff,
            "edges_max_rel_diff": {_short(p): d for p, d in diffs.items()},
            "n_edges_mass": {"LIB": {_short(p): c for p, c in counts.items()}},
            "note": (
                f"{subset} training examples, float64; every pair in closed form: {closed}; "
                f"max rel diff {max_diff:.1e}; 99 %-mass edges LIB: {lib_text}"
                + ("" if counts == ref_counts else " (reference counts differ!)")
            ),
        },
        {
            "name": "  edges vs the basis build they come from (same run)",
            "ours_s": best["ours"],
            "baseline_s": best["basis"],
            "ratio": basis_ratio,
            "target": f"edges <= {BASIS_RATIO:g}x basis",
            "met": basis_ratio <= BASIS_RATIO,
            "note": "build_modadd_bases (activations + 3 closed-form Jacobian passes); "
            + ", ".join(f"{label} {seconds:.2f} s" for label, seconds in graph.timings_.items()),
        },
        {
            "name": "  same graph by the library's batched backward passes (sections=None)",
            "ours_s": best["ours"],
            "baseline_s": backward_s,
            "ratio": best["ours"] / backward_s,
            "target": "",
            "met": None,
            "note": f"the path every pair took before #19 (once); max rel diff {backward_diff:.1e}",
        },
        {
            "name": "  99 %-mass edge counts, LIB and PCA",
            "target": "as the backward path",
            "met": counts == ref_counts and (pca_diff is None or pca_diff <= EDGE_RTOL),
            "n_edges_mass": {
                "LIB": {_short(p): c for p, c in counts.items()},
                "PCA": {_short(p): c for p, c in pca_counts.items()},
            },
            "note": f"LIB: {lib_text}; PCA: {pca_text}"
            + (
                ""
                if pca_diff is None
                else f"; PCA edges vs backward passes (sections=None): max rel diff {pca_diff:.1e}"
            ),
        },
    ]
    return rows


# -- peak memory ----------------------------------------------------------------------------------
def measure_memory(variant: str, quick: bool) -> dict[str, Any]:
    """Peak-RSS increase of one graph fit (run in a fresh process by :func:`bench_memory`)."""
    from benchmarks.bench_jacobians import _peak_rss_mb, _reset_peak_rss

    torch.set_num_threads(1)
    model, tokens, lib = _setup(QUICK_EXAMPLES if quick else None)
    batches = list(tokens.split(BATCH_SIZE))
    fit = (
        (lambda data: ours_edges(model, lib, data))
        if variant == "ours"
        else (lambda data: reference_edges(model, lib, data))
    )
    fit([tokens[:64]])  # warm-up: lazy initialisation is not part of the increase
    _reset_peak_rss()
    before = _peak_rss_mb()
    fit(batches)
    return {"variant": variant, "peak_increase_mb": _peak_rss_mb() - before}


def bench_memory(quick: bool) -> list[dict[str, Any]]:
    """Peak RSS increase of ours and of the reference, each in a fresh subprocess."""
    results = {}
    for variant in ("ours", "reference"):
        code = (
            "import json, benchmarks.bench_graph as b; "
            f"print(json.dumps(b.measure_memory({variant!r}, {quick})))"
        )
        results[variant] = in_fresh_process(code)["peak_increase_mb"]
    ratio = results["ours"] / results["reference"]
    return [
        {
            "name": "  peak memory of the graph fit (RSS increase, fresh processes)",
            "ours_mib": results["ours"],
            "baseline_mib": results["reference"],
            "ratio": ratio,
            "target": f"ours <= {MEMORY_RATIO:g} x reference",
            "met": ratio <= MEMORY_RATIO,
            "note": (
                f"batches of {BATCH_SIZE}; VmHWM reset before the fit, after a warm-up fit "
                "(model, data and bases loaded)"
            ),
        }
    ]


# -- entry points -----------------------------------------------------------------------------
def main(quick: bool = False, repeats: int | None = None) -> list[dict[str, Any]]:
    """Run both benchmarks; returns one row per measurement.

    Args:
        quick: 512 training examples (a smoke run).
        repeats: Timing repeats of ours and of the basis build (default 3, or 1 with
            ``quick``); the reference runs at most twice.

    Returns:
        Rows with ``name``, ``ours_s`` / ``baseline_s`` (or ``ours_mib`` / ``baseline_mib``),
        ``ratio`` (ours / baseline), ``target``, ``met`` and ``note``.
    """
    torch.set_num_threads(1)
    repeats = repeats or (1 if quick else 3)
    return bench_speed(quick, repeats, min(repeats, 2)) + bench_memory(quick)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    with contextlib.suppress(BrokenPipeError):
        for row in main(quick=args.quick, repeats=args.repeats):
            print(json.dumps(row, default=str))
