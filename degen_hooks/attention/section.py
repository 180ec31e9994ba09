"""Closed-form Jacobian Grams of attention layers, for any model family: no backward passes.

Part of :mod:`degen_hooks.attention`. A model family supplies the reads (which hooks hold the
layer's q, k, v and pattern, or what to recompute them from); :class:`AttentionSection`
holds the weights and the mathematics, the same for every family.

For one attention layer with input rows ``x_j`` (row convention, ``q_hp = x_p W_Q^h + b``,
``k_hj``, ``v_hj`` alike, pattern ``A_hpj = softmax_j(q_hp . k_hj / scale)``,
``z_hp = sum_j A_hpj v_hj``, output ``y_p = sum_h z_hp W_O^h (+ x_p when residual)``), the
derivative of the output at position ``p`` with respect to the input at ``j`` is

    dy_p/dx_j = [p = j] I + sum_h A_hpj W_V^h W_O^h                       (residual, values)
              + sum_h (W_K^h q_hp / scale) (A_hpj (v_hj - z_hp) W_O^h)     (keys)
              + [p = j] sum_h sum_l (W_Q^h k_hl / scale) (A_hpl (v_hl - z_hp) W_O^h)  (queries)

(the softmax derivative ``dA_hpl = A_hpl (ds_hpl - sum_m A_hpm ds_hpm)`` folded in). Every
term is built from the layer's own ``q``, ``k``, ``v`` and pattern, read in one forward pass,
so masks, biases, ALiBi and shortformer position embeddings (constant in ``x``) need no
special case. Read out through ``R``, every (output position, feature) pair gives one row
``R^T (dy_p/dx_j)^T`` per input sample (as exact probes do). ``gram_pass`` takes the rows'
Gram from its pieces (``_gram``, rotary embeddings included: the rows of every (output,
input) pair are never formed, only those where the input is the output);
:meth:`AttentionSection.jacobian_rows` keeps the rows (the edges and the tests use them).

A LayerNorm or RMSNorm before attention multiplies every attention term by its Jacobian
``D_j = (P - n_j^T n_j / d) / sigma_j`` (``n_j`` the normalized input, ``P`` the centring
projector for LayerNorm, the identity for RMSNorm), recomputed from the section's input; the
norm's gain is folded into ``W_Q``, ``W_K`` and ``W_V``, and the residual bypasses the norm.

Rotary embeddings rotate q and k per position, ``q'_hp = M_p q_hp``: the scores are made of
the rotated vectors, and the key and query terms become ``W_K^h M_j^T q'_hp`` and
``W_Q^h M_p^T k'_hl`` (positions ``0 .. n-1``: no left-padding offsets). Per-head norms of q
and k before the rotation (Qwen 3, :mod:`.qk_norm`) put their Jacobians between:
``W_K^h P^k_hj (gamma_k * M_j^T q'_hp)`` and ``W_Q^h P^q_hp (gamma_q * M_p^T k'_hl)``, with
``P_ht = (I - n_ht n_ht^T / d_head) / sigma_ht`` recomputed from the raw projections.

A family's section subclasses :class:`AttentionSection` with three methods: ``_reads()``,
the :class:`~degen_hooks.Site` of each tensor a forward pass must read, by role;
``_read(reads)``, which turns them into the batch's float64 ``(section, q, k, v, pattern)``
(q and k rotated); and ``_check_sites(site, target)``, which refuses sites that are not the
section's.

Every term above is differentiated as the weights say, while q, k, v and the pattern are
read after the model's hooks: ``_read`` therefore checks each batch against the weights
(:mod:`._checks`: raw q, k and v against ``norm(x) W + b``; the pattern against the softmax
of q and k, :func:`~degen_hooks.attention.rotary.check_pattern`, where it is read; the
heads' outputs and the output), so that a hook that steers, ablates or patches inside the
layer is refused rather than left out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._errors import ShapeMismatchError
from .._positions import padding_mask, position_weights
from .._read_pass import SiteReader
from ..accumulators import SecondMoment
from ..sites import Site
from ._checks import AttentionChecks, check_read, projection_biases
from ._edges import AttentionEdges
from ._gram import accumulate
from .qk_norm import Frames, QKNorm
from .rotary import Rotary

__all__ = ["AttentionSection", "check_read", "heads", "projection_biases"]


def heads(act: torch.Tensor, n_heads: int, d_head: int) -> torch.Tensor:
    """A q, k or v tensor ``(b, pos, n * d_head)`` as ``(b, pos, n_heads, d_head)`` float64.

    Grouped-query attention reads ``n_key_value_heads`` key and value heads; each serves
    ``n_heads / n_key_value_heads`` consecutive query heads (TransformerLens'
    ``repeat_interleave``, Hugging Face's ``repeat_kv``), as the section's ``W_K``/``W_V`` do.
    """
    act = act.to(torch.float64)
    act = act.reshape(*act.shape[:2], -1, d_head)
    if act.shape[2] != n_heads:
        act = act.repeat_interleave(n_heads // act.shape[2], dim=2)
    return act


@dataclass
class AttentionSection(AttentionEdges, AttentionChecks):
    """One attention layer as a closed-form section (the interface of :mod:`degen_hooks.section`).

    Weights use the TransformerLens layout, in float64. A model family builds a subclass
    (``degen_hooks.transformer_lens.attention_section``, the Hugging Face adapter's
    ``find_sections``); ``build_bases`` runs :meth:`gram_pass` in place of the backward
    passes of the section's input site.

    Attributes:
        w_q, w_k, w_v: ``(n_heads, d_in, d_head)`` (a norm's gain folded in; key/value heads
            repeated for grouped-query attention).
        w_o: ``(n_heads, d_head, d_out)``.
        scale: Attention scores are ``q . k / scale``.
        residual: ``y = x + Attn(Norm(x))`` (``d_in == d_out``).
        source, target: The section's input and output sites, as named in messages.
        norm: The norm before attention: ``None``, ``"LN"``, ``"LNPre"``, ``"RMS"`` or
            ``"RMSPre"`` (its Jacobian is recomputed from the section's input).
        eps: The norm's epsilon.
        rotary: The rotary embedding of q and k (fixed tables; a family may set each batch's).
        qk_norm: Per-head norms of q and k before the rotation (:mod:`.qk_norm`; the family
            sets each batch's raw projections), or ``None``. Needs ``rotary``.
        b_q, b_k, b_v: The projections' biases ``(n_heads, d_head)`` (a norm's bias folded
            in: ``beta W + b``), ``None`` for zero. Each batch checks the model's raw q, k
            and v against ``norm(x) W + b`` (:meth:`check_projections`).
    """

    w_q: torch.Tensor
    w_k: torch.Tensor
    w_v: torch.Tensor
    w_o: torch.Tensor
    scale: float
    residual: bool
    source: str
    target: str
    norm: str | None = None
    eps: float = 1e-5
    rotary: Rotary | None = None
    qk_norm: QKNorm | None = None
    b_q: torch.Tensor | None = None
    b_k: torch.Tensor | None = None
    b_v: torch.Tensor | None = None

    @property
    def d_in(self) -> int:
        """Width of the input site."""
        return self.w_q.shape[1]

    # -- what a family supplies -----------------------------------------------------------------
    def _check_sites(self, site: Site, target: Site | None) -> None:
        """Raise :class:`ShapeMismatchError` unless ``site -> target`` is this section."""
        raise NotImplementedError

    def _reads(self) -> dict[str, Site]:
        """The sites a forward pass reads, by role (the input ``"x"`` is added)."""
        raise NotImplementedError

    def _read(
        self,
        reads: dict[str, torch.Tensor],
        mask: torch.Tensor | None = None,
        outputs: torch.Tensor | None = None,
    ) -> tuple[AttentionSection, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(section, q, k, v, pattern)`` of one batch from its reads, float64: q and k as
        the scores are made of them, ``section`` with the batch's rotary tables. ``mask``:
        the batch's ``(b, pos)`` padding mask (a family that recomputes the pattern masks
        those keys), or ``None``; ``outputs``: the output positions the batch probes (a
        family may check its reads there only), ``None`` for all."""
        raise NotImplementedError

    def edge_reads(self, site: Site, target: Site | None) -> dict[str, Site]:
        """What one forward pass reads for :meth:`gram_pass` and :meth:`edge_batch`, by role:
        the section's input (the whole activation, every position) as ``"x"``, and the
        family's reads (the layer's q, k, v and pattern, or what gives them).

        Args:
            site: The section's input.
            target: Its output.

        Raises:
            ShapeMismatchError: If the sites are not this section's input and output.
        """
        self._check_sites(site, target)
        return {"x": site, **self._reads()}

    def jacobian_rows(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        pattern: torch.Tensor,
        readout: torch.Tensor,
        inputs: torch.Tensor,
        outputs: torch.Tensor,
        weights: torch.Tensor,
        out: torch.Tensor | None = None,
        x: torch.Tensor | None = None,
        qk: Frames | None = None,
    ) -> torch.Tensor:
        """Read-out Jacobians ``sqrt(w_p) R^T (dy_p/dx_j)^T`` of one batch, as Gram rows.

        Args:
            q, k, v: The layer's hooks, ``(b, pos, n_heads, d_head)``, float64.
            pattern: Attention pattern, ``(b, n_heads, query pos, key pos)``, float64.
            readout: ``R``, shape ``(d_out, r)``, float64.
            inputs: Input positions ``j`` (the samples), shape ``(K,)``.
            outputs: Probed output positions ``p``, distinct, shape ``(P,)``.
            weights: How often each output position is probed, shape ``(P,)``.
            out: Optional buffer of ``b * P * K * r * d_in`` elements to write into.
            x: The section input ``(b, pos, d_in)``, float64; needed with a norm.
            qk: With ``qk_norm``, the frames of these samples (default: the batch's).

        Returns:
            ``(b, P, K, r, d_in)``: one row per (sample, output position, feature), whose
            Gram is the sample's Jacobian Gram (each ``(p, feature)`` is one probe, as in
            exact probes).
        """
        n, n_heads = q.shape[0], q.shape[2]
        n_in, n_out, r, d_in = len(inputs), len(outputs), readout.shape[1], self.d_in
        w_q, w_k, w_v, w_o = (t.to(q.device) for t in (self.w_q, self.w_k, self.w_v, self.w_o))
        root = weights.sqrt()
        wor = torch.einsum("hed,dr->her", w_o, readout)  # W_O^h R
        a = pattern[:, :, outputs] * root[:, None]  # (b, h, P, all keys), weight folded in
        z = torch.einsum("bhpl,blhe->bhpe", pattern[:, :, outputs], v)
        size = n * n_out * n_in * r * d_in
        rows = torch.empty(size, dtype=q.dtype, device=q.device) if out is None else out[:size]
        diagonal = [  # (output index, input index) pairs where the input is the output
            (p_index, k_index)
            for p_index, position in enumerate(outputs.tolist())
            for k_index in (inputs == position).nonzero().flatten().tolist()
        ]
        # Values: sum_h A_hpj R^T W_O^hT W_V^hT, one (b P K, h) x (h, r d_in) product.
        values = torch.einsum("hie,her->hri", w_v, wor).reshape(n_heads, -1)
        coefficients = a[:, :, :, inputs].permute(0, 2, 3, 1).reshape(-1, n_heads)
        rows = rows.view(n, n_out, n_in, r, d_in)
        torch.mm(coefficients, values, out=rows.view(-1, r * d_in))
        # g_hplr = sqrt(w_p) A_hpl (v_hl - z_hp) W_O^h R: how the score s_hpl moves y_p.
        spread = v.permute(0, 2, 1, 3)[:, :, None] - z[:, :, :, None]  # (b, h, P, l, e)
        g = torch.einsum("bhple,her->bphlr", a[..., None] * spread, wor)
        qk = self._frames(qk)
        if self.rotary is None:
            # Keys: ds_hpj/dx_j = W_K^h q_hp / scale, for every sample row (b, p).
            keys = torch.einsum("hie,bphe->bphi", w_k, q[:, outputs]) / self.scale
            lhs = g[:, :, :, inputs].permute(0, 1, 3, 4, 2).reshape(n * n_out, n_in * r, -1)
            rows.view(n * n_out, n_in * r, d_in).baddbmm_(lhs, keys.reshape(n * n_out, -1, d_in))
            # Queries, where the input is the output position (j = p):
            # ds_hpl/dx_p = W_Q^h k_hl / scale for every key l.
            queries = torch.einsum("hie,blhe->bhli", w_q, k).reshape(n, -1, d_in) / self.scale
            for p_index, k_index in diagonal:
                lhs = g[:, p_index].permute(0, 3, 1, 2).reshape(n, r, -1)
                rows[:, p_index, k_index].baddbmm_(lhs, queries)
        else:
            # q and k are the rotated vectors: ds_hpl/dx_l = W_K^h M_l^T q_hp / scale and
            # ds_hpl/dx_p = W_Q^h M_p^T k_hl / scale, M_t the rotation at position t (through
            # the q/k norms' P (gamma * .) when there are some).
            n_pos = v.shape[1]
            key_at = self.rotary.unrotate(q[:, outputs, None], inputs[None, :])  # (b,P,K,h,e)
            if qk is not None:
                key_at = qk.k.at(inputs).pull(key_at, expand=(1,))
            keys = torch.einsum("hie,bpkhe->bpkhi", w_k, key_at) / self.scale
            lhs = g[:, :, :, inputs].permute(0, 1, 3, 4, 2)  # (b, P, K, r, h)
            rows.view(-1, r, d_in).baddbmm_(
                lhs.reshape(-1, r, n_heads), keys.reshape(-1, n_heads, d_in)
            )
            for p_index, k_index in diagonal:
                position = outputs[p_index].expand(n_pos)
                query_at = self.rotary.unrotate(k, position)  # (b, l, h, e)
                if qk is not None:
                    query_at = qk.q.at(outputs[p_index]).pull(query_at, expand=(1,))
                queries = torch.einsum("hie,blhe->bhli", w_q, query_at).reshape(n, -1, d_in)
                lhs = g[:, p_index].permute(0, 3, 1, 2).reshape(n, r, -1)
                rows[:, p_index, k_index].baddbmm_(lhs, queries / self.scale)
        if self.norm is not None:
            if x is None:
                raise ValueError(f"A section after a {self.norm} norm needs its input x.")
            self._through_norm(rows, x[:, inputs])
        if self.residual:  # the skip connection bypasses the norm: it adds R^T
            for p_index, k_index in diagonal:
                rows[:, p_index, k_index] += root[p_index] * readout.T
        return rows

    def _frames(self, qk: Frames | None = None) -> Frames | None:
        """The q/k norms' frames (``qk``, else the batch's), or ``None`` without q/k norms."""
        if self.qk_norm is None:
            return None
        if self.rotary is None:
            raise ValueError(
                "Norms of q and k are covered with rotary embeddings only; leave this section "
                "to backward passes (sections=None)."
            )
        return self.qk_norm.frames() if qk is None else qk

    def _through_norm(self, rows: torch.Tensor, x: torch.Tensor) -> None:
        """``rows <- rows D`` in place, ``D = (P - n^T n / d) / sigma`` the norm's Jacobian.

        ``n = c / sigma`` is the normalized input, ``c`` the input (centred for LayerNorm,
        ``P`` then the centring projector, else ``P = I``), ``sigma = sqrt(mean(c^2) + eps)``;
        ``D`` is symmetric, so it acts on the Gram rows from the right.
        """
        centred = self.norm in ("LN", "LNPre")
        normed, sigma = self._norm_of(x)  # (b, K, d_in), (b, K, 1)
        normalized = normed[:, None, :, None, :]  # (b, 1, K, 1, d_in)
        if centred:
            rows -= rows.mean(-1, keepdim=True)
        dots = (rows * normalized).sum(-1, keepdim=True)
        rows -= dots * normalized / self.d_in
        rows /= sigma[:, None, :, :, None]

    def gram_pass(
        self,
        model: nn.Module,
        data: Iterable[Any],
        site: Site,
        target: Site,
        readout: torch.Tensor | None = None,
        *,
        forward: Callable[[nn.Module, Any], Any] | None = None,
        mask: Callable[[Any], torch.Tensor | None] | None = None,
        progress: bool = True,
    ) -> SecondMoment:
        """One forward pass over ``data``: the Jacobian Gram of ``site`` read through ``target``.

        Equal to the Gram ``dh.collect(model, [site], jacobians="exact", target=target,
        readout=readout)`` accumulates, without a backward pass (runs under ``no_grad``); with
        ``mask``, the Gram of exact probes under ``run.set_mask(mask(batch))``.

        Args:
            model: The model the section was built from.
            data: Batches (``forward(model, batch)``, default ``model(batch)``).
            site: The section's input (its positions are the samples).
            target: The section's output (each of its positions and read-out features is
                one probe, as in exact probes).
            readout: ``(d_out, r)``; identity when ``None``.
            forward: ``forward(model, batch) -> output``.
            mask: ``mask(batch) -> (batch, pos)`` boolean mask of the real tokens (the
                ``attention_mask`` the model is given), as ``build_bases(mask=...)`` takes it:
                padding is no sample and no probe, ``"last"`` each row's last real token.
            progress: Show a tqdm progress bar.

        Returns:
            The Gram as a :class:`~degen_hooks.SecondMoment` over the site's samples.

        Raises:
            ShapeMismatchError: For a readout or mask that does not fit.
            ValueError: From the family, for a batch the closed form would get wrong.
        """
        from tqdm.auto import tqdm

        reads = self.edge_reads(site, target)
        d_out = self.w_o.shape[2]
        if readout is None:
            readout = torch.eye(d_out, dtype=torch.float64)
        if readout.ndim != 2 or readout.shape[0] != d_out:
            raise ShapeMismatchError(
                f"Readout of shape {tuple(readout.shape)} cannot read {self.target!r} of width "
                f"{d_out}: it must be a (d_out, r) = ({d_out}, r) matrix."
            )
        gram = SecondMoment()
        reader = SiteReader(model, reads, forward, what=f"The attention section of {self.source!r}")
        total = len(data) if hasattr(data, "__len__") else None  # type: ignore[arg-type]
        desc = f"jacobians {site.key} (closed form)"
        for batch in tqdm(data, desc=desc, total=total, disable=not progress, leave=False):
            captured, _, _ = reader(batch)  # stops once the reads are in
            padding = None if mask is None else mask(batch)
            self._update(gram, captured, readout, site, target, padding)
        return gram

    def _update(
        self,
        gram: SecondMoment,
        captured: dict[str, torch.Tensor],
        readout: torch.Tensor,
        site: Site,
        target: Site,
        mask: torch.Tensor | None = None,
    ) -> None:
        if mask is not None:
            mask = padding_mask(mask, captured["x"], site.key)
        act = site.features_last(captured["x"])
        n_pos, device = act.shape[1], act.device
        inputs, input_weights = position_weights(site.positions, n_pos, mask, device, site.key)
        index, probes = position_weights(target.positions, n_pos, mask, device, target.key)
        outputs, inverse = index.unique(return_inverse=True)  # each probed w_bp times
        section, q, k, v, pattern = self._read(captured, mask, outputs)
        x = act.to(torch.float64) if self.norm is not None else None
        weights = probes.new_zeros(len(probes), len(outputs)).index_add_(1, inverse, probes)
        if mask is None:  # the same for every sequence: (P,)
            weights = weights[0]
        accumulate(
            section, gram, q, k, v, pattern, x, readout, inputs, outputs, weights,
            None if mask is None else input_weights,
        )  # fmt: skip
