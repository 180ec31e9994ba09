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

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._errors import ShapeMismatchError
from .._positions import same_positions
from .._read_pass import SiteReader
from ..section import bind
from ..sites import Site
from ._layers import NodeLayer, output_tensor

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

    It reads what each closed-form pair's section names (``edge_reads``: an MLP its input
    and pre-activations, attention its input, q, k, v and pattern) and the output layer's
    activation, and stops at the last layer it needs (:class:`~degen_hooks._read_pass.SiteReader`).

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
        reads: dict[str, Site] = {}
        last: int | None = None
        for index, pair in sorted(closed.items()):
            src = layers[index]
            assert src.site is not None  # only the last layer can be the model output
            last = index + 1
            target = layers[index + 1].site
            for role, site in pair.section.edge_reads(src.site, target).items():
                reads[f"{index}:{role}"] = site
        self.out_layer = out_layer
        target = None
        if out_layer is not None:
            target = out_layer.site
        elif last is not None:
            target = layers[last].site
        self.needed = out_layer is not None or last is not None
        # The model output as the last layer: the whole pass (no site to stop at).
        whole = out_layer is not None and out_layer.site is None
        self.reader = SiteReader(
            model, reads, forward, until=target, output=whole,
            what="The interaction graph's closed forms",
        )  # fmt: skip

    def __call__(self, batch: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """``({read: activation, float64 as read}, output layer activation)``."""
        captured, reached, result = self.reader(batch)
        y = None
        if self.out_layer is not None:
            y = output_tensor(result) if self.out_layer.site is None else reached
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
