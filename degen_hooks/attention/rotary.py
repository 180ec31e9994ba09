"""Rotary position embeddings of q and k, their transposes, and the check of a pattern.

Part of :mod:`degen_hooks.attention`. :class:`Rotary` applies a rotary embedding as
TransformerLens and Hugging Face models do (pairs of adjacent features, or the two halves);
:func:`passed_rotary` makes one from the ``(cos, sin)`` a Hugging Face model passes its
attention, and :func:`check_pattern` refuses a batch whose pattern the section would not
reproduce. Model families find the tables (``degen_hooks.transformer_lens._rotary``,
``degen_hooks.families.transformers``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import largest

__all__ = ["Rotary", "check_pattern", "passed_rotary"]

_ELEMENTS = 2**21  # elements of the score tensors checked at once


@dataclass
class Rotary:
    """A rotary embedding ``x -> M_t x`` of the first ``dim`` features of q and k.

    ``M_t x = cos_t * x + sin_t * F(x)``, ``F`` the pair flip (``[x0, x1] -> [-x1, x0]``, of
    adjacent features or of the two halves), as TransformerLens applies it.
    """

    cos: torch.Tensor  # (n_positions, dim)
    sin: torch.Tensor
    adjacent_pairs: bool

    def _flip(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        if self.adjacent_pairs:
            out[..., ::2], out[..., 1::2] = -x[..., 1::2], x[..., ::2]
        else:
            half = x.shape[-1] // 2
            out[..., :half], out[..., half:] = -x[..., half:], x[..., :half]
        return out

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """``M_t x`` for ``x`` of shape ``(batch, pos, heads, d_head)`` at positions ``0 ..``."""
        dim = self.cos.shape[1]
        cos = self.cos.to(x)[: x.shape[1], None, :]  # (pos, 1, dim)
        sin = self.sin.to(x)[: x.shape[1], None, :]
        turned = cos * x[..., :dim] + sin * self._flip(x[..., :dim])
        return torch.cat([turned, x[..., dim:]], dim=-1)

    def unrotate(self, y: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``M_t^T y`` (``F^T = -F``) for vectors ``y`` of shape ``(..., pos, heads, d_head)``
        at ``positions`` (broadcast against ``y``'s position axis)."""
        dim = self.cos.shape[1]
        cos = self.cos.to(y)[positions][..., None, :]  # (..., pos, 1, dim)
        sin = self.sin.to(y)[positions][..., None, :]
        turned = cos * y[..., :dim] - self._flip(sin * y[..., :dim])
        return torch.cat([turned, y[..., dim:].expand(*turned.shape[:-1], -1)], dim=-1)


_POSITIONS_HINT = (
    "the model rotated q and k at positions other than 0, 1, ..., n-1 (position_ids, left "
    "padding with an attention_mask, a key-value cache), or changed the scores in a way the "
    "closed form does not follow. Run the section without position_ids/attention_mask/cache, "
    "or use exact probes."
)


def passed_rotary(cos: torch.Tensor, sin: torch.Tensor) -> Rotary:
    """The rotation of the ``(cos, sin)`` a Hugging Face model passed its attention.

    Args:
        cos, sin: ``(pos, dim)`` or ``(batch, pos, dim)`` (``dim <= d_head``: the first
            ``dim`` features rotate), in the rotate-half convention of ``apply_rotary_pos_emb``.

    Returns:
        The float64 :class:`Rotary` of these very tables (scaling such as dynamic NTK or
        YaRN's ``attention_scaling`` included).

    Raises:
        ValueError: If the samples of the batch got different tables (per-sample positions).
    """
    if cos.ndim == 3:
        if not all(torch.equal(t, t[:1].expand_as(t)) for t in (cos, sin)):
            raise ValueError(f"Rotary tables differ across the batch: {_POSITIONS_HINT}")
        cos, sin = cos[0], sin[0]
    f64 = torch.float64
    return Rotary(cos=cos.to(f64), sin=sin.to(f64), adjacent_pairs=False)


def check_pattern(
    q: torch.Tensor,
    k: torch.Tensor,
    pattern: torch.Tensor,
    scale: float,
    dtype: torch.dtype,
    tolerance: float | None = None,
    hint: str | None = None,
    *,
    mask: torch.Tensor | None = None,
    causal: bool = True,
    bias: torch.Tensor | None = None,
    outputs: torch.Tensor | None = None,
) -> None:
    """Refuse a batch whose pattern is not ``softmax(q k^T / scale + bias)`` over the keys
    each query sees (a hook on the scores or the pattern, rotations at other positions).

    The keys a query sees: its own and earlier ones (``causal``), less the padding
    (``mask``; without one, the keys no query of the sample attends to in any head: a
    mask's zeros, which a softmax over the other keys reproduces). Queries of padding are
    not checked.

    Args:
        q, k: The (rotated) q and k the section computed, ``(b, pos, heads, d_head)``.
        pattern: The model's pattern, ``(b, heads, query pos, key pos)``, float64.
        scale: The section's score divisor.
        dtype: The dtype the model computed the pattern in (sets the default tolerance).
        tolerance: The largest difference allowed (default: ``1e-3``, ``5e-2`` in half
            precision: a bridge takes the softmax in float32 at best).
        hint: What to do, for the message (default: about rotary positions).
        mask: ``(b, pos)`` real tokens, or ``None``.
        causal: Queries see only their own and earlier keys.
        bias: Constants added to the scores, ``(heads, pos, pos)`` (ALiBi), or ``None``.
        outputs: The query positions the closed form uses (checked there only), ``None``
            for all.

    Raises:
        ValueError: If they differ by more than rounding.
    """
    if tolerance is None:
        tolerance = 1e-3 if torch.finfo(dtype).bits >= 32 else 5e-2
    n_pos, device = q.shape[1], q.device
    rows = torch.arange(n_pos, device=device) if outputs is None else outputs.to(device)
    hidden = torch.zeros(n_pos, n_pos, dtype=torch.bool, device=device)
    if causal:
        hidden = torch.ones_like(hidden).triu(1)
    hidden = hidden[rows]
    if bias is not None:
        bias = bias[:, rows]
    step = max(1, _ELEMENTS // max(1, pattern[0].numel() * q.shape[-1]))
    for start in range(0, q.shape[0], step):
        part = slice(start, start + step)
        scores = torch.einsum("bqhe,bkhe->bhqk", q[part][:, rows], k[part]) / scale
        if bias is not None:
            scores += bias
        if mask is None:  # keys no query attends to in any head: padding
            keys = (pattern[part] == 0).all(dim=1).all(dim=1)
        else:
            keys = ~mask[part].to(device)
        masked = hidden | keys[:, None, None, :]
        expected = torch.softmax(scores.masked_fill(masked, float("-inf")), dim=-1)
        difference = expected.nan_to_num(0.0) - pattern[part][:, :, rows]
        if mask is not None:  # queries of padding: not checked
            difference = difference.transpose(1, 2)[mask[part][:, rows].to(device)]
        error = largest(difference)
        if error > tolerance:
            raise ValueError(
                f"The attention pattern differs from the closed form's softmax of q and k "
                f"by {error:.2g} (tolerance {tolerance:.2g}): {hint or _POSITIONS_HINT}"
            )
