"""Interaction-graph edges by backward passes: the pairs without a closed-form section.

Private mixin of :class:`~degen_hooks.graph.InteractionGraph` (lib_math §7.1). A forward hook
replaces the input site's activation by ``z @ C_pinv + mu`` with ``z = alpha f_hat`` a leaf
tensor, one forward pass per integration point ``alpha``; the pass stops at the next node
layer, whose features are differentiated with batched probes: one per output position and
feature (``method="exact"``) or ``n_sources`` Rademacher combinations of output positions per
feature (``method="stochastic"``). The squared gradient x input attributions, summed over
input positions inside the square, are the batch's edge sums.

:meth:`BackwardEdges._signs` draws the Rademacher sources of both paths (the closed form in
:mod:`degen_hooks.graph._closed` too), once per batch and pair, from one generator seeded
with ``seed``, so that both see the same signs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from .._errors import GradientError
from ..jacobians import probe_chunks, vjp_batched
from ._layers import NodeLayer, output_tensor, run_section

__all__ = ["BackwardEdges"]


class BackwardEdges:
    """Edge sums of one batch and pair by batched backward passes, and the random sources.

    Mixed into :class:`~degen_hooks.graph.InteractionGraph`, whose hyperparameters ``method``,
    ``n_sources`` and ``seed`` it reads.
    """

    method: str
    n_sources: int
    seed: int

    def _pair_edges(
        self,
        model: nn.Module,
        batch: Any,
        call: Callable[[nn.Module, Any], Any],
        src: NodeLayer,
        dst: NodeLayer,
        alphas: np.ndarray,
        weights: np.ndarray,
        chunk: int,
        random: dict[str, torch.Generator],
    ) -> tuple[torch.Tensor, int]:
        """Un-normalised edge sums of one batch for one pair, and the input rows."""
        leaves: list[torch.Tensor] = []
        clean: list[torch.Tensor] = []
        outputs = []
        with torch.enable_grad():
            for alpha in alphas:

                def rewrite(act: torch.Tensor, alpha: float = float(alpha)) -> torch.Tensor:
                    features = src.features(act.detach())
                    clean.append(features)
                    leaf = (alpha * features).detach().requires_grad_(True)
                    leaves.append(leaf)
                    return src.write(act, leaf)

                assert src.site is not None  # only the last layer can be the model output
                result = run_section(
                    model, batch, call, rewrites={src.key: (src.site, rewrite)}, target=dst.site
                )
                y = output_tensor(result) if dst.site is None else result
                outputs.append(dst.features(y))
        out = torch.stack(outputs)  # (K, B, T, r_next)
        if not out.requires_grad:
            raise GradientError(
                f"Layer {dst.key!r} does not depend on layer {src.key!r}: no gradient flows "
                "between them. List node layers in forward order."
            )
        features = clean[0]  # (B, S, r)
        r_next = out.shape[-1]
        edges = torch.zeros(r_next, features.shape[-1], dtype=torch.float64, device=out.device)
        w = torch.as_tensor(weights, dtype=out.dtype, device=out.device)
        for probes, index in self._probes(tuple(out.shape[1:]), chunk, out.device, random):
            grad_outputs = w[None, :, None, None, None] * probes[:, None]
            grads = vjp_batched(out, leaves, grad_outputs, retain_graph=True)
            grad = sum(g for g in grads if g is not None)
            if not isinstance(grad, torch.Tensor):
                raise GradientError(
                    f"No gradient reached layer {src.key!r} from layer {dst.key!r}."
                )
            attribution = (grad * features).sum(2)  # (k, B, r): input positions inside
            edges.index_add_(0, index, attribution.square().sum(1))
        return edges, features.shape[0] * features.shape[1]

    def _probes(
        self,
        shape: tuple[int, ...],
        chunk: int,
        device: torch.device,
        random: dict[str, torch.Generator],
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Grad-outputs ``(k, B, T, r_next)`` and the output feature of each probe ``(k,)``."""
        r_next = shape[-1]
        if self.method == "exact":
            for probes in probe_chunks(
                "exact", torch.Size(shape), chunk=chunk, dtype=torch.float64, device=device
            ):
                k = probes.shape[0]
                index = probes.reshape(k, -1, r_next).abs().amax(1).argmax(-1)
                yield probes, index
            return
        signs = self._signs((*shape[:-1], 1), device, random)
        jobs = [(s, i) for s in range(self.n_sources) for i in range(r_next)]
        eye = torch.eye(r_next, dtype=torch.float64, device=device)
        for start in range(0, len(jobs), chunk):
            part = torch.tensor(jobs[start : start + chunk], device=device)
            yield signs[part[:, 0]] * eye[part[:, 1]][:, None, None, :], part[:, 1]

    def _signs(
        self, shape: tuple[int, ...], device: torch.device, random: dict[str, torch.Generator]
    ) -> torch.Tensor:
        """The sources of one batch and pair, ``(n_sources, batch, n_out_positions, 1)``.

        Backward and closed-form pairs draw them here, once per batch and pair in pair
        order, so both paths see the same signs.
        """
        if "generator" not in random:
            random["generator"] = torch.Generator(device=device).manual_seed(self.seed)
        # One Rademacher vector over (batch, output positions) per source, shared by every
        # output feature; scaled by 1/sqrt(n_sources) so that summing squares averages them.
        (signs,) = probe_chunks(
            "rademacher",
            torch.Size(shape),
            n_probes=self.n_sources,
            chunk=self.n_sources,
            generator=random["generator"],
            dtype=torch.float64,
            device=device,
        )
        return signs
