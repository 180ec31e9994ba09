"""The rotary pieces of the attention Jacobian Gram (#16).

Part of :mod:`degen_hooks.attention`: what :mod:`._gram` adds when q and k are
rotated per position (its module docstring has the derivation). The key term of output ``p``
and input ``j`` is ``key_hpj = W_K^h u_hpj``, ``u_hpj = M_j^T q_hp / scale`` (``q`` rotated),
so the Gram's key pieces are ``d_head``-sized accumulators over (head, head) pairs, multiplied
by ``W_K`` once per batch:

* ``N_hg = sum_bpj c_hgpj g_gpj u_gpj^T`` (``r x d_head``), with ``g_gpj = vo_gj - zo_gp``
  taken apart: the values' part summed over ``p`` first (``Qbar_hgj = sum_p c_hgpj q_gp``, then
  ``sum_j vo_gj (M_j^T Qbar_hgj)^T`` once per sample), the mean's over ``j`` (the weighted
  tables ``sum_j c_hgpj (cos_j, sin_j)`` give ``sum_j c_hgpj M_j^T q_gp``);
* ``S_GG' = sum_bpj sum_{h in G, g in G'} s_hgpj u_hpj u_gpj^T`` over the groups ``G`` of query
  heads that share ``W_K`` (grouped-query attention; one head each otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .qk_norm import Frame, Frames
from .qk_norm import pull as _qk_pull
from .rotary import Rotary

__all__ = ["RotaryBatch", "Turn", "add_keys", "finish", "finish_batch", "group_size", "per_output"]


def per_output(n_heads: int, n_in: int, n_pos: int, r: int, d_head: int, d_in: int) -> int:
    """The elements a rotary block counts per (sample, output position): ``H K (H e + r)`` for
    ``u`` and the grouped ``s u`` (at most ``H^2 K e``; the per-sample ``Qbar`` is as large)
    and ``g``, ``H L max(r, e)`` for the pattern rows, ``r d`` for the pairs' rows."""
    return n_heads * (n_in * (n_heads * d_head + r) + n_pos * max(r, d_head)) + r * d_in


