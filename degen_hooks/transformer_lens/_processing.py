"""TransformerLens weight processing (fold_ln, centring, ...) recorded with the statistics.

Part of :mod:`degen_hooks.transformer_lens`; see its docstring.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..sites import _unwrap
from ._names import _NORMS, _PARAM_FREE_NORMS, _cfg, is_bridge

if TYPE_CHECKING:
    from ..statistics import Statistics

# Relative size of |mean over d_model| below which a weight counts as centred: processing
# runs in float32, which leaves means of about 1e-8 of the weight scale.
_CENTRED_RTOL = 1e-5
_NORM_LEAVES = frozenset({"w", "b", "weight", "bias"})


class ProcessedWeightsWarning(UserWarning):
    """Statistics were collected on a TransformerLens model with processed weights."""


# -- weight processing -----------------------------------------------------------------------
def _weight(model: nn.Module, name: str) -> torch.Tensor | None:
    try:
        value = getattr(model, name)
    # TypeError: a TransformerLens 3 bridge stacks absent biases (b_V of Llama) and fails.
    except (AttributeError, RuntimeError, NotImplementedError, KeyError, TypeError):
        return None
    return value.detach() if isinstance(value, torch.Tensor) else None


def _centred(weights: list[torch.Tensor | None], dim: int = -1) -> bool:
    present = [w for w in weights if w is not None and w.numel()]
    if not present:
        return False
    for w in present:
        w = w.to(torch.float64)
        scale = w.abs().max()
        if scale == 0 or w.mean(dim).abs().max() > _CENTRED_RTOL * scale:
            return False
    return True


def _norm_params(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Gains and biases of every LayerNorm/RMSNorm, either family, as ``(leaf, tensor)``."""
    # state_dict(), not named_parameters(): a bridge reaches its parameters first through
    # ``_original_component`` paths, while its state_dict() uses the component names.
    params = []
    for name, tensor in model.state_dict().items():
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2].startswith("ln") and parts[-1] in _NORM_LEAVES:
            params.append((parts[-1], tensor))
    return params


def _norms_are_identity(model: nn.Module) -> bool:
    params = _norm_params(model)
    if not params:
        return False
    return all(
        torch.all(p == (1.0 if leaf in ("w", "weight") else 0.0)).item() for leaf, p in params
    )


def processing_flags(model: nn.Module) -> dict[str, Any]:
    """The TransformerLens weight processing ``model`` carries, as JSON-able flags.

    Neither family records which processing was applied, so the flags are read from the
    config and detected from the weights: each is ``True`` when the weights are in the form
    that step produces. ``fold_ln``: the config says ``LNPre``/``RMSPre`` (HookedTransformer)
    or processed norms are the identity (bridge); ``center_writing_weights``: ``W_E``,
    ``W_pos``, ``W_O`` and ``W_out`` have zero mean over ``d_model``; ``center_unembed``:
    ``W_U`` has zero mean over the vocabulary; ``fold_value_biases``: every ``b_V`` is zero
    (also true of a freshly initialised model, where the fold changes nothing);
    ``refactor_factored_attn_matrices`` cannot be told from the weights (``None``).

    Args:
        model: A TransformerLens model.

    Returns:
        ``{"family", "transformer_lens_version", "normalization_type", "act_fn", "fold_ln",
        "center_writing_weights", "center_unembed", "fold_value_biases",
        "refactor_factored_attn_matrices", "weights_processed", "compatibility_mode",
        "is_processed"}``; ``is_processed`` is ``True`` when processing changed the weights,
        so statistics and bases apply to the processed model only.
    """
    inner, _ = _unwrap(model)
    cfg = _cfg(inner)
    bridge = is_bridge(inner)
    normalization = getattr(cfg, "normalization_type", None)
    with torch.no_grad():
        if bridge:
            weights_processed = bool(getattr(inner, "_weights_processed", False))
            fold_ln = bool(
                weights_processed and normalization in _NORMS and _norms_are_identity(inner)
            )
        else:
            weights_processed = None
            fold_ln = normalization in _PARAM_FREE_NORMS
        writing = [_weight(inner, n) for n in ("W_E", "W_pos", "W_O", "W_out")]
        center_writing = _centred(writing)
        center_unembed = _centred([_weight(inner, "W_U")])
        b_v = _weight(inner, "b_V")
        fold_value_biases = bool(b_v is not None and torch.all(b_v == 0).item())
    try:
        from importlib.metadata import version

        tl_version = version("transformer-lens")
    except Exception:  # a source checkout without metadata
        tl_version = None
    flags: dict[str, Any] = {
        "family": type(inner).__name__,
        "transformer_lens_version": tl_version,
        "normalization_type": normalization,
        "act_fn": getattr(cfg, "act_fn", None),
        "fold_ln": bool(fold_ln),
        "center_writing_weights": bool(center_writing),
        "center_unembed": bool(center_unembed),
        "fold_value_biases": fold_value_biases,
        "refactor_factored_attn_matrices": None,
        "weights_processed": weights_processed,
        "compatibility_mode": bool(getattr(inner, "compatibility_mode", False)) if bridge else None,
    }
    flags["is_processed"] = bool(
        flags["fold_ln"]
        or flags["center_writing_weights"]
        or flags["center_unembed"]
        or weights_processed
    )
    return flags


def record_metadata(
    stats: Statistics, model: nn.Module, *, warn: bool = True, stacklevel: int = 2
) -> dict[str, Any]:
    """Store :func:`processing_flags` in ``stats.metadata["transformer_lens"]``; warn if processed.

    Call it once per collection on a TransformerLens model, e.g. right after the
    ``with dh.collect(...)`` block, so that saved statistics say which weights they
    describe.

    Args:
        stats: The :class:`~degen_hooks.Statistics` to annotate (its ``metadata`` dict).
        model: The TransformerLens model the statistics come from.
        warn: Emit a :class:`ProcessedWeightsWarning` for a processed model.
        stacklevel: ``warnings.warn`` stack level (2: the caller of this function).

    Returns:
        The flags that were stored.

    Warns:
        ProcessedWeightsWarning: If processing changed the weights (``is_processed``).
    """
    flags = processing_flags(model)
    stats.metadata["transformer_lens"] = flags
    if warn and flags["is_processed"]:
        applied = [
            k
            for k in ("fold_ln", "center_writing_weights", "center_unembed", "weights_processed")
            if flags[k]
        ]
        warnings.warn(
            f"Collecting statistics on a {flags['family']} with processed weights "
            f"({', '.join(applied)}): bases and statistics describe the processed model only, "
            "whose coordinates differ from the raw checkpoint's. Load the model with the same "
            "processing to use them (the flags are in stats.metadata['transformer_lens']), or "
            "load it unprocessed (HookedTransformer.from_pretrained_no_processing, or a bridge "
            "without enable_compatibility_mode).",
            ProcessedWeightsWarning,
            stacklevel=stacklevel,
        )
    return flags
