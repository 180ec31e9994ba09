"""The user's hooks inside a closed-form section: such a pair is left to backward passes.

A closed form differentiates what the weights say. A hook of the user's between a section's
input and its output (steering, ablation, patching, or one that keeps the values but cuts the
gradient, ``act.detach()``) changes the model's Jacobian in a way no weight shows; backward
passes follow it. So the finders of closed forms (``find_sections`` of each family,
:func:`~degen_hooks.closed_form.find_mlp_sections`) leave out a pair whose span carries a
hook, and warn. The checks of each batch (a section's reads against its weights)
remain for the rest: hooks added later, patched ``forward`` methods, sections passed by hand.

degen_hooks' own hooks (a ``collect`` run around the call) and the libraries' bookkeeping
(:data:`_NOT_THE_USERS`) are not the user's.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

from torch import nn
from torch.nn.modules import module as _module

__all__ = ["hooked_modules", "leave_hooked"]


#: Where hooks that are not the user's come from: degen_hooks' own, torch's (FSDP's
#: unsharding, checkpoint wrappers), a TransformerLens bridge's wiring of its hook aliases,
#: transformers' output capturing (installed by ``output_hidden_states=True``, recording
#: only) and accelerate's device placement. TransformerLens' ``add_hook`` wraps the user's
#: function in ``transformer_lens.hook_points``: those are the user's.
_NOT_THE_USERS = (
    "degen_hooks",
    "torch.",
    "transformer_lens.model_bridge",
    "transformers.",
    "accelerate.",
)


def _ours(hook: object) -> bool:
    function = getattr(hook, "__func__", hook)
    return str(getattr(function, "__module__", "")).startswith(_NOT_THE_USERS)


def _hooks_of(module: nn.Module) -> list[object]:
    return [
        *module._forward_hooks.values(),
        *module._forward_pre_hooks.values(),
        *module._backward_hooks.values(),
        *getattr(module, "_backward_pre_hooks", {}).values(),
    ]


def hooked_modules(model: nn.Module, spans: Iterable[str]) -> list[str]:
    """The names of ``spans`` (modules of ``model``) at or inside which a user's hook sits.

    Args:
        model: The model holding them.
        spans: Module paths (``model.get_submodule``); a path the model lacks is skipped.

    Returns:
        The hooked spans, in the order given; all of them when a global module hook is set
        (``torch.nn.modules.module.register_module_forward_hook``).
    """
    spans = [span for span in spans if span]
    global_hooks = [
        *_module._global_forward_hooks.values(),
        *_module._global_forward_pre_hooks.values(),
        *_module._global_backward_hooks.values(),
    ]
    if any(not _ours(hook) for hook in global_hooks):
        return spans
    found = []
    for span in spans:
        try:
            root = model.get_submodule(span)
        except AttributeError:
            continue
        if any(not _ours(hook) for module in root.modules() for hook in _hooks_of(module)):
            found.append(span)
    return found


def leave_hooked(model: nn.Module, pair: str, spans: Iterable[str]) -> bool:
    """Whether the pair ``pair`` (``"site -> target"``, for the message) must be left to
    backward passes because a module of ``spans`` carries a hook of the user's; warns once
    with where."""
    found = hooked_modules(model, spans)
    if found:
        warnings.warn(
            f"{pair}: a hook of yours on {found[:3]}{' ...' if len(found) > 3 else ''} sits "
            "inside this closed-form section, which cannot see what it does to the Jacobian; "
            "this pair takes backward passes, which follow it. Remove the hook for the closed "
            "form.",
            UserWarning,
            stacklevel=3,
        )
    return bool(found)
