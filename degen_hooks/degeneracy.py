"""Degeneracy report: how many parameter directions leave a network's outputs unchanged.

Bushnaq et al. 2024 ("Using degeneracy in the loss landscape for mechanistic
interpretability", arXiv:2405.10927) name three internal sources of degeneracy of the
behavioural loss ``L_B(w) = (1/n) sum_x |f(x; w) - f(x; w*)|^2``:

(i) **linearly dependent activations**: if the activation covariance of a layer has rank
    ``r < d``, the next layer's weights can move along ``a v^T`` (``v`` in the null space,
    its bias compensating ``-a v^T mu``) without changing anything: ``d_next * (d - r)``
    exactly free directions;
(ii) **linearly dependent Jacobians**: if the Gram matrix of the output Jacobians
    back-propagated to a pre-activation site has rank ``r' < d``, the incoming weights can
    move along its null space at zero curvature: ``(d - r')`` directions per input feature;
(iii) **synchronized neurons**: ``k`` ReLUs that fire on the same samples add ``k^2 - k``
    directions (:class:`~degen_hooks.synchronized.SynchronizedNeurons`).

The three overlap (a duplicated neuron shows up in all of them), so their counts must not be
added. The exact count for a small model is :func:`behavioural_null_dimension`: the number of
zero singular values of the parameter Jacobian of all outputs on all data, i.e. the null
dimension of the Gauss-Newton matrix ``H_B = (2/n) sum_x J_w(x)^T J_w(x)`` (lib_math §4.1).
It is exact only when the data have more output rows than the Jacobian's rank: a Jacobian of
full row rank says how many samples there were, and the report then calls the count an upper
bound.
"""

from __future__ import annotations

import html
import re
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ._errors import EmptyStatisticsError, ShapeMismatchError
from .gauss_newton import _EPS, BehaviouralNull, _behavioural, behavioural_null_dimension
from .sites import _site_modules, _unwrap
from .statistics import Statistics
from .synchronized import SynchronizedNeurons

__all__ = [
    "BehaviouralNull",
    "DegeneracyReport",
    "SiteDegeneracy",
    "behavioural_null_dimension",
    "degeneracy_report",
]

_OVERLAP_NOTE = (
    "The three mechanisms overlap and are NOT additive: a duplicated neuron, for example, "
    "lowers the activation rank, the Jacobian rank and forms a synchronized pair at once. Do "
    "not sum the columns; the behavioural null dimension (rank of the parameter Jacobian of "
    "the outputs on all data) is the exact count, given enough data."
)
_LEGEND = (
    "rank(cov): rank of the centred activation covariance; free out-w = d_next * (d - rank), "
    "weights of the next layer that are exactly free (it must have a bias); rank(J): rank of "
    "the Jacobian Gram (zero-curvature incoming directions at pre-activation sites); groups: "
    "sizes of synchronized groups, k^2-k their extra degenerate directions."
)
# Modules that pass features through unchanged between a site and the next nn.Linear.
_PASS_THROUGH = (nn.Dropout, nn.Identity)


@dataclass(frozen=True)
class SiteDegeneracy:
    """Degeneracy measures of one site (one row of the report).

    Attributes:
        site: Key of the site's statistics.
        d_site: Width of the site.
        n_samples: Samples (rows) the activation statistics are over.
        activation_rank: Rank of the centred activation covariance (relative threshold).
        activation_deficiency: ``d_site - activation_rank``.
        activation_rtol: The relative eigenvalue threshold used.
        d_next: Rows of the next layer's weight (its output width), or ``None`` if unknown.
        free_outgoing: ``d_next * activation_deficiency`` exactly free outgoing weight
            directions (mechanism (i)), or ``None`` without ``d_next``.
        jacobian_rank: Rank of the Jacobian Gram ``stats[site].grads``, or ``None``.
        jacobian_deficiency: ``d_site - jacobian_rank``, or ``None``.
        jacobians: How the Jacobian Gram was collected (``"exact"``, ``"rademacher"``, ...).
        groups: Synchronized groups (sorted neuron lists), or ``None`` without firing
            statistics.
        group_directions: ``sum(k**2 - k)`` over ``groups``, or ``None``.
        dead: Neurons that never fire, or ``None``.
        always_on: Neurons that fire on every sample, or ``None``.
        threshold: Firing threshold, or ``None``.
    """

    site: str
    d_site: int
    n_samples: int
    activation_rank: int
    activation_deficiency: int
    activation_rtol: float
    d_next: int | None = None
    free_outgoing: int | None = None
    jacobian_rank: int | None = None
    jacobian_deficiency: int | None = None
    jacobians: str | None = None
    groups: list[list[int]] | None = None
    group_directions: int | None = None
    dead: list[int] | None = None
    always_on: list[int] | None = None
    threshold: float | None = None


