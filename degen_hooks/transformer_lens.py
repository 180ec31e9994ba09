"""TransformerLens models as sites: hook names, aliases, MLP sections and processing flags.

TransformerLens (Nanda & Bloom) exposes every intermediate activation as a ``HookPoint``
module, so :func:`degen_hooks.collect` reads them like any other module. This module adds
what is specific to the two model families of TransformerLens 3:

* ``HookedTransformer``: hook names are ``named_modules()`` paths, nothing to translate.
* ``TransformerBridge``: hooks live on a component tree (``blocks.0.mlp.out.hook_in``) and
  the familiar names (``blocks.0.mlp.hook_post``) are *aliases* of those HookPoints.
  ``named_modules()`` reaches the components through ``_original_component`` paths, so the
  names users write are not module paths there. :func:`site_modules` lists every name a
  user may write (component paths and aliases) and :func:`resolve_alias` maps an alias to
  its component path. Statistics are keyed by the name the user asked for; one HookPoint
  is hooked once per requested name, so nothing is counted twice.

It also builds the closed-form MLP section of a block (:func:`mlp_section`, lib_math §12)
and records TransformerLens weight processing (``fold_ln``, ``center_writing_weights``, ...),
which changes the weights and therefore the coordinates any basis is expressed in
(:func:`processing_flags`, :func:`record_metadata`).

Nothing in ``degen_hooks`` imports this module at import time, and it never imports
``transformer_lens`` itself: a model's family is told from ``sys.modules``, so
``import degen_hooks`` stays fast. Use it as ``from degen_hooks.transformer_lens import ...``.
"""

from __future__ import annotations

import sys
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ._errors import SiteNotFoundError
from .closed_form import MLPSection, activation_derivative
from .sites import _is_transformer_lens, _unwrap

if TYPE_CHECKING:
    from .statistics import Statistics

__all__ = [
    "ProcessedWeightsWarning",
    "is_bridge",
    "is_transformer_lens",
    "mlp_section",
    "mlp_section_sites",
    "mlp_sites",
    "processing_flags",
    "record_metadata",
    "resolve_alias",
    "site_modules",
]

# Children through which a TransformerBridge reaches the wrapped model a second time.
_WRAPPED_CHILDREN = frozenset({"_original_component", "original_component", "original_model"})
_NORMS = frozenset({"LN", "LNPre", "RMS", "RMSPre"})
_PARAM_FREE_NORMS = frozenset({"LNPre", "RMSPre"})
# Relative size of |mean over d_model| below which a weight counts as centred: processing
# runs in float32, which leaves means of about 1e-8 of the weight scale.
_CENTRED_RTOL = 1e-5
_NORM_LEAVES = frozenset({"w", "b", "weight", "bias"})


class ProcessedWeightsWarning(UserWarning):
    """Statistics were collected on a TransformerLens model with processed weights."""


# -- which family ----------------------------------------------------------------------------
def _tl_class(model: nn.Module, module: str, name: str) -> bool:
    # A model of a TransformerLens class means transformer_lens is already imported: look
    # the class up in sys.modules instead of importing the (slow) package.
    loaded = sys.modules.get(module)
    cls = getattr(loaded, name, None)
    return isinstance(cls, type) and isinstance(model, cls)


def is_bridge(model: nn.Module) -> bool:
    """Whether ``model`` is a TransformerLens ``TransformerBridge`` (no import needed).

    Args:
        model: Any module (a DDP wrapper is looked through).

    Returns:
        ``True`` for a ``TransformerBridge`` or a subclass.
    """
    inner, _ = _unwrap(model)
    return _tl_class(inner, "transformer_lens.model_bridge.bridge", "TransformerBridge")


def is_transformer_lens(model: nn.Module) -> bool:
    """Whether ``model`` comes from TransformerLens (``HookedTransformer``, bridge, ...).

    Cheap: checks the class hierarchy's modules, imports nothing.

    Args:
        model: Any module (a DDP wrapper is looked through).

    Returns:
        ``True`` if a class in ``type(model).__mro__`` is defined in ``transformer_lens``.
    """
    return _is_transformer_lens(_unwrap(model)[0])


