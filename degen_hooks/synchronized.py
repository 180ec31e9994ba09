"""Synchronized neurons: groups of units that fire on exactly the same samples.

A set S of k ReLU neurons is *synchronized* on a dataset when their on/off patterns agree on
every sample (Bushnaq et al. 2024, "Using degeneracy in the loss landscape for mechanistic
interpretability", arXiv:2405.10927, mechanism (iii)). On the data the group then acts
linearly on its "on" set and is zero elsewhere, so ``W_in[S] -> A W_in[S]`` together with
``W_out[:, S] -> W_out[:, S] A^-1`` (``A`` in GL(k) near the identity) leaves every output
unchanged: the group adds ``k^2 - k`` degenerate directions beyond the ``k`` per-neuron
rescalings every ReLU has.

Where the firing statistics come from. ``dh.collect(model, sites, firing=True)`` streams exact
:class:`~degen_hooks.accumulators.CoFiring` counts (``value > threshold``) with the same hooks
as the activation statistics, at either kind of site:

* a **pre-activation** site (``blocks.0.mlp.hook_pre`` in TransformerLens, or the
  ``nn.Linear`` before the activation). Any activation function and any threshold work here:
  use ``firing=-0.1`` or ``firing=0.5`` to define "fires" for GELU / SiLU units.
* a **post-activation** site of a ReLU (``blocks.0.mlp.hook_post``, or the ``nn.ReLU``): with
  the default threshold 0, ``relu(z) > 0`` iff ``z > 0``, so the counts are identical. (GELU
  and SiLU share this property at threshold 0 only; other thresholds need the pre-activation.)

Everything is computed from the counts, never from stored samples: the disagreement count of
neurons i and j is ``n_i + n_j - 2 n_ij`` (exact integers in float64), in O(d^2) memory.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ._checks import check_fitted
from ._errors import EmptyStatisticsError, FormatError
from ._estimator import ParamsMixin
from ._grouping import complete_linkage, identical_rows
from .accumulators import CoFiring
from .statistics import SiteStatistics, Statistics

__all__ = ["SynchronizedNeurons", "find_synchronized"]

_FITTED = ("groups_", "labels_", "dead_", "always_on_", "agreement_", "firing_rate_")
_FIRING_HINT = (
    "Collect them with dh.collect(model, sites, firing=True) (or firing=<threshold> for "
    "GELU/SiLU units) at a pre-activation site or a ReLU output site."
)


class SynchronizedNeurons(ParamsMixin):
    """Find groups of neurons whose firing patterns agree on (almost) every sample.

    Args:
        tolerance: Largest fraction of samples on which two neurons of a group may disagree.
            ``0`` (default) gives the exact groups: neurons with identical firing patterns
            (disagreement count 0), found exactly from the counts. ``tolerance > 0`` runs
            complete-linkage clustering (scikit-learn ``AgglomerativeClustering`` with
            ``metric="precomputed"``, ``linkage="complete"``, ``n_clusters=None``) on the
            disagreement counts, so every pair in a group disagrees on at most
            ``floor(tolerance * n_samples)`` samples. (scikit-learn merges strictly below its
            ``distance_threshold``; the threshold is set half a count above the allowed
            number, so a pair exactly at the tolerance still merges and any tolerance below
            ``1 / n_samples`` reproduces the exact groups.) Must lie in ``[0, 1)``.
        min_size: Smallest group reported in ``groups_`` (``2``: pairs and up). ``1`` lists
            every neuron, as a partition.
        include_dead: Whether neurons that never fire take part in grouping. ``False``
            (default): they are listed in ``dead_`` only, because their weights are already
            free (mechanisms (i) and (ii)) and "firing together" says nothing about them.
            ``True``: all dead neurons form one group (their patterns are identical).

    Neurons that fire on every sample (``always_on_``) are linear on the data and do form
    one synchronized group when there are at least ``min_size`` of them; they are *not*
    excluded. With ``tolerance > 0`` rarely-firing neurons are close to each other (two
    neurons firing on 1% of samples disagree on at most 2%) and can group together; read
    ``firing_rate_`` alongside the groups.

    Attributes:
        groups_: Groups as ``frozenset`` s of neuron indices, sorted by size (largest first),
            then by smallest index. Only groups with ``len >= min_size``.
        labels_: Group index of every neuron (into ``groups_``), ``-1`` outside all groups;
            int64 tensor, shape ``(d_site,)``.
        agreement_: Per group, the smallest pairwise agreement rate
            ``1 - max disagreement / n_samples`` (``1.0`` for exact groups).
        dead_: Sorted indices of neurons that never fire.
        always_on_: Sorted indices of neurons that fire on every sample.
        firing_rate_: Fraction of samples each neuron fires on, float64, shape ``(d_site,)``.
        n_samples_: Number of samples the counts are over.
        d_site_: Number of neurons.
        degenerate_directions_: ``sum(k**2 - k)`` over ``groups_``: extra degenerate
            parameter directions of the groups (exact ones when ``tolerance == 0``; with
            ``tolerance > 0`` they are only approximately free).
        site_: The site fitted (``None`` when fit on a bare ``CoFiring``).
        threshold_: The firing threshold the counts used.

    Follows scikit-learn's estimator protocol: ``get_params`` / ``set_params``, and
    ``sklearn.base.clone`` gives an unfitted copy with the same hyperparameters.

    Examples:
        >>> import torch
        >>> from degen_hooks import CoFiring
        >>> from degen_hooks.synchronized import SynchronizedNeurons
        >>> z = torch.tensor([[1.0, 2.0, -1.0, 3.0], [-1.0, -2.0, 1.0, 1.0]])
        >>> sync = SynchronizedNeurons().fit(CoFiring().update(z))
        >>> sync.groups_, sync.always_on_, sync.degenerate_directions_
        ([frozenset({0, 1})], [3], 2)
    """

    def __init__(
        self, *, tolerance: float = 0.0, min_size: int = 2, include_dead: bool = False
    ) -> None:
        self.tolerance = tolerance
        self.min_size = min_size
        self.include_dead = include_dead

    def fit(
        self,
        stats: Statistics | SiteStatistics | CoFiring,
        site: str | None = None,
    ) -> SynchronizedNeurons:
        """Group the neurons of one site by their firing patterns.

        Args:
            stats: ``run.stats`` (a :class:`~degen_hooks.Statistics`), the statistics of one
                site (:class:`~degen_hooks.SiteStatistics`) or a
                :class:`~degen_hooks.CoFiring` accumulator.
            site: Which site of a ``Statistics`` to use; may be omitted when exactly one site
                holds firing statistics. For all of them use :func:`find_synchronized`.

        Returns:
            ``self``, with the fitted attributes set (a refit discards earlier ones).

        Raises:
            EmptyStatisticsError: If the site holds no firing statistics or no samples.
            SiteNotFoundError: If ``site`` is not among the statistics.
            ValueError: If a hyperparameter is out of range, or ``site`` is needed to choose
                among several sites.
            TypeError: If ``stats`` is of another type.
        """
        self._check_params()
        firing, site_name = _firing_of(stats, site)
        if firing.n_samples == 0 or firing.d is None:
            raise EmptyStatisticsError(
                f"The firing statistics{_at(site_name)} have seen no samples. Run the model "
                "inside the `with dh.collect(..., firing=True)` block before fitting."
            )
        for name in (*_FITTED, "n_samples_", "d_site_", "degenerate_directions_"):
            self.__dict__.pop(name, None)

        n = firing.n_samples
        counts = firing.counts()
        # Disagreement counts |{x : fires_i(x) != fires_j(x)}| = n_i + n_j - 2 n_ij: exact
        # integers in float64 (below 2**53 samples), a Hamming distance between patterns.
        # Built in place on the (copied) co-firing matrix: one d x d buffer, not three.
        disagree = firing.cofire_counts().mul_(-2.0).add_(counts[:, None]).add_(counts[None, :])
        dead = counts == 0
        candidates = torch.arange(firing.d, device=counts.device)
        sub = disagree
        if not self.include_dead and bool(dead.any()):
            candidates = candidates[~dead]
            sub = disagree[candidates][:, candidates]
        if self.tolerance == 0:
            root = identical_rows(sub)
        else:
            allowed = math.floor(self.tolerance * n * (1 + 1e-12))
            root = complete_linkage(sub, allowed + 0.5)

        members: dict[int, list[int]] = {}
        for neuron, label in zip(candidates.tolist(), root.tolist(), strict=True):
            members.setdefault(label, []).append(neuron)
        groups = sorted(
            (sorted(m) for m in members.values() if len(m) >= self.min_size),
            key=lambda m: (-len(m), m[0]),
        )
        labels = torch.full((firing.d,), -1, dtype=torch.int64)
        agreement = []
        for index, group in enumerate(groups):
            labels[group] = index
            idx = torch.tensor(group, device=disagree.device)
            agreement.append(1.0 - float(disagree[idx][:, idx].max()) / n)

        self.groups_ = [frozenset(g) for g in groups]
        self.labels_ = labels
        self.agreement_ = agreement
        self.dead_ = torch.nonzero(dead).flatten().tolist()
        self.always_on_ = torch.nonzero(counts == n).flatten().tolist()
        self.firing_rate_ = (counts / n).cpu()
        self.n_samples_ = n
        self.d_site_ = firing.d
        self.degenerate_directions_ = sum(len(g) ** 2 - len(g) for g in groups)
        self.site_ = site_name
        self.threshold_ = float(firing.threshold)
        return self

    def _check_params(self) -> None:
        tol = self.tolerance
        if not isinstance(tol, (int, float)) or not 0 <= tol < 1 or math.isnan(tol):
            raise ValueError(
                f"tolerance must be a fraction of samples in [0, 1), got {tol!r}. Use 0 for "
                "exact agreement, e.g. 0.01 to allow 1% disagreeing samples."
            )
        if isinstance(self.min_size, bool) or not isinstance(self.min_size, int):
            raise ValueError(f"min_size must be an int >= 1, got {self.min_size!r}.")
        if self.min_size < 1:
            raise ValueError(f"min_size must be an int >= 1, got {self.min_size}.")

    # -- reporting ------------------------------------------------------------------------------
    def summary(self, max_groups: int = 20, max_neurons: int = 12) -> str:
        """A plain-text table of the groups.

        Args:
            max_groups: Rows shown before the table is cut.
            max_neurons: Neuron indices shown per group before ``...``.

        Returns:
            The table, one group per row.
        """
        check_fitted(self, _FITTED)
        lines = [self._headline(), self._counts_line()]
        if not self.groups_:
            return "\n".join(lines)
        header = f"{'group':>5}  {'size':>4}  {'k^2-k':>6}  {'firing rate':>11}  "
        header += f"{'min agreement':>13}  neurons"
        lines.append(header)
        for row in self._rows(max_groups, max_neurons):
            lines.append(
                f"{row[0]:>5}  {row[1]:>4}  {row[2]:>6}  {row[3]:>11}  {row[4]:>13}  {row[5]}"
            )
        if len(self.groups_) > max_groups:
            lines.append(f"... {len(self.groups_) - max_groups} more groups")
        return "\n".join(lines)

    def _headline(self) -> str:
        where = "" if self.site_ is None else f" at {self.site_!r}"
        return (
            f"SynchronizedNeurons{where}: d_site={self.d_site_}, n_samples={self.n_samples_}, "
            f"threshold={self.threshold_:g}, tolerance={self.tolerance:g}"
        )

    def _counts_line(self) -> str:
        n_in = sum(len(g) for g in self.groups_)
        return (
            f"{len(self.groups_)} groups ({n_in} neurons), {self.degenerate_directions_} "
            f"degenerate directions (sum of k^2 - k); {len(self.dead_)} dead, "
            f"{len(self.always_on_)} always-on neurons"
        )

    def _rows(self, max_groups: int, max_neurons: int) -> list[tuple[str, ...]]:
        rows = []
        for index, group in enumerate(self.groups_[:max_groups]):
            ordered = sorted(group)
            shown = ", ".join(map(str, ordered[:max_neurons]))
            if len(ordered) > max_neurons:
                shown += f", ... (+{len(ordered) - max_neurons})"
            rate = float(self.firing_rate_[ordered].mean())
            k = len(group)
            rows.append(
                (
                    str(index),
                    str(k),
                    str(k * k - k),
                    f"{rate:.4f}",
                    f"{self.agreement_[index]:.4f}",
                    shown,
                )
            )
        return rows

    def _repr_html_(self) -> str:
        if not hasattr(self, "groups_"):
            return f"<pre>{html.escape(repr(self))} (not fitted)</pre>"
        head = "".join(
            f"<th>{h}</th>"
            for h in ("group", "size", "k²−k", "firing rate", "min agreement", "neurons")
        )
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
            for row in self._rows(50, 24)
        )
        return (
            f"<p><b>{html.escape(self._headline())}</b><br>{html.escape(self._counts_line())}"
            f"</p><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        )

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"SynchronizedNeurons({params})"

    # -- saving ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Fitted tensors, for safetensors.

        Returns:
            ``labels`` (int64, ``(d_site,)``), ``firing_rate`` (float64, ``(d_site,)``) and
            ``agreement`` (float64, ``(n_groups,)``).
        """
        check_fitted(self, _FITTED)
        return {
            "labels": self.labels_.clone(),
            "firing_rate": self.firing_rate_.clone(),
            "agreement": torch.tensor(self.agreement_, dtype=torch.float64),
        }

    def metadata(self) -> dict[str, Any]:
        """JSON-able description of the fit, to store next to :meth:`state_dict`.

        Returns:
            Hyperparameters, site, threshold, sample count, width, number of groups, dead
            and always-on neurons.
        """
        check_fitted(self, _FITTED)
        return {
            "class": "SynchronizedNeurons",
            "params": self.get_params(deep=False),
            "site": self.site_,
            "threshold": self.threshold_,
            "n_samples": self.n_samples_,
            "d_site": self.d_site_,
            "n_groups": len(self.groups_),
            "dead": list(self.dead_),
            "always_on": list(self.always_on_),
            "degenerate_directions": self.degenerate_directions_,
        }

    @classmethod
    def from_state_dict(
        cls, state: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]
    ) -> SynchronizedNeurons:
        """Rebuild a fitted estimator from :meth:`state_dict` and :meth:`metadata`.

        Args:
            state: Tensors from :meth:`state_dict` (e.g. ``safetensors.torch.load_file``).
            metadata: The dict from :meth:`metadata` (e.g. read back from JSON).

        Returns:
            A fitted :class:`SynchronizedNeurons`.

        Raises:
            FormatError: If fields are missing or inconsistent.
        """
        missing = {"labels", "firing_rate", "agreement"} - set(state)
        if missing or metadata.get("class") != "SynchronizedNeurons":
            raise FormatError(
                f"Not a saved SynchronizedNeurons (class {metadata.get('class')!r}, missing "
                f"tensors {sorted(missing)}). Save with estimator.state_dict() and .metadata()."
            )
        new = cls(**metadata["params"])
        labels = state["labels"].to(torch.int64).cpu()
        n_groups = int(metadata["n_groups"])
        groups = [frozenset(torch.nonzero(labels == i).flatten().tolist()) for i in range(n_groups)]
        if len(state["agreement"]) != n_groups or any(not g for g in groups):
            raise FormatError(
                f"Saved SynchronizedNeurons is inconsistent: {n_groups} groups in the metadata, "
                f"{len(state['agreement'])} agreement values, labels {labels.unique().tolist()}."
            )
        new.groups_ = groups
        new.labels_ = labels.clone()
        new.agreement_ = [float(a) for a in state["agreement"]]
        new.firing_rate_ = state["firing_rate"].to(torch.float64).cpu().clone()
        new.dead_ = [int(i) for i in metadata["dead"]]
        new.always_on_ = [int(i) for i in metadata["always_on"]]
        new.n_samples_ = int(metadata["n_samples"])
        new.d_site_ = int(metadata["d_site"])
        new.degenerate_directions_ = sum(len(g) ** 2 - len(g) for g in groups)
        new.site_ = metadata["site"]
        new.threshold_ = float(metadata["threshold"])
        return new


