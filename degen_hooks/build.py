"""``build_bases()``: model in, interaction bases of an ordered list of sites out.

The passes (lib_math §5):

1. one forward pass over the data, without gradients, collects every site's activation
   statistics (and the output's, and the derivative moments of closed-form MLP sections);
2. ``variant="lib"`` (the local interaction basis): sites are processed from the last to the
   first; each site's Jacobian Gram is taken through the next site's basis (``readout=C``),
   with batched probes or, for MLP sections, in closed form without any backward pass;
   ``variant="global"``: one backward sweep takes every site's Jacobian with respect to the
   final output (the degeneracy paper's interaction basis);
   ``"pca"`` / ``"neuron"``: no Jacobians.

Statistics of earlier passes are reused, never recomputed; ``basis.stats_`` holds those of
the sites (exactly ``basis.sites_``), ``basis.section_stats_`` what the closed forms read
besides, and ``basis.timings_`` the seconds spent in each pass.

This module holds :func:`build_bases` and the passes; its checks (resolving the sites, the
output and ``sections=``, listing the sites that need backward passes, and the errors of a
pass that saw nothing or that no gradient reached) live in :mod:`degen_hooks._build_checks`.
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
from torch import nn

from ._batches import require_reiterable
from ._build_checks import (
    _as_site,
    _backward_keys,
    _check_pass_saw_batches,
    _check_saw_samples,
    _no_gradient_error,
    _output_site,
    _resolve_sections,
)

# Defined in _build_checks; ``X as X`` keeps them importable from here.
from ._build_checks import _auto_sections as _auto_sections
from ._build_checks import _is_pair as _is_pair
from ._errors import GradientError, ShapeMismatchError
from ._plan import MODEL_OUTPUT, BuildPlan, Profiling, announce, cost_plan
from ._rank_guard import _guard_ranks
from .accumulators import SecondMoment
from .basis import InteractionBasis, pca_rotation
from .collect import collect
from .distributed import all_reduce_
from .section import shares_pass, takes_mask
from .sites import Site
from .statistics import SiteStatistics, Statistics

__all__ = ["build_bases"]

_VARIANTS = ("lib", "global", "pca", "neuron")
_Combined = TypeVar("_Combined", Statistics, SecondMoment)


@_guard_ranks
def build_bases(
    model: nn.Module,
    sites: Sequence[str | Site],
    data: Iterable[Any],
    *,
    variant: str = "lib",
    output: str | Site | None = None,
    output_positions: Any = None,
    rotate_output: bool = False,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    jacobians: str = "exact",
    n_probes: int = 1,
    sections: Mapping[str, tuple[Any, str | Site | None]] | str | None = "auto",
    rtol: float | None = None,
    atol: float = 0.0,
    n_components: int | None = None,
    chunk: int | str = "auto",
    seed: int = 0,
    distributed: bool = False,
    group: Any = None,
    timeout: timedelta | float | None = None,
    mask: Callable[[Any], torch.Tensor | None] | None = None,
    dry_run: bool = False,
    progress: bool = True,
) -> InteractionBasis | BuildPlan:
    """Build the bases of ``sites`` (ordered from input to output) in one call.

    Before any backward pass, one batch is profiled and every pass costed (backward passes,
    FLOPs, peak memory; see :mod:`degen_hooks._plan`): the progress bar shows each pass's
    cost, a pass above ``1e13`` FLOPs or 5,000 backward passes warns with what would help,
    and ``dry_run=True`` returns the plan without running the build.

    Args:
        model: Any ``nn.Module``.
        sites: Node layers, earliest first: names or :class:`~degen_hooks.Site` objects.
        data: A re-iterable of batches (each pass iterates it once): a list of batches or a
            ``DataLoader``. A one-shot iterator (a generator) is refused when more than one
            pass is needed. Empty batches add nothing.
        variant: ``"lib"`` (the local interaction basis, as ``InteractionBasis(variant="lib")``
            fits it: each site's Jacobian taken through the next site's basis),
            ``"global"`` (every site's Jacobian taken with respect to the final output),
            ``"pca"`` or ``"neuron"``. ``"local"`` is the deprecated spelling of ``"lib"``.
        output: The final node layer: ``None`` for the model output, or a site.
        output_positions: Positions of the model output to use when ``output=None``.
        rotate_output: Read the final layer through its centred PCA rotation (rib's
            ``rotate_final_node_layer``) instead of its raw coordinates.
        forward: ``forward(model, batch) -> output``; defaults to ``model(batch)``.
        jacobians: Probes for backward passes: ``"exact"``, ``"rademacher"``,
            ``"gaussian"``.
        n_probes: Random probes per batch (random probe kinds only).
        sections: Closed-form sections, ``{site: (section, pre_activation_site)}``: the
            section maps ``site`` to the next site (or the output). For an
            :class:`~degen_hooks.MLPSection` the derivative moments are collected at
            ``pre_activation_site`` (same positions as ``site``; ``None`` for a linear
            section, which needs no data). A section with a ``gram_pass`` method, such as
            :func:`degen_hooks.transformer_lens.attention_section` or a
            :class:`~degen_hooks.NormedMLPSection` (pre-activation site ``None``), replaces
            the site's backward passes by one forward pass of its own (the last site's
            section reads the model output at ``output_positions``). ``"auto"`` (default)
            finds ``Linear -> activation -> Linear`` sections of ``nn.Sequential`` models
            (:func:`~degen_hooks.closed_form.find_mlp_sections`) and the attention, MLP
            (after a norm, gated or not), MLP-internal and unembedding sections between
            consecutive sites of TransformerLens models
            (:func:`degen_hooks.transformer_lens.find_sections`);
            ``None`` forces backward passes everywhere. ``variant="lib"`` only.
        rtol: Relative eigenvalue threshold (default ``10 * d * eps``).
        atol: Absolute eigenvalue threshold.
        n_components: Keep at most this many features per site.
        chunk: Probes per batched backward pass ("auto": sized to the activations).
        seed: Seed of random probes.
        distributed: Run the passes over ``torch.distributed`` ranks: every rank passes its
            own shard of ``data``, the statistics of each pass are combined exactly
            (:func:`~degen_hooks.all_reduce_`) and every rank fits the same bases, as one
            process over the union of the shards would. A rank that raises (its data
            loader fails mid-pass) makes every other rank raise a ``DistributedError``
            quoting its error, then raises its own.
        group: The process group (default: the world).
        timeout: With ``distributed=True``, how long each rank waits for the others at each
            exchange and at the end (a ``timedelta`` or seconds) before raising a
            ``DistributedError`` naming the absent ranks; default: the timeout ``group``
            was created with. Ignored otherwise.
        mask: ``mask(batch) -> (batch, pos)`` boolean mask of the real tokens (padding
            ``False``) of each batch, as in ``run.over(..., mask=...)``: padding is no sample,
            and ``positions="last"`` is each row's last real token.
        dry_run: Profile one batch and return the :class:`~degen_hooks._plan.BuildPlan`
            (each pass, its method, its estimated cost) instead of building.
        progress: Show tqdm progress bars.

    Returns:
        With ``dry_run=True``, the plan. Otherwise a fitted
        :class:`~degen_hooks.InteractionBasis` with ``plan_`` (the costed plan, ``None``
        when no pass needed one), ``stats_`` (the statistics of
        its sites, keys exactly ``sites_``: refitting another variant on them gives the same
        sites), ``section_stats_`` (what the closed-form MLP sections read besides: a
        :class:`~degen_hooks.Statistics` keyed by the section's first site, the derivative
        moments of its hidden layer in ``.derivs``), ``timings_`` (seconds per pass),
        ``output_rotation_`` (``None`` unless ``rotate_output=True``) and ``output_stats_``
        (the output layer's statistics when rotated, else ``None``).

    Raises:
        ValueError: For an unknown ``variant`` or ``sections``, no sites, or ``data`` that
            is a one-shot iterator while several passes are needed.
        GradientError: If a backward pass is needed while gradients are disabled, or
            gradients cannot reach a site (a frozen model, a site at the model input: pass
            ``forward=lambda model, batch: model(batch.requires_grad_())``).
        EmptyStatisticsError: If a site saw no samples, or a later pass saw no batches
            (``data`` was exhausted by the first).
        ShapeMismatchError: If ``sections=`` names unknown sites, or a site's activation
            has no feature dimension (0-d).
        DistributedError: With ``distributed=True``: if another rank raised, or did not
            reach an exchange within ``timeout`` (see :func:`~degen_hooks.all_reduce_`).

    Examples:
        >>> import torch, degen_hooks as dh
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(),
        ...                             torch.nn.Linear(5, 5), torch.nn.ReLU(),
        ...                             torch.nn.Linear(5, 2)).double()
        >>> data = torch.randn(128, 3, dtype=torch.float64).split(32)
        >>> basis = dh.build_bases(model, ["1", "3"], data, progress=False)
        >>> sorted(basis.widths_) == ["1", "3"]
        True
    """
    if variant == "local":
        warnings.warn(
            'build_bases(variant="local") is deprecated: the local interaction basis is '
            'variant="lib", the name InteractionBasis(variant="lib") uses. "local" will be '
            "removed in the next minor release.",
            DeprecationWarning,
            stacklevel=3,  # through the rank guard
        )
        variant = "lib"
    if variant not in _VARIANTS:
        raise ValueError(
            f'variant must be one of {_VARIANTS}, got {variant!r}: "lib" for the local '
            'interaction basis, "global" for Jacobians with respect to the output.'
        )
    site_objs = [_as_site(s) for s in sites]
    if not site_objs:
        raise ValueError("build_bases needs at least one site.")
    keys = [s.key for s in site_objs]
    out_site = _output_site(output, output_positions, rotate_output)
    sections = _resolve_sections(model, sections, variant, site_objs, out_site, output_positions)
    # Refuse what would fail only after the first (perhaps long) pass.
    backward_keys = _backward_keys(variant, site_objs, sections)
    n_closed = sum(shares_pass(section) for section in sections.values())
    n_passes = {"lib": 1 + len(site_objs) - n_closed, "global": 2}.get(variant, 1)
    if n_passes > 1:  # pca / neuron (and all-closed-form lib): one pass, any iterable
        require_reiterable(data, caller="build_bases", n_passes=n_passes)
    if backward_keys and not torch.is_grad_enabled():
        raise GradientError(
            f"build_bases(variant={variant!r}) takes the Jacobians of sites {backward_keys} by "
            "backward passes, but gradients are disabled here (torch.no_grad() or "
            "torch.inference_mode() is active). Call build_bases outside those blocks (its "
            "activation pass already runs without gradients)."
        )
    if mask is not None:
        passes = [
            k
            for k, section in sections.items()
            if not shares_pass(section) and not takes_mask(section)
        ]
        if passes:
            raise ValueError(
                f"build_bases(mask=...) with the closed-form sections of {passes}: their "
                "gram_pass takes no padding mask (no mask= parameter). Pass sections=None "
                "for backward passes at those sites, or batches without padding."
            )
    call = forward or (lambda model, batch: model(batch))
    target = out_site if out_site is not None else Site("", label=MODEL_OUTPUT)
    profiling = Profiling(call, [*site_objs, target])
    plan_of = functools.partial(
        cost_plan,
        data,
        site_objs,
        sections,
        target,
        output_positions,
        variant,
        jacobians=jacobians,
        n_probes=n_probes,
        chunk=chunk,
    )
    if dry_run:
        profiling(model, next(iter(data)))
        if profiling.profile is None:
            raise ShapeMismatchError(
                f"build_bases(dry_run=True) could not profile a batch: a site or the "
                f"target ({target.key!r}) is not a module of {type(model).__name__}."
            )
        return plan_of(profiling.profile)
    timings: dict[str, float] = {}
    common = {"forward": forward, "progress": progress}
    over_kw = {**common, "mask": mask}

    def combined(stats: _Combined) -> _Combined:
        if distributed:
            all_reduce_(stats, group, timeout=timeout)
        return stats

    # Pass 1: activation statistics of every site (and the output, and MLP derivatives).
    shared = {
        key: section.shared_site(_site_of(site_objs, key))
        for key, section in sections.items()
        if shares_pass(section)
    }
    derivative_sites = {found[0].key: found[0] for found in shared.values() if found}
    derivatives = {found[0].key: found[1] for found in shared.values() if found}
    pass_sites = list(site_objs) + list(derivative_sites.values())
    if rotate_output and out_site is not None:
        pass_sites.append(out_site)
    started = time.perf_counter()
    with collect(model, pass_sites, derivatives=derivatives) as run:
        # The first batch is profiled on the way: the plan costs the passes to come.
        run.over(data, desc="activations", **{**over_kw, "forward": profiling})
    plan = None if profiling.profile is None else plan_of(profiling.profile)
    costs = {} if plan is None else {cost.name: cost for cost in plan.passes}
    # The sites' statistics, apart from what only the closed forms read (#18): refitting
    # another variant on basis.stats_ must give the same sites, not one per section too.
    everything = combined(run.stats)
    stats = _subset(everything, {key: key for key in keys})
    section_stats = _subset(everything, {k: found[0].key for k, found in shared.items() if found})
    output_stats = everything[out_site.key] if rotate_output and out_site is not None else None
    _check_saw_samples(stats, keys)
    timings["activations"] = time.perf_counter() - started
    extras = {"section_stats_": section_stats, "output_stats_": output_stats, "plan_": plan}

    basis_variant = {"pca": "pca", "neuron": "neuron"}.get(variant, "lib")
    basis = InteractionBasis(variant=basis_variant, rtol=rtol, atol=atol, n_components=n_components)
    if variant in ("pca", "neuron"):
        basis.fit(stats, keys)
        return _finish(basis, stats, timings, None, extras)

    readout = None
    if rotate_output:
        out_key = out_site.key  # type: ignore[union-attr]
        out_rotation = pca_rotation(everything[out_key].acts.cov(), rtol=rtol, atol=atol)
        readout = out_rotation.rotation
    probe_kw = {"jacobians": jacobians, "n_probes": n_probes, "chunk": chunk, "seed": seed}
    target_kw = (
        {"target": out_site} if out_site is not None else {"target_positions": output_positions}
    )

    if variant == "global":
        started = time.perf_counter()
        run = collect(model, site_objs, readout=readout, **target_kw, **probe_kw)
        desc = announce("jacobians (global)", costs, sections, probes_output=out_site is None)
        try:
            with run:
                run.over(data, desc=desc, **over_kw)
        except GradientError as err:
            teaching = _no_gradient_error(model, run)
            if teaching is None:
                raise
            raise teaching from err
        combined(run.stats)
        _check_pass_saw_batches("jacobians (global)", stats, run.stats, keys[0], data)
        timings["jacobians (global)"] = time.perf_counter() - started
        for site in site_objs:
            stats[site.key].grads = run.stats[site.key].grads
            basis.fit_site(site.key, stats[site.key])
        return _finish(basis, stats, timings, readout, extras)

    for index in range(len(site_objs) - 1, -1, -1):
        site = site_objs[index]
        if index < len(site_objs) - 1:
            nxt = site_objs[index + 1]
            target_kw = {"target": nxt}
            readout = basis.rotations_[nxt.key]
        label = f"jacobians {site.key}"
        started = time.perf_counter()
        section = sections.get(site.key)
        if section is not None and shares_pass(section):  # statistics from the first pass
            gram = section.gram_from(section_stats.get(site.key), readout)
            stats[site.key].grads = SecondMoment.from_matrix(gram, stats[site.key].acts.n_samples)
            label += " (closed form)"
        elif section is not None:  # a section with a forward pass of its own
            # The last site's section maps it to the model output (Site("") is the root).
            target = target_kw.get("target") or Site("", positions=output_positions)
            masked = {} if mask is None else {"mask": mask}
            gram = section.gram_pass(
                model, data, site, _as_site(target), readout, **common, **masked
            )
            stats[site.key].grads = combined(gram)
            if gram.n_samples == 0:
                _check_pass_saw_batches(label, stats, Statistics(), site.key, data)
            label += " (closed form)"
        else:
            run = collect(model, [site], readout=readout, **target_kw, **probe_kw)
            desc = announce(label, costs, sections, probes_output="target" not in target_kw)
            try:
                with run:
                    run.over(data, desc=desc, **over_kw)
            except GradientError as err:
                teaching = _no_gradient_error(model, run)
                if teaching is None:
                    raise
                raise teaching from err
            combined(run.stats)
            _check_pass_saw_batches(label, stats, run.stats, site.key, data)
            stats[site.key].grads = run.stats[site.key].grads
        basis.fit_site(site.key, stats[site.key])
        timings[label] = time.perf_counter() - started
    # Sites were fitted last to first; report them in model order.
    basis.sites_ = keys
    for attr in (
        "rotations_",
        "pinv_",
        "lambdas_",
        "gram_eigenvalues_",
        "means_",
        "widths_",
        "site_info_",
    ):
        table = getattr(basis, attr)
        setattr(basis, attr, {key: table[key] for key in keys})
    rotation = None if not rotate_output else out_rotation.rotation
    return _finish(basis, stats, timings, rotation, extras)


def _subset(stats: Statistics, keys: Mapping[str, str]) -> Statistics:
    """The statistics ``{new key: stats[old key]}``, their metadata listing those sites only."""
    metadata = dict(stats.metadata)
    if "sites" in metadata:
        metadata["sites"] = list(keys)
    return Statistics({new: stats[old] for new, old in keys.items()}, metadata)


def _site_of(site_objs: list[Site], key: str) -> Site:
    return next(s for s in site_objs if s.key == key)


def _finish(
    basis: InteractionBasis,
    stats: Statistics,
    timings: dict[str, float],
    output_rotation: torch.Tensor | None,
    extras: dict[str, Statistics | SiteStatistics | None],
) -> InteractionBasis:
    basis.stats_ = stats
    basis.timings_ = timings
    basis.output_rotation_ = output_rotation
    basis.section_stats_ = extras["section_stats_"]
    basis.output_stats_ = extras["output_stats_"]
    basis.plan_ = extras.get("plan_")
    return basis
