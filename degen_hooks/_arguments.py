"""Argument checks shared by the accumulators: real tensors, sample counts, per-row masks.

Each refuses with the value it was given and what it expected, before any state changes.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch

from ._errors import ShapeMismatchError

__all__ = ["check_count"]


def _real(value: Any, what: str) -> torch.Tensor:
    """``value`` as a tensor of real numbers, or a TypeError naming ``what``."""
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(
                f"{what} must be a tensor of real numbers, got {type(value).__name__} "
                f"{str(value)[:60]!r}."
            ) from err
    if value.is_complex():
        raise TypeError(f"{what} must be real, got dtype {value.dtype}.")
    return value


def _count_field(state: Mapping[str, Any], key: str) -> int:
    value = _real(state[key], f"State field {key!r}")
    if value.numel() != 1:
        raise ShapeMismatchError(
            f"State field {key!r} must be a single number, got shape {tuple(value.shape)}."
        )
    number = value.item()
    if not float(number).is_integer() or number < 0:
        raise ValueError(f"State field {key!r} must be a non-negative integer, got {number}.")
    return int(number)


def check_count(count: Any, what: str = "count") -> float:
    """A number of samples as a finite, non-negative float (a fraction is allowed)."""
    if isinstance(count, torch.Tensor):
        if count.numel() != 1 or count.is_complex() or count.dtype == torch.bool:
            raise TypeError(
                f"{what} must be a real number (the samples the rows stand for), got a "
                f"{count.dtype} tensor of shape {tuple(count.shape)}."
            )
        count = count.item()
    if isinstance(count, bool) or not isinstance(count, numbers.Real):
        raise TypeError(
            f"{what} must be a real number (the samples the rows stand for), got "
            f"{type(count).__name__} {count!r}."
        )
    value = float(count)
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"{what} must be finite and non-negative (the samples the rows stand for), got "
            f"{value:g}."
        )
    return value


def _mask_rows(mask: Any, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A boolean row mask: bool, or 0/1 numbers (an attention mask); anything else refused."""
    values = _rows_of(_real(mask, "mask"), x, "mask", device, None)
    if values.dtype != torch.bool:
        odd = (values != 0) & (values != 1)
        if bool(odd.any()):
            raise ValueError(
                f"mask must be boolean (True keeps a sample) or 0/1, got the value "
                f"{values[odd][0].item():g}. Pass weights= for fractional weights, or "
                "mask=(m > 0) for a threshold."
            )
        values = values != 0
    return values


def _rows_of(
    values: torch.Tensor | None,
    x: torch.Tensor,
    what: str,
    device: torch.device,
    dtype: torch.dtype | None,
) -> torch.Tensor | None:
    """Flatten per-sample ``weights``/``mask`` to match the rows of ``x``."""
    if values is None:
        return None
    values = torch.as_tensor(values)
    expected = x.shape[:-1] if x.ndim > 1 else (1,)
    if tuple(values.shape) != tuple(expected):
        raise ShapeMismatchError(
            f"{what} has shape {tuple(values.shape)}, but the activations have leading "
            f"shape {tuple(expected)} (activations {tuple(x.shape)}). Give one {what[:-1]} "
            "value per sample."
        )
    return values.reshape(-1).to(device=device, dtype=dtype)