def find_synchronized(
    stats: Statistics,
    sites: str | Sequence[str] | None = None,
    **params: Any,
) -> dict[str, SynchronizedNeurons]:
    """Fit one :class:`SynchronizedNeurons` per site.

    Args:
        stats: ``run.stats`` from ``dh.collect(..., firing=True)``.
        sites: Sites to fit; ``None`` means every site holding firing statistics.
        **params: Hyperparameters of :class:`SynchronizedNeurons` (``tolerance``, ...).

    Returns:
        Fitted estimators keyed by site, in the order of ``stats``.

    Raises:
        EmptyStatisticsError: If no site (or a requested site) holds firing statistics.

    Examples:
        >>> import torch, degen_hooks as dh
        >>> from degen_hooks.synchronized import find_synchronized
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU())
        >>> with dh.collect(model, ["0", "1"], firing=True) as run:
        ...     _ = model(torch.randn(16, 2))
        >>> sorted(find_synchronized(run.stats))
        ['0', '1']
    """
    if sites is None:
        chosen = [key for key, s in stats.items() if s.firing is not None]
        if not chosen:
            raise EmptyStatisticsError(
                f"None of the sites {list(stats)} hold firing statistics. {_FIRING_HINT}"
            )
    else:
        chosen = [sites] if isinstance(sites, str) else list(sites)
    return {key: SynchronizedNeurons(**params).fit(stats, site=key) for key in chosen}


