"""One interface for closed-form sections: what ``build_bases`` and ``InteractionGraph`` ask.

A *section* maps one site to the next (or to the model output) by a known function, so its
Jacobian Gram and its interaction-graph edges need no backward pass (#16, #19). Every
section offers three methods:

* ``gram_pass(model, data, site, target, readout=None, *, forward=None, mask=None,
  progress=True)`` returns the Jacobian Gram of ``site`` read out through ``target`` as a
  :class:`~degen_hooks.SecondMoment`, equal to the Gram of exact probes (``mask(batch)``:
  each batch's ``(batch, pos)`` padding mask, as exact probes under ``run.set_mask``);
* ``edge_reads(site, target)`` names what one forward pass must read, ``{role: Site}``;
* ``edge_batch(reads, src, dst, alphas, weights, *, signs=None, elements=None)`` gives one
  batch's edge sums ``(r_next, r)`` and its number of rows, from those reads. On a padded
  batch (``InteractionGraph.fit(mask=...)``) the node layers carry ``cells``: ``src.features``
  is zero at padding and ``src.write`` leaves it unchanged, so a position-wise section needs
  nothing more; one that mixes positions weights its output positions by ``dst.cells``.

A section whose data statistics ride on ``build_bases``' activation pass adds:

* ``shared_site(site)`` names the site and activation whose derivative moments the pass
  collects (``None`` when no data is needed at all);
* ``gram_from(statistics, readout)`` turns them into the Gram, with no pass of its own.

:class:`~degen_hooks.MLPSection` (derivative moments at its pre-activation site),
:class:`~degen_hooks.NormedMLPSection` and :class:`~degen_hooks.attention.AttentionSection`
(subclassed by each family with where its models keep q, k, v and the pattern) implement it.
Model families only *find* sections (``find_sections``); the core never imports one.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from .accumulators import SecondMoment
from .sites import Site

__all__ = ["Section", "bind", "bound", "is_section", "shares_pass", "takes_mask"]


@runtime_checkable
class Section(Protocol):
    """The methods every closed-form section has (see the module docstring)."""

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
    ) -> SecondMoment: ...

    def edge_reads(self, site: Site, target: Site | None) -> dict[str, Site]: ...

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
    ) -> tuple[torch.Tensor, int]: ...


def is_section(obj: Any) -> bool:
    """Whether ``obj`` has the section interface."""
    return all(callable(getattr(obj, name, None)) for name in ("gram_pass", "edge_batch"))


def takes_mask(section: Any) -> bool:
    """Whether ``section.gram_pass`` takes a padding mask (``mask=``; a section written
    before the protocol had it may not)."""
    try:
        parameters = inspect.signature(section.gram_pass).parameters
    except (TypeError, ValueError):  # no signature to read: assume not
        return False
    return "mask" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def shares_pass(section: Any) -> bool:
    """Whether ``section`` takes its statistics from ``build_bases``' activation pass."""
    return callable(getattr(section, "gram_from", None))


def bind(section: Any, pre: str | Site | None) -> Any:
    """``section`` with its pre-activation site set, for ``(section, pre_site)`` pairs."""
    rebind = getattr(section, "with_pre", None)
    return section if pre is None or rebind is None else rebind(pre)


def bound(sections: Mapping[str, tuple[Any, str | Site | None]]) -> dict[str, Any]:
    """``{site: (section, pre_site)}`` as ``{site: section}`` with the pre sites bound."""
    return {key: bind(section, pre) for key, (section, pre) in sections.items()}
