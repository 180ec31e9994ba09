"""Losses the LLC sampler explores: behavioural (MSE or KL to the trained outputs) or task."""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import Any

import torch.nn.functional as F
from torch import Tensor

__all__ = ["LLCLoss", "LossFn", "OutputKind", "make_loss"]

LossFn = Callable[[Tensor, Any, Tensor], Tensor]
"""``loss(outputs, batch, reference_outputs) -> scalar``: a custom loss for the sampler."""


class LLCLoss(str, Enum):
    """Which loss the sampler explores (``"behavioural"`` or ``LLCLoss.BEHAVIOURAL``)."""

    BEHAVIOURAL = "behavioural"
    TASK = "task"


class OutputKind(str, Enum):
    """How the behavioural loss reads the outputs: regression values or class logits."""

    REGRESSION = "regression"
    LOGITS = "logits"


def make_loss(
    loss: str | LLCLoss | LossFn,
    output_kind: str | OutputKind,
    task_loss: Callable[[Tensor, Tensor], Tensor] | None,
) -> LossFn:
    """Turn the ``loss`` / ``output_kind`` / ``task_loss`` settings into one ``LossFn``."""
    if not isinstance(loss, str):
        return loss
    if LLCLoss(loss) is LLCLoss.BEHAVIOURAL:
        is_regression = OutputKind(output_kind) is OutputKind.REGRESSION
        return squared_error if is_regression else kl_divergence
    criterion = task_loss or cross_entropy

    def task(outputs: Tensor, batch: Any, reference: Tensor) -> Tensor:
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
            raise TypeError(
                f'loss="task" needs (inputs, targets) batches, got {type(batch).__name__}. '
                "Pass loss=callable(outputs, batch, reference_outputs) for other layouts."
            )
        return criterion(outputs, batch[1])

    return task


def squared_error(outputs: Tensor, batch: Any, reference: Tensor) -> Tensor:
    """Squared error summed over the last (feature) axis and averaged over the others."""
    squared = (outputs - reference).square()
    return squared.mean() if squared.ndim <= 1 else squared.sum(-1).mean()


def kl_divergence(outputs: Tensor, batch: Any, reference: Tensor) -> Tensor:
    """KL(trained ‖ sampled) over the last (class) axis, averaged over the others."""
    log_sampled = F.log_softmax(outputs, dim=-1)
    log_trained = F.log_softmax(reference, dim=-1)
    kl = F.kl_div(log_sampled, log_trained, log_target=True, reduction="none")
    return kl.sum(-1).mean()


def cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy of logits (last axis) with class indices or class probabilities."""
    if targets.shape == outputs.shape:
        return F.cross_entropy(outputs.flatten(0, -2), targets.flatten(0, -2))
    return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))
