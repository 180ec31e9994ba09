"""The attention Jacobian Gram without one row per (output, input, feature) (#16).

Part of :mod:`degen_hooks.transformer_lens`. In the notation of ``_attention``'s module
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
  + R^T`` formed explicitly (``P`` rows of ``r x d`` per sample, not ``P K``).

The cost per sample is about ``P r d^2 + P H^2 r d`` instead of ``P K r d^2``: the saving
grows with the context (``K`` inputs). Rotary embeddings rotate the keys by input position,
which this factorisation does not take: they keep the rows.
"""

from __future__ import annotations

import torch

__all__ = ["lowrank_gram"]


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
    has no rotary embedding.
    """
    s = section
    w_q, w_k, w_v, w_o = (t.to(q.device) for t in (s.w_q, s.w_k, s.w_v, s.w_o))  # type: ignore[attr-defined]
    scale = s.scale  # type: ignore[attr-defined]
    wor = torch.einsum("hed,dr->her", w_o, readout)  # W_O^h R: (h, e, r)
    vw = torch.einsum("hie,her->hir", w_v, wor)  # V_h: (h, d, r)
    rows_p = pattern[:, :, outputs]  # (b, h, P, L)
    a = rows_p[..., inputs]  # (b, h, P, K)
    z = torch.einsum("bhpl,blhe->bhpe", rows_p, v)
    spread = v[:, inputs].permute(0, 2, 1, 3)[:, :, None] - z[:, :, :, None]  # (b,h,P,K,e)
    g = torch.einsum("bhpke,her->bhpkr", spread, wor)  # g_hpj without A
    key = torch.einsum("hie,bphe->bphi", w_k, q[:, outputs]) / scale  # (b, P, h, d)
    norm = s.norm  # type: ignore[attr-defined]
    normed = sigma = None
    if norm is not None:
        if x is None:
            raise ValueError(f"A section after a {norm} norm needs its input x.")
        xi = x[:, inputs]
        if norm in ("LN", "LNPre"):
            xi = xi - xi.mean(-1, keepdim=True)
        sigma = (xi.pow(2).mean(-1, keepdim=True) + s.eps).sqrt()  # type: ignore[attr-defined]
        normed = xi / sigma  # (b, K, d)
        omega = sigma[..., 0].reciprocal().square()  # (b, K)
    else:
        omega = torch.ones(a.shape[0], a.shape[3], dtype=a.dtype, device=a.device)
    wa = a * weights[None, None, :, None] * omega[:, None, None, :]  # w_p omega_bj A_hpj
    # The F0 part, weighted: values, keys and their cross terms.
    c = torch.einsum("bhpk,bgpk->hg", wa, a)
    gram = torch.einsum("hdr,her->de", vw, torch.einsum("hg,ger->her", c, vw))
    ag = a[..., None] * g  # A_hpj g_hpj: (b, h, P, K, r)
    m_tilde = torch.einsum("bhpk,bgpkr->bphgr", wa, ag)
    n_h = torch.einsum("bphgr,bpgd->hrd", m_tilde, key)
    cross = torch.einsum("hdr,hre->de", vw, n_h)
    gram += cross + cross.T
    gg = torch.einsum("bhpkr,bgpkr->bpkhg", g, g)
    s_bp = torch.einsum("bhgpk,bpkhg->bphg", wa[:, :, None] * a[:, None], gg)
    gram += torch.einsum("bphd,bphe->de", key, torch.einsum("bphg,bpge->bphe", s_bp, key))
    if normed is not None:
        gram = _through_norm(gram, normed, omega, a, g, vw, key, weights, norm in ("LN", "LNPre"))
    return gram + _diagonal(s, a, g, vw, key, rows_p, z, v, k, wor, w_q, readout, inputs,
                            outputs, weights, normed, sigma)  # fmt: skip


def _through_norm(
    gram: torch.Tensor,
    normed: torch.Tensor,
    omega: torch.Tensor,
    a: torch.Tensor,
    g: torch.Tensor,
    vw: torch.Tensor,
    key: torch.Tensor,
    weights: torch.Tensor,
    centred: bool,
) -> torch.Tensor:
    """``sum D M0 D`` from ``S = sum omega M0`` (``gram``) and the vector terms."""
    d = normed.shape[-1]
    # phi_bpj = F0_pj n_bj: (b, P, K, r)
    nu = torch.einsum("hdr,bkd->bkhr", vw, normed)
    kn = torch.einsum("bphd,bkd->bhpk", key, normed)
    phi = torch.einsum("bhpk,bkhr->bpkr", a, nu) + torch.einsum("bhpk,bhpkr->bpkr", a * kn, g)
    # y_bj = sum_p w_p F0_pj^T phi_bpj: (b, K, d)
    wphi = phi * weights[None, :, None, None]
    psi = torch.einsum("bhpk,bpkr->bkhr", a, wphi)
    y = torch.einsum("hdr,bkhr->bkd", vw, psi)
    kappa = a * torch.einsum("bhpkr,bpkr->bhpk", g, wphi)
    y += torch.einsum("bhpk,bphd->bkd", kappa, key)
    quad = (wphi * phi).sum((1, 3))  # n^T M0 n: (b, K)
    if centred:
        gram = gram - gram.mean(0, keepdim=True)
        gram = gram - gram.mean(1, keepdim=True)  # C S C
    ny = torch.einsum("bk,bkd,bke->de", omega, y, normed)  # sum omega y n^T
    if centred:
        ny = ny - ny.mean(0, keepdim=True)  # C y n^T
    gram = gram - (ny + ny.T) / d
    return gram + torch.einsum("bk,bkd,bke->de", omega * quad, normed, normed) / d**2


def _diagonal(
    s: object,
    a: torch.Tensor,
    g: torch.Tensor,
    vw: torch.Tensor,
    key: torch.Tensor,
    rows_p: torch.Tensor,
    z: torch.Tensor,
    v: torch.Tensor,
    k: torch.Tensor,
    wor: torch.Tensor,
    w_q: torch.Tensor,
    readout: torch.Tensor,
    inputs: torch.Tensor,
    outputs: torch.Tensor,
    weights: torch.Tensor,
    normed: torch.Tensor | None,
    sigma: torch.Tensor | None,
) -> torch.Tensor:
    """``sum w_p (W^T W - X^T X)`` over the pairs where the input is the output."""
    pairs = (outputs[:, None] == inputs[None, :]).nonzero()  # (n, 2): (p index, j index)
    d = w_q.shape[1]
    if len(pairs) == 0:
        return torch.zeros(d, d, dtype=a.dtype, device=a.device)
    p_idx, j_idx = pairs[:, 0], pairs[:, 1]
    root = weights[p_idx].sqrt()[None, :, None, None]  # (1, n, 1, 1)
    a_pp = a[:, :, p_idx, j_idx]  # (b, h, n)
    x_rows = torch.einsum("bhn,hdr->bnrd", a_pp, vw)
    ag = a_pp[..., None] * g[:, :, p_idx, j_idx]  # (b, h, n, r)
    x_rows += torch.einsum("bhnr,bnhd->bnrd", ag, key[:, p_idx])
    # The query term: sum_{h,l} A_hpl (v_hl - z_hp) W_O^h R (W_Q^h k_hl / scale)^T.
    query = torch.einsum("hie,blhe->bhli", w_q, k) / s.scale  # type: ignore[attr-defined]
    a_rows = rows_p[:, :, p_idx]  # (b, h, n, L)
    spread = v.permute(0, 2, 1, 3)[:, :, None] - z[:, :, p_idx, None]  # (b, h, n, L, e)
    g_all = torch.einsum("bhnle,her->bhnlr", spread * a_rows[..., None], wor)
    delta = torch.einsum("bhnlr,bhld->bnrd", g_all, query)
    if normed is not None:  # both through the norm's Jacobian at the input position
        centred = s.norm in ("LN", "LNPre")  # type: ignore[attr-defined]
        n_j, sigma_j = normed[:, j_idx, None, :], sigma[:, j_idx, None, :]  # type: ignore[index]
        for rows in (x_rows, delta):
            if centred:
                rows -= rows.mean(-1, keepdim=True)
            rows -= (rows * n_j).sum(-1, keepdim=True) * n_j / d
            rows /= sigma_j
    x_rows *= root
    delta *= root
    if s.residual:  # type: ignore[attr-defined]
        delta += root * readout.T  # the skip connection bypasses the norm
    flat_delta = delta.reshape(-1, d)
    half = flat_delta.T @ (2 * x_rows + delta).reshape(-1, d)
    return (half + half.T) / 2
