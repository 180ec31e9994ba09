"""Checks of what a closed-form attention section reads against its weights (#16, #19).

Part of :mod:`degen_hooks.attention`. The section differentiates q, k, v and the pattern as
its weights say, while it reads them after the model's hooks: every batch is checked here
(:class:`AttentionChecks`, mixed into :class:`~degen_hooks.attention.AttentionSection`;
:func:`check_read` for the heads' outputs and the output), so that a hook that steers,
ablates or patches inside the layer is refused rather than left out.
"""

from __future__ import annotations

import torch

from .._checks import largest, random_directions, relative_tolerance

__all__ = ["AttentionChecks", "check_read", "projection_biases"]


def projection_biases(
    biases: tuple[torch.Tensor | None, ...],
    weights: tuple[torch.Tensor, ...],
    beta: torch.Tensor | None,
) -> tuple[torch.Tensor | None, ...]:
    """The biases of q, k and v as a section holds them (``b_q``, ``b_k``, ``b_v``).

    Args:
        biases: The model's, each ``(n_heads or n_key_value_heads, d_head)`` or ``None``.
        weights: ``W_Q``, ``W_K``, ``W_V`` as ``(n_heads, d_in, d_head)`` before a norm's gain
            is folded in (key and value heads already repeated).
        beta: The bias of the norm before attention (a LayerNorm's), or ``None``.

    Returns:
        ``(n_heads, d_head)`` float64 tensors, grouped-query heads repeated and ``beta W``
        added (``q = (n gain + beta) W + b``), ``None`` for zero.
    """
    out = []
    for bias, weight in zip(biases, weights, strict=True):
        if bias is not None:
            bias = bias.to(torch.float64)
            bias = bias.repeat_interleave(weight.shape[0] // bias.shape[0], dim=0)
        if beta is not None:
            shift = torch.einsum("d,hde->he", beta.to(weight), weight)
            bias = shift if bias is None else bias + shift
        out.append(bias)
    return tuple(out)


def check_read(
    what: str,
    expected: torch.Tensor,
    got: torch.Tensor,
    at: str,
    hint: str,
    *,
    size: float | None = None,
    dtype: torch.dtype | None = None,
    float64: float = 1e-9,
) -> None:
    """Refuse a batch where the model's ``got`` is not the closed form's ``expected``.

    Compared relative to ``size`` (default: the largest ``expected``) at the tolerance of
    the dtype the model computed ``got`` in (``dtype``, default ``got``'s), with ``float64``
    the relative tolerance of float64 (``1e-4``, float32's, where a float64 model's norms
    round through float32).

    Raises:
        ValueError: If they differ by more than rounding, with ``hint`` (what to do).
    """
    if expected.numel() == 0:  # a batch of padding only
        return
    if size is None:
        size = largest(expected)
    error = largest(expected - got.to(torch.float64))
    dtype = got.dtype if dtype is None else dtype
    tolerance = relative_tolerance(dtype, float64) * max(size, 1e-30)
    if not error <= tolerance:
        raise ValueError(
            f"The attention of {at!r} differs from the closed form's: its {what} by {error:.3g} "
            f"(scale {size:.3g}, tolerance {tolerance:.2g}): {hint}"
        )


class AttentionChecks:
    """The checks of :class:`~degen_hooks.attention.AttentionSection` (its weights and norm)."""

    def check_projections(
        self,
        x: torch.Tensor,
        raw: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        dtype: torch.dtype,
        mask: torch.Tensor | None,
        hint: str,
        *,
        x_qk: torch.Tensor | None = None,
        outputs: torch.Tensor | None = None,
    ) -> None:
        """Refuse a batch whose q, k or v is not what the section's weights make of its input.

        The section reads q, k and v after the model's hooks and differentiates them as
        ``norm(x) W + b``: a hook that steers, scales or patches them (or a norm's output)
        would leave the Jacobians of the unhooked model. Each is compared on two fixed
        random directions of each head (:func:`~degen_hooks._checks.random_directions`: a
        change of a head's vector moves its projections but for a set of measure zero), at
        a tolerance bounded by the largest terms.

        Args:
            x: The section's input ``(b, pos, d_in)``, as read (every position).
            raw: The model's q, k and v before any rotation or norm of q and k, each
                ``(b, pos, n_heads, d_head)`` float64 (key and value heads repeated for
                grouped-query attention, as :func:`~.section.heads` gives them).
            dtype: The dtype the model computed them in (sets the tolerance).
            mask: ``(b, pos)`` real tokens (the rest is not checked), or ``None``.
            hint: What to do instead, for the message. After a norm, float64 reads are
                compared at ``1e-6`` (transformers' and a bridge's RMSNorms take their
                variance in float32 whatever the dtype), else at ``1e-9``.
            x_qk: The input of q and k where it is not ``x`` (shortformer position
                embeddings added), or ``None``.
            outputs: The query positions the closed form uses (q is checked there only; k
                and v at every position), ``None`` for all.

        Raises:
            ValueError: If one differs by more than rounding.
        """
        f64 = torch.float64
        rows = slice(None) if outputs is None else outputs.to(x.device)
        normed = self._normalized(x.to(f64))
        normed_qk = normed if x_qk is None else self._normalized(x_qk.to(f64))
        d_in, device = normed.shape[-1], normed.device
        directions = random_directions(self.w_q.shape[2], device)
        real = None if mask is None else mask.to(device)
        loose = 1e-9 if self.norm is None else 1e-6
        largest_v = largest(normed)
        largest_qk = largest_v if x_qk is None else largest(normed_qk)
        inputs = ((normed_qk, largest_qk), (normed_qk, largest_qk), (normed, largest_v))
        projections = (self.w_q, self.w_k, self.w_v)
        biases = (self.b_q, self.b_k, self.b_v)  # type: ignore[attr-defined]
        for name, got, (given, size_in), weight, bias in zip(
            "qkv", raw, inputs, projections, biases, strict=True
        ):
            weight = weight.to(device, f64)
            on = torch.einsum("hde,em->dhm", weight, directions).reshape(d_in, -1)
            # Either side's rounding is below eps sum_de |a_d W_de dir_e| <= eps max|a| (|W| |dir|)
            bound = torch.einsum("hde,em->hm", weight.abs(), directions.abs()).max()
            size = size_in * float(bound)
            projected = (got.reshape(-1, got.shape[-1]) @ directions).view(*got.shape[:2], -1)
            seen = real
            if name == "q":  # queries: the probed rows only
                given, projected = given[:, rows], projected[:, rows]
                seen = None if real is None else real[:, rows]
            expected = (given.reshape(-1, d_in) @ on).view(projected.shape)
            if bias is not None:
                shift = (bias.to(device, f64) @ directions).reshape(-1)
                expected += shift
                size += largest(shift)
            if seen is not None:
                expected, projected = expected[seen], projected[seen]
            check_read(
                f"{name} (on random directions of each head)", expected, projected,
                self.source, hint, size=size, dtype=dtype, float64=loose,  # type: ignore[attr-defined]
            )  # fmt: skip
