"""Shared validation helpers: row layout, finiteness, memory, fitted estimators, name suggestions.

Low-level checks raise precise messages; public entry points add context once.
"""

from __future__ import annotations

import difflib
import importlib
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from ._errors import NotFittedError, ShapeMismatchError, StatisticsTooLargeError

__all__ = [
    "StatisticsTooLargeError",
    "as_rows",
    "available_memory",
    "check_fitted",
    "check_fits_in_memory",
    "check_width",
    "closest",
    "nonfinite_rows",
    "largest",
    "optional_import",
    "random_directions",
    "relative_tolerance",
]

# Below this many bytes an allocation is not checked against the free memory: querying it
# costs a system call, and a state this small fails (if at all) with torch's own error.
_CHECKED_BYTES = 64 * 2**20


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


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device``, or ``None`` when unknown.

    CPU: the available memory (``psutil``), else the physical memory (``os.sysconf``).
    CUDA: the device's free memory plus the blocks PyTorch's caching allocator holds unused.
    Other devices (``meta``, ``mps``, ...): ``None``.
    """
    try:
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            free, _ = torch.cuda.mem_get_info(index)
            cached = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
            return int(free) + max(int(cached), 0)
        if device.type == "cpu":
            try:
                import psutil
            except ImportError:
                return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
            return int(psutil.virtual_memory().available)
    except (AttributeError, OSError, RuntimeError, ValueError):
        return None  # an unknown platform: let the allocation itself decide
    return None


def check_fits_in_memory(n_bytes: int, device: torch.device, what: str, hint: str = "") -> None:
    """Raise :class:`StatisticsTooLargeError` if ``n_bytes`` cannot fit on ``device``.

    Call it before allocating, so nothing is allocated (or changed) when it raises. States
    under 64 MiB are not checked (no system call on the common path).

    Args:
        n_bytes: The estimated size of what is about to be allocated.
        device: Where it would be allocated.
        what: What needs the memory, for the message (``"Covariance(d_site=768)"``).
        hint: How to need less, appended to the message.

    Raises:
        StatisticsTooLargeError: If the estimate exceeds the memory available on ``device``.
    """
    if n_bytes < _CHECKED_BYTES:
        return
    available = available_memory(torch.device(device))
    if available is None or n_bytes <= available:
        return
    raise StatisticsTooLargeError(
        f"{what} needs about {n_bytes / 2**30:,.2f} GiB, but only {available / 2**30:,.2f} "
        f"GiB of memory is available on {device}. Nothing was allocated. {hint}".rstrip()
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


def relative_tolerance(dtype: torch.dtype, float64: float = 1e-9) -> float:
    """How far, relative to its scale, a tensor of ``dtype`` the model computed may differ
    from the float64 closed form's value by rounding alone: ``float64`` for 64-bit floats,
    ``1e-4`` for 32-bit, ``3e-2`` for half precision."""
    bits = torch.finfo(dtype).bits if dtype.is_floating_point else 64
    return {64: float64, 32: 1e-4}.get(bits, 3e-2)


def random_directions(width: int, device: torch.device | str, n: int = 2) -> torch.Tensor:
    """``n`` fixed random directions of ``R^width`` (``(width, n)``, float64, seed 0).

    A check of a linear map (``y = x W + b``) on them costs ``O(width)`` a row, not a matrix
    product, and misses a change of ``y`` only on a set of measure zero: the closed forms'
    checks of what a model computed use them.
    """
    generator = torch.Generator().manual_seed(0)
    return torch.randn(width, n, generator=generator, dtype=torch.float64).to(device)


def largest(t: torch.Tensor) -> float:
    """``max |t|`` in one pass, without a temporary (0 for an empty tensor; NaN if any)."""
    if not t.numel():
        return 0.0
    low, high = torch.aminmax(t)  # one vectorized pass (an infinity norm is slower on CPU)
    if torch.isnan(high) or torch.isnan(low):
        return float("nan")
    return max(-float(low), float(high))
