"""The exact degeneracy count of a small model: the behavioural Gauss-Newton null dimension.

:func:`behavioural_null_dimension` counts the zero singular values of the parameter Jacobian of
all outputs on all data, i.e. the null dimension of the Gauss-Newton matrix
``H_B = (2/n) sum_x J_w(x)^T J_w(x)`` of the behavioural loss (lib_math §4.1). It is the total
that the per-site measures of :mod:`degen_hooks.degeneracy` must not be added up to replace.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, jacrev

from ._checks import closest
from ._errors import SiteNotFoundError

__all__ = ["BehaviouralNull", "behavioural_null_dimension"]

_EPS = torch.finfo(torch.float64).eps


@dataclass(frozen=True)
class BehaviouralNull:
    """Zero directions of the behavioural Gauss-Newton matrix on the data given.

    Attributes:
        null_dim: ``n_params - rank``.
        n_params: Number of scalar parameters considered.
        rank: Numerical rank of the parameter Jacobian of the outputs.
        n_rows: Rows of that Jacobian (samples x output entries).
        rtol: Relative singular-value threshold used.
    """

    null_dim: int
    n_params: int
    rank: int
    n_rows: int
    rtol: float

    @property
    def is_upper_bound(self) -> bool:
        """Whether the data, not the model, set the count.

        When the Jacobian's rank equals its number of rows (and is below ``n_params``), every
        row was independent: more samples could raise the rank, so ``null_dim`` is only an
        upper bound on the model's degeneracy, not the exact count.
        """
        return self.rank >= self.n_rows and self.rank < self.n_params


def behavioural_null_dimension(
    model: nn.Module,
    inputs: torch.Tensor | Iterable[torch.Tensor],
    *,
    params: str | Sequence[str] | None = None,
    rtol: float | None = None,
) -> tuple[int, int, torch.Tensor]:
    """Exact number of zero directions of the behavioural-loss Gauss-Newton matrix.

    Forms the parameter Jacobian ``J`` (rows: every output entry of every input; columns:
    every parameter) with ``torch.func.jacrev`` over ``functional_call`` in float64, and
    returns ``n_params - rank(J)``: the null dimension of ``H_B = (2/n) J^T J``, the
    Hessian of the behavioural loss at the trained parameters. The model is not modified
    (float64 copies of its parameters are differentiated). ``J`` is reduced chunk by chunk
    with QR factorisations, so memory stays about ``n_params^2 + 2**23`` float64 numbers;
    time grows like ``n_rows * n_params^2``: meant for small models.

    Args:
        model: Any ``nn.Module`` whose output (or first output tensor, or ``.logits``) is the
            behaviour; put it in ``eval()`` mode if it has dropout.
        inputs: All inputs, as one tensor (first dimension: samples) or an iterable of
            batches. Floating-point inputs are cast to float64.
        params: Parameter names, module paths or globs to differentiate (``"2.*"``); the rest
            stay fixed. Default: every parameter.
        rtol: Relative singular-value threshold: ``s > rtol * s_max`` counts. Default
            ``max(n_rows, n_params) * eps(float64)`` (NumPy's ``matrix_rank`` rule).

    Returns:
        ``(null_dim, n_params, singular_values)``; the singular values of ``J`` are
        float64, descending, shape ``(min(n_rows, n_params),)``.

    Raises:
        SiteNotFoundError: If a ``params`` entry matches no parameter or module.
        ValueError: If the model has no parameters or ``inputs`` is empty.

    Examples:
        >>> import torch
        >>> from degen_hooks.degeneracy import behavioural_null_dimension
        >>> deep_linear = torch.nn.Sequential(torch.nn.Linear(3, 4, bias=False),
        ...                                   torch.nn.Linear(4, 2, bias=False))
        >>> null_dim, n_params, _ = behavioural_null_dimension(deep_linear, torch.randn(10, 3))
        >>> null_dim, n_params   # 20 weights realise the 6 entries of a 2 x 3 product
        (14, 20)
    """
    null_dim, n_params, singular_values, _, _ = _behavioural(model, inputs, params, rtol)
    return null_dim, n_params, singular_values


def _behavioural(
    model: nn.Module,
    inputs: torch.Tensor | Iterable[torch.Tensor],
    params: str | Sequence[str] | None,
    rtol: float | None,
) -> tuple[int, int, torch.Tensor, int, float]:
    names = _select_params(model, params)
    named = dict(model.named_parameters())
    chosen = {n: named[n].detach().to(torch.float64) for n in names}
    fixed = {n: _as64(p.detach()) for n, p in named.items() if n not in chosen}
    fixed.update({n: _as64(b.detach()) for n, b in model.named_buffers()})
    n_params = sum(p.numel() for p in chosen.values())

    def outputs(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return _first_tensor(functional_call(model, {**fixed, **p}, (x,))).reshape(-1)

    batches = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    r_factor: torch.Tensor | None = None
    n_rows = 0
    chunk: int | None = None
    for batch in batches:
        batch = _as64(batch)
        if chunk is None and len(batch):
            per_sample = outputs(chosen, batch[:1]).numel()
            # About 2**23 float64 entries (64 MiB) of Jacobian per chunk.
            chunk = max(1, (1 << 23) // max(1, per_sample * n_params))
        for start in range(0, len(batch), chunk or 1):
            jac = jacrev(outputs)(chosen, batch[start : start + (chunk or 1)])
            rows = torch.cat([jac[n].reshape(jac[n].shape[0], -1) for n in names], dim=1)
            n_rows += rows.shape[0]
            stacked = rows if r_factor is None else torch.cat([r_factor, rows])
            # R of a QR factorisation has the singular values of the stacked rows: the
            # Jacobian never has to be held whole, and J^T J is never formed (which would
            # square its condition number).
            r_factor = torch.linalg.qr(stacked, mode="r")[1]
    if r_factor is None:
        raise ValueError("inputs is empty: give at least one sample.")
    singular_values = torch.linalg.svdvals(r_factor).cpu()
    used = max(n_rows, n_params) * _EPS if rtol is None else float(rtol)
    largest = float(singular_values[0]) if len(singular_values) else 0.0
    rank = int((singular_values > used * largest).sum()) if largest > 0 else 0
    return n_params - rank, n_params, singular_values, n_rows, used


def _select_params(model: nn.Module, params: str | Sequence[str] | None) -> list[str]:
    """Parameter names chosen by name, module path or glob, in ``named_parameters()`` order."""
    named = [n for n, _ in model.named_parameters()]
    if not named:
        raise ValueError(f"{type(model).__name__} has no parameters.")
    if params is None:
        return named
    chosen: set[str] = set()
    for pattern in [params] if isinstance(params, str) else list(params):
        hits = {
            n
            for n in named
            if fnmatch.fnmatchcase(n, pattern) or n.startswith(pattern + ".") or n == pattern
        }
        if not hits:
            suggestions = closest(pattern, named)
            hint = f" Did you mean {' or '.join(map(repr, suggestions))}?" if suggestions else ""
            raise SiteNotFoundError(
                f"params entry {pattern!r} matches no parameter of {type(model).__name__}."
                f"{hint} List them with [n for n, _ in model.named_parameters()]."
            )
        chosen |= hits
    return [n for n in named if n in chosen]


def _as64(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float64) if x.is_floating_point() else x


def _first_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for item in value:
            if isinstance(item, torch.Tensor):
                return item
    logits = getattr(value, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(
        f"The model returned {type(value).__name__}; the behavioural count needs a tensor "
        "output (or a tuple starting with one, or an object with .logits)."
    )
