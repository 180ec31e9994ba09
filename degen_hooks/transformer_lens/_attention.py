"""Closed-form Jacobian Grams of TransformerLens attention layers: no backward passes.

Part of :mod:`degen_hooks.transformer_lens`; see its docstring.

For one attention layer with input rows ``x_j`` (row convention, ``q_hp = x_p W_Q^h + b``,
``k_hj``, ``v_hj`` alike, pattern ``A_hpj = softmax_j(q_hp . k_hj / scale)``,
``z_hp = sum_j A_hpj v_hj``, output ``y_p = sum_h z_hp W_O^h (+ x_p when residual)``), the
derivative of the output at position ``p`` with respect to the input at ``j`` is

    dy_p/dx_j = [p = j] I + sum_h A_hpj W_V^h W_O^h                       (residual, values)
              + sum_h (W_K^h q_hp / scale) (A_hpj (v_hj - z_hp) W_O^h)     (keys)
              + [p = j] sum_h sum_l (W_Q^h k_hl / scale) (A_hpl (v_hl - z_hp) W_O^h)  (queries)

(the softmax derivative ``dA_hpl = A_hpl (ds_hpl - sum_m A_hpm ds_hpm)`` folded in). Every
term is built from the layer's own ``q``, ``k``, ``v`` and pattern, read from its hooks in
one forward pass, so masks, biases, ALiBi and shortformer position embeddings (constant in
``x``) need no special case. Read out through ``R``, every (output position, feature) pair
gives one row ``R^T (dy_p/dx_j)^T`` per input sample (as exact probes do), and the rows'
Gram is one matrix product: the Gram batched exact probes produce, at a fraction of the
cost (one forward pass instead of one backward pass per probe).

A LayerNorm or RMSNorm before attention multiplies every attention term by its Jacobian
``D_j = (P - n_j^T n_j / d) / sigma_j`` (``n_j`` the normalized input, ``P`` the centring
projector for LayerNorm, the identity for RMSNorm), recomputed from ``hook_resid_pre``; the
norm's gain is folded into ``W_Q``, ``W_K`` and ``W_V``, and the residual bypasses the norm.

Rotary embeddings (HookedTransformer) rotate q and k per position, ``q'_hp = M_p q_hp``:
the scores are made of the rotated vectors (hooks ``hook_rot_q``, ``hook_rot_k``), and the
key and query terms become ``W_K^h M_j^T q'_hp`` and ``W_Q^h M_p^T k'_hl`` (positions
``0 .. n-1``: no left-padding offsets).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from .. import closed_form as _closed_form
from .._errors import ShapeMismatchError
from .._hooks import SiteHook
from ..accumulators import SecondMoment
from ..sites import Site, _unwrap, select_positions
from ._mlp import _norm_weight
from ._names import _NORMS, _cfg, _layers, site_modules
from ._rotary import Rotary

_HOOKS = ("hook_q", "hook_k", "hook_v", "hook_pattern")
# TransformerLens normalizes q and k of these after their hooks (abstract_attention.py).
_QK_NORM_ARCHITECTURES = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")
_ELEMENTS = 2**21  # elements of the per-chunk Gram rows (and of the score tensors)


def attention_section_sites(
    model: nn.Module, layer: int, *, residual: bool = True
) -> tuple[str, str]:
    """The ``(input, output)`` sites matching :func:`attention_section`.

    The input is always ``blocks.L.hook_resid_pre`` (a LayerNorm/RMSNorm before attention is
    part of the section); the output is

    * ``residual=True`` (default): ``blocks.L.hook_resid_mid`` (``hook_resid_post`` in
      attention-only models), i.e. ``y = x + Attn(Norm(x))``;
    * ``residual=False``: ``blocks.L.hook_attn_out``, the attention layer alone.

    Raises:
        ValueError: For ``residual=True`` in a parallel block, or attention the closed form
            does not cover (see :func:`attention_section`).
    """
    (index,) = _layers(model, layer)
    cfg = _cfg(model)
    _check_attention(cfg)
    block = f"blocks.{index}"
    if not residual:
        return f"{block}.hook_resid_pre", f"{block}.hook_attn_out"
    if getattr(cfg, "parallel_attn_mlp", False):
        raise ValueError(
            "Parallel attention/MLP blocks (cfg.parallel_attn_mlp=True) add the MLP to the same "
            "residual: use residual=False (output hook_attn_out) or exact probes."
        )
    output = "hook_resid_post" if getattr(cfg, "attn_only", False) else "hook_resid_mid"
    return f"{block}.hook_resid_pre", f"{block}.{output}"


def _check_attention(cfg: Any) -> None:
    unsupported = {
        "use_dynamic_ntk_rope (rotary tables rescaled during the forward pass)": bool(
            getattr(cfg, "use_dynamic_ntk_rope", False)
        ),
        f"n_key_value_heads={getattr(cfg, 'n_key_value_heads', None)} (grouped-query attention)": (
            getattr(cfg, "n_key_value_heads", None) is not None
        ),
        "use_split_qkv_input / use_attn_in (per-head attention inputs)": bool(
            getattr(cfg, "use_split_qkv_input", False) or getattr(cfg, "use_attn_in", False)
        ),
        "use_qk_norm (a norm inside attention)": bool(getattr(cfg, "use_qk_norm", False))
        or getattr(cfg, "original_architecture", None) in _QK_NORM_ARCHITECTURES,
        f"clip_qkv={getattr(cfg, 'clip_qkv', None)}": getattr(cfg, "clip_qkv", None) is not None,
        "use_logn_attn": bool(getattr(cfg, "use_logn_attn", False)),
        "use_attention_sinks": bool(getattr(cfg, "use_attention_sinks", False)),
        f"attn_scores_soft_cap={getattr(cfg, 'attn_scores_soft_cap', -1.0)}": (
            (getattr(cfg, "attn_scores_soft_cap", -1.0) or -1.0) > 0
        ),
        "load_in_4bit": bool(getattr(cfg, "load_in_4bit", False)),
    }
    bad = [name for name, flag in unsupported.items() if flag]
    if bad:
        raise ValueError(
            f"The attention closed form does not cover {', '.join(bad)}: collect the Jacobians "
            "with exact probes (leave this section out of sections=)."
        )


@dataclass
class AttentionSection:
    """One attention layer of a TransformerLens model, as a closed-form section.

    Weights use the TransformerLens layout, in float64. Build it with
    :func:`attention_section`; ``build_bases`` runs :meth:`gram_pass` in place of the
    backward passes of the section's input site.

    Attributes:
        w_q, w_k, w_v: ``(n_heads, d_in, d_head)`` (a norm's gain folded in).
        w_o: ``(n_heads, d_head, d_out)``.
        scale: Attention scores are ``q . k / scale``.
        residual: ``y = x + Attn(Norm(x))`` (``d_in == d_out``).
        source, target: The section's input and output site names.
        hooks: Names of the layer's ``q``, ``k``, ``v`` and pattern hooks.
        norm: The norm before attention: ``None``, ``"LN"``, ``"LNPre"``, ``"RMS"`` or
            ``"RMSPre"`` (its Jacobian is recomputed from the input captured at ``source``).
        eps: The norm's epsilon.
        rotary: The rotary embedding of q and k (``hooks`` then name ``hook_rot_q`` and
            ``hook_rot_k``, the rotated vectors the scores are made of).
    """

    w_q: torch.Tensor
    w_k: torch.Tensor
    w_v: torch.Tensor
    w_o: torch.Tensor
    scale: float
    residual: bool
    source: str
    target: str
    hooks: tuple[str, ...]
    norm: str | None = None
    eps: float = 1e-5
    rotary: Rotary | None = None

    @property
    def d_in(self) -> int:
        """Width of the input site."""
        return self.w_q.shape[1]

    @property
    def _captures(self) -> tuple[str, ...]:
        """The hooks a forward pass must fire: q, k, v, pattern, the input with a norm, and the
        unrotated q with rotary embeddings (to check the positions the model rotated by)."""
        extra = () if self.norm is None else (self.source,)
        if self.rotary is not None:
            extra += (self.hooks[0].replace("hook_rot_q", "hook_q"),)
        return (*self.hooks, *extra)

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
            # ds_hpl/dx_p = W_Q^h M_p^T k_hl / scale, M_t the rotation at position t.
            n_pos = v.shape[1]
            key_at = self.rotary.unrotate(q[:, outputs, None], inputs[None, :])  # (b,P,K,h,e)
            keys = torch.einsum("hie,bpkhe->bpkhi", w_k, key_at) / self.scale
            lhs = g[:, :, :, inputs].permute(0, 1, 3, 4, 2)  # (b, P, K, r, h)
            rows.view(-1, r, d_in).baddbmm_(
                lhs.reshape(-1, r, n_heads), keys.reshape(-1, n_heads, d_in)
            )
            for p_index, k_index in diagonal:
                position = outputs[p_index].expand(n_pos)
                query_at = self.rotary.unrotate(k, position)  # (b, l, h, e)
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

    def _check_positions(self, rotated: torch.Tensor, plain: torch.Tensor) -> None:
        """Refuse a batch whose q was rotated at other positions than ``0 .. n-1``."""
        plain = plain.reshape(rotated.shape)
        error = (self.rotary.rotate(plain) - rotated).abs().max()  # type: ignore[union-attr]
        if error > 1e-4 * rotated.abs().max():
            raise ValueError(
                "The model rotated q and k at positions other than 0, 1, ..., n-1 (left "
                "padding with an attention_mask, or a key-value cache): the rotary closed form "
                "assumes plain positions. Run the section without attention_mask/cache, or "
                "use exact probes."
            )

    def _through_norm(self, rows: torch.Tensor, x: torch.Tensor) -> None:
        """``rows <- rows D`` in place, ``D = (P - n^T n / d) / sigma`` the norm's Jacobian.

        ``n = c / sigma`` is the normalized input, ``c`` the input (centred for LayerNorm,
        ``P`` then the centring projector, else ``P = I``), ``sigma = sqrt(mean(c^2) + eps)``;
        ``D`` is symmetric, so it acts on the Gram rows from the right.
        """
        centred = self.norm in ("LN", "LNPre")
        if centred:
            x = x - x.mean(-1, keepdim=True)
        sigma = (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()  # (b, K, 1)
        normalized = (x / sigma)[:, None, :, None, :]  # (b, 1, K, 1, d_in)
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
        progress: bool = True,
    ) -> SecondMoment:
        """One forward pass over ``data``: the Jacobian Gram of ``site`` read through ``target``.

        Equal to the Gram ``dh.collect(model, [site], jacobians="exact", target=target,
        readout=readout)`` accumulates, without a backward pass (runs under ``no_grad``).

        Args:
            model: The model the section was built from.
            data: Batches (``forward(model, batch)``, default ``model(batch)``).
            site: The section's input (its positions are the samples).
            target: The section's output (each of its positions and read-out features is
                one probe, as in exact probes).
            readout: ``(d_out, r)``; identity when ``None``.
            forward: ``forward(model, batch) -> output``.
            progress: Show a tqdm progress bar.

        Returns:
            The Gram as a :class:`~degen_hooks.SecondMoment` over the site's samples.
        """
        from tqdm.auto import tqdm

        prefix = _unwrap(model)[1]
        if (unprefixed(site, prefix), unprefixed(target, prefix)) != (self.source, self.target):
            raise ShapeMismatchError(
                f"This attention section maps {self.source!r} -> {self.target!r}, but was asked "
                f"for {site.name!r} -> {target.name!r}: build it for the right layer "
                "(attention_section_sites(model, layer, residual=...) gives its sites)."
            )
        d_out = self.w_o.shape[2]
        if readout is None:
            readout = torch.eye(d_out, dtype=torch.float64)
        if readout.ndim != 2 or readout.shape[0] != d_out:
            raise ShapeMismatchError(
                f"Readout of shape {tuple(readout.shape)} cannot read {self.target!r} of width "
                f"{d_out}: it must be a (d_out, r) = ({d_out}, r) matrix."
            )
        gram = SecondMoment()
        captured: dict[str, torch.Tensor] = {}
        scratch: dict[str, torch.Tensor] = {}  # the rows buffer, reused across batches
        modules = site_modules(_unwrap(model)[0])
        call = forward or (lambda model, batch: model(batch))
        with ExitStack() as stack:
            for name in self._captures:

                def keep(act: torch.Tensor, name: str = name) -> None:
                    captured[name] = act.detach()

                stack.enter_context(SiteHook(model, Site(name), modules[name], keep))
            total = len(data) if hasattr(data, "__len__") else None  # type: ignore[arg-type]
            for batch in tqdm(
                data,
                desc=f"jacobians {site.key} (closed form)",
                total=total,
                disable=not progress,
                leave=False,
            ):
                captured.clear()
                with torch.no_grad():
                    call(model, batch)
                self._update(gram, captured, readout, site, target, scratch)
        return gram

    def _update(
        self,
        gram: SecondMoment,
        captured: dict[str, torch.Tensor],
        readout: torch.Tensor,
        site: Site,
        target: Site,
        scratch: dict[str, torch.Tensor],
    ) -> None:
        missing = [name for name in self._captures if name not in captured]
        if missing:
            raise RuntimeError(
                f"The forward pass never reached {missing}: the attention section needs the "
                "layer's q, k, v and pattern hooks to fire on every batch."
            )
        f64 = torch.float64
        n_heads, d_head = self.w_q.shape[0], self.w_q.shape[2]
        q, k, v = (
            captured[name].to(f64).reshape(*captured[name].shape[:2], n_heads, d_head)
            for name in self.hooks[:3]
        )
        pattern = captured[self.hooks[3]].to(f64)
        x = captured[self.source].to(f64) if self.norm is not None else None
        if self.rotary is not None:
            self._check_positions(q, captured[self._captures[-1]].to(f64))
        readout = readout.to(q.device, f64)
        n_pos = v.shape[1]
        inputs = _positions(site, n_pos, q.device)
        outputs, weights = _positions(target, n_pos, q.device).unique(return_counts=True)
        weights = weights.to(f64)
        per_sample = len(outputs) * len(inputs) * readout.shape[1] * self.d_in
        step = max(1, _ELEMENTS // max(per_sample, n_heads * len(outputs) * n_pos * d_head))
        size = min(step, v.shape[0]) * per_sample
        buffer = scratch.get("rows")
        if buffer is None or buffer.numel() < size or buffer.device != q.device:
            buffer = scratch["rows"] = torch.empty(size, dtype=f64, device=q.device)
        for start in range(0, v.shape[0], step):
            part = slice(start, start + step)
            rows = self.jacobian_rows(
                q[part], k[part], v[part], pattern[part], readout, inputs, outputs, weights,
                buffer, None if x is None else x[part],
            )  # fmt: skip
            gram.update(rows.view(-1, self.d_in), count=rows.shape[0] * len(inputs))

    # -- interaction-graph edges ----------------------------------------------------------------
    def edge_reads(self, site: Site, target: Site | None) -> dict[str, Site]:
        """What :meth:`edge_batch` reads in the graph's forward pass, by role.

        The section's input (the whole activation, every position), the layer's q, k, v and
        pattern, and with rotary embeddings the unrotated q (to check the positions).

        Args:
            site: The graph layer at the section's input.
            target: The graph layer at its output.

        Raises:
            ShapeMismatchError: If the layers are not this section's input and output.
        """
        names = (site.name, None if target is None else target.name)
        if names != (self.source, self.target):
            raise ShapeMismatchError(
                f"This attention section maps {self.source!r} -> {self.target!r}, but was asked "
                f"for the edges of {names[0]!r} -> {names[1]!r}: build it for the right layer "
                "(attention_section_sites(model, layer, residual=...) gives its sites)."
            )
        roles = zip("qkvp", self.hooks, strict=True)
        reads = {"x": site, **{role: Site(name) for role, name in roles}}
        if self.rotary is not None:
            reads["plain_q"] = Site(self.hooks[0].replace("hook_rot_q", "hook_q"))
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
        """Interaction-graph edges of one batch (lib_math §7.1), without a backward pass.

        From one forward pass of the model (``reads``, see :meth:`edge_reads`), each
        integration point ``alpha_k`` moves the layer to the rewritten input ``x_k = alpha_k
        f C_pinv + mu`` (at the input's positions, as the backward path writes it) without
        running the model: q, k and v are affine in the (normalized) input, ``q_k = q +
        (n(x_k) - n(x)) W_Q`` (rotated by the same per-position rotations), and the pattern
        is ``softmax(log A + (q_k k_k^T - q k^T) / scale)`` (masks, ALiBi and other constant
        score terms stay in ``log A``). The Jacobian rows of :meth:`jacobian_rows`, taken
        with the weights projected on the input features (``W -> C_pinv W``; through the
        norm first when there is one), are ``d f'_{t,i} / d f_{s,j}`` directly, and
        ``E_ij = sum_{b,t} (sum_s f_sj sum_k w_k d f'_{t,i} / d f_{s,j} |_k)^2``, in chunks
        of samples and output positions of about ``elements`` elements.

        Args:
            reads: The tensors :meth:`edge_reads` names, read in one forward pass.
            src: The input node layer (a graph ``NodeLayer``: ``site``, ``features``,
                ``write``, ``pinv``, ``positions_of``) at this section's input.
            dst: The output node layer (``key``, ``rotation``, ``positions_of``).
            alphas: Integration points ``alpha_k``.
            weights: Integration weights ``w_k``.
            signs: ``signs(shape, device)`` draws the stochastic sources, shape
                ``(n_sources, batch, n_out_positions, 1)``; ``None`` for exact edges.
            elements: Most elements of a chunk's temporaries (default
                ``degen_hooks.closed_form.EDGE_ELEMENTS``).

        Returns:
            ``(E, n_rows)``: ``E`` of shape ``(r_next, r)``, float64, summed over the batch
            (divide by the rows), and the input rows ``batch * n_in_positions``.

        Raises:
            ShapeMismatchError: If the output layer's read-out does not fit the section.
            ValueError: For rotary embeddings applied at shifted positions (left padding).
        """
        f64 = torch.float64
        elements = _closed_form.EDGE_ELEMENTS if elements is None else elements
        n_heads, d_head = self.w_q.shape[0], self.w_q.shape[2]
        act = reads["x"]
        x = src.site.features_last(act).to(f64)  # (b, pos, d_in)
        f = src.features(act)  # (b, K, r)
        device = f.device
        q, k, v = (reads[role].to(f64).reshape(*x.shape[:2], n_heads, d_head) for role in "qkv")
        pattern = reads["p"].to(f64)
        if self.rotary is not None:
            self._check_positions(q, reads["plain_q"].to(f64))
        inputs, outputs = src.positions_of(act), dst.positions_of(act)
        d_out = self.w_o.shape[2]
        readout = dst.rotation
        readout = torch.eye(d_out, dtype=f64) if readout is None else readout.detach().to(f64)
        if readout.ndim != 2 or readout.shape[0] != d_out:
            raise ShapeMismatchError(
                f"Layer {dst.key!r} reads {self.target!r} (width {d_out}) through a "
                f"{tuple(readout.shape)} matrix: it must be (d_out, r) = ({d_out}, r)."
            )
        readout = readout.to(device)
        readin = src.pinv
        readin = None if readin is None else readin.detach().to(device=device, dtype=f64)
        drawn = None if signs is None else signs((f.shape[0], len(outputs), 1), device)

        def moved(part: slice) -> list[tuple[torch.Tensor, ...]]:
            """The layer at each integration point, for the samples ``part``."""
            out = []
            for alpha in alphas:
                written = src.write(act[part], alpha * f[part])
                rewritten = src.site.features_last(written).to(f64)
                rows = None if self.norm is not None else outputs  # the direct sums' rows
                out.append(
                    self._moved(rewritten, x[part], q[part], k[part], v[part], pattern[part], rows)
                )
            return out

        edges = self._edge_sums(
            moved, f, x.shape[1], readin, readout, inputs, outputs, weights, drawn, elements
        )
        return edges, f.shape[0] * f.shape[1]

    def _normalized(self, x: torch.Tensor) -> torch.Tensor:
        """The norm's output before its gain (``x`` itself without a norm)."""
        if self.norm is None:
            return x
        if self.norm in ("LN", "LNPre"):
            x = x - x.mean(-1, keepdim=True)
        return x / (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()

    def _moved(
        self,
        x_new: torch.Tensor,
        x: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        pattern: torch.Tensor,
        rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """``(q, k, v, pattern, x)`` of the layer at the input ``x_new`` (``(b, pos, d_in)``),
        from its values at ``x``: q, k and v are affine in the normalized input, and the
        scores change by ``(q' k'^T - q k^T) / scale`` (see :meth:`edge_batch`). With
        ``rows`` (query positions), q and the pattern only at those rows."""
        change = self._normalized(x_new) - self._normalized(x)
        n, n_pos, d_in = change.shape
        # One product for q, k and v: (b pos, d_in) x (d_in, 3 h e).
        weights = torch.cat(
            [w.to(x.device).transpose(0, 1) for w in (self.w_q, self.w_k, self.w_v)], 1
        )
        shifts = (change.reshape(-1, d_in) @ weights.reshape(d_in, -1)).view(
            n, n_pos, 3, *q.shape[2:]
        )
        shift_q, shift_k = shifts[:, :, 0], shifts[:, :, 1]
        if self.rotary is not None:  # rotated vectors: the rotation is linear
            shift_q, shift_k = self.rotary.rotate(shift_q), self.rotary.rotate(shift_k)
        if rows is not None:
            q, shift_q, pattern = q[:, rows], shift_q[:, rows], pattern[:, :, rows]
        q_new, k_new, v_new = q + shift_q, k + shift_k, v + shifts[:, :, 2]
        scores = torch.einsum("bqhe,bkhe->bhqk", q_new, k_new)
        scores -= torch.einsum("bqhe,bkhe->bhqk", q, k)
        # Masked keys have A = 0, log A = -inf: they stay masked. A query that sees no key
        # (a row of -inf) gets a zero row, as TransformerLens sets its NaNs to zero.
        pattern_new = torch.softmax(pattern.log() + scores / self.scale, dim=-1).nan_to_num(0.0)
        return q_new, k_new, v_new, pattern_new, x_new

    def _edge_sums(
        self,
        moved: Callable[[slice], list[tuple[torch.Tensor, ...]]],
        f: torch.Tensor,
        n_keys: int,
        readin: torch.Tensor | None,
        readout: torch.Tensor,
        inputs: torch.Tensor,
        outputs: torch.Tensor,
        weights: Sequence[float],
        signs: torch.Tensor | None,
        elements: int,
    ) -> torch.Tensor:
        """Edge sums from the layer's ``(q, k, v, pattern, x)`` at each integration point
        (``moved(samples)`` gives them for a chunk of samples).

        Without a norm, every ``d_in`` index of the rows comes from ``W_Q``, ``W_K`` or
        ``W_V`` (or the skip connection), so ``C_pinv W`` replaces ``W`` and the sum over
        input positions is taken inside the products (:meth:`_direct_attributions`). A norm
        acts on ``d_in`` between them: the rows of :meth:`jacobian_rows` are formed in
        ``d_in``, taken through the norm and projected (:meth:`_rows_attributions`).
        """
        f64 = torch.float64
        device = f.device
        n_heads, d_head = self.w_q.shape[0], self.w_q.shape[2]
        r, r_next = f.shape[-1], readout.shape[1]
        weight = torch.as_tensor(list(weights), dtype=f64, device=device)
        skip = None
        if self.residual:  # d y_t / d x_t = I: R^T, in feature coordinates (C_pinv R)^T
            skip = weight.sum() * (readout.T if readin is None else (readin @ readout).T)
        n = f.shape[0]
        n_in, n_out = len(inputs), len(outputs)
        # The input features at each key position (summed where an input repeats), and at
        # each output position (where it is an input too: the query and skip terms).
        spread = torch.zeros(n, n_keys, r, dtype=f64, device=device).index_add_(1, inputs, f)
        at_output = spread[:, outputs]
        if self.norm is None:
            section = self
            if readin is not None:
                w_q, w_k, w_v = (
                    torch.einsum("ja,hae->hje", readin, w.to(device))
                    for w in (self.w_q, self.w_k, self.w_v)
                )
                section = replace(self, w_q=w_q, w_k=w_k, w_v=w_v)
            wor = torch.einsum("hed,dr->her", section.w_o.to(device), readout)  # W_O^h R
            values = torch.einsum("hje,her->hrj", section.w_v.to(device), wor)  # (h, r', r)
            per_output = n_heads * n_keys * (r_next + 2 * r + d_head) + 2 * r_next * r
        else:
            per_output = n_in * r_next * (self.d_in + r) + n_heads * n_keys * (r_next + d_head)
        # Chunks of samples and output positions: memory O(elements), not O(samples).
        out_step = max(1, min(n_out, elements // per_output))
        step = max(1, elements // (per_output * out_step))
        edges = torch.zeros(r_next, r, dtype=f64, device=device)
        for start in range(0, n, step):
            part = slice(start, start + step)
            layers = moved(part)
            mixed = None
            for first in range(0, n_out, out_step):
                block = slice(first, first + out_step)
                attribution = None
                for (q, k, v, pattern, x), w in zip(layers, weight, strict=True):
                    if self.norm is None:
                        term = section._direct_attributions(  # q, pattern: output rows
                            q[:, block], k, v, pattern[:, :, block], wor, values, spread[part],
                            at_output[part, block], outputs[block],
                        )  # fmt: skip
                    else:
                        term = self._rows_attributions(
                            q, k, v, pattern, x, readin, readout, inputs, outputs[block],
                            f[part],
                        )  # fmt: skip
                    if attribution is None:
                        attribution = term if float(w) == 1.0 else term.mul_(w)
                    else:
                        attribution.add_(term, alpha=float(w))
                if skip is not None:
                    attribution.addcmul_(at_output[part, block, None, :], skip)
                if signs is None:
                    edges += attribution.square_().sum((0, 1))
                else:  # output positions mixed by signs before squaring: sum the blocks
                    term = torch.einsum("sbp,bpij->sbij", signs[:, part, block, 0], attribution)
                    mixed = term if mixed is None else mixed + term
            if mixed is not None:
                edges += mixed.square().sum((0, 1))
        return edges

    def _direct_attributions(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        pattern: torch.Tensor,
        wor: torch.Tensor,
        values: torch.Tensor,
        spread: torch.Tensor,
        at_output: torch.Tensor,
        outputs: torch.Tensor,
    ) -> torch.Tensor:
        """``sum_s d f'_{p,i} / d f_{s,j} f_{s,j}``, shape ``(b, P, r', r)``, without a norm.

        ``q`` and ``pattern`` hold the output rows ``outputs`` only. The section's ``W_Q``,
        ``W_K``, ``W_V`` are already projected on the input features (``d_in`` is ``r``);
        ``spread`` holds the features at each key position ``(b, L, r)`` and ``at_output``
        at each output position ``(b, P, r)``. The skip
        connection is left out. With ``g_hpli = A_hpl (v_hl - z_hp) W_O^h R`` (how the
        score ``s_hpl`` moves ``y_p``):

        * values: ``sum_h (sum_l A_hpl f_l) (W_V^h W_O^h R)``;
        * keys and queries, one batched product over ``(h, l)``: ``sum_hl g_hpli
          (key_hpl f_l + query_hpl f_p)``, ``key = W_K^h q_hp / scale`` (rotated back to
          ``l``), ``query = W_Q^h k_hl / scale`` (rotated back to ``p``).
        """
        n, n_heads, n_keys = q.shape[0], q.shape[2], v.shape[1]
        n_out, r_next, r = len(outputs), wor.shape[2], self.d_in
        a = pattern  # (b, h, P, L): the output rows
        vw = torch.einsum("blhe,her->bhlr", v, wor)  # (b, h, L, r')
        zw = a @ vw  # z_hp W_O^h R: (b, h, P, r')
        g = a[..., None] * (vw[:, :, None] - zw[:, :, :, None])  # (b, h, P, L, r')
        w_q, w_k = self.w_q.to(q.device), self.w_k.to(q.device)
        if self.rotary is None:
            keys = torch.einsum("hje,bphe->bphj", w_k, q) / self.scale
            queries = torch.einsum("hje,blhe->bhlj", w_q, k) / self.scale
            rhs = keys[:, :, :, None] * spread[:, None, None]  # (b, P, h, L, r)
            rhs += queries[:, None] * at_output[:, :, None, None]
        else:  # q and k rotated: back to the key position l, and to the query position p
            every = torch.arange(n_keys, device=q.device)
            key_at = self.rotary.unrotate(q[:, :, None], every[None, :])  # (b, P, L, h, e)
            keys = torch.einsum("hje,bplhe->bphlj", w_k, key_at) / self.scale
            query_at = self.rotary.unrotate(k[:, None], outputs[:, None].expand(-1, n_keys))
            queries = torch.einsum("hje,bplhe->bphlj", w_q, query_at) / self.scale
            rhs = keys * spread[:, None, None] + queries * at_output[:, :, None, None]
        lhs = g.permute(0, 2, 4, 1, 3).reshape(n * n_out, r_next, n_heads * n_keys)
        attribution = torch.bmm(lhs, rhs.reshape(n * n_out, n_heads * n_keys, r))
        attribution = attribution.view(n, n_out, r_next, r)
        mixed = a @ spread[:, None]  # sum_l A_hpl f_l: (b, h, P, r)
        for head in range(n_heads):
            attribution.addcmul_(mixed[:, head, :, None, :], values[head])
        return attribution

    def _rows_attributions(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        pattern: torch.Tensor,
        x: torch.Tensor,
        readin: torch.Tensor | None,
        readout: torch.Tensor,
        inputs: torch.Tensor,
        outputs: torch.Tensor,
        f: torch.Tensor,
    ) -> torch.Tensor:
        """As :meth:`_direct_attributions`, through the norm: the rows of
        :meth:`jacobian_rows` (``(b, P, K, r', d_in)``, skip left out), projected on the
        input features and summed over input positions."""
        ones = torch.ones(len(outputs), dtype=q.dtype, device=q.device)
        rows = replace(self, residual=False).jacobian_rows(
            q, k, v, pattern, readout, inputs, outputs, ones, None, x
        )
        if readin is not None:
            rows = rows @ readin.T
        return torch.einsum("bpkij,bkj->bpij", rows, f)


def unprefixed(site: Site, prefix: str) -> str:
    """The site's name without DDP's ``module.`` prefix (both name the same site)."""
    return site.name[len(prefix) :] if prefix and site.name.startswith(prefix) else site.name


def _positions(site: Site, n_pos: int, device: torch.device) -> torch.Tensor:
    """The positions ``site`` keeps, as an index tensor (the same for every sample)."""
    steps = torch.arange(n_pos, dtype=torch.float64, device=device)[None, :, None]
    return select_positions(steps, site.positions, None, site.key).flatten().long()


def _scale(model: nn.Module, index: int, cfg: Any) -> float:
    """The divisor of the attention scores (``attn.attn_scale``, else from the config)."""
    scale = getattr(_unwrap(model)[0].blocks[index].attn, "attn_scale", None)
    if isinstance(scale, (int, float)):
        return float(scale)
    if not getattr(cfg, "use_attn_scale", True):
        return 1.0
    scale = getattr(cfg, "attn_scale", None)
    scale = math.sqrt(cfg.d_head) if scale is None or scale <= 0 else float(scale)
    if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
        scale *= index + 1
    return scale


def attention_section(model: nn.Module, layer: int, *, residual: bool = True) -> AttentionSection:
    """The closed-form :class:`AttentionSection` of one block's attention layer.

    Pass it to ``build_bases(..., sections={input_site: (section, None)})`` to replace the
    backward passes of the input site by one forward pass (see the module docstring for the
    formula); :func:`attention_section_sites` gives the two sites.

    Args:
        model: A TransformerLens model (``HookedTransformer`` or ``TransformerBridge``).
        layer: The block.
        residual: ``True`` (default) for ``hook_resid_pre -> hook_resid_mid``.

    Raises:
        ValueError: As :func:`attention_section_sites`; for grouped-query attention, QK
            norms, soft caps and other attention the formula does not cover, and for rotary
            embeddings on a bridge (which keeps no rotary tables).
    """
    source, target = attention_section_sites(model, layer, residual=residual)
    (index,) = _layers(model, layer)
    cfg = _cfg(model)
    attn = _unwrap(model)[0].blocks[index].attn
    w_q, w_k, w_v, w_o = (getattr(attn, f"W_{n}").detach().to(torch.float64) for n in "QKVO")
    gain = _norm_weight(model, index, cfg, "ln1")
    if gain is not None:  # q = (n * gain + bias) W_Q + b_Q: the gain scales W_Q's rows
        w_q, w_k, w_v = (w * gain.to(w)[None, :, None] for w in (w_q, w_k, w_v))
    norm = getattr(cfg, "normalization_type", None)
    rotary, hooks = None, _HOOKS
    if getattr(cfg, "positional_embedding_type", "standard") == "rotary":
        if not isinstance(getattr(attn, "rotary_cos", None), torch.Tensor):
            raise ValueError(
                f"Block {index}'s attention has no rotary_cos/rotary_sin tables (a "
                "TransformerBridge): rotary attention has a closed form on HookedTransformer "
                "models only. Use exact probes."
            )
        rotary = Rotary(
            cos=attn.rotary_cos.detach().to(torch.float64).clone(),
            sin=attn.rotary_sin.detach().to(torch.float64).clone(),
            adjacent_pairs=bool(getattr(cfg, "rotary_adjacent_pairs", False)),
        )
        hooks = ("hook_rot_q", "hook_rot_k", "hook_v", "hook_pattern")
    return AttentionSection(
        w_q=w_q.clone(),
        w_k=w_k.clone(),
        w_v=w_v.clone(),
        w_o=w_o.clone(),
        scale=_scale(model, index, cfg),
        residual=residual,
        source=source,
        target=target,
        hooks=tuple(f"blocks.{index}.attn.{name}" for name in hooks),
        norm=norm if norm in _NORMS else None,
        eps=float(getattr(cfg, "eps", 1e-5)),
        rotary=rotary,
    )