def group_size(w_k: torch.Tensor) -> int:
    """How many consecutive query heads share each ``W_K^h`` (``(h, d, e)``): the largest
    divisor of ``h`` whose groups are exactly equal (grouped-query attention), else 1."""
    n_heads = w_k.shape[0]
    for size in range(n_heads, 1, -1):
        if n_heads % size == 0:
            grouped = w_k.view(n_heads // size, size, *w_k.shape[1:])
            if torch.equal(grouped, grouped[:, :1].expand_as(grouped)):
                return size
    return 1


@dataclass
class Turn:
    """The rotations ``M_t`` of a :class:`~._rotary.Rotary` on whole ``d_head`` vectors.

    ``M_t^T y = c_t * y - F(s_t * y)`` and ``M_t y = c_t * y + s_t * F(y)``, with the tables
    ``c_t``, ``s_t`` extended past the rotated features by 1 and 0 and ``F(y) = y[order] *
    sign`` the signed pair flip (zero past the rotated features). Both are linear in the
    tables: a weighted sum of ``M_t^T y`` over positions is the same expression with the
    tables' weighted sums.
    """

    cos: torch.Tensor  # (n_positions, d_head)
    sin: torch.Tensor
    order: torch.Tensor  # (d_head,)
    sign: torch.Tensor

    @classmethod
    def of(cls, rotary: Rotary, d_head: int, device: torch.device) -> Turn:
        f64 = torch.float64
        cos, sin = (t.to(device=device, dtype=f64) for t in (rotary.cos, rotary.sin))
        n_pos, dim = cos.shape
        cos = torch.cat([cos, cos.new_ones(n_pos, d_head - dim)], 1)
        sin = torch.cat([sin, sin.new_zeros(n_pos, d_head - dim)], 1)
        features = torch.arange(d_head, device=device)
        order, sign = features.clone(), torch.zeros(d_head, dtype=f64, device=device)
        if rotary.adjacent_pairs:  # [y0, y1] -> [-y1, y0] on each adjacent pair
            order[:dim] = features[:dim] ^ 1
            sign[0:dim:2], sign[1:dim:2] = -1.0, 1.0
        else:  # the same on the two halves
            half = dim // 2
            order[:half], order[half:dim] = features[half:dim], features[:half]
            sign[:half], sign[half:dim] = -1.0, 1.0
        return cls(cos, sin, order, sign)

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The tables at ``positions``: ``(..., d_head)`` each."""
        return self.cos[positions], self.sin[positions]

    def back(self, y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``M^T y`` along the last axis, for tables (or weighted sums of them) broadcast
        against ``y``: ``F(s * y) = s[order] * sign * y[order]``, the flips taken on the
        operands (smaller than the result when they broadcast)."""
        return cos * y - (sin[..., self.order] * self.sign) * y[..., self.order]

    def forth(self, y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``M y`` along the last axis (tables broadcast against ``y``)."""
        return cos * y + sin * (y[..., self.order] * self.sign)


@dataclass
class RotaryBatch:
    """What the rotary blocks of a sample chunk share, and its per-sample sums."""

    vo: torch.Tensor  # vo_hl = v_hl W_O^h R: (b, h, L, r)
    cos: torch.Tensor  # the tables at the inputs: (K, e)
    sin: torch.Tensor
    qbar: torch.Tensor  # Qbar_hgj = sum_p c_hgpj q_gp: (b, g, h, K, e)
    kr: torch.Tensor | None = None  # M_j W_K^h^T n_bj / scale: (b, K, h, e), with a norm
    y_turned: torch.Tensor | None = None  # sum_p kappa_hpj q_hp: (b, K, h, e), with a norm
    # The blocks' zo_gp (b, g, P, r) and sum_j c_hgpj M_j^T q_gp (b, h, g, P, e), multiplied
    # once per sample chunk (a product over every output position).
    means: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    norm_k: Frame | None = None  # with norms of q and k: the k frame at the inputs (b, K, h, .)

    @classmethod
    def of(cls, layer: Any, v: torch.Tensor, inputs: torch.Tensor,
           normed: torch.Tensor | None, qk: Frames | None = None) -> RotaryBatch:  # fmt: skip
        turn: Turn = layer.turn
        cos, sin = turn.at(inputs)
        vo = torch.einsum("blhe,her->bhlr", v, layer.wor)
        n, n_heads, d_head = v.shape[0], layer.n_heads, layer.wor.shape[1]
        qbar = v.new_zeros(n, n_heads, n_heads, len(inputs), d_head)  # (b, g, h, K, e)
        norm_k = None if qk is None else qk.k.at(inputs)
        if normed is None:
            return cls(vo, cos, sin, qbar, norm_k=norm_k)
        kw = torch.einsum("hde,bkd->bkhe", layer.w_k, normed)  # W_K^h^T n_bj
        if norm_k is not None:  # key . n_bj = q . M_j (gamma * P W_K^h^T n_bj)
            kw = norm_k.gain * _qk_pull(kw, norm_k.n, norm_k.sigma, None)
        kr = turn.forth(kw, cos[:, None], sin[:, None]) / layer.scale
        return cls(vo, cos, sin, qbar, kr, torch.zeros_like(kr), norm_k=norm_k)

    def key_vectors(self, layer: Any) -> torch.Tensor:
        """The keys' part of ``y_bj = M0_bj n_bj``: ``sum_h W_K^h M_j^T (sum_p kappa_hpj
        q_hp) / scale``, ``(b, K, d)``."""
        turned = layer.turn.back(self.y_turned, self.cos[:, None], self.sin[:, None])
        if self.norm_k is not None:
            turned = self.norm_k.pull(turned)
        return torch.einsum("hde,bkhe->bkd", layer.w_k, turned) / layer.scale


def add_keys(
    sums: dict[str, torch.Tensor],
    batch: Any,
    layer: Any,
    waa: torch.Tensor,
    rows_p: torch.Tensor,
    outputs: torch.Tensor,
) -> torch.Tensor:
    """Add one block's rotary key pieces (``N``'s mean part, ``S``, ``Qbar``).

    Args:
        sums: The Gram's accumulators (``"n"``: ``(h, g, r, e)``, ``"s"``: ``(G, e, G, e)``).
        batch: The sample chunk (its ``turned``: a :class:`RotaryBatch`); ``layer``: weights.
        waa: ``c_hgpj = w_p omega_bj A_hpj A_gpj``, ``(b, h, g, P, K)``.
        rows_p: The block's pattern rows ``(b, h, P, L)``; ``outputs``: its positions.

    Returns:
        ``g_bpjh = vo_hj - zo_hp`` (``A`` left out), ``(b, P, K, h, r)``.
    """
    turn: Turn = layer.turn
    extra: RotaryBatch = batch.turned
    q = batch.q[:, outputs]  # rotated: (b, P, h, e)
    zo = rows_p @ extra.vo  # z_hp W_O^h R: (b, h, P, r)
    vo_in = extra.vo[:, :, batch.inputs]  # (b, h, K, r)
    g = vo_in.permute(0, 2, 1, 3)[:, None] - zo.permute(0, 2, 1, 3)[:, :, None]
    n, n_out, n_in = waa.shape[0], waa.shape[3], waa.shape[4]
    q_g = q.transpose(1, 2).reshape(-1, n_out, q.shape[3])  # (b g, P, e)
    lhs = waa.transpose(1, 2).transpose(-1, -2).reshape(len(q_g), -1, n_out)  # (b g, h K, P)
    extra.qbar.view(len(q_g), -1, q.shape[3]).baddbmm_(lhs, q_g)  # Qbar += c q
    extra.means.append((zo, _weighted_turns(waa, q, extra, turn)))
    # S: s_hgpj = c_hgpj g_hpj . g_gpj, summed with u_hpj u_gpj^T within groups of heads.
    s_pk = waa.permute(0, 3, 4, 1, 2) * (g @ g.transpose(-1, -2))  # (b, P, K, h, g)
    u = turn.back(q[:, :, None] / layer.scale, extra.cos[:, None], extra.sin[:, None])
    if extra.norm_k is not None:  # u_hpj = P^k_hj (gamma_k * M_j^T q_hp) / scale
        u = extra.norm_k.pull(u, expand=(1,))
    size, d_head = layer.group, q.shape[3]
    n_heads = layer.n_heads
    n_groups = n_heads // size
    s_grouped = s_pk.reshape(n, n_out, n_in, n_heads, n_groups, size)
    u_grouped = u.view(n, n_out, n_in, n_groups, size, d_head)
    su = torch.einsum("bpkhGj,bpkGje->bpkhGe", s_grouped, u_grouped)
    su = su.view(n, n_out, n_in, n_groups, size, n_groups, d_head)
    sums["s"] += torch.einsum("bpkGie,bpkGiHf->GeHf", u_grouped, su)
    return g


def _weighted_turns(
    waa: torch.Tensor, q: torch.Tensor, extra: RotaryBatch, turn: Turn
) -> torch.Tensor:
    """``sum_j c_hgpj u_gpj`` times ``scale``, ``(b, h, g, P, e)``, from the weighted tables
    ``sum_j c_hgpj (cos_j, sin_j)`` (``u_gpj = M_j^T q_gp / scale``): the mean's part of
    ``N_hg`` (minus).

    Through the norm of k (``u_gpj = P_gj (gamma * M_j^T q_gp) / scale``, ``P_gj = (I - n_gj
    n_gj^T / e) / sigma_gj``), the tables are weighted by ``c / sigma_gj`` and multiplied by
    ``gamma``, less the rank-one part ``sum_j (c t_gpj / (e sigma_gj)) n_gj`` with ``t_gpj =
    (M_j (gamma * n_gj)) . q_gp``.
    """
    turn_q = q.permute(0, 2, 1, 3)[:, None]  # (b, 1, g, P, e)
    norm = extra.norm_k
    if norm is not None:  # c / sigma_gj: (b, h, g, P, K)
        waa = waa / norm.sigma[..., 0].transpose(1, 2)[:, None, :, None, :]
    tables = torch.einsum("bhgpk,ke->bhgpe", waa, torch.cat([extra.cos, extra.sin], 1))
    cos, sin = tables.split(extra.cos.shape[1], dim=-1)
    turned = turn.back(turn_q, cos, sin)
    if norm is None:
        return turned
    n_k = norm.n.transpose(1, 2)  # (b, g, K, e)
    m = turn.forth(norm.gain * norm.n, extra.cos[:, None], extra.sin[:, None])  # (b, K, g, e)
    t = torch.einsum("bpge,bkge->bgpk", q, m) / n_k.shape[-1]
    return norm.gain * turned - torch.einsum("bhgpk,bgke->bhgpe", waa * t[:, None], n_k)


def finish_batch(sums: dict[str, torch.Tensor], batch: Any, layer: Any) -> None:
    """Add the chunk's ``N_hg`` once its blocks have summed ``Qbar`` and the means' parts:
    ``sum_j vo_gj (M_j^T Qbar_hgj)^T - sum_p zo_gp (sum_j c_hgpj M_j^T q_gp)^T`` (``M_j^T``
    then ``P^k_gj (gamma_k * .)`` through norms of k)."""
    extra: RotaryBatch = batch.turned
    turned = layer.turn.back(extra.qbar, extra.cos, extra.sin)  # M_j^T Qbar_hgj
    if extra.norm_k is not None:  # (b, g, h, K, e): the frame of head g at input j
        frame = extra.norm_k
        n_k, sigma_k = (t.transpose(1, 2)[:, :, None] for t in (frame.n, frame.sigma))
        turned = _qk_pull(turned, n_k, sigma_k, frame.gain)
    vo_in = extra.vo[:, :, batch.inputs]
    zo = torch.cat([means[0] for means in extra.means], 2)  # (b, g, P, r)
    weighted = torch.cat([means[1] for means in extra.means], 3)  # (b, h, g, P, e)
    values = torch.cat([vo_in, -zo], 2)  # (b, g, K + P, r)
    rows = torch.cat([turned.transpose(1, 2), weighted], 3)  # (b, h, g, K + P, e)
    sums["n"] += torch.einsum("bgkr,bhgke->hgre", values, rows) / layer.scale


def finish(sums: dict[str, torch.Tensor], layer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``T = sum_hg V_h N_hg W_K^g^T`` and ``sum_GG' W_K^G S_GG' W_K^G'^T``, ``(d, d)`` each."""
    n_heads, d_in, d_head = layer.w_k.shape
    n_groups = n_heads // layer.group
    w_k = layer.w_k.view(n_groups, layer.group, d_in, d_head)[:, 0]  # (G, d, e)
    w_rows = w_k.permute(1, 0, 2).reshape(d_in, -1)  # (d, G e)
    r = layer.wor.shape[2]
    n_grouped = sums["n"].view(n_heads, n_groups, layer.group, r, d_head).sum(2)
    n_rows = n_grouped.permute(0, 2, 1, 3).reshape(n_heads * r, -1)  # (h r, G e)
    cross = layer.vw_rows.T @ (n_rows @ w_rows.T)
    keys = w_rows @ sums["s"].reshape(n_groups * d_head, -1) @ w_rows.T
    return cross, keys
