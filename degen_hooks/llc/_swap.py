"""Tensors swapped into a model's parameter and buffer slots for one call, then put back.

``torch.func.functional_call`` does this too, but it restores a module that appears under
two names (``nn.Sequential(shared, act, shared)``) in the wrong order and leaves the swapped
tensor in place (torch 2.x, with or without ``tie_weights``). Here every (module, attribute)
slot is swapped exactly once and restored from what it held, whatever the order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch import Tensor, nn

__all__ = ["Slot", "slots", "swapped"]

Slot = tuple[nn.Module, str, str]
"""A module, the dict holding the tensor (``"_parameters"`` or ``"_buffers"``) and its key."""


def slots(model: nn.Module, named: Iterable[tuple[str, Tensor]]) -> dict[str, list[Slot]]:
    """The slots holding each distinct tensor, keyed by its first name; each slot once.

    Args:
        model: The model ``named`` comes from.
        named: ``model.named_parameters(remove_duplicate=False)`` (or ``named_buffers``):
            every name of every tensor, shared modules and tied weights included.

    Returns:
        ``{first name: [slot, ...]}``: a tied tensor has a slot per module holding it.
    """
    first: dict[int, str] = {}
    seen: set[tuple[int, str]] = set()
    groups: dict[str, list[Slot]] = {}
    for name, tensor in named:
        module_path, _, attr = name.rpartition(".")
        module = model.get_submodule(module_path)
        canonical = first.setdefault(id(tensor), name)
        if (id(module), attr) in seen:  # the same module reached by another path
            continue
        seen.add((id(module), attr))
        store = "_parameters" if attr in module._parameters else "_buffers"
        groups.setdefault(canonical, []).append((module, store, attr))
    return groups


@contextmanager
def swapped(items: list[tuple[Slot, Tensor]]) -> Iterator[None]:
    """Put each tensor in its slot for the ``with`` block; restore the originals after."""
    originals = [getattr(module, store)[attr] for (module, store, attr), _ in items]
    try:
        for (module, store, attr), value in items:
            getattr(module, store)[attr] = value
        yield
    finally:
        for ((module, store, attr), _), original in zip(items, originals, strict=True):
            getattr(module, store)[attr] = original
