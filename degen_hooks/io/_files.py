"""``save`` and ``load``: write a save directory atomically, read it back without pickle."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .._errors import DegenHooksError, FormatError, SaveError, SaveExistsError
from ..statistics import Statistics
from ._fingerprint import _check_recorded, fingerprint
from ._metadata import (
    _FORMAT_NAME,
    FORMAT_VERSION,
    META_FILE,
    TENSORS_FILE,
    _open_save,
    _parse_metadata,
    _SaveFiles,
    _sealed_text,
    _sha256,
    _versions,
)
from ._registry import _DEFERRED, _REGISTRY, _entry_for, _lookup, _summary

# Suffixes of single-file formats: a path ending in one is a file name, not a save folder.
_FILE_SUFFIXES = frozenset(
    {".safetensors", ".json", ".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".npy", ".npz"}
    | {".h5", ".hdf5", ".zip", ".tar", ".gz"}
)
# How often a save retries renaming its folder into place while concurrent saves to the same
# path keep replacing it; each retry means another save finished, so this bounds only how
# many saves may race, not how long.
_RENAME_ATTEMPTS = 64

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

    The directory is written next to ``path`` under a unique temporary name and then renamed
    into place, so an interrupted save never leaves a half-written result under ``path``, and
    concurrent saves to one path (threads or processes) leave one complete save of one of
    them. A ``path`` that is a symbolic link is saved where the link points (the link stays).

    Args:
        obj: A registered object: :class:`~degen_hooks.Statistics`, an accumulator, an
            ``InteractionBasis``, ``SynchronizedNeurons``, ``InteractionGraph``, ``LLCResult``.
        path: Directory to write (created, parents too). Not a file name: a path ending in
            ``.safetensors``, ``.json``, ``.pt`` and the like is refused.
        model: If given, its :func:`fingerprint` is recorded (``load(path, model=...)`` and
            :func:`check_fingerprint` compare against it). Without it, a
            ``"model_fingerprint"`` in ``obj.metadata`` is recorded, if any.
        overwrite: Replace an existing degen_hooks save at ``path`` (default). Directories
            that are not degen_hooks saves are never replaced.

    Returns:
        The directory, as a ``Path`` (``path`` as given).

    Raises:
        FormatError: If ``obj`` is of no registered type, its layout is not JSON-able, or
            ``path`` names a file (``"a.safetensors"``).
        SaveExistsError: If ``path`` exists and may not be replaced (a ``FileExistsError``).
        SaveError: If the operating system refuses to write the save (an ``OSError``).

    Examples:
        >>> import tempfile, torch, degen_hooks as dh
        >>> acc = dh.Covariance().update(torch.randn(10, 3))
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     back = load(save(acc, f"{tmp}/acts"))
        >>> torch.equal(back.cov(), acc.cov())
        True
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix.lower() in _FILE_SUFFIXES:
        raise FormatError(
            f"dh.save writes a folder (holding {META_FILE} and {TENSORS_FILE}), but {path} "
            f"names a {path.suffix} file. Save to '{path.with_suffix('')}' instead; dh.load "
            "reads that folder back."
        )
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
    # A symlinked folder is saved where it points: replacing the link itself would leave the
    # earlier save at its target, for whoever loads the target.
    target = Path(os.path.realpath(path))
    _check_replaceable(target, overwrite)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Unique per save, not per process: threads of one process may save to one path.
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
    except OSError as err:
        raise _save_error(path, err) from err
    try:
        header = {"format": _FORMAT_NAME, "format_version": str(FORMAT_VERSION), "type": type_name}
        save_file(tensors, str(tmp / TENSORS_FILE), metadata=header)
        meta["tensors"] = {
            "file": TENSORS_FILE,
            "bytes": (tmp / TENSORS_FILE).stat().st_size,
            "sha256": _sha256(tmp / TENSORS_FILE),
        }
        (tmp / META_FILE).write_text(_sealed_text(meta))
        _replace(tmp, target, overwrite)
    except (OSError, SafetensorError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, DegenHooksError):
            raise
        raise _save_error(path, err) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _save_error(path: Path, err: Exception) -> SaveError:
    reason = getattr(err, "strerror", None) or err
    return SaveError(
        f"Cannot write the save {path}: {reason} ({type(err).__name__}). Check that its "
        "parent is a writable folder with free space."
    )


def _check_replaceable(path: Path, overwrite: bool) -> None:
    try:
        is_file = not stat.S_ISDIR(os.stat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return  # absent (a parent that is a file fails with a SaveError when created)
    if is_file:
        raise SaveExistsError(f"{path} exists and is a file; save to a directory path instead.")
    names = _names(path)
    if not names:
        return  # absent or empty
    if not overwrite:
        raise SaveExistsError(f"{path} already exists; pass overwrite=True to replace it.")
    if not _is_save_listing(names):
        raise SaveExistsError(
            f"{path} exists and is not a degen_hooks save (it holds {names[:5]}); refusing "
            "to replace it. Choose a new path."
        )


def _names(path: Path) -> list[str] | None:
    """The sorted names in the directory ``path`` (``None`` if absent), listed consistently.

    A concurrent save may rename the directory away and delete it while it is listed, which
    would give a partial listing. The listing is kept only if ``path`` still names the very
    directory listed afterwards: then nobody had begun deleting it (saves delete only after
    renaming away), so the listing is complete.
    """
    if not (os.listdir in os.supports_fd and hasattr(os, "O_DIRECTORY")):
        try:
            return sorted(os.listdir(path))
        except (FileNotFoundError, NotADirectoryError):
            return None
    names: list[str] = []
    for _ in range(_RENAME_ATTEMPTS):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            names = os.listdir(fd)
            listed, now = os.fstat(fd), os.stat(path)
        except FileNotFoundError:
            continue
        finally:
            os.close(fd)
        if (listed.st_dev, listed.st_ino) == (now.st_dev, now.st_ino):
            break
    return sorted(names)


def _is_save_listing(names: list[str]) -> bool:
    """Whether a directory holding ``names`` is a degen_hooks save and nothing else."""
    return META_FILE in names and set(names) <= {META_FILE, TENSORS_FILE}


def _replace(tmp: Path, path: Path, overwrite: bool) -> None:
    """Rename the finished save ``tmp`` to ``path``, replacing the save there, if any.

    ``rename`` is atomic but cannot replace a non-empty directory: the old save is renamed
    away first, under a unique name, then deleted. A concurrent save may rename its own
    folder in between; then the loop moves that one away in turn. At every moment each
    folder named ``path`` is one complete save.
    """
    for _ in range(_RENAME_ATTEMPTS):
        try:
            os.rename(tmp, path)
            return
        except OSError as err:
            # ENOTEMPTY / EEXIST: a save is there (another one may just have renamed it in).
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        try:
            is_file = not stat.S_ISDIR(os.stat(path).st_mode)
        except FileNotFoundError:
            continue  # moved away meanwhile by a concurrent save
        if is_file:
            raise SaveExistsError(f"{path} exists and is a file; save to a directory path instead.")
        if not overwrite:
            raise SaveExistsError(f"{path} already exists; pass overwrite=True to replace it.")
        old = path.parent / f".{path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        try:
            os.rename(path, old)
        except FileNotFoundError:
            continue  # a concurrent save moved it away first
        names = _names(old)
        if names and not _is_save_listing(names):
            # Not ours to delete (created meanwhile by someone else): put it back.
            try:
                os.rename(old, path)
            except OSError:
                pass
            raise SaveExistsError(
                f"{path} was replaced by a directory that is not a degen_hooks save while "
                f"saving; refusing to replace it (it is kept, at {path} or {old})."
            )
        shutil.rmtree(old, ignore_errors=True)
    raise SaveError(
        f"Cannot save to {path}: {_RENAME_ATTEMPTS} concurrent saves to the same path replaced "
        "it in turn. Save to distinct paths, or one at a time."
    )


def _read_tensors(files: _SaveFiles, meta: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load as deserialize

    path, record = files.path, meta["tensors"]
    tensor_path = path / record["file"]
    # Read once: the bytes checked are the bytes parsed, even if the file changes meanwhile.
    data = files.read(record["file"])
    if data is None:
        raise FormatError(f"{path} lacks its tensor file {record['file']}: the save is incomplete.")
    if len(data) != record["bytes"]:
        what = "truncated" if len(data) < record["bytes"] else "corrupted"
        raise FormatError(
            f"{tensor_path} is {what}: it has {len(data)} bytes, {record['bytes']} were "
            "written. Copy the save again from its source."
        )
    checksum = hashlib.sha256(data).hexdigest()
    if checksum != record["sha256"]:
        raise FormatError(
            f"{tensor_path} is corrupted: its SHA-256 is {checksum[:16]}..., "
            f"{record['sha256'][:16]}... was written, so it was modified after it was saved. "
            "Copy the save again from its source, or re-create it with dh.save(obj, path)."
        )
    try:
        return deserialize(data)
    except (SafetensorError, OSError, ValueError) as err:
        raise FormatError(
            f"{tensor_path} is corrupted: safetensors cannot read it ({err})."
        ) from err


def load(
    path: str | os.PathLike[str],
    *,
    model: torch.nn.Module | None = None,
    device: torch.device | str | None = None,
    allow_unchecked: bool = False,
) -> Any:
    """Load an object written by :func:`save`; no pickle is ever read.

    Every byte used is checked first: ``meta.json`` against the checksum it records of its
    content, the tensor file against the size and SHA-256 recorded in ``meta.json``.

    Args:
        path: The directory given to :func:`save`.
        model: If given, the saved model fingerprint must match it (see
            :func:`check_fingerprint`).
        device: Move the loaded object there (if it has ``.to``); default: CPU.
        allow_unchecked: Also load a save whose ``meta.json`` has no checksum (written before
            degen_hooks checksummed it); its edits cannot be detected, so save it again. The
            tensor file is checked regardless, and a checksum that does not match is always
            refused.

    Returns:
        The object, equal bit for bit to the one saved (JSON turns tuples into lists), on
        the CPU unless ``device`` is given. An object without ``.to`` stays on the CPU.

    Raises:
        FileNotFoundError: If ``path`` does not exist (also, for an instant, while a
            concurrent save replaces it; a load otherwise sees the old or the new save whole).
        FormatError: If the save is a pickle, incomplete, truncated, corrupted, modified after
            saving, without a checksum (unless ``allow_unchecked``), of a newer format, of an
            unknown type, or of another model.
    """
    path = Path(path)
    for _ in range(_RENAME_ATTEMPTS):
        # One handle on the directory for every file: a concurrent save cannot mix two saves.
        with _open_save(path) as files:
            try:
                meta = _parse_metadata(files, allow_unchecked=allow_unchecked)
                tensors = _read_tensors(files, meta)
            except FormatError:
                # A concurrent save replaced the directory and deleted it while it was read:
                # read the new one.
                if files.replaced():
                    continue
                raise
        break
    else:
        raise FormatError(
            f"Cannot load {path}: concurrent saves replaced it {_RENAME_ATTEMPTS} times while "
            "it was read. Load it once the saves are done."
        )
    type_name = meta["type"]
    entry = _lookup(type_name) if isinstance(type_name, str) else None
    if entry is None:
        raise FormatError(
            f"{path} holds a {type_name!r}, a type this degen_hooks does not know (known: "
            f"{sorted(set(_REGISTRY) | set(_DEFERRED))}). It was saved by degen_hooks "
            f"{meta.get('library_version', '?')}: upgrade, or import the code that "
            "registers it with dh.io.register."
        )
    try:
        obj = entry[2](tensors, meta["layout"])
    except (KeyError, ValueError, TypeError, IndexError, AttributeError) as err:
        raise FormatError(
            f"{path}: cannot rebuild the {type_name} from its tensors and layout ({err}); "
            "meta.json and tensors.safetensors do not belong together or were edited."
        ) from err
    if model is not None:
        _check_recorded(meta.get("model_fingerprint"), model, str(path))
    return obj if device is None else _move(obj, device)


def _move(obj: Any, device: torch.device | str) -> Any:
    if isinstance(obj, Statistics):
        for site in obj.values():
            for acc in site.accumulators().values():
                acc.to(device)
        return obj
    moved = obj.to(device) if hasattr(obj, "to") else None
    return obj if moved is None else moved
