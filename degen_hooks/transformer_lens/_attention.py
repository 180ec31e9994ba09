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
cost (one forward pass instead of one backward pass per probe). ``gram_pass`` takes the
Gram from its pieces instead (``_attention_gram``, rotary embeddings included: the rows of
every (output, input) pair are never formed, only those where the input is the output).
:meth:`AttentionSection.jacobian_rows` keeps the rows (the edges and the tests use them).

A LayerNorm or RMSNorm before attention multiplies every attention term by its Jacobian
``D_j = (P - n_j^T n_j / d) / sigma_j`` (``n_j`` the normalized input, ``P`` the centring
projector for LayerNorm, the identity for RMSNorm), recomputed from ``hook_resid_pre``; the
norm's gain is folded into ``W_Q``, ``W_K`` and ``W_V``, and the residual bypasses the norm.

Rotary embeddings rotate q and k per position, ``q'_hp = M_p q_hp``: the scores are made of
the rotated vectors, and the key and query terms become ``W_K^h M_j^T q'_hp`` and
``W_Q^h M_p^T k'_hl`` (positions ``0 .. n-1``: no left-padding offsets). A HookedTransformer
hooks the rotated vectors (``hook_rot_q``, ``hook_rot_k``); on a TransformerBridge the section
rotates ``hook_q`` and ``hook_k`` itself, by the tables :func:`._rotary.bridge_rotary` finds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._errors import ShapeMismatchError
from .._hooks import SiteHook
from ..accumulators import SecondMoment
from ..sites import Site, _unwrap, select_positions
from ._attention_edges import AttentionEdges, _heads
from ._attention_gram import accumulate
from ._mlp import _norm_weight
from ._names import _NORMS, _cfg, _layers, site_modules
from ._rotary import Rotary, bridge_rotary, hf_scale

_HOOKS = ("hook_q", "hook_k", "hook_v", "hook_pattern")
# TransformerLens normalizes q and k of these after their hooks (abstract_attention.py).
_QK_NORM_ARCHITECTURES = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")


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
class AttentionSection(AttentionEdges):
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
            ``hook_rot_k``, the rotated vectors the scores are made of, unless ``rotates``).
        rotates: ``hooks`` name the unrotated q and k (a ``TransformerBridge``): each batch
            rotates them by ``rotary`` and checks the model's pattern against them.
        rotary_tables: The hooks of the ``(cos, sin)`` tables a Hugging Face model passes the
            layer (a bridge): each forward pass's tables make that batch's ``rotary``.
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
    rotates: bool = False
    rotary_tables: tuple[str, ...] = ()

    @property
    def d_in(self) -> int:
        """Width of the input site."""
        return self.w_q.shape[1]

    @property
    def _captures(self) -> tuple[str, ...]:
        """The hooks a forward pass must fire: q, k, v, pattern, the input with a norm, the
        rotary tables a bridge reads, and a HookedTransformer's unrotated q with rotary
        embeddings (to check the positions the model rotated by)."""
        extra = () if self.norm is None else (self.source,)
        if self.rotary is not None and not self.rotates:
            extra += (self.hooks[0].replace("hook_rot_q", "hook_q"),)
        return (*self.hooks, *extra, *self.rotary_tables)

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
                self._update(gram, captured, readout, site, target)
        return gram

    def _update(
        self,
        gram: SecondMoment,
        captured: dict[str, torch.Tensor],
        readout: torch.Tensor,
        site: Site,
        target: Site,
    ) -> None:
        missing = [name for name in self._captures if name not in captured]
        if missing:
            raise RuntimeError(
                f"The forward pass never reached {missing}: the attention section needs the "
                "layer's q, k, v and pattern hooks to fire on every batch."
            )
        f64 = torch.float64
        n_heads, d_head = self.w_q.shape[0], self.w_q.shape[2]
        q, k, v = (_heads(captured[name], n_heads, d_head) for name in self.hooks[:3])
        pattern = captured[self.hooks[3]].to(f64)
        x = captured[self.source].to(f64) if self.norm is not None else None
        plain = self.hooks[0].replace("hook_rot_q", "hook_q")
        plain_q = captured[plain].to(f64) if plain in captured else None
        tables = tuple(captured[name] for name in self.rotary_tables)
        dtype = captured[self.hooks[3]].dtype
        section, q, k = self._for_batch(q, k, pattern, plain_q, tables, dtype)
        n_pos = v.shape[1]
        inputs = _positions(site, n_pos, q.device)
        outputs, weights = _positions(target, n_pos, q.device).unique(return_counts=True)
        accumulate(section, gram, q, k, v, pattern, x, readout, inputs, outputs, weights)


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

    Rotary attention is covered on both families: a HookedTransformer's rotary tables, a
    native bridge's fixed ones, or the ``(cos, sin)`` a Hugging Face model passes a bridge's
    attention in each forward pass (see :func:`._rotary.bridge_rotary`). Grouped-query
    attention repeats each key/value head for its query heads.

    Raises:
        ValueError: As :func:`attention_section_sites`; for QK norms, soft caps, dynamic NTK
            tables on a HookedTransformer and other attention the formula does not cover;
            on a bridge, for rotary it cannot follow exactly (adjacent pairs rotated in
            float32, a norm or a multiplier between the q/k projection and the rotation,
            attention sinks, rotation inside a wrapped module that passes no tables).
            ``gram_pass`` raises when a batch was rotated at positions other than
            ``0 .. n-1`` (left padding, position_ids, a cache).
    """
    source, target = attention_section_sites(model, layer, residual=residual)
    (index,) = _layers(model, layer)
    cfg = _cfg(model)
    attn = _unwrap(model)[0].blocks[index].attn
    w_q, w_k, w_v, w_o = (getattr(attn, f"W_{n}").detach().to(torch.float64) for n in "QKVO")
    # Grouped-query attention: a bridge keeps n_key_value_heads key/value weights, each
    # serving n_heads / n_key_value_heads consecutive query heads.
    w_k, w_v = (w.repeat_interleave(w_q.shape[0] // w.shape[0], dim=0) for w in (w_k, w_v))
    gain = _norm_weight(model, index, cfg, "ln1")
    if gain is not None:  # q = (n * gain + bias) W_Q + b_Q: the gain scales W_Q's rows
        w_q, w_k, w_v = (w * gain.to(w)[None, :, None] for w in (w_q, w_k, w_v))
    norm = getattr(cfg, "normalization_type", None)
    rotary, hooks, tables = None, _HOOKS, ()
    rotates = getattr(cfg, "positional_embedding_type", "standard") == "rotary" and not (
        isinstance(getattr(attn, "rotary_cos", None), torch.Tensor)
    )
    if rotates:  # a TransformerBridge: it rotates hook_q and hook_k, by these tables
        rotary, tables = bridge_rotary(attn, cfg, index)
    elif getattr(cfg, "positional_embedding_type", "standard") == "rotary":
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
        scale=_scale(model, index, cfg) if not tables else hf_scale(attn),
        residual=residual,
        source=source,
        target=target,
        hooks=tuple(f"blocks.{index}.attn.{name}" for name in hooks),
        norm=norm if norm in _NORMS else None,
        eps=float(getattr(cfg, "eps", 1e-5)),
        rotary=rotary,
        rotates=rotates,
        rotary_tables=tables,
    )
