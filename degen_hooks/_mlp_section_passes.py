"""The section interface (:mod:`degen_hooks.section`) of :class:`~degen_hooks.MLPSection`.

Private; mixed into the section. Its derivative moments ride on ``build_bases``' activation
pass (:meth:`shared_site`, :meth:`gram_from`); :meth:`gram_pass` collects them in a pass of
its own for a standalone call; the edges read the section's input and pre-activations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from ._positions import select_positions
from .accumulators import SecondMoment
from .sites import Site

__all__ = ["MLPPasses"]


class MLPPasses:
    """:mod:`degen_hooks.section` methods of an ``MLPSection`` (``pre``: its pre-activation
    site, needed unless the section is linear)."""

    positionwise: ClassVar[bool] = True  # graph pairs need the same positions on both sides

    def with_pre(self, pre: str | Site) -> Any:
        """A copy whose pre-activations are read at ``pre``."""
        return dataclasses.replace(self, pre=pre)  # type: ignore[type-var]

    def _pre_name(self) -> str:
        pre = self.pre  # type: ignore[attr-defined]
        if pre is None:
            raise ValueError(
                f"A {self.activation!r} MLPSection needs its pre-activation site: pass "  # type: ignore[attr-defined]
                "(section, pre_site) in sections=, or MLPSection(..., pre=site)."
            )
        return pre.name if isinstance(pre, Site) else str(pre)

    def shared_site(self, site: Site) -> tuple[Site, str] | None:
        """The pre-activation site at ``site``'s positions and the activation whose
        derivative moments ``build_bases``' activation pass collects (``None``: linear)."""
        if self.is_linear:  # type: ignore[attr-defined]
            return None
        shared = Site(self._pre_name(), positions=site.positions, label=f"{site.key}#derivs")
        return shared, self.activation  # type: ignore[attr-defined]

    def gram_from(self, statistics: Any, readout: torch.Tensor | None) -> torch.Tensor:
        """The Gram from the shared site's statistics (``None`` for a linear section)."""
        derivs = None if statistics is None else statistics.derivs
        return self.jacobian_gram(derivs, readout)  # type: ignore[attr-defined]

    def gram_pass(
        self,
        model: nn.Module,
        data: Iterable[Any],
        site: Site,
        target: Site,
        readout: torch.Tensor | None = None,
        *,
        forward: Callable[[nn.Module, Any], Any] | None = None,
        mask: Callable[[Any], torch.Tensor | None] | None = None,
        progress: bool = True,
    ) -> SecondMoment:
        """One forward pass collecting the derivative moments, then :meth:`gram_from`
        (``mask``: each batch's padding mask, as ``run.over`` takes it)."""
        from .collect import collect

        shared = self.shared_site(site)
        sites = [site] if shared is None else [site, shared[0]]
        derivatives = {} if shared is None else {shared[0].key: shared[1]}
        with collect(model, sites, derivatives=derivatives) as run:
            run.over(data, forward=forward, mask=mask, progress=progress)
        stats = None if shared is None else run.stats[shared[0].key]
        gram = self.gram_from(stats, readout)
        return SecondMoment.from_matrix(gram, run.stats[site.key].acts.n_samples)

    def edge_reads(self, site: Site, target: Site | None) -> dict[str, Site]:
        """The section's input and (not linear) its pre-activations, read whole."""
        if self.is_linear:  # type: ignore[attr-defined]
            return {"x": site}
        return {"x": site, "pre": Site(self._pre_name())}

    def edge_batch(
        self,
        reads: dict[str, torch.Tensor],
        src: Any,
        dst: Any,
        alphas: Sequence[float],
        weights: Sequence[float],
        *,
        signs: Callable[[tuple[int, ...], torch.device], torch.Tensor] | None = None,
        elements: int | None = None,
    ) -> tuple[torch.Tensor, int]:
        """One batch's edge sums through :meth:`MLPSection.edge_sums`, and its rows."""
        x = src.select(reads["x"])
        features = src.to_features(x)
        n, n_pos = features.shape[:2]
        pre = reads.get("pre")
        if pre is not None:  # at the input's positions, as the input
            pre = select_positions(pre, src.positions, None, f"{src.key}#pre")
            pre = pre.reshape(pre.shape[0], -1, pre.shape[-1]).to(torch.float64)
        drawn = None if signs is None else signs((n, n_pos, 1), features.device)
        edges = self.edge_sums(  # type: ignore[attr-defined]
            features, src.pinv, dst.rotation, inputs=x, pre=pre, mean=src.mean,
            alphas=[float(a) for a in alphas], weights=[float(w) for w in weights],
            signs=drawn, elements=elements,
        )  # fmt: skip
        return edges, n * n_pos
