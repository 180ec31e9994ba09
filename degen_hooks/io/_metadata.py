"""The on-disk format: file names, versions, checksums, and reading ``meta.json``.

``meta.json`` carries ``"meta_sha256"``: the SHA-256 of the canonical JSON (sorted keys, no
spaces, ASCII) of every *other* field, as parsed. Any edit that changes a value, anywhere in
the file, is refused on load; re-indenting or reordering keys (``jq .``) changes no value and
still loads. The tensor file's size and SHA-256 are fields of ``meta.json``, so the checksum
chain covers every byte :func:`~degen_hooks.io.load` uses.
"""

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
META_CHECKSUM = "meta_sha256"
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


def _content_sha256(meta: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of every field of ``meta`` but the checksum itself."""
    content = {k: v for k, v in meta.items() if k != META_CHECKSUM}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def _sealed_text(meta: dict[str, Any]) -> str:
    """``meta.json`` text with its checksum.

    The checksum is taken over ``meta`` as JSON will parse it back (tuples become lists, int
    keys strings), so the writer hashes exactly what a reader will see.
    """
    content = json.loads(json.dumps(meta))
    content.pop(META_CHECKSUM, None)
    content[META_CHECKSUM] = _content_sha256(content)
    return json.dumps(content, indent=2) + "\n"


def _write_metadata(path: str | os.PathLike[str], meta: dict[str, Any]) -> None:
    """Write ``meta`` (checksummed) as the ``meta.json`` of the save directory ``path``."""
    (Path(path) / META_FILE).write_text(_sealed_text(meta))


class _SaveFiles:
    """The files of one save directory, all read through one open handle of it.

    A concurrent :func:`~degen_hooks.io.save` renames a new directory into place; reading
    every file relative to the handle opened first means ``meta.json`` and the tensors always
    come from the same save (where the OS has ``dir_fd``; elsewhere, by path).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._identity: tuple[int, int] | None = None
        if os.open in os.supports_dir_fd and hasattr(os, "O_DIRECTORY"):
            self._fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            opened = os.fstat(self._fd)
            self._identity = (opened.st_dev, opened.st_ino)
        elif not path.is_dir():
            raise NotADirectoryError if path.exists() else FileNotFoundError

    def __enter__(self) -> _SaveFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def read(self, name: str) -> bytes | None:
        """The bytes of the file ``name`` of the save, or ``None`` if there is none."""
        try:
            if self._fd is None:
                return (self.path / name).read_bytes()
            with os.fdopen(os.open(name, os.O_RDONLY, dir_fd=self._fd), "rb") as handle:
                return handle.read()
        except (FileNotFoundError, IsADirectoryError):
            return None

    def names(self) -> list[str]:
        """The sorted names in the save directory."""
        return sorted(os.listdir(self.path if self._fd is None else self._fd))

    def replaced(self) -> bool:
        """Whether ``path`` no longer names the directory opened (a concurrent save)."""
        if self._identity is None:
            return False
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return True
        return (now.st_dev, now.st_ino) != self._identity


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


def read_metadata(path: str | os.PathLike[str], *, allow_unchecked: bool = False) -> dict[str, Any]:
    """Read and validate ``meta.json`` of a save, without loading the tensors.

    Args:
        path: A directory written by :func:`save`.
        allow_unchecked: Also accept a ``meta.json`` without a checksum (written before
            degen_hooks checksummed it), whose edits cannot be detected. A checksum that does
            not match is refused regardless.

    Returns:
        The parsed ``meta.json``: ``format_version``, ``library_version``, ``torch_version``,
        ``transformer_lens_version``, ``type``, ``summary``, ``model_fingerprint``,
        ``processing``, ``layout``, ``tensors``, ``meta_sha256``.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        FormatError: If ``path`` is no save (a pickle, a bare file, no meta.json), meta.json
            is corrupted, was modified after saving, has no checksum (unless
            ``allow_unchecked``), or was written by a newer format.
    """
    with _open_save(Path(path)) as files:
        return _parse_metadata(files, allow_unchecked=allow_unchecked)


def _open_save(path: Path) -> _SaveFiles:
    for _ in range(8):
        try:
            return _SaveFiles(path)
        except FileNotFoundError:
            break
        except NotADirectoryError:
            try:
                _refuse_file(path)
            except (FileNotFoundError, IsADirectoryError):
                continue  # replaced meanwhile (a concurrent save): look again
    raise FileNotFoundError(f"No degen_hooks save at {path}: the path does not exist.")


def _parse_metadata(files: _SaveFiles, *, allow_unchecked: bool) -> dict[str, Any]:
    path = files.path
    meta_path = path / META_FILE
    data = files.read(META_FILE)
    if data is None:
        raise FormatError(
            f"{path} has no {META_FILE}, so it is not a complete degen_hooks save (it holds "
            f"{files.names()[:8]}). Was the save interrupted, or is this another directory?"
        )
    try:
        meta = json.loads(data.decode("utf-8"))
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
    _check_content(meta_path, meta, allow_unchecked=allow_unchecked)
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


def _check_content(meta_path: Path, meta: dict[str, Any], *, allow_unchecked: bool) -> None:
    """Refuse a ``meta.json`` whose content is not the one its checksum was taken of."""
    recorded = meta.get(META_CHECKSUM)
    if recorded is None:
        if allow_unchecked:
            return
        raise FormatError(
            f"{meta_path} has no checksum ({META_CHECKSUM!r}), so edits to it cannot be "
            f"detected: it was written by degen_hooks {meta.get('library_version', '?')} "
            "before saves were checksummed, or the field was removed. If you trust it, load it "
            "once with dh.load(path, allow_unchecked=True) and save it again with "
            "dh.save(obj, path), which adds the checksum."
        )
    actual = _content_sha256(meta)
    if recorded != actual:
        shown = f"{recorded[:16]}..." if isinstance(recorded, str) else repr(recorded)
        raise FormatError(
            f"{meta_path} was modified after it was saved: the SHA-256 of its content is "
            f"{actual[:16]}..., {shown} was recorded when saving. Every field is covered "
            "(type, layout, dtypes, hyperparameters, the tensor file's checksum), so the save "
            "cannot be trusted. Re-create it with dh.save(obj, path) from the original object, "
            "or copy it again from its source."
        )
