"""Throughput of MLP statistics on a GPT-2-small-shaped transformer vs its matrix-product limit.

One thread (``OMP_NUM_THREADS=1``). A randomly initialised TransformerLens model with GPT-2
small's shape (12 layers, ``d_model=768``, 12 heads of 64, ``d_mlp=3072``, GELU, LayerNorm) but a
1,000-token vocabulary, built offline in float32 and in eval mode. Statistics: the float64 mean
and centred Gram plus the co-firing counts (``firing=True``) at all 12 ``blocks.*.mlp.hook_post``
sites, through ``dh.collect`` under ``torch.no_grad()``.

The limit is the work no implementation can skip, measured on this machine in this run: the
model's forward pass without hooks, plus, per batch and site, the float64 Gram product
``h.T @ h`` and the float32 co-firing product ``f.T @ f`` of ``(tokens, 3072)`` tensors (bare
torch ops on preallocated tensors of the same shapes and dtypes). Reported: tokens per second,
and the fraction of the limit reached, ``(forward + GEMMs) / ours``. Target: >= 60 %.

Timings are minima over repeats, interleaved so that load from other processes hits every
variant alike. Run ``python -m benchmarks.bench_transformer`` (``--quick``: two batches, one
repeat); :func:`main` returns the rows.
"""

from __future__ import annotations

import os

# Set before torch is imported (when run as a script); main() also pins torch's own pool.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import argparse  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

import degen_hooks as dh  # noqa: E402
from benchmarks._timing import best_times

D_MLP = 3072
N_LAYERS = 12
SITES = [f"blocks.{layer}.mlp.hook_post" for layer in range(N_LAYERS)]


def gpt2_small_shaped(
    n_ctx: int = 128,
    d_vocab: int = 1000,
    *,
    n_layers: int = N_LAYERS,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """A random TransformerLens model shaped like GPT-2 small (eval, offline).

    A ``HookedTransformer`` where TransformerLens has it, else a native ``TransformerBridge``.
    """
    from tests.cases import tl_model

    return tl_model(
        dtype,
        n_layers=n_layers,
        d_model=768,
        n_heads=12,
        d_head=64,
        d_mlp=D_MLP,
        n_ctx=n_ctx,
        d_vocab=d_vocab,
        act_fn="gelu_new",
        normalization_type="LN",
        seed=0,
    )


def run_ours(model: nn.Module, batches: list[torch.Tensor]) -> dh.Statistics:
    """Gram + co-firing statistics at every MLP output through ``dh.collect``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TransformerLens deprecation notices
        with dh.collect(model, SITES, firing=True) as run, torch.no_grad():
            for tokens in batches:
                model(tokens)
    return run.stats


def run_forward(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """The bare forward passes, no hooks."""
    with torch.no_grad():
        for tokens in batches:
            model(tokens)


def make_gemms(n_tokens: int, n_batches: int) -> Callable[[], None]:
    """The bare float64 Gram and float32 co-firing products of every batch and site."""
    gen = torch.Generator().manual_seed(0)
    acts = torch.randn(n_tokens, D_MLP, generator=gen, dtype=torch.float64)
    fires = (torch.randn(n_tokens, D_MLP, generator=gen) > 0).to(torch.float32)

    def gemms() -> None:
        for _ in range(n_batches * len(SITES)):
            acts.T @ acts
            fires.T @ fires

    return gemms


def main(
    quick: bool = False,
    n_batches: int | None = None,
    batch: int = 4,
    n_ctx: int = 128,
    repeats: int | None = None,
) -> list[dict[str, Any]]:
    """Time ours, the bare forward and the bare GEMMs; returns one row.

    Args:
        quick: Two batches and one repeat (a smoke run).
        n_batches: Batches of ``batch x n_ctx`` tokens (default 4, or 2 with ``quick``).
        batch: Sequences per batch.
        n_ctx: Tokens per sequence.
        repeats: Timing repeats (default 2, or 1 with ``quick``).

    Returns:
        A row with ``name``, ``ours_s``, ``baseline_s`` (forward + GEMMs), ``ratio``
        (ours / limit), ``fraction_of_limit``, ``tokens_per_s``, ``limit_tokens_per_s``,
        ``forward_s``, ``gemm_s``, ``target``, ``met`` and ``note``.
    """
    torch.set_num_threads(1)
    n_batches = n_batches or (2 if quick else 4)
    repeats = repeats or (1 if quick else 2)
    model = gpt2_small_shaped(n_ctx=n_ctx)
    gen = torch.Generator().manual_seed(1)
    batches = [
        torch.randint(0, model.cfg.d_vocab, (batch, n_ctx), generator=gen) for _ in range(n_batches)
    ]
    n_tokens = batch * n_ctx
    gemms = make_gemms(n_tokens, n_batches)
    # Warm-up on a short batch: first-call allocations and lazy initialisation.
    run_ours(model, [batches[0][:1, :16]])
    run_forward(model, [batches[0][:1, :16]])
    make_gemms(16, 1)()
    last: dict[str, dh.Statistics] = {}
    times = best_times(
        {
            "ours": lambda: last.__setitem__("stats", run_ours(model, batches)),
            "forward": lambda: run_forward(model, batches),
            "gemms": gemms,
        },
        repeats,
    )
    stats = last["stats"]  # sanity: every token reached every site
    total_tokens = n_tokens * n_batches
    assert all(stats[site].acts.n_samples == total_tokens for site in SITES)
    assert all(stats[site].firing.n_samples == total_tokens for site in SITES)
    limit = times["forward"] + times["gemms"]
    fraction = limit / times["ours"]
    return [
        {
            "name": "GPT-2-small-shaped MLP stats (Gram + co-firing, 12 sites): collect vs limit",
            "ours_s": times["ours"],
            "baseline": "bare forward + bare float64 Gram and float32 co-firing GEMMs",
            "baseline_s": limit,
            "ratio": times["ours"] / limit,
            "speedup": fraction,
            "fraction_of_limit": fraction,
            "tokens_per_s": total_tokens / times["ours"],
            "limit_tokens_per_s": total_tokens / limit,
            "forward_s": times["forward"],
            "gemm_s": times["gemms"],
            "n_tokens": total_tokens,
            "target": "limit/ours >= 0.6",
            "met": fraction >= 0.6,
            "note": (
                f"{total_tokens} tokens ({n_batches} x {batch} x {n_ctx}), float32 model, "
                f"float64 stats: {total_tokens / times['ours']:.0f} tokens/s vs limit "
                f"{total_tokens / limit:.0f} tokens/s = {100 * fraction:.0f}% "
                f"(forward {times['forward']:.2f} s + GEMMs {times['gemms']:.2f} s)"
            ),
        }
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two batches, one repeat")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    for row in main(quick=args.quick, repeats=args.repeats):
        verdict = "met" if row["met"] else "MISSED"
        print(f"{row['name']}: {row['note']} [{row['target']}: {verdict}]")