@dataclass(frozen=True)
class DegeneracyReport:
    """Per-site degeneracy measures, and the behavioural count when a model and data were given.

    Render it with ``print(report)`` / :meth:`summary` (plain text), in a notebook
    (``_repr_html_``) or as JSON with :meth:`to_dict`.

    Attributes:
        sites: One :class:`SiteDegeneracy` per site, in the order asked for.
        behavioural: The behavioural count (:class:`BehaviouralNull`; exact unless its
            ``is_upper_bound``), or ``None``.
        note: The statement that the mechanisms overlap and do not add up.
    """

    sites: list[SiteDegeneracy]
    behavioural: BehaviouralNull | None = None
    note: str = _OVERLAP_NOTE

    _COLUMNS = (
        "site",
        "d",
        "rank(cov)",
        "deficiency",
        "d_next",
        "free out-w",
        "rank(J)",
        "J deficiency",
        "dead",
        "always-on",
        "groups",
        "k^2-k",
    )

    def _rows(self) -> list[list[str]]:
        def text(value: Any) -> str:
            return "-" if value is None else str(value)

        rows = []
        for s in self.sites:
            sizes = None if s.groups is None else ",".join(str(len(g)) for g in s.groups) or "0"
            rows.append(
                [
                    s.site,
                    str(s.d_site),
                    str(s.activation_rank),
                    str(s.activation_deficiency),
                    text(s.d_next),
                    text(s.free_outgoing),
                    text(s.jacobian_rank),
                    text(s.jacobian_deficiency),
                    text(None if s.dead is None else len(s.dead)),
                    text(None if s.always_on is None else len(s.always_on)),
                    text(sizes),
                    text(s.group_directions),
                ]
            )
        return rows

    def _behaviour_line(self) -> str:
        b = self.behavioural
        if b is None:
            return (
                "Behavioural null dimension: not computed (pass model= and data= for the "
                "exact count)."
            )
        if b.is_upper_bound:
            return (
                f"Behavioural Gauss-Newton null dimension: at most {b.null_dim} of {b.n_params} "
                f"parameters, an upper bound, not the exact count: the Jacobian's rank {b.rank} "
                f"equals its {b.n_rows} output rows, so every row was independent and more data "
                "could lower the count. Pass more samples in data= for the exact count: it is "
                f"exact once the rows outnumber the rank, and {b.n_params} rows always suffice "
                f"(rtol {b.rtol:.2g})."
            )
        return (
            f"Behavioural Gauss-Newton null dimension: {b.null_dim} of {b.n_params} parameters "
            f"(Jacobian rank {b.rank} over {b.n_rows} output rows, rtol {b.rtol:.2g}; exact on "
            "these data)."
        )

    def _footnotes(self) -> list[str]:
        notes = []
        if any(s.d_next is None for s in self.sites):
            notes.append(
                "d_next '-': unknown; pass next_widths={site: width} (the next layer's output "
                "width) to count free outgoing weights."
            )
        probes = {s.jacobians for s in self.sites if s.jacobian_rank is not None}
        if probes - {"exact"}:
            notes.append(
                "rank(J) from random probes: a lower bound of the exact rank (collect with "
                "jacobians='exact' for the exact one)."
            )
        return notes

    def summary(self) -> str:
        """The report as plain text.

        Returns:
            A table with one row per site, then the behavioural count, the statement that the
            mechanisms overlap, a legend and footnotes.
        """
        rows = [list(self._COLUMNS), *self._rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(self._COLUMNS))]
        lines = []
        for index, row in enumerate(rows):
            cells = [row[0].ljust(widths[0])]
            cells += [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
            lines.append("  ".join(cells).rstrip())
            if index == 0:
                lines.append("-" * len(lines[0]))
        lines += ["", self._behaviour_line(), ""]
        for paragraph in (self.note, _LEGEND, *self._footnotes()):
            lines.append(textwrap.fill(paragraph, width=100))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self._COLUMNS)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
            for row in self._rows()
        )
        notes = "".join(
            f"<p>{html.escape(t)}</p>"
            for t in (self._behaviour_line(), self.note, _LEGEND, *self._footnotes())
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{notes}"

    def to_dict(self) -> dict[str, Any]:
        """The report as plain data.

        Returns:
            ``{"sites": [row dicts], "behavioural": dict or None, "note": str}``, JSON-able;
            ``"behavioural"`` includes ``"is_upper_bound"``.
        """
        behavioural = None
        if self.behavioural is not None:
            behavioural = {
                **asdict(self.behavioural),
                "is_upper_bound": self.behavioural.is_upper_bound,
            }
        return {
            "sites": [asdict(s) for s in self.sites],
            "behavioural": behavioural,
            "note": self.note,
        }


def degeneracy_report(
    stats: Statistics,
    sites: str | Sequence[str] | None = None,
    *,
    model: nn.Module | None = None,
    data: torch.Tensor | Iterable[torch.Tensor] | None = None,
    rtol: float | None = None,
    next_widths: Mapping[str, int] | None = None,
    tolerance: float = 0.0,
    params: str | Sequence[str] | None = None,
) -> DegeneracyReport:
    """Measure the three sources of degeneracy at each site, and the behavioural total if possible.

    Per site it reads ``stats[site].acts`` (always), ``.grads`` (when collected with
    ``jacobians=...``) and ``.firing`` (when collected with ``firing=True``).

    Args:
        stats: ``run.stats`` from :func:`degen_hooks.collect`.
        sites: Sites to report on; ``None`` means all, in the order of ``stats``.
        model: The model; used to infer ``d_next`` (see below) and, with ``data``, for the
            behavioural count.
        data: Inputs for :func:`behavioural_null_dimension` (a tensor or an iterable of
            batches). Only for small models: it forms the full parameter Jacobian.
        rtol: Relative threshold for every rank. A covariance or Gram eigenvalue counts when
            it exceeds ``rtol * largest``; a Jacobian singular value when it exceeds
            ``rtol * largest``. Default: ``10 * d * eps(float64)`` for the ``d x d`` site
            matrices, ``max(n_rows, n_params) * eps(float64)`` for the Jacobian (NumPy's
            ``matrix_rank`` rule). Raise it (e.g. ``1e-6``) for float32 / bfloat16 models,
            whose rounding breaks exact linear dependence.
        next_widths: ``{site: d_next}``, the number of rows of the weight that reads the site
            (the next layer's output width). Without it ``d_next`` is inferred from ``model``
            when the site is the input of an ``nn.Linear``, a module followed inside an
            ``nn.Sequential`` by an ``nn.Linear`` reading ``d_site`` features (``Dropout`` /
            ``Identity`` in between are skipped), or a TransformerLens ``mlp.hook_post``
            (read by ``mlp.W_out``); otherwise it is unknown (``None``).
        tolerance: Passed to :class:`~degen_hooks.synchronized.SynchronizedNeurons`.
        params: Parameter names or globs for the behavioural count (default: all).

    Returns:
        A :class:`DegeneracyReport`.

    Raises:
        SiteNotFoundError: If a site in ``sites`` or ``next_widths`` has no statistics.
        EmptyStatisticsError: If a site has seen no samples.
        ShapeMismatchError: If ``data`` does not fit the model: a width other than the
            ``in_features`` of the model's first ``nn.Linear``, or a batch the model refuses
            for its shape.
        ValueError: If ``data`` is given without ``model``, or a width is not positive.

    Examples:
        >>> import torch, degen_hooks as dh
        >>> from degen_hooks.degeneracy import degeneracy_report
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(),
        ...                             torch.nn.Linear(3, 1)).double()
        >>> with torch.no_grad():
        ...     model[0].weight[1] = model[0].weight[0]; model[0].bias[1] = model[0].bias[0]
        >>> x = torch.randn(64, 2, dtype=torch.float64)
        >>> with dh.collect(model, ["1"], firing=True) as run:
        ...     _ = model(x)
        >>> row = degeneracy_report(run.stats, model=model).sites[0]
        >>> row.activation_deficiency, row.free_outgoing, row.groups
        (1, 1, [[0, 1]])
    """
    if data is not None and model is None:
        raise ValueError(
            "data= was given without model=: the behavioural null dimension needs both."
        )
    keys = list(stats) if sites is None else [sites] if isinstance(sites, str) else list(sites)
    widths = dict(next_widths or {})
    for key in [*keys, *widths]:
        stats[key]  # noqa: B018 - raises SiteNotFoundError with suggestions
    for key, width in widths.items():
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"next_widths[{key!r}] must be a positive int, got {width!r}.")
    rows = [_site_row(stats, key, model, widths.get(key), rtol, tolerance) for key in keys]
    behavioural = None
    if model is not None and data is not None:
        batches = [data] if isinstance(data, torch.Tensor) else list(data)  # iterated once
        _check_data_width(model, batches)
        try:
            null_dim, n_params, _, n_rows, used = _behavioural(model, batches, params, rtol)
        except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError from torch 2.5 on
            raise
        except RuntimeError as err:
            if not _SHAPE_WORDS.search(str(err)):
                raise
            shapes = [_shape_of(b) for b in batches[:3]] + (["..."] if len(batches) > 3 else [])
            raise ShapeMismatchError(
                f"The behavioural count could not run {type(model).__name__} on data= (batch "
                f"shapes [{', '.join(shapes)}]): {err}. data= must hold the model's inputs, "
                "batched as the model takes them (the inputs the statistics were collected on)."
            ) from err
        behavioural = BehaviouralNull(
            null_dim=null_dim,
            n_params=n_params,
            rank=n_params - null_dim,
            n_rows=n_rows,
            rtol=used,
        )
    return DegeneracyReport(sites=rows, behavioural=behavioural)


