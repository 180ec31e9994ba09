"""Localised SGLD on a functional copy of a model's parameters (private to the llc package)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .._errors import DivergenceError, EmptyStatisticsError, NonFiniteError
from ._losses import LossFn

__all__ = ["Chain", "Sampler", "batch_size"]

Chain = tuple[list[float], list[float]]
"""One chain's draws: batch losses at w_t and, on the same batches, at w*."""


class _ForwardAdapter(nn.Module):
    """Wraps ``forward(model, batch)`` so that ``functional_call`` can swap parameters in."""

    def __init__(self, model: nn.Module, forward: Callable[[nn.Module, Any], Tensor]) -> None:
        super().__init__()
        self.model = model
        self.__dict__["forward_fn"] = forward  # a plain attribute, outside the module tree

    def forward(self, batch: Any) -> Any:
        return self.forward_fn(self.model, batch)


class Sampler:
    """SGLD chains over the parameters ``names`` of ``model``; the others stay at w*.

    Args:
        model: The trained model; only read.
        names: Parameter names to sample (canonical ``named_parameters()`` names).
        forward: ``forward(model, batch) -> outputs``, or ``None`` for ``model(inputs)``.
        loss_fn: ``loss(outputs, batch, reference_outputs) -> scalar``.
        data: Re-iterable batches, cycled through.
        n_beta: Inverse temperature nβ.
        divergence_factor: See :func:`~degen_hooks.llc.estimate_llc`.
    """

    def __init__(
        self,
        model: nn.Module,
        names: list[str],
        forward: Callable[[nn.Module, Any], Tensor] | None,
        loss_fn: LossFn,
        data: Iterable[Any],
        n_beta: float,
        divergence_factor: float,
    ) -> None:
        params = dict(model.named_parameters())
        self.adapter = _ForwardAdapter(model, forward or default_forward)
        # w* shares storage with the model's parameters and is only ever read.
        self.anchor = {name: params[name].detach() for name in names}
        # Every alias of a tied tensor is passed explicitly, so functional_call can skip its
        # slow tie detection (tie_weights=False below).
        self.aliases = _aliases(model.named_parameters(remove_duplicate=False))
        self.buffers: dict[str, Tensor] = {}
        for aliases in _aliases(model.named_buffers(remove_duplicate=False)).values():
            # Cloned, so in-place updates (batch-norm statistics) never reach the model.
            clone = model.get_buffer(aliases[0]).detach().clone()
            self.buffers.update({f"model.{alias}": clone for alias in aliases})
        frozen = {n: p.detach() for n, p in params.items() if n not in self.anchor}
        self.fixed = {**self._prefixed(frozen), **self.buffers}
        self.device = params[names[0]].device
        self.n_params = sum(w.numel() for w in self.anchor.values())
        self.loss_fn, self.data = loss_fn, data
        self.n_beta, self.divergence_factor = n_beta, divergence_factor

    def _prefixed(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {f"model.{a}": t for name, t in tensors.items() for a in self.aliases[name]}

    def outputs(self, sampled: Mapping[str, Tensor] | None, batch: Any) -> Tensor:
        """Outputs with ``sampled`` swapped in; ``None`` runs the model's own w*."""
        swapped = self.buffers if sampled is None else {**self.fixed, **self._prefixed(sampled)}
        out = functional_call(self.adapter, swapped, (batch,), tie_weights=False)
        if not isinstance(out, Tensor):
            raise TypeError(
                f"The model returned {type(out).__name__}, not a tensor. Pass forward=, e.g. "
                "forward=lambda model, batch: model(batch)[0] or ...model(**batch).logits."
            )
        return out

    def loss(self, outputs: Tensor, batch: Any, reference: Tensor) -> Tensor:
        value = self.loss_fn(outputs, batch, reference)
        if not isinstance(value, Tensor) or value.ndim != 0:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(
                f"The loss must return a scalar tensor, got {got}. Reduce it, e.g. with .mean()."
            )
        return value

    def run_chain(
        self,
        chain: int,
        seed: int,
        step_size: float,
        gamma: float,
        n_burnin: int,
        n_draws: int,
        on_step: Callable[[int], Any],
    ) -> Chain:
        """Run one chain from w* and return its draws (burn-in steps are dropped).

        Raises:
            DivergenceError: If a batch loss is NaN, infinite or exceeds the limit.
            NonFiniteError: If the loss at w* itself is not finite.
        """
        generator = torch.Generator(device=self.device).manual_seed(seed)
        current = {n: w.clone().requires_grad_(True) for n, w in self.anchor.items()}
        batches = _cycle(self.data, self.device)
        # At equilibrium a regular model's loss sits n_params/(2nβ) above L(w*).
        regular_increase = self.n_params / (2 * self.n_beta)
        trace: list[float] = []
        reference_trace: list[float] = []
        for step in range(n_burnin + n_draws):
            batch = next(batches)
            with torch.no_grad():
                reference = self.outputs(None, batch)
                reference_loss = float(self.loss(reference, batch, reference))
            if not math.isfinite(reference_loss):
                raise NonFiniteError(
                    f"The loss at the trained parameters w* is {reference_loss} on a batch of "
                    f"{batch_size(batch)} samples. Check the model and data for NaN or inf."
                )
            value = self.loss(self.outputs(current, batch), batch, reference)
            grads = torch.autograd.grad(
                value, list(current.values()), allow_unused=True, materialize_grads=True
            )
            loss = float(value.detach())
            scale = max(abs(reference_loss), regular_increase)
            limit = reference_loss + self.divergence_factor * scale
            if not loss <= limit:  # written this way round to catch NaN too
                where = f"draw {step - n_burnin}" if step >= n_burnin else f"burn-in step {step}"
                raise DivergenceError(
                    f"SGLD chain {chain} diverged at {where}: batch loss {loss:.4g}, against "
                    f"{reference_loss:.4g} at w* (limit {limit:.4g}). Use a smaller "
                    f"step_size (now {step_size:g}) or a larger gamma (now {gamma:g}); "
                    "step_size * n_beta * (loss curvature) must stay well below 1."
                )
            if step >= n_burnin:
                trace.append(loss)
                reference_trace.append(reference_loss)
            with torch.no_grad():
                for (name, w), grad in zip(current.items(), grads, strict=True):
                    drift = grad.mul(self.n_beta).add_(w - self.anchor[name], alpha=gamma)
                    noise = torch.randn(
                        w.shape, generator=generator, device=w.device, dtype=w.dtype
                    )
                    w.add_(drift, alpha=-step_size / 2).add_(noise, alpha=math.sqrt(step_size))
            on_step(1)
        return trace, reference_trace


def default_forward(model: nn.Module, batch: Any) -> Any:
    """``model(batch)`` for a tensor, ``model(batch[0])`` for an ``(inputs, ...)`` tuple."""
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)) and batch:
        return model(batch[0])
    raise TypeError(
        f"Cannot feed a batch of type {type(batch).__name__} to the model: batches must be "
        "tensors or (inputs, targets) tuples. Pass forward=, e.g. "
        "forward=lambda model, batch: model(**batch)."
    )


