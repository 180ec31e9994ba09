"""Streaming float64 statistics of vectors: covariance, second moment, co-firing counts.

The interaction basis (Bushnaq et al. 2024, arXiv 2405.10928) is built from a few matrices
averaged over a dataset: the activation mean and (centred) Gram matrix, the Gram matrix of
Jacobians, and for ReLU layers the co-firing matrix. These accumulators stream them batch by
batch in O(d^2) memory, whatever the number of samples, and merge exactly, so shards, processes
and days of data combine into the single-pass result.

Numerics: :class:`Covariance` keeps the mean and the *centred* scatter matrix and combines
batches with the Chan et al. parallel update, never ``E[x x^T] - mu mu^T`` (which cancels
catastrophically when the mean is large against the spread). Everything is held in float64 by
default on the device of the first batch (a GPU stays a GPU).

Faults: every method that changes an accumulator validates all its arguments first and, when
it refuses, leaves the state exactly as before. A finite batch whose statistics would overflow
the dtype (values near 1e154 in float64, whose squares pass the range) is refused under
``nonfinite="raise"``; ``nonfinite="skip"`` drops the rows holding NaN/inf and the rows whose
own contribution overflows, counting them in ``n_skipped``, and still refuses a batch whose
remaining rows overflow together (dropping rows cannot help there). A width whose ``(d, d)``
statistics cannot fit in memory is refused before anything is allocated.
"""

from __future__ import annotations

from typing import Any

import torch

from ._accumulator import _Accumulator, _limit, _Unclean
from ._arguments import _real, check_count
from ._cofiring import CoFiring
from ._errors import EmptyStatisticsError, NonFiniteError, ShapeMismatchError

__all__ = ["CoFiring", "Covariance", "SecondMoment"]


