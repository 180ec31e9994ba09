"""Save and load results: safetensors for tensors, a JSON header for everything else.

``dh.save(obj, path)`` writes a *directory*::

    path/
      meta.json             format_version, versions, type, layout, summary, fingerprint
      tensors.safetensors   every tensor, bit for bit (no pickle anywhere)

A directory rather than one file keeps ``meta.json`` readable with any text tool (``cat``,
``jq``) and leaves room for later formats to add files. ``meta.json`` records the byte size and
SHA-256 of the tensor file, so truncation and corruption are caught before anything is parsed.
Loading never unpickles: a pickle / ``torch.save`` file given by mistake is recognised by its
magic bytes and refused with a message.

What can be saved is decided by a registry ``{type name: (class, to_parts, from_parts)}``:

* ``to_parts(obj) -> (tensors, layout)``: a flat ``{name: Tensor}`` dict and a JSON-able dict.
* ``from_parts(tensors, layout) -> obj``: rebuilds the object.

:class:`~degen_hooks.Statistics` and the accumulators are registered here (they sit below this
module). Higher modules are *not* imported by this module at import time: the built-in types
above it (``InteractionBasis``, ``SynchronizedNeurons``, ``InteractionGraph``, ``LLCResult``)
are listed by import path in ``_DEFERRED`` and imported the first time they are needed, using
their ``state_dict()`` / ``metadata()`` / ``from_state_dict`` (or ``from_state``) methods. Other
code registers its own classes with :func:`register`.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
from collections.abc import Callable, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from ._errors import FormatError
from .accumulators import CoFiring, Covariance, SecondMoment
from .statistics import SiteStatistics, Statistics

__all__ = [
    "FORMAT_VERSION",
    "check_fingerprint",
    "fingerprint",
    "load",
    "read_metadata",
    "register",
    "save",
]

FORMAT_VERSION = 1
META_FILE = "meta.json"
TENSORS_FILE = "tensors.safetensors"
_FORMAT_NAME = "degen_hooks"

ToParts = Callable[[Any], tuple[Mapping[str, torch.Tensor], dict[str, Any]]]
FromParts = Callable[[dict[str, torch.Tensor], dict[str, Any]], Any]

_REGISTRY: dict[str, tuple[type, ToParts, FromParts]] = {}

# Types defined above this module, imported only when first saved or loaded.
_DEFERRED = {
    "InteractionBasis": "degen_hooks.basis:InteractionBasis",
    "SynchronizedNeurons": "degen_hooks.synchronized:SynchronizedNeurons",
    "InteractionGraph": "degen_hooks.graph.edges:InteractionGraph",
    "LLCResult": "degen_hooks.llc:LLCResult",
}

# Weight-processing flags of TransformerLens models, copied into meta.json when recorded.
_PROCESSING_KEYS = (
    "fold_ln",
    "center_writing_weights",
    "center_unembed",
    "fold_value_biases",
    "refactor_factored_attn_matrices",
)


# -- registry ---------------------------------------------------------------------------------
def register(
    cls: type, to_parts: ToParts, from_parts: FromParts, *, name: str | None = None
) -> None:
    """Make instances of ``cls`` savable with :func:`save` and loadable with :func:`load`.

    Args:
        cls: The class; only exact instances are saved with this entry (a subclass needs its
            own, so that it is not silently loaded as its parent).
        to_parts: ``obj -> (tensors, layout)``: a flat ``{str: Tensor}`` dict and a JSON-able
            dict holding everything else needed to rebuild ``obj``.
        from_parts: ``(tensors, layout) -> obj``, the inverse. It may raise ``KeyError``,
            ``ValueError`` or ``TypeError`` on inconsistent input; :func:`load` turns those
            into :class:`~degen_hooks.FormatError`.
        name: The type name written to ``meta.json``; defaults to ``cls.__name__``. Keep it
            stable: files name their type with it.

    Raises:
        ValueError: If ``name`` is already registered for another class.

    Examples:
        >>> class Pair:
        ...     def __init__(self, a): self.a = a
        >>> register(Pair, lambda p: ({"a": p.a}, {}), lambda t, layout: Pair(t["a"]))
    """
    key = name or cls.__name__
    existing = _REGISTRY.get(key)
    if existing is not None and existing[0] is not cls:
        raise ValueError(
            f"The type name {key!r} is already registered for {existing[0].__module__}."
            f"{existing[0].__qualname__}; pass name='...' to register {cls.__qualname__}."
        )
    _REGISTRY[key] = (cls, to_parts, from_parts)


def _protocol_parts(cls: type) -> tuple[ToParts, FromParts]:
    """Adapters for classes with ``state_dict()``, ``metadata()`` and a rebuild classmethod."""
    rebuild = getattr(cls, "from_state_dict", None) or cls.from_state

    def to_parts(obj: Any) -> tuple[Mapping[str, torch.Tensor], dict[str, Any]]:
        return obj.state_dict(), obj.metadata()

    def from_parts(tensors: dict[str, torch.Tensor], layout: dict[str, Any]) -> Any:
        return rebuild(tensors, layout)

    return to_parts, from_parts


def _lookup(name: str) -> tuple[type, ToParts, FromParts] | None:
    if name not in _REGISTRY and name in _DEFERRED:
        module_name, attribute = _DEFERRED[name].split(":")
        cls = getattr(importlib.import_module(module_name), attribute)
        register(cls, *_protocol_parts(cls), name=name)
    return _REGISTRY.get(name)


def _entry_for(obj: Any) -> tuple[str, ToParts]:
    cls = type(obj)
    for name, (registered, to_parts, _) in _REGISTRY.items():
        if registered is cls:
            return name, to_parts
    if cls.__name__ in _DEFERRED and cls.__module__.startswith("degen_hooks"):
        entry = _lookup(cls.__name__)
        if entry is not None and entry[0] is cls:
            return cls.__name__, entry[1]
    raise FormatError(
        f"Cannot save a {cls.__module__}.{cls.__qualname__}: no degen_hooks format is registered "
        f"for it. Savable types: {sorted(set(_REGISTRY) | set(_DEFERRED))}. Register one with "
        "dh.io.register(cls, to_parts, from_parts)."
    )


# -- built-in types: accumulators and Statistics ----------------------------------------------
_ACCUMULATORS = {"Covariance": Covariance, "SecondMoment": SecondMoment, "CoFiring": CoFiring}


def _accumulator_config(acc: Covariance | SecondMoment | CoFiring) -> dict[str, Any]:
    config: dict[str, Any] = {
        "class": type(acc).__name__,
        "dtype": str(acc.dtype).removeprefix("torch."),
        "nonfinite": acc.nonfinite,
        "d": acc.d,
        "n_samples": acc.n_samples,
    }
    if isinstance(acc, CoFiring):
        config["threshold"] = acc.threshold
    return config


def _build_accumulator(
    config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], prefix: str = ""
) -> Covariance | SecondMoment | CoFiring:
    cls = _ACCUMULATORS[config["class"]]
    dtype = getattr(torch, config["dtype"], None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {config['dtype']!r}")
    kwargs: dict[str, Any] = {"dtype": dtype, "nonfinite": config["nonfinite"]}
    if cls is CoFiring:
        kwargs["threshold"] = config["threshold"]
    acc = cls(**kwargs)
    fields = ["n_samples", "n_skipped"]
    if config["d"] is not None:
        fields += list(cls._tensor_fields)
    missing = [prefix + f for f in fields if prefix + f not in tensors]
    if missing:
        raise KeyError(f"tensors {missing} are missing")
    acc.load_state_dict({f: tensors[prefix + f] for f in fields})
    if acc.d != config["d"]:
        raise ValueError(f"{prefix or 'accumulator'} has width {acc.d}, layout says {config['d']}")
    return acc


def _accumulator_to_parts(acc: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    return acc.state_dict(), _accumulator_config(acc)


def _accumulator_from_parts(tensors: dict[str, torch.Tensor], layout: dict[str, Any]) -> Any:
    return _build_accumulator(layout, tensors)


def _statistics_to_parts(stats: Statistics) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sites: dict[str, Any] = {}
    for key, site in stats.items():
        sites[key] = {
            "n_batches": site.n_batches,
            "info": site.info,
            "accumulators": {k: _accumulator_config(a) for k, a in site.accumulators().items()},
        }
    return stats.state_dict(), {"sites": sites, "metadata": stats.metadata}


def _statistics_from_parts(tensors: dict[str, torch.Tensor], layout: dict[str, Any]) -> Statistics:
    sites: dict[str, SiteStatistics] = {}
    for key, desc in layout["sites"].items():
        accs = {
            kind: _build_accumulator(config, tensors, prefix=f"{key}/{kind}/")
            for kind, config in desc["accumulators"].items()
        }
        if "acts" not in accs:
            raise KeyError(f"site {key!r} has no 'acts' accumulator")
        sites[key] = SiteStatistics(**accs, n_batches=int(desc["n_batches"]), info=desc["info"])
    return Statistics(sites, layout["metadata"])


def _summary(obj: Any, layout: Mapping[str, Any]) -> dict[str, Any]:
    """Sites, widths and sample counts, for people reading meta.json."""
    if isinstance(obj, Statistics):
        return {
            "sites": {k: s.d_site for k, s in obj.items()},
            "n_samples": {k: s.acts.n_samples for k, s in obj.items()},
        }
    if isinstance(obj, tuple(_ACCUMULATORS.values())):
        return {"d": obj.d, "n_samples": obj.n_samples}
    # Other types: the descriptive keys of their metadata(), where present.
    return {k: layout[k] for k in _SUMMARY_KEYS if k in layout}


_SUMMARY_KEYS = ("sites", "widths", "site", "d_site", "n_samples", "pairs", "n_params")


for _name, _cls in _ACCUMULATORS.items():
    register(_cls, _accumulator_to_parts, _accumulator_from_parts, name=_name)
register(Statistics, _statistics_to_parts, _statistics_from_parts)


# -- fingerprints -----------------------------------------------------------------------------
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
    saved = meta.get("model_fingerprint")
    if saved is None:
        raise FormatError(
            f"No model fingerprint is recorded for {where}, so it cannot be checked. Save with "
            "dh.save(obj, path, model=model) to record one."
        )
    current = fingerprint(model)
    if saved != current:
        raise FormatError(
            f"{where} was computed on a model with fingerprint {saved[:23]}..., but this "
            f"{type(model).__name__} has {current[:23]}...: the parameters differ (another "
            "checkpoint or seed, weights processed differently (fold_ln, centering), or another "
            "dtype). Use the model the result was computed on."
        )


# -- save -------------------------------------------------------------------------------------
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


# -- load -------------------------------------------------------------------------------------
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