def batch_size(batch: Any) -> int:
    """Number of samples in a batch: the first axis of its first tensor."""
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.ndim else 1
    if isinstance(batch, (tuple, list)) and batch:
        return batch_size(batch[0])
    if isinstance(batch, Mapping) and batch:
        return batch_size(next(iter(batch.values())))
    raise TypeError(
        f"Cannot count the samples in a batch of type {type(batch).__name__}: expected a "
        "tensor, a tuple of tensors or a dict of tensors. Pass n_beta explicitly."
    )


def _aliases(named: Iterable[tuple[str, Tensor]]) -> dict[str, list[str]]:
    """Map the first name of each distinct tensor to all of its names."""
    first: dict[int, str] = {}
    aliases: dict[str, list[str]] = {}
    for name, tensor in named:
        aliases.setdefault(first.setdefault(id(tensor), name), []).append(name)
    return aliases


def _cycle(data: Iterable[Any], device: torch.device) -> Iterator[Any]:
    """Yield the batches of ``data`` on ``device``, starting over at the end."""
    while True:
        is_empty = True
        for batch in data:
            is_empty = False
            yield _to_device(batch, device)
        if is_empty:
            raise EmptyStatisticsError(
                "data yielded no batches when iterated again; pass a re-iterable such as a "
                "list of batches or a DataLoader."
            )


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        moved = [_to_device(b, device) for b in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    if isinstance(batch, Mapping):
        return {key: _to_device(value, device) for key, value in batch.items()}
    return batch
