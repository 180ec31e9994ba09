"""The Jacobian half of a collection: ``run.backward()`` and its checks.

:class:`JacobianPass` is mixed into :class:`~degen_hooks.collect.Collection`. Forward hooks
capture each site's gradient edge; ``backward`` pushes probe vectors from the target back to
every captured edge in batches (:mod:`degen_hooks.jacobians`) and accumulates float64 Grams
of the gradient rows. A failed backward leaves every statistic as it was.

Sharded models (FSDP2's ``fully_shard``, or any model with ``DTensor`` parameters) gather
their weights again in every backward pass, a collective that every rank must run equally
often: ranks that push different numbers of probe chunks (other sequence lengths, masks,
``chunk="auto"`` on other batch sizes) would pair one rank's backward all-gather with
another's forward one, and hang or silently exchange the wrong weights. So the ranks agree
on the number of passes per target first (one all-reduce of an integer), a rank with fewer
chunks pushes zero probes until it matches, and an error in one rank's batch (a non-finite
gradient) is raised only after all of that batch's passes.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from ._checks import nonfinite_rows
from ._errors import DistributedError, GradientError, NonFiniteError
from ._hooks import find_element
from ._plan import auto_chunk
from .accumulators import SecondMoment
from .jacobians import count_probe_vectors, probe_chunks, vjp_batched

__all__ = ["JacobianPass", "first_tensor", "sharding_groups"]

# Chunks of probes per batch from which run.over shows a progress bar within the batch.
_INNER_PROGRESS_CHUNKS = 16


def first_tensor(value: Any) -> torch.Tensor | None:
    """The tensor in a model output: itself, a tuple's first tensor, or ``logits``."""
    return find_element(value)[0]


