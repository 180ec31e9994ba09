"""Where a batch of a collection begins and ends, and why a forward pass has no gradients.

Part of :mod:`degen_hooks.collect`. A batch is one call of the model: hooks on the model
itself open it before any other hook and close it after the last one (or abort it when the
call raised), so a batch updates every site or none. The helpers here also name the model's
own class (under DDP, ``torch.compile`` and FSDP2 wrappers) and explain, for an error
message, why a site's activation does not require grad.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ._hooks import is_set_aside
from .sites import _unwrap

__all__ = ["batch_boundaries", "inside_call_of", "model_class", "why_no_grad"]


@contextlib.contextmanager
def batch_boundaries(
    model: nn.Module,
    begins: Callable[[], None],
    ends: Callable[[], None],
    aborts: Callable[[], None],
) -> Iterator[None]:
    """Call ``begins`` before the model's own forward (before any other hook), and ``ends``
    after it returned (after every site hook, the model output's included) or ``aborts``
    when it raised an ``Exception`` (a ``KeyboardInterrupt`` is caught at the next call).
    The library's own probe passes (:func:`~degen_hooks._hooks.alone`) are no batch."""
    returned = [False]

    def before(*_: Any) -> None:
        if not is_set_aside():
            begins()

    def on_return(*_: Any) -> None:
        returned[0] = True

    def after(*_: Any) -> None:
        # always_call: torch also runs this when the call raised an Exception (without
        # running on_return), so a failed batch is undone at once.
        ok, returned[0] = returned[0], False
        if not is_set_aside():
            (ends if ok else aborts)()

    handles = [
        model.register_forward_pre_hook(before, prepend=True),
        model.register_forward_hook(on_return),
        model.register_forward_hook(after, always_call=True),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def inside_call_of(model: nn.Module) -> bool:
    """Whether an outer call of ``model`` is still running on this thread's stack (a model
    that calls itself), as opposed to one that raised and left its batch unfinished.

    Called from a pre-hook, so the call being started is on the stack too: look for two.
    Only the rare case of a call starting while another is open walks the stack.
    """
    calls, frame = 0, sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_call_impl" and frame.f_locals.get("self") is model:
            calls += 1
        frame = frame.f_back
    return calls >= 2


def model_class(model: nn.Module) -> str:
    """The class name statistics record: the model's own, not a wrapper's (DDP's ``.module``,
    ``torch.compile``'s ``._orig_mod``; FSDP2 swaps the class in place for ``FSDP<Class>``),
    so statistics of a wrapped model merge with those of the plain one."""
    inner = _unwrap(model)[0]
    fsdp = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)
    cls = type(inner)
    if isinstance(fsdp, type) and isinstance(inner, fsdp):
        cls = next(c for c in cls.__mro__[1:] if not issubclass(c, fsdp))
    return cls.__name__


def _inside_reentrant_checkpoint() -> bool:
    """Whether this call runs inside the forward of a reentrant checkpoint (on the stack)."""
    from torch.utils import checkpoint

    forward = getattr(getattr(checkpoint, "CheckpointFunction", None), "forward", None)
    code = getattr(forward, "__code__", None)
    frame = sys._getframe(1)
    while frame is not None and code is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


def why_no_grad(model: nn.Module | None = None) -> str:
    """Why a site's activation does not require grad, and the fix, as a sentence fragment.

    Args:
        model: The collected model: when given, a frozen model is named as such.

    Returns:
        A fragment for a ``collect`` user, who runs the forward pass and can change it.
    """
    if _inside_reentrant_checkpoint():
        return (
            "the site runs inside reentrant activation checkpointing "
            "(torch.utils.checkpoint.checkpoint(..., use_reentrant=True)), whose forward runs "
            "without gradients and whose backward cannot be differentiated to a site. Use "
            "use_reentrant=False (Hugging Face: model.gradient_checkpointing_enable("
            "gradient_checkpointing_kwargs={'use_reentrant': False})), or collect activations "
            "only with jacobians=None"
        )
    if torch.is_inference_mode_enabled():
        return "the forward pass ran under torch.inference_mode()"
    if not torch.is_grad_enabled():
        return (
            "the forward pass ran under torch.no_grad() where this site ran (in your code, "
            "or inside the model: some modules compute a side tensor without gradients, e.g. "
            "a TransformerBridge RMSNorm's hook_normalized; then choose a site on the "
            "computation's gradient path, such as the norm's output)"
        )
    # Jacobians need an autograd graph through the site, not parameter gradients: an input
    # that requires grad builds one through a frozen model as well.
    fix = (
        "make the (floating-point) model input require grad, model(x.requires_grad_()), "
        "or unfreeze the model with model.requires_grad_(True)"
    )
    if model is not None and not any(p.requires_grad for p in model.parameters()):
        return (
            "gradients were enabled, but the model is frozen (none of its parameters requires "
            f"grad) and its input does not require grad: {fix}"
        )
    return (
        "gradients were enabled, but nothing upstream of it requires grad: the site is at the "
        "model input, or everything before it is frozen (requires_grad=False): "
        f"{fix}"
    )
