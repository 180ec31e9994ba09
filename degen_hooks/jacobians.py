"""Probe vectors and batched vector-Jacobian products for Jacobian Gram matrices.

The interaction basis needs, per site, ``M' = E_x[sum_k g_k(x) g_k(x)^T]`` with
``g_k = J(x)^T v_k`` the vector-Jacobian products of probe vectors ``v_k`` placed at a target
(the model output, or a later site read out through a fixed matrix such as its basis); see
lib_math §5 step 4. Output positions are summed inside (every (position, feature) coordinate is
one probe), input positions are samples.

Probes:
    * ``exact``: one one-hot probe per target coordinate, pushed through autograd in batches
      of ``chunk`` with ``is_grads_batched`` (vmap over the backward pass); memory is bounded
      by the chunk, not by samples x outputs.
    * ``rademacher`` / ``gaussian``: ``n_probes`` random probes with ``E[v v^T] = I``, scaled
      by ``1/sqrt(n_probes)``: an unbiased estimate of the exact Gram.

Gradients are taken with ``torch.autograd.grad`` with respect to the *gradient edges* captured
in forward hooks (``torch.autograd.graph.get_gradient_edge``), so they are the gradients of the
value the site produced even when a later in-place op overwrites it, and no ``.grad`` of the
user's parameters is touched.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from enum import Enum

import torch

from ._errors import ShapeMismatchError
from .sites import Positions, select_positions

__all__ = ["Probe", "probe_chunks", "vjp_batched"]


class Probe(str, Enum):
    """How probe vectors are drawn at the Jacobian target."""

    EXACT = "exact"
    RADEMACHER = "rademacher"
    GAUSSIAN = "gaussian"


def _coordinate_mask(
    shape: torch.Size,
    positions: Positions,
    mask: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """Boolean mask over the target's leading shape: which (batch, pos, ...) cells are probed."""
    cells = torch.ones(shape[:-1], dtype=torch.bool, device=device)
    if positions is None and mask is None:
        return cells
    index_grid = torch.arange(cells.numel(), device=device).reshape(cells.shape)
    kept = select_positions(
        index_grid.unsqueeze(-1), positions, mask, "target"
    ).reshape(-1)
    out = torch.zeros(cells.numel(), dtype=torch.bool, device=device)
    out[kept] = True
    return out.reshape(cells.shape)


def probe_chunks(
    kind: Probe | str,
    target_shape: torch.Size,
    *,
    readout: torch.Tensor | None = None,
    positions: Positions = None,
    mask: torch.Tensor | None = None,
    n_probes: int = 1,
    chunk: int = 64,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Iterator[torch.Tensor]:
    """Yield batches of grad-outputs, shape ``(k, *target_shape)``, for one target tensor.

    The probes live in readout coordinates: a target ``y`` (``(..., d_target)``) is read as
    ``y @ readout`` (``(..., r)``), and a probe ``v`` (``(..., r)``) becomes the grad-output
    ``v @ readout.T``. Every sample (first dimension) receives the same one-hot coordinate
    (exact) or its own random vector, so one backward pass serves the whole batch.

    Args:
        kind: ``"exact"``, ``"rademacher"`` or ``"gaussian"``.
        target_shape: Shape of the target tensor, ``(batch, ..., d_target)``.
        readout: Optional ``(d_target, r)`` matrix; identity when ``None``.
        positions: Positions of the target to probe (see :class:`~degen_hooks.Site`).
        mask: Optional per-batch ``(batch, pos)`` boolean mask of probed positions.
        n_probes: Number of random probes (ignored for ``exact``).
        chunk: Most probes per yielded batch.
        generator: Random generator for random probes.
        dtype: Dtype of the grad-outputs (the target's dtype).
        device: Device of the grad-outputs.

    Yields:
        Grad-output tensors of shape ``(k, *target_shape)``, ``k <= chunk``.
    """
    kind = Probe(kind)
    if n_probes < 1:
        raise ValueError(f"n_probes must be at least 1, got {n_probes}.")
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}.")
    d_target = target_shape[-1]
    if readout is not None and readout.shape[0] != d_target:
        raise ShapeMismatchError(
            f"Readout of shape {tuple(readout.shape)} cannot read a target of width "
            f"{d_target}: it needs {d_target} rows."
        )
    r = d_target if readout is None else readout.shape[1]
    cells = _coordinate_mask(target_shape, positions, mask, torch.device(device))
    cell_shape = target_shape[:-1]
    read = None if readout is None else readout.to(device=device, dtype=dtype).T

    def to_grad_outputs(v: torch.Tensor) -> torch.Tensor:
        v = v * cells.unsqueeze(-1).to(v.dtype)
        return v if read is None else v @ read

    if kind is Probe.EXACT:
        # Coordinates of one sample: every (non-batch cell, feature) pair. Cells that no
        # sample probes are skipped so exact probing costs only what is selected.
        inner_cells = cells.reshape(cells.shape[0], -1).any(dim=0).nonzero().flatten()
        coordinates = [(int(c), i) for c in inner_cells for i in range(r)]
        n_inner = int(math.prod(cell_shape[1:]))
        for start in range(0, len(coordinates), chunk):
            part = coordinates[start : start + chunk]
            v = torch.zeros(
                len(part), cell_shape[0], n_inner, r, dtype=dtype, device=device
            )
            for k, (cell, feature) in enumerate(part):
                v[k, :, cell, feature] = 1.0
            yield to_grad_outputs(v.reshape(len(part), *cell_shape, r))
        return
    scale = 1.0 / math.sqrt(n_probes)
    for start in range(0, n_probes, chunk):
        k = min(chunk, n_probes - start)
        shape = (k, *cell_shape, r)
        if kind is Probe.RADEMACHER:
            v = torch.randint(0, 2, shape, generator=generator, device=device).to(dtype)
            v = v.mul_(2).sub_(1)
        else:
            v = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        yield to_grad_outputs(v * scale)


def vjp_batched(
    output: torch.Tensor,
    inputs: Sequence[object],
    grad_outputs: torch.Tensor,
    *,
    retain_graph: bool,
) -> tuple[torch.Tensor | None, ...]:
    """Vector-Jacobian products for a batch of grad-outputs (first dimension).

    Args:
        output: The target tensor, shape ``T``.
        inputs: Tensors or gradient edges to differentiate with respect to.
        grad_outputs: Shape ``(k, *T)``.
        retain_graph: Keep the graph for further calls.

    Returns:
        One ``(k, *input_shape)`` tensor per input, ``None`` where the input does not
        influence ``output``.
    """
    if grad_outputs.shape[0] == 1:
        # A single probe needs no vmap (cheaper, and works for every op).
        grads = torch.autograd.grad(
            output,
            list(inputs),
            grad_outputs=grad_outputs[0],
            retain_graph=retain_graph,
            allow_unused=True,
        )
        return tuple(None if g is None else g.unsqueeze(0) for g in grads)
    return torch.autograd.grad(
        output,
        list(inputs),
        grad_outputs=grad_outputs,
        retain_graph=retain_graph,
        allow_unused=True,
        is_grads_batched=True,
    )
