"""Sparsity and modularity of interaction graphs, from edge matrices alone (no model).

Sparsity: :func:`edges_for_mass` (how many edges hold a fraction of the edge mass, the LIB
paper's sparsity comparison of LIB and PCA) and :func:`gini`. Modularity (degeneracy paper,
arXiv 2405.10927 §5; lib_math §4.5): an undirected graph over the features of all layers with
log-normalised weights ``A_ij = max(0, log10(E_ij / eps_l))`` (a per-pair cut-off ``eps_l``:
edges below it cost nothing to remove), Louvain communities, and Newman's modularity
``Q = 1/(2m) sum_ij [A_ij - gamma k_i k_j / (2m)] delta(c_i, c_j)``. rib runs Leiden
(networkit); Louvain from networkx optimises the same objective. networkx is optional
(``pip install networkx``) and imported only here, lazily.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .._checks import optional_import
from ..basis import InteractionBasis
from .edges import InteractionGraph, Pair, fit_graphs

__all__ = [
    "edges_for_mass",
    "gini",
    "interaction_network",
    "interaction_sparsity",
    "louvain_communities",
    "modularity",
    "sparsity_table",
]


def _networkx() -> Any:
    return optional_import("networkx", "Interaction networks and communities")


def _values(edges: torch.Tensor) -> torch.Tensor:
    values = torch.as_tensor(edges, dtype=torch.float64).reshape(-1)
    if values.numel() and float(values.min()) < 0:
        raise ValueError(
            f"Edge strengths must be >= 0 (squared attributions); the minimum is "
            f"{float(values.min()):.3g}."
        )
    return values


def edges_for_mass(edges: torch.Tensor, mass: float = 0.99) -> int:
    """The fewest edges (strongest first) holding at least ``mass`` of the total edge mass.

    Args:
        edges: Non-negative edge strengths, any shape (e.g. ``(r_next, r_l)``).
        mass: Fraction of the total, in ``(0, 1]``.

    Returns:
        A count in ``0..edges.numel()`` (0 when every edge is zero).

    Raises:
        ValueError: If ``mass`` is outside ``(0, 1]`` or an edge is negative.

    Examples:
        >>> edges_for_mass(torch.tensor([[90.0, 0.5], [9.0, 0.5]]), mass=0.99)
        2
    """
    if not 0 < mass <= 1:
        raise ValueError(f"mass must be in (0, 1], got {mass}.")
    values = _values(edges).sort(descending=True).values
    cumulative = values.cumsum(0)
    if not values.numel() or float(cumulative[-1]) <= 0:
        return 0
    target = torch.tensor(mass * float(cumulative[-1]), dtype=torch.float64)
    # The total is the last cumulative sum itself, so mass = 1 needs every nonzero edge.
    k = int(torch.searchsorted(cumulative, target)) + 1
    return min(k, int((values > 0).sum()))


def gini(edges: torch.Tensor) -> float:
    """Gini coefficient of the edge strengths: 0 when equal, ``1 - 1/n`` for one nonzero.

    Examples:
        >>> gini(torch.ones(4))
        0.0
        >>> gini(torch.tensor([0.0, 0.0, 0.0, 5.0]))
        0.75
    """
    values = _values(edges).sort().values
    n, total = values.numel(), float(values.sum())
    if n == 0 or total <= 0:
        return 0.0
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    return float(((2 * ranks - n - 1) * values).sum() / (n * total))


def _edge_tables(
    graph: InteractionGraph | Mapping[Pair, torch.Tensor],
) -> tuple[list[str], dict[Pair, torch.Tensor], Mapping[str, torch.Tensor]]:
    if isinstance(graph, InteractionGraph):
        return list(graph.sites_), dict(graph.edges_), graph.lambdas_
    edges = {tuple(p): torch.as_tensor(e) for p, e in graph.items()}
    sites: list[str] = []
    for a, b in edges:
        sites += [s for s in (a, b) if s not in sites]
    return sites, edges, {}


def _cutoff(values: torch.Tensor, eps: Any, pair: Pair, mass: float, quantile: float) -> float:
    if isinstance(eps, Mapping):
        return float(eps[pair])
    if not isinstance(eps, str):
        return float(eps)
    positive = values[values > 0]
    if not positive.numel():
        return float("inf")
    if eps == "mass":
        k = edges_for_mass(values, mass)
        return float(values.sort(descending=True).values[k - 1])
    if eps == "quantile":
        return float(torch.quantile(positive, quantile))
    raise ValueError(
        f"eps must be a number, a {{pair: number}} mapping, 'mass' or 'quantile'; got {eps!r}."
    )


def interaction_network(
    graph: InteractionGraph | Mapping[Pair, torch.Tensor],
    *,
    eps: float | Mapping[Pair, float] | str = "mass",
    mass: float = 0.99,
    quantile: float = 0.5,
) -> Any:
    """An undirected networkx graph over all features with log-normalised edge weights.

    Nodes are ``(site, feature)`` tuples with attributes ``layer`` (index), ``site``,
    ``feature`` and ``lambda_`` (when known); an edge has ``weight = log10(E / eps_l)``
    (only where ``E > eps_l``) and ``strength = E``.

    Args:
        graph: A fitted :class:`InteractionGraph`, or ``{(site_l, site_next): E}``.
        eps: Per-pair cut-off ``eps_l``: a number, ``{pair: number}`` (e.g. the
            ``threshold`` of :func:`min_edges`, rib's default), ``"mass"`` (the weakest of
            the strongest edges holding ``mass`` of the pair's total) or ``"quantile"``
            (the ``quantile`` of the pair's positive edges).
        mass: Mass fraction of ``eps="mass"``.
        quantile: Quantile of ``eps="quantile"``.

    Returns:
        A ``networkx.Graph``; ``network.graph["eps"]`` holds the cut-offs used.

    Examples:
        >>> E = {("a", "b"): torch.tensor([[100.0, 0.0], [0.0, 10.0]])}
        >>> net = interaction_network(E, eps=1.0)
        >>> sorted(net.edges(data="weight"))
        [(('a', 0), ('b', 0), 2.0), (('a', 1), ('b', 1), 1.0)]
    """
    nx = _networkx()
    sites, edges, lambdas = _edge_tables(graph)
    network = nx.Graph()
    cutoffs: dict[str, float] = {}
    widths: dict[str, int] = {}
    for a, b in edges:
        widths[b], widths[a] = edges[a, b].shape
    for layer, site in enumerate(sites):
        lam = lambdas.get(site)
        for j in range(widths.get(site, 0)):
            value = None if lam is None or j >= len(lam) else float(lam[j])
            network.add_node((site, j), layer=layer, site=site, feature=j, lambda_=value)
    for (a, b), matrix in edges.items():
        values = torch.as_tensor(matrix, dtype=torch.float64)
        cut = _cutoff(_values(values), eps, (a, b), mass, quantile)
        cutoffs[f"{a}->{b}"] = cut
        for i, j in (values > cut).nonzero().tolist():
            strength = float(values[i, j])
            weight = torch.log10(torch.tensor(strength / cut, dtype=torch.float64))
            network.add_edge((a, j), (b, i), weight=float(weight), strength=strength)
    network.graph["eps"] = cutoffs
    return network


def louvain_communities(
    network: Any, *, resolution: float = 1.0, seed: int = 0
) -> list[frozenset[Any]]:
    """Louvain communities of ``network`` (edge attribute ``weight``), largest first.

    Args:
        network: A networkx graph, e.g. from :func:`interaction_network`.
        resolution: Resolution ``gamma`` (rib's scripts use 0.5 or 1).
        seed: Seed of Louvain's node order.

    Returns:
        A partition of the nodes (isolated nodes are their own communities).
    """
    nx = _networkx()
    found = nx.community.louvain_communities(
        network, weight="weight", resolution=resolution, seed=seed
    )
    return sorted((frozenset(c) for c in found), key=lambda c: (-len(c), sorted(map(str, c))))


def modularity(
    network: Any, communities: Iterable[Iterable[Any]], *, resolution: float = 1.0
) -> float:
    """Newman modularity ``Q`` of a partition (weights: edge attribute ``weight``).

    Args:
        network: A networkx graph.
        communities: A partition of its nodes.
        resolution: Resolution ``gamma``.

    Returns:
        ``Q`` in ``[-1/2, 1]`` (0 for a graph without weighted edges).
    """
    nx = _networkx()
    if network.size(weight="weight") == 0:
        return 0.0
    parts = [set(c) for c in communities]
    return float(nx.community.modularity(network, parts, weight="weight", resolution=resolution))


def sparsity_table(
    graphs: Mapping[str, InteractionGraph],
    *,
    mass: float = 0.99,
    pairs: Sequence[Pair] | None = None,
) -> list[dict[str, Any]]:
    """One JSON-able row per basis and layer pair: edge counts, mass counts and Gini.

    Args:
        graphs: ``{basis name: fitted InteractionGraph}``.
        mass: Mass fraction for :func:`edges_for_mass`.
        pairs: Restrict to these pairs (default: every pair of each graph).

    Returns:
        Rows ``{"basis", "pair", "shape", "n_edges", "n_edges_mass", "fraction", "gini",
        "total"}``.
    """
    rows = []
    for name, graph in graphs.items():
        for pair in pairs or graph.pairs_:
            edges = graph.edges_[graph.pair(pair)]
            k = edges_for_mass(edges, mass)
            rows.append(
                {
                    "basis": name,
                    "pair": f"{pair[0]} -> {pair[1]}",
                    "shape": list(edges.shape),
                    "n_edges": edges.numel(),
                    "n_edges_mass": k,
                    "fraction": k / max(edges.numel(), 1),
                    "gini": gini(edges),
                    "total": float(edges.sum()),
                }
            )
    return rows


def interaction_sparsity(
    model: nn.Module,
    bases: Mapping[str, InteractionBasis],
    data: Iterable[Any],
    *,
    mass: float = 0.99,
    graph: Mapping[str, Any] | None = None,
    **fit_kwargs: Any,
) -> tuple[list[dict[str, Any]], dict[str, InteractionGraph]]:
    """Edges of every basis, then the sparsity table: LIB vs PCA in one call.

    The LIB paper's sparsity comparison (lib_math §8): how many edges of each layer pair
    hold ``mass`` of the edge mass, per basis. The only function of this module that runs
    a model (through :func:`~degen_hooks.graph.fit_graphs`).

    Args:
        model: The model.
        bases: ``{name: fitted basis}`` over the same sites, e.g. ``{"LIB": lib, "PCA": pca}``.
        data: Re-iterable batches (the training data the bases were built on).
        mass: Mass fraction of :func:`edges_for_mass`.
        graph: :class:`InteractionGraph` hyperparameters.
        **fit_kwargs: Passed to :meth:`InteractionGraph.fit`, e.g. ``output=True,
            output_positions="last"``.

    Returns:
        ``(rows, graphs)``: :func:`sparsity_table` rows and the fitted graphs.
    """
    graphs = fit_graphs(model, bases, data, graph=graph, **fit_kwargs)
    return sparsity_table(graphs, mass=mass), graphs
