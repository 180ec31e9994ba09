"""An interaction graph as attribution-graph JSON, the format circuit-tracer and Neuronpedia open.

circuit-tracer (Ameisen et al. 2025, "Circuit Tracing") writes its attribution graphs as one
JSON object that Neuronpedia's graph viewer (and circuit-tracer's local server) opens:

* ``metadata``: ``slug``, ``scan`` (the model's id), ``prompt_tokens``, ``prompt`` and
  ``schema_version`` (1, the version written here, :data:`GRAPH_SCHEMA_VERSION`);
* ``qParams``: the viewer's saved state (pinned nodes, supernodes, clicked node);
* ``nodes``: ``node_id``, ``feature``, ``layer`` (a string), ``ctx_idx`` (token position),
  ``feature_type``, ``jsNodeId``, ``clerp`` (a label), ``influence``, ``activation``;
* ``links``: ``source`` and ``target`` node ids and a ``weight``.

An :class:`~degen_hooks.InteractionGraph` (Bushnaq et al. 2024, arXiv 2405.10928) maps onto it
as follows. Node layer ``l`` of the graph (``graph.sites_[l]``) is ``layer`` ``str(l)``; its
feature ``k`` is node ``"{l}_{k}_0"`` with ``feature = k``, ``activation`` its Lambda (the
feature's variance on the data) and ``influence`` the share of the layer's Lambda held by
features ``0..k`` (the viewer's pruning keeps nodes with ``influence <= node_threshold``, as for
circuit-tracer's cumulative influence). Edge ``E[i, j]`` of a layer pair is a link from feature
``j`` of the first layer to feature ``i`` of the second, with ``weight = E[i, j]`` (``>= 0``).
The graph is a dataset-level average, not one prompt's: every node sits at ``ctx_idx = 0``,
and ``prompt_tokens`` is one placeholder token unless given. The raw model output (``output=True``
without a rotation) is typed ``"logit"``.

The JSON Schema of what is written ships with the package (:func:`graph_schema`); the tests
validate exports against it.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .._checks import check_fitted
from .._errors import SaveExistsError
from ..graph.edges import InteractionGraph

__all__ = ["GRAPH_SCHEMA_VERSION", "export_graph", "graph_schema"]

# metadata.schema_version of circuit-tracer's graph files, the layout written here.
GRAPH_SCHEMA_VERSION = 1
_SCHEMA_FILE = "attribution_graph.schema.json"
_SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_FEATURE_TYPES = {"lib": "lib feature", "pca": "pca feature", "neuron": "neuron"}


def graph_schema() -> dict[str, Any]:
    """The JSON Schema (draft 7) that :func:`export_graph` files follow.

    Returns:
        The schema as a dict; its ``"version"`` is :data:`GRAPH_SCHEMA_VERSION`.

    Examples:
        >>> graph_schema()["properties"]["metadata"]["properties"]["schema_version"]["const"]
        1
    """
    text = resources.files(__package__).joinpath(_SCHEMA_FILE).read_text(encoding="utf-8")
    return json.loads(text)


def export_graph(
    graph: InteractionGraph,
    path: str | os.PathLike[str],
    *,
    slug: str | None = None,
    scan: str = "degen-hooks",
    prompt_tokens: list[str] | None = None,
    prompt: str | None = None,
    edge_threshold: float | None = None,
    node_threshold: float | None = None,
    feature_type: str | None = None,
    overwrite: bool = True,
) -> Path:
    """Write ``graph`` as attribution-graph JSON for circuit-tracer / Neuronpedia-style viewers.

    Args:
        graph: A fitted :class:`~degen_hooks.InteractionGraph`.
        path: The ``.json`` file to write (parent folders are created).
        slug: The graph's id for the viewer (lower-case letters, digits, ``-`` and ``_``);
            default: from the file name.
        scan: The model's id (Neuronpedia reads it as the model, e.g. ``"gpt2-small"``).
        prompt_tokens: Token strings along the viewer's x axis; default one placeholder,
            since the graph averages over a dataset. Every node sits at position 0.
        prompt: The text shown as the prompt; default a description of the data.
        edge_threshold: Keep, per layer pair, the fewest strongest edges holding this share
            of the pair's total edge weight (circuit-tracer's ``edge_threshold``, e.g.
            ``0.98``); ``None`` (default) keeps every nonzero edge.
        node_threshold: The viewer's default pruning threshold on ``influence``
            (``metadata.node_threshold``); ``None`` leaves it unset.
        feature_type: The nodes' ``feature_type``; default from the basis the graph was
            computed in (``"lib feature"``, ``"pca feature"``, ``"neuron"``), else
            ``"basis feature"``. The raw model output is always ``"logit"``.
        overwrite: Replace an existing file (default).

    Returns:
        The file, as a ``Path``.

    Raises:
        NotFittedError: If ``graph`` is not fitted.
        ValueError: For a ``slug`` the viewer would refuse, or a threshold outside ``(0, 1]``.
        SaveExistsError: If ``path`` exists and ``overwrite=False``.

    Examples:
        >>> import json, tempfile, torch, degen_hooks as dh
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
        ...                             torch.nn.Linear(4, 2)).double()
        >>> data = torch.randn(64, 3, dtype=torch.float64).split(32)
        >>> basis = dh.build_bases(model, ["1"], data, progress=False)
        >>> graph = dh.InteractionGraph().fit(model, basis, data, output=True, progress=False)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     written = json.loads(dh.export_graph(graph, f"{tmp}/mlp.json").read_text())
        >>> written["metadata"]["slug"], written["metadata"]["schema_version"]
        ('mlp', 1)
        >>> sorted({node["layer"] for node in written["nodes"]})   # the site, the output
        ['0', '1']
    """
    check_fitted(graph, ["edges_"])
    path = Path(path)
    slug = _slug(path.stem) if slug is None else slug
    if not _SLUG.match(slug):
        raise ValueError(
            f"slug {slug!r} has characters graph viewers refuse: use lower-case letters, "
            f"digits, '-' and '_' (e.g. {_slug(slug)!r})."
        )
    for name, value in (("edge_threshold", edge_threshold), ("node_threshold", node_threshold)):
        if value is not None and not 0 < value <= 1:
            raise ValueError(
                f"{name} must be a share of the total in (0, 1], got {value!r} (e.g. 0.98)."
            )
    if path.exists() and not overwrite:
        raise SaveExistsError(f"{path} exists. Pass overwrite=True to replace it.")
    if feature_type is None:
        variant = getattr(getattr(graph, "basis_", None), "variant", None)
        feature_type = _FEATURE_TYPES.get(variant, "basis feature")
    document = {
        "metadata": _metadata(graph, slug, scan, prompt_tokens, prompt),
        # The viewer's saved state: nothing pinned or clicked yet.
        "qParams": {
            "pinnedIds": [],
            "supernodes": [],
            "linkType": "both",
            "clickedId": "",
            "sg_pos": "",
        },
        "nodes": _nodes(graph, feature_type),
        "links": _links(graph, edge_threshold),
    }
    if node_threshold is not None:
        document["metadata"]["node_threshold"] = float(node_threshold)
    if edge_threshold is not None:
        document["metadata"]["pruning_settings"] = {"edge_threshold": float(edge_threshold)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(json.dumps(document, indent=1), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9_-]+", "-", text.lower()).strip("-_")
    return slug or "interaction-graph"


def _metadata(
    graph: InteractionGraph,
    slug: str,
    scan: str,
    prompt_tokens: list[str] | None,
    prompt: str | None,
) -> dict[str, Any]:
    from .. import __version__

    n_rows = [int(graph.n_rows_[pair]) for pair in graph.pairs_]
    if prompt is None:
        prompt = (
            f"Interaction graph over {' -> '.join(graph.sites_)}, averaged over "
            f"{n_rows[0] if n_rows else 0} rows of data (not one prompt)."
        )
    return {
        "slug": slug,
        "scan": scan,
        "transcoder_list": [],
        "prompt_tokens": list(prompt_tokens) if prompt_tokens is not None else ["<data>"],
        "prompt": prompt,
        "schema_version": GRAPH_SCHEMA_VERSION,
        "info": {
            "description": (
                "Nodes: interaction-basis features per node layer (activation: Lambda, the "
                "feature's variance). Links: squared gradient x input edge strengths between "
                "consecutive layers (Bushnaq et al. 2024, arXiv 2405.10928)."
            ),
            "generator": {
                "name": "degen_hooks",
                "version": __version__,
                "url": "https://arxiv.org/abs/2405.10928",
            },
        },
        "generation_settings": {**graph.get_params(deep=False)},
        "degen_hooks": {
            "sites": list(graph.sites_),
            "pairs": [list(pair) for pair in graph.pairs_],
            "n_rows": n_rows,
            "output": graph.output_,
        },
    }


def _is_logit_layer(graph: InteractionGraph, key: str) -> bool:
    output = graph.output_
    return (
        output is not None
        and output.get("key") == key
        and output.get("name") is None
        and graph.output_rotation_ is None
    )


def _nodes(graph: InteractionGraph, feature_type: str) -> list[dict[str, Any]]:
    nodes = []
    for layer, key in enumerate(graph.sites_):
        lambdas = graph.lambdas_[key].detach().to("cpu", torch.float64)
        total = float(lambdas.sum())
        shares = (lambdas.cumsum(0) / total).tolist() if total > 0 else [None] * len(lambdas)
        logit = _is_logit_layer(graph, key)
        for k, value in enumerate(lambdas.tolist()):
            label = f"output {k}" if logit else f"{key} #{k}"
            nodes.append(
                {
                    "node_id": _node_id(layer, k),
                    "feature": k,
                    "layer": str(layer),
                    "ctx_idx": 0,
                    "feature_type": "logit" if logit else feature_type,
                    "jsNodeId": f"{layer}_{k}-0",
                    "clerp": f"{label} (Lambda {value:.4g})",
                    "influence": None if shares[k] is None else min(float(shares[k]), 1.0),
                    "activation": value,
                    "site": key,
                    "lambda": value,
                }
            )
    return nodes


def _node_id(layer: int, feature: int) -> str:
    return f"{layer}_{feature}_0"


def _links(graph: InteractionGraph, edge_threshold: float | None) -> list[dict[str, Any]]:
    links = []
    index = {key: layer for layer, key in enumerate(graph.sites_)}
    for source_key, target_key in graph.pairs_:
        edges = graph.edges_[(source_key, target_key)].detach().to("cpu", torch.float64)
        weights = edges.flatten()
        order = torch.argsort(weights, descending=True, stable=True)
        n_kept = int((weights > 0).sum())
        if edge_threshold is not None and n_kept:
            cumulative = weights[order].cumsum(0)
            needed = edge_threshold * float(cumulative[-1])
            n_kept = min(n_kept, int(torch.searchsorted(cumulative, needed)) + 1)
        n_cols = edges.shape[1]
        for flat in order[:n_kept].tolist():
            i, j = divmod(flat, n_cols)
            links.append(
                {
                    "source": _node_id(index[source_key], j),
                    "target": _node_id(index[target_key], i),
                    "weight": float(weights[flat]),
                }
            )
    return links
