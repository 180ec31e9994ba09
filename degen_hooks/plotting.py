"""Matplotlib helpers: spectra, co-firing, ablation curves, interaction graphs (optional).

Nothing in the package imports this module at import time; matplotlib is imported inside
each function, so ``import degen_hooks`` works without it. Every function draws on ``ax``
(or a new figure) and returns the ``Figure``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from ._checks import optional_import

__all__ = [
    "plot_ablation_curve",
    "plot_ablation_curves",
    "plot_cofiring",
    "plot_edge_ablation",
    "plot_interaction_graph",
    "plot_spectra",
]


def _pyplot() -> Any:
    return optional_import("matplotlib.pyplot", "Plotting", "matplotlib")


def _axes(ax: Any) -> tuple[Any, Any]:
    if ax is None:
        fig, ax = _pyplot().subplots(figsize=(6, 4))
        return fig, ax
    return ax.figure, ax


def plot_ablation_curve(curve: Any, ax: Any = None) -> Any:
    """Node ablation: metric versus features kept, one line per basis, dashed baseline.

    Args:
        curve: An :class:`~degen_hooks.AblationCurve` (``n_kept``, ``values``,
            ``baseline``, ``site``).
        ax: Matplotlib axes to draw on; a new figure when ``None``.

    Returns:
        The matplotlib ``Figure``.
    """
    fig, ax = _axes(ax)
    for name, ks in curve.n_kept.items():
        ax.plot(ks, curve.values[name], marker=".", label=name)
    ax.axhline(curve.baseline, color="grey", linestyle="--", linewidth=1, label="unablated")
    ax.set_xlabel("features kept")
    ax.set_ylabel("metric")
    ax.set_title(f"node ablation at {curve.site}")
    ax.legend()
    return fig


def plot_edge_ablation(curve: Any, ax: Any = None) -> Any:
    """Edge ablation: metric versus edges kept (symlog axis), one line per basis.

    Dotted vertical lines mark :func:`~degen_hooks.graph.min_edges` results when present.

    Args:
        curve: An :class:`~degen_hooks.graph.EdgeAblationCurve`.
        ax: Matplotlib axes to draw on; a new figure when ``None``.

    Returns:
        The matplotlib ``Figure``.
    """
    fig, ax = _axes(ax)
    for name, ks in curve.n_edges.items():
        (line,) = ax.plot(ks, curve.values[name], marker=".", label=name)
        found = curve.min_edges.get(name)
        if found is not None and found.n_edges is not None:
            ax.axvline(found.n_edges, color=line.get_color(), linestyle=":", linewidth=1)
    ax.axhline(curve.baseline, color="grey", linestyle="--", linewidth=1, label="unablated")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("edges kept (strongest first)")
    ax.set_ylabel("metric")
    ax.set_title(f"edge ablation {curve.pair[0]} -> {curve.pair[1]}")
    ax.legend()
    return fig


def _community_index(communities: Iterable[Iterable[Any]] | None) -> dict[Any, int]:
    index: dict[Any, int] = {}
    for k, members in enumerate(communities or []):
        for node in members:
            index[node] = k
    return index


def plot_interaction_graph(
    graph: Any,
    communities: Iterable[Iterable[Any]] | None = None,
    ax: Any = None,
    *,
    mass: float = 0.99,
    max_width: float = 4.0,
    max_size: float = 250.0,
) -> Any:
    """Layered drawing of an interaction graph.

    x is the layer, y the feature index (feature 0 on top); node area grows with
    ``Lambda`` (normalised per layer), edge width with ``E`` (normalised per pair), and only
    the strongest edges holding ``mass`` of each pair's total are drawn. Nodes are coloured
    by community (``(site, feature)`` tuples, as from
    :func:`~degen_hooks.graph.louvain_communities`); grey when ``communities`` is ``None``.

    Args:
        graph: A fitted :class:`~degen_hooks.InteractionGraph`.
        communities: Partition of ``(site, feature)`` nodes, or ``None``.
        ax: Matplotlib axes to draw on; a new figure when ``None``.
        mass: Edge-mass fraction drawn per pair.
        max_width: Line width of the strongest edge of a pair.
        max_size: Marker area of the largest node of a layer.

    Returns:
        The matplotlib ``Figure``.
    """
    from matplotlib.collections import LineCollection

    from .graph.modularity import edges_for_mass

    plt = _pyplot()
    fig, ax = _axes(ax)
    layer_of = {site: k for k, site in enumerate(graph.sites_)}
    segments, widths = [], []
    for (a, b), edges in graph.edges_.items():
        values = edges.to(torch.float64)
        top = float(values.max()) if values.numel() else 0.0
        k = edges_for_mass(values, mass)
        if k == 0 or top <= 0:
            continue
        cut = float(values.reshape(-1).sort(descending=True).values[k - 1])
        for i, j in (values >= cut).nonzero().tolist():
            segments.append([(layer_of[a], -j), (layer_of[b], -i)])
            widths.append(max_width * float(values[i, j]) / top)
    ax.add_collection(
        LineCollection(segments, linewidths=widths, colors="0.35", alpha=0.6, zorder=1)
    )
    colour_of = _community_index(communities)
    cmap = plt.get_cmap("tab10")
    for site, layer in layer_of.items():
        lam = graph.lambdas_[site].to(torch.float64)
        scale = float(lam.max()) if lam.numel() and float(lam.max()) > 0 else 1.0
        sizes = (max_size * (lam.clamp_min(0) / scale).sqrt() + 8).tolist()
        colours = [
            cmap(colour_of[(site, j)] % 10) if (site, j) in colour_of else "0.6"
            for j in range(len(lam))
        ]
        ys = [-j for j in range(len(lam))]
        ax.scatter([layer] * len(lam), ys, s=sizes, c=colours, zorder=2, edgecolors="k")
    ax.set_xticks(range(len(layer_of)), list(layer_of), rotation=30, ha="right")
    ax.set_ylabel("feature (0 = largest Lambda)")
    ax.set_xlim(-0.5, len(layer_of) - 0.5)
    ax.autoscale_view(scalex=False)
    ax.set_title("interaction graph")
    return fig


def plot_ablation_curves(curves: Sequence[Any]) -> Any:
    """Several node-ablation curves side by side (one panel per site); returns the Figure."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.6), squeeze=False)
    for ax, curve in zip(axes[0], curves, strict=True):
        plot_ablation_curve(curve, ax=ax)
    fig.tight_layout()
    return fig


