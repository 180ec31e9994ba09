"""Co-firing counts: which neurons fire together, the statistic of synchronized neurons.

For ReLU layers the co-firing matrix ``E[sigma'(z) sigma'(z)^T]`` is what the closed-form
Jacobian Gram of an MLP section needs, and its zero rows and identical columns are the dead
and synchronized neurons of :class:`~degen_hooks.SynchronizedNeurons` (Bushnaq et al. 2024,
arXiv 2405.10927, the third source of degeneracy). Re-exported by
:mod:`degen_hooks.accumulators`.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from ._accumulator import _Accumulator
from ._arguments import _mask_rows
from ._errors import NonFiniteError, ShapeMismatchError

__all__ = ["CoFiring"]


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

    _nonnegative_fields = ("counts", "co")

    def __init__(self, d: int | None = None, *, threshold: float = 0.0, **kwargs: Any) -> None:
        value = threshold.item() if isinstance(threshold, torch.Tensor) else threshold
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"threshold must be a real number, got {threshold!r}.")
        if math.isnan(value):
            raise ValueError(f"threshold must be a number, got {value}.")
        self.threshold = threshold
        super().__init__(d, **kwargs)

    def _field_shapes(self, d: int) -> dict[str, tuple[int, ...]]:
        return {"counts": (d,), "co": (d, d)}

    def _workspace_bytes(self, d: int) -> int:
        return 4 * d * d  # each chunk's float32 (d, d) product

    def update(self, z: torch.Tensor, mask: torch.Tensor | None = None) -> CoFiring:
        """Count which neurons fire, given pre-activations ``z`` of shape ``(..., d)``.

        A boolean ``z`` is taken as the firing pattern itself.

        Args:
            z: Pre-activations (or a boolean firing pattern), shape ``(..., d)``.
            mask: Optional boolean (or 0/1), shape ``z.shape[:-1]``; ``False`` rows are
                ignored.

        Returns:
            ``self``.

        Raises:
            NonFiniteError: If ``z`` holds NaN under ``nonfinite="raise"`` (``inf`` is a
                valid pre-activation); the counts are left exactly as before.
            ShapeMismatchError: If the width differs from earlier batches, or ``mask`` does
                not match the leading shape of ``z``.
            ValueError: If a mask value is not 0/1.
            TypeError: If ``z`` or ``mask`` is not real.
            StatisticsTooLargeError: (a ``MemoryError``) On a first batch whose width cannot
                fit in memory.
        """
        rows = self._prepare(z, "pre-activations", cast=False)
        if mask is not None:
            rows = rows[_mask_rows(mask, z, rows.device)]
        n_bad = 0
        if rows.dtype != torch.bool:
            nan_rows = torch.isnan(rows).any(dim=-1)
            n_bad = int(nan_rows.sum())
            if n_bad:
                if self.nonfinite == "raise":
                    raise NonFiniteError(
                        f"CoFiring.update: {n_bad} of {rows.shape[0]} rows hold NaN; the "
                        "counts were not updated. Pass nonfinite='skip' to drop them."
                    )
                rows = rows[~nan_rows]
            rows = rows > self.threshold
        self._ensure_allocated(rows)
        n = rows.shape[0]
        # 0/1 products are exact in float32 while a chunk has < 2**24 rows; the running
        # sums live in float64 (add_ casts on the fly: no float64 copy of the product).
        # Chunks of 2**16 rows bound the float32 copy's memory.
        chunk = 1 << 16
        for start in range(0, n, chunk):
            part = rows[start : start + chunk].to(device=self.device, dtype=torch.float32)
            self._co.add_(part.T @ part)
            self._counts.add_(part.sum(dim=0))
        self.n_samples += n
        self.n_skipped += n_bad
        return self

    def _check_mergeable(self, other: _Accumulator) -> None:
        super()._check_mergeable(other)
        if other.threshold != self.threshold:  # type: ignore[attr-defined]
            raise ShapeMismatchError(
                f"Cannot merge CoFiring(threshold={other.threshold}) into "  # type: ignore[attr-defined]
                f"CoFiring(threshold={self.threshold}): the counts mean different things. "
                "Collect both with the same firing threshold."
            )

    def _apply_merge(self, other: CoFiring, plan: Any) -> None:
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