class Covariance(_Accumulator):
    """Streaming mean, centred covariance and uncentred second moment of vectors.

    Rows may carry non-negative weights (``weights``) or be dropped by a boolean ``mask``
    (padding tokens). Batches combine with the Chan et al. pairwise update, so any split of
    a stream merges to the single-pass result up to rounding.

    Args:
        d: Width of the vectors; inferred from the first batch when ``None``.
        dtype: Accumulation dtype (float64 unless you know better).
        device: Where the statistics live; the first batch's device when ``None``.
        nonfinite: ``"raise"`` (default) refuses a batch holding NaN/inf, or one whose
            statistics overflow, and keeps the previous state; ``"skip"`` drops rows holding
            NaN/inf and rows whose own ``w |x|^2`` overflows, counting them in ``n_skipped``
            (a batch whose remaining rows still overflow together is refused).

    Raises:
        StatisticsTooLargeError: (a ``MemoryError``) If ``d`` is given and its statistics
            cannot fit in memory.

    Examples:
        >>> import torch
        >>> x = torch.randn(100, 3, dtype=torch.float64)
        >>> acc = Covariance().update(x[:40]).update(x[40:])
        >>> torch.allclose(acc.cov(), torch.cov(x.T, correction=0))
        True
    """

    _tensor_fields = ("weight_sum", "mean", "m2")
    _nonnegative_fields = ("weight_sum",)

    def _field_shapes(self, d: int) -> dict[str, tuple[int, ...]]:
        return {"weight_sum": (), "mean": (d,), "m2": (d, d)}

    def update(
        self,
        x: torch.Tensor,
        weights: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> Covariance:
        """Add a batch of vectors.

        Args:
            x: Vectors, shape ``(..., d)``; leading dimensions are flattened into samples.
            weights: Optional non-negative weight per sample, shape ``x.shape[:-1]``.
            mask: Optional boolean (or 0/1), shape ``x.shape[:-1]``; ``False`` rows are
                ignored.

        Returns:
            ``self``.

        Raises:
            NonFiniteError: If ``x`` (or ``weights``) holds NaN/inf, or the statistics would
                overflow, under ``nonfinite="raise"``; under ``"skip"`` only when the rows
                left after dropping still overflow. The state is left exactly as before.
            ShapeMismatchError: If the width differs from earlier batches, or ``weights`` /
                ``mask`` do not match the leading shape of ``x``.
            ValueError: If a weight is negative or a mask value is not 0/1.
            TypeError: If ``x``, ``weights`` or ``mask`` is not real.
            StatisticsTooLargeError: (a ``MemoryError``) On a first batch whose width cannot
                fit in memory.
        """

        def fresh() -> tuple[torch.Tensor, torch.Tensor | None]:
            return self._rows_and_weights(x, weights, mask, "activations")

        self._feed(fresh, "Covariance.update", source=x)
        return self

    def _accumulate(
        self,
        rows: torch.Tensor,
        w: torch.Tensor | None,
        *,
        n_rows: int,
        n_skipped: int,
        source: torch.Tensor,
        first: bool = False,
    ) -> None:
        n = rows.shape[0]
        if n == 0:
            self._ensure_allocated(rows)
            self.n_skipped += n_skipped
            return
        # A NaN/inf entry makes its column sum non-finite (IEEE sums propagate it), and so
        # the mean, the plan's trace and its check below: no separate isfinite pass.
        column_sum = rows.sum(dim=0)
        if w is None:
            weight = torch.tensor(float(n), dtype=self.dtype, device=rows.device)
            mean_b = column_sum / n
        else:
            weight = w.sum()
            if not bool(torch.isfinite(column_sum).all() & torch.isfinite(weight)):
                raise _Unclean
            if float(weight) == 0.0:
                self._ensure_allocated(rows)
                self.n_samples += n
                self.n_skipped += n_skipped
                return
            mean_b = (w @ rows) / weight
        # Centre in place when `rows` is our own copy (a dtype/device cast, a mask or a
        # dropped row made one): a second (n, d) buffer costs as much as the Gram product
        # itself in fresh-page faults. Never when it is a view of the caller's tensor, and
        # only on the first try (a retry needs the rows as they were).
        owned = first and rows.untyped_storage().data_ptr() != source.untyped_storage().data_ptr()
        centred = rows.sub_(mean_b) if owned else rows - mean_b
        if w is None:
            left = centred
            # One O(n d) reduction (the Frobenius norm) bounds every entry of the scatter.
            trace_b = torch.linalg.vector_norm(centred).square()
        else:
            left = centred * w[:, None]
            trace_b = (left * centred).sum()
        plan = self._plan_combine(weight, mean_b, trace_b)
        self._ensure_allocated(rows)
        # The batch's scatter goes straight into the running one (GEMM with beta=1): a
        # separate (d, d) product plus the Chan terms would allocate and sweep d^2 buffers
        # several times, which at d = 3072 costs as much as the product itself.
        self._m2.addmm_(left.T, centred)
        self._apply_combine(*plan)
        self.n_samples += n
        self.n_skipped += n_skipped

    def _plan_combine(
        self, weight: torch.Tensor, mean_b: torch.Tensor, trace_b: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # Chan et al. (1979): exact pairwise combination of centred moments,
        # m2 = m2_a + m2_b + (w_a w_b / (w_a + w_b)) delta delta^T. Computed without
        # touching the state, and refused (_Unclean) when the result would not be finite:
        # every matrix is PSD, so a bounded trace bounds each entry (one device sync).
        if self.d is None:
            weight_a = torch.zeros((), dtype=self.dtype, device=mean_b.device)
            mean_a = torch.zeros_like(mean_b)
            trace_a: torch.Tensor | float = 0.0
        else:
            weight_a, mean_a, trace_a = self._weight_sum, self._mean, self._m2.diagonal().sum()
        total = weight_a + weight
        delta = mean_b - mean_a
        ratio = weight / total
        coefficient = weight_a * ratio
        limit = _limit(self.dtype)
        # A NaN/inf in the batch's mean makes delta @ delta NaN/inf, and so the trace (also
        # when the coefficient is 0): the new mean, a convex combination, needs no check.
        trace = trace_a + trace_b + coefficient * (delta @ delta)
        ok = (trace <= limit) & (total <= limit)
        if not bool(ok):
            raise _Unclean
        return total, delta, ratio, coefficient

    def _apply_combine(
        self,
        total: torch.Tensor,
        delta: torch.Tensor,
        ratio: torch.Tensor,
        coefficient: torch.Tensor,
    ) -> None:
        # addr_ adds the rank-one term in one pass; the coefficient scales the (d,) vector,
        # not the (d, d) matrix, and stays a tensor (no device sync).
        self._m2.addr_(delta * coefficient, delta)
        self._mean += delta * ratio
        self._weight_sum = total

    def _plan_merge(self, other: Covariance) -> Any:
        if float(other._weight_sum) == 0:
            return None
        dev = self.device or other.device
        weight, mean_b, m2_b = (
            t.to(dev, self.dtype) for t in (other._weight_sum, other._mean, other._m2)
        )
        return m2_b, self._plan_combine(weight, mean_b, m2_b.diagonal().sum())

    def _apply_merge(self, other: Covariance, plan: Any) -> None:
        if plan is not None:
            m2_b, combine = plan
            self._m2 += m2_b
            self._apply_combine(*combine)

    @property
    def weight_sum(self) -> float:
        """Total weight seen (equals ``n_samples`` without weights)."""
        return 0.0 if self.d is None else float(self._weight_sum)

    def mean(self) -> torch.Tensor:
        """Mean vector, shape ``(d,)``."""
        self._require_weight()
        return self._mean.clone()

    def cov(self, correction: int = 0) -> torch.Tensor:
        """Centred covariance, shape ``(d, d)``.

        Args:
            correction: ``0`` (default) gives the population covariance
                ``E[(x - mu)(x - mu)^T]``, the normalisation used throughout the interaction
                basis; ``1`` gives the unbiased sample covariance (``torch.cov``'s default).
        """
        self._require_weight()
        denominator = self._weight_sum - correction
        if float(denominator) <= 0:
            raise EmptyStatisticsError(
                f"Covariance with correction={correction} needs more than {correction} "
                f"samples; have weight {self.weight_sum}."
            )
        return self._m2 / denominator

    def second_moment(self) -> torch.Tensor:
        """Uncentred second moment ``E[x x^T]``, shape ``(d, d)``."""
        self._require_weight()
        return self._m2 / self._weight_sum + torch.outer(self._mean, self._mean)

    def _require_weight(self) -> None:
        self._require_samples()
        if self.weight_sum == 0:
            raise EmptyStatisticsError(
                f"{self!r} has seen {self.n_samples} samples, all with weight 0 or masked."
            )


class SecondMoment(_Accumulator):
    """Streaming uncentred second moment ``(1/N) sum_r w_r x_r x_r^T``.

    Used for Jacobian Grams, where every sample contributes several probe gradients: pass
    all of them as rows and say how many samples they stand for with ``count``.

    Examples:
        >>> import torch
        >>> g = torch.randn(6, 4, dtype=torch.float64)   # 2 probes x 3 samples
        >>> acc = SecondMoment().update(g, count=3)
        >>> torch.allclose(acc.second_moment(), g.T @ g / 3)
        True
    """

    _tensor_fields = ("count", "sum")
    _nonnegative_fields = ("count",)

    def _field_shapes(self, d: int) -> dict[str, tuple[int, ...]]:
        return {"count": (), "sum": (d, d)}

    def update(
        self,
        x: torch.Tensor,
        weights: torch.Tensor | None = None,
        *,
        count: float | None = None,
    ) -> SecondMoment:
        """Add ``sum_r w_r x_r x_r^T`` over the rows of ``x`` (shape ``(..., d)``).

        Args:
            x: Vectors, shape ``(..., d)``.
            weights: Optional non-negative weight per row.
            count: Number of samples the rows stand for (the normaliser): finite and
                non-negative, a fraction allowed; defaults to the weight sum, or the number
                of rows. Under ``nonfinite="skip"`` each dropped row takes its share
                ``count / n_rows`` with it, so the estimate stays a mean over clean rows.

        Returns:
            ``self``.

        Raises:
            NonFiniteError: If ``x`` (or ``weights``) holds NaN/inf, or the sum would
                overflow, under ``nonfinite="raise"``; under ``"skip"`` only when the rows
                left after dropping still overflow. The state is left exactly as before.
            ShapeMismatchError: If the width differs from earlier batches or ``weights`` do
                not match the leading shape of ``x``.
            ValueError: If a weight is negative, or ``count`` is NaN, infinite or negative.
            TypeError: If ``count`` is not a real number, or ``x``/``weights`` not real.
            StatisticsTooLargeError: (a ``MemoryError``) On a first batch whose width cannot
                fit in memory.
        """
        if count is not None:
            count = check_count(count)

        def fresh() -> tuple[torch.Tensor, torch.Tensor | None]:
            return self._rows_and_weights(x, weights, None, "vectors")

        self._feed(fresh, "SecondMoment.update", count=count)
        return self

    def _accumulate(
        self,
        rows: torch.Tensor,
        w: torch.Tensor | None,
        *,
        n_rows: int,
        n_skipped: int,
        count: float | None,
        first: bool = False,
    ) -> None:
        n = rows.shape[0]
        if w is None:
            scaled = rows
            # The Frobenius norm, one O(n d) reduction, bounds every entry of the sum (and is
            # NaN/inf when a row is): the only check of a clean batch.
            trace_b = torch.linalg.vector_norm(rows).square()
        else:
            scaled = rows * w[:, None]
            trace_b = (scaled * rows).sum()
        if count is None:
            count_b: torch.Tensor | float = float(n) if w is None else w.sum()
        else:
            # A dropped row takes its share of the samples with it.
            count_b = count if n == n_rows else count * n / n_rows
        trace_a = self._sum.diagonal().sum() if self.d is not None else 0.0
        count_a = self._count if self.d is not None else 0.0
        limit = _limit(self.dtype)
        ok = (trace_a + trace_b <= limit) & torch.as_tensor(count_a + count_b <= limit)
        if not bool(ok):
            raise _Unclean
        self._ensure_allocated(rows)
        if n:
            self._sum.addmm_(scaled.T, rows)
        count_b = float(count_b)
        self._count += count_b
        self.n_samples += round(count_b)
        self.n_skipped += n_skipped

    @classmethod
    def from_matrix(cls, matrix: torch.Tensor, count: float) -> SecondMoment:
        """An accumulator holding a known second moment ``matrix`` over ``count`` samples.

        Used for Jacobian Grams computed in closed form, so they merge like streamed ones.

        Args:
            matrix: The second moment ``E[x x^T]``, shape ``(d, d)``.
            count: The samples it averages over (finite, non-negative).

        Returns:
            A new accumulator.

        Raises:
            ShapeMismatchError: If ``matrix`` is not square.
            NonFiniteError: If ``matrix * count`` holds NaN/inf.
        """
        matrix = _real(matrix, "matrix")
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ShapeMismatchError(
                f"SecondMoment.from_matrix needs a square (d, d) matrix, got shape "
                f"{tuple(matrix.shape)}."
            )
        count = check_count(count)
        acc = cls(matrix.shape[0], device=matrix.device)
        total = matrix.to(acc.dtype) * count
        n_bad = int((~torch.isfinite(total)).sum())
        if n_bad:
            raise NonFiniteError(
                f"SecondMoment.from_matrix: matrix * count holds {n_bad} NaN/inf values "
                f"(largest |entry| {float(matrix.abs().max()):.3g}, count {count:g})."
            )
        acc._sum += total
        acc._count += count
        acc.n_samples = int(count)
        return acc

    def _plan_merge(self, other: SecondMoment) -> None:
        trace_a = self._sum.diagonal().sum() if self.d is not None else 0.0
        count_a = self._count if self.d is not None else 0.0
        trace = trace_a + other._sum.diagonal().sum().to(self.device or other.device)
        count = count_a + other._count.to(self.device or other.device)
        limit = _limit(self.dtype)
        if not bool((trace <= limit) & (count <= limit)):
            raise _Unclean

    def _apply_merge(self, other: SecondMoment, plan: Any) -> None:
        self._sum += other._sum.to(self.device)
        self._count += other._count.to(self.device)

    @property
    def count(self) -> float:
        """The normaliser: total samples the accumulated rows stand for."""
        return 0.0 if self.d is None else float(self._count)

    def second_moment(self) -> torch.Tensor:
        """``(1/N) sum x x^T``, shape ``(d, d)``."""
        self._require_samples()
        return self._sum / self._count
