"""Closed-form attention sections of TransformerLens models: no backward passes.

Part of :mod:`degen_hooks.transformer_lens`; see its docstring. The mathematics is
:class:`degen_hooks.attention.AttentionSection`'s; this module says where a TransformerLens
model keeps what it needs. The layer's ``q``, ``k``, ``v`` and pattern are read from its hooks
in one forward pass (masks, ALiBi and shortformer position embeddings are in the pattern).

Rotary embeddings: a HookedTransformer hooks the rotated vectors (``hook_rot_q``,
``hook_rot_k``), which the section reads, checking the positions against the unrotated
``hook_q`` (with ``use_qk_norm``, both raw projections normed, then checked); on a
TransformerBridge the section rotates ``hook_q`` and ``hook_k`` itself, by the tables
:func:`._rotary.bridge_rotary` finds, and checks the model's pattern against them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from .._checks import largest, relative_tolerance
from .._errors import ShapeMismatchError
from .._weights import float64_copy
from ..attention import AttentionSection as _Core
from ..attention._checks import check_read, projection_biases
from ..attention.qk_norm import QKNorm
from ..attention.rotary import Rotary, check_pattern, passed_rotary
from ..attention.section import heads
from ..sites import Site, _unwrap
from ._blocks import _norm_bias
from ._mlp import _norm_weight
from ._names import _NORMS, _cfg, _layers, refuse_flagged
from ._rotary import bridge_qk_norm, bridge_rotary, hf_scale

_HOOKS = ("hook_q", "hook_k", "hook_v", "hook_pattern")
_HOOK_HINT = (
    "a hook changes the layer (steering q, k or v, editing the scores or the pattern, a head "
    "ablation at hook_z, a patch of hook_attn_out or hook_result), which the closed form's "
    "weights would leave out. Remove the hook, or leave this pair to backward passes "
    "(sections=None), which follow it."
)
# TransformerLens normalizes q and k of these after their hooks (abstract_attention.py).
_QK_NORM_ARCHITECTURES = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")


def attention_section_sites(
    model: nn.Module, layer: int, *, residual: bool = True
) -> tuple[str, str]:
    """The ``(input, output)`` sites matching :func:`attention_section`.

    The input is always ``blocks.L.hook_resid_pre`` (a LayerNorm/RMSNorm before attention is
    part of the section); the output is

    * ``residual=True`` (default): ``blocks.L.hook_resid_mid`` (``hook_resid_post`` in
      attention-only models), i.e. ``y = x + Attn(Norm(x))``;
    * ``residual=False``: ``blocks.L.hook_attn_out``, the attention layer alone.

    Raises:
        ValueError: For ``residual=True`` in a parallel block, or attention the closed form
            does not cover (see :func:`attention_section`).
    """
    (index,) = _layers(model, layer)
    cfg = _cfg(model)
    _check_attention(cfg)
    block = f"blocks.{index}"
    if not residual:
        return f"{block}.hook_resid_pre", f"{block}.hook_attn_out"
    if getattr(cfg, "parallel_attn_mlp", False):
        raise ValueError(
            "Parallel attention/MLP blocks (cfg.parallel_attn_mlp=True) add the MLP to the same "
            "residual: use residual=False (output hook_attn_out) or exact probes."
        )
    output = "hook_resid_post" if getattr(cfg, "attn_only", False) else "hook_resid_mid"
    return f"{block}.hook_resid_pre", f"{block}.{output}"


def _check_attention(cfg: Any) -> None:
    unsupported = {
        "use_dynamic_ntk_rope (rotary tables rescaled during the forward pass)": bool(
            getattr(cfg, "use_dynamic_ntk_rope", False)
        ),
        "use_split_qkv_input / use_attn_in (per-head attention inputs)": bool(
            getattr(cfg, "use_split_qkv_input", False) or getattr(cfg, "use_attn_in", False)
        ),
        "use_qk_norm without rotary embeddings": bool(getattr(cfg, "use_qk_norm", False))
        and getattr(cfg, "positional_embedding_type", "standard") != "rotary",
        "a norm of the whole q and k projections (OLMo 2)": getattr(
            cfg, "original_architecture", None
        )
        in _QK_NORM_ARCHITECTURES,
        f"clip_qkv={getattr(cfg, 'clip_qkv', None)}": getattr(cfg, "clip_qkv", None) is not None,
        "use_logn_attn": bool(getattr(cfg, "use_logn_attn", False)),
        "use_attention_sinks": bool(getattr(cfg, "use_attention_sinks", False)),
        f"attn_scores_soft_cap={getattr(cfg, 'attn_scores_soft_cap', -1.0)}": (
            (getattr(cfg, "attn_scores_soft_cap", -1.0) or -1.0) > 0
        ),
        "load_in_4bit": bool(getattr(cfg, "load_in_4bit", False)),
    }
    refuse_flagged(unsupported, "The attention")


@dataclass
class AttentionSection(_Core):
    """One attention layer of a TransformerLens model, as a closed-form section.

    Weights use the TransformerLens layout, in float64. Build it with
    :func:`attention_section`; ``build_bases`` runs :meth:`gram_pass` in place of the
    backward passes of the section's input site. The attributes are those of
    :class:`degen_hooks.attention.AttentionSection` (``source`` and ``target`` the input and
    output hook names), and:

    Attributes:
        hooks: Names of the layer's ``q``, ``k``, ``v`` and pattern hooks.
        rotates: ``hooks`` name the unrotated q and k (a ``TransformerBridge``): each batch
            rotates them by ``rotary`` and checks the model's pattern against them.
        rotary_tables: The hooks of the ``(cos, sin)`` tables a Hugging Face model passes the
            layer (a bridge): each forward pass's tables make that batch's ``rotary``.
        b_o: The output bias ``(d_out,)``, or ``None``: each batch checks the heads' outputs
            (``hook_z``) and the section's output against the pattern, v and ``W_O`` the
            closed form uses, so a hook that changes them (a head ablation, a patch) is
            refused rather than left out. q, k and v are checked against the weights
            (``b_q``, ``b_k``, ``b_v``) and the pattern against the softmax of q and k.
        causal: Queries see the keys up to their own position (else every key).
        alibi: The scores carry TransformerLens' ALiBi biases.
        shortformer: The hook of the position embeddings added to the input of q and k
            (``positional_embedding_type="shortformer"``), or ``None``.
    """

    hooks: tuple[str, ...] = _HOOKS
    rotates: bool = False
    rotary_tables: tuple[str, ...] = ()
    b_o: torch.Tensor | None = None
    causal: bool = True
    alibi: bool = False
    shortformer: str | None = None

    def _check_sites(self, site: Site, target: Site | None) -> None:
        names = tuple(None if s is None else _hook_name(s.name) for s in (site, target))
        if names != (self.source, self.target):
            raise ShapeMismatchError(
                f"This attention section maps {self.source!r} -> {self.target!r}, but was asked "
                f"for {names[0]!r} -> {names[1]!r}: build it for the right layer "
                "(attention_section_sites(model, layer, residual=...) gives its sites)."
            )

    def _reads(self) -> dict[str, Site]:
        """The layer's q, k, v and pattern hooks, with a HookedTransformer's rotary
        embeddings the unrotated q (to check the positions), and the rotary tables a bridge's
        Hugging Face attention is passed."""
        reads = {role: Site(name) for role, name in zip("qkvp", self.hooks, strict=True)}
        reads["z"] = Site(f"{self.hooks[0].rsplit('.', 1)[0]}.hook_z")  # checked, as the output
        reads["y"] = Site(self.target, label=f"{self.target}:section output")
        if self.rotary is not None and not self.rotates:  # the raw q and k, checked
            reads["plain_q"] = Site(self.hooks[0].replace("hook_rot_q", "hook_q"))
            reads["plain_k"] = Site(self.hooks[1].replace("hook_rot_k", "hook_k"))
        for role, name in zip(("cos", "sin"), self.rotary_tables, strict=False):
            reads[role] = Site(name)
        if self.shortformer is not None:
            reads["pos"] = Site(self.shortformer)
        return reads

    def _read(
        self,
        reads: dict[str, torch.Tensor],
        mask: torch.Tensor | None = None,
        outputs: torch.Tensor | None = None,
    ) -> tuple[_Core, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch's section and float64 q, k, v and pattern (the model's own pattern,
        padding masked as its ``attention_mask`` says; ``mask`` names the real tokens whose
        rotary positions are checked).

        A HookedTransformer's (rotated) q is checked against its unrotated q; on a bridge
        (``rotates``), q and k are rotated by the batch's tables (when read) or the fixed
        ones, and the model's pattern checked against them.
        """
        n_heads, d_head = self.w_q.shape[0], self.w_q.shape[2]
        q, k, v = (heads(reads[role], n_heads, d_head) for role in "qkv")
        pattern = reads["p"].to(torch.float64)
        raw_q, raw_k = q, k  # before the rotation (and norms) a HookedTransformer applies
        if "plain_q" in reads:
            raw_q, raw_k = (heads(reads[role], n_heads, d_head) for role in ("plain_q", "plain_k"))
        self._check_projections(reads, (raw_q, raw_k, v), mask, outputs)
        if not self.rotates:
            section: _Core = self
            if self.qk_norm is not None:  # norm the raw q and k: both checked below
                section = replace(self, qk_norm=self.qk_norm.of_batch(raw_q, raw_k))
                frames = section.qk_norm.frames()  # type: ignore[union-attr]
                self._check_positions(q, frames.q.normalized, mask)
                self._check_positions(k, frames.k.normalized, mask)
            elif self.rotary is not None:
                self._check_positions(q, raw_q, mask)
                self._check_positions(k, raw_k, mask)
            self._check_pattern(q, k, pattern, mask, reads["p"].dtype, outputs)
            self._check_heads(reads, v, pattern, mask, outputs)
            return section, q, k, v, pattern
        tables = tuple(reads[role] for role in ("cos", "sin") if role in reads)
        section = replace(self, rotary=passed_rotary(*tables)) if tables else self
        rotary = section.rotary
        if rotary is None:  # rotates without tables: not built by attention_section
            raise ValueError("A section that rotates q and k needs rotary tables.")
        if self.qk_norm is not None:  # the bridge hooks the raw projections: norm them
            section = replace(section, qk_norm=self.qk_norm.of_batch(q, k))
            frames = section.qk_norm.frames()  # type: ignore[union-attr]
            q, k = frames.q.normalized, frames.k.normalized
        q, k = rotary.rotate(q), rotary.rotate(k)
        check_pattern(q, k, pattern, self.scale, reads["p"].dtype, mask=mask, outputs=outputs)
        self._check_heads(reads, v, pattern, mask, outputs)
        return section, q, k, v, pattern

    def _check_projections(
        self,
        reads: dict[str, torch.Tensor],
        raw: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        outputs: torch.Tensor | None,
    ) -> None:
        """Refuse a batch whose raw q, k or v (before rotation and norms of q and k, float64
        heads) is not ``ln1(x) W + b``
        (:meth:`~degen_hooks.attention._checks.AttentionChecks.check_projections`)."""
        x_qk = None
        if self.shortformer is not None:  # q and k read the input plus the position embeddings
            x_qk = reads["x"].to(torch.float64) + reads["pos"].to(torch.float64)
        dtype = reads["v"].dtype
        self.check_projections(reads["x"], raw, dtype, mask, _HOOK_HINT, x_qk=x_qk, outputs=outputs)

    def _check_pattern(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        pattern: torch.Tensor,
        mask: torch.Tensor | None,
        dtype: torch.dtype,
        outputs: torch.Tensor | None,
    ) -> None:
        """Refuse a batch whose pattern is not the softmax of ``q k^T / scale`` (plus the
        ALiBi biases) over the keys each query sees, at the probed ``outputs`` (the rows the
        closed form uses): a hook on the scores or the pattern changed it."""
        bias = None
        if self.alibi:
            from transformer_lens.components import AbstractAttention

            bias = AbstractAttention.create_alibi_bias(q.shape[2], q.shape[1], q.device)
            bias = bias.to(torch.float64)
        check_pattern(
            q, k, pattern, self.scale, dtype, relative_tolerance(dtype), _HOOK_HINT,
            mask=mask, causal=self.causal, bias=bias, outputs=outputs,
        )  # fmt: skip

    def _check_heads(
        self,
        reads: dict[str, torch.Tensor],
        v: torch.Tensor,
        pattern: torch.Tensor,
        mask: torch.Tensor | None,
        outputs: torch.Tensor | None,
    ) -> None:
        """Refuse a batch whose heads' outputs (``hook_z``) or section output are not
        ``pattern @ v`` and ``[x +] z W_O + b_O`` at the real tokens of the probed
        ``outputs`` (``None``: every position): a hook changed them."""
        rows = slice(None) if outputs is None else outputs.to(v.device)
        real = slice(None) if mask is None else mask.to(v.device)[:, rows]
        z = torch.einsum("bhqk,bkhe->bqhe", pattern[:, :, rows], v)
        check = {"at": self.source, "hint": _HOOK_HINT}
        got = reads["z"].reshape(*v.shape[:1], -1, *v.shape[2:])[:, rows]
        check_read("heads' outputs", z[real], got[real], size=largest(v), **check)
        y = torch.einsum("bqhe,hed->bqd", z, self.w_o.to(z.device))
        if self.residual:
            y = y + reads["x"][:, rows].to(y.dtype)
        if self.b_o is not None:
            y = y + self.b_o.to(y.device)
        check_read("output", y[real], reads["y"][:, rows][real], **check)

    def _check_positions(
        self, rotated: torch.Tensor, plain: torch.Tensor, mask: torch.Tensor | None
    ) -> None:
        """Refuse a batch whose q was rotated at other positions than ``0 .. n-1`` at a real
        token (right padding rotates padding elsewhere: no probe reads it, and no real token
        attends to it)."""
        error = (self.rotary.rotate(plain.reshape(rotated.shape)) - rotated).abs()  # type: ignore[union-attr]
        if mask is not None:
            error = error[mask.to(error.device)]
        if error.numel() and error.max() > 1e-4 * rotated.abs().max():
            raise ValueError(
                "The model rotated q and k at positions other than 0, 1, ..., n-1 (left "
                "padding with an attention_mask, or a key-value cache): the rotary closed form "
                "assumes plain positions. Run the section without attention_mask/cache, or "
                "use exact probes."
            )


