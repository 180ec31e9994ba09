"""The attention Jacobian Gram of a batch, without one row per (output, input, feature) (#16).

Part of :mod:`degen_hooks.attention`. :func:`accumulate` adds a batch's Gram from its
pieces (:func:`lowrank_gram`), in blocks of samples and output positions whose temporaries
stay within ``_ELEMENTS`` (beyond one output position of one sample), whatever the context. In
the notation of :mod:`.section`'s docstring (row convention, readout ``R``, ``g_hpj =
(v_hj - z_hp) W_O^h R``, ``key_hp = W_K^h q_hp / scale``), the read-out Jacobian of output ``p``
with respect to input ``j`` is

    F_pj = F0_pj + [p = j] (Q_p + R^T),   F0_pj = sum_h A_hpj ((W_V^h W_O^h R)^T + g_hpj key_hp^T),

with ``Q_p`` the query term. The Gram ``sum_{b,p,j} w_bp u_bj F_pj^T F_pj`` (then through the
norm ``D_j`` of the input) is computed from its pieces instead of from its ``P K r`` rows per
sample; ``w_bp`` counts the probes of output ``p`` and ``u_bj`` the samples at input ``j`` of
sequence ``b`` (a padding mask sets both to 0 at padding, the same weights the pieces below
carry as ``w``). With ``V_h = W_V^h W_O^h R`` (``d x r``) and per-input weights ``omega_bj``
(``u_bj``, or ``u_bj/sigma_bj^2`` after a norm):

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
``P K r d^2``: the saving grows with the context (``K`` inputs).

Rotary embeddings (``q_hp = M_p qt_hp``, ``k_hl = M_l kt_hl``, ``qt`` and ``kt`` affine in the
input, the scores made of the rotated vectors) change the scores' derivatives only: the key
term becomes ``key_hpj = W_K^h u_hpj``, ``u_hpj = M_j^T q_hp / scale``, which depends on the
input ``j``, and the query term ``W_Q^h M_p^T k_hl / scale``, so ``E_hp`` gets ``M_p`` on the
right (fixed for the output ``p``). ``M_j^T y = cos_j y - F(sin_j y)`` (``F`` the signed pair
flip) is linear in the tables, which carries the sums over ``j``
(:mod:`._gram_rotary`). With ``c_hgpj = w_p omega_bj A_hpj A_gpj`` and ``g_gpj = vo_gj -
zo_gp`` (``vo_gj = v_gj W_O^g R``, ``zo_gp = z_gp W_O^g R``):

* ``T = sum_hg V_h N_hg W_K^g^T``, ``N_hg = sum_bpj c_hgpj g_gpj u_gpj^T`` (``r x d_head``) =
  ``sum_j vo_gj (M_j^T Qbar_hgj)^T / scale - sum_p zo_gp (sum_j c_hgpj M_j^T q_gp)^T / scale``,
  ``Qbar_hgj = sum_p c_hgpj q_gp`` summed over a sample's output blocks first, and ``sum_j
  c_hgpj M_j^T`` the rotation with the weighted tables ``sum_j c_hgpj (cos_j, sin_j)``:
  ``H^2 d_head (3 P K + K r + P r)`` per sample, not ``H^2 P K r d_head``;
* the keys' term is ``sum_GG' W_K^G S_GG' W_K^G'^T``, ``S_GG' = sum_bpj sum_{h in G, g in G'}
  s_hgpj u_hpj u_gpj^T`` (``s_hgpj = c_hgpj g_hpj . g_gpj``), ``G`` the groups of query heads
  that share ``W_K`` (grouped-query attention; one head each otherwise): ``P K H H_kv
  d_head^2`` per sample;
* after a norm, ``key_hpj . n_bj = q_hp . (M_j W_K^h^T n_bj) / scale``, and the keys' part
  of ``y_bj``, ``sum_h W_K^h M_j^T (sum_p kappa_hpj q_hp) / scale``, is summed as
  ``d_head``-vectors per (input, head) and multiplied by ``W_K`` once per sample;
* the pairs ``p = j`` take ``key_hpp = W_K^h M_p^T q_hp / scale`` (the unrotated query).

Per-head norms of q and k before the rotation (:mod:`.qk_norm`: Qwen 3) put ``P_ht (gamma *
.)``, ``P_ht = (I - n_ht n_ht^T / e) / sigma_ht``, after each ``M^T``: ``u_hpj = P^k_hj
(gamma_k * M_j^T q_hp) / scale``, explicit wherever ``u`` is formed (``S``, the pairs, the
norm's ``y_bj``) and applied to ``M_j^T Qbar_hgj`` once per (input, head); in the means' part
``P^k_gj`` depends on ``j``, so the tables are weighted by ``c / sigma_gj`` and the rank-one
part ``sum_j (c t_gpj / (e sigma_gj)) n_gj``, ``t_gpj = (M_j (gamma_k * n_gj)) . q_gp``, is
taken apart (``H^2 P K e`` per sample, as the tables). The query term's ``E_hp M_p`` gets
``diag(gamma_q) P^q_hp`` on the right. ``key_hpj . n_bj = q_hp . M_j (gamma_k * P^k_hj W_K^h^T
n_bj) / scale``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import groupby
from typing import Any

import torch

from ..accumulators import SecondMoment
from . import _gram_rotary as _rotary
from .qk_norm import Frames
from .qk_norm import pull as qk_pull

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
    input_weights: torch.Tensor | None = None,
) -> None:
    """Add one batch's Jacobian Gram to ``gram``, from its pieces (:func:`lowrank_gram`).

    Args:
        section: The :class:`~degen_hooks.attention.AttentionSection` (its ``rotary``
            the batch's, ``q`` and ``k`` the vectors its scores are made of).
        gram: The accumulator.
        q, k, v: ``(b, pos, n_heads, d_head)``; ``pattern`` ``(b, n_heads, pos, pos)``.
        x: The section's input ``(b, pos, d_in)`` (with a norm), else ``None``.
        readout: ``R``, ``(d_out, r)``.
        inputs: Input positions (the samples); ``outputs``: distinct output positions, each
            probed ``weights`` times (``(P,)``, or ``(b, P)`` per sequence: 0 for padding).
        input_weights: ``(b, K)``: how often each (sequence, input) is a sample (0 for
            padding); ``None``: once each.
    """
    f64 = torch.float64
    readout, weights = readout.to(q.device, f64), weights.to(f64)
    if input_weights is None:
        n_samples = v.shape[0] * len(inputs)
    else:
        input_weights = input_weights.to(q.device, f64)
        n_samples = round(float(input_weights.sum()))
    if n_samples == 0:  # a batch of padding only: no sample
        return
    if readout.shape[1] == 0:  # the next site kept no feature: no probe, a zero Gram
        total = torch.zeros(section.d_in, section.d_in, dtype=f64, device=q.device)
    else:
        total = lowrank_gram(
            section, q, k, v, pattern, readout, inputs, outputs, weights, x, input_weights
        )
    gram.merge(SecondMoment.from_matrix((total + total.T) / (2 * n_samples), n_samples))


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
    input_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sum_{b,j} sum_p w_bp u_bj (F_pj D_j)^T (F_pj D_j)`` of one batch, ``(d_in, d_in)``.

    Args as :meth:`AttentionSection.jacobian_rows` (``x`` needed with a norm; ``q`` and ``k``
    rotated with rotary embeddings), and per-sequence weights: ``weights`` ``w_p`` ``(P,)`` or
    ``w_bp`` ``(b, P)``, ``input_weights`` ``u_bj`` ``(b, K)`` (``None``: 1), which a padding
    mask sets to 0. Works in :func:`_blocks` of samples and output positions.
    """
    s: Any = section
    if s.norm is not None and x is None:
        raise ValueError(f"A section after a {s.norm} norm needs its input x.")
    n_batch = q.shape[0]
    weights = weights.to(q.dtype).expand(n_batch, len(outputs))  # (b, P)
    if input_weights is None:
        input_weights = q.new_ones(n_batch, len(inputs))
    layer = _Layer.of(s, readout, q.device)
    qk = s._frames()  # per-head norms of q and k, or None
    d = layer.vw_rows.shape[1]
    sums = {name: q.new_zeros(d, d) for name in ("key", "pairs", "ny", "quad")}
    sums["c"] = q.new_zeros(layer.n_heads, layer.n_heads)  # sum w omega A_h A_h'
    cross = _Cross(layer.vw_rows)
    r, d_head, n_in, n_pos = readout.shape[1], layer.wor.shape[1], len(inputs), v.shape[1]
    per_output = layer.n_heads * (n_in + n_pos) * max(r, d_head) + r * d
    if layer.turn is not None:
        n_groups = layer.n_heads // layer.group
        sums["n"] = q.new_zeros(layer.n_heads, layer.n_heads, r, d_head)
        sums["s"] = q.new_zeros(n_groups, d_head, n_groups, d_head)
        per_output = _rotary.per_output(layer.n_heads, n_in, n_pos, r, d_head, d)
    parts = groupby(_blocks(q.shape[0], len(outputs), per_output), key=lambda pb: pb[0])
    for part, blocks in parts:
        batch = _Batch.of(s, q[part], k[part], v[part], pattern[part], inputs, layer,
                          None if x is None else x[part], input_weights[part],
                          None if qk is None else qk.part(part))  # fmt: skip
        for _, block in blocks:
            _add_block(s, sums, cross, batch, layer, outputs[block], weights[part, block])
        if batch.turned is not None:
            _rotary.finish_batch(sums, batch, layer)
        if batch.normed is not None:  # y_bj = M0_bj n_bj, once per sample
            y_key = batch.y_key if batch.turned is None else batch.turned.key_vectors(layer)
            n_b, n_k = batch.psi.shape[:2]
            y = (batch.psi.reshape(n_b * n_k, -1) @ layer.vw_rows).view(n_b, n_k, d) + y_key
            sums["ny"] += torch.einsum("bk,bkd,bke->de", batch.omega, y, batch.normed)
            sums["quad"] += torch.einsum(
                "bk,bkd,bke->de", batch.omega * batch.quad, batch.normed, batch.normed
            )
    rows = layer.vw_rows  # sum_hg c_hg V_h V_g^T = V^T (c x I_r) V, V the stacked V_h^T
    gram = rows.T @ (sums["c"] @ rows.view(layer.n_heads, -1)).view(rows.shape)
    if layer.turn is None:
        t_sum, keys = cross.total(), sums["key"]
    else:
        t_sum, keys = _rotary.finish(sums, layer)
    gram = gram + t_sum + t_sum.T + keys
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
    vw_rows: torch.Tensor  # V_h^T stacked, V_h = W_V^h W_O^h R: (h r, d)
    wq_rows: torch.Tensor  # W_Q^h^T / scale stacked: (h e, d)
    readout_t: torch.Tensor  # R^T, contiguous: (r, d)
    scale: float
    turn: _rotary.Turn | None = None  # the rotary embedding, on d_head vectors
    group: int = 1  # consecutive query heads sharing W_K^h (grouped-query attention)

    @property
    def n_heads(self) -> int:
        return self.wor.shape[0]

    @classmethod
    def of(cls, s: Any, readout: torch.Tensor, device: torch.device) -> _Layer:
        w_q, w_k, w_v, w_o = (t.to(device) for t in (s.w_q, s.w_k, s.w_v, s.w_o))
        wor = torch.einsum("hed,dr->her", w_o, readout)
        vw = torch.einsum("hie,her->hir", w_v, wor)
        rotary = s.rotary
        return cls(
            w_k=w_k,
            wor=wor,
            # contiguous: with one head, reshape keeps the transposed view
            vw_rows=vw.transpose(1, 2).reshape(-1, vw.shape[1]).contiguous(),
            wq_rows=(w_q.transpose(1, 2) / s.scale).reshape(-1, w_q.shape[1]).contiguous(),
            readout_t=readout.T.contiguous(),
            scale=s.scale,
            turn=None if rotary is None else _rotary.Turn.of(rotary, w_q.shape[2], device),
            group=1 if rotary is None else _rotary.group_size(w_k),
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
    norm's vector sums over the output blocks (and the rotary pieces' per-sample sums)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    pattern: torch.Tensor
    inputs: torch.Tensor
    counts: torch.Tensor  # (b, K): u_bj, how often each input is a sample (0: padding)
    omega: torch.Tensor  # (b, K): u_bj, or u_bj / sigma^2 after a norm
    normed: torch.Tensor | None = None  # (b, K, d)
    sigma: torch.Tensor | None = None  # (b, K, 1)
    nu: torch.Tensor | None = None  # V_h^T n_bj: (b, K, h, r)
    psi: torch.Tensor | None = None  # sum_p A_hpj w_p phi_bpj: (b, K, h, r)
    y_key: torch.Tensor | None = None  # the keys' part of y: (b, K, d)
    quad: torch.Tensor | None = None  # n^T M0 n: (b, K)
    turned: _rotary.RotaryBatch | None = None  # with rotary embeddings
    qk: Frames | None = None  # with norms of q and k: their frames at every position

    @classmethod
    def of(cls, s: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           pattern: torch.Tensor, inputs: torch.Tensor, layer: _Layer,
           x: torch.Tensor | None, counts: torch.Tensor,
           qk: Frames | None = None) -> _Batch:  # fmt: skip
        n, n_in = q.shape[0], len(inputs)
        if s.norm is None:
            batch = cls(q, k, v, pattern, inputs, counts, counts)
        else:
            normed, sigma = s._norm_of(x[:, inputs])  # type: ignore[index]
            nu = (normed.reshape(n * n_in, -1) @ layer.vw_rows.T).view(n, n_in, layer.n_heads, -1)
            batch = cls(
                q, k, v, pattern, inputs, counts, counts / sigma[..., 0].square(), normed,
                sigma, nu, torch.zeros_like(nu), torch.zeros_like(normed), q.new_zeros(n, n_in),
            )  # fmt: skip
        batch.qk = qk
        if layer.turn is not None:
            batch.turned = _rotary.RotaryBatch.of(layer, v, inputs, batch.normed, qk)
        return batch


def _add_block(
    s: Any,
    sums: dict[str, torch.Tensor],
    cross: _Cross,
    batch: _Batch,
    layer: _Layer,
    outputs: torch.Tensor,
    weights: torch.Tensor,
) -> None:
    """Add the pieces of one block of output positions (of ``batch``'s samples), probed
    ``weights`` ``(b, P)`` times."""
    inputs, v = batch.inputs, batch.v
    rows_p = batch.pattern[:, :, outputs]  # (b, h, P, L)
    a = rows_p[..., inputs]  # (b, h, P, K)
    z = torch.einsum("bhpl,blhe->bhpe", rows_p, v)
    q = batch.q[:, outputs]  # (b, P, h, e)
    wa = a * weights[:, None, :, None] * batch.omega[:, None, None, :]  # w_bp omega A_hpj
    sums["c"] += torch.einsum("bhpk,bgpk->hg", wa, a)
    waa = wa[:, :, None] * a[:, None]  # w omega A_hpj A_gpj: (b, h, g, P, K)
    pairs = (outputs[:, None] == inputs[None, :]).nonzero()  # (n, 2): (p, j) indices
    p_idx, j_idx = pairs[:, 0], pairs[:, 1]
    if layer.turn is None:
        spread = v[:, inputs].permute(0, 2, 1, 3)[:, :, None] - z[:, :, :, None]  # (b,h,P,K,e)
        g = torch.einsum("bhpke,her->bpkhr", spread, layer.wor)  # g_hpj without A
        key = torch.einsum("hie,bphe->bphi", layer.w_k, q) / layer.scale
        # T + T^T with T = sum_h V_h N_h: U_bpg = sum_h V_h (sum_j waa g_g), then U^T key.
        m_tilde = torch.einsum("bhgpk,bpkgr->bpghr", waa, g)  # (b, P, g, h, r)
        cross.add(m_tilde.reshape(-1, layer.vw_rows.shape[0]), key.reshape(-1, key.shape[-1]))
        s_bp = torch.einsum("bhgpk,bpkhg->bphg", waa, g @ g.transpose(-1, -2))
        sums["key"] += torch.einsum("bphd,bphe->de", key, s_bp @ key)
        key_pp = key[:, p_idx]
    else:  # the keys rotated back to each input position
        g = _rotary.add_keys(sums, batch, layer, waa, rows_p, outputs)
        cos, sin = layer.turn.at(outputs[p_idx])
        turned = layer.turn.back(q[:, p_idx], cos[:, None], sin[:, None])  # M_p^T q_hp
        if batch.qk is not None:  # through the norm of k at p
            turned = batch.qk.k.at(inputs[j_idx]).pull(turned)
        key_pp = torch.einsum("hie,bnhe->bnhi", layer.w_k, turned) / layer.scale
    if batch.normed is not None:  # key_hpj . n_bj, then the norm's vectors
        if batch.turned is None:
            kn = torch.einsum("bphd,bkd->bhpk", key, batch.normed)
            kappa = _norm_vectors(batch, a, g, kn, weights)
            batch.y_key += torch.einsum("bhpk,bphd->bkd", kappa, key)  # type: ignore[operator]
        else:
            kn = torch.einsum("bphe,bkhe->bhpk", q, batch.turned.kr)
            kappa = _norm_vectors(batch, a, g, kn, weights)
            batch.turned.y_turned += torch.einsum("bhpk,bphe->bkhe", kappa, q)  # type: ignore[operator]
    if len(pairs):
        a_pp = a[:, :, p_idx, j_idx].transpose(1, 2)  # (b, n, h)
        sums["pairs"] += _diagonal(
            s, batch, layer, pairs, a_pp, g[:, p_idx, j_idx], key_pp, rows_p, z, outputs, weights
        )


def _norm_vectors(
    batch: _Batch, a: torch.Tensor, g: torch.Tensor, kn: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Add the block's ``psi`` and ``n^T M0 n`` from ``phi_bpj = F0_pj n_bj`` (``(b, P, K,
    r)``); return ``kappa_hpj = w_p A_hpj g_hpj . phi_bpj``, which the keys' part of ``y``
    sums. ``g``: ``(b, P, K, h, r)``, ``kn``: ``key_hpj . n_bj`` ``(b, h, P, K)``."""
    # Contiguous (b, P, K) batches of small products (einsum's strided ones loop per matrix).
    a_t = a.permute(0, 2, 3, 1).contiguous()  # (b, P, K, h)
    rows = torch.addcmul(batch.nu[:, None], kn.permute(0, 2, 3, 1)[..., None], g)
    phi = (a_t[..., None, :] @ rows).squeeze(-2)  # (b, P, K, r)
    wphi = phi * weights[:, :, None, None]
    lhs = a.permute(0, 3, 1, 2).contiguous()  # (b, K, h, P)
    batch.psi += lhs @ wphi.transpose(1, 2).contiguous()  # type: ignore[operator]
    batch.quad += (wphi * phi).sum((1, 3))  # type: ignore[operator]
    return a * torch.einsum("bpkhr,bpkr->bhpk", g, wphi)


def _diagonal(
    s: Any,
    batch: _Batch,
    layer: _Layer,
    pairs: torch.Tensor,
    a_pp: torch.Tensor,
    g_pp: torch.Tensor,
    key_pp: torch.Tensor,
    rows_p: torch.Tensor,
    z: torch.Tensor,
    outputs: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """``sum w_p (W^T W - X^T X)`` over the block's pairs where the input is the output, up
    to symmetrization (``Delta^T (2 X + Delta)``, ``W = X + Delta``).

    Args:
        pairs: ``(n, 2)``: (output, input) indices of the pairs.
        a_pp, g_pp, key_pp: Their ``A_hpp`` ``(b, n, h)``, ``g_hpp`` ``(b, n, h, r)`` and
            ``key_hpp`` ``(b, n, h, d)``.

    Every ``(b, pair, r, d)`` tensor is formed contiguous (rows over ``d``), by products of
    the :class:`_Layer`'s stacked weights."""
    p_idx, j_idx = pairs[:, 0], pairs[:, 1]
    d, n_heads = layer.vw_rows.shape[1], layer.n_heads
    n, n_pairs, r = a_pp.shape[0], len(pairs), layer.wor.shape[2]
    # sqrt(w_bp u_bj): (b, n, 1, 1)
    root = (weights[:, p_idx] * batch.counts[:, j_idx]).sqrt()[:, :, None, None]
    x_rows = (a_pp.reshape(-1, n_heads) @ layer.vw_rows.view(n_heads, -1)).view(n, n_pairs, r, d)
    ag = (a_pp[..., None] * g_pp).transpose(-1, -2)  # (b, n, r, h)
    x_rows.view(-1, r, d).baddbmm_(ag.reshape(-1, r, n_heads), key_pp.reshape(-1, n_heads, d))
    a_rows = rows_p[:, :, p_idx].transpose(1, 2)
    delta = _query_rows(batch, layer, a_rows, z[:, :, p_idx], outputs[p_idx])
    if batch.normed is not None:  # both through the norm's Jacobian at the input position
        centred = s.norm in ("LN", "LNPre")
        n_j, sigma_j = batch.normed[:, j_idx, None, :], batch.sigma[:, j_idx, None, :]  # type: ignore[index]
        for rows in (x_rows, delta):
            if centred:
                rows -= rows.mean(-1, keepdim=True)
            flat = rows.view(-1, r, d)  # rows - (rows n) n^T / d, in place
            flat.baddbmm_(flat @ n_j.reshape(-1, d, 1), n_j.reshape(-1, 1, d), alpha=-1 / d)
            rows /= sigma_j
    if s.residual:
        delta += layer.readout_t  # the skip connection bypasses the norm
    x_rows *= root
    delta *= root
    flat_delta = delta.reshape(-1, d)
    return flat_delta.T @ x_rows.mul_(2).add_(delta).reshape(-1, d)  # symmetrized at the end


