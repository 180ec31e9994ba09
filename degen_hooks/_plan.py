"""Cost plans: what each pass of a basis build will cost, before it runs.

A Jacobian pass by backward probes costs one batched backward pass per chunk of probe
vectors, for every batch: exact probes of a language model's logits are one probe per
(position, vocabulary entry), which is what makes a naive build take hours. Before paying
that, :func:`plan_build` profiles one batch (a forward pass with gradients, its FLOPs counted
by ``torch.utils.flop_counter`` and the bytes autograd saves for the backward) and turns the
pass's probes, chunk and batches into counts:

* backward passes: ``ceil(probe vectors / chunk)`` per batch, exactly what the build runs;
* FLOPs: the forward's, plus about twice the forward's per probe vector (a vector-Jacobian
  product costs about two forward passes of the graph it traverses);
* peak memory: the saved activations, plus about that again per probe vector of a chunk
  (the vmapped gradients), a rough upper bound.

A closed-form pass runs no backward pass: its cost is one forward pass per batch (attention)
or none (an MLP section from moments already collected).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._hooks import SiteHook
from .jacobians import Probe, count_probe_vectors
from .section import shares_pass
from .sites import Site, resolve_sites

__all__ = [
    "BatchProfile",
    "BuildPlan",
    "PassCost",
    "Profiling",
    "MODEL_OUTPUT",
    "announce",
    "auto_chunk",
    "cost_plan",
    "plan_jacobian_pass",
    "plan_passes",
]

# Elements per batched (vmapped) gradient for chunk="auto": large batches pay off on a GPU,
# while on a CPU they are memory-bound and no faster than a loop (benchmarks/bench_build.py).
_AUTO_CHUNK_ELEMENTS = {"cuda": 1 << 21, "cpu": 1 << 19}

# Above either, build_bases warns before the pass and says what would help.
WARN_FLOPS = 1e13
WARN_BACKWARD_PASSES = 5_000


def auto_chunk(device_type: str, largest: int) -> int:
    """Probes per batched backward for ``chunk="auto"``: about 2**21 elements of the largest
    tensor per vmapped gradient on a GPU (2**19 on a CPU), between 1 and 64."""
    budget = _AUTO_CHUNK_ELEMENTS["cuda" if device_type == "cuda" else "cpu"]
    return max(1, min(64, budget // max(largest, 1)))


@dataclass(frozen=True)
class PassCost:
    """The estimated cost of one pass over the data.

    Attributes:
        name: The pass, as in ``basis.timings_`` (``"jacobians blocks.0.hook_resid_mid"``).
        method: ``"forward"``, ``"closed form"``, or ``"backward (exact probes)"`` /
            ``"backward (4 rademacher probes)"``.
        n_batches: Batches in ``data`` (``None`` when it has no length: the counts are then
            per batch).
        backward_passes: Batched backward passes in all (0 for forward and closed forms).
        probe_vectors: Probe vectors in all (each a vector-Jacobian product).
        flops: Estimated floating-point operations.
        peak_bytes: Estimated peak memory of one batch (a rough upper bound).
        chunk: Probe vectors per batched backward pass.
    """

    name: str
    method: str
    n_batches: int | None
    backward_passes: int = 0
    probe_vectors: int = 0
    flops: float = 0.0
    peak_bytes: int = 0
    chunk: int | None = None

    def describe(self) -> str:
        """A short line for a progress bar: ``"~120 backward passes, 3.1 TFLOP, 2.0 GB"``."""
        per = "" if self.n_batches is not None else " per batch"
        parts = [
            f"~{self.backward_passes:,} backward passes{per}" if self.backward_passes else "",
            f"{_si(self.flops)}FLOP{per}",
            f"peak ~{_si(self.peak_bytes)}B" if self.peak_bytes else "",
        ]
        return ", ".join(p for p in parts if p)

    @property
    def is_expensive(self) -> bool:
        """Whether the pass is above the warning thresholds."""
        return self.flops > WARN_FLOPS or self.backward_passes > WARN_BACKWARD_PASSES


@dataclass
class BuildPlan:
    """Every pass of a build, its method and its estimated cost (``build_bases(dry_run=True)``).

    Widths of read-outs are not known before the bases are fitted: a Jacobian pass is costed
    with the full width of the next site, an upper bound.

    Attributes:
        passes: The passes, in the order the build runs them.
    """

    passes: list[PassCost] = field(default_factory=list)

    @property
    def backward_passes(self) -> int:
        """Batched backward passes of the whole build."""
        return sum(p.backward_passes for p in self.passes)

    @property
    def flops(self) -> float:
        """Estimated FLOPs of the whole build."""
        return sum(p.flops for p in self.passes)

    def __repr__(self) -> str:
        rows = [f"{'pass':40} {'method':28} {'backward':>10} {'FLOP':>9} {'peak':>8}"]
        for p in self.passes:
            peak = f"{_si(p.peak_bytes)}B" if p.peak_bytes else "-"
            rows.append(
                f"{p.name[:40]:40} {p.method[:28]:28} {p.backward_passes:>10,} "
                f"{_si(p.flops) + 'FLOP':>9} {peak:>8}"
            )
        rows.append(f"total: {self.backward_passes:,} backward passes, {_si(self.flops)}FLOP")
        return "\n".join(rows)


@dataclass(frozen=True)
class BatchProfile:
    """One batch, measured: forward FLOPs, bytes saved for the backward, site shapes.

    Attributes:
        flops: FLOPs of one forward pass (``torch.utils.flop_counter``).
        saved_bytes: Bytes autograd saved for the backward pass.
        shapes: ``{site key: shape}`` of the sites read in that pass.
        device_type: ``"cpu"`` or ``"cuda"``, where the activations live.
    """

    flops: float
    saved_bytes: int
    shapes: dict[str, tuple[int, ...]]
    device_type: str

    @classmethod
    def measure(
        cls,
        model: nn.Module,
        batch: Any,
        forward: Callable[[nn.Module, Any], Any],
        sites: Sequence[Site] | Sequence[tuple[Site, nn.Module]],
    ) -> tuple[BatchProfile, Any]:
        """Run ``forward(model, batch)`` once with gradients and measure it.

        Args:
            model: The model.
            batch: One batch.
            forward: ``forward(model, batch) -> output``.
            sites: The sites whose shapes to record, or their ``(site, module)`` pairs as
                :func:`~degen_hooks.sites.resolve_sites` gives them.

        Returns:
            The profile and the forward's output.
        """
        from torch.utils.flop_counter import FlopCounterMode

        shapes: dict[str, tuple[int, ...]] = {}
        devices: set[str] = set()
        saved = [0]

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            saved[0] += tensor.numel() * tensor.element_size()
            return tensor

        def reader(key: str) -> Callable[[torch.Tensor], None]:
            def read(act: torch.Tensor) -> None:
                shapes.setdefault(key, tuple(act.shape))
                devices.add(act.device.type)

            return read

        pairs = sites if sites and isinstance(sites[0], tuple) else resolve_sites(model, sites)
        hooks = [SiteHook(model, s, m, reader(s.key)) for s, m in pairs]
        counter = FlopCounterMode(display=False)
        with contextlib.ExitStack() as stack:
            for hook in hooks:
                stack.enter_context(hook)
            stack.enter_context(torch.enable_grad())
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
            stack.enter_context(counter)
            output = forward(model, batch)
        device = "cuda" if "cuda" in devices else "cpu"
        return cls(float(counter.get_total_flops()), saved[0], shapes, device), output


class Profiling:
    """A ``forward(model, batch)`` that profiles its first batch (:meth:`BatchProfile.measure`)
    and runs the others as they are: a pass over the data measures one batch on the way,
    without iterating the data once more.

    Attributes:
        profile: The first batch's :class:`BatchProfile`, once it ran (``None`` before, or
            when it could not be measured: the pass then runs as it would have).
    """

    def __init__(self, forward: Callable[[nn.Module, Any], Any], sites: Sequence[Site]) -> None:
        self.forward, self.sites = forward, list(sites)
        self.profile: BatchProfile | None = None
        self._done = False

    def __call__(self, model: nn.Module, batch: Any) -> Any:
        if self._done:
            return self.forward(model, batch)
        self._done = True
        try:
            pairs = resolve_sites(model, self.sites)
        except Exception:  # noqa: BLE001 - a plan is advice: the pass runs without one
            return self.forward(model, batch)
        self.profile, output = BatchProfile.measure(model, batch, self.forward, pairs)
        return output


def n_probe_vectors(
    kind: Probe | str, target_shape: Sequence[int], *, r: int, positions: Any, n_probes: int
) -> int:
    """Probe vectors per batch for a read-out of width ``r`` (see ``count_probe_vectors``)."""
    shape = torch.Size((*target_shape[:-1], r))  # the probes live in read-out coordinates
    return count_probe_vectors(kind, shape, positions=positions, n_probes=n_probes)


def plan_jacobian_pass(
    name: str,
    profile: BatchProfile,
    *,
    site: str,
    target: str,
    r: int,
    kind: Probe | str,
    positions: Any,
    n_probes: int,
    chunk: int | str,
    n_batches: int | None,
) -> PassCost:
    """The cost of one Jacobian pass by backward probes, from a profiled batch.

    Args:
        name: The pass's label.
        profile: The measured batch.
        site: Key of the site differentiated (its shape is in the profile).
        target: Key of the target (the model output: ``"output"``).
        r: Read-out width (probe coordinates per probed cell).
        kind: ``"exact"``, ``"rademacher"`` or ``"gaussian"``.
        positions: Positions of the target probed.
        n_probes: Random probes per batch.
        chunk: Probes per batched backward, or ``"auto"``.
        n_batches: Batches in the data, or ``None`` (counts per batch).

    Returns:
        The :class:`PassCost`; its ``backward_passes`` is what the pass runs.
    """
    target_shape = profile.shapes[target]
    vectors = n_probe_vectors(kind, target_shape, r=r, positions=positions, n_probes=n_probes)
    if chunk == "auto":
        largest = max(math.prod(target_shape), math.prod(profile.shapes[site]))
        chunk = auto_chunk(profile.device_type, largest)
    chunk = int(chunk)
    batches = 1 if n_batches is None else n_batches
    passes = math.ceil(vectors / chunk) * batches
    flops = profile.flops * (1 + 2 * vectors) * batches
    peak = profile.saved_bytes * (1 + min(chunk, vectors))
    method = (
        "backward (exact probes)"
        if Probe(kind) is Probe.EXACT
        else f"backward ({n_probes} {Probe(kind).value} probes)"
    )
    return PassCost(name, method, n_batches, passes, vectors * batches, flops, peak, chunk)


def advice(cost: PassCost, *, has_closed_form: bool, probes_output: bool) -> str:
    """What would make an expensive pass cheaper, as a sentence for a warning."""
    tips = []
    if not has_closed_form:
        tips.append(
            "a closed form (sections=: build_bases finds MLP, attention and unembedding "
            "sections between TransformerLens residual-stream sites and nn.Sequential MLPs)"
        )
    if cost.method.startswith("backward (exact"):
        tips.append("random probes (jacobians='rademacher', n_probes=16)")
    if probes_output:
        tips.append("fewer probed positions (output_positions='last')")
    return "; ".join(tips)


def _si(value: float) -> str:
    for unit, size in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.3g} "


def plan_passes(
    profile: BatchProfile,
    *,
    variant: str,
    keys: Sequence[str],
    closed_forms: Mapping[str, str],
    target_key: str,
    output_positions: Any,
    jacobians: str,
    n_probes: int,
    chunk: int | str,
    n_batches: int | None,
) -> BuildPlan:
    """The passes of ``build_bases`` and their costs, in the order it runs them.

    Args:
        profile: One measured batch; its shapes hold every site and the target.
        variant: ``"lib"``, ``"global"``, ``"pca"`` or ``"neuron"``.
        keys: Site keys, earliest first.
        closed_forms: ``{site key: "moments" | "forward"}`` for sites with a closed-form
            section: from moments of the activation pass, or a forward pass of its own.
        target_key: Key of the last site's target in ``profile.shapes`` (the model output
            or the ``output=`` site).
        output_positions: Positions of the last target probed.
        jacobians: Probe kind of backward passes.
        n_probes: Random probes per batch.
        chunk: Probes per batched backward, or ``"auto"``.
        n_batches: Batches in the data, or ``None``.

    Returns:
        The :class:`BuildPlan`.
    """
    batches = 1 if n_batches is None else n_batches
    plan = BuildPlan([PassCost("activations", "forward", n_batches, flops=profile.flops * batches)])
    if variant in ("pca", "neuron"):
        return plan
    common = {"kind": jacobians, "n_probes": n_probes, "chunk": chunk, "n_batches": n_batches}
    if variant == "global":
        costs = [
            plan_jacobian_pass(
                "jacobians (global)",
                profile,
                site=key,
                target=target_key,
                r=profile.shapes[target_key][-1],
                positions=output_positions,
                **common,
            )
            for key in keys
        ]
        # One backward pass serves every site: the chunk is sized to the largest of them.
        plan.passes.append(min(costs, key=lambda cost: cost.chunk or 0))
        return plan
    for index in range(len(keys) - 1, -1, -1):
        key = keys[index]
        label = f"jacobians {key}"
        target = keys[index + 1] if index + 1 < len(keys) else target_key
        if closed_forms.get(key) == "moments":
            plan.passes.append(PassCost(f"{label} (closed form)", "closed form", n_batches))
        elif closed_forms.get(key) == "forward":
            cost = PassCost(
                f"{label} (closed form)", "closed form", n_batches, flops=profile.flops * batches
            )
            plan.passes.append(cost)
        else:
            positions = output_positions if target == target_key else None
            plan.passes.append(
                plan_jacobian_pass(
                    label,
                    profile,
                    site=key,
                    target=target,
                    r=profile.shapes[target][-1],
                    positions=positions,
                    **common,
                )
            )
    return plan


# -- build_bases' plan -------------------------------------------------------------------
# The key of the model output in a profiled batch (no site may be labelled so).
MODEL_OUTPUT = "(model output)"


def cost_plan(
    data: Iterable[Any],
    site_objs: list[Site],
    sections: Mapping[str, Any],
    target: Site,
    output_positions: Any,
    variant: str,
    profile: BatchProfile,
    *,
    jacobians: str,
    n_probes: int,
    chunk: int | str,
) -> BuildPlan:
    """Every pass of ``build_bases``, costed from one profiled batch."""
    closed = {
        key: "moments" if shares_pass(section) else "forward" for key, section in sections.items()
    }
    return plan_passes(
        profile,
        variant=variant,
        keys=[s.key for s in site_objs],
        closed_forms=closed,
        target_key=target.key,
        output_positions=output_positions if target.key == MODEL_OUTPUT else target.positions,
        jacobians=jacobians,
        n_probes=n_probes,
        chunk=chunk,
        n_batches=len(data) if hasattr(data, "__len__") else None,  # type: ignore[arg-type]
    )


def announce(
    label: str, costs: Mapping[str, PassCost], sections: Mapping[str, Any], probes_output: bool
) -> str:
    """The progress-bar label of a backward pass, with its cost; warn when it is large."""
    cost = costs.get(label)
    if cost is None:
        return label
    if cost.is_expensive:
        key = label.removeprefix("jacobians ")
        tips = advice(cost, has_closed_form=key in sections, probes_output=probes_output)
        warnings.warn(
            f"build_bases: the pass {label!r} will take {cost.describe()}. What helps: "
            f"{tips}. build_bases(..., dry_run=True) shows the plan of every pass.",
            stacklevel=4,
        )
    return f"{label} [{cost.describe()}]"
