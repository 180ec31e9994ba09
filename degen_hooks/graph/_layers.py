"""Node layers in feature coordinates, and running a model from one node layer to the next.

Private helpers shared by the edge computation and edge ablation (lib_math §7): a
:class:`NodeLayer` reads a site's activation as features ``(f - mu) @ C`` (shape
``(batch, n_positions, r)``, every non-batch, non-feature dimension flattened into positions)
and writes features back as ``features @ C_pinv + mu`` at the site's positions
(:func:`output_layer` makes the graph's last layer, the model output or a later site);
:func:`run_section` runs the model with one activation rewritten and stops as soon as a target
site has been reached (an exception raised in the target's hook, as in baukit's ``stop=True``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from .._backward import first_tensor as _first_tensor
from .._errors import GradientError, ShapeMismatchError
from .._hooks import SiteHook, in_backward
from .._positions import Positions, _position_index, padding_mask, position_weights
from ..basis import InteractionBasis
from ..sites import Site, resolve_bypass, resolve_sites

Forward = Callable[[nn.Module, Any], Any]

#: Key of the model-output node layer (the label ``build_bases`` gives it).
OUTPUT_KEY = "output"


@dataclass(frozen=True)
class NodeLayer:
    """One node layer: where it is read, and its feature map.

    Attributes:
        key: Name of the layer (site key, or ``"output"``).
        site: The site, or ``None`` for the model output (the value ``forward`` returns).
        positions: Positions read (``None``: all).
        rotation: ``C``, shape ``(d, r)``; ``None`` means the identity (raw coordinates).
        pinv: ``C_pinv``, shape ``(r, d)``; ``None`` with ``rotation``.
        mean: ``mu``, shape ``(d,)``; ``None`` means zero (uncentred, as for outputs).
        cells: With padding (one batch's layer, :meth:`at`), ``(batch, n_positions)``:
            whether each selected (sequence, position) is a sample, 1 or 0. A cell of padding
            reads zero features and is written back unchanged; ``None``: every cell.
        padding: The batch's ``(batch, pos)`` mask of real tokens (checked against the
            activation; attention that recomputes its pattern masks those keys), or ``None``.
    """

    key: str
    site: Site | None
    positions: Positions
    rotation: torch.Tensor | None
    pinv: torch.Tensor | None
    mean: torch.Tensor | None
    cells: torch.Tensor | None = None
    padding: torch.Tensor | None = None

    @classmethod
    def from_basis(cls, basis: InteractionBasis, key: str) -> NodeLayer:
        """The node layer of a fitted basis' site ``key``."""
        rotation, pinv, mean = basis._get(key)
        site = Site.from_info(basis.site_info_.get(key, {}), key=key)
        return cls(key, site, site.positions, rotation, pinv, mean)

    def at(self, padding: torch.Tensor) -> NodeLayer:
        """This layer for one batch with the ``(batch, pos)`` ``padding`` mask: the positions
        it reads and which of them are samples (``"last"``: each row's last real token)."""
        index, cells = position_weights(
            self.positions, padding.shape[1], padding, padding.device, self.key
        )
        return replace(self, positions=index.tolist(), cells=cells, padding=padding)

    def stacked(self, copies: int) -> NodeLayer:
        """This layer for ``copies`` stacked copies of its batch (copy-major, as
        :func:`repeat_batch` stacks them)."""
        if self.cells is None or self.padding is None or copies == 1:
            return self
        return replace(
            self, cells=self.cells.repeat(copies, 1), padding=self.padding.repeat(copies, 1)
        )

    def part(self, samples: slice) -> NodeLayer:
        """This layer for the sequences ``samples`` of its batch (their cells and mask)."""
        if self.cells is None or self.padding is None:
            return self
        return replace(self, cells=self.cells[samples], padding=self.padding[samples])

    def width(self, d_site: int | None = None) -> int:
        """Number of features ``r`` (``d_site`` for a raw layer)."""
        if self.rotation is not None:
            return int(self.rotation.shape[1])
        if d_site is None:
            raise ShapeMismatchError(f"Layer {self.key!r} is read raw; its width is unknown yet.")
        return d_site

    def _index(self, act: torch.Tensor) -> torch.Tensor | None:
        if act.ndim < 3:
            if self.positions is not None:
                raise ShapeMismatchError(
                    f"Layer {self.key!r} selects positions {self.positions!r}, but its "
                    f"activation has shape {tuple(act.shape)} with no position dimension."
                )
            return None
        if self.positions is None:
            return None
        index = _position_index(self.positions, act.shape[1], self.key)
        return torch.arange(act.shape[1], device=act.device)[index].reshape(-1)

    def _features_last(self, act: torch.Tensor) -> torch.Tensor:
        return act if self.site is None else self.site.features_last(act)

    def select(self, act: torch.Tensor) -> torch.Tensor:
        """The raw activation at the layer's positions, float64, ``(batch, n_positions, d)``."""
        act = self._features_last(act)
        if self.padding is not None:  # the batch's mask must fit it
            padding_mask(self.padding, act, self.key)
        index = self._index(act)
        selected = act if index is None else act[:, index]
        return selected.reshape(act.shape[0], -1, act.shape[-1]).to(torch.float64)

    def positions_of(self, act: torch.Tensor) -> torch.Tensor:
        """The positions :meth:`select` keeps, in its order, as an index tensor ``(n_pos,)``.

        An activation without a position dimension has one position, ``0``.
        """
        act = self._features_last(act)
        n_pos = act.shape[1] if act.ndim >= 3 else 1
        index = self._index(act)
        every = torch.arange(n_pos, device=act.device)
        return every if index is None else index

    def features(self, act: torch.Tensor) -> torch.Tensor:
        """Features at the layer's positions, float64, shape ``(batch, n_positions, r)``."""
        return self.to_features(self.select(act), act.shape)

    def to_features(self, x: torch.Tensor, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Features ``(x - mu) @ C`` of a :meth:`select`-ed activation ``x``."""
        if self.rotation is not None and x.shape[-1] != self.rotation.shape[0]:
            raise ShapeMismatchError(
                f"Layer {self.key!r} has a basis for width {self.rotation.shape[0]}, but its "
                f"activation has shape {tuple(x.shape if shape is None else shape)}. Use the "
                "model the basis was built on."
            )
        if self.mean is not None:
            x = x - self.mean.to(x.device)
        features = x if self.rotation is None else x @ self.rotation.to(x.device)
        return features if self.cells is None else features * self._cells(x)[..., None]

    def _cells(self, x: torch.Tensor) -> torch.Tensor:
        """The cells, checked against a selected activation ``(batch, K, d)``."""
        cells = self.cells
        assert cells is not None
        if x.ndim != 3 or tuple(cells.shape) != tuple(x.shape[:2]):
            raise ShapeMismatchError(
                f"Layer {self.key!r}: the padding mask selects {tuple(cells.shape)} "
                f"(batch, position) cells, but the layer reads {tuple(x.shape)}: a mask "
                "needs activations (batch, pos, d) and one (batch, pos) mask per batch."
            )
        return cells.to(x.device, x.dtype)

    def write(self, act: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """``act`` with the layer's positions replaced by ``features @ C_pinv + mu``.

        Args:
            act: The activation, shape ``(batch, ..., d)``; other positions are kept (detached).
            features: Shape ``(batch, n_positions, r)``, float64 (may require grad).

        Returns:
            A new tensor shaped and typed like ``act``.
        """
        x = features if self.pinv is None else features @ self.pinv.to(features.device)
        if self.mean is not None:
            x = x + self.mean.to(x.device)
        moved = self._features_last(act)
        index = self._index(moved)
        if index is None:
            out = x.reshape(moved.shape).to(act.dtype)
        else:
            out = moved.detach().clone()
            x = x.reshape(out[:, index].shape).to(act.dtype)
            if self.cells is not None:  # padding is written back unchanged
                x = torch.where(self._cells(x)[..., None] > 0, x, out[:, index])
            out[:, index] = x
        return out if self.site is None else self.site.restore_axis(out)


def output_layer(
    basis: InteractionBasis,
    output: bool | str | Site | None,
    positions: Any,
    rotation: torch.Tensor | str | None,
) -> NodeLayer | None:
    """The last node layer ``InteractionGraph.fit(output=...)`` asks for, or ``None``.

    ``output=True`` is the model output, a site name or :class:`~degen_hooks.Site` a later
    site; ``rotation="basis"`` reads it through ``basis.output_rotation_`` when set.

    Raises:
        ValueError: For a string ``rotation`` other than ``"basis"``.
        ShapeMismatchError: If ``output`` is already a site of the basis.
    """
    if output is None or output is False:
        return None
    if isinstance(rotation, str):
        if rotation != "basis":
            raise ValueError(
                f"output_rotation must be a (d_out, r) tensor, None or 'basis', got {rotation!r}."
            )
        rotation = getattr(basis, "output_rotation_", None)
    if rotation is not None:
        rotation = rotation.to(torch.float64)
    # R^T for the orthonormal PCA rotation build_bases stores.
    pinv = None if rotation is None else torch.linalg.pinv(rotation)
    if output is True:
        return NodeLayer(OUTPUT_KEY, None, positions, rotation, pinv, None)
    site = output if isinstance(output, Site) else Site(output)
    if site.key in basis.sites_:
        raise ShapeMismatchError(
            f"output={site.key!r} is already a site of the basis; the output layer must come "
            "after the last site."
        )
    return NodeLayer(site.key, site, site.positions, rotation, pinv, None)


def describe_output(layer: NodeLayer) -> dict[str, Any]:
    """``InteractionGraph.output_``: the output layer's key, name, io and positions (JSON)."""
    if layer.site is not None:
        return {"key": layer.key, **layer.site.to_info()}
    positions = Site("", positions=layer.positions).to_info()["positions"]
    return {"key": layer.key, "name": None, "io": None, "positions": positions}


class _Stop(Exception):  # noqa: N818 - control flow, never escapes run_section
    """Raised in the target's hook to end the forward pass early."""


def run_section(
    model: nn.Module,
    batch: Any,
    forward: Forward,
    *,
    rewrites: Mapping[str, tuple[Site, Callable[[torch.Tensor], torch.Tensor]]] | None = None,
    target: Site | None = None,
) -> Any:
    """Run ``forward(model, batch)`` with activations rewritten, up to ``target``.

    Args:
        model: The model.
        batch: One batch.
        forward: ``forward(model, batch) -> output``.
        rewrites: ``{name: (site, fn)}``; ``fn(act)`` returns the replacement activation
            (the site's call: a module that runs several times must name one, ``call=``).
        target: Stop the pass as soon as this site is produced and return its activation;
            ``None`` runs the whole model and returns its output.

    Returns:
        The target activation (a tensor) or the model output.

    Raises:
        GradientError: If the target was reached before a rewritten site (wrong order), or a
            rewritten site or the target was never reached.
    """
    fired: dict[str, int] = {}
    captured: list[torch.Tensor] = []
    with contextlib.ExitStack() as stack:
        for name, (site, fn) in (rewrites or {}).items():
            resolved, module = resolve_sites(model, [site])[0]

            def rewrite(
                act: torch.Tensor, name: str = name, fn: Callable = fn, site: Site = resolved
            ) -> Any:
                if in_backward():  # a checkpoint recomputing the pass: write it again
                    return fn(act)
                fired[name] = fired.get(name, 0) + 1
                if fired[name] > 1:
                    raise ShapeMismatchError(
                        f"Site {name!r}: its module ran more than once in one forward pass, "
                        "so a node layer there is ambiguous. Choose one call with "
                        f"Site({site.name!r}, call=0) (or 1, ...) when collecting."
                    )
                return fn(act)

            bypass = resolve_bypass(model, resolved)
            stack.enter_context(
                SiteHook(model, resolved, module, rewrite, writes=True, bypass=bypass)
            )
        if target is not None:
            resolved_target, target_module = resolve_sites(model, [target])[0]

            def capture(act: torch.Tensor) -> None:
                captured.append(act)
                raise _Stop

            stack.enter_context(SiteHook(model, resolved_target, target_module, capture))
        try:
            output = forward(model, batch)
        except _Stop:
            output = None
    missing = sorted(set(rewrites or {}) - set(fired))
    if missing:
        where = f"site {target.key!r}" if target is not None else "the output"
        raise GradientError(
            f"The forward pass reached {where} before site(s) {missing} (or never ran them). "
            "Node layers must be listed in forward order, each before the next."
        )
    if target is None:
        return output
    if not captured:
        raise GradientError(
            f"Site {target.key!r} was never reached in the forward pass; check its name and "
            "that forward(model, batch) runs it."
        )
    return captured[0]


def output_tensor(output: Any) -> torch.Tensor:
    """The tensor of a model output (a tensor, a tuple starting with one, or ``.logits``)."""
    tensor = _first_tensor(output)
    if tensor is None:
        raise ShapeMismatchError(
            f"The model output ({type(output).__name__}) holds no tensor; pass a forward= "
            "that returns the output tensor."
        )
    return tensor


def repeat_batch(batch: Any, copies: int) -> Any:
    """``copies`` stacked copies of a batch along dimension 0 (copy-major).

    Tensors are repeated; tuples, lists and dicts are mapped; ``copies == 1`` returns the
    batch unchanged.

    Raises:
        ShapeMismatchError: For a batch holding something other than tensors and containers.
    """
    if copies == 1:
        return batch
    if isinstance(batch, torch.Tensor):
        if batch.ndim == 0:
            return batch
        return batch.repeat(copies, *([1] * (batch.ndim - 1)))
    if isinstance(batch, (tuple, list)):
        return type(batch)(repeat_batch(b, copies) for b in batch)
    if isinstance(batch, Mapping):
        return {k: repeat_batch(v, copies) for k, v in batch.items()}
    if isinstance(batch, (int, float, bool)) or batch is None:
        return batch
    raise ShapeMismatchError(
        f"Cannot stack copies of a batch of type {type(batch).__name__}; edge ablation "
        "stacks copies of tensor batches. Pass feature_chunk=1 to run one copy at a time."
    )
