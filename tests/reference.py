"""Brute-force references the library is tested against (slow, obvious, float64).

* :func:`activations` reads a site by running the model with one hook; :func:`covariance`
  is ``torch.cov`` of the stacked rows.
* :func:`site_jacobians` builds, one sample at a time, the full Jacobian of a target (the
  model output or a later module's output) with respect to a site's value, with
  ``torch.func.jacrev`` through the model itself: the site's output is *replaced* by the
  differentiated variable in a forward hook, so nothing about the model is assumed.
* :func:`jacobian_gram` stacks them into the Jacobian Gram of lib_math §5 step 4:

      M' = 1/(#site rows) sum_x sum_(site position s) sum_(target position t, feature i)
           J[(t, i), (s, :)]^T J[(t, i), (s, :)]

  output positions are summed inside, input positions are samples.
* :func:`cells` turns a ``Site.positions`` spec plus a ``(batch, pos)`` mask into the boolean
  ``(batch, pos)`` selection, independently of the library's implementation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from degen_hooks.sites import _site_modules  # TransformerLens bridges: aliases too

__all__ = [
    "activations",
    "assert_same_bases",
    "assert_spectrum_close",
    "cells",
    "covariance",
    "jacobian_gram",
    "second_moment",
    "site_jacobians",
]


def assert_spectrum_close(
    got: torch.Tensor, want: torch.Tensor, *, rtol: float = 1e-9, what: str = "spectrum"
) -> None:
    """Eigenvalues agree relative to the largest one: ``max |got - want| <= rtol * max |want|``.

    Small eigenvalues carry rounding of the size of the largest one times eps (which depends
    on the BLAS kernel and the thread count), so an elementwise relative test of them is a
    test of the machine, not of the library.
    """
    assert got.shape == want.shape, f"{what}: shapes {tuple(got.shape)} vs {tuple(want.shape)}"
    scale = float(want.abs().max()) if want.numel() else 0.0
    error = float((got - want).abs().max()) if want.numel() else 0.0
    assert error <= rtol * scale, (
        f"{what}: max difference {error:.3g} exceeds {rtol:g} x largest value {scale:.3g}"
    )


def assert_same_bases(got: Any, want: Any) -> None:
    """Two fitted bases agree site by site: widths equal, Lambdas within 1e-9 of the largest,
    projectors onto the kept features within 1e-7 (invariants, never raw eigenvectors)."""
    for key in want.sites_:
        assert got.widths_[key] == want.widths_[key], key
        scale = want.lambdas_[key].max()
        torch.testing.assert_close(got.lambdas_[key], want.lambdas_[key], rtol=0, atol=1e-9 * scale)
        torch.testing.assert_close(got.projector(key), want.projector(key), rtol=0, atol=1e-7)


def assert_same_edges(got: Any, want: Any) -> None:
    """Two fitted interaction graphs agree pair by pair: edges at rtol 1e-10 (float64)."""
    for pair in want.pairs_:
        expected = want.edges_[pair]
        torch.testing.assert_close(
            got.edges_[pair], expected, rtol=1e-10, atol=1e-14 * float(expected.max())
        )


def _first_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    return next(v for v in value if isinstance(v, torch.Tensor))


def activations(
    model: nn.Module, x: torch.Tensor, site: str, *, io: str = "output"
) -> torch.Tensor:
    """The value a site takes on ``x`` (before any later in-place op), full shape."""
    module = _site_modules(model)[site]
    seen: list[torch.Tensor] = []
    if io == "output":
        handle = module.register_forward_hook(
            lambda _m, _a, out: seen.append(_first_tensor(out).detach().clone())
        )
    else:
        handle = module.register_forward_pre_hook(
            lambda _m, args: seen.append(_first_tensor(args).detach().clone())
        )
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen[0]


def covariance(rows: torch.Tensor) -> torch.Tensor:
    """Population covariance of stacked rows ``(n, d)`` -> ``(d, d)``."""
    return torch.cov(rows.T, correction=0)


def second_moment(rows: torch.Tensor) -> torch.Tensor:
    """``(1/n) sum x x^T`` of rows ``(n, d)``."""
    return rows.T @ rows / rows.shape[0]


def site_jacobians(
    model: nn.Module,
    x: torch.Tensor,
    site: str,
    *,
    io: str = "output",
    target: str | None = None,
) -> torch.Tensor:
    """Per-sample Jacobians of the target with respect to a site, by ``torch.func.jacrev``.

    Args:
        model: The model; called on one sample at a time, ``model(x[i : i + 1])``.
        x: Inputs, shape ``(n, ...)``.
        site: Module name whose output (or input, ``io="input"``) is differentiated.
        io: ``"output"`` or ``"input"``. An input is replaced only as that module's
            argument: if the same tensor also feeds another path (a skip connection), use
            an ``nn.Identity`` site upstream instead (``ResidualMLP.resid_pre``).
        target: Module whose output is the target; the model output when ``None``.

    Returns:
        Shape ``(n, P_out, d_target, P_in, d_site)``; ``P = 1`` for tensors without a
        position dimension, and every extra leading dimension (heads) is flattened into
        ``P``, like the library flattens it into samples (site) or coordinates (target).
    """
    modules = _site_modules(model)
    module = modules[site]
    values = activations(model, x, site, io=io)
    jacobians = []
    for i in range(x.shape[0]):

        def target_of(z: torch.Tensor, i: int = i) -> torch.Tensor:
            captured: list[torch.Tensor] = []
            # .clone(): later in-place ops (ReLU(inplace=True)) must not write into z.
            if io == "output":
                handle = module.register_forward_hook(lambda _m, _a, _o: z[None].clone())
            else:
                handle = module.register_forward_pre_hook(
                    lambda _m, args: (z[None].clone(), *args[1:])
                )
            handles = [handle]
            if target is not None:
                handles.append(
                    modules[target].register_forward_hook(
                        lambda _m, _a, out: captured.append(_first_tensor(out).clone())
                    )
                )
            try:
                out = _first_tensor(model(x[i : i + 1]))
            finally:
                for h in handles:
                    h.remove()
            return (captured[0] if target is not None else out)[0]

        jac = torch.func.jacrev(target_of)(values[i]).detach()
        jacobians.append(_as_positions(jac, values.ndim - 1))
    return torch.stack(jacobians)


def _as_positions(jac: torch.Tensor, site_ndim: int) -> torch.Tensor:
    """``(*target, *site)`` -> ``(P_out, d_target, P_in, d_site)``.

    Every leading dimension (positions, heads, ...) of the target and of the site is
    flattened into its position axis; the last dimension is the feature axis.
    """
    target_shape = jac.shape[: jac.ndim - site_ndim]
    site_shape = jac.shape[jac.ndim - site_ndim :]
    p_out, p_in = math.prod(target_shape[:-1]), math.prod(site_shape[:-1])
    return jac.reshape(p_out, target_shape[-1], p_in, site_shape[-1])


def cells(
    n: int,
    n_pos: int,
    positions: None | str | int | slice | Sequence[int] = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean ``(n, n_pos)`` selection of (sample, position) cells.

    Args:
        n: Batch size.
        n_pos: Number of positions.
        positions: ``None`` (all), ``"last"``, an int, a slice or a list of ints.
        mask: Optional ``(n, n_pos)`` boolean mask, combined with ``positions`` by AND.
    """
    chosen = torch.zeros(n_pos, dtype=torch.bool)
    if positions is None:
        chosen[:] = True
    elif positions == "last":
        chosen[-1] = True
    else:
        chosen[positions] = True
    out = chosen.expand(n, n_pos).clone()
    return out if mask is None else out & mask.bool()


