"""Losses the LLC sampler explores: behavioural (MSE or KL to the trained outputs), task, or
the model's own output when that output already is the loss."""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from ._data import batch_size

__all__ = ["LLCLoss", "LossFn", "OutputKind", "check_behavioural_outputs", "make_loss"]

LossFn = Callable[[Tensor, Any, Tensor], Tensor]
"""``loss(outputs, batch, reference_outputs) -> scalar``: a custom loss for the sampler."""


class LLCLoss(str, Enum):
    """Which loss the sampler explores (``"behavioural"`` or ``LLCLoss.BEHAVIOURAL``).

    ``"output"``: the model's output is the loss itself (a single number), as for a module
    that computes its own loss or a potential K(w).
    """

    BEHAVIOURAL = "behavioural"
    TASK = "task"
    OUTPUT = "output"


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
    if LLCLoss(loss) is LLCLoss.OUTPUT:
        return output_loss
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


def output_loss(outputs: Tensor, batch: Any, reference: Tensor) -> Tensor:
    """The output itself, which must be a single number: ``loss="output"``."""
    if outputs.numel() != 1:
        raise ValueError(
            f'loss="output" samples the model\'s output as the loss, so the output must be a '
            f"single number, but it has shape {tuple(outputs.shape)}. Reduce it in the model "
            'or in forward=, or pass loss="behavioural" for per-sample outputs.'
        )
    return outputs.reshape(())


def check_behavioural_outputs(outputs: Tensor, batch: Any) -> None:
    """Refuse a behavioural loss of a single number: it would mean another loss.

    A model whose output is one number for a whole batch is computing a loss K(w). Its
    behavioural loss (K(w) − K(w*))² has another learning coefficient (half of K's, for a
    regular minimum), so the default loss would silently estimate something else.

    Raises:
        ValueError: If ``outputs`` is 0-d, or one number for a batch of several samples.
    """
    try:
        n_samples = batch_size(batch)
    except TypeError:
        n_samples = None
    if outputs.ndim == 0 or (outputs.numel() == 1 and n_samples not in (None, 1)):
        raise ValueError(
            f"The model returned a single number (shape {tuple(outputs.shape)}) for a batch "
            f"of {n_samples} samples: it looks like a loss. The behavioural loss compares "
            "outputs sample by sample and would sample (K(w) - K(w*))^2, whose learning "
            'coefficient is not K\'s. Pass loss="output" to sample the output itself as the '
            "loss (it must be minimal at w*), or make the model return per-sample outputs of "
            "shape (batch, ...)."
        )


def squared_error(outputs: Tensor, batch: Any, reference: Tensor) -> Tensor:
    """Squared error summed over the last (feature) axis and averaged over the others."""
    squared = (outputs - reference).square()
    return squared.mean() if squared.ndim <= 1 else squared.sum(-1).mean()


def kl_divergence(outputs: Tensor, batch: Any, reference: Tensor) -> Tensor:
    """KL(trained ‖ sampled) over the last (class) axis, averaged over the others."""
    log_sampled = F.log_softmax(outputs, dim=-1)
    log_trained = F.log_softmax(reference, dim=-1)
    # F.kl_div's formula, written out: torch.vmap has no batching rule for kl_div.
    kl = log_trained.exp() * (log_trained - log_sampled)
    return kl.sum(-1).mean()


def cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy of logits (last axis) with class indices or class probabilities."""
    if targets.shape == outputs.shape:
        return F.cross_entropy(outputs.flatten(0, -2), targets.flatten(0, -2))
    return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))
