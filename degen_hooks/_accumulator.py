"""The shared machinery of the streaming accumulators (:mod:`degen_hooks.accumulators`).

Width, dtype and device bookkeeping, argument validation, the non-finite and overflow policy,
the memory check, exact merging and state dicts: everything an accumulator needs except its
own statistics.

Every method that changes an accumulator validates all of its arguments first and refuses
with the state exactly as before (its ``state_dict``, width and device). A batch is added
optimistically: one cheap check (a column sum and the trace of the resulting matrix, O(n d)
reductions plus O(d) work, no extra pass when the batch is clean) proves it holds no NaN/inf
and that the statistics stay finite; only a batch that fails it is inspected row by row.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch

from ._arguments import _count_field, _mask_rows, _real, _rows_of
from ._checks import as_rows, check_fits_in_memory, check_width, nonfinite_rows
from ._errors import EmptyStatisticsError, NonFiniteError, ShapeMismatchError

_A = TypeVar("_A", bound="_Accumulator")
_NONFINITE_POLICIES = ("raise", "skip")
# Statistics are refused once the trace of a (d, d) matrix would pass max/16 of the dtype. Every
# matrix is positive semi-definite (sums of w x x^T, w >= 0), so |S_ij| <= sqrt(S_ii S_jj) <=
# trace: a bounded trace bounds every entry, with room for rounding and for later sums.
_HEADROOM = 16.0
_NARROWER = (
    "Collect a narrower site, one with fewer features: e.g. blocks.0.attn.hook_z (d_head wide, "
    "per head) rather than a site that concatenates every head; each (d, d) matrix takes "
    "{size} * d^2 bytes."
)


def _limit(dtype: torch.dtype) -> float:
    """The largest trace (and weight sum) an accumulator of ``dtype`` accepts."""
    return torch.finfo(dtype).max / _HEADROOM


def unusable_rows(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows that ``nonfinite="skip"`` drops: NaN/inf, or a square norm that overflows ``dtype``.

    The accumulators drop exactly these, so the statistics kept beside them (co-firing,
    derivative moments) see the same rows.
    """
    rows = rows.to(dtype)
    return nonfinite_rows(rows) | ~((rows * rows).sum(dim=1) <= _limit(dtype))


class _Unclean(Exception):  # noqa: N818 -- internal control flow, never escapes
    """The optimistic update found NaN/inf or an overflow; nothing was changed."""