_SHAPE_WORDS = re.compile(r"shape|size|dimension", re.IGNORECASE)


def _shape_of(batch: Any) -> str:
    return str(tuple(batch.shape)) if isinstance(batch, torch.Tensor) else type(batch).__name__


def _check_data_width(model: nn.Module, batches: list[Any]) -> None:
    """Batches for the behavioural count must fit the model's first ``nn.Linear``, if any.

    A mismatch otherwise surfaces as a matrix-product error from deep inside ``jacrev``.
    """
    first = _unwrap(model)[0]
    while isinstance(first, nn.Sequential) and len(first):
        first = first[0]
    if not isinstance(first, nn.Linear):
        return
    expected = first.in_features
    for batch in batches:
        if not isinstance(batch, torch.Tensor) or not batch.is_floating_point():
            continue
        shape = tuple(batch.shape)
        if batch.ndim < 2:
            raise ShapeMismatchError(
                f"data= holds a tensor of shape {shape}, but the behavioural count needs "
                f"batches of model inputs, shape (n_samples, {expected}) for "
                f"{type(model).__name__}: use x.unsqueeze(0) for one sample."
            )
        if shape[-1] != expected:
            raise ShapeMismatchError(
                f"data= has width {shape[-1]} (a batch of shape {shape}), but "
                f"{type(model).__name__} starts with Linear(in_features={expected}): the "
                "behavioural count runs the model on data=, so pass the model's inputs (those "
                f"the statistics were collected on), shape (n_samples, {expected})."
            )


