"""The registry of savable types: ``{type name: (class, to_parts, from_parts)}``.

Holds the built-in entries for the accumulators and :class:`~degen_hooks.Statistics`, and the
import paths of the types above this package (``_DEFERRED``), registered on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .._errors import FormatError
from ..accumulators import CoFiring, Covariance, SecondMoment
from ..statistics import SiteStatistics, Statistics

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
