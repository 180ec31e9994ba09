"""Model families, found by the model's type: the core's only door to an adapter.

The core (sites, collect, build) never imports a model family. It asks :func:`family_of`
for the adapter of a model, found by convention: a model whose classes come from the package
``P`` (``transformer_lens``, ``transformers``, ...) is adapted by the module
``degen_hooks.families.P``, imported the first time such a model is seen. A new family is
therefore one new module, with no edit to the core. An adapter may define any of:

* ``site_modules(model) -> {name: module}``: every name a site may use (default:
  ``named_modules()``), e.g. a TransformerLens bridge's hook aliases;
* ``write_bypass(model, name) -> str | None``: the module a write at ``name`` must also
  change (see ``Site.bypass``);
* ``record_metadata(stats, model, stacklevel)``: family settings that change what the
  statistics mean (e.g. TransformerLens weight processing);
* ``find_sections(model, sites, output_site, output_positions)``: closed-form sections
  between sites, for ``build_bases(sections="auto")``.
"""

from __future__ import annotations

import importlib
from functools import cache
from types import ModuleType
from typing import Any

from torch import nn

__all__ = ["family_of", "family_hook"]

# Packages whose classes say nothing of a model's family.
_NOT_FAMILIES = frozenset({"torch", "builtins", "degen_hooks", "typing", "abc", "collections"})


def family_of(model: nn.Module) -> ModuleType | None:
    """The adapter module of ``model``'s family, or ``None`` (a plain PyTorch model).

    Args:
        model: The model (unwrap DDP and ``torch.compile`` wrappers first).

    Returns:
        ``degen_hooks.families.<package>`` for the first class in ``type(model).__mro__``
        defined in a package that has an adapter; ``None`` if none has.

    Examples:
        >>> family_of(nn.Linear(2, 2)) is None
        True
    """
    return _adapter(type(model))


@cache
def _adapter(cls: type) -> ModuleType | None:
    for klass in cls.__mro__:
        package = klass.__module__.split(".")[0]
        if package in _NOT_FAMILIES:
            continue
        try:
            return importlib.import_module(f"degen_hooks.families.{package}")
        except ModuleNotFoundError as err:
            if err.name != f"degen_hooks.families.{package}":
                raise  # the adapter exists but needs something missing: say so
    return None


def family_hook(model: nn.Module, name: str) -> Any:
    """The adapter function ``name`` of ``model``'s family, or ``None``."""
    family = family_of(model)
    return None if family is None else getattr(family, name, None)
