"""A model's weights as the closed forms take them: float64 copies, whole when sharded.

Private. Every family adapter reads the weights of the sections it builds through
:func:`float64_copy`, so a sharded model (FSDP2's ``fully_shard``, tensor parallelism: its
parameters are ``DTensor`` shards) gives the same sections as the whole model. Gathering a
shard is a collective: every rank builds the same sections in the same order (``find_sections``
is deterministic), as ``build_bases`` does.
"""

from __future__ import annotations

import torch

__all__ = ["float64_copy"]


def float64_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A detached float64 copy of ``tensor``, gathered whole when it is a ``DTensor``.

    Examples:
        >>> float64_copy(torch.ones(2, dtype=torch.float32)).dtype
        torch.float64
    """
    tensor = tensor.detach()
    gather = getattr(tensor, "full_tensor", None)  # a DTensor (duck-typed: no import)
    if callable(gather):
        tensor = gather()
    return tensor.to(torch.float64).clone()
