"""Model fingerprints: which parameters a saved result was computed on."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import Any

import torch

from .._errors import FormatError
from ._metadata import read_metadata


def fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over a model's parameter names, shapes, dtypes and bytes.

    Parameters are visited in sorted name order; a DDP / DataParallel wrapper is looked
    through, so the wrapped and the bare model agree. Buffers are not included.

    Args:
        model: Any ``nn.Module``.

    Returns:
        ``"sha256:<64 hex digits>"``.

    Examples:
        >>> import torch
        >>> a = torch.nn.Linear(2, 2)
        >>> fingerprint(a) == fingerprint(a), fingerprint(a) == fingerprint(torch.nn.Linear(2, 2))
        (True, False)
    """
    inner = getattr(model, "module", None)
    if isinstance(inner, torch.nn.Module) and type(model).__name__ in (
        "DistributedDataParallel",
        "DataParallel",
    ):
        model = inner
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        tensor = param.detach().cpu().contiguous()
        header = f"{name}\0{tuple(tensor.shape)}\0{str(tensor.dtype)}\0{tensor.numel()}\0"
        digest.update(header.encode())
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return "sha256:" + digest.hexdigest()


def check_fingerprint(obj_or_metadata: Any, model: torch.nn.Module) -> None:
    """Raise unless ``model`` has the parameters the saved result was computed on.

    Args:
        obj_or_metadata: A save directory, its :func:`read_metadata` dict, or an object whose
            ``metadata`` dict (or plain dict) holds ``"model_fingerprint"``.
        model: The model to compare with.

    Raises:
        FormatError: If no fingerprint was recorded, or it differs from ``model``'s.
    """
    where = "the result"
    if isinstance(obj_or_metadata, (str, os.PathLike)):
        where = str(obj_or_metadata)
        obj_or_metadata = read_metadata(obj_or_metadata)
    # An object's own metadata first: Statistics is a Mapping too, of sites.
    attribute = getattr(obj_or_metadata, "metadata", None)
    if isinstance(attribute, Mapping):
        meta, where = attribute, f"this {type(obj_or_metadata).__name__}"
    elif isinstance(obj_or_metadata, Mapping):
        meta = obj_or_metadata
    else:
        meta, where = {}, f"this {type(obj_or_metadata).__name__}"
    _check_recorded(meta.get("model_fingerprint"), model, where)


def _check_recorded(saved: Any, model: torch.nn.Module, where: str) -> None:
    """Raise unless ``saved``, the fingerprint recorded for ``where``, is ``model``'s."""
    if saved is None:
        raise FormatError(
            f"No model fingerprint is recorded for {where}, so it cannot be checked. Save with "
            "dh.save(obj, path, model=model) to record one."
        )
    current = fingerprint(model)
    if saved != current:
        raise FormatError(
            f"{where} was computed on a model with fingerprint {str(saved)[:23]}..., but this "
            f"{type(model).__name__} has {current[:23]}...: the parameters differ (another "
            "checkpoint or seed, weights processed differently (fold_ln, centering), or another "
            "dtype). Use the model the result was computed on."
        )
