"""The on-disk format: file names, versions, checksums, and reading ``meta.json``."""

from __future__ import annotations

import hashlib
import json
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from .._errors import FormatError

FORMAT_VERSION = 1
META_FILE = "meta.json"
TENSORS_FILE = "tensors.safetensors"
_FORMAT_NAME = "degen_hooks"


def _versions() -> dict[str, str | None]:
    def installed(dist: str) -> str | None:
        try:
            return version(dist)
        except PackageNotFoundError:
            return None

    return {
        "library_version": installed("degen-hooks") or "0.0.0",
        "torch_version": torch.__version__,
        "transformer_lens_version": installed("transformer-lens") or installed("transformer_lens"),
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_PICKLE_PROTOCOLS = {bytes([0x80, p]) for p in range(2, 6)}


def _refuse_file(path: Path) -> None:
    with path.open("rb") as handle:
        head = handle.read(16)
    if head.startswith(b"PK\x03\x04"):
        kind = "a zip archive (the torch.save format), which holds a pickle"
    elif head[:2] in _PICKLE_PROTOCOLS:
        kind = "a pickle file"
    else:
        kind = None
    if kind is not None:
        raise FormatError(
            f"{path} is {kind}, not a degen_hooks save. degen_hooks never unpickles (loading "
            "a pickle can run arbitrary code). If you trust the file, load it yourself "
            "(torch.load(path, weights_only=True)), rebuild the object and dh.save(obj, "
            "directory) it."
        )
    if path.name in (META_FILE, TENSORS_FILE):
        raise FormatError(
            f"{path} is one file of a degen_hooks save; pass its directory {path.parent}."
        )
    raise FormatError(
        f"{path} is a file, not a degen_hooks save: dh.save writes a directory holding "
        f"{META_FILE} and {TENSORS_FILE}; pass that directory."
    )


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate ``meta.json`` of a save, without loading the tensors.

    Args:
        path: A directory written by :func:`save`.

    Returns:
        The parsed ``meta.json``: ``format_version``, ``library_version``, ``torch_version``,
        ``transformer_lens_version``, ``type``, ``summary``, ``model_fingerprint``,
        ``processing``, ``layout``, ``tensors``.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        FormatError: If ``path`` is no save (a pickle, a bare file, no meta.json), meta.json
            is corrupted, or it was written by a newer format.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No degen_hooks save at {path}: the path does not exist.")
    if not path.is_dir():
        _refuse_file(path)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        found = sorted(p.name for p in path.iterdir())[:8]
        raise FormatError(
            f"{path} has no {META_FILE}, so it is not a complete degen_hooks save (it holds "
            f"{found}). Was the save interrupted, or is this another directory?"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FormatError(f"{meta_path} is corrupted: not valid JSON ({err}).") from err
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT_NAME:
        raise FormatError(f"{meta_path} is not a degen_hooks header (no 'format': 'degen_hooks').")
    found_version = meta.get("format_version")
    if not isinstance(found_version, int) or found_version < 1:
        raise FormatError(f"{meta_path} has an invalid format_version {found_version!r}.")
    if found_version > FORMAT_VERSION:
        ours = _versions()["library_version"]
        raise FormatError(
            f"{path} was saved by degen_hooks {meta.get('library_version', '?')} with format "
            f"{found_version}; this version ({ours}) reads formats up to {FORMAT_VERSION}. "
            "Upgrade: pip install -U degen-hooks."
        )
    missing = {"type", "layout", "tensors"} - set(meta)
    if missing:
        raise FormatError(f"{meta_path} is corrupted: it lacks {sorted(missing)}.")
    record = meta["tensors"]
    if not (
        isinstance(record, dict)
        and isinstance(record.get("file"), str)
        and Path(record["file"]).name == record["file"]  # a file inside the save, no path
        and isinstance(record.get("bytes"), int)
        and isinstance(record.get("sha256"), str)
    ):
        raise FormatError(
            f"{meta_path} is corrupted: 'tensors' should be {{'file', 'bytes', 'sha256'}}, "
            f"got {record!r}."
        )
    return meta
