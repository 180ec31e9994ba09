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
"""

from __future__ import annotations

from typing import Any

import torch

from ._accumulator import _Accumulator, _rows_of
from ._checks import as_rows, check_width
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
        nonfinite: ``"raise"`` (default) refuses a batch holding NaN/inf and keeps the
            previous state; ``"skip"`` drops such rows and counts them in ``n_skipped``.

    Examples:
        >>> import torch
        >>> x = torch.randn(100, 3, dtype=torch.float64)
        >>> acc = Covariance().update(x[:40]).update(x[40:])
        >>> torch.allclose(acc.cov(), torch.cov(x.T, correction=0))
        True
    """

    _tensor_fields = ("weight_sum", "mean", "m2")

    def _allocate(self, d: int, device: torch.device) -> None:
        self.d, self.device = d, device
        self._weight_sum = torch.zeros((), dtype=self.dtype, device=device)
        self._mean = torch.zeros(d, dtype=self.dtype, device=device)
        self._m2 = torch.zeros(d, d, dtype=self.dtype, device=device)

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
            mask: Optional boolean, shape ``x.shape[:-1]``; ``False`` rows are ignored.

        Returns:
            ``self``.

        Raises:
            NonFiniteError: If ``x`` holds NaN/inf and ``nonfinite="raise"``; the state is
                left exactly as before.
            ShapeMismatchError: If the width differs from earlier batches, or ``weights`` /
                ``mask`` do not match the leading shape of ``x``.
        """
        rows = self._prepare(x, "activations")
        w = _rows_of(weights, x, "weights", rows.device, self.dtype)
        if mask is not None:
            keep = _rows_of(mask, x, "mask", rows.device, torch.bool)
            rows = rows[keep]
            w = None if w is None else w[keep]
        if w is not None and bool((w < 0).any()):
            raise ValueError("weights must be non-negative; got a negative weight.")
        rows, w = self._drop_nonfinite(rows, w, "Covariance.update")
        self._ensure_allocated(rows)
        n = rows.shape[0]
        if n == 0:
            return self
        # Centre in place when `rows` is our own copy (a dtype/device cast, a mask or a
        # dropped row made one): a second (n, d) buffer costs as much as the Gram product
        # itself in fresh-page faults. Never when it is a view of the caller's tensor.
        owned = rows.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
        if w is None:
            weight = torch.tensor(float(n), dtype=self.dtype, device=rows.device)
            mean_b = rows.mean(dim=0)
            centred = rows.sub_(mean_b) if owned else rows - mean_b
            left = centred
        else:
            weight = w.sum()
            if float(weight) == 0.0:
                self.n_samples += n
                return self
            mean_b = (w @ rows) / weight
            centred = rows.sub_(mean_b) if owned else rows - mean_b
            left = centred * w[:, None]
        # The batch's scatter goes straight into the running one (GEMM with beta=1): a
        # separate (d, d) product plus the Chan terms would allocate and sweep d^2 buffers
        # several times, which at d = 3072 costs as much as the product itself.
        self._m2.addmm_(left.T, centred)
        self._combine(weight, mean_b)
        self.n_samples += n
        return self

    def _combine(
        self, weight: torch.Tensor, mean_b: torch.Tensor, m2_b: torch.Tensor | None = None
    ) -> None:
        # Chan et al. (1979): exact pairwise combination of centred moments,
        # m2 = m2_a + m2_b + (w_a w_b / (w_a + w_b)) delta delta^T. Callers that already
        # added m2_b into self._m2 pass None.
        total = self._weight_sum + weight
        delta = mean_b - self._mean
        ratio = weight / total
        if m2_b is not None:
            self._m2 += m2_b
        # addr_ adds the rank-one term in one pass; the coefficient scales the (d,) vector,
        # not the (d, d) matrix, and stays a tensor (no device sync).
        self._m2.addr_(delta * (self._weight_sum * ratio), delta)
        self._mean += delta * ratio
        self._weight_sum = total

    def _merge_state(self, other: Covariance) -> None:
        if float(other._weight_sum) > 0:
            dev = self.device
            self._combine(other._weight_sum.to(dev), other._mean.to(dev), other._m2.to(dev))

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

    def _allocate(self, d: int, device: torch.device) -> None:
        self.d, self.device = d, device
        self._count = torch.zeros((), dtype=self.dtype, device=device)
        self._sum = torch.zeros(d, d, dtype=self.dtype, device=device)

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
            count: Number of samples the rows stand for (the normaliser); defaults to the
                weight sum, or the number of rows.

        Returns:
            ``self``.
        """
        rows = self._prepare(x, "vectors")
        w = _rows_of(weights, x, "weights", rows.device, self.dtype)
        rows, w = self._drop_nonfinite(rows, w, "SecondMoment.update")
        self._ensure_allocated(rows)
        n = rows.shape[0]
        if count is None:
            count = float(n) if w is None else float(w.sum())
        if n:
            scaled = rows if w is None else rows * w[:, None]
            self._sum += scaled.T @ rows
        self._count += count
        self.n_samples += round(count)
        return self

    @classmethod
    def from_matrix(cls, matrix: torch.Tensor, count: int) -> SecondMoment:
        """An accumulator holding a known second moment ``matrix`` over ``count`` samples.

        Used for Jacobian Grams computed in closed form, so they merge like streamed ones.
        """
        acc = cls(matrix.shape[0], device=matrix.device)
        acc._sum += matrix.to(acc.dtype) * count
        acc._count += count
        acc.n_samples = int(count)
        return acc

    def _merge_state(self, other: SecondMoment) -> None:
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


