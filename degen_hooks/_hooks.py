"""Site hooks: the one mechanism that reads and writes a site's tensor in a running model.

Every part of degen_hooks that touches a model at a site goes through :class:`SiteHook`:
``collect`` reads, ``ablate`` and the interaction graph (edges, edge ablation) write, the
closed forms read. So a site means the same tensor to all of them:

* **Which tensor.** A module's output (``io="output"``): the tensor itself, or the element
  ``Site.element`` names in a tuple, list, dict or Hugging Face ``ModelOutput`` (default: the
  first tensor, or ``.logits``). Its input (``io="input"``): the argument ``Site.arg`` names,
  positional or keyword (default: the first positional tensor, or the only tensor keyword).
  A write replaces exactly that element and leaves the rest of the structure as it was.
* **Which call.** A module called several times in one forward pass (torchvision's shared
  ``self.relu``) is read at every call, or only at call ``Site.call``; the calls of each pass
  are counted from the model's own forward.
* **Every consumer.** A write at a tensor that also travels a residual skip connection past
  the module (``Site.bypass``, e.g. a TransformerLens 4 bridge's ``hook_resid_mid``, which is
  ``ln2``'s input) adds its change to the bypass module's output too, so the write reaches
  the skip connection as it would on ``HookedTransformer``.
* **Recomputation.** Activation checkpointing runs parts of the forward again inside the
  backward pass: reads ignore those calls (each activation is counted once), writes apply
  again (the recomputed values must be the written ones).
* **Compiled models.** ``torch.compile`` ignores hooks registered after its first call, and
  hooks with side effects recompile it at every call. So while a site hook is active, a
  compiled model (``torch.compile(model)`` or ``model.compile()``, the whole model or a
  part) runs its original, eager modules; on exit it runs compiled again.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ._errors import ShapeMismatchError

__all__ = ["SiteHook", "alone", "find_element", "in_backward", "is_set_aside"]

Path = tuple[Any, ...]


def in_backward() -> bool:
    """Whether this thread is running a backward pass (a checkpoint's recomputation).

    The autograd engine runs a checkpointed segment's forward again while it executes the
    backward; its graph task id is -1 outside any backward pass.
    """
    return torch._C._current_graph_task_id() != -1


# The one SiteHook that sees the model's passes while a check runs (``alone``); ``None``: all.
_ALONE: contextvars.ContextVar[Any] = contextvars.ContextVar("degen_hooks_alone", default=None)


@contextlib.contextmanager
def alone(hook: SiteHook) -> Iterator[None]:
    """While the block runs, every other site hook (and collection) ignores the model.

    For the library's own checks (a probe write on a short input): a collection around
    them must not count the probe's forward passes as batches.
    """
    token = _ALONE.set(hook)
    try:
        yield
    finally:
        _ALONE.reset(token)


def is_set_aside(hook: Any = None) -> bool:
    """Whether ``hook`` (or any hook, when ``None``) is set aside by :func:`alone`."""
    current = _ALONE.get()
    return current is not None and current is not hook


@contextlib.contextmanager
def running_eagerly(model: nn.Module) -> Iterator[None]:
    """Run the compiled parts of ``model`` uncompiled while the block runs.

    A ``torch.compile(module)`` wrapper (``OptimizedModule``) calls its original module's
    forward instead of the compiled one; a module compiled in place (``module.compile()``)
    calls its plain ``_call_impl``. Both are put back on exit.
    """
    patched: list[tuple[nn.Module, str, Any]] = []
    # Nothing can be compiled before torch.compile first ran (it imports dynamo): then the
    # walk over every module, once per site hook, is skipped.
    compiled = "torch._dynamo.eval_frame" in sys.modules
    try:
        for module in model.modules() if compiled else ():
            if type(module).__name__ == "OptimizedModule" and "forward" in module.__dict__:
                patched.append((module, "forward", module.__dict__["forward"]))
                module.forward = module._orig_mod.__call__
            if getattr(module, "_compiled_call_impl", None) is not None:
                patched.append((module, "_compiled_call_impl", module._compiled_call_impl))
                module._compiled_call_impl = None
        yield
    finally:
        for module, attribute, value in reversed(patched):
            setattr(module, attribute, value)


def _outside_dispatch_modes() -> contextlib.AbstractContextManager[Any]:
    """Leave the active ``TorchDispatchMode`` s (if any) for the duration of the block."""
    from torch.utils import _python_dispatch as dispatch

    if dispatch._get_current_dispatch_mode() is None:
        return contextlib.nullcontext()
    return dispatch._disable_current_modes()


# -- finding and replacing the site's tensor --------------------------------------------------
def find_element(value: Any, element: int | str | None = None) -> tuple[torch.Tensor | None, Path]:
    """The tensor of a module output and its path: ``element`` or the default one.

    Default: the value itself if it is a tensor; a tuple's or list's first tensor; a mapping's
    (``ModelOutput``'s) ``logits``, else its first tensor; an object's ``.logits``.

    Raises:
        ShapeMismatchError: If ``element`` names nothing in ``value``, or not a tensor.
    """
    if element is None:
        if isinstance(value, torch.Tensor):
            return value, ()
        if isinstance(value, (tuple, list)):
            for index, item in enumerate(value):
                if isinstance(item, torch.Tensor):
                    return item, (index,)
            return None, ()
        if isinstance(value, Mapping):
            if isinstance(value.get("logits"), torch.Tensor):
                return value["logits"], ("logits",)
            for key, item in value.items():
                if isinstance(item, torch.Tensor):
                    return item, (key,)
            return None, ()
        logits = getattr(value, "logits", None)
        return (logits, (".logits",)) if isinstance(logits, torch.Tensor) else (None, ())
    try:
        if isinstance(value, Mapping) or not isinstance(element, str):
            item = value[element]
        else:
            item = getattr(value, element)
    except (KeyError, IndexError, TypeError, AttributeError):
        item = _MISSING
    if not isinstance(item, torch.Tensor):
        raise ShapeMismatchError(
            f"Site element {element!r} is not a tensor of the module's output "
            f"({_describe(value)}). Choose element= among {_elements(value)}."
        )
    path = (
        (element,)
        if isinstance(value, Mapping) or not isinstance(element, str)
        else (f".{element}",)
    )
    return item, path


_MISSING = object()


def _replace(value: Any, path: Path, new: torch.Tensor) -> Any:
    """``value`` with the element at ``path`` replaced by ``new`` (containers are copied,
    except dicts and ``ModelOutput``, which are updated in place: they are fresh outputs)."""
    if not path:
        return new
    (step,) = path
    if isinstance(step, str) and step.startswith("."):
        setattr(value, step[1:], new)
        return value
    if isinstance(value, Mapping):
        value[step] = new  # ModelOutput.__setitem__ keeps its attribute in sync
        return value
    items = list(value)
    items[step] = new
    if isinstance(value, list):
        return items
    if hasattr(value, "_make"):  # a namedtuple
        return value._make(items)
    return type(value)(items) if type(value) is not tuple else tuple(items)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _elements(value: Any) -> list[Any]:
    if isinstance(value, Mapping):
        return [k for k, v in value.items() if isinstance(v, torch.Tensor)]
    if isinstance(value, (tuple, list)):
        return [i for i, v in enumerate(value) if isinstance(v, torch.Tensor)]
    return []


def find_argument(
    module: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any], arg: int | str | None
) -> tuple[torch.Tensor | None, tuple[str, Any]]:
    """The input tensor ``arg`` names: ``("args", index)`` or ``("kwargs", name)``.

    Raises:
        ShapeMismatchError: If ``arg`` names no tensor argument of this call, or several
            tensors came as keywords and ``arg`` is not given.
    """
    if arg is None:
        for index, item in enumerate(args):
            if isinstance(item, torch.Tensor):
                return item, ("args", index)
        tensors = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
        if len(tensors) == 1:
            return kwargs[tensors[0]], ("kwargs", tensors[0])
        if tensors:
            raise ShapeMismatchError(
                f"{type(module).__name__} was called with several tensor keyword arguments "
                f"{tensors} and no positional tensor: which one is the site's input is "
                f"ambiguous. Name it: Site(..., io='input', arg={tensors[0]!r})."
            )
        return None, ("args", 0)
    if isinstance(arg, str):
        if arg in kwargs:
            item, where = kwargs[arg], ("kwargs", arg)
        else:
            index = _positional_index(module, arg)
            item = args[index] if index is not None and index < len(args) else _MISSING
            where = ("args", index)
    else:
        item = args[arg] if -len(args) <= arg < len(args) else _MISSING
        where = ("args", arg)
    if not isinstance(item, torch.Tensor):
        given = [f"#{i}" for i in range(len(args))] + [repr(k) for k in kwargs]
        raise ShapeMismatchError(
            f"Site argument {arg!r} is not a tensor input of this call of "
            f"{type(module).__name__} (it got positional and keyword arguments "
            f"{', '.join(given) or 'none'}). Choose arg= as a keyword name or a position."
        )
    return item, where


def _positional_index(module: nn.Module, name: str) -> int | None:
    try:
        parameters = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [
        p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return positional.index(name) if name in positional else None


def _replace_argument(
    args: tuple[Any, ...], kwargs: dict[str, Any], where: tuple[str, Any], new: torch.Tensor
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    kind, key = where
    if kind == "kwargs":
        return args, {**kwargs, key: new}
    items = list(args)
    items[key] = new
    return tuple(items), kwargs


# -- the hook -----------------------------------------------------------------------------------
class SiteHook:
    """Hooks one site of a model for the duration of a ``with`` block.

    Args:
        model: The model whose forward passes delimit the calls counted for ``site.call``
            (a call of ``module`` outside any call of ``model`` counts from 0 again).
        site: The :class:`~degen_hooks.Site` (its ``io``, ``arg``, ``element``, ``call``).
        module: The module the site resolved to.
        fn: Called with the site's tensor at every selected call. A write hook returns the
            replacement (same shape; ``None`` keeps the tensor), a read hook returns nothing.
        writes: Whether ``fn`` writes. Writes also run during a checkpoint's recomputation,
            and a site with ``bypass`` adds the change to that module's output.
        bypass: The module ``site.bypass`` names (required when writing at such a site).

    Attributes:
        calls: Calls of the module in the current (or last) forward pass of ``model``.
        shapes: Shapes of the site's tensor at those calls.
        n_fired: Calls passed to ``fn`` since the block began.
    """

    def __init__(
        self,
        model: nn.Module,
        site: Any,
        module: nn.Module,
        fn: Callable[[torch.Tensor], torch.Tensor | None],
        *,
        writes: bool = False,
        bypass: nn.Module | None = None,
    ) -> None:
        self.model, self.site, self.module, self.fn = model, site, module, fn
        self.writes, self.bypass = writes, bypass
        self.calls = 0
        self.shapes: list[tuple[int, ...]] = []
        self.n_fired = 0
        self._depth = 0
        self._pending: torch.Tensor | None = None  # the change a write owes the bypass
        self._stack = contextlib.ExitStack()

    # -- lifetime ---------------------------------------------------------------------------
    def __enter__(self) -> SiteHook:
        stack = self._stack
        try:
            stack.enter_context(running_eagerly(self.model))
            handles = [
                self.model.register_forward_pre_hook(self._pass_begins, prepend=True),
                self.model.register_forward_hook(self._pass_ends, always_call=True),
            ]
            if self.site.io == "output":
                handles.append(self.module.register_forward_hook(self._on_output))
            else:
                handles.append(
                    self.module.register_forward_pre_hook(self._on_input, with_kwargs=True)
                )
            if self.writes and self.bypass is not None:
                # Prepended: every other hook on the bypass module sees the complete value.
                handles.append(self.bypass.register_forward_hook(self._on_bypass, prepend=True))
            for handle in handles:
                stack.callback(handle.remove)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *_: Any) -> None:
        self._stack.close()
        self._pending = None

    # -- the model's passes -------------------------------------------------------------------
    def _pass_begins(self, *_: Any) -> None:
        if is_set_aside(self):
            return
        if self._depth == 0 and not in_backward():
            self.calls, self.shapes, self._pending = 0, [], None
        self._depth += 1

    def _pass_ends(self, *_: Any) -> None:
        if not is_set_aside(self):
            self._depth = max(0, self._depth - 1)

    def _selected(self) -> bool:
        """Count this call; whether ``fn`` runs on it (``site.call`` picks one call)."""
        if is_set_aside(self):
            return False
        if in_backward():  # a checkpoint recomputing: counted in the forward already
            return self.writes
        if self._depth == 0:  # the module called on its own, outside the model
            self.calls, self.shapes = 0, []
        index = self.calls
        self.calls += 1
        call = self.site.call
        return call is None or call == "all" or call == index

    # -- the module ---------------------------------------------------------------------------
    def _on_output(self, module: nn.Module, _args: Any, output: Any) -> Any:
        if not self._selected():
            return None
        act, path = find_element(output, self.site.element)
        if act is None:
            return None
        new = self._call(act)
        return None if new is None else _replace(output, path, new)

    def _on_input(self, module: nn.Module, args: Any, kwargs: Any) -> Any:
        if not self._selected():
            return None
        act, where = find_argument(module, args, kwargs, self.site.arg)
        if act is None:
            return None
        new = self._call(act)
        return None if new is None else _replace_argument(args, kwargs, where, new)

    def _call(self, act: torch.Tensor) -> torch.Tensor | None:
        if not in_backward():
            self.shapes.append(tuple(act.shape))
            self.n_fired += 1
        if not self.writes:
            # A read is no part of the model's computation: dispatch modes around the model
            # (a FLOP counter, say) do not see the statistics' arithmetic.
            with _outside_dispatch_modes():
                self.fn(act)
            return None
        new = self.fn(act)
        if new is None:
            return None
        if new.shape != act.shape:
            raise ShapeMismatchError(
                f"A write at site {self.site.key!r} returned shape {tuple(new.shape)} for an "
                f"activation of shape {tuple(act.shape)}."
            )
        if self.bypass is not None:
            # The skip connection carries the old tensor: owe it the change. Not detached,
            # so gradients through the skip see the written tensor, as with a replacement.
            change = new - act
            self._pending = change if self._pending is None else self._pending + change
        return new

    def _on_bypass(self, module: nn.Module, _args: Any, output: Any) -> Any:
        if is_set_aside(self):
            return None
        change, self._pending = self._pending, None
        if change is None:
            return None
        act, path = find_element(output)
        if act is None or act.shape != change.shape:
            raise ShapeMismatchError(
                f"Site {self.site.key!r} names bypass={self.site.bypass!r}, whose output "
                f"({_describe(output if act is None else act)}) cannot receive the change of "
                f"shape {tuple(change.shape)}: the bypass must be the module whose output is "
                "the residual stream this site's tensor is added to."
            )
        return _replace(output, path, act + change.to(act.dtype))