class _Accumulator:
    """Shared plumbing: width, dtype, device, non-finite policy, state dicts."""

    _tensor_fields: tuple[str, ...] = ()  # the last one is the (d, d) matrix
    _nonnegative_fields: tuple[str, ...] = ()  # fields that count samples or weights

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
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(
                f"dtype must be a floating-point dtype (torch.float64 by default), got {dtype}."
            )
        if d is not None:
            if isinstance(d, bool) or not isinstance(d, numbers.Integral):
                raise TypeError(f"d must be a positive integer (the site's width), got {d!r}.")
            if d < 0:
                raise ValueError(f"d must be a positive integer (the site's width), got {d}.")
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else None
        self.nonfinite = nonfinite
        self.n_samples = 0
        self.n_skipped = 0
        self.d: int | None = None
        if d is not None:
            self._allocate(int(d), self.device or torch.device("cpu"))

    # -- subclasses fill these in ------------------------------------------------------------
    def _field_shapes(self, d: int) -> dict[str, tuple[int, ...]]:
        """Shape of each tensor field (in ``_tensor_fields`` order) at width ``d``."""
        raise NotImplementedError

    def _workspace_bytes(self, d: int) -> int:
        """Temporary bytes an update needs beyond the state, independent of the batch."""
        return 0

    def _plan_merge(self, other: Any) -> Any:
        """Check that merging ``other`` is valid and stays finite; change nothing.

        Raises:
            _Unclean: If the merged statistics would overflow.
        """
        return None

    def _apply_merge(self, other: Any, plan: Any) -> None:
        raise NotImplementedError

    def _accumulate(self, rows: torch.Tensor, w: torch.Tensor | None, **kw: Any) -> None:
        """Add validated rows, or raise :class:`_Unclean` before changing anything."""
        raise NotImplementedError

    # -- memory ---------------------------------------------------------------------------
    def _state_bytes(self, d: int) -> int:
        size = torch.empty((), dtype=self.dtype).element_size()
        return size * sum(math.prod(shape) for shape in self._field_shapes(d).values())

    def _check_fits(self, d: int, device: torch.device) -> None:
        """Raise a MemoryError (before allocating) when width ``d`` cannot fit on ``device``."""
        size = torch.empty((), dtype=self.dtype).element_size()
        check_fits_in_memory(
            self._state_bytes(d) + self._workspace_bytes(d),
            device,
            f"{type(self).__name__}(d_site={d}) with {self.dtype} statistics",
            _NARROWER.format(size=size),
        )

    def _allocate(self, d: int, device: torch.device | str) -> None:
        device = torch.device(device)
        self._check_fits(d, device)
        fields = {
            name: torch.zeros(shape, dtype=self.dtype, device=device)
            for name, shape in self._field_shapes(d).items()
        }
        # Attributes only once every tensor exists: a failed allocation changes nothing.
        for name, tensor in fields.items():
            setattr(self, "_" + name, tensor)
        self.d, self.device = d, device

    def _ensure_allocated(self, rows: torch.Tensor) -> None:
        # Allocated only once a batch has passed validation, so a refused first batch
        # leaves the accumulator exactly as it was.
        if self.d is None:
            self._allocate(rows.shape[1], self.device or rows.device)

    # -- validation -------------------------------------------------------------------------
    def _prepare(self, x: torch.Tensor, what: str, *, cast: bool = True) -> torch.Tensor:
        """Validate a batch and return it as rows (float, on the accumulator's device)."""
        name = type(self).__name__
        rows = as_rows(x, what)
        if rows.is_complex():
            raise TypeError(
                f"{name}: {what} must be real, got dtype {rows.dtype}. Collect x.real, "
                "x.imag or x.abs() instead."
            )
        check_width(self.d, rows.shape[1], f"{name}: {what}")
        if self.d is None:  # before any work on the batch: the state itself must fit
            self._check_fits(rows.shape[1], self.device or rows.device)
        if not cast:
            return rows
        # Detached: statistics never join the caller's autograd graph.
        return rows.detach().to(device=self.device or rows.device, dtype=self.dtype)

    def _rows_and_weights(
        self,
        x: torch.Tensor,
        weights: Any,
        mask: Any,
        what: str,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Validated rows of ``x`` and their weights, with masked rows removed."""
        rows = self._prepare(x, what)
        w = None
        if weights is not None:
            w = _rows_of(_real(weights, "weights"), x, "weights", rows.device, self.dtype)
        if mask is not None:
            keep = _mask_rows(mask, x, rows.device)
            rows = rows[keep]
            w = None if w is None else w[keep]
        if w is not None and w.numel() and bool((w < 0).any()):
            raise ValueError(
                f"weights must be non-negative; got {float(w.min()):g} (the smallest of "
                f"{w.numel()} weights). Give each sample a weight >= 0 (0 ignores it)."
            )
        return rows, w

    def _drop_nonfinite(
        self, rows: torch.Tensor, extra: torch.Tensor | None, what: str
    ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """Rows holding NaN/inf (or a NaN/inf ``extra``): raise, or drop and count them.

        The exact, row-by-row check, run only once the cheap check of an update failed.
        Returns the kept rows and extras and how many rows were dropped; the caller adds
        that to ``n_skipped`` once the batch is accepted.
        """
        bad = nonfinite_rows(rows)
        if extra is not None:
            bad |= ~torch.isfinite(extra)
        n_bad = int(bad.sum())
        if n_bad == 0:
            return rows, extra, 0
        if self.nonfinite == "raise":
            n_values = int((~torch.isfinite(rows)).sum())
            entries = f"{n_values} NaN/inf entries"
            if extra is not None and not bool(torch.isfinite(extra).all()):
                entries += f", {int((~torch.isfinite(extra)).sum())} NaN/inf weights"
            raise NonFiniteError(
                f"{what}: {n_bad} of {rows.shape[0]} rows hold non-finite values "
                f"({entries}). The statistics were not updated. Find the "
                "source (overflow in float16? a bad input?) or pass nonfinite='skip' to drop "
                "such rows and count them in n_skipped."
            )
        keep = ~bad
        return rows[keep], None if extra is None else extra[keep], n_bad

    def _feed(
        self,
        fresh: Callable[[], tuple[torch.Tensor, torch.Tensor | None]],
        what: str,
        **kw: Any,
    ) -> None:
        """Add a batch: the optimistic update, then the exact non-finite/overflow handling.

        ``fresh()`` returns the validated rows and weights; it is called again when the
        optimistic update fails, since that one may centre its rows in place (``first``).

        Policy. ``"raise"``: a row holding NaN/inf, or a finite batch whose statistics
        overflow, is refused. ``"skip"``: rows holding NaN/inf are dropped, then rows whose
        own contribution ``w |x|^2`` overflows the dtype; if what remains still overflows
        (many large rows, or large statistics already held) skipping cannot help and the
        batch is refused. Dropped rows count in ``n_skipped``. A refused batch changes
        nothing, ``n_skipped`` included.
        """
        rows, w = fresh()
        n_rows = rows.shape[0]
        try:
            self._accumulate(rows, w, n_rows=n_rows, n_skipped=0, first=True, **kw)
            return
        except _Unclean:
            pass
        rows, w = fresh()
        rows, w, n_bad = self._drop_nonfinite(rows, w, what)
        if n_bad:
            try:
                self._accumulate(rows, w, n_rows=n_rows, n_skipped=n_bad, **kw)
                return
            except _Unclean:
                pass
        # Finite rows whose statistics overflow.
        own = rows * rows if w is None else (rows * w[:, None]) * rows
        over = ~(own.sum(dim=1) <= _limit(self.dtype))
        n_over = int(over.sum())
        if self.nonfinite == "skip" and n_over:
            keep = ~over
            kept_w = None if w is None else w[keep]
            try:
                self._accumulate(rows[keep], kept_w, n_rows=n_rows, n_skipped=n_bad + n_over, **kw)
                return
            except _Unclean:
                pass
        raise self._overflow_error(what, rows, w, n_over if self.nonfinite == "skip" else None)

    def _overflow_error(
        self, what: str, rows: torch.Tensor, w: torch.Tensor | None, n_dropped: int | None
    ) -> NonFiniteError:
        largest = float(rows.abs().max()) if rows.numel() else 0.0
        values = f"largest |value| {largest:.3g}"
        if w is not None and w.numel():
            values += f", largest weight {float(w.max()):.3g}"
        limit = _limit(self.dtype)
        scale = 10.0 ** max(1, math.ceil(math.log10(max(largest, 1.0))) - 100)
        fix = (
            f"Rescale the data (e.g. divide it by {scale:.0e}; the statistics then scale by "
            "its square) or the model. The statistics were not updated."
        )
        if n_dropped is None:
            return NonFiniteError(
                f"{what}: the batch is finite, but its statistics overflow {self.dtype} "
                f"({values}; a sum of w |x|^2 must stay below {limit:.3g}). {fix} "
                "nonfinite='skip' drops rows whose own w |x|^2 overflows."
            )
        dropped = (
            f"even without the {n_dropped} rows whose own w |x|^2 overflows (dropped under "
            "nonfinite='skip')"
            if n_dropped
            else "though no single row's w |x|^2 does"
        )
        return NonFiniteError(
            f"{what}: the statistics overflow {self.dtype} ({values}; a sum of w |x|^2 must "
            f"stay below {limit:.3g}), {dropped}: the rows together, with the statistics "
            f"already held, overflow, so skipping cannot help. {fix}"
        )

    # -- merging ------------------------------------------------------------------------------
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
            TypeError: If ``other`` is not an accumulator of the same class.
            ShapeMismatchError: If the widths differ.
            NonFiniteError: If the merged statistics would overflow the dtype; ``self`` is
                left exactly as before.
        """
        self._check_mergeable(other)
        if other.d is None:  # an empty accumulator: the identity
            self.n_samples += other.n_samples
            self.n_skipped += other.n_skipped
            return self
        try:
            plan = self._plan_merge(other)
        except _Unclean:
            name = type(self).__name__
            raise NonFiniteError(
                f"Cannot merge {name}(d_site={other.d}, n_samples={other.n_samples}) into "
                f"{name}(d_site={self.d}, n_samples={self.n_samples}): the merged statistics "
                f"would overflow {self.dtype} (a sum of w |x|^2 above "
                f"{_limit(self.dtype):.3g}). Rescale the data before collecting. Neither "
                "accumulator was changed."
            ) from None
        if self.d is None:
            self._allocate(other.d, self.device or other.device)  # type: ignore[arg-type]
        self._apply_merge(other, plan)
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

    # -- state dicts and devices -------------------------------------------------------------
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

    def load_state_dict(self: _A, state: Mapping[str, Any]) -> _A:
        """Restore from :meth:`state_dict`, replacing the current state.

        Args:
            state: A mapping from :meth:`state_dict`: ``n_samples``, ``n_skipped`` and,
                unless the accumulator is empty, every tensor field.

        Returns:
            ``self``.

        Raises:
            TypeError: If ``state`` is not a mapping, or a value is not a real tensor.
            ShapeMismatchError: If fields are missing, unknown or of the wrong shape.
            NonFiniteError: If a field holds NaN/inf.
            ValueError: If a count is negative or not an integer.
            StatisticsTooLargeError: If the state cannot fit in memory.

        Everything is validated before anything changes: on an error the accumulator is
        exactly as before.
        """
        name = type(self).__name__
        if not isinstance(state, Mapping):
            raise TypeError(
                f"{name}.load_state_dict expects a mapping of field names to tensors (from "
                f"state_dict()), got {type(state).__name__}."
            )
        fields = self._tensor_fields
        allowed = ("n_samples", "n_skipped", *fields)
        missing = [k for k in ("n_samples", "n_skipped") if k not in state]
        if missing:
            raise ShapeMismatchError(f"{name} state dict is missing {missing}.")
        unknown = sorted(str(k) for k in state if k not in allowed)
        if unknown:
            raise ShapeMismatchError(
                f"{name} state dict has unknown fields {unknown}; expected {list(allowed)}."
            )
        present = [f for f in fields if f in state]
        if present and len(present) != len(fields):
            raise ShapeMismatchError(
                f"{name} state dict has {present} but needs all of {list(fields)} "
                f"(missing {[f for f in fields if f not in state]})."
            )
        n_samples, n_skipped = _count_field(state, "n_samples"), _count_field(state, "n_skipped")
        if not present:
            if n_samples:
                raise ShapeMismatchError(
                    f"{name} state dict says n_samples={n_samples} but holds none of the "
                    f"statistics {list(fields)}."
                )
            for field in fields:
                self.__dict__.pop("_" + field, None)
            self.d = None
            self.n_samples, self.n_skipped = 0, n_skipped
            return self
        values = {f: _real(state[f], f"State field {f!r}") for f in fields}
        matrix = values[fields[-1]]
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ShapeMismatchError(
                f"State field {fields[-1]!r} has shape {tuple(matrix.shape)}, expected a "
                "square (d, d) matrix."
            )
        d = matrix.shape[0]
        for field, shape in self._field_shapes(d).items():
            if tuple(values[field].shape) != shape:
                raise ShapeMismatchError(
                    f"State field {field!r} has shape {tuple(values[field].shape)}, "
                    f"expected {shape} (d_site={d})."
                )
        for field, value in values.items():
            n_bad = int((~torch.isfinite(value)).sum())
            if n_bad:
                raise NonFiniteError(
                    f"State field {field!r} holds {n_bad} NaN/inf values; the statistics of "
                    "an accumulator never do (a corrupted file?). Nothing was loaded."
                )
        for field in self._nonnegative_fields:
            value = values[field]
            if value.numel() and bool((value < 0).any()):
                raise ValueError(
                    f"State field {field!r} counts samples and must be non-negative, got "
                    f"{float(value.min()):g}. Nothing was loaded."
                )
        device = self.device or matrix.device
        self._check_fits(d, device)
        tensors = {
            f: v.detach().to(device=device, dtype=self.dtype, copy=True) for f, v in values.items()
        }
        for field, tensor in tensors.items():
            setattr(self, "_" + field, tensor)
        self.d, self.device = d, device
        self.n_samples, self.n_skipped = n_samples, n_skipped
        return self

    def to(self: _A, device: torch.device | str) -> _A:
        """Move the statistics to ``device`` in place; returns ``self``.

        Raises:
            StatisticsTooLargeError: If the statistics cannot fit on ``device``; nothing
                moves.
        """
        try:
            target = torch.device(device)
        except (TypeError, RuntimeError) as err:
            raise type(err)(
                f"Cannot move {type(self).__name__} to {device!r}: not a device ({err})."
            ) from err
        if self.d is not None:
            if target != self.device:
                self._check_fits(self.d, target)
            # Every field moved before any is replaced: a failed move changes nothing.
            moved = {f: getattr(self, "_" + f).to(target) for f in self._tensor_fields}
            for field, tensor in moved.items():
                setattr(self, "_" + field, tensor)
        self.device = target
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