class CoFiring(_Accumulator):
    """Exact firing counts of neurons and of neuron pairs.

    A neuron *fires* on a sample when its pre-activation exceeds ``threshold``. Counts are
    exact integers held in float64 (exact below 2**53 samples). For ReLU layers
    ``cofiring()`` is ``E[sigma'(z) sigma'(z)^T]``, the statistic of the closed-form Jacobian
    Gram; its zero rows are dead neurons and identical columns synchronized neurons.

    Examples:
        >>> import torch
        >>> z = torch.tensor([[1.0, 2.0, -1.0], [-1.0, -3.0, 2.0]])
        >>> acc = CoFiring().update(z)
        >>> acc.disagreement()[0, 1].item(), acc.disagreement()[0, 2].item()
        (0.0, 1.0)
    """

    _tensor_fields = ("counts", "co")

    def __init__(self, d: int | None = None, *, threshold: float = 0.0, **kwargs: Any) -> None:
        self.threshold = threshold
        super().__init__(d, **kwargs)

    def _allocate(self, d: int, device: torch.device) -> None:
        self.d, self.device = d, device
        self._counts = torch.zeros(d, dtype=self.dtype, device=device)
        self._co = torch.zeros(d, d, dtype=self.dtype, device=device)

    def update(self, z: torch.Tensor, mask: torch.Tensor | None = None) -> CoFiring:
        """Count which neurons fire, given pre-activations ``z`` of shape ``(..., d)``.

        A boolean ``z`` is taken as the firing pattern itself.
        """
        rows = as_rows(z, "pre-activations")
        check_width(self.d, rows.shape[1], "CoFiring: pre-activations")
        if mask is not None:
            rows = rows[_rows_of(mask, z, "mask", rows.device, torch.bool)]
        if rows.dtype != torch.bool:
            bad = int(torch.isnan(rows).any(dim=-1).sum())
            if bad:
                if self.nonfinite == "raise":
                    raise NonFiniteError(
                        f"CoFiring.update: {bad} of {rows.shape[0]} rows hold NaN; the "
                        "counts were not updated. Pass nonfinite='skip' to drop them."
                    )
                self.n_skipped += bad
                rows = rows[~torch.isnan(rows).any(dim=-1)]
            rows = rows > self.threshold
        self._ensure_allocated(rows)
        n = rows.shape[0]
        if n == 0:
            return self
        # 0/1 products are exact in float32 while a chunk has < 2**24 rows; the running
        # sums live in float64. Chunks of 2**16 rows bound the float32 copy's memory.
        chunk = 1 << 16
        for start in range(0, n, chunk):
            part = rows[start : start + chunk].to(device=self.device, dtype=torch.float32)
            self._co += (part.T @ part).to(self.dtype)
            self._counts += part.sum(dim=0).to(self.dtype)
        self.n_samples += n
        return self

    def _check_mergeable(self, other: _Accumulator) -> None:
        super()._check_mergeable(other)
        if other.threshold != self.threshold:  # type: ignore[attr-defined]
            raise ShapeMismatchError(
                f"Cannot merge CoFiring(threshold={other.threshold}) into "  # type: ignore[attr-defined]
                f"CoFiring(threshold={self.threshold}): the counts mean different things. "
                "Collect both with the same firing threshold."
            )

    def _merge_state(self, other: CoFiring) -> None:
        self._co += other._co.to(self.device)
        self._counts += other._counts.to(self.device)

    def counts(self) -> torch.Tensor:
        """How many samples each neuron fired on, shape ``(d,)``."""
        self._require_samples()
        return self._counts.clone()

    def cofire_counts(self) -> torch.Tensor:
        """How many samples each pair fired on together, shape ``(d, d)``."""
        self._require_samples()
        return self._co.clone()

    def firing_rate(self) -> torch.Tensor:
        """Fraction of samples each neuron fired on, shape ``(d,)``."""
        self._require_samples()
        return self._counts / self.n_samples

    def cofiring(self) -> torch.Tensor:
        """``E[1[z_i > t] 1[z_j > t]]``, shape ``(d, d)``."""
        self._require_samples()
        return self._co / self.n_samples

    def disagreement(self) -> torch.Tensor:
        """Fraction of samples on which neurons i and j differ (one fires, one not)."""
        self._require_samples()
        counts = self._counts
        return (counts[:, None] + counts[None, :] - 2 * self._co) / self.n_samples
