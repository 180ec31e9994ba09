"""Closed-form sections of language-model blocks: norms, gated MLPs, MLP-internal sites (#16).

Part of :mod:`degen_hooks.transformer_lens`; see its docstring. Each builder reads a
TransformerLens model's weights (``HookedTransformer`` or ``TransformerBridge``, TransformerLens
layout) into a :class:`~degen_hooks.normed_section.NormedMLPSection` or a linear
:class:`~degen_hooks.MLPSection`:

* :func:`block_mlp_section`: ``hook_resid_mid`` to ``hook_resid_post`` (the residual MLP after
  its norm), ``mlp.hook_pre`` or ``mlp.hook_post`` (the norm and the input projection, with
  the activation for ``hook_post``), for plain and gated MLPs;
* :func:`mlp_output_section`: ``mlp.hook_post`` (or, plain MLPs, ``mlp.hook_pre``) to
  ``hook_resid_post``;
* :func:`unembed_section`: the last ``hook_resid_post`` to the logits, through the final norm.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._weights import float64_copy
from ..closed_form import MLPSection
from ..normed_section import NormedMLPSection
from ..sites import Site, _unwrap
from ._mlp import _check_mlp, _norm_weight, elementwise_activation, norm_gain
from ._names import _NORMS, _cfg, _layers

F64 = torch.float64
_ROLES = ("hook_resid_post", "hook_pre", "hook_post")


def _norm_kind(cfg: Any) -> str | None:
    kind = getattr(cfg, "normalization_type", None)
    if kind not in _NORMS:
        return None
    return "LN" if kind.startswith("LN") else "RMS"


def _norm_bias(module: nn.Module, cfg: Any) -> torch.Tensor | None:
    """A LayerNorm's bias ``beta`` (``None``: RMSNorm or parameter-free)."""
    if getattr(cfg, "normalization_type", None) != "LN":
        return None
    for name in ("b", "bias"):  # HookedTransformer, TransformerBridge
        bias = getattr(module, name, None)
        if isinstance(bias, torch.Tensor):
            return float64_copy(bias)
    return None


def _tensor(module: nn.Module, name: str) -> torch.Tensor | None:
    value = getattr(module, name, None)
    return float64_copy(value) if isinstance(value, torch.Tensor) else None


def _check_no_projection_bias(mlp: nn.Module, d_mlp: int, index: int) -> None:
    for name, module in mlp.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == d_mlp:
            if module.bias is not None:
                raise ValueError(
                    f"Block {index}'s gated MLP has a bias in {name!r}: the gated closed form "
                    "takes projections without biases. Use jacobians='exact'."
                )


