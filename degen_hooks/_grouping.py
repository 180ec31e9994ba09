"""Grouping neurons by their firing patterns: exact classes and complete-linkage clusters.

Both take a matrix of pairwise disagreement counts (Hamming distances between firing
patterns, :meth:`degen_hooks.CoFiring.disagreement` times the sample count) and return one
label per neuron; :class:`degen_hooks.SynchronizedNeurons` turns labels into groups.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["complete_linkage", "identical_rows"]


def identical_rows(disagree: torch.Tensor) -> torch.Tensor:
    """Label each neuron by the first neuron with an identical pattern, shape ``(m,)``.

    Zero Hamming distance is an equivalence relation, so the first zero of each row names
    the class (argmax returns the first maximum).
    """
    if disagree.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64)
    return (disagree == 0).to(torch.uint8).argmax(dim=1).cpu()


def complete_linkage(disagree: torch.Tensor, threshold: float) -> torch.Tensor:
    """Complete-linkage cluster labels on a precomputed distance matrix, shape ``(m,)``."""
    m = disagree.shape[0]
    if m < 2:
        return torch.arange(m)
    from sklearn.cluster import AgglomerativeClustering

    clustering = AgglomerativeClustering(
        n_clusters=None,
        metric="precomputed",
        linkage="complete",
        distance_threshold=threshold,
    )
    labels = clustering.fit_predict(disagree.cpu().numpy().astype(np.float64, copy=False))
    return torch.from_numpy(labels.astype(np.int64))