def _hook_name(name: str) -> str:
    """A hook name without wrappers' prefixes (DDP's ``module.``, ``torch.compile``'s
    ``_orig_mod.``): a TransformerLens model has no submodule of those names."""
    while name.startswith(("module.", "_orig_mod.")):
        name = name.split(".", 1)[1]
    return name


def unprefixed(site: Site, prefix: str) -> str:
    """The site's name without DDP's ``module.`` prefix (both name the same site)."""
    return site.name[len(prefix) :] if prefix and site.name.startswith(prefix) else site.name


def _scale(model: nn.Module, index: int, cfg: Any) -> float:
    """The divisor of the attention scores (``attn.attn_scale``, else from the config)."""
    scale = getattr(_unwrap(model)[0].blocks[index].attn, "attn_scale", None)
    if isinstance(scale, (int, float)):
        return float(scale)
    if not getattr(cfg, "use_attn_scale", True):
        return 1.0
    scale = getattr(cfg, "attn_scale", None)
    scale = math.sqrt(cfg.d_head) if scale is None or scale <= 0 else float(scale)
    if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
        scale *= index + 1
    return scale


def attention_section(model: nn.Module, layer: int, *, residual: bool = True) -> AttentionSection:
    """The closed-form :class:`AttentionSection` of one block's attention layer.

    Pass it to ``build_bases(..., sections={input_site: (section, None)})`` to replace the
    backward passes of the input site by one forward pass (see the module docstring for the
    formula); :func:`attention_section_sites` gives the two sites.

    Args:
        model: A TransformerLens model (``HookedTransformer`` or ``TransformerBridge``).
        layer: The block.
        residual: ``True`` (default) for ``hook_resid_pre -> hook_resid_mid``.

    Rotary attention is covered on both families: a HookedTransformer's rotary tables, a
    native bridge's fixed ones, or the ``(cos, sin)`` a Hugging Face model passes a bridge's
    attention in each forward pass (see :func:`._rotary.bridge_rotary`). Grouped-query
    attention repeats each key/value head for its query heads. RMSNorms of each head's q and
    k before the rotation (``use_qk_norm``, Qwen 3 on a bridge) are followed: the section
    norms the raw ``hook_q``/``hook_k`` itself (:mod:`degen_hooks.attention.qk_norm`) and
    checks them against the rotated hooks or the pattern.

    Raises:
        ValueError: As :func:`attention_section_sites`; for QK norms of the whole projection
            (OLMo 2) or without rotary, soft caps, dynamic NTK tables on a HookedTransformer
            and other attention the formula does not cover; on a bridge, for rotary it cannot
            follow exactly (adjacent pairs rotated in float32, a multiplier between the q/k
            projection and the rotation, norms of q and k after it, attention sinks,
            rotation inside a wrapped module that passes no tables).
            ``gram_pass`` raises when a batch was rotated at positions other than
            ``0 .. n-1`` (left padding, position_ids, a cache).
    """
    source, target = attention_section_sites(model, layer, residual=residual)
    (index,) = _layers(model, layer)
    cfg = _cfg(model)
    attn = _unwrap(model)[0].blocks[index].attn
    w_q, w_k, w_v, w_o = (float64_copy(getattr(attn, f"W_{n}")) for n in "QKVO")
    # Grouped-query attention: a bridge keeps n_key_value_heads key/value weights, each
    # serving n_heads / n_key_value_heads consecutive query heads.
    w_k, w_v = (w.repeat_interleave(w_q.shape[0] // w.shape[0], dim=0) for w in (w_k, w_v))
    model_biases = tuple(getattr(attn, f"b_{name}", None) for name in "QKV")
    biases = projection_biases(  # float64_copy gathers FSDP2's DTensor shards whole
        tuple(float64_copy(b) if isinstance(b, torch.Tensor) else None for b in model_biases),
        (w_q, w_k, w_v),
        _norm_bias(_unwrap(model)[0].blocks[index].ln1, cfg),
    )
    gain = _norm_weight(model, index, cfg, "ln1")
    if gain is not None:  # q = (n * gain + bias) W_Q + b_Q: the gain scales W_Q's rows
        w_q, w_k, w_v = (w * gain.to(w)[None, :, None] for w in (w_q, w_k, w_v))
    norm = getattr(cfg, "normalization_type", None)
    rotary, hooks, tables = None, _HOOKS, ()
    rotates = getattr(cfg, "positional_embedding_type", "standard") == "rotary" and not (
        isinstance(getattr(attn, "rotary_cos", None), torch.Tensor)
    )
    qk_norm = None
    if rotates:  # a TransformerBridge: it rotates hook_q and hook_k, by these tables
        rotary, tables = bridge_rotary(attn, cfg, index)
        qk_norm = bridge_qk_norm(attn, cfg, index)
    elif getattr(cfg, "positional_embedding_type", "standard") == "rotary":
        if getattr(cfg, "use_qk_norm", False):  # RMSNorms of each head's q and k
            qk_norm = QKNorm(float64_copy(attn.q_norm.w), float64_copy(attn.k_norm.w), cfg.eps)
        rotary = Rotary(
            cos=float64_copy(attn.rotary_cos),
            sin=float64_copy(attn.rotary_sin),
            adjacent_pairs=bool(getattr(cfg, "rotary_adjacent_pairs", False)),
        )
        hooks = ("hook_rot_q", "hook_rot_k", "hook_v", "hook_pattern")
    shortformer = None
    if getattr(cfg, "positional_embedding_type", "standard") == "shortformer":
        shortformer = "hook_pos_embed"
    return AttentionSection(
        w_q=w_q.clone(),
        w_k=w_k.clone(),
        w_v=w_v.clone(),
        w_o=w_o.clone(),
        scale=_scale(model, index, cfg) if not tables else hf_scale(attn),
        residual=residual,
        source=source,
        target=target,
        hooks=tuple(f"blocks.{index}.attn.{name}" for name in hooks),
        norm=norm if norm in _NORMS else None,
        eps=float(getattr(cfg, "eps", 1e-5)),
        rotary=rotary,
        rotates=rotates,
        rotary_tables=tables,
        qk_norm=qk_norm,
        causal=getattr(cfg, "attention_dir", "causal") == "causal",
        alibi=getattr(cfg, "positional_embedding_type", "standard") == "alibi",
        shortformer=shortformer,
        b_q=biases[0],
        b_k=biases[1],
        b_v=biases[2],
        b_o=_bias(attn),
    )


def _bias(attn: nn.Module) -> torch.Tensor | None:
    """The attention's output bias ``b_O``, float64, or ``None``."""
    b_o = getattr(attn, "b_O", None)
    return float64_copy(b_o) if isinstance(b_o, torch.Tensor) else None
