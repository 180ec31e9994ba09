"""Interaction graph: edge strengths between the features of consecutive node layers.

Local Interaction Basis edges (Bushnaq et al. 2024, arXiv 2405.10928; lib_math §7.1), in the
library's row-vector, centred convention ``f_hat^l = (f^l - mu^l) @ C^l``:

``E^l_ij = 1/(N P_in) sum_x sum_t ( sum_s sum_k w_k d f_hat^{l+1}_{t,i} / d f_hat^l_{s,j}
|_{alpha_k f_hat^l} * f_hat^l_{s,j} )^2``,

a squared gradient x input attribution of input feature ``j`` (summed over input positions
``s`` *inside* the square) to output feature ``i`` at output position ``t`` (summed
*outside*), averaged over the ``N P_in`` rows of the input site.

Where the section between two layers has a closed-form Jacobian (the sections
:func:`~degen_hooks.build_bases` uses, found the same way: ``Linear -> activation -> Linear``
and linear maps, TransformerLens attention, residual MLP and unembedding) the edges come from
one forward pass per batch (:mod:`degen_hooks.graph._closed`, #19): an MLP section's
per-sample Jacobians are a few batched products of its input and pre-activations, an
attention section's are built from the layer's q, k, v and pattern, all read in that pass;
integrated gradients move each section to ``alpha f_hat`` without running the model again
(pre-activations, q, k and v are affine in the section's input). Memory holds one batch and
fixed-size chunks, whatever the number of samples; the numbers equal the backward passes'
to rounding.

Elsewhere the edges are computed by differentiating through the model: a forward hook
replaces the input site's activation by ``z @ C_pinv + mu`` with ``z`` a leaf tensor
(``z = alpha f_hat``), the pass stops at the next site, whose features ``(f' - mu') @ C'``
are differentiated with batched probes (:mod:`degen_hooks.graph._backward_edges`, mixed into
:class:`InteractionGraph`).

This module holds :class:`InteractionGraph` (fitting, persistence), the integration rules
(:func:`integration_points`) and :func:`fit_graphs`; the node layers, the output layer among
them, are in :mod:`degen_hooks.graph._layers`.

Conventions and choices:

* The constant direction (the mean ``mu``) is an affine offset, not a feature: no edges from
  or to it are computed (rib drops them too when centring).
* Integrated gradients scale the input *features* along ``alpha f_hat`` (``alpha`` from 0 to
  1); the mean offset is not scaled (rib scales its constant feature too), so the path starts
  at the mean activation, not at zero activation.
* The input is rebuilt from its features, so directions a truncated basis drops are removed
  (rib's ``module_hat``); for an untruncated basis the rebuilt activation is the activation.
* The last layer may be the model output (or any later site) read raw or through a rotation
  ``R`` (``basis.output_rotation_``): its features are ``y @ R`` (uncentred; centring does not
  change derivatives). Its ``lambdas_`` are the variances of those features.
* ``method="stochastic"`` replaces the sum over output positions by ``n_sources`` Rademacher
  combinations ``sum_t phi_t f_hat_{t,i}`` (unbiased; exact with one output position).
  Features cannot be combined that way: a random sum over ``i`` estimates column sums only.

For a linear section the column sums ``sum_i E_ij`` equal ``Lambda_j`` (lib_math T6).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from .._checks import check_fitted
from .._errors import ShapeMismatchError, SiteNotFoundError
from .._estimator import ParamsMixin
from ..accumulators import Covariance
from ..basis import InteractionBasis
from ..sites import Site
from ._backward_edges import BackwardEdges
from ._closed import ReadPass, find_closed_pairs, pair_edges
from ._layers import NodeLayer
from ._layers import describe_output as _describe_output
from ._layers import output_layer as _output_layer

__all__ = ["InteractionGraph", "fit_graphs", "integration_points"]

_METHODS = ("exact", "stochastic")
_INTEGRATIONS = ("gradient", "trapezoidal", "gauss-legendre")
Pair = tuple[str, str]


def integration_points(integration: str, n_intervals: int) -> tuple[np.ndarray, np.ndarray]:
    """Points ``alpha_k`` in ``[0, 1]`` and weights ``w_k`` of an integration rule.

    Args:
        integration: ``"gradient"`` (``alpha = 1``, weight 1; needs ``n_intervals=0``),
            ``"trapezoidal"`` (``n_intervals + 1`` equally spaced points) or
            ``"gauss-legendre"`` (``n_intervals + 1`` Gauss-Legendre nodes).
        n_intervals: Number of intervals (``>= 1`` for the integrating rules).

    Returns:
        ``(alphas, weights)``, each shape ``(n_points,)``; the weights sum to 1.

    Raises:
        ValueError: For an unknown rule or an invalid ``n_intervals``.

    Examples:
        >>> integration_points("trapezoidal", 2)
        (array([0. , 0.5, 1. ]), array([0.25, 0.5 , 0.25]))
    """
    if integration not in _INTEGRATIONS:
        raise ValueError(f"integration must be one of {_INTEGRATIONS}, got {integration!r}.")
    if integration == "gradient":
        if n_intervals != 0:
            raise ValueError(
                f"integration='gradient' evaluates one point (alpha = 1); got n_intervals="
                f"{n_intervals}. Use integration='trapezoidal' or 'gauss-legendre' to integrate."
            )
        return np.ones(1), np.ones(1)
    if n_intervals < 1:
        raise ValueError(
            f"integration={integration!r} needs n_intervals >= 1, got {n_intervals}. Use "
            "integration='gradient' for the plain gradient x input rule."
        )
    if integration == "trapezoidal":
        alphas = np.linspace(0.0, 1.0, n_intervals + 1)
        weights = np.full(n_intervals + 1, 1.0 / n_intervals)
        weights[[0, -1]] /= 2
        return alphas, weights
    nodes, weights = np.polynomial.legendre.leggauss(n_intervals + 1)
    return (nodes + 1) / 2, weights / 2


class InteractionGraph(BackwardEdges, ParamsMixin):
    """Edges between the features of consecutive node layers of a basis.

    Args:
        method: ``"exact"`` (one probe per output position and feature) or ``"stochastic"``
            (``n_sources`` Rademacher combinations of output positions per feature).
        n_sources: Random sources per batch (stochastic only).
        integration: ``"gradient"`` (gradient x input at the data point, the paper
            configs), ``"trapezoidal"`` or ``"gauss-legendre"`` (integrated gradients along
            ``alpha f_hat``, ``alpha`` in ``[0, 1]``, mean offset not scaled).
        n_intervals: Intervals of the integrating rules (0 for ``"gradient"``).
        seed: Seed of the Rademacher sources.

    Attributes:
        sites_: Node layers in forward order (the basis sites, then the output layer if any).
        pairs_: Consecutive pairs ``(site_l, site_next)``.
        edges_: ``{pair: E}``, ``E`` of shape ``(r_next, r_l)``, float64, ``>= 0``.
        lambdas_: ``{site: Lambda}``, shape ``(r,)`` (the output layer's feature variances).
        n_rows_: ``{pair: rows of the input site averaged over}``.
        output_: ``None`` or ``{"key", "name", "io", "positions"}`` of the output layer.
        output_rotation_: The output layer's rotation ``R`` (``(d_out, r)``) or ``None``.
        closed_form_: The pairs whose edges came from a closed-form section (no backward
            passes); the others ran backward passes.
        timings_: Seconds per pair (labels ``"edges a -> b"``, with ``" (closed form)"``
            where it applied) and of the shared forward pass (``"reads"``); not saved.
        basis_: The basis the edges were computed in (not saved by :meth:`state_dict`).

    Follows scikit-learn's estimator protocol: ``get_params`` / ``set_params``, and
    ``sklearn.base.clone`` gives an unfitted copy with the same hyperparameters. Export the
    fitted graph for attribution-graph viewers with :func:`degen_hooks.export_graph`.

    Examples:
        >>> import torch, degen_hooks as dh
        >>> from degen_hooks.graph import InteractionGraph
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
        ...                             torch.nn.Linear(4, 2)).double()
        >>> data = torch.randn(64, 3, dtype=torch.float64).split(32)
        >>> basis = dh.build_bases(model, ["1"], data, progress=False)
        >>> graph = InteractionGraph().fit(model, basis, data, output=True, progress=False)
        >>> graph.pairs_
        [('1', 'output')]
        >>> E = graph.edges_[("1", "output")]       # linear section: column sums = Lambda
        >>> torch.allclose(E.sum(0), graph.lambdas_["1"])
        True
    """

    def __init__(
        self,
        *,
        method: str = "exact",
        n_sources: int = 1,
        integration: str = "gradient",
        n_intervals: int = 0,
        seed: int = 0,
    ) -> None:
        self.method = method
        self.n_sources = n_sources
        self.integration = integration
        self.n_intervals = n_intervals
        self.seed = seed

    # -- fitting --------------------------------------------------------------------------
    def fit(
        self,
        model: nn.Module,
        basis: InteractionBasis,
        data: Iterable[Any],
        *,
        forward: Callable[[nn.Module, Any], Any] | None = None,
        output: bool | str | Site | None = None,
        output_positions: Any = None,
        output_rotation: torch.Tensor | str | None = "basis",
        sections: Mapping[str, tuple[Any, str | Site | None]] | str | None = "auto",
        mask: Callable[[Any], torch.Tensor | None] | None = None,
        chunk: int = 64,
        progress: bool = True,
    ) -> InteractionGraph:
        """Compute the edges of every consecutive pair of ``basis.sites_`` over ``data``.

        Pairs whose section has a closed-form Jacobian (the sections ``build_bases`` uses:
        ``Linear -> activation -> Linear`` and linear maps, TransformerLens attention, MLP
        and unembedding) get their edges from forward passes alone, equal to the backward
        passes' to rounding; every other pair runs batched backward passes.

        Args:
            model: The model the basis was built on.
            basis: A fitted :class:`~degen_hooks.InteractionBasis` (any variant); its sites
                must be listed in forward order.
            data: Batches (iterated once).
            forward: ``forward(model, batch) -> output``; defaults to ``model(batch)``.
            output: Add a last layer: ``True`` for the model output (what ``forward``
                returns), or a site name / :class:`~degen_hooks.Site` after the last site.
            output_positions: Positions of the model output to read (``True`` only).
            output_rotation: Rotation ``R`` (``(d_out, r)``) of the output layer;
                ``"basis"`` uses ``basis.output_rotation_`` when set (``build_bases(...,
                rotate_output=True)``), ``None`` reads raw coordinates.
            sections: Closed-form sections, ``{site: (section, pre_activation_site)}`` as
                :func:`~degen_hooks.build_bases` takes them (the section maps ``site`` to the
                next layer); ``"auto"`` (default) finds them as ``build_bases`` does;
                ``None`` runs backward passes for every pair. ``closed_form_`` lists the
                pairs that used one.
            mask: ``mask(batch) -> (batch, pos)`` boolean mask of the real tokens (padding
                ``False``; ``hf.mask`` for a tokenizer's ``attention_mask``), as
                ``build_bases(mask=...)`` takes it: padding is no sample and no probe (its
                features are zero and it is written back unchanged), ``"last"`` each row's last
                real token, and ``n_rows_`` and the output layer's ``lambdas_`` count real
                tokens only. Node layers then need activations ``(batch, pos, d)``.
            chunk: Probes per batched backward pass (memory bound).
            progress: Show a progress bar over batches.

        Returns:
            ``self``.

        Raises:
            ValueError: For invalid hyperparameters or ``sections``.
            ShapeMismatchError: If the basis has fewer than two layers (with the output), or
                ``sections`` names a site that starts no pair.
            GradientError: If a node layer does not depend on the previous one.
        """
        from tqdm.auto import tqdm

        self._check_params()
        check_fitted(basis, ["rotations_"])
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1, got {chunk}.")
        layers = [NodeLayer.from_basis(basis, key) for key in basis.sites_]
        out_layer = _output_layer(basis, output, output_positions, output_rotation)
        if out_layer is not None:
            layers.append(out_layer)
        if len(layers) < 2:
            raise ShapeMismatchError(
                f"An interaction graph needs at least two node layers; the basis has "
                f"{basis.sites_} and output={output!r}. Add sites or pass output=True."
            )
        call = forward or (lambda m, batch: m(batch))
        alphas, weights = integration_points(self.integration, self.n_intervals)
        pairs = [(a.key, b.key) for a, b in zip(layers[:-1], layers[1:], strict=True)]
        closed = find_closed_pairs(
            model, layers, sections, output_positions, has_output=out_layer is not None
        )
        reads = ReadPass(model, call, layers, closed, out_layer)
        labels = [
            f"edges {a} -> {b}" + (" (closed form)" if index in closed else "")
            for index, (a, b) in enumerate(pairs)
        ]
        timings = dict.fromkeys(labels, 0.0)
        sums: dict[Pair, torch.Tensor] = {}
        rows = dict.fromkeys(pairs, 0)
        out_stats = Covariance() if out_layer is not None else None
        random: dict[str, torch.Generator] = {}  # the sources' generator, made on first use

        def signs(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
            return self._signs(shape, device, random)

        total = len(data) if hasattr(data, "__len__") else None  # type: ignore[arg-type]
        for batch in tqdm(data, desc="edges", total=total, disable=not progress, leave=False):
            padding = None if mask is None else mask(batch)
            if padding is not None:
                padding = torch.as_tensor(padding).bool()
            at = layers if padding is None else [layer.at(padding) for layer in layers]
            captured, y = {}, None
            if reads.needed:  # what the closed forms and the output layer read: one pass
                started = time.perf_counter()
                captured, y = reads(batch)
                timings["reads"] = timings.get("reads", 0.0) + time.perf_counter() - started
            for index, (pair, src, dst) in enumerate(zip(pairs, at[:-1], at[1:], strict=True)):
                started = time.perf_counter()
                if src.cells is not None and not float(src.cells.sum()):
                    continue  # a batch of padding only: no sample
                if index in closed:
                    partial, n_rows = pair_edges(
                        closed[index], src, dst, alphas, weights, captured,
                        signs if self.method == "stochastic" else None,
                    )  # fmt: skip
                else:
                    partial, n_rows = self._pair_edges(
                        model, batch, call, src, dst, alphas, weights, chunk, random
                    )
                if src.cells is not None:  # real tokens only
                    n_rows = round(float(src.cells.sum()))
                sums[pair] = partial if pair not in sums else sums[pair] + partial
                rows[pair] += n_rows
                timings[labels[index]] += time.perf_counter() - started
            if out_stats is not None and y is not None:
                last = at[-1]
                features = last.features(y)
                if last.cells is not None:  # real tokens only
                    features = features[last.cells.to(features.device) > 0]
                out_stats.update(features.reshape(-1, features.shape[-1]))
        if not sums:
            raise ShapeMismatchError("No batches in data: the interaction graph saw nothing.")
        empty = [pair for pair in pairs if pair not in sums]
        if empty:  # every batch's mask left no sample at their input layer
            raise ShapeMismatchError(
                f"The padding mask left no sample at the input layer of pairs {empty} in any "
                "batch: their positions hold padding only. Choose positions that hold real "
                "tokens (e.g. 'last')."
            )
        self.sites_ = [layer.key for layer in layers]
        self.pairs_ = pairs
        self.closed_form_ = [pair for index, pair in enumerate(pairs) if index in closed]
        self.timings_ = timings
        self.edges_ = {pair: (sums[pair] / max(rows[pair], 1)).cpu() for pair in pairs}
        self.n_rows_ = rows
        self.lambdas_ = {key: basis.lambdas_[key].detach().cpu() for key in basis.sites_}
        self.output_ = None
        self.output_rotation_ = None
        if out_layer is not None:
            self.lambdas_[out_layer.key] = torch.diagonal(out_stats.cov()).cpu()
            self.output_ = _describe_output(out_layer)
            self.output_rotation_ = (
                None if out_layer.rotation is None else out_layer.rotation.detach().cpu()
            )
        self.basis_ = basis
        return self

    def _check_params(self) -> None:
        if self.method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {self.method!r}.")
        if self.n_sources < 1:
            raise ValueError(f"n_sources must be at least 1, got {self.n_sources}.")
        integration_points(self.integration, self.n_intervals)

    # -- using it -----------------------------------------------------------------------------
    def pair(self, pair: int | Pair | str) -> Pair:
        """Normalise a pair given as an index, a ``(site_l, site_next)`` tuple or ``site_l``.

        Raises:
            SiteNotFoundError: If no such pair exists.
        """
        check_fitted(self, ["edges_"])
        if isinstance(pair, int) and not isinstance(pair, bool):
            if not -len(self.pairs_) <= pair < len(self.pairs_):
                raise SiteNotFoundError(
                    f"Pair index {pair} is out of range; the graph has {len(self.pairs_)} "
                    f"pairs: {self.pairs_}."
                )
            return self.pairs_[pair]
        for candidate in self.pairs_:
            if tuple(pair) == candidate or pair == candidate[0]:
                return candidate
        raise SiteNotFoundError(f"No layer pair {pair!r} in this graph; it has {self.pairs_}.")

    def __repr__(self) -> str:
        params = f"method={self.method!r}, integration={self.integration!r}"
        if not hasattr(self, "edges_"):
            return f"InteractionGraph({params})"
        shapes = ", ".join(f"{a}->{b}: {tuple(e.shape)}" for (a, b), e in self.edges_.items())
        return f"InteractionGraph({params}; {shapes})"

    # -- persistence ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors: ``"edges.<k>"`` per pair, ``"lambdas.<k>"`` per layer (by index)."""
        check_fitted(self, ["edges_"])
        state = {f"edges.{k}": self.edges_[p].contiguous() for k, p in enumerate(self.pairs_)}
        for k, key in enumerate(self.sites_):
            state[f"lambdas.{k}"] = self.lambdas_[key].contiguous()
        if self.output_rotation_ is not None:
            state["output_rotation"] = self.output_rotation_.contiguous()
        return state

    def metadata(self) -> dict[str, Any]:
        """JSON-able hyperparameters, layers, pairs, row counts and output description."""
        check_fitted(self, ["edges_"])
        return {
            "params": self.get_params(deep=False),
            "sites": list(self.sites_),
            "pairs": [list(p) for p in self.pairs_],
            "n_rows": [self.n_rows_[p] for p in self.pairs_],
            "output": self.output_,
            "closed_form": [list(p) for p in getattr(self, "closed_form_", [])],
        }

    @classmethod
    def from_state(
        cls, state: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]
    ) -> InteractionGraph:
        """Rebuild from :meth:`state_dict` and :meth:`metadata` (without ``basis_``)."""
        graph = cls(**metadata["params"])
        graph.sites_ = list(metadata["sites"])
        graph.pairs_ = [tuple(p) for p in metadata["pairs"]]
        graph.edges_ = {p: state[f"edges.{k}"] for k, p in enumerate(graph.pairs_)}
        graph.lambdas_ = {key: state[f"lambdas.{k}"] for k, key in enumerate(graph.sites_)}
        graph.n_rows_ = dict(zip(graph.pairs_, metadata["n_rows"], strict=True))
        graph.output_ = metadata.get("output")
        graph.output_rotation_ = state.get("output_rotation")
        graph.closed_form_ = [tuple(p) for p in metadata.get("closed_form", [])]
        return graph


def fit_graphs(
    model: nn.Module,
    bases: Mapping[str, InteractionBasis],
    data: Iterable[Any],
    *,
    graph: Mapping[str, Any] | None = None,
    **fit_kwargs: Any,
) -> dict[str, InteractionGraph]:
    """Fit one :class:`InteractionGraph` per basis (LIB, PCA, neurons) with the same settings.

    Args:
        model: The model.
        bases: ``{name: fitted basis}`` over the same sites.
        data: Re-iterable batches.
        graph: Hyperparameters of :class:`InteractionGraph` (``method``, ``n_sources``, ...).
        **fit_kwargs: Passed to :meth:`InteractionGraph.fit` (``output=True``,
            ``forward=``, ``output_positions=``, ``progress=``, ...).

    Returns:
        ``{name: fitted graph}``; compare them with :func:`~degen_hooks.graph.sparsity_table`.
    """
    return {
        name: InteractionGraph(**dict(graph or {})).fit(model, basis, data, **fit_kwargs)
        for name, basis in bases.items()
    }
