"""Closed-form MLP sections of TransformerLens blocks (lib_math §12) and their sites.

Part of :mod:`degen_hooks.transformer_lens`; see its docstring.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._weights import float64_copy
from ..closed_form import MLPSection, activation_derivative
from ..sites import _unwrap
from ._names import _NORMS, _PARAM_FREE_NORMS, _cfg, _layers, site_modules


def mlp_sites(model: nn.Module, layer: int | None = None) -> dict[str, list[str]]:
    """Site names around the MLP of each block, grouped by role.

    Roles (keys): ``hook_resid_pre``, ``hook_resid_mid``, ``hook_normalized`` (the MLP's
    normalized input ``blocks.L.ln2.hook_normalized``; LayerNorm/RMSNorm models only),
    ``hook_mlp_in`` (only while ``cfg.use_hook_mlp_in`` is on: call
    ``model.set_use_hook_mlp_in(True)``; it is the *pre*-norm residual), ``hook_pre``
    (pre-activations, ``blocks.L.mlp.hook_pre``), ``hook_post`` (activations),
    ``hook_mlp_out``, ``hook_resid_post``. Names are those of the HookedTransformer; on a
    bridge they are aliases that :func:`degen_hooks.collect` resolves. A role the model lacks
    is left out.

    Args:
        model: A TransformerLens model.
        layer: One block (negative counts from the end), or ``None`` for all.

    Returns:
        ``{role: [name per layer]}``, layers in increasing order.

    Raises:
        SiteNotFoundError: If ``layer`` is out of range.
    """
    layers = _layers(model, layer)
    cfg = _cfg(model)
    roles = {
        "hook_resid_pre": "hook_resid_pre",
        "hook_resid_mid": "hook_resid_mid",
        "hook_normalized": "ln2.hook_normalized",
        "hook_mlp_in": "hook_mlp_in",
        "hook_pre": "mlp.hook_pre",
        "hook_post": "mlp.hook_post",
        "hook_mlp_out": "hook_mlp_out",
        "hook_resid_post": "hook_resid_post",
    }
    available = site_modules(model)
    out: dict[str, list[str]] = {}
    for role, suffix in roles.items():
        if role == "hook_mlp_in" and not getattr(cfg, "use_hook_mlp_in", False):
            continue  # the HookPoint exists but never fires while the flag is off
        names = [f"blocks.{i}.{suffix}" for i in layers]
        if all(n in available for n in names):
            out[role] = names
    return out


def _check_mlp(cfg: Any, *, gated_ok: bool = False) -> None:
    if getattr(cfg, "attn_only", False):
        raise ValueError("The model is attention-only (cfg.attn_only=True): it has no MLPs.")
    if getattr(cfg, "gated_mlp", False) and not gated_ok:
        raise ValueError(
            "Gated MLPs (cfg.gated_mlp=True) have no 'Linear -> activation -> Linear' closed "
            "form: use degen_hooks.transformer_lens.block_mlp_section (sections='auto' finds "
            "it) or jacobians='exact'."
        )
    if (getattr(cfg, "num_experts", None) or 0) > 1:
        raise ValueError(
            f"Mixture-of-experts MLPs (cfg.num_experts={cfg.num_experts}) have no closed "
            "form: collect Jacobians with jacobians='exact' instead."
        )
    if getattr(cfg, "parallel_attn_mlp", False):
        raise ValueError(
            "Parallel attention/MLP blocks (cfg.parallel_attn_mlp=True) have no "
            "hook_resid_mid: collect Jacobians with jacobians='exact' instead."
        )


def mlp_section_sites(
    model: nn.Module, layer: int, *, residual: bool = False
) -> tuple[str, str, str]:
    """The ``(input, pre-activation, output)`` sites matching :func:`mlp_section`.

    * ``residual=False``: the MLP alone, from its input to ``blocks.L.hook_mlp_out``. The
      input is ``blocks.L.ln2.hook_normalized`` when a LayerNorm/RMSNorm precedes the MLP
      (this section's moments cannot cross the norm, whose Jacobian depends on the
      input's scale; :func:`block_mlp_section` does, with a forward pass of its own), else
      ``blocks.L.hook_resid_mid`` (equal to ``hook_mlp_in``, which only fires
      after ``set_use_hook_mlp_in(True)``).
    * ``residual=True``: ``blocks.L.hook_resid_mid -> blocks.L.hook_resid_post``, i.e.
      ``y = x + MLP(x)``; only for models without normalization before the MLP (with one:
      :func:`block_mlp_section`).

    Args:
        model: A TransformerLens model.
        layer: The block.
        residual: Include the skip connection.

    Returns:
        ``(input_site, pre_site, output_site)``: collect derivatives at ``pre_site``
        (``derivatives={pre_site: section.activation}``); exact probes use
        ``target=output_site`` and the input site.

    Raises:
        ValueError: For ``residual=True`` with a norm before the MLP, or a block without a
            plain MLP (attention-only, gated, mixture of experts, parallel).
    """
    (index,) = _layers(model, layer)
    cfg = _cfg(model)
    _check_mlp(cfg)
    block = f"blocks.{index}"
    has_norm = getattr(cfg, "normalization_type", None) in _NORMS
    if residual:
        if has_norm:
            raise ValueError(
                f"mlp_section's moments do not cross the norm before the MLP "
                f"(normalization_type={cfg.normalization_type!r}): its Jacobian depends on the "
                "input's scale. Use block_mlp_section(model, layer, output='hook_resid_post') "
                "(what sections='auto' picks), or residual=False (input "
                f"'{block}.ln2.hook_normalized')."
            )
        return f"{block}.hook_resid_mid", f"{block}.mlp.hook_pre", f"{block}.hook_resid_post"
    source = f"{block}.ln2.hook_normalized" if has_norm else f"{block}.hook_resid_mid"
    return source, f"{block}.mlp.hook_pre", f"{block}.hook_mlp_out"


def elementwise_activation(cfg: Any, index: int) -> str:
    """``cfg.act_fn``, checked to have an elementwise derivative (the closed forms need one)."""
    name = str(cfg.act_fn)
    try:
        activation_derivative(name)
    except ValueError as err:
        raise ValueError(
            f"Block {index} uses act_fn={name!r}, which has no elementwise closed form: {err} "
            "Collect Jacobians with jacobians='exact' instead."
        ) from None
    return name


def _norm_weight(model: nn.Module, index: int, cfg: Any, norm: str = "ln2") -> torch.Tensor | None:
    """The elementwise gain ``norm`` applies after ``hook_normalized`` (``None`` if none)."""
    return norm_gain(getattr(_unwrap(model)[0].blocks[index], norm), cfg)


def norm_gain(module: nn.Module, cfg: Any) -> torch.Tensor | None:
    """A norm module's elementwise gain (``None`` for none or a parameter-free norm)."""
    if getattr(cfg, "normalization_type", None) not in _NORMS - _PARAM_FREE_NORMS:
        return None
    weight = getattr(module, "w", None)  # HookedTransformer
    if not isinstance(weight, torch.Tensor):
        weight = getattr(module, "weight", None)  # TransformerBridge
    if not isinstance(weight, torch.Tensor):
        return None
    weight = float64_copy(weight)
    return 1.0 + weight if getattr(cfg, "rmsnorm_uses_offset", False) else weight


def mlp_section(model: nn.Module, layer: int, *, residual: bool = False) -> MLPSection:
    """The closed-form :class:`~degen_hooks.MLPSection` of one block's MLP (lib_math §12).

    Weights come from ``blocks.L.mlp.W_in`` / ``W_out`` (TransformerLens layout
    ``(d_model, d_mlp)`` / ``(d_mlp, d_model)``, transposed here to the ``nn.Linear`` layout)
    and the activation from ``cfg.act_fn``; biases do not enter the Jacobian. When a
    LayerNorm with a gain ``w`` precedes the MLP, the section starts at
    ``ln2.hook_normalized`` and ``w`` is folded into ``w_in`` (``z = (n * w + b) W_in``).
    :func:`mlp_section_sites` gives the sites the section maps between.

    Args:
        model: A TransformerLens model (``HookedTransformer`` or ``TransformerBridge``).
        layer: The block.
        residual: ``True`` for ``hook_resid_mid -> hook_resid_post`` (``y = x + MLP(x)``).

    Returns:
        An :class:`~degen_hooks.MLPSection` with float64 copies of the weights.

    Raises:
        ValueError: As :func:`mlp_section_sites`, or for an activation without a known
            elementwise derivative (``solu_ln``, ...).

    Examples:
        >>> import torch, degen_hooks as dh
        >>> from transformer_lens.model_bridge import TransformerBridge
        >>> cfg = dict(n_layers=1, d_model=8, n_ctx=4, d_head=4, n_heads=2, d_mlp=16,
        ...            d_vocab=11, act_fn="relu", normalization_type=None)
        >>> model = TransformerBridge.boot_native(cfg, dtype=torch.float64)
        >>> section = mlp_section(model, 0)
        >>> _, pre, _ = mlp_section_sites(model, 0)
        >>> with dh.collect(model, [pre], derivatives={pre: section.activation}) as run:
        ...     _ = model(torch.randint(0, 11, (4, 4)))
        >>> section.jacobian_gram(run.stats[pre].derivs).shape
        torch.Size([8, 8])
    """
    mlp_section_sites(model, layer, residual=residual)  # validates the block
    (index,) = _layers(model, layer)
    cfg = _cfg(model)
    activation = elementwise_activation(cfg, index)
    mlp = _unwrap(model)[0].blocks[index].mlp
    w_in = float64_copy(mlp.W_in).T  # (d_mlp, d_model)
    w_out = float64_copy(mlp.W_out).T  # (d_model, d_mlp)
    gain = _norm_weight(model, index, cfg)
    if gain is not None:
        w_in = w_in * gain.to(w_in)[None, :]
    return MLPSection(w_in, w_out, activation=activation, residual=residual)
