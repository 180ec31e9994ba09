"""LLC chains on stacked parameters: all chains of a group advance together, one batch a step.

The sampled parameters live in tensors of shape ``(n_chains, *shape)``, never in the user's
model: they are swapped into its parameter slots for each call (``_swap``; the slots hold
the model's own parameters again afterwards), and ``torch.func.vmap`` evaluates every
chain's loss in one batched forward pass (``vectorize=True``); one ``autograd.grad`` of the
summed losses then gives each chain its own gradient. Each chain draws its noise from its
own ``torch.Generator``, parameter by parameter in ``named_parameters()`` order, so a chain
gets the same noise, and the same trace up to rounding, whether it runs alone or stacked
with others.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import vmap

from .._errors import NonFiniteError
from ._data import batch_size, cycle, default_forward
from ._losses import LossFn
from ._samplers import Sampler
from ._swap import slots, swapped

__all__ = ["ChainRunner", "Diverged", "Traces", "VectorizeError", "stacked_call"]


@dataclass
class Traces:
    """What a group of chains recorded, burn-in included.

    Attributes:
        losses: Batch loss at w_t before step t, shape ``(n_chains, n_steps)``, float64.
        references: Loss at w* on the same batches, shape ``(n_steps,)``, float64.
        max_displacement: Largest |w − w*| over the coordinates at the end, per chain.
    """

    losses: np.ndarray
    references: np.ndarray
    max_displacement: np.ndarray


class Diverged(Exception):
    """A chain diverged; carries the message and the traces up to that step (private)."""

    def __init__(self, message: str, traces: Traces, chains: tuple[int, ...], step: int) -> None:
        super().__init__(message)
        self.traces, self.chains, self.step = traces, chains, step


class VectorizeError(Exception):
    """The model or loss cannot run under ``torch.func.vmap`` (private; we fall back)."""


class ChainRunner:
    """Chains over the parameters ``names`` of ``model``; the others stay at w*.

    Args:
        model: The trained model; only read.
        names: Parameter names to sample (canonical ``named_parameters()`` names).
        forward: ``forward(model, batch) -> outputs``, or ``None`` for ``model(inputs)``.
        loss_fn: ``loss(outputs, batch, reference_outputs) -> scalar``.
        data: Re-iterable batches, cycled through.
        sampler: The update rule (:class:`~degen_hooks.llc.SGLD` or ``RMSPropSGLD``).
        settings: ``step_size``, ``n_beta``, ``gamma`` and ``divergence_factor``.
        check_outputs: Called on the outputs at w* of the first batch (raises if unfit).
    """

    def __init__(
        self,
        model: nn.Module,
        names: list[str],
        forward: Callable[[nn.Module, Any], Any] | None,
        loss_fn: LossFn,
        data: Iterable[Any],
        sampler: Sampler,
        settings: Mapping[str, float],
        check_outputs: Callable[[Tensor, Any], None] | None = None,
    ) -> None:
        params = dict(model.named_parameters())
        self.model, self.forward = model, forward or default_forward
        # w* shares storage with the model's parameters and is only ever read.
        self.anchor = {name: params[name].detach() for name in names}
        param_slots = slots(model, model.named_parameters(remove_duplicate=False))
        self.sampled_slots = [(slot, name) for name in names for slot in param_slots[name]]
        frozen = [
            (slot, params[name].detach())
            for name, group in param_slots.items()
            if name not in self.anchor
            for slot in group
        ]
        # Buffers are cloned, so in-place updates (batch-norm statistics) never reach the model.
        self.buffers = [
            (slot, model.get_buffer(name).detach().clone())
            for name, group in slots(model, model.named_buffers(remove_duplicate=False)).items()
            for slot in group
        ]
        self.fixed = frozen + self.buffers
        self.device = params[names[0]].device
        self.n_params = sum(w.numel() for w in self.anchor.values())
        self.loss_fn, self.data, self.sampler = loss_fn, data, sampler
        self.step_size, self.n_beta = float(settings["step_size"]), float(settings["n_beta"])
        self.gamma, self.divergence_factor = settings["gamma"], settings["divergence_factor"]
        self.check_outputs = check_outputs
        # vmapped over a flat tuple of the stacked tensors only: the batch and reference are
        # read from ``_step_inputs`` (set each step), so vmap walks no nested in_dims.
        self._names = list(names)
        self._step_inputs: tuple[Any, Tensor] | None = None
        self._vectorized_loss = stacked_call(self._loss_of_flat)

    def _loss_of_flat(self, *weights: Tensor) -> Tensor:
        batch, reference = self._step_inputs  # type: ignore[misc]
        return self.loss(dict(zip(self._names, weights, strict=True)), batch, reference)

    def outputs(self, sampled: Mapping[str, Tensor] | None, batch: Any) -> Tensor:
        """Outputs with ``sampled`` swapped in; ``None`` runs the model's own w*."""
        if sampled is None:
            items = self.buffers
        else:
            items = self.fixed + [(slot, sampled[name]) for slot, name in self.sampled_slots]
        with swapped(items):
            out = self.forward(self.model, batch)
        if not isinstance(out, Tensor):
            raise TypeError(
                f"The model returned {type(out).__name__}, not a tensor. Pass forward=, e.g. "
                "forward=lambda model, batch: model(batch)[0] or ...model(**batch).logits."
            )
        return out

    def loss(self, sampled: Mapping[str, Tensor] | None, batch: Any, reference: Tensor) -> Tensor:
        """The batch loss at ``sampled`` (``None``: at w*), checked to be a scalar."""
        outputs = reference if sampled is None else self.outputs(sampled, batch)
        value = self.loss_fn(outputs, batch, reference)
        if not isinstance(value, Tensor) or value.ndim != 0:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(
                f"The loss must return a scalar tensor, got {got}. Reduce it, e.g. with .mean()."
            )
        return value

    def _losses_and_grads(
        self, current: dict[str, Tensor], batch: Any, reference: Tensor, vectorize: bool
    ) -> tuple[Tensor, list[Tensor]]:
        """Each chain's batch loss, shape ``(n_chains,)``, and its gradients."""
        if vectorize:
            self._step_inputs = (batch, reference)
            try:
                losses = self._vectorized_loss(*(current[name] for name in self._names))
            finally:
                self._step_inputs = None
        else:  # a single chain, without vmap: any model runs this way
            losses = self.loss({n: w[0] for n, w in current.items()}, batch, reference)[None]
        # The chains do not interact, so the gradient of the sum is each chain's gradient.
        grads = torch.autograd.grad(
            losses.sum(), list(current.values()), allow_unused=True, materialize_grads=True
        )
        return losses.detach(), list(grads)

    def run(
        self,
        seeds: Sequence[int],
        first_chain: int,
        n_burnin: int,
        n_draws: int,
        vectorize: bool,
        on_step: Callable[[int], Any],
    ) -> Traces:
        """Run ``len(seeds)`` chains together from w*, chain ``first_chain`` first.

        Raises:
            Diverged: If a batch loss is NaN, infinite or exceeds the limit.
            VectorizeError: If ``vectorize`` and the first vmapped step fails.
            NonFiniteError: If the loss at w* itself is not finite.
        """
        n_chains, n_steps = len(seeds), n_burnin + n_draws
        generators = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]
        current = {
            name: w.unsqueeze(0).repeat(n_chains, *([1] * w.ndim)).requires_grad_(True)
            for name, w in self.anchor.items()
        }
        state = self.sampler.init_state(current)
        noise = {name: torch.empty_like(w) for name, w in current.items()}
        noise_views = [buffer.unbind() for buffer in noise.values()]
        batches = cycle(self.data, self.device)
        # At equilibrium a regular model's loss sits n_params/(2nβ) above L(w*).
        regular_increase = self.n_params / (2 * self.n_beta)
        losses = np.full((n_chains, n_steps), np.nan)
        references = np.full(n_steps, np.nan)
        for step in range(n_steps):
            batch = next(batches)
            with torch.no_grad():
                reference = self.outputs(None, batch)
                if step == 0 and self.check_outputs is not None:
                    self.check_outputs(reference, batch)
                reference_loss = float(self.loss(None, batch, reference))
            if not math.isfinite(reference_loss):
                raise NonFiniteError(
                    f"The loss at the trained parameters w* is {reference_loss} on a batch of "
                    f"{batch_size(batch)} samples. Check the model and data for NaN or inf."
                )
            try:
                values, grads = self._losses_and_grads(current, batch, reference, vectorize)
            except RuntimeError as err:
                if vectorize and step == 0:
                    raise VectorizeError(f"{type(err).__name__}: {err}") from err
                raise
            references[step] = reference_loss
            losses[:, step] = values.double().cpu().numpy()
            limit = reference_loss + self.divergence_factor * max(
                abs(reference_loss), regular_increase
            )
            diverged = np.flatnonzero(~(losses[:, step] <= limit))  # NaN included
            if diverged.size:
                chains = tuple(first_chain + int(c) for c in diverged)
                loss = float(losses[diverged[0], step])
                raise Diverged(
                    self._divergence_message(chains, step, n_burnin, loss, limit),
                    Traces(losses[:, : step + 1], references[: step + 1], np.zeros(0)),
                    chains,
                    step,
                )
            for views in noise_views:  # parameter by parameter, as one chain would
                for view, generator in zip(views, generators, strict=True):
                    view.normal_(generator=generator)  # the values torch.randn would draw
            self.sampler.step(
                current,
                dict(zip(current, grads, strict=True)),
                self.anchor,
                noise,
                state,
                step_size=self.step_size,
                n_beta=self.n_beta,
                gamma=self.gamma,
                burnin=step < n_burnin,
            )
            on_step(n_chains)
        with torch.no_grad():
            displacement = torch.stack(
                [(w - self.anchor[n]).abs().flatten(1).amax(1) for n, w in current.items()]
            ).amax(0)
        return Traces(losses, references, displacement.double().cpu().numpy())

    def mean_loss_at_anchor(self, n_batches: int) -> float:
        """Mean batch loss at w* over the first ``n_batches`` batches (fewer if data is short).

        devinterp's ``init_loss`` (``get_init_loss_multi_batch(loader, num_chains, ...)``).
        """
        values = []
        with torch.no_grad():
            for index, batch in enumerate(cycle(self.data, self.device)):
                if index >= n_batches or (index and _is_new_pass(self.data, index)):
                    break
                reference = self.outputs(None, batch)
                values.append(float(self.loss(None, batch, reference)))
        return float(np.mean(values))

    def _divergence_message(
        self, chains: tuple[int, ...], step: int, n_burnin: int, loss: float, limit: float
    ) -> str:
        where = f"draw {step - n_burnin}" if step >= n_burnin else f"burn-in step {step}"
        others = f" (chains {', '.join(map(str, chains[1:]))} too)" if len(chains) > 1 else ""
        return (
            f"{self.sampler.name.upper()} chain {chains[0]} diverged at {where}: batch loss "
            f"{loss:.4g}{others}, against a limit of {limit:.4g} (the loss at w* plus "
            f"divergence_factor times its scale). Use a smaller step_size (now "
            f"{self.step_size:g}) or a larger "
            f"gamma (now {self.gamma:g}); step_size * n_beta * (loss curvature) must stay well "
            "below 1. The partial result, with its trace plot, is in err.result."
        )


