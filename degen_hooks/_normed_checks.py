"""Checks of what a :class:`~degen_hooks.NormedMLPSection` reads against its weights (#16).

Private; mixed into the section. Each batch of its own passes (the Gram pass, the graph's
edges) compares the model's hidden activation with the section's for the rows read, and the
section's output with ``[x +] h W_out^T + b_out``, so that a hook that steers, ablates or
patches the MLP is refused rather than left out.
"""

from __future__ import annotations

from typing import Any

import torch

from ._checks import largest, random_directions, relative_tolerance
from .sites import Site

__all__ = ["NormedChecks"]


class NormedChecks:
    """The checks of :class:`~degen_hooks.NormedMLPSection`."""

    # The section's fields and methods these read.
    w_in: torch.Tensor
    w_out: torch.Tensor | None
    bias: torch.Tensor | None
    activation: str
    norm: str | None
    residual: bool
    gated: bool
    hidden: Site | None
    hidden_bias: torch.Tensor | None
    out_bias: torch.Tensor | None
    d_out: int
    normed: Any

    def check_reads(
        self,
        x: torch.Tensor,
        reads: dict[str, torch.Tensor],
        sites: dict[str, Site],
        padding: torch.Tensor | None,
        where: str,
    ) -> None:
        """Check what a pass read (``reads`` at ``sites``, by the roles of
        :meth:`edge_reads`) against the section at the input rows ``x``: the hidden
        activation ``"h"``, then the output ``"y"`` when it is read.

        Raises:
            ValueError: If the model computes another one (a hook, a layer the section does
                not describe).
        """
        h = sites["h"].rows(reads["h"], padding)
        self.check_hidden(x, h, where)
        if "y" in reads:
            self.check_output(x, h, sites["y"].rows(reads["y"], padding), where, sites["y"].key)

    def check_hidden(self, x: torch.Tensor, h: torch.Tensor, where: str) -> None:
        """Refuse rows whose hidden activation ``h`` (the model's, at :attr:`hidden`) is not
        the section's for the input rows ``x`` (compared at the tolerance of ``h``'s dtype;
        transformers' RMSNorms take their variance in float32 whatever the dtype).

        Raises:
            ValueError: If they differ by more than rounding.
        """
        if not len(x):
            return
        f64 = torch.float64
        w_in = self.w_in.to(x.device, f64)
        x = x.to(f64)
        normed = x if self.norm is None else self.normed(x)[0]
        if self.bias is None:
            z = normed @ w_in.T
        else:
            z = torch.addmm(self.bias.to(x.device, f64), normed, w_in.T)
        from .normed_section import _ACTIVATIONS  # the section's module imports this one

        act = _ACTIVATIONS[self.activation.lower()]  # the same names as activation_derivative's
        if self.gated:
            gate, up = z.chunk(2, dim=-1)
            expected = act(gate).mul_(up)
        else:
            expected = act(z)
        if self.hidden_bias is not None:
            expected += self.hidden_bias.to(expected)
        _refuse_unless_equal(
            expected, h, relative_tolerance(h.dtype, 1e-6), where,
            f"computes a hidden activation at {self.hidden.key!r}",  # type: ignore[union-attr]
        )  # fmt: skip

    def check_output(
        self, x: torch.Tensor, h: torch.Tensor, y: torch.Tensor, where: str, at: str
    ) -> None:
        """Refuse rows whose output ``y`` (the model's, at ``at``) is not ``[x +] h W_out^T
        + b_out`` for the model's hidden activation ``h`` (checked before) and input ``x``,
        compared on two fixed random directions (:func:`~degen_hooks._checks.random_directions`;
        rounding is bounded by the terms' absolute sums).

        Raises:
            ValueError: If they differ by more than rounding.
        """
        if not len(x) or self.w_out is None:
            return
        f64 = torch.float64
        directions = random_directions(self.d_out, x.device)
        w_out = self.w_out.to(x.device, f64)
        on = w_out.T @ directions  # (d_mlp, 2)
        dtype, h, y = y.dtype, h.to(f64), y.to(f64)
        # Either side's rounding is below eps sum_ik |h_k W_ik dir_i| <= eps max|h| (|W| |dir|)
        one_norm = float(directions.abs().sum(0).max())
        expected = h @ on
        bound = (w_out.abs().T @ directions.abs()).sum(0).max()
        size = largest(h) * float(bound) + largest(y) * one_norm
        if self.out_bias is not None:
            shift = self.out_bias.to(x.device, f64) @ directions
            expected += shift
            size += largest(shift)
        if self.residual:
            expected.addmm_(x.to(f64), directions)
            size += largest(x) * one_norm
        tolerance = relative_tolerance(dtype, 1e-9) * size
        error = largest(y @ directions - expected)
        if not error <= tolerance:
            _refuse(where, f"computes an output at {at!r}", error, size, tolerance)


def _refuse_unless_equal(
    expected: torch.Tensor, got: torch.Tensor, relative: float, where: str, what: str
) -> None:
    """Refuse a batch where the model's ``got`` is not the section's ``expected`` (relative
    to the largest ``expected``); ``what`` says what the model computes, and where."""
    size = max(largest(expected), 1e-30)
    tolerance = relative * size
    error = largest(expected - got.to(torch.float64))
    if not error <= tolerance:
        _refuse(where, what, error, size, tolerance)


def _refuse(where: str, what: str, error: float, size: float, tolerance: float) -> None:
    raise ValueError(
        f"The MLP after {where!r} {what} that differs from the closed form's by {error:.3g} "
        f"(scale {size:.3g}, tolerance {tolerance:.2g}): a hook (steering, ablation, "
        "patching) or a layer the section does not describe changes it, and the section's "
        "weights would give the unhooked model's Jacobians. Remove the hook, or leave this "
        "pair to backward passes (sections=None), which follow it."
    )
