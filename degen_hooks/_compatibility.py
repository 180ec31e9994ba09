"""Which statistics may combine: the settings that give collected numbers their meaning.

Two collections merge exactly only when they measured the same thing: the same module and
positions at every site, the same accumulators and firing threshold, and, for Jacobian
Grams, the same probes, target, readout and target positions. A Gram of random probes
merged into one of exact probes, or two readouts mixed, is a number of no meaning that looks
right. :func:`provenance` lists those settings; :func:`check_compatible` refuses a merge,
a resume (``collect(stats=...)``) or an ``all_reduce_`` whose two sides differ, naming the
setting and both values. Counters (``n_backward_calls``) and versions are not compared.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from ._errors import ShapeMismatchError

__all__ = ["check_compatible", "describe_readout", "provenance"]

# Site fields beyond module, io and positions that choose the tensor read (Site.to_info).
_SITE_FIELDS = ("arg", "element", "call", "feature_axis")

# Collection settings (in Statistics.metadata) that change what the numbers mean. A key
# missing from a file counts as None, the value collect() records for "not used".
_SETTINGS = ("model", "jacobians", "n_probes", "target", "readout", "target_positions")
_RANDOM_PROBES = ("rademacher", "gaussian")
# Written by degen_hooks.transformer_lens.record_metadata: folded LayerNorms, centred
# weights, ... change the activations themselves.
_FAMILY_SETTINGS = ("transformer_lens",)


def describe_readout(readout: torch.Tensor | None) -> dict[str, Any] | None:
    """A JSON-able fingerprint of a readout matrix (shape and SHA-256 of its float64 bytes)."""
    if readout is None:
        return None
    values = readout.detach().to("cpu", torch.float64).contiguous()
    digest = hashlib.sha256(values.numpy().tobytes()).hexdigest()
    return {"shape": list(values.shape), "sha256": digest}


def provenance(stats: Any) -> dict[str, Any]:
    """The settings of ``stats`` (a :class:`~degen_hooks.Statistics`) that must agree to combine.

    Returns:
        ``{"settings": {...}, "sites": {key: {...}}}``, JSON-able.
    """
    metadata = stats.metadata
    settings = {key: _jsonable(metadata.get(key)) for key in (*_SETTINGS, *_FAMILY_SETTINGS)}
    if settings["jacobians"] not in _RANDOM_PROBES:
        settings.pop("n_probes")  # exact probes (or none): the number of random probes is moot
    sites = {}
    for key, site in stats.items():
        accs = site.accumulators()
        sites[key] = {
            "module": site.info.get("name"),
            "io": site.info.get("io"),
            "positions": _jsonable(site.info.get("positions")),
            # Which tensor of the module (absent in saves from before these fields: None).
            **{field: site.info.get(field) for field in _SITE_FIELDS},
            "statistics": sorted(accs),
            "firing threshold": None if site.firing is None else site.firing.threshold,
            "dtype": sorted({str(acc.dtype) for acc in accs.values()}),
        }
    return {"settings": settings, "sites": sites}


def check_compatible(
    mine: dict[str, Any], theirs: dict[str, Any], *, action: str, fix: str
) -> None:
    """Refuse to combine two :func:`provenance` records that differ.

    Args:
        mine: The provenance of the statistics that would change.
        theirs: The provenance of the statistics that would be added.
        action: What is refused, for the message (``"merge"``, ``"resume"``, ...).
        fix: How to fix it, for the message.

    Raises:
        ShapeMismatchError: Naming the first differing setting and both values.
    """
    difference = first_difference(mine, theirs)
    if difference is not None:
        where, ours, other = difference
        raise ShapeMismatchError(
            f"Cannot {action}: {where} differs ({ours!r} here, {other!r} in the other "
            f"statistics). Statistics combine only when collected with the same settings; "
            f"{fix}"
        )


def first_difference(mine: dict[str, Any], theirs: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """``(where, mine, theirs)`` for the first setting that differs, or ``None``."""
    for key in sorted(set(mine["settings"]) | set(theirs["settings"])):
        ours, other = mine["settings"].get(key), theirs["settings"].get(key)
        if ours != other:
            return f"the collection setting {key!r}", ours, other
    for site in sorted(set(mine["sites"]) & set(theirs["sites"])):
        for key, ours in mine["sites"][site].items():
            other = theirs["sites"][site].get(key)
            if ours != other:
                return f"site {site!r}: its {key}", ours, other
    return None


def _jsonable(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), for equal comparisons."""
    return json.loads(json.dumps(value, default=str))
