"""The shared machinery of the streaming accumulators (:mod:`degen_hooks.accumulators`).

Width, dtype and device bookkeeping, the non-finite policy, exact merging and state dicts:
everything an accumulator needs except its own statistics.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch

from ._checks import as_rows, check_width, nonfinite_rows
from ._errors import EmptyStatisticsError, NonFiniteError, ShapeMismatchError

_A = TypeVar("_A", bound="_Accumulator")
_NONFINITE_POLICIES = ("raise", "skip")


class _Accumulator:
    """Shared plumbing: width, dtype, device, non-finite policy, state dicts."""

    _tensor_fields: tuple[str, ...] = ()

    def __init__(
        self,
        d: int | None = None,
        *,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
        nonfinite: str = "raise",
    ) -> None:
        if nonfinite not in _NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {_NONFINITE_POLICIES}, got {nonfinite!r}.")
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else None
        self.nonfinite = nonfinite
        self.n_samples = 0
        self.n_skipped = 0
        self.d: int | None = None
        if d is not None:
            self._allocate(d, self.device or torch.device("cpu"))

    # -- subclasses fill these in ------------------------------------------------------------
    def _allocate(self, d: int, device: torch.device) -> None:
        raise NotImplementedError

    def _merge_state(self, other: Any) -> None:
        raise NotImplementedError

    # -- shared behaviour ---------------------------------------------------------------------
    def _prepare(self, x: torch.Tensor, what: str) -> torch.Tensor:
        """Validate a batch and return it as float rows on the accumulator's device."""
        rows = as_rows(x, what)
        check_width(self.d, rows.shape[1], f"{type(self).__name__}: {what}")
        # Detached: statistics never join the caller's autograd graph.
        return rows.detach().to(device=self.device or rows.device, dtype=self.dtype)

    def _ensure_allocated(self, rows: torch.Tensor) -> None:
        # Allocated only once a batch has passed validation, so a refused first batch
        # leaves the accumulator exactly as it was.
        if self.d is None:
            self._allocate(rows.shape[1], self.device or rows.device)

    def _drop_nonfinite(
        self, rows: torch.Tensor, extra: torch.Tensor | None, what: str
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Fast path: any NaN/inf entry makes its column sum NaN/inf (IEEE sums propagate
        # them), so finite column sums prove every row finite for ~1/10 of the cost of an
        # elementwise isfinite pass. A finite overflow to inf only falls through to the
        # exact per-row check below, which then finds no bad row.
        if bool(torch.isfinite(rows.sum(dim=0)).all()) and (
            extra is None or bool(torch.isfinite(extra.sum()))
        ):
            return rows, extra
        bad = nonfinite_rows(rows)
        if extra is not None:
            bad |= ~torch.isfinite(extra)
        n_bad = int(bad.sum())
        if n_bad == 0:
            return rows, extra
        if self.nonfinite == "raise":
            n_values = int((~torch.isfinite(rows)).sum())
            raise NonFiniteError(
                f"{what}: {n_bad} of {rows.shape[0]} rows hold non-finite values "
                f"({n_values} NaN/inf entries). The statistics were not updated. Find the "
                "source (overflow in float16? a bad input?) or pass nonfinite='skip' to drop "
                "such rows and count them in n_skipped."
            )
        self.n_skipped += n_bad
        keep = ~bad
        return rows[keep], None if extra is None else extra[keep]

    def _check_mergeable(self, other: _Accumulator) -> None:
        if type(other) is not type(self):
            raise TypeError(
                f"Cannot merge {type(other).__name__} into {type(self).__name__}: "
                "only statistics of the same kind combine."
            )
        if self.d is not None and other.d is not None and self.d != other.d:
            name = type(self).__name__
            raise ShapeMismatchError(
                f"Cannot merge {name}(d_site={other.d}) into {name}(d_site={self.d}): "
                "sizes differ. Only merge statistics collected at the same site."
            )

    def merge(self: _A, other: _A) -> _A:
        """Add the samples seen by ``other`` to this accumulator; ``other`` is unchanged.

        Args:
            other: An accumulator of the same class and width.

        Returns:
            ``self``, updated as if it had seen both streams.

        Raises:
            ShapeMismatchError: If the widths differ.
        """
        self._check_mergeable(other)
        if other.n_samples == 0 and other.d is None:
            return self
        if self.d is None:
            self._allocate(other.d, self.device or other.device)  # type: ignore[arg-type]
        self._merge_state(other)
        self.n_samples += other.n_samples
        self.n_skipped += other.n_skipped
        return self

    def _require_samples(self) -> None:
        if self.n_samples == 0:
            raise EmptyStatisticsError(
                f"{type(self).__name__} has seen no samples yet. Run the model inside "
                "`with dh.collect(model, sites) as run:` (or call .update(x)) before asking "
                "for statistics."
            )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors that fully describe the accumulator (for safetensors)."""
        state = {
            "n_samples": torch.tensor(self.n_samples, dtype=torch.int64),
            "n_skipped": torch.tensor(self.n_skipped, dtype=torch.int64),
        }
        if self.d is not None:
            for name in self._tensor_fields:
                state[name] = getattr(self, "_" + name).detach().clone()
        return state

    def load_state_dict(self: _A, state: dict[str, torch.Tensor]) -> _A:
        """Restore from :meth:`state_dict`; validates field names and shapes."""
        missing = {"n_samples", "n_skipped"} - set(state)
        if missing:
            raise ShapeMismatchError(f"State dict is missing {sorted(missing)}.")
        present = [f for f in self._tensor_fields if f in state]
        if present and len(present) != len(self._tensor_fields):
            raise ShapeMismatchError(
                f"State dict has {present} but needs all of {list(self._tensor_fields)}."
            )
        if present:
            d = state[self._tensor_fields[-1]].shape[-1]
            self._allocate(d, self.device or state[present[0]].device)
            for name in self._tensor_fields:
                target = getattr(self, "_" + name)
                if state[name].shape != target.shape:
                    raise ShapeMismatchError(
                        f"State field {name!r} has shape {tuple(state[name].shape)}, "
                        f"expected {tuple(target.shape)}."
                    )
                target.copy_(state[name])
        self.n_samples = int(state["n_samples"])
        self.n_skipped = int(state["n_skipped"])
        return self

    def to(self: _A, device: torch.device | str) -> _A:
        """Move the statistics to ``device`` in place; returns ``self``."""
        self.device = torch.device(device)
        if self.d is not None:
            for name in self._tensor_fields:
                setattr(self, "_" + name, getattr(self, "_" + name).to(self.device))
        return self

    def copy(self: _A) -> _A:
        """An independent copy."""
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        if self.d is not None:
            for name in self._tensor_fields:
                setattr(new, "_" + name, getattr(self, "_" + name).clone())
        return new

    def __repr__(self) -> str:
        return f"{type(self).__name__}(d_site={self.d}, n_samples={self.n_samples})"


def _rows_of(
    values: torch.Tensor | None,
    x: torch.Tensor,
    what: str,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """Flatten per-sample ``weights``/``mask`` to match the rows of ``x``."""
    if values is None:
        return None
    values = torch.as_tensor(values)
    expected = x.shape[:-1] if x.ndim > 1 else (1,)
    if tuple(values.shape) != tuple(expected):
        raise ShapeMismatchError(
            f"{what} has shape {tuple(values.shape)}, but the activations have leading "
            f"shape {tuple(expected)} (activations {tuple(x.shape)}). Give one {what[:-1]} "
            "value per sample."
        )
    return values.reshape(-1).to(device=device, dtype=dtype)
