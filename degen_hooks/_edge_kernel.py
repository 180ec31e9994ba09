"""The kernel of closed-form interaction-graph edges of position-wise sections (#19).

Private: :meth:`degen_hooks.MLPSection.edge_sums` and
:meth:`degen_hooks.NormedMLPSection.edge_batch` differ only in how a row's slopes (and, after
a norm, rank-one corrections) are computed; the products, squares and sums are here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["edge_kernel"]


def _add_squares(
    edges: torch.Tensor, attribution: torch.Tensor, signs: torch.Tensor | None
) -> None:
    """``edges += sum_(b, t) attribution^2``, or with ``signs`` the squares of signed sums.

    ``attribution`` is ``(b, t, ...)`` (samples, output positions); ``signs`` is
    ``(n_sources, b, t, 1)``: the stochastic edges square ``sum_t phi_st attribution_bt``.
    """
    if signs is None:
        edges += attribution.square().sum((0, 1))
        return
    n_sources, n, n_pos = signs.shape[:3]
    mixed = signs.reshape(n_sources, n, n_pos).permute(1, 0, 2) @ attribution.reshape(n, n_pos, -1)
    edges += mixed.square().sum((0, 1)).reshape(edges.shape)


def edge_kernel(
    features: torch.Tensor,
    a_in: torch.Tensor,
    b_out: torch.Tensor,
    slopes: Callable[[slice], tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]],
    skip: torch.Tensor | None,
    signs: torch.Tensor | None,
    elements: int,
) -> torch.Tensor:
    """Transposed edge sums ``E^T`` (``r x r_next``) of rows whose Jacobians in feature
    coordinates are ``J_n = b_out^T diag(s_n) a_in^T - sum_k beta_nk gamma_nk^T (+ skip^T)``.

    The one kernel of the position-wise closed forms (:meth:`MLPSection.edge_sums`,
    :meth:`~degen_hooks.NormedMLPSection.edge_batch`). ``slopes(samples)`` gives, for a chunk
    of whole samples (rows ``(sample, position)`` flattened), the ``(rows, d_hidden)``
    slopes ``s_n`` and optional rank-one corrections ``(beta, gamma)`` of shapes ``(K, rows,
    r_next)`` and ``(K, rows, r)``. Exact edges: ``E_ij = sum_n (f_nj J_n[i, j])^2``; with
    ``signs`` ``(n_sources, batch, n_pos, 1)`` the output positions are mixed before squaring.
    Memory ``O(elements + r r_next)``.
    """
    n, n_pos, r = features.shape
    d_hidden, r_next = a_in.shape[1], b_out.shape[1]
    edges = torch.zeros(r, r_next, dtype=torch.float64, device=features.device)
    # J_n = sum_k s_nk a_in[:, k] b_out[k, :]: one product slope @ P of the chunk's
    # derivatives with P[k, (j, i)] = a_in[j, k] b_out[k, i], P in blocks of input
    # features j. Chunks hold whole samples (signs mix a sample's positions).
    per_sample = n_pos * d_hidden
    # Contiguous factors: the products below come out contiguous (no copy in the reshape).
    a_in, b_rows = a_in.contiguous(), b_out.T.contiguous()  # b_rows: (r_next, d_hidden)
    step = max(1, elements // per_sample)
    width = max(1, min(r, elements // (d_hidden * r_next), elements // (step * n_pos * r_next)))
    for start in range(0, n, step):
        part = slice(start, start + step)
        f = features[part].reshape(-1, r)
        slope, low_rank = slopes(part)
        for first in range(0, r, width):
            block = slice(first, first + width)
            if signs is None:
                # Exact edges: E_ji += sum_n f_nj^2 J_n[j, i]^2, J laid out (j, i, n)
                # so that the sum over rows is one batched product.
                products = (a_in[block, None, :] * b_rows[None]).reshape(-1, d_hidden)
                jac = (products @ slope.T).view(-1, r_next, slope.shape[0])
                if skip is not None:
                    jac += skip[block, :, None]
                if low_rank is not None:
                    beta, gamma = low_rank
                    jac -= torch.einsum("knj,kni->jin", gamma[:, :, block], beta)
                weight_rows = f[:, block].T.square()[:, :, None]  # (j, n, 1)
                edges[block] += torch.bmm(jac.square_(), weight_rows)[..., 0]
                continue
            products = (a_in[block].T[:, :, None] * b_out[:, None, :]).reshape(d_hidden, -1)
            jac = (slope @ products).view(-1, n_pos, products.shape[1] // r_next, r_next)
            if skip is not None:
                jac += skip[block]
            if low_rank is not None:
                beta, gamma = low_rank
                correction = torch.einsum("knj,kni->nji", gamma[:, :, block], beta)
                jac -= correction.reshape(jac.shape)
            attribution = f[:, block].reshape(jac.shape[:3])[..., None] * jac
            _add_squares(edges[block], attribution, signs[:, part])
    return edges