def _query_rows(
    batch: _Batch, layer: _Layer, a_rows: torch.Tensor, z: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """The query terms ``Q_p`` of the block's pairs, ``(b, n, r, d)`` contiguous.

    ``Q_p = sum_{h,l} A_hpl g_hpl (W_Q^h k_hl / scale)^T``, ``g_hpl = (v_hl - z_hp) W_O^h R``,
    is a product over the ``H L`` pairs (head, key). Beyond ``L = d_head`` keys it is taken
    through the heads' ``d_head x d_head`` matrices ``E_hp = sum_l A_hpl (v_hl - z_hp)
    k_hl^T`` instead, ``Q_p = sum_h (W_O^h R)^T E_hp W_Q^h^T / scale``: ``r d d_model`` per
    position, whatever the context. With rotary embeddings ``k_hl`` is rotated back to ``p``
    (``M_p^T k_hl``), so ``E_hp`` becomes ``E_hp M_p``.

    Args:
        batch: The samples; ``layer``: the weights.
        a_rows: The pairs' pattern rows ``A_hpl``, ``(b, n, h, L)``.
        z: The pairs' ``z_hp``, ``(b, h, n, e)``.
        positions: The pairs' positions ``p``, ``(n,)``.
    """
    n, n_pairs, n_heads, n_keys = a_rows.shape
    d_head, r = layer.wor.shape[1:]
    wq = layer.wq_rows.view(n_heads, d_head, -1)  # W_Q^h^T / scale: (h, e, d)
    turn = layer.turn
    cos, sin = (None, None) if turn is None else turn.at(positions)  # (n, e)
    if n_keys < d_head:  # (b, n, r, h L) @ (h L, d) query rows, per sample or per pair
        spread = batch.v.transpose(1, 2)[:, None] - z.transpose(1, 2)[..., None, :]
        g_all = torch.einsum("bnhle,her->bnrhl", spread * a_rows[..., None], layer.wor)
        if turn is None:  # the pairs share the query rows: one product per sample
            query = torch.einsum("blhe,hed->bhld", batch.k, wq).reshape(n, -1, wq.shape[2])
            return (g_all.reshape(n, n_pairs * r, -1) @ query).view(n, n_pairs, r, -1)
        k_at = turn.back(batch.k[:, None], cos[:, None, None], sin[:, None, None])
        if batch.qk is not None:  # through the norm of q at p: (b, n, L, h, e)
            k_at = batch.qk.q.at(positions).pull(k_at, expand=(2,))
        query = torch.einsum("bnlhe,hed->bnhld", k_at, wq).reshape(n, n_pairs, -1, wq.shape[2])
        return g_all.reshape(n, n_pairs, r, -1) @ query
    a_h, k_t = a_rows.transpose(1, 2).contiguous(), batch.k.transpose(1, 2)  # (b,h,n,L), (b,h,L,e)
    av = a_h[..., None, :] * batch.v.permute(0, 2, 3, 1)[:, :, None]  # (b, h, n, e, L)
    e_hp = (av.reshape(n, n_heads, -1, n_keys) @ k_t).view(n, n_heads, n_pairs, d_head, d_head)
    e_hp -= z[..., None] * (a_h @ k_t)[..., None, :]  # E_hp: (b, h, n, e, e)
    if turn is not None:  # E_hp M_p: each row rotated back to p
        e_hp = turn.back(e_hp, cos[:, None], sin[:, None])
    if batch.qk is not None:  # E_hp M_p diag(gamma_q) P^q_hp: rows through the norm of q
        frame = batch.qk.q.at(positions)  # (b, n, h, ...)
        n_q, sigma_q = (t.transpose(1, 2)[..., None, :] for t in (frame.n, frame.sigma))
        e_hp = qk_pull(e_hp, n_q, sigma_q, frame.gain)
    g_q = torch.einsum("her,bhnef->bnrhf", layer.wor, e_hp)  # (W_O^h R)^T E_hp
    return g_q.reshape(n, n_pairs, r, -1) @ layer.wq_rows
