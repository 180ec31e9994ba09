"""Probe vectors and batched vector-Jacobian products for Jacobian Gram matrices.

The interaction basis (Bushnaq et al. 2024, arXiv 2405.10928) needs, per site,
``M' = E_x[sum_k g_k(x) g_k(x)^T]`` with ``g_k = J(x)^T v_k`` the vector-Jacobian products of
probe vectors ``v_k`` placed at a target (the model output, or a later site read out through a
fixed matrix such as its basis); see lib_math §5 step 4. Output positions are summed inside
(every (position, feature) coordinate is one probe), input positions are samples.

Probes:
    * ``exact``: one one-hot probe per target coordinate (a column of the readout when there
      is one), pushed through autograd ``chunk`` at a time with ``torch.vmap`` over
      ``torch.autograd.grad``; memory is bounded by the chunk, not by samples x outputs.
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

from ._errors import GradientError, ShapeMismatchError
from .sites import Positions, select_positions

__all__ = ["Probe", "count_probe_vectors", "probe_chunks", "vjp_batched"]


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
    name: str,
) -> torch.Tensor | None:
    """Boolean mask over the target's leading shape (which cells are probed); ``None``: all."""
    if positions is None and mask is None:
        return None
    cells = torch.zeros(shape[:-1], dtype=torch.bool, device=device)
    index_grid = torch.arange(cells.numel(), device=device).reshape(cells.shape)
    kept = select_positions(index_grid.unsqueeze(-1), positions, mask, name).reshape(-1)
    cells.view(-1)[kept] = True
    return cells


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
    name: str = "output",
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
        name: Name of the target in error messages.

    Yields:
        Grad-output tensors of shape ``(k, *target_shape)``, ``k <= chunk``. Only one chunk
        is built at a time: memory is ``O(chunk * target size)``.

    Raises:
        ValueError: If ``n_probes`` or ``chunk`` is below 1.
        ShapeMismatchError: If the target has no feature dimension, or the readout, positions
            or mask do not fit it.

    Examples:
        >>> import torch
        >>> [tuple(v.shape) for v in probe_chunks("exact", torch.Size([2, 3]), chunk=2)]
        [(2, 2, 3), (1, 2, 3)]
    """
    kind = Probe(kind)
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}.")
    device = torch.device(device)
    r, cells = _probe_layout(target_shape, readout, positions, mask, n_probes, device, name)
    d_target = target_shape[-1]
    n_batch = target_shape[0]
    n_inner = math.prod(target_shape[1:-1])
    # Columns of the readout, one per probe coordinate: (r, d_target).
    columns = None if readout is None else readout.to(device=device, dtype=dtype).T
    keep = None if cells is None else cells.reshape(1, n_batch, n_inner, 1).to(dtype)

    if kind is Probe.EXACT:
        # Probe coordinates: every (probed cell, feature) pair. Cells no sample probes are
        # skipped, so exact probing costs only what is selected.
        probed = _probed_cells(cells, target_shape, device)
        n_coordinates = probed.numel() * r
        for start in range(0, n_coordinates, chunk):
            index = torch.arange(start, min(start + chunk, n_coordinates), device=device)
            k = index.numel()
            cell, feature = probed[index // r], index % r
            rows = torch.arange(k, device=device)
            # One-hot probes (or readout columns) built by indexing, without a Python loop
            # and without multiplying a mostly-zero tensor by the readout.
            v = torch.zeros(k, n_batch, n_inner, d_target, dtype=dtype, device=device)
            if columns is None:
                v[rows, :, cell, feature] = 1.0
            else:
                v[rows, :, cell, :] = columns[feature][:, None, :]
            if keep is not None:
                v.mul_(keep)
            yield v.reshape(k, *target_shape)
        return

    scale = 1.0 / math.sqrt(n_probes)
    cell_shape = target_shape[:-1]
    for start in range(0, n_probes, chunk):
        k = min(chunk, n_probes - start)
        shape = (k, *cell_shape, r)
        if kind is Probe.RADEMACHER:
            v = torch.randint(0, 2, shape, generator=generator, device=device).to(dtype)
            v.mul_(2 * scale).sub_(scale)
        else:
            v = torch.randn(shape, generator=generator, device=device, dtype=dtype)
            v.mul_(scale)
        if columns is not None:
            v = v @ columns
        if keep is not None:
            v = (v.reshape(k, n_batch, n_inner, -1) * keep).reshape(v.shape)
        yield v


def count_probe_vectors(
    kind: Probe | str,
    target_shape: torch.Size,
    *,
    readout: torch.Tensor | None = None,
    positions: Positions = None,
    mask: torch.Tensor | None = None,
    n_probes: int = 1,
    name: str = "output",
) -> int:
    """The number of probe vectors :func:`probe_chunks` yields for the same arguments.

    ``ceil(count / chunk)`` is the number of backward passes a target costs, known before
    any probe is built (a sharded model's ranks agree on it before the first pass).

    Args:
        kind: ``"exact"``, ``"rademacher"`` or ``"gaussian"``.
        target_shape: Shape of the target tensor, ``(batch, ..., d_target)``.
        readout: Optional ``(d_target, r)`` matrix; identity when ``None``.
        positions: Positions of the target to probe.
        mask: Optional per-batch ``(batch, pos)`` boolean mask of probed positions.
        n_probes: Number of random probes (ignored for ``exact``).
        name: Name of the target in error messages.

    Returns:
        Exact probes: one per probed (cell, feature) coordinate; random: ``n_probes``.

    Raises:
        ValueError: If ``n_probes`` is below 1.
        ShapeMismatchError: As :func:`probe_chunks`.

    Examples:
        >>> import torch
        >>> count_probe_vectors("exact", torch.Size([2, 4, 3]), positions="last")
        3
    """
    kind = Probe(kind)
    device = torch.device("cpu") if mask is None else mask.device
    r, cells = _probe_layout(target_shape, readout, positions, mask, n_probes, device, name)
    if kind is not Probe.EXACT:
        return n_probes
    return _probed_cells(cells, target_shape, device).numel() * r


def _probe_layout(
    target_shape: torch.Size,
    readout: torch.Tensor | None,
    positions: Positions,
    mask: torch.Tensor | None,
    n_probes: int,
    device: torch.device,
    name: str,
) -> tuple[int, torch.Tensor | None]:
    """Check the arguments of a probe set; return its width ``r`` and its probed cells."""
    if n_probes < 1:
        raise ValueError(f"n_probes must be at least 1, got {n_probes}.")
    if len(target_shape) < 2:
        raise ShapeMismatchError(
            f"The Jacobian target {name!r} has shape {tuple(target_shape)}; it needs a batch "
            "and a feature dimension, (batch, ..., d). Return y.unsqueeze(-1) for one output "
            "per sample."
        )
    d_target = target_shape[-1]
    if readout is not None and (readout.ndim != 2 or readout.shape[0] != d_target):
        raise ShapeMismatchError(
            f"Readout of shape {tuple(readout.shape)} cannot read the target {name!r} of "
            f"width {d_target}: it must be a (d_target, r) = ({d_target}, r) matrix."
        )
    r = d_target if readout is None else readout.shape[1]
    return r, _coordinate_mask(target_shape, positions, mask, device, name)


def _probed_cells(
    cells: torch.Tensor | None, target_shape: torch.Size, device: torch.device
) -> torch.Tensor:
    """Flat indices of the inner cells (positions) that at least one sample probes."""
    n_inner = math.prod(target_shape[1:-1])
    if cells is None:
        return torch.arange(n_inner, device=device)
    return cells.reshape(target_shape[0], n_inner).any(dim=0).nonzero().flatten()


def vjp_batched(
    output: torch.Tensor,
    inputs: Sequence[object],
    grad_outputs: torch.Tensor,
    *,
    retain_graph: bool,
) -> tuple[torch.Tensor | None, ...]:
    """Vector-Jacobian products for a batch of grad-outputs (first dimension).

    Uses ``torch.vmap`` over ``torch.autograd.grad`` (functorch batching rules; the legacy
    ``is_grads_batched`` path falls back to slow per-probe loops for ops such as
    ``gelu_backward``). A single probe needs no vmap.

    Args:
        output: The target tensor, shape ``T``.
        inputs: Tensors or gradient edges to differentiate with respect to.
        grad_outputs: Shape ``(k, *T)``.
        retain_graph: Keep the graph for further calls.

    Returns:
        One ``(k, *input_shape)`` tensor per input, ``None`` where the input does not
        influence ``output``.

    Raises:
        GradientError: If a backward function of the model cannot run under ``torch.vmap``
            (e.g. it calls ``.item()``); ``chunk=1`` avoids vmap.
    """
    inputs = list(inputs)
    if grad_outputs.shape[0] == 1:
        grads = torch.autograd.grad(
            output,
            inputs,
            grad_outputs=grad_outputs[0],
            retain_graph=retain_graph,
            allow_unused=True,
        )
        return tuple(None if g is None else g.unsqueeze(0) for g in grads)
    unused: list[bool] = []

    def vjp(v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        grads = torch.autograd.grad(
            output, inputs, grad_outputs=v, retain_graph=retain_graph, allow_unused=True
        )
        # vmap returns tensors only; unused inputs are marked here (the function runs once).
        unused[:] = [g is None for g in grads]
        return tuple(v.new_zeros(()) if g is None else g for g in grads)

    try:
        batched = torch.vmap(vjp)(grad_outputs)
    except RuntimeError as err:
        if "vmap" not in str(err) and "atching rule" not in str(err):
            raise
        raise GradientError(
            f"A backward function of the model cannot run batched over "
            f"{grad_outputs.shape[0]} probes with torch.vmap: {err} Pass chunk=1 to "
            "dh.collect(...) to push probes one at a time (slower, same result)."
        ) from err
    return tuple(None if u else g for u, g in zip(unused, batched, strict=True))
