"""TransformerLens model families and site names: bridge aliases, component paths, config.

Part of :mod:`degen_hooks.transformer_lens`; see its docstring.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any

import torch
from torch import nn

from .._errors import SiteNotFoundError, SiteNotWritableError
from ..sites import _unwrap

# Children through which a TransformerBridge reaches the wrapped model a second time.
_WRAPPED_CHILDREN = frozenset({"_original_component", "original_component", "original_model"})
_NORMS = frozenset({"LN", "LNPre", "RMS", "RMSPre"})
_PARAM_FREE_NORMS = frozenset({"LNPre", "RMSPre"})


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
    inner = _unwrap(model)[0]
    return any(c.__module__.split(".")[0] == "transformer_lens" for c in type(inner).__mro__)


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
        >>> from transformer_lens.model_bridge import TransformerBridge
        >>> model = TransformerBridge.boot_native(dict(n_layers=1, d_model=8, n_ctx=4, d_head=4,
        ...                                            n_heads=2, d_mlp=16, d_vocab=11))
        >>> modules = site_modules(model)
        >>> modules["blocks.0.mlp.hook_post"] is modules["blocks.0.mlp.out.hook_in"]
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


def write_bypass(model: nn.Module, name: str) -> str | None:
    """The residual-stream HookPoint a write at ``name`` must also change, on a bridge.

    A ``TransformerBridge`` block reads ``hook_resid_mid`` at ``ln2``'s input
    (``blocks.{i}.ln2.hook_in``), but its skip connection around the MLP adds the tensor
    from before that hook: a write there reaches only the MLP branch. On
    ``HookedTransformer`` the same write also reaches ``hook_resid_post``. So a write at that
    HookPoint adds its change to the block's output (``blocks.{i}.hook_out``) as well
    (:class:`~degen_hooks.Site`'s ``bypass``).

    Args:
        model: Any model (a DDP wrapper is looked through).
        name: The site's module name (an alias or a component path).

    Returns:
        ``"blocks.{i}.hook_out"`` for a write at a bridge block's ``hook_resid_mid``;
        ``None`` where a write reaches every consumer by itself.

    Raises:
        SiteNotWritableError: For ``hook_resid_mid`` of a block whose layout is not the
            sequential pre-norm one (a post-norm or parallel block), where no write there
            can be made to agree with ``HookedTransformer``; and for a bridge hook that fires
            but whose tensor the bridge does not compute with (some TransformerLens versions
            fire ``attn.hook_attn_scores`` or ``attn.hook_pattern`` beside an attention
            kernel that never reads them): a write there would change nothing, silently.
    """
    inner, _ = _unwrap(model)
    if not is_bridge(inner):
        return None
    bypass = _resid_mid_bypass(inner, name)
    if not _write_reaches_output(inner, name, bypass):
        raise SiteNotWritableError(
            f"A write at {name!r} on this TransformerBridge does not reach its output: the "
            "bridge fires this hook but computes without its tensor (checked with a random "
            "write on a short input). Reading it is fine; write where the computation "
            "happens instead (for attention, 'attn.hook_z', the queries/keys/values "
            "'attn.hook_q'/'hook_k'/'hook_v', or the residual stream)."
        )
    return bypass


def _resid_mid_bypass(inner: nn.Module, name: str) -> str | None:
    """``blocks.{i}.hook_out`` when ``name`` is block ``i``'s ``ln2.hook_in``, else ``None``."""
    modules = _component_paths(inner)
    module = site_modules(inner).get(name)
    for index in range(len(getattr(inner, "blocks", []))):
        if modules.get(f"blocks.{index}.ln2.hook_in") is not module or module is None:
            continue
        block = modules[f"blocks.{index}"]
        sequential = (
            type(block).__name__ == "BlockBridge"
            and not getattr(block, "mlp_reads_resid_directly", False)
            and f"blocks.{index}.mlp" in modules
        )
        if not sequential:
            raise SiteNotWritableError(
                f"Site {name!r} reads block {index}'s residual stream at ln2's input, but "
                f"that block ({type(block).__name__}) is not a sequential pre-norm block: a "
                "write there would not reach its residual connection. Write at "
                f"'blocks.{index}.hook_resid_pre' or 'blocks.{index}.hook_resid_post' instead."
            )
        return f"blocks.{index}.hook_out"
    return None


# Bridges whose writes were checked: {model: {name: reaches its output}}.
_CHECKED: weakref.WeakKeyDictionary[nn.Module, dict[str, bool]] = weakref.WeakKeyDictionary()


def _write_reaches_output(model: nn.Module, name: str, bypass: str | None) -> bool:
    """Whether a random write at ``name`` changes the bridge's output on a short input.

    Checked once per model and name. A hook that does not fire on the probe, or a model
    that cannot run on a short row of token ids, counts as reaching (reads say so when a
    hook never fires).
    """
    known = _CHECKED.setdefault(model, {})
    if name in known:
        return known[name]
    from .._hooks import SiteHook, alone  # the family builds on the core
    from ..sites import Site, resolve_sites

    cfg = _cfg(model)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    tokens = (torch.arange(min(int(cfg.n_ctx), 4)) % int(cfg.d_vocab))[None].to(device)
    ((site, module),) = resolve_sites(model, [Site(name)])
    bypass_module = None if bypass is None else site_modules(model)[bypass]
    generator = torch.Generator().manual_seed(0)

    def write(act: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(act.shape, generator=generator, dtype=torch.float64)
        return act + noise.to(device=act.device, dtype=act.dtype)

    hook = SiteHook(model, site, module, write, writes=True, bypass=bypass_module)
    # Alone: a collection around the check must not count its passes as batches.
    try:
        with torch.no_grad(), alone(hook):
            clean = model(tokens)
            with hook:
                written = model(tokens)
    except Exception:  # noqa: BLE001 - a model that takes more than tokens: cannot check
        return True
    reaches = hook.n_fired == 0 or not torch.equal(clean, written)
    known[name] = reaches
    return reaches


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


def refuse_flagged(flags: dict[str, bool], what: str) -> None:
    """Raise ``ValueError`` naming every flagged feature the closed form does not cover.

    Args:
        flags: ``{feature: whether the model has it}``.
        what: What has them, e.g. ``"Block 3's rotary attention (X)"``.
    """
    bad = [name for name, flag in flags.items() if flag]
    if bad:
        raise ValueError(
            f"{what} has {', '.join(bad)}: the attention closed form does not cover it. "
            "Collect its Jacobians with exact probes (leave this section out of sections=)."
        )