def _firing_of(
    stats: Statistics | SiteStatistics | CoFiring, site: str | None
) -> tuple[CoFiring, str | None]:
    """The CoFiring accumulator to fit and the name of its site."""
    if isinstance(stats, CoFiring):
        return stats, site
    if isinstance(stats, SiteStatistics):
        name = site if site is not None else stats.info.get("name")
        if stats.firing is None:
            raise EmptyStatisticsError(f"No firing statistics{_at(name)}. {_FIRING_HINT}")
        return stats.firing, name
    if isinstance(stats, Statistics):
        if site is None:
            with_firing = [key for key, s in stats.items() if s.firing is not None]
            if not with_firing:
                raise EmptyStatisticsError(
                    f"None of the sites {list(stats)} hold firing statistics. {_FIRING_HINT}"
                )
            if len(with_firing) > 1:
                raise ValueError(
                    f"Several sites hold firing statistics: {with_firing}. Pick one with "
                    "fit(stats, site=...), or fit all with dh.find_synchronized(stats)."
                )
            site = with_firing[0]
        site_stats = stats[site]  # SiteNotFoundError with suggestions
        if site_stats.firing is None:
            others = [key for key, s in stats.items() if s.firing is not None]
            where = f" Sites with firing statistics: {others}." if others else ""
            raise EmptyStatisticsError(f"No firing statistics at {site!r}.{where} {_FIRING_HINT}")
        return site_stats.firing, site
    raise TypeError(
        f"SynchronizedNeurons.fit expects run.stats (Statistics), stats[site] "
        f"(SiteStatistics) or a CoFiring accumulator, got {type(stats).__name__}."
    )


def _at(site: str | None) -> str:
    return "" if site is None else f" at {site!r}"
