"""Exports that other interpretability tools open: SAELens folders, attribution-graph JSON.

A leaf of the package (nothing in the core imports it):

* :func:`export_saelens` writes an interaction basis at one site as a folder SAELens loads
  as a sparse autoencoder (``cfg.json`` and ``sae_weights.safetensors``), so SAE dashboards
  and evaluations rank its features beside sparse autoencoders
  (:mod:`degen_hooks.export.saelens`);
* :func:`export_graph` writes an :class:`~degen_hooks.InteractionGraph` as the
  attribution-graph JSON circuit-tracer writes and Neuronpedia's graph viewer opens
  (schema version :data:`GRAPH_SCHEMA_VERSION`, JSON Schema from :func:`graph_schema`;
  :mod:`degen_hooks.export.attribution_graph`).

``dh.save`` / ``dh.load`` remain the library's own format: exports are one-way.
"""

from __future__ import annotations

from .attribution_graph import GRAPH_SCHEMA_VERSION, export_graph, graph_schema
from .saelens import SAELENS_CONFIG_VERSION, export_saelens

__all__ = [
    "GRAPH_SCHEMA_VERSION",
    "SAELENS_CONFIG_VERSION",
    "export_graph",
    "export_saelens",
    "graph_schema",
]
