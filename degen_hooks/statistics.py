"""Per-site statistics gathered by :func:`degen_hooks.collect`: a plain, mergeable mapping.

``run.stats["blocks.0.mlp.hook_post"]`` is a :class:`SiteStatistics` holding the activation
:class:`~degen_hooks.accumulators.Covariance` (``.acts``), and where requested the Jacobian
Gram (``.grads``, a :class:`~degen_hooks.accumulators.SecondMoment`), the firing counts
(``.firing``) and the activation-derivative moments (``.derivs``) of the MLP closed form.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ._checks import closest
from ._compatibility import check_compatible, provenance
from ._errors import ShapeMismatchError, SiteNotFoundError
from .accumulators import CoFiring, Covariance, SecondMoment

__all__ = ["SiteStatistics", "Statistics"]

_KINDS = {
    "acts": Covariance,
    "grads": SecondMoment,
    "firing": CoFiring,
    "derivs": Covariance,
}


@dataclass
class SiteStatistics:
    """Statistics of one site.

    Attributes:
        acts: Activation mean / covariance / second moment, width ``d_site``.
        grads: Jacobian Gram ``M' = E[sum_k g_k g_k^T]`` of the site, or ``None``.
        firing: Co-firing counts (``pre-activation > threshold``), or ``None``.
        derivs: Moments of the activation derivative ``sigma'(z)``, or ``None``.
        n_batches: Forward passes that reached the site with rows (empty batches, and batches
            that failed part-way, are not counted).
        info: JSON-able description (site name, io, positions, Jacobian target).
    """

    acts: Covariance = field(default_factory=Covariance)
    grads: SecondMoment | None = None
    firing: CoFiring | None = None
    derivs: Covariance | None = None
    n_batches: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def d_site(self) -> int | None:
        """Width of the site's activations."""
        return self.acts.d

    def accumulators(self) -> dict[str, Any]:
        """The accumulators that are present, by kind."""
        return {k: getattr(self, k) for k in _KINDS if getattr(self, k) is not None}

    def merge(self, other: SiteStatistics) -> SiteStatistics:
        """Merge ``other`` into ``self`` (``other`` unchanged); returns ``self``."""
        mine, theirs = self.accumulators(), other.accumulators()
        if mine.keys() != theirs.keys():
            raise ShapeMismatchError(
                f"Cannot merge statistics holding {sorted(theirs)} into statistics holding "
                f"{sorted(mine)}: collect both with the same settings."
            )
        for kind, acc in mine.items():
            acc.merge(theirs[kind])
        self.n_batches += other.n_batches
        return self

    def copy(self) -> SiteStatistics:
        """An independent copy."""
        copies = {k: v.copy() for k, v in self.accumulators().items()}
        return SiteStatistics(**copies, n_batches=self.n_batches, info=dict(self.info))

    def _assign(self, other: SiteStatistics) -> None:
        """Take the state of ``other`` (which is consumed), keeping this object and each of
        its accumulators as objects, so references a user holds stay valid."""
        for kind, acc in other.accumulators().items():
            current = getattr(self, kind)
            if current is None:
                setattr(self, kind, acc)
            else:
                current.__dict__.clear()
                current.__dict__.update(acc.__dict__)
        self.n_batches, self.info = other.n_batches, other.info

    def __repr__(self) -> str:
        parts = [f"d_site={self.d_site}", f"n_samples={self.acts.n_samples}"]
        parts += [k for k in ("grads", "firing", "derivs") if getattr(self, k) is not None]
        return f"SiteStatistics({', '.join(parts)})"