# -- names -----------------------------------------------------------------------------------
def _component_paths(model: nn.Module) -> dict[str, nn.Module]:
    """Modules of a bridge by component path, skipping the wrapped-model back-references."""
    paths: dict[str, nn.Module] = {"": model}
    seen = {id(model)}
    stack = [("", model)]
    while stack:
        prefix, module = stack.pop()
        children = [(n, c) for n, c in module.named_children() if n not in _WRAPPED_CHILDREN]
        for name, child in reversed(children):  # reversed + stack pop = definition order
            if id(child) in seen:
                continue
            seen.add(id(child))
            stack.append((f"{prefix}.{name}" if prefix else name, child))
        if prefix:
            paths[prefix] = module
    return paths


def site_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every name a site may use on a TransformerLens model, mapped to its module.

    ``HookedTransformer``: ``named_modules()``. ``TransformerBridge``: component paths
    (``blocks.0.mlp.out.hook_in``) followed by the hook aliases TransformerLens defines
    (``blocks.0.mlp.hook_post``, ``blocks.0.hook_resid_mid``, ``hook_embed``, ...), several
    names per HookPoint.

    Args:
        model: A TransformerLens model (a DDP wrapper is looked through).

    Returns:
        ``{name: module}``; the root is ``""``. Several names may share one module.

    Examples:
        >>> import torch, warnings
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> cfg = HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=4, d_head=4, n_heads=2,
        ...                               d_mlp=16, d_vocab=11, act_fn="relu")
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore", DeprecationWarning)
        ...     model = HookedTransformer(cfg)
        >>> "blocks.0.mlp.hook_post" in site_modules(model)
        True
    """
    inner, _ = _unwrap(model)
    if not is_bridge(inner):
        return dict(inner.named_modules())
    modules = _component_paths(inner)
    for alias, hook in inner.hook_dict.items():
        modules.setdefault(alias, hook)
    return modules


def resolve_alias(model: nn.Module, name: str) -> str | None:
    """The component path a ``TransformerBridge`` hook alias points to.

    TransformerLens writes the canonical name into ``HookPoint.name``, but
    ``enable_compatibility_mode()`` renames some HookPoints to their legacy alias (after it,
    ``blocks.0.ln2.hook_in`` is named ``blocks.0.hook_resid_mid``), so this returns the
    component path, which does not change.

    Args:
        model: Any model (a DDP wrapper is looked through).
        name: A hook name such as ``"blocks.0.mlp.hook_post"``.

    Returns:
        The component path (``"blocks.0.mlp.out.hook_in"``) if ``model`` is a bridge and
        ``name`` is an alias of another path; ``None`` for a component path, an unknown name
        or a model that is not a bridge.
    """
    inner, _ = _unwrap(model)
    if not is_bridge(inner):
        return None
    hook = inner.hook_dict.get(name)
    if hook is None:
        return None
    for path, module in _component_paths(inner).items():
        if module is hook:
            return None if path == name else path
    return None


def _cfg(model: nn.Module) -> Any:
    inner, _ = _unwrap(model)
    cfg = getattr(inner, "cfg", None)
    if cfg is None:
        raise TypeError(
            f"{type(inner).__name__} has no .cfg: pass a TransformerLens HookedTransformer or "
            "TransformerBridge."
        )
    return cfg


def _layers(model: nn.Module, layer: int | None) -> list[int]:
    n_layers = int(_cfg(model).n_layers)
    if layer is None:
        return list(range(n_layers))
    if not -n_layers <= layer < n_layers:
        raise SiteNotFoundError(
            f"Layer {layer} does not exist: the model has n_layers={n_layers} "
            f"(blocks.0 ... blocks.{n_layers - 1})."
        )
    return [layer % n_layers]


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


def _check_mlp(cfg: Any) -> None:
    if getattr(cfg, "attn_only", False):
        raise ValueError("The model is attention-only (cfg.attn_only=True): it has no MLPs.")
    if getattr(cfg, "gated_mlp", False):
        raise ValueError(
            "Gated MLPs (cfg.gated_mlp=True) have no 'Linear -> activation -> Linear' closed "
            "form: collect Jacobians with jacobians='exact' instead."
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
      (the closed form cannot cross the norm, whose Jacobian depends on the input's
      scale), else ``blocks.L.hook_resid_mid`` (equal to ``hook_mlp_in``, which only fires
      after ``set_use_hook_mlp_in(True)``).
    * ``residual=True``: ``blocks.L.hook_resid_mid -> blocks.L.hook_resid_post``, i.e.
      ``y = x + MLP(x)``; only for models without normalization before the MLP.

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
                f"A residual MLP section has no closed form with normalization_type="
                f"{cfg.normalization_type!r}: the norm before the MLP makes the Jacobian "
                "depend on the input's scale. Use residual=False (input "
                f"'{block}.ln2.hook_normalized') or exact probes."
            )
        return f"{block}.hook_resid_mid", f"{block}.mlp.hook_pre", f"{block}.hook_resid_post"
    source = f"{block}.ln2.hook_normalized" if has_norm else f"{block}.hook_resid_mid"
    return source, f"{block}.mlp.hook_pre", f"{block}.hook_mlp_out"


def _norm_weight(model: nn.Module, index: int, cfg: Any) -> torch.Tensor | None:
    """The elementwise gain ln2 applies after ``hook_normalized`` (``None`` if none)."""
    if getattr(cfg, "normalization_type", None) not in _NORMS - _PARAM_FREE_NORMS:
        return None
    ln2 = _unwrap(model)[0].blocks[index].ln2
    weight = getattr(ln2, "w", None)  # HookedTransformer
    if not isinstance(weight, torch.Tensor):
        weight = getattr(ln2, "weight", None)  # TransformerBridge
    if not isinstance(weight, torch.Tensor):
        return None
    weight = weight.detach()
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
        >>> import torch, warnings, degen_hooks as dh
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> cfg = HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=4, d_head=4, n_heads=2,
        ...                               d_mlp=16, d_vocab=11, act_fn="relu",
        ...                               normalization_type=None, dtype=torch.float64)
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore", DeprecationWarning)
        ...     model = HookedTransformer(cfg)
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
    activation = str(cfg.act_fn)
    try:
        activation_derivative(activation)
    except ValueError as err:
        raise ValueError(
            f"Block {index} uses act_fn={activation!r}, which has no elementwise closed form: "
            f"{err} Collect Jacobians with jacobians='exact' instead."
        ) from None
    mlp = _unwrap(model)[0].blocks[index].mlp
    w_in = mlp.W_in.detach().to(torch.float64).T.clone()  # (d_mlp, d_model)
    w_out = mlp.W_out.detach().to(torch.float64).T.clone()  # (d_model, d_mlp)
    gain = _norm_weight(model, index, cfg)
    if gain is not None:
        w_in = w_in * gain.to(w_in)[None, :]
    return MLPSection(w_in, w_out, activation=activation, residual=residual)


# -- weight processing -----------------------------------------------------------------------
def _weight(model: nn.Module, name: str) -> torch.Tensor | None:
    try:
        value = getattr(model, name)
    except (AttributeError, RuntimeError, NotImplementedError, KeyError):
        return None
    return value.detach() if isinstance(value, torch.Tensor) else None


def _centred(weights: list[torch.Tensor | None], dim: int = -1) -> bool:
    present = [w for w in weights if w is not None and w.numel()]
    if not present:
        return False
    for w in present:
        w = w.to(torch.float64)
        scale = w.abs().max()
        if scale == 0 or w.mean(dim).abs().max() > _CENTRED_RTOL * scale:
            return False
    return True


def _norm_params(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Gains and biases of every LayerNorm/RMSNorm, either family, as ``(leaf, tensor)``."""
    # state_dict(), not named_parameters(): a bridge reaches its parameters first through
    # ``_original_component`` paths, while its state_dict() uses the component names.
    params = []
    for name, tensor in model.state_dict().items():
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2].startswith("ln") and parts[-1] in _NORM_LEAVES:
            params.append((parts[-1], tensor))
    return params