def stacked_call(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``vmap(fn)`` over the leading axis of every argument, for a ``fn`` returning one tensor.

    ``torch.func.vmap`` spends about 90 us a call in Python (flattening and checking its
    arguments and outputs as pytrees) before and after ``fn``: a third of a stacked step of a
    small model. With a flat tuple of tensors in and one tensor out there is nothing to
    flatten, so this enters the vmap level directly (what ``vmap`` does inside, through
    torch's functorch bindings), with the same batching rules and results; where those
    bindings are missing (another torch), it is ``vmap(fn)``.
    """
    try:
        from torch._C._functorch import (
            _add_batch_dim,
            _remove_batch_dim,
            _vmap_decrement_nesting,
            _vmap_increment_nesting,
        )
        from torch._functorch.vmap import lazy_load_decompositions
    except ImportError:  # pragma: no cover - another torch: the public transform
        return vmap(fn)
    lazy_load_decompositions()  # as vmap does on each call: the batching rules' decompositions

    def call(*tensors: Tensor) -> Tensor:
        n = tensors[0].shape[0]
        level = _vmap_increment_nesting(n, "error")  # randomness="error", vmap's default
        try:
            out = fn(*(_add_batch_dim(t, 0, level) for t in tensors))
            if not isinstance(out, Tensor):
                raise TypeError(f"A stacked call must return a tensor, got {type(out).__name__}.")
            return _remove_batch_dim(out, level, n, 0)
        finally:
            _vmap_decrement_nesting()

    return call


def _is_new_pass(data: Iterable[Any], index: int) -> bool:
    """Whether batch ``index`` starts a second pass over ``data`` (when its length is known)."""
    try:
        return index >= len(data)  # type: ignore[arg-type]
    except TypeError:
        return False
