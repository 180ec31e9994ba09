"""RMSNorm of each head's q and k before the rotation (Qwen 3's ``q_norm``, ``k_norm``).

Part of :mod:`degen_hooks.attention`. Such a layer computes, per position ``t`` and head ``h``,
the raw projection ``qr_ht = x_t W_Q^h (+ b)``, normalizes it, ``qn_ht = gamma_q * qr_ht /
sigma_ht`` with ``sigma_ht = sqrt(mean_e(qr_ht^2) + eps)``, and only then rotates it (``q_ht =
M_t qn_ht``; k alike). The norm's Jacobian is ``diag(gamma) P_ht`` with

    P_ht = (I - n_ht n_ht^T / e) / sigma_ht,   n_ht = qr_ht / sigma_ht   (symmetric, e x e),

so every derivative of a score through q or k gains ``P (gamma * .)`` between the rotation
and the projection: ``ds_hpl / dkr_hl = P^k_hl (gamma_k * M_l^T q_hp) / scale`` and
``ds_hpl / dqr_hp = P^q_hp (gamma_q * M_p^T k_hl) / scale``. :class:`QKNorm` holds the norm's
gains and a batch's raw projections; :class:`Frames` the ``(n, sigma)`` of every (sample,
position, head), and :func:`pull` applies ``y -> P (gamma * y)``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from .._weights import float64_copy

__all__ = ["Frame", "Frames", "QKNorm", "pull"]


def pull(
    y: torch.Tensor, n: torch.Tensor, sigma: torch.Tensor, gain: torch.Tensor | None
) -> torch.Tensor:
    """``P (gain * y)`` along the last axis, ``P = (I - n n^T / e) / sigma`` (``n`` and
    ``sigma`` broadcast against ``y``; ``gain=None``: ``P y``)."""
    gy = y if gain is None else gain * y
    dots = (n * gy).sum(-1, keepdim=True) / n.shape[-1]
    return (gy - n * dots) / sigma


@dataclass
class Frame:
    """The norm of q (or k) at every ``(sample, position, head)`` of a batch.

    Attributes:
        n: ``raw / sigma``, ``(b, pos, h, e)``.
        sigma: ``(b, pos, h, 1)``.
        gain: ``gamma``, ``(e,)``.
    """

    n: torch.Tensor
    sigma: torch.Tensor
    gain: torch.Tensor

    @classmethod
    def of(cls, raw: torch.Tensor, gain: torch.Tensor, eps: float) -> Frame:
        sigma = (raw.square().mean(-1, keepdim=True) + eps).sqrt()
        return cls(raw / sigma, sigma, gain.to(raw))

    @property
    def normalized(self) -> torch.Tensor:
        """The norm's output ``gamma * n`` (before the rotation)."""
        return self.gain * self.n

    def at(self, positions: torch.Tensor | slice, samples: slice = slice(None)) -> Frame:
        """The frame at ``positions`` (the position axis indexed) of ``samples``."""
        return Frame(self.n[samples, positions], self.sigma[samples, positions], self.gain)

    def pull(self, y: torch.Tensor, expand: tuple[int, ...] = ()) -> torch.Tensor:
        """``P (gain * y)`` with the frame's ``n`` and ``sigma`` unsqueezed at ``expand``."""
        n, sigma = self.n, self.sigma
        for axis in expand:
            n, sigma = n.unsqueeze(axis), sigma.unsqueeze(axis)
        return pull(y, n, sigma, self.gain)


@dataclass
class Frames:
    """The q and k :class:`Frame` of a batch."""

    q: Frame
    k: Frame

    def part(self, samples: slice) -> Frames:
        """The frames of the samples ``samples``."""
        return Frames(self.q.at(slice(None), samples), self.k.at(slice(None), samples))


@dataclass
class QKNorm:
    """Per-head RMSNorms of q and k before the rotation, and a batch's raw projections.

    Attributes:
        gain_q, gain_k: ``gamma_q``, ``gamma_k``: ``(d_head,)``, float64.
        eps: The norms' epsilon.
        raw_q, raw_k: The batch's projections before the norms, ``(b, pos, n_heads, d_head)``
            float64 (key heads repeated for each query head they serve), or ``None``.
    """

    gain_q: torch.Tensor
    gain_k: torch.Tensor
    eps: float
    raw_q: torch.Tensor | None = None
    raw_k: torch.Tensor | None = None

    @classmethod
    def of_modules(cls, q_norm: Any, k_norm: Any, d_head: int) -> QKNorm | None:
        """The norms of a Hugging Face attention layer (``q_norm``, ``k_norm``: RMSNorms of
        each head's q and k, ``weight * x / sqrt(mean(x^2) + variance_epsilon)`` over
        ``d_head``, as Qwen 3's), or ``None`` without them.

        Raises:
            ValueError: For other norms of q or k (one of the two, another kind, another
                width, different epsilons), named in the message.
        """
        norms = [q_norm, k_norm]
        if norms == [None, None]:
            return None
        kinds = [type(norm).__name__ for norm in norms]
        fits = all(
            norm is not None
            and "RMSNorm" in type(norm).__name__
            and isinstance(getattr(norm, "variance_epsilon", None), float)
            and isinstance(getattr(norm, "weight", None), torch.Tensor)
            and tuple(norm.weight.shape) == (d_head,)
            for norm in norms
        )
        if not fits or q_norm.variance_epsilon != k_norm.variance_epsilon:
            raise ValueError(
                f"No closed form for the norms of q and k {kinds}: covered are RMSNorms of "
                f"each head's q and k with one epsilon (weight of shape ({d_head},), as Qwen "
                "3's). Leave this attention to backward passes (sections=None)."
            )
        return cls(
            float64_copy(q_norm.weight), float64_copy(k_norm.weight), float(q_norm.variance_epsilon)
        )

    def of_batch(self, raw_q: torch.Tensor, raw_k: torch.Tensor) -> QKNorm:
        """The norms with a batch's raw projections."""
        return replace(self, raw_q=raw_q, raw_k=raw_k)

    def frames(
        self, raw_q: torch.Tensor | None = None, raw_k: torch.Tensor | None = None
    ) -> Frames:
        """The :class:`Frames` of the batch's (or the given) raw projections."""
        raw_q = self.raw_q if raw_q is None else raw_q
        raw_k = self.raw_k if raw_k is None else raw_k
        if raw_q is None or raw_k is None:
            raise ValueError(
                "This q/k norm holds no batch: its section's _read() sets the raw projections."
            )
        device = raw_q.device
        return Frames(
            Frame.of(raw_q, self.gain_q.to(device), self.eps),
            Frame.of(raw_k, self.gain_k.to(device), self.eps),
        )