def _norms_are_identity(model: nn.Module) -> bool:
    params = _norm_params(model)
    if not params:
        return False
    return all(
        torch.all(p == (1.0 if leaf in ("w", "weight") else 0.0)).item() for leaf, p in params
    )


def processing_flags(model: nn.Module) -> dict[str, Any]:
    """The TransformerLens weight processing ``model`` carries, as JSON-able flags.

    Neither family records which processing was applied, so the flags are read from the
    config and detected from the weights: each is ``True`` when the weights are in the form
    that step produces. ``fold_ln``: the config says ``LNPre``/``RMSPre`` (HookedTransformer)
    or processed norms are the identity (bridge); ``center_writing_weights``: ``W_E``,
    ``W_pos``, ``W_O`` and ``W_out`` have zero mean over ``d_model``; ``center_unembed``:
    ``W_U`` has zero mean over the vocabulary; ``fold_value_biases``: every ``b_V`` is zero
    (also true of a freshly initialised model, where the fold changes nothing);
    ``refactor_factored_attn_matrices`` cannot be told from the weights (``None``).

    Args:
        model: A TransformerLens model.

    Returns:
        ``{"family", "transformer_lens_version", "normalization_type", "act_fn", "fold_ln",
        "center_writing_weights", "center_unembed", "fold_value_biases",
        "refactor_factored_attn_matrices", "weights_processed", "compatibility_mode",
        "is_processed"}``; ``is_processed`` is ``True`` when processing changed the weights,
        so statistics and bases apply to the processed model only.
    """
    inner, _ = _unwrap(model)
    cfg = _cfg(inner)
    bridge = is_bridge(inner)
    normalization = getattr(cfg, "normalization_type", None)
    with torch.no_grad():
        if bridge:
            weights_processed = bool(getattr(inner, "_weights_processed", False))
            fold_ln = bool(
                weights_processed and normalization in _NORMS and _norms_are_identity(inner)
            )
        else:
            weights_processed = None
            fold_ln = normalization in _PARAM_FREE_NORMS
        writing = [_weight(inner, n) for n in ("W_E", "W_pos", "W_O", "W_out")]
        center_writing = _centred(writing)
        center_unembed = _centred([_weight(inner, "W_U")])
        b_v = _weight(inner, "b_V")
        fold_value_biases = bool(b_v is not None and torch.all(b_v == 0).item())
    try:
        from importlib.metadata import version

        tl_version = version("transformer-lens")
    except Exception:  # a source checkout without metadata
        tl_version = None
    flags: dict[str, Any] = {
        "family": type(inner).__name__,
        "transformer_lens_version": tl_version,
        "normalization_type": normalization,
        "act_fn": getattr(cfg, "act_fn", None),
        "fold_ln": bool(fold_ln),
        "center_writing_weights": bool(center_writing),
        "center_unembed": bool(center_unembed),
        "fold_value_biases": fold_value_biases,
        "refactor_factored_attn_matrices": None,
        "weights_processed": weights_processed,
        "compatibility_mode": bool(getattr(inner, "compatibility_mode", False)) if bridge else None,
    }
    flags["is_processed"] = bool(
        flags["fold_ln"]
        or flags["center_writing_weights"]
        or flags["center_unembed"]
        or weights_processed
    )
    return flags


