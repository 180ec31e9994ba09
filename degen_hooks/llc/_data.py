"""Batches for the LLC chains: feeding a batch to the model, counting and cycling batches."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._errors import EmptyStatisticsError

__all__ = ["batch_size", "cycle", "default_forward", "first_batch_size"]


def default_forward(model: nn.Module, batch: Any) -> Any:
    """``model(batch)`` for a tensor, ``model(batch[0])`` for an ``(inputs, ...)`` tuple."""
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)) and batch:
        return model(batch[0])
    raise TypeError(
        f"Cannot feed a batch of type {type(batch).__name__} to the model: batches must be "
        "tensors or (inputs, targets) tuples. Pass forward=, e.g. "
        "forward=lambda model, batch: model(**batch)."
    )


def batch_size(batch: Any) -> int:
    """Number of samples in a batch: the first axis of its first tensor."""
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.ndim else 1
    if isinstance(batch, (tuple, list)) and batch:
        return batch_size(batch[0])
    if isinstance(batch, Mapping) and batch:
        return batch_size(next(iter(batch.values())))
    raise TypeError(
        f"Cannot count the samples in a batch of type {type(batch).__name__}: expected a "
        "tensor, a tuple of tensors or a dict of tensors. Pass n_beta explicitly."
    )


def first_batch_size(data: Iterable[Any]) -> int:
    """The batch size B of ``data``: a ``DataLoader``'s ``batch_size``, else its first batch's."""
    size = getattr(data, "batch_size", None)
    if isinstance(size, int) and size > 0:
        return size
    for batch in data:
        return batch_size(batch)
    raise EmptyStatisticsError("data holds no batches; the LLC needs at least one.")


def cycle(data: Iterable[Any], device: torch.device) -> Iterator[Any]:
    """Yield the batches of ``data`` on ``device``, starting over at the end."""
    while True:
        is_empty = True
        for batch in data:
            is_empty = False
            yield _to_device(batch, device)
        if is_empty:
            raise EmptyStatisticsError(
                "data yielded no batches when iterated again; pass a re-iterable such as a "
                "list of batches or a DataLoader."
            )


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        moved = [_to_device(b, device) for b in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    if isinstance(batch, Mapping):
        return {key: _to_device(value, device) for key, value in batch.items()}
    return batch
