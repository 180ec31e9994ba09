"""Where a TransformerLens model keeps its rotary tables, for the attention closed form.

Part of :mod:`degen_hooks.transformer_lens`; the rotation itself is
:class:`degen_hooks.attention.rotary.Rotary`. A ``HookedTransformer`` keeps its tables
(``rotary_cos``, ``rotary_sin``) and hooks the rotated q and k. A ``TransformerBridge`` does
neither the same way: :func:`bridge_rotary` finds the tables (a native model's fixed ones, or
the ``(cos, sin)`` a Hugging Face model passes its attention in each forward pass), and the
section rotates the bridge's unrotated q and k itself, checking each batch's pattern against
them (:func:`~degen_hooks.attention.rotary.check_pattern`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._weights import float64_copy
from ..attention.qk_norm import QKNorm
from ..attention.rotary import Rotary
from ._names import refuse_flagged


def hf_scale(attn: nn.Module) -> float:
    """The divisor of a bridge's Hugging Face attention scores (it multiplies by ``scaling``)."""
    hf_attn = getattr(attn, "original_component", None)
    scaling = getattr(hf_attn, "scaling", None)
    if not isinstance(scaling, (int, float)):  # the bridge's own default
        scaling = getattr(hf_attn, "head_dim", 1) ** -0.5
    return 1.0 / float(scaling)


def bridge_rotary(attn: nn.Module, cfg: Any, index: int) -> tuple[Rotary | None, tuple[str, ...]]:
    """How a ``TransformerBridge`` attention layer rotates q and k, for the closed form.

    The section reads the bridge's unrotated ``hook_q`` and ``hook_k`` and rotates them
    itself: a bridge fires ``hook_rot_q``/``hook_rot_k`` head-major (``(b, heads, pos,
    d_head)`` before their hook conversion), or not at all (a native model, which rotates
    inside its wrapped attention). The tables are

    * a native model's (``TransformerBridge.boot_native``): the fixed ``cos_cached`` and
      ``sin_cached`` of its rotary module, checked against the module's own rotation of a
      random input;
    * a Hugging Face model's: the ``(cos, sin)`` its rotary embedding passes the layer, read
      at ``attn.hook_cos`` and ``attn.hook_sin`` in every forward pass (:func:`passed_rotary`):
      the very tables the model used, dynamic scaling included.

    Args:
        attn: The bridge's attention component of the block.
        cfg: The bridge's config.
        index: The block.

    Returns:
        ``(rotary, ())`` for fixed tables, ``(None, (cos hook, sin hook))`` for tables read
        in each forward pass.

    Raises:
        ValueError: For rotary the closed form cannot follow exactly (named in the message).
    """
    original = getattr(attn, "original_component", None)
    native = getattr(original, "rotary", None)
    if isinstance(getattr(native, "cos_cached", None), torch.Tensor):
        return _native_rotary(native, cfg.d_head, index), ()
    hf_config = getattr(original, "config", None)
    rope = getattr(hf_config, "rope_parameters", None)

    def has(name: str) -> bool:  # the wrapped Hugging Face attention has this feature
        return getattr(original, name, None) is not None

    unsupported = {
        "adjacent pairs rotated in float32 (rotary_adjacent_pairs, rotary_interleaved_cos_sin)":
            bool(getattr(cfg, "rotary_adjacent_pairs", False))
            or bool(getattr(cfg, "rotary_interleaved_cos_sin", False)),
        "a key multiplier (key_multiplier)": has("key_multiplier"),
        "a per-position query scale (llama_4_scaling_beta)":
            isinstance(rope, dict) and rope.get("llama_4_scaling_beta") is not None,
        "a gated q projection (gated_q_proj)": bool(getattr(cfg, "gated_q_proj", False)),
        "attention sinks": has("sinks"),
        "soft-capped scores (attn_logit_softcapping)": has("attn_logit_softcapping"),
        "clip_qkv": getattr(hf_config, "clip_qkv", None) is not None,
        "layers that skip the rotation (rope_optional)":
            bool(getattr(attn, "rope_optional", False)),
    }  # fmt: skip
    refuse_flagged(unsupported, f"Block {index}'s rotary attention ({type(attn).__name__})")
    hooks = ("hook_cos", "hook_sin")
    if not all(isinstance(getattr(attn, name, None), nn.Module) for name in hooks):
        raise ValueError(
            f"Block {index}'s attention ({type(attn).__name__}) rotates q and k inside the "
            "wrapped model, which passes it no (cos, sin) tables to read: the rotary closed "
            "form covers HookedTransformer, native TransformerBridge models and Hugging Face "
            "models whose attention receives position_embeddings (Llama-style). Use exact "
            "probes."
        )
    return None, tuple(f"blocks.{index}.attn.{name}" for name in hooks)


def bridge_qk_norm(attn: nn.Module, cfg: Any, index: int) -> QKNorm | None:
    """The norms of each head's q and k before the rotation of a bridge's Hugging Face
    attention (Qwen 3's ``q_norm``, ``k_norm``), or ``None`` without them.

    The bridge fires ``hook_q``/``hook_k`` on the projections, before the norms; the section
    norms and rotates them itself, and each batch's pattern is checked against them.

    Raises:
        ValueError: For norms the closed form does not cover: after the rotation
            (``qk_norm_after_rope``), of the whole projection (OLMo 2), per-head gains, or
            other kinds (:meth:`QKNorm.of_modules`).
    """
    submodules = set(getattr(attn, "submodules", None) or {})
    if not {"q_norm", "k_norm"} & submodules:
        return None
    original = getattr(attn, "original_component", None)
    phase = getattr(attn, "_qk_norm_phase", None)
    odd = {
        "norms of q and k after the rotation (qk_norm_after_rope)": bool(
            getattr(cfg, "qk_norm_after_rope", False)
        ),
        f"norms of q and k in phase {phase!r}, not of each head's vector": phase != "post_reshape",
        "norms of q and k with gains per head": bool(getattr(attn, "_qk_norm_per_head", False)),
    }
    refuse_flagged(odd, f"Block {index}'s attention ({type(attn).__name__})")
    d_head = int(getattr(original, "head_dim", cfg.d_head))
    return QKNorm.of_modules(
        getattr(original, "q_norm", None), getattr(original, "k_norm", None), d_head
    )


def _native_rotary(module: nn.Module, d_head: int, index: int) -> Rotary:
    """The fixed tables of a native bridge's rotary module, in the convention it applies
    (found by rotating a random input both ways)."""
    f64 = torch.float64
    cos, sin = (float64_copy(getattr(module, name)) for name in ("cos_cached", "sin_cached"))
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(1, 1, cos.shape[0], d_head, generator=generator, dtype=f64)
    probe = probe.to(cos.device)  # (batch, heads, pos, d_head), the module's layout
    apply = getattr(module, "apply_rope", None)
    with torch.no_grad():
        turned = apply(probe, probe)[0].transpose(1, 2) if callable(apply) else None
    for adjacent in (True, False) if turned is not None else ():
        rotary = Rotary(cos=cos, sin=sin, adjacent_pairs=adjacent)
        if torch.allclose(rotary.rotate(probe.transpose(1, 2)), turned, rtol=1e-12, atol=1e-12):
            return rotary
    raise ValueError(
        f"Block {index}'s rotary module ({type(module).__name__}) does not rotate q and k by "
        "its cos_cached/sin_cached tables in a convention the closed form knows (adjacent "
        "pairs or halves). Use exact probes."
    )