def block_mlp_section(model: nn.Module, layer: int, *, output: str) -> NormedMLPSection:
    """The block's norm and MLP from ``blocks.L.hook_resid_mid`` to ``output``.

    Args:
        model: A TransformerLens model.
        layer: The block.
        output: ``"hook_resid_post"`` (``y = x + MLP(norm(x))``), ``"hook_pre"`` (the
            pre-activations; the gate's in a gated MLP) or ``"hook_post"`` (the activations).

    Returns:
        A :class:`~degen_hooks.normed_section.NormedMLPSection` in float64; its
        ``gram_pass`` replaces the backward passes of ``hook_resid_mid``.

    Raises:
        ValueError: For an unknown ``output``, a block without a plain or gated MLP (attention
            only, mixture of experts, parallel attention and MLP), or an activation without
            a closed form.
    """
    if output not in _ROLES:
        raise ValueError(f"output must be one of {_ROLES}, got {output!r}.")
    (index,) = _layers(model, layer)
    cfg = _cfg(model)
    _check_mlp(cfg, gated_ok=True)
    block = _unwrap(model)[0].blocks[index]
    mlp, gated = block.mlp, bool(getattr(cfg, "gated_mlp", False))
    activation = elementwise_activation(cfg, index)
    w_up = float64_copy(mlp.W_in).T  # (d_mlp, d_model)
    if gated:
        # HookedTransformer adds b_in after the product (act(gate) * up + b_in): no bias
        # inside. A bridge wraps the Hugging Face MLP, whose projections must have none.
        _check_no_projection_bias(mlp, w_up.shape[0], index)
        w_in = torch.cat([float64_copy(mlp.W_gate).T, w_up])
        bias = torch.zeros(w_in.shape[0], dtype=F64)
    else:
        w_in, bias = w_up, _tensor(mlp, "b_in")
        bias = torch.zeros(w_up.shape[0], dtype=F64) if bias is None else bias
    w_out = float64_copy(mlp.W_out).T  # (d_model, d_mlp)
    # The model's h, checked each batch: hook_post is act(gate) * up + b_in when gated.
    hidden, hidden_bias = f"blocks.{index}.mlp.hook_post", _tensor(mlp, "b_in") if gated else None
    if output == "hook_pre":  # the gate's pre-activations of a gated MLP
        rows = slice(0, w_up.shape[0])
        w_in, bias, w_out, activation, gated = w_in[rows], bias[rows], None, "identity", False
        hidden, hidden_bias = f"blocks.{index}.mlp.hook_pre", None
    elif output == "hook_post":
        w_out = torch.eye(w_up.shape[0], dtype=F64) if gated else None
    beta = _norm_bias(block.ln2, cfg)
    if beta is not None:  # z = (N * gain + beta) W_in + b: beta joins the bias
        bias = bias + w_in @ beta.to(w_in)
    gain = _norm_weight(model, index, cfg)
    if gain is not None:
        w_in = w_in * gain.to(w_in)[None, :]
    return NormedMLPSection(
        w_in.clone(),
        None if w_out is None else w_out.clone(),
        bias=bias,
        activation=activation,
        norm=_norm_kind(cfg),
        eps=float(getattr(cfg, "eps", 1e-5)),
        residual=output == "hook_resid_post",
        gated=gated,
        hidden=Site(hidden),
        hidden_bias=hidden_bias,
        # hook_resid_post is x + hook_post W_out + b_out: checked each batch too.
        out_bias=_tensor(mlp, "b_out") if output == "hook_resid_post" else None,
    )


def mlp_output_section(model: nn.Module, layer: int, *, source: str = "hook_post") -> MLPSection:
    """``blocks.L.mlp.hook_post`` (or ``hook_pre``) to ``blocks.L.hook_resid_post``.

    With the residual stream before the MLP held fixed (a write at the site, as exact probes
    make), the output moves by ``W_out`` times the activations' change: a linear
    :class:`~degen_hooks.MLPSection` from ``hook_post``, and from ``hook_pre`` one with the
    block's activation (derivative moments at ``hook_pre`` itself; plain MLPs only).

    Raises:
        ValueError: For ``source="hook_pre"`` in a gated MLP (its output also depends on the
            up projection), or a block without an MLP.
    """
    (index,) = _layers(model, layer)
    cfg = _cfg(model)
    gated = bool(getattr(cfg, "gated_mlp", False))
    _check_mlp(cfg, gated_ok=source == "hook_post")
    w_out = float64_copy(_unwrap(model)[0].blocks[index].mlp.W_out).T
    eye = torch.eye(w_out.shape[1], dtype=F64)
    if source == "hook_post":
        return MLPSection(eye, w_out, "identity")
    if source != "hook_pre" or gated:
        raise ValueError(
            f"source must be 'hook_post' or, in a plain MLP, 'hook_pre'; got {source!r}."
        )
    return MLPSection(eye, w_out, elementwise_activation(cfg, index))


def unembed_section(model: nn.Module) -> NormedMLPSection | MLPSection:
    """The last ``hook_resid_post`` to the logits: the final norm (if any) and ``W_U``."""
    cfg = _cfg(model)
    inner = _unwrap(model)[0]
    w_u = float64_copy(inner.unembed.W_U).T  # (d_vocab, d_model)
    kind = _norm_kind(cfg)
    if kind is None:  # (eye, W_U), not (W_U, eye): never a d_vocab x d_vocab matrix
        return MLPSection(torch.eye(w_u.shape[1], dtype=F64), w_u, "identity")
    ln_final = inner.ln_final
    gain = norm_gain(ln_final, cfg)
    beta = _norm_bias(ln_final, cfg)
    bias = None if beta is None else w_u @ beta
    return NormedMLPSection(
        w_u if gain is None else w_u * gain.to(w_u)[None, :],
        None,
        bias=bias,
        activation="identity",
        norm=kind,
        eps=float(getattr(cfg, "eps", 1e-5)),
    )