def record_metadata(
    stats: Statistics, model: nn.Module, *, warn: bool = True, stacklevel: int = 2
) -> dict[str, Any]:
    """Store :func:`processing_flags` in ``stats.metadata["transformer_lens"]``; warn if processed.

    Call it once per collection on a TransformerLens model, e.g. right after the
    ``with dh.collect(...)`` block, so that saved statistics say which weights they
    describe.

    Args:
        stats: The :class:`~degen_hooks.Statistics` to annotate (its ``metadata`` dict).
        model: The TransformerLens model the statistics come from.
        warn: Emit a :class:`ProcessedWeightsWarning` for a processed model.
        stacklevel: ``warnings.warn`` stack level (2: the caller of this function).

    Returns:
        The flags that were stored.

    Warns:
        ProcessedWeightsWarning: If processing changed the weights (``is_processed``).
    """
    flags = processing_flags(model)
    stats.metadata["transformer_lens"] = flags
    if warn and flags["is_processed"]:
        applied = [
            k
            for k in ("fold_ln", "center_writing_weights", "center_unembed", "weights_processed")
            if flags[k]
        ]
        warnings.warn(
            f"Collecting statistics on a {flags['family']} with processed weights "
            f"({', '.join(applied)}): bases and statistics describe the processed model only, "
            "whose coordinates differ from the raw checkpoint's. Load the model with the same "
            "processing to use them (the flags are in stats.metadata['transformer_lens']), or "
            "load it unprocessed (HookedTransformer.from_pretrained_no_processing, or a bridge "
            "without enable_compatibility_mode).",
            ProcessedWeightsWarning,
            stacklevel=stacklevel,
        )
    return flags
