"""The Hugging Face ``transformers`` family as an adapter: closed-form sections (#16).

Found by :func:`degen_hooks._family.family_of` for any model whose classes come from
``transformers``; the sites are :func:`degen_hooks.families.hf.decoder_sites`'. Between
consecutive sites of one decoder layer (and from the last layer to the logits),
:func:`find_sections` gives the closed forms ``build_bases(sections="auto")`` and
``InteractionGraph`` use:

* ``resid_pre`` (or the previous layer's ``resid_post``) ``-> resid_mid``: the norm before
  attention and attention with its skip connection, an
  :class:`~degen_hooks.families._hf_attention.HFAttentionSection` (any positions on either
  side; q, k, v and the heads' outputs read in one forward pass, the causal pattern
  recomputed and checked against them);
* ``resid_mid -> resid_post`` (or the next layer's ``resid_pre``): the norm before the MLP
  and the MLP with its skip connection, a residual :class:`~degen_hooks.NormedMLPSection`;
* ``resid_mid -> mlp_hidden``: the norm, the input projection(s) and the activation;
* ``mlp_hidden -> resid_post``: the output projection, a linear
  :class:`~degen_hooks.MLPSection`;
* ``resid_post`` -> the next layer's ``resid_pre``: the same tensor, the identity;
* the last ``resid_post -> logits``: the final norm and the unembedding.

Covered: GPT-2 (LayerNorm, ``Conv1D`` projections) and the Llama layout with separate gate
and up projections (Llama, Mistral, Qwen 2 and 3: RMSNorm, SwiGLU, no MLP projection biases;
rotary, grouped-query attention; Qwen 3's RMSNorms of each head's q and k; Gemma: GeGLU, and
RMSNorms that scale by ``1 + weight``). Llama-style
RMSNorm takes its variance in float32 whatever the model's dtype, so on a float64 model these
closed forms (float64 throughout) differ from the model's own Jacobian at float32 rounding
(about 1e-7 relative). Sharded weights (FSDP2) are gathered whole.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._positions import same_positions
from .._user_hooks import leave_hooked
from .._weights import float64_copy
from ..closed_form import MLPSection, activation_derivative
from ..normed_section import NormedMLPSection
from ..sites import Site, _unwrap
from ._hf_attention import hf_attention_section
from .hf import _LAYOUTS, decoder_layers

__all__ = ["find_sections"]

F64 = torch.float64
_LLAMA_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma"})
# RMSNorms that scale by (1 + weight), not weight (Gemma's; its weight starts at zero)
_OFFSET_GAINS = frozenset({"GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm"})
_ATTENTION_NORM = {"gpt2": "ln_1", **dict.fromkeys(_LLAMA_TYPES, "input_layernorm")}
_ATTENTION = {"gpt2": "attn", **dict.fromkeys(_LLAMA_TYPES, "self_attn")}
_FINAL = {
    "gpt2": ("transformer.ln_f", "lm_head"),
    **dict.fromkeys(_LLAMA_TYPES, ("model.norm", "lm_head")),
}


def find_sections(
    model: nn.Module,
    sites: list[Site],
    output: Site | None = None,
    output_positions: Any = None,
) -> dict[str, tuple[Any, Site | None]]:
    """Closed-form sections between consecutive sites of a ``transformers`` decoder model.

    Args:
        model: A ``transformers`` model (GPT-2 or a Llama-layout model; others get none).
        sites: The sites in forward order (e.g. from ``decoder_sites``).
        output: The site after the last one; ``None``: the model's logits.
        output_positions: Positions of the logits (when ``output`` is ``None``).

    Returns:
        ``{site key: (section, None)}``, as ``build_bases(sections=)`` takes it; pairs
        without a closed form are left out (backward passes run there).
    """
    inner, prefix = _unwrap(model)
    model_type = getattr(getattr(inner, "config", None), "model_type", None)
    if model_type not in _FINAL:
        return {}
    layers = decoder_layers(inner)
    layout = _LAYOUTS[model_type]
    found: dict[str, tuple[Any, Site | None]] = {}
    for site, target in zip(sites, [*sites[1:], output], strict=True):
        try:
            section = _section(inner, model_type, layers, layout, site, target, output_positions)
        except ValueError:  # a layer the closed forms do not cover: backward passes
            section = None
        if section is None:
            continue
        pair = f"{site.key} -> {'the logits' if target is None else target.key}"
        span = _span(model_type, layers, layout, site, target)
        if leave_hooked(inner, pair, span):
            continue  # backward passes follow the user's hook
        found[site.key] = (section, None)
    return found


def _span(
    model_type: str, layers: list[str], layout: Any, site: Site, target: Site | None
) -> list[str]:
    """The modules between ``site`` and ``target`` whose hooks the closed form cannot see."""
    if target is None:
        return list(_FINAL[model_type])
    attention = _attention_layer(site, target, layers, layout)
    if attention is not None:
        layer = layers[attention]
        return [f"{layer}.{_ATTENTION_NORM[model_type]}", f"{layer}.{_ATTENTION[model_type]}"]
    where = _role(site, layers, layout)
    if where is None:
        return []
    layer = layers[where[0]]
    if where[1] == "resid_post":  # the same tensor as the next layer's input
        return []
    return [f"{layer}.{layout.mlp_norm}", f"{layer}.{layout.mlp}"]


def _role(site: Site | None, layers: list[str], layout: Any) -> tuple[int, str] | None:
    """``(layer index, kind)`` of a site, or ``None`` for any other site."""
    if site is None:
        return None
    for index, layer in enumerate(layers):
        if site.name == layer:
            if site.io == "output":
                return index, "resid_post"
            return (index - 1, "resid_post") if index else None  # the previous layer's output
        if site.io == "input" and site.name == f"{layer}.{layout.mlp_norm}":
            return index, "resid_mid"
        if site.io == "input" and site.name == f"{layer}.{layout.down}":
            return index, "mlp_hidden"
    return None


def _attention_layer(site: Site, target: Site | None, layers: list[str], layout: Any) -> int | None:
    """The layer whose attention maps ``site`` to ``target``: its input (or the previous
    layer's output) to the input of its norm before the MLP."""
    if target is None or target.io != "input":
        return None
    for index, layer in enumerate(layers):
        if target.name != f"{layer}.{layout.mlp_norm}":
            continue
        if site.io == "input" and site.name == layer:
            return index if site.arg in (None, 0, "hidden_states") else None
        if site.io == "output" and index and site.name == layers[index - 1]:
            return index
    return None


def _section(
    model: nn.Module,
    model_type: str,
    layers: list[str],
    layout: Any,
    site: Site,
    target: Site | None,
    output_positions: Any,
) -> Any:
    attention = _attention_layer(site, target, layers, layout)
    if attention is not None:  # any positions on either side
        norm = _norm(model.get_submodule(f"{layers[attention]}.{_ATTENTION_NORM[model_type]}"))
        target_path = f"{layers[attention]}.{layout.mlp_norm}"
        return hf_attention_section(model, model_type, layers, attention, norm, target_path)
    where = _role(site, layers, layout)
    if where is None:
        return None
    index, kind = where
    if target is None:
        if kind != "resid_post" or index != len(layers) - 1:
            return None
        if not same_positions(site.positions, output_positions):
            return None
        return _unembed(model, model_type)
    to = _role(target, layers, layout)
    if to is None or to[0] != index or not same_positions(site.positions, target.positions):
        return None
    if (kind, to[1]) == ("resid_post", "resid_post"):  # a layer's output, the next one's input
        width = int(model.config.hidden_size)
        return MLPSection(torch.eye(width, dtype=F64), torch.eye(width, dtype=F64), "identity")
    if (kind, to[1]) == ("resid_mid", "resid_post"):
        return _block(model, model_type, layers[index], layout, "resid_post")
    if (kind, to[1]) == ("resid_mid", "mlp_hidden"):
        return _block(model, model_type, layers[index], layout, "hidden")
    if (kind, to[1]) == ("mlp_hidden", "resid_post"):
        w_out = _projection(model.get_submodule(f"{layers[index]}.{layout.down}"))[0]
        return MLPSection(torch.eye(w_out.shape[1], dtype=F64), w_out, "identity")
    return None


def _projection(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight in nn.Linear layout (out, in), bias)`` of a Linear or GPT-2 ``Conv1D``."""
    weight = float64_copy(module.weight)
    if not isinstance(module, nn.Linear):  # transformers' Conv1D: y = x @ W + b
        weight = weight.T
    bias = getattr(module, "bias", None)
    return weight, None if bias is None else float64_copy(bias)


def _norm(module: nn.Module) -> tuple[str, torch.Tensor | None, torch.Tensor | None, float]:
    """``(kind, gain, bias, eps)`` of a LayerNorm or an RMSNorm module."""
    gain = getattr(module, "weight", None)
    gain = None if gain is None else float64_copy(gain)
    if isinstance(module, nn.LayerNorm):
        bias = None if module.bias is None else float64_copy(module.bias)
        return "LN", gain, bias, float(module.eps)
    if "RMSNorm" in type(module).__name__:
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if eps is None:
            raise ValueError(f"{type(module).__name__} keeps no epsilon.")
        if gain is not None and type(module).__name__ in _OFFSET_GAINS:
            gain = 1 + gain
        return "RMS", gain, None, float(eps)
    raise ValueError(f"No closed form for the norm {type(module).__name__}.")


def _activation(model: nn.Module) -> str:
    config = model.config
    name = getattr(config, "activation_function", None) or getattr(config, "hidden_act", None)
    activation_derivative(str(name))  # raises ValueError for an unknown one
    return str(name)


def _block(model: nn.Module, model_type: str, path: str, layout: Any, to: str) -> NormedMLPSection:
    layer = model.get_submodule(path)
    kind, gain, beta, eps = _norm(layer.get_submodule(layout.mlp_norm))
    mlp = layer.get_submodule(layout.mlp)
    if model_type == "gpt2":
        w_in, bias = _projection(mlp.c_fc)
        gated = False
    else:
        (w_gate, b_gate), (w_up, b_up) = _projection(mlp.gate_proj), _projection(mlp.up_proj)
        if b_gate is not None or b_up is not None:
            raise ValueError("The gated closed form takes projections without biases.")
        w_in, bias, gated = torch.cat([w_gate, w_up]), None, True
    hidden = Site(f"{path}.{layout.down}", io="input")  # checked against the section's
    w_out, out_bias = _projection(layer.get_submodule(layout.down))
    if to == "hidden":
        w_out = torch.eye(w_out.shape[1], dtype=F64) if gated else None
    if beta is not None:  # z = (N * gain + beta) W_in^T + b: beta joins the bias
        shift = w_in @ beta
        bias = shift if bias is None else bias + shift
    if gain is not None:
        w_in = w_in * gain[None, :]
    return NormedMLPSection(
        w_in, w_out, bias=bias, activation=_activation(model), norm=kind, eps=eps,
        residual=to == "resid_post", gated=gated, hidden=hidden,
        out_bias=out_bias if to == "resid_post" else None,
    )  # fmt: skip


def _unembed(model: nn.Module, model_type: str) -> NormedMLPSection:
    norm_path, head_path = _FINAL[model_type]
    kind, gain, beta, eps = _norm(model.get_submodule(norm_path))
    w_u = _projection(model.get_submodule(head_path))[0]
    bias = None if beta is None else w_u @ beta
    if gain is not None:
        w_u = w_u * gain[None, :]
    return NormedMLPSection(w_u, None, bias=bias, activation="identity", norm=kind, eps=eps)
