"""All-or-nothing batches: a journal of the statistics a batch has touched.

A batch reaches many sites one hook at a time, and its Jacobians arrive later, in
``run.backward``. When anything fails part-way (a non-finite value at a later site, an
exception in a ``derivatives=`` callable or in the model itself, a failed backward), the
statistics must equal those before the batch, at every site. Before a batch first changes a
site, the journal keeps a copy of that site's statistics (O(d^2), the size of the statistics
themselves); a commit drops the copies, a rollback restores them in place, so references the
user holds to ``run.stats[site]`` and its accumulators stay valid.
"""

from __future__ import annotations

from typing import Any

from .statistics import SiteStatistics, Statistics

__all__ = ["Journal"]


class Journal:
    """Copies of the statistics touched since the last commit, to restore on failure."""

    def __init__(self, stats: Statistics) -> None:
        self._stats = stats
        self._saved: dict[str, SiteStatistics] = {}
        self._metadata: dict[str, Any] | None = None

    @property
    def is_open(self) -> bool:
        """Whether some statistics changed since the last commit."""
        return bool(self._saved) or self._metadata is not None

    def touch(self, key: str) -> None:
        """Call before changing site ``key``: keeps its state from before the batch."""
        if key not in self._saved:
            self._saved[key] = self._stats[key].copy()
        if self._metadata is None:
            self._metadata = dict(self._stats.metadata)

    def commit(self) -> None:
        """The batch succeeded: forget the copies."""
        self._saved.clear()
        self._metadata = None

    def rollback(self) -> None:
        """The batch failed: restore every touched site (in place) and the metadata."""
        for key, saved in self._saved.items():
            self._stats[key]._assign(saved)
        if self._metadata is not None:
            self._stats.metadata.clear()
            self._stats.metadata.update(self._metadata)
        self.commit()
