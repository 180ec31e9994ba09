"""Interaction-graph edges in closed form: the forward pass alone, no backward passes (#19).

Private helpers of :class:`~degen_hooks.graph.InteractionGraph`. A layer pair whose section
has a closed-form Jacobian (lib_math §12: the same sections ``build_bases`` uses, found the
same way) gets its edges (lib_math §7.1) from forward quantities:

every section through the one interface of :mod:`degen_hooks.section`: ``edge_reads`` names
what one forward pass per batch, shared by every pair, must read (an MLP section its input
and pre-activations, a normed MLP its input, a TransformerLens attention layer its input,
q, k, v and pattern), and ``edge_batch`` turns those reads into the batch's edges;
integration points move the section to the rewritten input without running the model again.
A position-wise section (``positionwise``) pairs layers read at the same positions only.

Every other pair keeps the backward passes. The numbers are the backward path's: the same
features, the same rebuilt inputs ``alpha f C_pinv + mu``, and the same random signs drawn
from the same generator in the same order (one draw per batch and pair, pairs in order).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._errors import GradientError, ShapeMismatchError
from .._hooks import SiteHook
from .._positions import same_positions
from ..section import bind
from ..sites import Site, resolve_sites
from ._layers import NodeLayer, output_tensor, run_section

Forward = Callable[[nn.Module, Any], Any]
Signs = Callable[[tuple[int, ...], torch.device], torch.Tensor]


@dataclass(frozen=True)
class ClosedPair:
    """One layer pair with a closed-form section.

    Attributes:
        index: The pair's index in the graph.
        section: A section (:mod:`degen_hooks.section`): ``edge_reads``, ``edge_batch``.
    """

    index: int
    section: Any


def has_edges(section: Any) -> bool:
    """Whether closed-form edges exist for ``section``."""
    return callable(getattr(section, "edge_reads", None)) and callable(
        getattr(section, "edge_batch", None)
    )


class _Done(Exception):  # noqa: N818 - control flow, never escapes ReadPass
    """Raised in a hook once the pass has read everything."""


def _whole(act: torch.Tensor) -> torch.Tensor:
    return act


def find_closed_pairs(
    model: nn.Module,
    layers: list[NodeLayer],
    sections: Mapping[str, tuple[Any, str | Site | None]] | str | None,
    output_positions: Any,
    has_output: bool,
) -> dict[int, ClosedPair]:
    """The pairs whose edges have a closed form, by pair index.

    Args:
        model: The model.
        layers: The graph's node layers in forward order (the output layer last, if any).
        sections: ``{site: (section, pre_activation_site)}`` as ``build_bases(sections=)``
            takes it, ``"auto"`` (found as ``build_bases`` finds them) or ``None`` (none).
        output_positions: Positions of the model output (when it is the last layer).
        has_output: Whether the last layer is an output layer (the model output or a site
            after the basis' sites).

    Returns:
        ``{pair index: ClosedPair}``; pairs left out run backward passes.

    Raises:
        ValueError: For a ``sections`` string other than ``"auto"``.
        ShapeMismatchError: If ``sections`` names a site that starts no pair.
        TypeError: If a value of ``sections`` is not a ``(section, pre_site)`` pair.
    """
    if sections is None:
        return {}
    starts = {layer.key: index for index, layer in enumerate(layers[:-1])}
    if isinstance(sections, str):
        if sections != "auto":
            raise ValueError(f"sections must be a mapping, 'auto' or None, got {sections!r}.")
        from .._build_checks import _auto_sections  # the finders build_bases uses

        basis_layers = layers[:-1] if has_output else layers
        sites = [layer.site for layer in basis_layers]
        out = layers[-1].site if has_output else None
        found = dict(_auto_sections(model, sites, out, output_positions))  # type: ignore[arg-type]
        if not has_output:  # the last site's section maps it to the model output: no pair
            found.pop(layers[-1].key, None)
        sections = found
    unknown = sorted(set(sections) - set(starts))
    if unknown:
        raise ShapeMismatchError(
            f"sections= names {unknown}, which start no layer pair of the graph; pairs start "
            f"at {list(starts)}."
        )
    closed: dict[int, ClosedPair] = {}
    for key, value in sections.items():
        if not isinstance(value, tuple) or len(value) != 2:
            raise TypeError(
                f"sections= values must be (section, pre_activation_site) pairs, got "
                f"{type(value).__name__} for {key!r}."
            )
        section = bind(*value)
        index = starts[key]
        src, dst = layers[index], layers[index + 1]
        if not has_edges(section):
            continue
        # A position-wise section (an MLP) needs the same positions on both sides.
        if getattr(section, "positionwise", False) and not same_positions(
            src.positions, dst.positions
        ):
            continue
        try:  # a section missing what it reads (an MLP without its pre site) has none
            section.edge_reads(src.site, dst.site)
        except ValueError:
            continue
        closed[index] = ClosedPair(index, section)
    return closed


class ReadPass:
    """One forward pass per batch, without gradients, that reads what the sections need.

    It reads each MLP pair's input site and pre-activations (at the input's positions),
    what each other closed-form section names (``edge_reads``) and the output layer's
    activation, and stops at the last layer it needs.

    Args:
        model: The model.
        forward: ``forward(model, batch) -> output``.
        layers: The graph's node layers.
        closed: The closed-form pairs.
        out_layer: The output layer (its activation feeds the output statistics), or ``None``.
    """

    def __init__(
        self,
        model: nn.Module,
        forward: Forward,
        layers: list[NodeLayer],
        closed: Mapping[int, ClosedPair],
        out_layer: NodeLayer | None,
    ) -> None:
        self.model, self.forward = model, forward
        # key -> (site, what to keep of its tensor)
        reads: dict[str, tuple[Site, Callable[[torch.Tensor], torch.Tensor]]] = {}
        last: int | None = None
        for index, pair in sorted(closed.items()):
            src = layers[index]
            assert src.site is not None  # only the last layer can be the model output
            last = index + 1
            target = layers[index + 1].site
            for role, site in pair.section.edge_reads(src.site, target).items():
                reads[f"{index}:{role}"] = (site, _whole)
        self.reads = reads
        self.resolved = {key: resolve_sites(model, [site])[0] for key, (site, _) in reads.items()}
        self.out_layer = out_layer
        if out_layer is not None:
            self.target, self.needed = out_layer.site, True
        elif last is not None:
            self.target, self.needed = layers[last].site, True
        else:
            self.target, self.needed = None, False
        if self.target is not None:
            self.resolved_target = resolve_sites(model, [self.target])[0]

    def __call__(self, batch: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """``({read: activation at its positions, float64}, output layer activation)``."""
        captured: dict[str, torch.Tensor] = {}
        fired = dict.fromkeys(self.reads, 0)
        reached: list[torch.Tensor] = []

        def done() -> None:  # the pass may stop: every read and the last layer are in
            if reached and all(fired.values()):
                raise _Done

        with contextlib.ExitStack() as stack:
            for key, (_, kept) in self.reads.items():
                resolved, module = self.resolved[key]

                def keep(act: torch.Tensor, key: str = key, kept: Callable = kept) -> None:
                    fired[key] += 1
                    captured[key] = kept(act.detach())
                    done()

                stack.enter_context(SiteHook(self.model, resolved, module, keep))
            if self.target is not None:
                # Not run_section's target: a layer's hooks may fire after its output
                # (a bridge fires hook_pattern after hook_attn_out).
                def last(act: torch.Tensor) -> None:
                    reached.append(act.detach())
                    done()

                resolved, module = self.resolved_target
                stack.enter_context(SiteHook(self.model, resolved, module, last))
            result = None
            with torch.no_grad(), contextlib.suppress(_Done):
                result = run_section(self.model, batch, self.forward)
        twice = [key for key, count in fired.items() if count > 1]
        missing = [key for key, count in fired.items() if count == 0]
        if twice or missing:
            names = {key: self.reads[key][0].name for key in twice + missing}
            raise GradientError(
                f"Closed-form edges read {sorted(names.values())}: "
                + (
                    f"{[names[k] for k in missing]} never ran before the pass reached its "
                    "last layer (list node layers in forward order). "
                    if missing
                    else ""
                )
                + (
                    f"{[names[k] for k in twice]} ran more than once in one forward pass; "
                    "choose one call with Site(..., call=0) when building the basis, or pass "
                    "sections=None for backward passes."
                    if twice
                    else ""
                )
            )
        if self.target is not None and not reached:
            raise GradientError(
                f"Site {self.target.key!r} was never reached in the forward pass; check its "
                "name and that forward(model, batch) runs it."
            )
        y = None
        if self.out_layer is not None:
            y = output_tensor(result) if self.out_layer.site is None else reached[0]
        return captured, y


def pair_edges(
    pair: ClosedPair,
    src: NodeLayer,
    dst: NodeLayer,
    alphas: Any,
    weights: Any,
    captured: Mapping[str, torch.Tensor],
    signs: Signs | None,
) -> tuple[torch.Tensor, int]:
    """Un-normalised closed-form edges of one batch for one pair, and the input rows.

    ``signs(shape, device)`` draws the stochastic sources (``None``: exact edges).
    """
    prefix = f"{pair.index}:"
    reads = {key[len(prefix) :]: t for key, t in captured.items() if key.startswith(prefix)}
    return pair.section.edge_batch(reads, src, dst, alphas, weights, signs=signs)
