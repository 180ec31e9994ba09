"""Token positions of a site: which ``(batch, pos)`` cells of an activation a site reads.

Part of :mod:`degen_hooks.sites`: ``Site.positions`` (``None``, ``"last"``, an int, a
slice, a sequence, a boolean tensor) and a per-batch padding mask select the cells;
:func:`select_positions` reads them as rows, :func:`position_cells` names them for a write,
so reads and writes agree on the cells.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

import torch

from ._errors import ShapeMismatchError

__all__ = ["Positions", "padding_mask", "position_cells", "position_weights", "select_positions"]

Positions = Union[None, int, slice, str, Sequence[int], torch.Tensor]  # noqa: UP007


def describe_positions(positions: Any) -> Any:
    """Positions as JSON (slices and tensors spelled out): how sites and targets save them."""
    if positions is None or isinstance(positions, (int, str)):
        return positions
    if isinstance(positions, slice):
        return f"slice({positions.start}, {positions.stop}, {positions.step})"
    if isinstance(positions, torch.Tensor):
        return positions.tolist()
    return list(positions)


def same_positions(a: Any, b: Any) -> bool:
    """Whether two position selections read the same positions (``[1, 2]`` and
    ``torch.tensor([1, 2])`` do), compared as :func:`describe_positions` writes them."""
    return describe_positions(a) == describe_positions(b)


def select_positions(
    act: torch.Tensor, positions: Positions, mask: torch.Tensor | None, key: str
) -> torch.Tensor:
    """Keep the chosen positions of ``act`` (dimension 1); returns ``(..., d)``.

    With a ``mask`` the result is already flattened to ``(n, d)``.

    Raises:
        ShapeMismatchError: For a 0-d ``act`` (a module returning one number, e.g. a loss),
            positions or a mask on an activation without a position dimension, or positions
            and masks that do not fit it.
    """
    if act.ndim == 0:
        raise ShapeMismatchError(
            f"Site {key!r} produced a 0-d tensor (shape ()), one number such as a loss: it "
            "has no samples and no features to take statistics of. Choose a site with a "
            "feature dimension, shape (batch, ..., d_site), e.g. the module whose output it "
            'reduces; list the sites with dh.find_sites(model, "*").'
        )
    has_pos = act.ndim >= 3
    if (positions is not None or mask is not None) and not has_pos:
        raise ShapeMismatchError(
            f"Site {key!r} has activations of shape {tuple(act.shape)}, with no position "
            "dimension (expected (batch, pos, ..., d)); drop positions=/set_mask() for it."
        )
    if mask is not None:
        mask = padding_mask(mask, act, key)
    if positions == "last" and mask is not None:
        # With padding, "last" is each row's last unmasked position (rows of padding only
        # are dropped).
        last = _last_real(mask)
        keep = last >= 0
        rows = torch.arange(act.shape[0], device=act.device)[keep]
        return act[rows, last[keep]].reshape(-1, act.shape[-1])
    if positions is not None:
        index = _position_index(positions, act.shape[1], key)
        act = act[:, index]
        if mask is not None:
            mask = mask[:, index]
        if act.ndim == 2:  # an int position drops the dimension; keep it as rows
            act = act.unsqueeze(1)
            mask = None if mask is None else mask.unsqueeze(1)
    if mask is not None:
        return act[mask].reshape(-1, act.shape[-1])
    return act


def padding_mask(mask: Any, act: torch.Tensor, key: str) -> torch.Tensor:
    """``mask`` as a ``(batch, pos)`` bool tensor on ``act``'s device, checked against
    ``act`` (``(batch, pos, ...)``) at site ``key``.

    Raises:
        ShapeMismatchError: If its shape is not ``act``'s ``(batch, pos)``.
    """
    mask = torch.as_tensor(mask, device=act.device).bool()
    if tuple(mask.shape) != tuple(act.shape[:2]):
        raise ShapeMismatchError(
            f"Mask of shape {tuple(mask.shape)} does not match site {key!r} with "
            f"activations {tuple(act.shape)}: expected a (batch, pos) = "
            f"{tuple(act.shape[:2])} boolean mask."
        )
    return mask


def position_cells(
    act: torch.Tensor, positions: Positions, mask: torch.Tensor | None, key: str
) -> torch.Tensor:
    """The ``(batch, pos)`` cells of ``act`` that :func:`select_positions` reads, as a mask.

    A write at a site changes these cells and no others: with padding, ``"last"`` is each
    row's last real token, as when the site was read.

    Raises:
        ShapeMismatchError: As :func:`select_positions`.
    """
    if act.ndim < 3:
        select_positions(act, positions, mask, key)  # raises for positions or a mask
        return torch.ones(act.shape[:1], dtype=torch.bool, device=act.device)
    cells = torch.zeros(act.shape[:2], dtype=torch.bool, device=act.device)
    if positions is None:
        cells[:] = True
    elif positions == "last" and mask is not None:
        select_positions(act[:, :, :1], None, mask, key)  # checks the mask's shape
        last = _last_real(mask.to(act.device).bool())
        rows = torch.arange(act.shape[0], device=act.device)[last >= 0]
        cells[rows, last[last >= 0]] = True
        return cells
    else:
        cells[:, _position_index(positions, act.shape[1], key)] = True
    if mask is not None:
        select_positions(act[:, :, :1], None, mask, key)
        cells &= mask.to(act.device).bool()
    return cells


def _last_real(mask: torch.Tensor) -> torch.Tensor:
    """Each row's last real position under a ``(batch, pos)`` bool mask, ``(batch,)``: -1 for
    a row of padding only."""
    steps = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, steps, -1).max(dim=1).values


def _position_index(positions: Positions, n_pos: int, key: str) -> int | slice | torch.Tensor:
    if isinstance(positions, str):
        # "last" of no positions (an empty sequence) is no rows, as with a padding-only mask.
        return -1 if n_pos else slice(0, 0)
    if isinstance(positions, int):
        if not -n_pos <= positions < n_pos:
            raise ShapeMismatchError(
                f"Site {key!r} asks for position {positions}, but the activation has only "
                f"{n_pos} positions."
            )
        return positions
    if isinstance(positions, slice):
        return positions
    index = torch.as_tensor(positions)
    if index.dtype == torch.bool and index.shape != (n_pos,):
        raise ShapeMismatchError(
            f"Site {key!r} has a position mask of shape {tuple(index.shape)}, but the "
            f"activation has {n_pos} positions."
        )
    return index


def position_weights(
    positions: Positions,
    n_pos: int,
    mask: torch.Tensor | None,
    device: torch.device,
    key: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions a site keeps, ``(K,)`` (repeats kept), and how often each sequence's
    position there is a sample, ``(b, K)`` float64 (``(1, K)`` of ones without a mask).

    With a padding ``mask`` (``(b, n_pos)`` bool) padding is no sample, and ``"last"`` is each
    row's last real token: the positions of every row's, each row weighted 1 at its own.
    """
    f64 = torch.float64
    if mask is not None and positions == "last":
        last = _last_real(mask)
        index = last[last >= 0].unique()
        return index, (last[:, None] == index[None, :]).to(f64)
    steps = torch.arange(n_pos, dtype=f64, device=device)[None, :, None]
    index = select_positions(steps, positions, None, key).flatten().long()
    if mask is None:
        return index, torch.ones(1, len(index), dtype=f64, device=device)
    return index, mask[:, index].to(f64)
