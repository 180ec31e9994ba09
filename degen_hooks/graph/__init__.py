"""Interaction graphs between node layers: edges, edge ablation, sparsity and modularity.

Local Interaction Basis graphs (Bushnaq et al. 2024, arXiv 2405.10928, lib_math §7; modularity
from the degeneracy paper, arXiv 2405.10927, lib_math §4.5):

* :class:`InteractionGraph` computes edge strengths between the features of consecutive
  node layers, from the forward pass alone where the section between them has a closed-form
  Jacobian (MLP, linear, TransformerLens attention), else by differentiating through the
  model (:mod:`degen_hooks.graph.edges`);
* :func:`ablate_edges`, :func:`min_edges` and :func:`edge_ablation_curve` evaluate a model
  with only the strongest edges of one layer pair kept (:mod:`degen_hooks.graph.ablation`);
* :func:`edges_for_mass`, :func:`gini`, :func:`interaction_network`,
  :func:`louvain_communities` and :func:`modularity` measure sparsity and modularity of edge
  matrices, without a model; :func:`interaction_sparsity` fits the graphs of several bases
  and tabulates their sparsity (:mod:`degen_hooks.graph.modularity`).
"""

from __future__ import annotations

from .ablation import (
    EdgeAblationCurve,
    MinEdgesResult,
    ablate_edges,
    edge_ablation_curve,
    min_edges,
    top_edges_mask,
)
from .edges import InteractionGraph, fit_graphs, integration_points
from .modularity import (
    edges_for_mass,
    gini,
    interaction_network,
    interaction_sparsity,
    louvain_communities,
    modularity,
    sparsity_table,
)

__all__ = [
    "EdgeAblationCurve",
    "InteractionGraph",
    "MinEdgesResult",
    "ablate_edges",
    "edge_ablation_curve",
    "edges_for_mass",
    "fit_graphs",
    "gini",
    "integration_points",
    "interaction_network",
    "interaction_sparsity",
    "louvain_communities",
    "min_edges",
    "modularity",
    "sparsity_table",
    "top_edges_mask",
]