def _site_row(
    stats: Statistics,
    key: str,
    model: nn.Module | None,
    d_next: int | None,
    rtol: float | None,
    tolerance: float,
) -> SiteDegeneracy:
    site_stats = stats[key]
    acts = site_stats.acts
    if acts.n_samples == 0 or acts.d is None:
        raise EmptyStatisticsError(
            f"Site {key!r} has seen no samples; run the model inside the `with dh.collect(...)` "
            "block before building the report."
        )
    d = acts.d
    rank, used = _rank(acts.cov(), rtol)
    if d_next is None and model is not None:
        d_next = _infer_next_width(model, site_stats.info, d)
    extra: dict[str, Any] = {}
    if site_stats.grads is not None and site_stats.grads.n_samples > 0:
        j_rank, _ = _rank(site_stats.grads.second_moment(), rtol)
        extra.update(
            jacobian_rank=j_rank,
            jacobian_deficiency=d - j_rank,
            jacobians=stats.metadata.get("jacobians"),
        )
    if site_stats.firing is not None and site_stats.firing.n_samples > 0:
        sync = SynchronizedNeurons(tolerance=tolerance).fit(site_stats.firing, site=key)
        extra.update(
            groups=[sorted(g) for g in sync.groups_],
            group_directions=sync.degenerate_directions_,
            dead=sync.dead_,
            always_on=sync.always_on_,
            threshold=sync.threshold_,
        )
    return SiteDegeneracy(
        site=key,
        d_site=d,
        n_samples=acts.n_samples,
        activation_rank=rank,
        activation_deficiency=d - rank,
        activation_rtol=used,
        d_next=d_next,
        free_outgoing=None if d_next is None else d_next * (d - rank),
        **extra,
    )


