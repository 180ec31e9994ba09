"""The attention Jacobian Gram of a batch, without one row per (output, input, feature) (#16).

Part of :mod:`degen_hooks.transformer_lens`. :func:`accumulate` adds a batch's Gram in blocks
of samples and output positions whose temporaries stay within ``_ELEMENTS`` (beyond one
output position of one sample), whatever the context: from its pieces (:func:`lowrank_gram`)
or, with rotary embeddings, from the section's rows. In the notation of ``_attention``'s module
docstring (row convention, readout ``R``, ``g_hpj = (v_hj - z_hp) W_O^h R``, ``key_hp =
W_K^h q_hp / scale``), the read-out Jacobian of output ``p`` with respect to input ``j`` is

    F_pj = F0_pj + [p = j] (Q_p + R^T),   F0_pj = sum_h A_hpj ((W_V^h W_O^h R)^T + g_hpj key_hp^T),

with ``Q_p`` the query term. The Gram ``sum_{b,p,j} w_p F_pj^T F_pj`` (then through the norm
``D_j`` of the input) is computed from its pieces instead of from its ``P K r`` rows per
sample. With ``V_h = W_V^h W_O^h R`` (``d x r``) and per-input weights ``omega_bj`` (1, or
``1/sigma_bj^2`` after a norm):

* ``sum w omega F0^T F0 = sum_hh' c_hh' V_h V_h'^T + (T + T^T) + sum_bp key_p^T S_bp key_p``,
  ``c_hh' = sum w omega A_h A_h'``, ``T = sum_h V_h N_h``, ``N_h = sum_{h',b,p} (sum_j w omega
  A_hpj A_h'pj g_h'pj) key_h'p^T``, ``S_bp,hh' = sum_j w omega A_hpj A_h'pj g_hpj . g_h'pj``;
* after a norm ``D_j = (C - n_j n_j^T/d)/sigma_j``, ``D M D`` also needs ``y_bj = M0_bj n_bj``
  and ``n_bj^T M0_bj n_bj`` (``M0_bj = sum_p w_p F0_pj^T F0_pj``), products of ``F0_pj n_bj``
  (an ``r``-vector) with the same pieces;
* the pairs with ``p = j`` add ``W^T W - X^T X`` with ``X = F0_pp D_p`` and ``W = X + Q_p D_p
  + R^T`` formed explicitly (``P`` rows of ``r x d`` per sample, not ``P K``). The query term
  goes through the heads' ``d_head x d_head`` matrices ``E_hp = sum_l A_hpl (v_hl - z_hp)
  k_hl^T``: ``Q_p = sum_h (W_O^h R)^T E_hp W_Q^h^T / scale``, ``r d d_model`` per position
  whatever the context (not ``r d H L``).

Everything but the pairs ``p = j`` and the norm's vectors is a sum over (sample, output)
blocks of small pieces (``c``, ``N``, ``S``), multiplied by ``V_h`` once per batch; the norm's
vectors ``y_bj`` once per sample. The cost per sample is about ``P r d (d + H^2)`` instead of
``P K r d^2``: the saving grows with the context (``K`` inputs). Rotary embeddings rotate the
keys by input position, which this factorisation does not take: they keep the rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import groupby
from typing import Any

import torch

from ..accumulators import SecondMoment

__all__ = ["accumulate", "lowrank_gram"]

_ELEMENTS = 2**21  # elements of a block's largest temporaries


def _blocks(n_samples: int, n_out: int, per_output: int) -> Iterator[tuple[slice, slice]]:
    """``(samples, output positions)`` blocks of at most ``_ELEMENTS`` elements, at
    ``per_output`` elements per (sample, output position); whole samples where they fit."""
    if n_out * per_output <= _ELEMENTS:
        step = _ELEMENTS // (n_out * per_output)
        for start in range(0, n_samples, step):
            yield slice(start, start + step), slice(None)
        return
    width = max(1, _ELEMENTS // per_output)
    for sample in range(n_samples):
        for first in range(0, n_out, width):
            yield slice(sample, sample + 1), slice(first, first + width)


def accumulate(
    section: Any,
    gram: SecondMoment,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: torch.Tensor,
    x: torch.Tensor | None,
    readout: torch.Tensor,
    inputs: torch.Tensor,
    outputs: torch.Tensor,
    weights: torch.Tensor,
    scratch: dict[str, torch.Tensor],
) -> None:
    """Add one batch's Jacobian Gram to ``gram`` (merged once, after every block).

    Args:
        section: The :class:`~degen_hooks.transformer_lens.AttentionSection` (its ``rotary``
            the batch's, ``q`` and ``k`` the vectors its scores are made of).
        gram: The accumulator.
        q, k, v: ``(b, pos, n_heads, d_head)``; ``pattern`` ``(b, n_heads, pos, pos)``.
        x: The section's input ``(b, pos, d_in)`` (with a norm), else ``None``.
        readout: ``R``, ``(d_out, r)``.
        inputs: Input positions (the samples); ``outputs``: distinct output positions, each
            probed ``weights`` times.
        scratch: Buffers kept across batches (the rows).
    """
    f64 = torch.float64
    n_heads, d_head = section.w_q.shape[0], section.w_q.shape[2]
    d_in, n_pos, device = section.d_in, v.shape[1], q.device
    readout, weights = readout.to(device, f64), weights.to(f64)
    r, n_in, n_out = readout.shape[1], len(inputs), len(outputs)
    n_samples = v.shape[0] * n_in
    total = torch.zeros(d_in, d_in, dtype=f64, device=device)
    if r == 0:  # the next site kept no feature: no probe, a zero Gram
        gram.merge(SecondMoment.from_matrix(total, n_samples))
        return
    if section.rotary is None:  # the Gram from its pieces, not one row per probe
        total += lowrank_gram(section, q, k, v, pattern, readout, inputs, outputs, weights, x)
    else:
        per_output = max(n_in * r * d_in, n_heads * n_pos * d_head)
        blocks = list(_blocks(v.shape[0], n_out, per_output))
        part, block = blocks[0]  # the largest block: the others hold as many or fewer
        size = q[part].shape[0] * len(outputs[block]) * n_in * r * d_in
        buffer = scratch.get("rows")
        if buffer is None or buffer.numel() < size or buffer.device != device:
            buffer = scratch["rows"] = torch.empty(size, dtype=f64, device=device)
        diagonal = outputs[:, None] == inputs[None, :]  # (P, K): skip and query terms
        for part, block in blocks:
            rows = section.jacobian_rows(
                q[part], k[part], v[part], pattern[part], readout, inputs, outputs[block],
                weights[block], buffer, None if x is None else x[part],
            )  # fmt: skip
            # An input no head of any sample attends to from an output (a causal mask's
            # future keys) gives exact zero rows there: leave them out of the product.
            seen = pattern[part][:, :, outputs[block]][..., inputs] != 0  # (b, h, P, K)
            live = seen.flatten(0, 1).any(0) | diagonal[block]
            used = (rows if bool(live.all()) else rows[:, live]).reshape(-1, d_in)
            total += _rows_gram(used)
    gram.merge(SecondMoment.from_matrix((total + total.T) / (2 * n_samples), n_samples))


def _rows_gram(rows: torch.Tensor) -> torch.Tensor:
    """``rows^T rows`` of a block's Gram rows ``(n, d_in)``."""
    return rows.T @ rows


def lowrank_gram(
    section: object,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: torch.Tensor,
    readout: torch.Tensor,
    inputs: torch.Tensor,
    outputs: torch.Tensor,
    weights: torch.Tensor,
    x: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sum_{b,j} sum_p w_p (F_pj D_j)^T (F_pj D_j)`` of one batch, ``(d_in, d_in)``.

    Args as :meth:`AttentionSection.jacobian_rows` (``x`` needed with a norm); the section
    has no rotary embedding. Works in :func:`_blocks` of samples and output positions.
    """
    s: Any = section
    if s.norm is not None and x is None:
        raise ValueError(f"A section after a {s.norm} norm needs its input x.")
    layer = _Layer.of(s, readout, q.device)
    d = layer.vw.shape[1]
    sums = {name: q.new_zeros(d, d) for name in ("key", "pairs", "ny", "quad")}
    sums["c"] = q.new_zeros(layer.n_heads, layer.n_heads)  # sum w omega A_h A_h'
    cross = _Cross(layer.vw_rows)
    r, d_head = readout.shape[1], layer.wor.shape[1]
    per_output = layer.n_heads * (len(inputs) + v.shape[1]) * max(r, d_head) + r * d
    parts = groupby(_blocks(q.shape[0], len(outputs), per_output), key=lambda pb: pb[0])
    for part, blocks in parts:
        batch = _Batch.of(s, q[part], k[part], v[part], pattern[part], inputs, layer.vw,
                          None if x is None else x[part])  # fmt: skip
        for _, block in blocks:
            _add_block(s, sums, cross, batch, layer, outputs[block], weights[block].to(q.dtype))
        if batch.normed is not None:  # y_bj = M0_bj n_bj, once per sample
            y = torch.einsum("hdr,bkhr->bkd", layer.vw, batch.psi) + batch.y_key
            sums["ny"] += torch.einsum("bk,bkd,bke->de", batch.omega, y, batch.normed)
            sums["quad"] += torch.einsum(
                "bk,bkd,bke->de", batch.omega * batch.quad, batch.normed, batch.normed
            )
    vw = layer.vw
    gram = torch.einsum("hdr,her->de", vw, torch.einsum("hg,ger->her", sums["c"], vw))
    t_sum = cross.total()
    gram = gram + t_sum + t_sum.T + sums["key"]
    if s.norm is not None:  # sum D M0 D from S = sum omega M0 and the vector terms
        ny = sums["ny"]
        if s.norm in ("LN", "LNPre"):
            gram = gram - gram.mean(0, keepdim=True)
            gram = gram - gram.mean(1, keepdim=True)  # C S C
            ny = ny - ny.mean(0, keepdim=True)  # C y n^T
        gram = gram - (ny + ny.T) / d + sums["quad"] / d**2
    return gram + (sums["pairs"] + sums["pairs"].T) / 2


@dataclass
class _Layer:
    """The layer's weights as the blocks use them, laid out once per batch."""

    w_k: torch.Tensor  # (h, d, e)
    wor: torch.Tensor  # W_O^h R: (h, e, r)
    vw: torch.Tensor  # V_h = W_V^h W_O^h R: (h, d, r)
    vw_rows: torch.Tensor  # V_h^T stacked: (h r, d)
    wq_rows: torch.Tensor  # W_Q^h^T / scale stacked: (h e, d)
    readout_t: torch.Tensor  # R^T, contiguous: (r, d)
    scale: float

    @property
    def n_heads(self) -> int:
        return self.wor.shape[0]

    @classmethod
    def of(cls, s: Any, readout: torch.Tensor, device: torch.device) -> _Layer:
        w_q, w_k, w_v, w_o = (t.to(device) for t in (s.w_q, s.w_k, s.w_v, s.w_o))
        wor = torch.einsum("hed,dr->her", w_o, readout)
        vw = torch.einsum("hie,her->hir", w_v, wor)
        return cls(
            w_k=w_k,
            wor=wor,
            vw=vw,
            vw_rows=vw.transpose(1, 2).reshape(-1, vw.shape[1]),
            wq_rows=(w_q.transpose(1, 2) / s.scale).reshape(-1, w_q.shape[1]),
            readout_t=readout.T.contiguous(),
            scale=s.scale,
        )


class _Cross:
    """``T = sum_bpg U_bpg^T key_bpg``, ``U = m_tilde V^T``, with the product by the stacked
    ``V_h^T`` (``(h r, d)``, the largest operand) taken for many blocks' rows at once."""

    def __init__(self, vw_rows: torch.Tensor) -> None:
        self.vw_rows, self.pending, self.n_rows = vw_rows, [], 0
        self.sum = vw_rows.new_zeros(vw_rows.shape[1], vw_rows.shape[1])
        self.most = max(1, _ELEMENTS // vw_rows.shape[0])  # rows of m_tilde held at once

    def add(self, m_tilde: torch.Tensor, key: torch.Tensor) -> None:
        """Rows ``(n, h r)`` of m_tilde and ``(n, d)`` of the keys they pair with."""
        self.pending.append((m_tilde, key))
        self.n_rows += m_tilde.shape[0]
        if self.n_rows >= self.most:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            m_tilde, key = (torch.cat(parts) for parts in zip(*self.pending, strict=True))
            self.sum += (m_tilde @ self.vw_rows).T @ key
            self.pending, self.n_rows = [], 0

    def total(self) -> torch.Tensor:
        """``T``, ``(d, d)``."""
        self._flush()
        return self.sum


@dataclass
class _Batch:
    """What a sample chunk's blocks share: its tensors, the norm at its inputs, and the
    norm's vector sums over the output blocks."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    pattern: torch.Tensor
    inputs: torch.Tensor
    omega: torch.Tensor  # (b, K): 1, or 1/sigma^2 after a norm
    normed: torch.Tensor | None = None  # (b, K, d)
    sigma: torch.Tensor | None = None  # (b, K, 1)
    nu: torch.Tensor | None = None  # V_h^T n_bj: (b, K, h, r)
    psi: torch.Tensor | None = None  # sum_p A_hpj w_p phi_bpj: (b, K, h, r)
    y_key: torch.Tensor | None = None  # the keys' part of y: (b, K, d)
    quad: torch.Tensor | None = None  # n^T M0 n: (b, K)

    @classmethod
    def of(cls, s: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           pattern: torch.Tensor, inputs: torch.Tensor, vw: torch.Tensor,
           x: torch.Tensor | None) -> _Batch:  # fmt: skip
        n, n_in = q.shape[0], len(inputs)
        if s.norm is None:
            omega = torch.ones(n, n_in, dtype=q.dtype, device=q.device)
            return cls(q, k, v, pattern, inputs, omega)
        normed, sigma = s._norm_of(x[:, inputs])  # type: ignore[index]
        nu = torch.einsum("hdr,bkd->bkhr", vw, normed)
        return cls(
            q, k, v, pattern, inputs, sigma[..., 0].reciprocal().square(), normed, sigma, nu,
            torch.zeros_like(nu), torch.zeros_like(normed), q.new_zeros(n, n_in),
        )  # fmt: skip


def _add_block(
    s: Any,
    sums: dict[str, torch.Tensor],
    cross: _Cross,
    batch: _Batch,
    layer: _Layer,
    outputs: torch.Tensor,
    weights: torch.Tensor,
) -> None:
    """Add the pieces of one block of output positions (of ``batch``'s samples)."""
    inputs, v = batch.inputs, batch.v
    rows_p = batch.pattern[:, :, outputs]  # (b, h, P, L)
    a = rows_p[..., inputs]  # (b, h, P, K)
    z = torch.einsum("bhpl,blhe->bhpe", rows_p, v)
    spread = v[:, inputs].permute(0, 2, 1, 3)[:, :, None] - z[:, :, :, None]  # (b,h,P,K,e)
    g = torch.einsum("bhpke,her->bhpkr", spread, layer.wor)  # g_hpj without A
    key = torch.einsum("hie,bphe->bphi", layer.w_k, batch.q[:, outputs]) / layer.scale
    wa = a * weights[None, None, :, None] * batch.omega[:, None, None, :]  # w_p omega A_hpj
    sums["c"] += torch.einsum("bhpk,bgpk->hg", wa, a)
    waa = wa[:, :, None] * a[:, None]  # w omega A_hpj A_gpj: (b, h, g, P, K)
    # T + T^T with T = sum_h V_h N_h: U_bpg = sum_h V_h (sum_j waa g_g), then U^T key.
    m_tilde = torch.einsum("bhgpk,bgpkr->bpghr", waa, g)  # (b, P, g, h, r)
    cross.add(m_tilde.reshape(-1, layer.vw_rows.shape[0]), key.reshape(-1, key.shape[-1]))
    gg = torch.einsum("bhpkr,bgpkr->bpkhg", g, g)
    s_bp = torch.einsum("bhgpk,bpkhg->bphg", waa, gg)
    sums["key"] += torch.einsum("bphd,bphe->de", key, torch.einsum("bphg,bpge->bphe", s_bp, key))
    if batch.normed is not None:  # phi_bpj = F0_pj n_bj: (b, P, K, r)
        kn = torch.einsum("bphd,bkd->bhpk", key, batch.normed)
        phi = torch.einsum("bhpk,bkhr->bpkr", a, batch.nu)
        phi += torch.einsum("bhpk,bhpkr->bpkr", a * kn, g)
        wphi = phi * weights[None, :, None, None]
        batch.psi += torch.einsum("bhpk,bpkr->bkhr", a, wphi)  # type: ignore[operator]
        kappa = a * torch.einsum("bhpkr,bpkr->bhpk", g, wphi)
        batch.y_key += torch.einsum("bhpk,bphd->bkd", kappa, key)  # type: ignore[operator]
        batch.quad += (wphi * phi).sum((1, 3))  # type: ignore[operator]
    sums["pairs"] += _diagonal(s, batch, layer, a, g, key, rows_p, z, outputs, weights)


def _diagonal(
    s: Any,
    batch: _Batch,
    layer: _Layer,
    a: torch.Tensor,
    g: torch.Tensor,
    key: torch.Tensor,
    rows_p: torch.Tensor,
    z: torch.Tensor,
    outputs: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """``sum w_p (W^T W - X^T X)`` over the block's pairs where the input is the output, up
    to symmetrization (``Delta^T (2 X + Delta)``, ``W = X + Delta``).

    Every ``(b, pair, r, d)`` tensor is formed contiguous (rows over ``d``), by products of
    the :class:`_Layer`'s stacked weights."""
    pairs = (outputs[:, None] == batch.inputs[None, :]).nonzero()  # (n, 2): (p, j) indices
    d, n_heads = layer.vw.shape[1], layer.n_heads
    if len(pairs) == 0:
        return a.new_zeros(d, d)
    p_idx, j_idx = pairs[:, 0], pairs[:, 1]
    n, n_pairs, r = a.shape[0], len(pairs), layer.wor.shape[2]
    root = weights[p_idx].sqrt()[None, :, None, None]  # (1, n, 1, 1)
    a_pp = a[:, :, p_idx, j_idx].permute(0, 2, 1)  # (b, n, h)
    x_rows = (a_pp.reshape(-1, n_heads) @ layer.vw_rows.view(n_heads, -1)).view(n, n_pairs, r, d)
    ag = a_pp[..., None, :] * g[:, :, p_idx, j_idx].permute(0, 2, 3, 1)  # (b, n, r, h)
    x_rows += ag @ key[:, p_idx]  # (b, n, r, h) @ (b, n, h, d)
    delta = _query_rows(batch, layer, rows_p[:, :, p_idx].transpose(1, 2), z[:, :, p_idx])
    if batch.normed is not None:  # both through the norm's Jacobian at the input position
        centred = s.norm in ("LN", "LNPre")
        n_j, sigma_j = batch.normed[:, j_idx, None, :], batch.sigma[:, j_idx, None, :]  # type: ignore[index]
        for rows in (x_rows, delta):
            if centred:
                rows -= rows.mean(-1, keepdim=True)
            flat = rows.view(-1, r, d)  # rows - (rows n) n^T / d, in place
            flat.baddbmm_(flat @ n_j.reshape(-1, d, 1), n_j.reshape(-1, 1, d), alpha=-1 / d)
            rows /= sigma_j
    x_rows *= root
    delta *= root
    if s.residual:
        delta += root * layer.readout_t  # the skip connection bypasses the norm
    flat_delta = delta.reshape(-1, d)
    return flat_delta.T @ x_rows.mul_(2).add_(delta).reshape(-1, d)  # symmetrized at the end


def _query_rows(
    batch: _Batch, layer: _Layer, a_rows: torch.Tensor, z: torch.Tensor
) -> torch.Tensor:
    """The query terms ``Q_p`` of the block's pairs, ``(b, n, r, d)`` contiguous.

    ``Q_p = sum_{h,l} A_hpl g_hpl (W_Q^h k_hl / scale)^T``, ``g_hpl = (v_hl - z_hp) W_O^h R``,
    is a product over the ``H L`` pairs (head, key). Beyond ``L = d_head`` keys it is taken
    through the heads' ``d_head x d_head`` matrices ``E_hp = sum_l A_hpl (v_hl - z_hp)
    k_hl^T`` instead, ``Q_p = sum_h (W_O^h R)^T E_hp W_Q^h^T / scale``: ``r d d_model`` per
    position, whatever the context.

    Args:
        batch: The samples; ``layer``: the weights.
        a_rows: The pairs' pattern rows ``A_hpl``, ``(b, n, h, L)``.
        z: The pairs' ``z_hp``, ``(b, h, n, e)``.
    """
    n, n_pairs, n_heads, n_keys = a_rows.shape
    d_head, r = layer.wor.shape[1:]
    wq = layer.wq_rows.view(n_heads, d_head, -1)  # W_Q^h^T / scale: (h, e, d)
    if n_keys < d_head:  # (b, n, r, h L) @ (b, 1, h L, d)
        query = torch.einsum("blhe,hed->bhld", batch.k, wq).reshape(n, 1, -1, wq.shape[2])
        spread = batch.v.transpose(1, 2)[:, None] - z.transpose(1, 2)[..., None, :]
        g_all = torch.einsum("bnhle,her->bnrhl", spread * a_rows[..., None], layer.wor)
        return g_all.reshape(n, n_pairs, r, -1) @ query
    v_t, k_t = batch.v.permute(0, 2, 3, 1), batch.k.transpose(1, 2)  # (b,h,e,L), (b,h,L,e)
    e_hp = (a_rows[..., None, :] * v_t[:, None]) @ k_t[:, None]  # (b, n, h, e, e)
    e_hp -= z.transpose(1, 2)[..., None] * (a_rows[..., None, :] @ k_t[:, None])
    g_q = torch.einsum("her,bnhef->bnrhf", layer.wor, e_hp)  # (W_O^h R)^T E_hp
    return g_q.reshape(n, n_pairs, r, -1) @ layer.wq_rows
