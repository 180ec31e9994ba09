"""Shared validation helpers: row layout, finiteness, fitted estimators, name suggestions.

Low-level checks raise precise messages; public entry points add context once.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from ._errors import NotFittedError, ShapeMismatchError

__all__ = [
    "as_rows",
    "check_fitted",
    "check_width",
    "closest",
    "nonfinite_rows",
    "optional_import",
]


def as_rows(x: torch.Tensor, what: str = "activations") -> torch.Tensor:
    """Flatten every leading dimension into rows: shape ``(..., d) -> (n, d)``.

    Args:
        x: Tensor of shape ``(..., d)``; a 1-D tensor is one row.
        what: Name used in error messages.

    Returns:
        A 2-D view or copy of ``x``, shape ``(n, d)``.

    Raises:
        ShapeMismatchError: If ``x`` is not a tensor or is 0-dimensional.
    """
    if not isinstance(x, torch.Tensor):
        raise ShapeMismatchError(
            f"Expected {what} as a torch.Tensor of shape (..., d), got {type(x).__name__}."
        )
    if x.ndim == 0:
        raise ShapeMismatchError(
            f"Expected {what} of shape (..., d), got a 0-dimensional tensor (a scalar)."
        )
    return x.reshape(1, -1) if x.ndim == 1 else x.reshape(-1, x.shape[-1])


def check_width(expected: int | None, got: int, what: str) -> None:
    """Raise if a width seen now differs from the width seen before."""
    if expected is not None and expected != got:
        raise ShapeMismatchError(
            f"{what} has width {got}, but earlier batches had width {expected}. "
            "A site's last dimension must stay the same for the whole collection; "
            "collect differently shaped activations under different sites."
        )


def nonfinite_rows(x: torch.Tensor) -> torch.Tensor:
    """Boolean mask, shape ``(n,)``, of rows of ``x`` (``(n, d)``) holding NaN or inf."""
    return ~torch.isfinite(x).all(dim=-1)


def check_fitted(estimator: Any, attributes: Sequence[str]) -> None:
    """Raise :class:`NotFittedError` unless every fitted attribute exists."""
    missing = [a for a in attributes if not hasattr(estimator, a)]
    if missing:
        name = type(estimator).__name__
        raise NotFittedError(
            f"This {name} is not fitted yet (missing {', '.join(missing)}). "
            f"Call {name}(...).fit(stats) before using it."
        )


def closest(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The up to ``n`` candidates closest to ``name`` (difflib ratio), best first."""
    return difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.5)


def optional_import(module: str, purpose: str, package: str | None = None) -> Any:
    """Import an optional dependency, or raise an ImportError that says how to install it.

    Args:
        module: Module to import, e.g. ``"matplotlib.pyplot"``.
        purpose: What needs it, for the message (``"Plotting"``).
        package: The pip package name (default: the module's top-level name).
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        name = package or module.split(".")[0]
        raise ImportError(
            f"{purpose} needs {name}, an optional dependency: pip install {name} "
            "(or pip install 'degen-hooks[plot]')."
        ) from err
