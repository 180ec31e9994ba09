"""Rotary position embeddings as TransformerLens applies them, and their transposes.

Part of :mod:`degen_hooks.transformer_lens`; used by the attention closed form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