def _rank(matrix: torch.Tensor, rtol: float | None) -> tuple[int, float]:
    """Numerical rank of a symmetric PSD matrix and the relative threshold used."""
    d = matrix.shape[0]
    used = 10 * d * _EPS if rtol is None else float(rtol)
    sym = matrix.to(torch.float64)
    eigenvalues = torch.linalg.eigvalsh((sym + sym.T) / 2)
    largest = float(eigenvalues.max()) if d else 0.0
    if largest <= 0:
        return 0, used
    return int((eigenvalues > used * largest).sum()), used


def _infer_next_width(model: nn.Module, info: Mapping[str, Any], d_site: int) -> int | None:
    """Output width of the linear map reading the site, when the model makes it obvious."""
    name, io = info.get("name"), info.get("io", "output")
    modules = _site_modules(_unwrap(model)[0])  # a TransformerLens bridge: its aliases too
    if not name or name not in modules:
        return None
    module = modules[name]
    if io == "input":
        if isinstance(module, nn.Linear) and module.in_features == d_site:
            return module.out_features
        return None
    parent_name, _, leaf = name.rpartition(".")
    # TransformerLens MLPs read hook_post through the parameter W_out, shape (d_mlp, d_model).
    w_out = getattr(modules[parent_name], "W_out", None)
    if leaf == "hook_post" and isinstance(w_out, torch.Tensor) and w_out.ndim == 2:
        return int(w_out.shape[1]) if w_out.shape[0] == d_site else None
    path = name.split(".")
    while path:
        parent = modules[".".join(path[:-1])]
        if not isinstance(parent, nn.Sequential):
            return None
        children = list(parent._modules)
        for child_name in children[children.index(path[-1]) + 1 :]:
            child = parent._modules[child_name]
            while isinstance(child, nn.Sequential) and len(child):
                child = child[0]
            if isinstance(child, _PASS_THROUGH):
                continue
            if isinstance(child, nn.Linear) and child.in_features == d_site:
                return child.out_features
            return None
        path = path[:-1]  # last child of this Sequential: continue after the Sequential
    return None