class JacobianPass:
    """``backward`` and the Jacobian checks of a collection (state lives on the collection)."""

    def backward(self, output: Any = None, *, retain_graph: bool = False) -> None:
        """Push probe vectors from the target back to every site and accumulate Grams.

        Every forward pass since the last call must lead to the target: call it once per
        forward pass (``run.backward(model(x))``). A mask set with :meth:`set_mask` also
        selects the probed positions of a ``(batch, pos, ...)`` model output.

        Args:
            output: The model output of the forward pass since the last call (a tensor, a
                tuple whose first tensor is the output, or an object with ``.logits``).
                Not needed when ``target=`` names a site.
            retain_graph: Keep the autograd graph for a later backward pass of your own.

        A sharded model (FSDP2's ``fully_shard``) works as it is, with any ``chunk``: every
        rank must call ``run.backward`` after each forward pass, as it calls the forward,
        and the ranks agree on the number of backward passes (see the module docstring).
        Each pass gathers the weights it runs through again, so a larger ``chunk`` means
        fewer gathers.

        Raises:
            GradientError: If Jacobians were not requested, no forward pass ran since the
                last call, the forward ran without gradients, the target does not depend on
                a site, or a batched backward cannot run under ``torch.vmap``.
            NonFiniteError: If a gradient is NaN/inf (with ``nonfinite="raise"``); the
                statistics keep their previous values.
            DistributedError: If the ranks of a sharded model could not agree on the number
                of backward passes (another rank raised, died or skipped ``run.backward``).
        """
        if self.jacobians is None:
            raise GradientError(
                "run.backward() needs Jacobian statistics: pass jacobians='exact' (or "
                "'rademacher'/'gaussian') to dh.collect(...)."
            )
        try:
            self._backward(output, retain_graph)
        except BaseException:
            # The batch (its forward passes and this backward) is undone at every site.
            if self._journal is not None:
                self._abort_batch()
            raise
        if self._journal is not None:
            self._journal.commit()

    def _backward(self, output: Any, retain_graph: bool) -> None:
        self._check_grad_enabled()
        targets = self._targets(output)
        captures, self._captures = self._captures, {}
        self._target_captures = []
        if not captures:
            raise GradientError(
                "run.backward() found no activations captured since the last call. Run the "
                "model inside the `with dh.collect(...)` block first."
            )
        edges = [(key, item) for key, items in captures.items() for item in items]
        # One generator per backward call, seeded from (seed, calls so far): a collection
        # resumed from a checkpoint draws the same probes as an uninterrupted one.
        n_calls = int(self.stats.metadata.get("n_backward_calls", 0))
        self._generator = None
        if self.seed is not None:
            device = targets[0][0].device
            self._generator = torch.Generator(device=device).manual_seed(
                self.seed * 1_000_003 + n_calls
            )
        sums: dict[str, torch.Tensor] = {}
        # Per captured edge: gradient rows dropped as non-finite, and probes pushed to it.
        skipped = [0] * len(edges)
        n_probes = [0] * len(edges)
        # An edge of a batch without rows at its site (empty, or padding only) needs none.
        reached = [item[3] == 0 for _, item in edges]
        # A sharded model's ranks run every backward pass together; an error of this rank's
        # batch waits until the others have their passes (see the module docstring).
        groups = sharding_groups(self.model)
        deferred: Exception | None = None
        if self.readout is not None and self.readout.shape[1] == 0:
            # Nothing to probe (the next site's basis kept no feature): every site's Gram is
            # zero over its samples, not unreached.
            reached = [True] * len(edges)
        for t_index, (y, y_mask) in enumerate(targets):
            chunk = self._chunk_for(y, edges)
            n_chunks = math.ceil(count_probe_vectors(**self._probe_arguments(y, y_mask)) / chunk)
            chunks = ((v, True) for v in self._shown(y, y_mask, chunk, n_chunks))
            if groups:
                chunks = self._aligned(chunks, y, n_chunks, groups)
            for (grad_outputs, counts), is_last in _with_last(chunks):
                last = is_last and t_index == len(targets) - 1
                grads = vjp_batched(
                    y,
                    [item[0] for _, item in edges],
                    grad_outputs,
                    retain_graph=retain_graph or not last,
                )
                if not counts or deferred is not None:
                    continue  # a zero probe that keeps the ranks in step, or a failed batch
                try:
                    self._accumulate(edges, grads, sums, skipped, n_probes, reached)
                except Exception as err:
                    if not groups:
                        raise
                    deferred = err
        if deferred is not None:
            raise deferred
        self._check_reached(edges, reached)
        counts = dict.fromkeys(captures, 0.0)
        n_skipped = dict.fromkeys(captures, 0)
        for index, (key, item) in enumerate(edges):
            # Input positions are samples: normalise by the rows the site contributed. A
            # dropped (non-finite) gradient row stands for 1/n_probes of its sample, so the
            # Gram stays a mean over clean rows (a sample whose every probe row was dropped
            # counts 0), not the clean fraction times it.
            counts[key] += item[3] - skipped[index] / max(n_probes[index], 1)
            n_skipped[key] += skipped[index]
        for key, items in captures.items():
            if not any(item[3] for item in items):
                continue  # no rows since the last call: nothing to add
            if key not in sums:  # no probe vector at all: a zero Gram over the samples
                d = self.stats[key].acts.d
                sums[key] = torch.zeros(d, d, dtype=self.dtype, device=targets[0][0].device)
            if not bool(torch.isfinite(sums[key]).all()):  # the chunks' sum overflowed
                raise NonFiniteError(
                    f"Gradients at site {key!r}: the Jacobian Gram of this batch overflowed "
                    f"{self.dtype} when its probe chunks were added. Rescale the target "
                    "(readout=) or the model. The statistics were not updated."
                )
            partial = SecondMoment(dtype=self.dtype, nonfinite=self.nonfinite)
            count = counts[key]
            partial.load_state_dict(
                {
                    "n_samples": torch.tensor(round(count)),
                    "n_skipped": torch.tensor(n_skipped[key]),
                    "count": torch.tensor(count, dtype=self.dtype, device=sums[key].device),
                    "sum": sums[key],
                }
            )
            self._journal.touch(key)
            self.stats[key].grads.merge(partial)
        self.stats.metadata["n_backward_calls"] = n_calls + 1

    def _accumulate(
        self,
        edges: list[tuple[str, Any]],
        grads: tuple[torch.Tensor | None, ...],
        sums: dict[str, torch.Tensor],
        skipped: list[int],
        n_probes: list[int],
        reached: list[bool],
    ) -> None:
        """Add the Grams of one chunk's gradient rows to ``sums`` (per site key)."""
        for index, ((key, (_, mask, shape, _)), g) in enumerate(zip(edges, grads, strict=True)):
            if g is None:
                continue
            reached[index] = True
            k = g.shape[0]
            flat = g.detach().reshape(k * shape[0], *shape[1:])
            flat_mask = None if mask is None else mask.repeat(k, 1)
            rows = self._site(key).rows(flat, flat_mask).to(self.dtype)
            gram, n_bad = self._gram(key, rows)
            skipped[index] += n_bad
            n_probes[index] += k
            sums[key] = gram if key not in sums else sums[key].add_(gram)

    def _aligned(
        self,
        chunks: Iterator[tuple[torch.Tensor, bool]],
        y: torch.Tensor,
        n_local: int,
        groups: list[Any],
    ) -> Iterator[tuple[torch.Tensor, bool]]:
        """``chunks`` (``n_local`` of them), then zero probes (not counted) up to the most
        chunks of any rank."""
        n_passes = _agree_on_passes(n_local, groups)
        n_pushed = 0
        for item in chunks:
            n_pushed += 1
            yield item
        for _ in range(n_passes - n_pushed):
            yield torch.zeros((1, *y.shape), dtype=y.dtype, device=y.device), False

    def _gram(self, key: str, rows: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``rows^T rows`` (float64) and the number of non-finite rows dropped."""
        gram = rows.T @ rows
        # A NaN/inf row makes the (d, d) Gram non-finite: checking it costs O(d^2), not a
        # pass over every gradient row.
        if bool(torch.isfinite(gram).all()):
            return gram, 0
        bad = nonfinite_rows(rows)
        n_bad = int(bad.sum())
        if n_bad == 0:
            raise NonFiniteError(
                f"Gradients at site {key!r}: the Jacobian Gram overflowed {self.dtype} "
                f"(largest |gradient| {float(rows.abs().max()):.3g}). Rescale the target "
                "(readout=) or the model. The statistics were not updated."
            )
        if self.nonfinite == "raise":
            raise NonFiniteError(
                f"Gradients at site {key!r}: {n_bad} of {rows.shape[0]} gradient rows hold "
                f"NaN/inf ({int((~torch.isfinite(rows)).sum())} entries). The statistics "
                "were not updated (they keep every earlier batch). Find the source (a "
                "backward of sqrt/log at 0? overflow in float16?) or pass nonfinite='skip' "
                "to drop such rows and count them in grads.n_skipped."
            )
        rows = rows[~bad]
        return rows.T @ rows, n_bad

    def _check_reached(self, edges: list[tuple[str, Any]], reached: list[bool]) -> None:
        """Every captured forward pass of every site must lead to a target."""
        if all(reached):
            return
        missed: dict[str, int] = {}
        total: dict[str, int] = {}
        for (key, _), hit in zip(edges, reached, strict=True):
            missed[key] = missed.get(key, 0) + (not hit)
            total[key] = total.get(key, 0) + 1
        never = [key for key in total if missed[key] == total[key]]
        if never:
            raise GradientError(
                f"The Jacobian target does not depend on site(s) {never}: no gradient "
                "reached them. Choose a target downstream of every site (sites must come "
                "before the target in the forward pass). The statistics were not updated."
            )
        detail = ", ".join(f"{k!r}: {n} of {total[k]}" for k, n in missed.items() if n)
        raise GradientError(
            f"Some forward passes since the last run.backward() do not lead to the target "
            f"(passes missed per site: {detail}): each output depends only on its own forward "
            "pass. Call run.backward(output) after every forward pass. The statistics were "
            "not updated."
        )

    def _targets(self, output: Any) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        if self._target_spec is not None:
            if not self._target_captures:
                raise GradientError(
                    f"No activation of the target site {self._target_site.key!r} with "
                    "gradients was seen since the last backward; run the model first."
                )
            return list(self._target_captures)
        y = first_tensor(output)
        if y is None:
            raise GradientError(
                f"run.backward(output) needs the model output tensor, got "
                f"{type(output).__name__}. Pass the tensor returned by the model, or set "
                "target='<site>' to differentiate a site instead."
            )
        if not y.requires_grad:
            raise GradientError(
                "The output passed to run.backward() does not require grad: the forward pass "
                "ran under torch.no_grad() or torch.inference_mode(). Run it with gradients "
                "enabled inside the block."
            )
        # Padding positions of a (batch, pos, ...) output are not probed either.
        return [(y, self._mask)]

    def _chunk_for(self, y: torch.Tensor, edges: list[tuple[str, Any]]) -> int:
        """Probes per batched backward: ``chunk``, or with "auto" as many as keep each
        vmapped gradient near 2**21 elements on a GPU (2**19 on a CPU), between 1 and 64."""
        if self.chunk != "auto":
            return int(self.chunk)
        largest = max([y.numel(), *(math.prod(item[2]) for _, item in edges)])
        return auto_chunk(y.device.type, largest)

    def _shown(
        self, y: torch.Tensor, mask: torch.Tensor | None, chunk: int, n_chunks: int
    ) -> Iterator[torch.Tensor]:
        """The ``n_chunks`` probe chunks of target ``y``, with a progress bar when a batch
        needs many."""
        chunks = self._probes(y, mask, chunk)
        if not self._inner_progress or n_chunks < _INNER_PROGRESS_CHUNKS:
            return chunks
        from tqdm.auto import tqdm

        return iter(tqdm(chunks, total=n_chunks, desc="probes in this batch", leave=False))

    def _probe_positions(self) -> Any:
        positions = self.target_positions
        if positions is None and self._target_spec is not None:
            positions = self._target_site.positions
        return positions

    def _probes(
        self, y: torch.Tensor, mask: torch.Tensor | None, chunk: int
    ) -> Iterator[torch.Tensor]:
        return probe_chunks(
            **self._probe_arguments(y, mask),
            chunk=chunk,
            generator=self._generator,
            dtype=y.dtype,
            device=y.device,
        )

    def _probe_arguments(self, y: torch.Tensor, mask: torch.Tensor | None) -> dict[str, Any]:
        """What decides the probe vectors of target ``y``: its shape, readout, positions."""
        return dict(
            kind=self.jacobians,
            target_shape=y.shape,
            readout=self.readout,
            positions=self._probe_positions(),
            mask=mask if y.ndim >= 3 else None,
            n_probes=self.n_probes,
            name=self._target_site.key if self._target_spec is not None else "output",
        )

    def _check_grad_enabled(self) -> None:
        if self._pending_no_grad:
            key = next(k for k in self._no_grad_batches if k in self._pending_no_grad)
            self._pending_no_grad.clear()
            self._captures.clear()
            self._target_captures.clear()
            raise GradientError(
                f"Site {key!r} was reached without gradients since the last run.backward(): "
                f"{self._no_grad_reason[key]}. Jacobians need the forward pass to build an "
                "autograd graph: run it with gradients enabled inside the block, or pass "
                "jacobians=None to collect activations only."
            )

    def _check_gradients_reached(self, pending: set[str]) -> None:
        for key in self.stats:
            site_stats = self.stats[key]
            if (
                site_stats.grads is not None
                and site_stats.grads.n_samples == 0
                and site_stats.n_batches
            ):
                why = (
                    self._no_grad_reason[key]
                    if key in self._no_grad_reason
                    else "run.backward(...) was never called"
                )
                raise GradientError(
                    f"No gradients reached {key!r} (activations seen for "
                    f"{site_stats.n_batches} batches): {why}. Call run.backward(...) after "
                    "each forward pass (run with gradients enabled) inside the "
                    "`with dh.collect(...)` block, or pass jacobians=None."
                )
        pending = pending | self._pending_no_grad
        if pending:
            warnings.warn(
                f"Forward passes reached site(s) {sorted(pending)} after the last "
                "run.backward(): their activations are in .acts, their Jacobians are not in "
                ".grads. Call run.backward(output) after every forward pass.",
                stacklevel=3,
            )


def sharding_groups(model: nn.Module) -> list[Any]:
    """The process groups whose ranks must run every backward pass of ``model`` together.

    Those of the device meshes of its ``DTensor`` parameters (FSDP2's ``fully_shard``, tensor
    parallelism), each mesh dimension once; groups of one rank are left out. An FSDP2 module
    whose parameters are unsharded right now (a root kept unsharded after its forward) has no
    ``DTensor`` to ask: then the default group. Empty for an unsharded model; nothing is
    imported when ``DTensor`` never was (no model can be sharded then).

    Args:
        model: The collected model.

    Returns:
        Process groups, in the same order on every rank.
    """
    # Where DTensor and FSDPModule live, in torch >= 2.6 and in earlier releases.
    dtensors = [
        getattr(sys.modules.get(name), "DTensor", None)
        for name in ("torch.distributed.tensor", "torch.distributed._tensor")
    ]
    dtensors = tuple(cls for cls in dtensors if isinstance(cls, type))
    if not dtensors:
        return []
    import torch.distributed as dist

    if not dist.is_initialized():
        return []
    meshes: list[Any] = []
    for parameter in model.parameters():
        if isinstance(parameter, dtensors) and parameter.device_mesh not in meshes:
            meshes.append(parameter.device_mesh)
    groups: list[Any] = []
    for mesh in meshes:
        for dim in range(mesh.ndim):
            group = mesh.get_group(dim)
            if group not in groups:
                groups.append(group)
    if not meshes:
        fsdp = [
            getattr(sys.modules.get(name), "FSDPModule", None)
            for name in ("torch.distributed.fsdp", "torch.distributed._composable.fsdp")
        ]
        fsdp = tuple(cls for cls in fsdp if isinstance(cls, type))
        if fsdp and any(isinstance(module, fsdp) for module in model.modules()):
            groups.append(dist.group.WORLD)
    return [group for group in groups if dist.get_world_size(group) > 1]


def _agree_on_passes(n_local: int, groups: list[Any]) -> int:
    """The largest ``n_local`` of all ranks of ``groups`` (one all-reduce per group)."""
    import torch.distributed as dist

    from ._rank_guard import _communication_device

    count = torch.tensor([n_local], dtype=torch.int64)
    try:
        for group in groups:
            count = count.to(_communication_device(dist, group))
            dist.all_reduce(count, op=dist.ReduceOp.MAX, group=group)
    except RuntimeError as err:
        raise DistributedError(
            f"run.backward() on a sharded model: the ranks could not agree on the number of "
            f"backward passes ({n_local} here): {err} Another rank probably raised, died or "
            "skipped run.backward(): every rank must call run.backward(output) after each "
            "forward pass. The statistics were not updated."
        ) from err
    return int(count.item())


def _with_last(items: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
    """Yield ``(item, is_last)``, holding one item of look-ahead (not the whole list)."""
    iterator = iter(items)
    try:
        current = next(iterator)
    except StopIteration:
        return
    for upcoming in iterator:
        yield current, False
        current = upcoming
    yield current, True
