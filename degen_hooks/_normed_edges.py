"""Interaction-graph edges of :class:`~degen_hooks.NormedMLPSection` (#19): no backward pass.

Private; mixed into the section. A row's Jacobian in feature coordinates is the product an
MLP section's edges take (slopes ``a/s``) plus one rank-one term per integration point
(the norm's ``N N^T/d``): :func:`~degen_hooks._edge_kernel.edge_kernel` does the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, ClassVar

import torch

from . import closed_form as _closed_form
from ._edge_kernel import edge_kernel
from .sites import Site

__all__ = ["NormedEdges"]


class NormedEdges:
    """The edge methods of :class:`~degen_hooks.NormedMLPSection`."""

    positionwise: ClassVar[bool] = True  # graph pairs need the same positions on both sides

    def edge_reads(self, site: Site, target: Site | None) -> dict[str, Site]:
        """What :meth:`edge_batch` (and ``gram_pass``) read in one forward pass: the
        section's input ``"x"``; when the section checks the model (``hidden``), its hidden
        activation ``"h"`` and, where the section ends after the output projection, its
        output ``"y"`` (``target``), both at the input's positions."""
        hidden: Site | None = getattr(self, "hidden", None)
        if hidden is None:
            return {"x": site}
        reads = {"x": site, "h": replace(hidden, positions=site.positions)}
        ends_at_hidden = target is not None and (target.name, target.io) == (hidden.name, hidden.io)
        if target is not None and self.w_out is not None and not ends_at_hidden:  # type: ignore[attr-defined]
            reads["y"] = replace(target, positions=site.positions)
        return reads

    def edge_batch(
        self,
        reads: dict[str, torch.Tensor],
        src: Any,
        dst: Any,
        alphas: Sequence[float],
        weights: Sequence[float],
        *,
        signs: Callable[[tuple[int, ...], torch.device], torch.Tensor] | None = None,
        elements: int | None = None,
    ) -> tuple[torch.Tensor, int]:
        """Interaction-graph edges of one batch (lib_math §7.1) from its input alone.

        In feature coordinates (input ``x = f C_pinv + mu``, output features ``y R``) a
        row's Jacobian is ``R^T J(x) C_pinv^T = (1/s) [B diag(a) A - B (a * v) (C_pinv
        N)^T / d] (+ R^T C_pinv^T)`` with ``B = R^T W_out'`` and ``A = W_in C C_pinv^T``
        (module docstring): the products of an MLP section with slopes ``a/s``, plus one
        rank-one term per integration point. Integrated gradients rebuild the input at each
        ``alpha_k f C_pinv + mu`` and sum the weighted Jacobians before squaring.

        Args:
            reads: ``{"x": the section input's activation}`` (:meth:`edge_reads`).
            src: The input node layer (``features``, ``select``, ``pinv``, ``mean``).
            dst: The output node layer (``rotation``: the read-out ``R``, or ``None``).
            alphas: Integration points ``alpha_k``.
            weights: Integration weights ``w_k``.
            signs: ``signs(shape, device)`` draws the stochastic sources ``(n_sources,
                batch, n_pos, 1)``; ``None`` for exact edges.
            elements: Most elements of a chunk's temporaries.

        Returns:
            ``(E, n_rows)``: ``E`` ``(r_next, r)`` summed over the batch's rows.
        """
        from .normed_section import _Moments  # the section's module imports this one

        f64 = torch.float64
        act = reads["x"]
        if "h" in reads:  # the model's hidden activation (and output) must be the section's
            rows = src.site.rows(act, src.padding)
            sites = self.edge_reads(src.site, dst.site)
            self.check_reads(rows, reads, sites, src.padding, src.key)  # type: ignore[attr-defined]
        features = src.features(act)  # (n, K, r)
        n, n_pos, r = features.shape
        device = features.device
        readout = None if dst.rotation is None else dst.rotation.to(device)
        moments = _Moments(self, readout, accumulate=False)
        w_in = moments.w_in.to(device)
        readin = None if src.pinv is None else src.pinv.detach().to(device, f64)  # (r, d)
        shift = None if src.mean is None else src.mean.detach().to(device, f64)
        # B^T, (d_hidden, r_next): b_out None is the identity (the hidden layer is read raw).
        b_out = moments.b_out
        b_out = torch.eye(w_in.shape[0], dtype=f64, device=device) if b_out is None else b_out.T
        b_hidden = b_out  # (d_hidden, r_next), for the rank-one terms
        a_in = moments.p if readin is None else moments.p @ readin.T  # (d_hidden, r)
        w = torch.as_tensor(list(weights), dtype=f64, device=device)
        skip = None
        if self.residual:
            read = moments.readout
            read = torch.eye(moments.d, dtype=f64, device=device) if read is None else read
            skip = w.sum() * (read if readin is None else readin @ read)  # (r, r_next)
        linear = self.is_linear
        if linear:  # a constant B A: one row slope per sample, on r hidden "units"
            b_out, a_in = (b_out.T @ a_in).T, torch.eye(r, dtype=f64, device=device)
        d = moments.d
        # Without a norm, z = alpha f (C_pinv W_in^T) + mu W_in^T + b: products of width r.
        plain = self.norm is None and not linear
        if plain:
            offset = torch.zeros(w_in.shape[0], dtype=f64, device=device)
            offset = offset if shift is None else shift @ w_in.T
            offset = offset if moments.bias is None else offset + moments.bias

        def slopes(part: slice) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
            f = features[part].reshape(-1, r)
            if plain:  # a = sigma'(z), summed over the integration points
                fz = f @ a_in.T
                slope = None
                for alpha, weight in zip(alphas, w, strict=True):
                    a = self.slopes(torch.add(offset, fz, alpha=float(alpha)))
                    if slope is None:
                        slope = a if float(weight) == 1.0 else a.mul_(weight)
                    else:
                        slope.add_(a, alpha=float(weight))
                return slope, None
            slope = torch.zeros(f.shape[0], a_in.shape[0], dtype=f64, device=device)
            betas, gammas = [], []
            for alpha, weight in zip(alphas, w, strict=True):
                x = alpha * f if readin is None else (alpha * f) @ readin
                x = x if shift is None else x + shift
                normed, scale = self.normed(x)
                if linear:
                    slope += weight / scale
                    if self.norm is None:
                        continue
                    av = normed @ w_in.T  # a = 1
                else:
                    v = normed @ w_in.T
                    a = self.slopes(v if moments.bias is None else v + moments.bias)
                    slope += weight * a / scale
                    if self.norm is None:
                        continue
                    av = a * v
                betas.append(weight / scale * (av @ b_hidden))  # B (a * v) w_k / s_k
                gammas.append((normed if readin is None else normed @ readin.T) / d)
            low_rank = (torch.stack(betas), torch.stack(gammas)) if betas else None
            return slope, low_rank

        drawn = None if signs is None else signs((n, n_pos, 1), device)
        edges = edge_kernel(
            features,
            a_in.T,
            b_out,
            slopes,
            skip,
            drawn,
            _closed_form.EDGE_ELEMENTS if elements is None else elements,
        )
        return edges.T, n * n_pos