def jacobian_gram(
    jac: torch.Tensor,
    *,
    readout: torch.Tensor | None = None,
    target_cells: torch.Tensor | None = None,
    site_cells: torch.Tensor | None = None,
) -> torch.Tensor:
    """Jacobian Gram ``M'`` from stacked Jacobians, one explicit sum at a time.

    Args:
        jac: ``(n, P_out, d_target, P_in, d_site)`` from :func:`site_jacobians`.
        readout: ``(d_target, r)``: the target is read as ``y @ readout``.
        target_cells: ``(n, P_out)`` boolean: which target positions are probed.
        site_cells: ``(n, P_in)`` boolean: which site positions are samples.

    Returns:
        ``M'``, shape ``(d_site, d_site)``, normalised by the number of site rows.
    """
    n, p_out, _, p_in, d = jac.shape
    if readout is not None:
        jac = torch.einsum("ntisd,ir->ntrsd", jac, readout.to(jac.dtype))
    if target_cells is None:
        target_cells = torch.ones(n, p_out, dtype=torch.bool)
    if site_cells is None:
        site_cells = torch.ones(n, p_in, dtype=torch.bool)
    gram = torch.zeros(d, d, dtype=jac.dtype)
    for sample in range(n):
        for s in range(p_in):
            if not site_cells[sample, s]:
                continue
            for t in range(p_out):
                if not target_cells[sample, t]:
                    continue
                rows = jac[sample, t, :, s, :]  # (r, d): one row per target feature
                gram += rows.T @ rows
    return gram / int(site_cells.sum())
