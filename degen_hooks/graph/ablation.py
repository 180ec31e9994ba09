"""Edge ablation: run a model with only the strongest edges of one layer pair kept.

lib_math §7.2 (rib's edge ablation): for each feature ``i`` of the next node layer,
``f_hat'_i`` is recomputed from an input in which only the features ``j`` with
``mask[i, j] = 1`` are kept; the others are zeroed in feature coordinates (set to the mean in
activation space: the mean offset is always kept and never counted). The recomputed features
are written back at the next layer as ``f_hat' @ C'_pinv + mu'`` (the model output: ``y @ R
@ R_pinv``) and the model runs on to its output.

Batched: a group of ``g`` output features is handled by one forward pass over ``g`` stacked,
differently masked copies of the batch, stopped at the next layer; a second, unmasked pass
then carries the recombined layer to the output. Positions outside the layers' positions keep
their clean values. With every edge kept this equals the model with both layers projected
onto their bases: the model itself when the bases span the activations.

:func:`min_edges` bisects for the fewest edges (strongest first) that keep a metric within a
tolerance of the unablated model; :func:`edge_ablation_curve` compares bases side by side.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .._batches import require_reiterable
from .._checks import check_fitted
from .._errors import NotFittedError
from ..basis import InteractionBasis
from ..sites import Site
from ._layers import NodeLayer, output_tensor, repeat_batch, run_section
from .edges import InteractionGraph, Pair

__all__ = [
    "EdgeAblationCurve",
    "MinEdgesResult",
    "ablate_edges",
    "edge_ablation_curve",
    "min_edges",
    "top_edges_mask",
]

Metric = Callable[[Any, Any], "torch.Tensor | float"]


def top_edges_mask(edges: torch.Tensor, n_edges: int) -> torch.Tensor:
    """Boolean mask of the ``n_edges`` strongest entries of ``edges`` (ties: first index).

    Args:
        edges: Edge matrix, shape ``(r_next, r)``.
        n_edges: How many to keep, ``0 <= n_edges <= r_next * r``.

    Returns:
        Boolean tensor shaped like ``edges``.

    Raises:
        ValueError: If ``n_edges`` is out of range.

    Examples:
        >>> top_edges_mask(torch.tensor([[3.0, 1.0], [0.5, 2.0]]), 2)
        tensor([[ True, False],
                [False,  True]])
    """
    total = edges.numel()
    if not 0 <= n_edges <= total:
        raise ValueError(f"n_edges={n_edges} is outside 0..{total} (the pair has {total} edges).")
    order = torch.argsort(edges.reshape(-1), descending=True, stable=True)
    mask = torch.zeros(total, dtype=torch.bool)
    mask[order[:n_edges].cpu()] = True
    return mask.reshape(edges.shape)


def _layers(
    graph: InteractionGraph, pair: Pair, basis: InteractionBasis | None
) -> tuple[NodeLayer, NodeLayer]:
    basis = basis if basis is not None else getattr(graph, "basis_", None)
    if basis is None:
        raise NotFittedError(
            "This InteractionGraph has no basis_ (it was loaded from a file): pass the basis "
            "its edges were computed in, e.g. ablate_edges(..., basis=basis)."
        )
    src = NodeLayer.from_basis(basis, pair[0])
    if pair[1] in basis.sites_:
        return src, NodeLayer.from_basis(basis, pair[1])
    info = dict(graph.output_ or {})
    rotation = graph.output_rotation_
    pinv = None if rotation is None else torch.linalg.pinv(rotation.to(torch.float64))
    rotation = None if rotation is None else rotation.to(torch.float64)
    name = info.get("name")
    fields = {k: v for k, v in info.items() if k not in ("key", "label") and v is not None}
    spec = Site.from_info({**fields, "name": name or ""}, key=pair[1])
    site = spec if name is not None else None
    return src, NodeLayer(pair[1], site, spec.positions, rotation, pinv, None)


def _ablated_output(
    model: nn.Module,
    batch: Any,
    call: Callable[[nn.Module, Any], Any],
    src: NodeLayer,
    dst: NodeLayer,
    mask: torch.Tensor,
    feature_chunk: int,
    padding: Any = None,
) -> Any:
    """The model output with only the masked edges of ``src -> dst`` kept (one batch, with
    its ``(batch, pos)`` padding mask or ``None``: padding is written back unchanged)."""
    if padding is not None:
        padding = torch.as_tensor(padding).bool()
        src, dst = src.at(padding), dst.at(padding)
    r_next = mask.shape[0]
    keep = mask.to(torch.float64)
    parts: list[torch.Tensor] = []
    for start in range(0, r_next, feature_chunk):
        group = torch.arange(start, min(start + feature_chunk, r_next))
        g = len(group)
        weights = keep[group]
        stacked_src, stacked_dst = src.stacked(g), dst.stacked(g)

        def rewrite(
            act: torch.Tensor,
            g: int = g,
            weights: torch.Tensor = weights,
            layer: NodeLayer = stacked_src,
        ) -> Any:
            features = layer.features(act)
            n, s, r = features.shape
            masked = features.reshape(g, n // g, s, r) * weights.to(features.device)[:, None, None]
            return layer.write(act, masked.reshape(n, s, r))

        result = run_section(
            model,
            repeat_batch(batch, g),
            call,
            rewrites={src.key: (src.site, rewrite)},
            target=dst.site,
        )
        features = stacked_dst.features(output_tensor(result) if dst.site is None else result)
        features = features.reshape(g, -1, *features.shape[1:])  # (g, B, T, r_next)
        index = group.to(features.device)
        parts.append(features[torch.arange(g), :, :, index].permute(1, 2, 0))
    recombined = torch.cat(parts, dim=-1)  # (B, T, r_next)
    if dst.site is None:
        return dst.write(output_tensor(call(model, batch)), recombined)
    rewrites = {dst.key: (dst.site, lambda act: dst.write(act, recombined))}
    return run_section(model, batch, call, rewrites=rewrites)


def _average(values: Iterable[Any]) -> float:
    total, count = 0.0, 0
    for value in values:
        value = torch.as_tensor(value, dtype=torch.float64)
        total += float(value.sum())
        count += max(value.numel(), 1)
    return total / max(count, 1)


def _baseline(
    model: nn.Module, data: Iterable[Any], call: Callable[[nn.Module, Any], Any], metric: Metric
) -> float:
    with torch.no_grad():
        return _average(metric(call(model, batch), batch) for batch in data)


def ablate_edges(
    model: nn.Module,
    graph: InteractionGraph,
    pair: int | Pair | str,
    data: Iterable[Any],
    *,
    metric: Metric,
    n_edges: int | None = None,
    mask: torch.Tensor | None = None,
    basis: InteractionBasis | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    feature_chunk: int = 16,
    padding: Callable[[Any], torch.Tensor | None] | None = None,
) -> float:
    """The metric on ``data`` with only some edges of one layer pair kept.

    Args:
        model: The model the graph was computed on.
        graph: A fitted :class:`InteractionGraph`.
        pair: Layer pair: index, ``(site_l, site_next)`` or ``site_l``.
        data: Batches (iterated once).
        metric: ``metric(output, batch)``: per-sample values (averaged) or a scalar. For a
            pair ending at the model output, ``output`` is the output tensor.
        n_edges: Keep the ``n_edges`` strongest edges; all when neither this nor ``mask``.
        mask: Explicit boolean mask, shape ``(r_next, r_l)``.
        basis: The basis of the edges; default ``graph.basis_``.
        forward: ``forward(model, batch) -> output``; defaults to ``model(batch)``.
        feature_chunk: Output features per stacked forward pass (memory bound); ``1`` runs
            one copy of the batch at a time (any batch type).
        padding: ``padding(batch) -> (batch, pos)`` boolean mask of the real tokens (the
            graph's ``fit(mask=...)``; ``hf.mask`` for a tokenizer's ``attention_mask``):
            padding is written back unchanged and ``"last"`` is each row's last real token.
            The metric sees the whole output: take padding into account there.

    Returns:
        The averaged metric.

    Raises:
        ValueError: If both ``n_edges`` and ``mask`` are given, or ``mask`` has another shape.
    """
    key = graph.pair(pair)
    edges = graph.edges_[key]
    if mask is not None and n_edges is not None:
        raise ValueError("Pass n_edges= or mask=, not both.")
    if mask is None:
        mask = top_edges_mask(edges, edges.numel() if n_edges is None else n_edges)
    if tuple(mask.shape) != tuple(edges.shape):
        raise ValueError(
            f"mask has shape {tuple(mask.shape)}, but the edges of {key} have shape "
            f"{tuple(edges.shape)} (r_next, r_l)."
        )
    if feature_chunk < 1:
        raise ValueError(f"feature_chunk must be at least 1, got {feature_chunk}.")
    src, dst = _layers(graph, key, basis)
    call = forward or (lambda m, batch: m(batch))
    mask = mask.bool()

    def evaluated(batch: Any) -> Any:
        padded = None if padding is None else padding(batch)
        output = _ablated_output(model, batch, call, src, dst, mask, feature_chunk, padded)
        return metric(output, batch)

    with torch.no_grad():
        return _average(evaluated(batch) for batch in data)


@dataclass
class MinEdgesResult:
    """Outcome of :func:`min_edges`.

    Attributes:
        pair: The layer pair.
        n_edges: Fewest strongest edges within tolerance (``None`` if even all fail).
        n_total: Number of edges of the pair (``r_next * r_l``).
        threshold: Strength of the weakest kept edge (``inf`` for 0 edges, ``nan`` for
            ``None``): a per-layer ``eps`` for :func:`interaction_network`.
        value: Metric with ``n_edges`` edges kept.
        baseline: Metric of the unablated model.
        evaluations: ``{n_edges: metric}`` of every evaluation made.
    """

    pair: Pair
    n_edges: int | None
    n_total: int
    threshold: float
    value: float
    baseline: float
    evaluations: dict[int, float] = field(default_factory=dict)


def _within(value: float, baseline: float, tolerance: float, higher_is_better: bool) -> bool:
    if higher_is_better:
        return value >= baseline - tolerance
    return value <= baseline + tolerance


def min_edges(
    model: nn.Module,
    graph: InteractionGraph,
    pair: int | Pair | str,
    data: Iterable[Any],
    *,
    metric: Metric,
    tolerance: float,
    higher_is_better: bool = True,
    baseline: float | None = None,
    basis: InteractionBasis | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    feature_chunk: int = 16,
    padding: Callable[[Any], torch.Tensor | None] | None = None,
) -> MinEdgesResult:
    """Bisect for the fewest strongest edges keeping the metric within ``tolerance``.

    Assumes the metric is monotone in the number of edges kept (rib's ``bisect`` schedule,
    lib_math §7.2); the result ``k`` always satisfies the tolerance while ``k - 1`` edges
    did not (or ``k = 0``).

    Args:
        model: The model.
        graph: A fitted :class:`InteractionGraph`.
        pair: Layer pair: index, ``(site_l, site_next)`` or ``site_l``.
        data: Held-out batches (iterated once per evaluation).
        metric: ``metric(output, batch)``, e.g. accuracy.
        tolerance: Allowed distance from the baseline (absolute, in metric units).
        higher_is_better: ``True`` for accuracy-like metrics, ``False`` for losses.
        baseline: Metric of the unablated model; computed when ``None``.
        basis: The basis of the edges; default ``graph.basis_``.
        forward: ``forward(model, batch) -> output``.
        feature_chunk: Output features per stacked forward pass.
        padding: Each batch's padding mask, as :func:`ablate_edges` takes it.

    Returns:
        A :class:`MinEdgesResult`.
    """
    require_reiterable(data, caller="min_edges")
    key = graph.pair(pair)
    edges = graph.edges_[key]
    call = forward or (lambda m, batch: m(batch))
    base = _baseline(model, data, call, metric) if baseline is None else float(baseline)
    evaluations: dict[int, float] = {}

    def ok(k: int) -> bool:
        if k not in evaluations:
            evaluations[k] = ablate_edges(
                model, graph, key, data, metric=metric, n_edges=k, basis=basis,
                forward=forward, feature_chunk=feature_chunk, padding=padding,
            )  # fmt: skip
        return _within(evaluations[k], base, tolerance, higher_is_better)

    total = edges.numel()
    if not ok(total):
        return MinEdgesResult(key, None, total, float("nan"), evaluations[total], base, evaluations)
    lo, hi = 0, total  # invariant: ok(hi)
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    ordered = edges.reshape(-1).sort(descending=True).values
    threshold = float("inf") if hi == 0 else float(ordered[hi - 1])
    return MinEdgesResult(key, hi, total, threshold, evaluations[hi], base, evaluations)


@dataclass
class EdgeAblationCurve:
    """Metric versus the number of edges kept in one layer pair, per basis.

    Attributes:
        pair: The layer pair.
        n_edges: ``{basis name: [k, ...]}``.
        values: ``{basis name: [metric at k, ...]}``.
        n_total: ``{basis name: edges of the pair}``.
        baseline: Metric of the unablated model.
        min_edges: ``{basis name: MinEdgesResult}`` when a tolerance was given.
    """

    pair: Pair
    n_edges: dict[str, list[int]] = field(default_factory=dict)
    values: dict[str, list[float]] = field(default_factory=dict)
    n_total: dict[str, int] = field(default_factory=dict)
    baseline: float = float("nan")
    min_edges: dict[str, MinEdgesResult] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "pair": list(self.pair),
            "n_edges": self.n_edges,
            "values": self.values,
            "n_total": self.n_total,
            "baseline": self.baseline,
            "min_edges": {
                name: {"n_edges": r.n_edges, "threshold": r.threshold, "value": r.value}
                for name, r in self.min_edges.items()
            },
        }

    def plot(self, ax: Any = None) -> Any:
        """Plot the curves (matplotlib); returns the Figure."""
        from ..plotting import plot_edge_ablation

        return plot_edge_ablation(self, ax=ax)


def default_schedule(n_total: int, n_points: int = 24) -> list[int]:
    """``0`` and about ``n_points`` geometrically spaced counts up to ``n_total``."""
    if n_total == 0:
        return [0]
    spaced = np.unique(np.round(np.geomspace(1, n_total, n_points)).astype(int))
    return [0, *(int(k) for k in spaced)]


def edge_ablation_curve(
    model: nn.Module,
    graphs: Mapping[str, InteractionGraph],
    pair: int | Pair | str,
    data: Iterable[Any],
    *,
    metric: Metric,
    n_edges: Sequence[int] | None = None,
    tolerance: float | None = None,
    higher_is_better: bool = True,
    bases: Mapping[str, InteractionBasis] | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    feature_chunk: int = 16,
    padding: Callable[[Any], torch.Tensor | None] | None = None,
    progress: bool = True,
) -> EdgeAblationCurve:
    """Edge-ablation curves of one layer pair for several bases (LIB vs PCA vs neurons).

    Args:
        model: The model.
        graphs: ``{name: fitted InteractionGraph}``, each in its own basis.
        pair: Layer pair (the same sites in every graph).
        data: Held-out batches.
        metric: ``metric(output, batch)``.
        n_edges: Counts to evaluate; default :func:`default_schedule` per basis.
        tolerance: Also bisect for :func:`min_edges` at this tolerance.
        higher_is_better: Direction of the metric.
        bases: ``{name: basis}`` for graphs without ``basis_`` (loaded from files).
        forward: ``forward(model, batch) -> output``.
        feature_chunk: Output features per stacked forward pass.
        padding: Each batch's padding mask, as :func:`ablate_edges` takes it.
        progress: Show a progress bar.

    Returns:
        An :class:`EdgeAblationCurve`.
    """
    from tqdm.auto import tqdm

    call = forward or (lambda m, batch: m(batch))
    bases = dict(bases or {})
    first = next(iter(graphs.values()))
    check_fitted(first, ["edges_"])
    key = first.pair(pair)
    curve = EdgeAblationCurve(pair=key, baseline=_baseline(model, data, call, metric))
    jobs = []
    for name, graph in graphs.items():
        total = graph.edges_[graph.pair(key)].numel()
        ks = default_schedule(total) if n_edges is None else [min(k, total) for k in n_edges]
        curve.n_edges[name], curve.values[name], curve.n_total[name] = ks, [], total
        jobs += [(name, graph, k) for k in ks]
    common = {
        "metric": metric, "forward": forward, "feature_chunk": feature_chunk, "padding": padding,
    }  # fmt: skip
    for name, graph, k in tqdm(jobs, desc=f"edges {key}", disable=not progress, leave=False):
        value = ablate_edges(model, graph, key, data, n_edges=k, basis=bases.get(name), **common)
        curve.values[name].append(value)
    if tolerance is not None:
        for name, graph in graphs.items():
            curve.min_edges[name] = min_edges(
                model, graph, key, data, tolerance=tolerance, higher_is_better=higher_is_better,
                baseline=curve.baseline, basis=bases.get(name), **common,
            )  # fmt: skip
    return curve