def plot_spectra(basis: Any, pca: Any = None, *, sites: Sequence[str] | None = None) -> Any:
    """Eigenvalue spectra per site: the Gram's (kept vs truncated) and the basis's Lambda.

    Args:
        basis: A fitted interaction basis.
        pca: Optionally a PCA basis fitted on the same statistics (its kept width is marked).
        sites: Sites to show (default: all of ``basis``).

    Returns:
        A matplotlib Figure, one log-scale panel per site, values relative to their maximum.
    """
    plt = _pyplot()
    keys = list(sites or basis.sites_)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        gram = basis.gram_eigenvalues_[key].detach().cpu().double()
        kept = pca.widths_[key] if pca is not None else int((gram > 0).sum())
        scale = float(gram[0]) if float(gram[0]) > 0 else 1.0
        index = range(1, len(gram) + 1)
        ax.semilogy(
            list(index)[:kept], (gram[:kept] / scale).clamp_min(1e-30), ".", label="Gram (kept)"
        )
        if kept < len(gram):
            ax.semilogy(
                list(index)[kept:],
                (gram[kept:] / scale).clamp_min(1e-30),
                ".",
                color="0.7",
                label="Gram (truncated)",
            )
        lam = basis.lambdas_[key].detach().cpu().double()
        if len(lam):
            ax.semilogy(range(1, len(lam) + 1), lam / lam[0], "-", label="Lambda (kept)")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("index")
        ax.set_ylabel("eigenvalue / max")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_cofiring(synchronized: Any, firing: Any, *, max_neurons: int = 200, ax: Any = None) -> Any:
    """Agreement heatmap of neurons' firing patterns with synchronized groups outlined.

    Args:
        synchronized: A fitted ``SynchronizedNeurons``.
        firing: Its ``CoFiring`` counts, or the ``Statistics`` holding them at its site.
        max_neurons: Show at most this many neurons: the groups first, then the others by
            firing rate.
        ax: Optional axes to draw on.

    Returns:
        The matplotlib Figure.
    """
    from matplotlib.patches import Rectangle

    counts = firing
    if not hasattr(counts, "disagreement"):
        counts = firing[synchronized.site_].firing
    agreement = 1.0 - counts.disagreement().detach().cpu()
    grouped = [sorted(group) for group in synchronized.groups_]
    order = [i for group in grouped for i in group]
    rest = torch.argsort(counts.firing_rate().cpu(), descending=True).tolist()
    order += [i for i in rest if i not in set(order)]
    order = order[:max_neurons]
    fig, ax = _axes(ax)
    image = ax.imshow(agreement[order][:, order], vmin=0.0, vmax=1.0, cmap="viridis")
    fig.colorbar(image, ax=ax, label="fraction of samples firing alike")
    start = 0
    for group in grouped:
        if start + len(group) > len(order):
            break
        ax.add_patch(
            Rectangle(
                (start - 0.5, start - 0.5), len(group), len(group), fill=False, ec="red", lw=1
            )
        )
        start += len(group)
    ax.set_title(f"co-firing at {synchronized.site_} ({len(grouped)} groups outlined)", fontsize=9)
    ax.set_xlabel("neuron (groups first)")
    ax.set_ylabel("neuron")
    return fig
