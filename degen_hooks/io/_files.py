"""``save`` and ``load``: write a save directory atomically, read it back without pickle."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .._errors import FormatError
from ..statistics import Statistics
from ._fingerprint import check_fingerprint, fingerprint
from ._metadata import (
    _FORMAT_NAME,
    FORMAT_VERSION,
    META_FILE,
    TENSORS_FILE,
    _sha256,
    _versions,
    read_metadata,
)
from ._registry import _DEFERRED, _REGISTRY, _entry_for, _lookup, _summary

# Weight-processing flags of TransformerLens models, copied into meta.json when recorded.
_PROCESSING_KEYS = (
    "fold_ln",
    "center_writing_weights",
    "center_unembed",
    "fold_value_biases",
    "refactor_factored_attn_matrices",
)


def _processing(obj: Any) -> dict[str, Any] | None:
    """Weight-processing flags recorded in ``obj.metadata``, if any.

    ``transformer_lens.record_metadata`` stores them under ``"transformer_lens"``; other
    code may use ``"processing"``, or top-level TransformerLens flag names.
    """
    metadata = getattr(obj, "metadata", None)
    if not isinstance(metadata, Mapping):
        return None
    for key in ("transformer_lens", "processing"):
        if isinstance(metadata.get(key), Mapping):
            return dict(metadata[key])
    flags = {k: metadata[k] for k in _PROCESSING_KEYS if k in metadata}
    return flags or None


def _cpu_contiguous(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise FormatError(
                f"to_parts returned {type(tensor).__name__} for {key!r}, not a Tensor."
            )
        tensor = tensor.detach().cpu()
        pointer = tensor.untyped_storage().data_ptr()
        # safetensors refuses tensors that share memory: copy views and repeats.
        if not tensor.is_contiguous() or (tensor.numel() and pointer in seen):
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        if tensor.numel():
            seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


def save(
    obj: Any,
    path: str | os.PathLike[str],
    *,
    model: torch.nn.Module | None = None,
    overwrite: bool = True,
) -> Path:
    """Save ``obj`` to the directory ``path`` (``meta.json`` + ``tensors.safetensors``).

    The directory is written next to ``path`` under a temporary name and then renamed into
    place, so an interrupted save never leaves a half-written result under ``path``.

    Args:
        obj: A registered object: :class:`~degen_hooks.Statistics`, an accumulator, an
            ``InteractionBasis``, ``SynchronizedNeurons``, ``InteractionGraph``, ``LLCResult``.
        path: Directory to write (created, parents too).
        model: If given, its :func:`fingerprint` is recorded (``load(path, model=...)`` and
            :func:`check_fingerprint` compare against it). Without it, a
            ``"model_fingerprint"`` in ``obj.metadata`` is recorded, if any.
        overwrite: Replace an existing degen_hooks save at ``path`` (default). Directories
            that are not degen_hooks saves are never replaced.

    Returns:
        The directory, as a ``Path``.

    Raises:
        FormatError: If ``obj`` is of no registered type or its layout is not JSON-able.
        FileExistsError: If ``path`` exists and may not be replaced.

    Examples:
        >>> import tempfile, torch, degen_hooks as dh
        >>> acc = dh.Covariance().update(torch.randn(10, 3))
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     back = load(save(acc, f"{tmp}/acts"))
        >>> torch.equal(back.cov(), acc.cov())
        True
    """
    from safetensors.torch import save_file

    path = Path(path)
    type_name, to_parts = _entry_for(obj)
    tensors, layout = to_parts(obj)
    tensors = _cpu_contiguous(tensors)
    recorded = getattr(obj, "metadata", None)
    recorded = recorded.get("model_fingerprint") if isinstance(recorded, Mapping) else None
    meta: dict[str, Any] = {
        "format": _FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        **_versions(),
        "type": type_name,
        "summary": _summary(obj, layout),
        "model_fingerprint": fingerprint(model) if model is not None else recorded,
        "processing": _processing(obj),
        "layout": layout,
    }
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as err:
        raise FormatError(
            f"Cannot save {type_name}: its layout/metadata is not JSON-serialisable ({err}). "
            "Keep metadata to str, int, float, bool, None, lists and dicts."
        ) from err
    _check_replaceable(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        header = {"format": _FORMAT_NAME, "format_version": str(FORMAT_VERSION), "type": type_name}
        save_file(tensors, str(tmp / TENSORS_FILE), metadata=header)
        meta["tensors"] = {
            "file": TENSORS_FILE,
            "bytes": (tmp / TENSORS_FILE).stat().st_size,
            "sha256": _sha256(tmp / TENSORS_FILE),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        _replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _check_replaceable(path: Path, overwrite: bool) -> None:
    if not path.exists():
        return
    if not path.is_dir():
        raise FileExistsError(f"{path} exists and is a file; save to a directory path instead.")
    contents = list(path.iterdir())
    if not contents:
        return
    if not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it.")
    if not (path / META_FILE).is_file() or set(p.name for p in contents) - {
        META_FILE,
        TENSORS_FILE,
    }:
        raise FileExistsError(
            f"{path} exists and is not a degen_hooks save (it holds "
            f"{sorted(p.name for p in contents)[:5]}); refusing to replace it. Choose a new path."
        )


def _replace(tmp: Path, path: Path) -> None:
    # Rename the old save away before renaming the new one in: at every moment one complete
    # save exists under some name.
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(path)


def _read_tensors(path: Path, meta: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    record = meta["tensors"]
    tensor_path = path / record["file"]
    if not tensor_path.is_file():
        raise FormatError(f"{path} lacks its tensor file {record['file']}: the save is incomplete.")
    size = tensor_path.stat().st_size
    if size != record["bytes"]:
        what = "truncated" if size < record["bytes"] else "corrupted"
        raise FormatError(
            f"{tensor_path} is {what}: it has {size} bytes, {record['bytes']} were written. "
            "Copy the save again from its source."
        )
    checksum = _sha256(tensor_path)
    if checksum != record["sha256"]:
        raise FormatError(
            f"{tensor_path} is corrupted: its SHA-256 is {checksum[:16]}..., "
            f"{record['sha256'][:16]}... was written. Copy the save again from its source."
        )
    try:
        return load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise FormatError(
            f"{tensor_path} is corrupted: safetensors cannot read it ({err})."
        ) from err


def load(
    path: str | os.PathLike[str],
    *,
    model: torch.nn.Module | None = None,
    device: torch.device | str | None = None,
) -> Any:
    """Load an object written by :func:`save`; no pickle is ever read.

    Args:
        path: The directory given to :func:`save`.
        model: If given, the saved model fingerprint must match it (see
            :func:`check_fingerprint`).
        device: Move the loaded object there (if it has ``.to``); default: CPU.

    Returns:
        The object, equal bit for bit to the one saved (JSON turns tuples into lists), on
        the CPU unless ``device`` is given. An object without ``.to`` stays on the CPU.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        FormatError: If the save is a pickle, incomplete, truncated, corrupted, of a newer
            format, of an unknown type, or of another model.
    """
    path = Path(path)
    meta = read_metadata(path)
    type_name = meta["type"]
    entry = _lookup(type_name) if isinstance(type_name, str) else None
    if entry is None:
        raise FormatError(
            f"{path} holds a {type_name!r}, a type this degen_hooks does not know (known: "
            f"{sorted(set(_REGISTRY) | set(_DEFERRED))}). It was saved by degen_hooks "
            f"{meta.get('library_version', '?')}: upgrade, or import the code that registers "
            "it with dh.io.register."
        )
    tensors = _read_tensors(path, meta)
    try:
        obj = entry[2](tensors, meta["layout"])
    except (KeyError, ValueError, TypeError, IndexError, AttributeError) as err:
        raise FormatError(
            f"{path}: cannot rebuild the {type_name} from its tensors and layout ({err}); "
            "meta.json and tensors.safetensors do not belong together or were edited."
        ) from err
    if model is not None:
        check_fingerprint(path, model)
    return obj if device is None else _move(obj, device)


def _move(obj: Any, device: torch.device | str) -> Any:
    if isinstance(obj, Statistics):
        for site in obj.values():
            for acc in site.accumulators().values():
                acc.to(device)
        return obj
    moved = obj.to(device) if hasattr(obj, "to") else None
    return obj if moved is None else moved