class Statistics(Mapping[str, SiteStatistics]):
    """Statistics of several sites, keyed by site name, plus JSON-able ``metadata``.

    Merging combines shards exactly: ``a.merge(b)`` equals one collection over both streams.
    """

    def __init__(
        self,
        sites: Mapping[str, SiteStatistics] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._sites: dict[str, SiteStatistics] = dict(sites or {})
        self.metadata: dict[str, Any] = dict(metadata or {})

    def __getitem__(self, key: str) -> SiteStatistics:
        try:
            return self._sites[key]
        except KeyError:
            suggestions = closest(key, self._sites)
            hint = f" Did you mean {suggestions[0]!r}?" if suggestions else ""
            raise SiteNotFoundError(
                f"No statistics for site {key!r}.{hint} Available: {list(self._sites)}."
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._sites)

    def __len__(self) -> int:
        return len(self._sites)

    def __setitem__(self, key: str, value: SiteStatistics) -> None:
        self._sites[key] = value

    def merge(self, other: Statistics) -> Statistics:
        """Merge ``other`` site by site (``other`` unchanged); returns ``self``.

        All or nothing: every site is merged into a copy first, so a refusal changes nothing.
        The metadata keeps describing the contents (``n_backward_calls`` adds up).

        Raises:
            ShapeMismatchError: If the two hold different sites or widths, or were collected
                with different settings (probes, target, readout, positions, modules,
                accumulators, firing threshold): the message names the setting and both values.
        """
        if set(other) != set(self):
            raise ShapeMismatchError(
                f"Cannot merge statistics of sites {sorted(other)} into statistics of sites "
                f"{sorted(self)}: collect both runs over the same sites."
            )
        check_compatible(
            provenance(self),
            provenance(other),
            action="merge these statistics",
            fix="collect both runs with the same dh.collect(...) arguments.",
        )
        merged = {}
        for key in self:
            try:
                merged[key] = self[key].copy().merge(other[key])
            except ShapeMismatchError as err:
                raise ShapeMismatchError(f"Site {key!r}: {err}") from err
        for key, site in merged.items():
            self[key]._assign(site)
        calls = self.metadata.get("n_backward_calls", 0) + other.metadata.get("n_backward_calls", 0)
        if calls:
            self.metadata["n_backward_calls"] = calls
        return self

    def copy(self) -> Statistics:
        """An independent copy."""
        return Statistics({k: v.copy() for k, v in self.items()}, dict(self.metadata))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors keyed ``"<site>/<kind>/<field>"`` (for safetensors)."""
        state: dict[str, torch.Tensor] = {}
        for key, site_stats in self.items():
            for kind, acc in site_stats.accumulators().items():
                for name, tensor in acc.state_dict().items():
                    state[f"{key}/{kind}/{name}"] = tensor
        return state

    def layout(self) -> dict[str, Any]:
        """JSON-able description of which accumulators each site holds (for loading)."""
        out: dict[str, Any] = {}
        for key, s in self.items():
            out[key] = {
                "kinds": sorted(s.accumulators()),
                "n_batches": s.n_batches,
                "info": s.info,
                "threshold": None if s.firing is None else s.firing.threshold,
            }
        return out

    @classmethod
    def from_state_dict(
        cls,
        state: Mapping[str, torch.Tensor],
        layout: Mapping[str, Any],
        metadata: dict[str, Any] | None = None,
    ) -> Statistics:
        """Rebuild from :meth:`state_dict` and :meth:`layout`."""
        sites: dict[str, SiteStatistics] = {}
        for key, desc in layout.items():
            accs: dict[str, Any] = {}
            for kind in desc["kinds"]:
                if kind not in _KINDS:
                    raise ShapeMismatchError(f"Unknown statistic kind {kind!r} for {key!r}.")
                prefix = f"{key}/{kind}/"
                part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
                acc = CoFiring(threshold=desc["threshold"]) if kind == "firing" else _KINDS[kind]()
                accs[kind] = acc.load_state_dict(part)
            sites[key] = SiteStatistics(
                **accs, n_batches=int(desc["n_batches"]), info=dict(desc["info"])
            )
        return cls(sites, metadata)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k!r}: {v!r}" for k, v in self.items())
        return f"Statistics({{{inner}}})"
