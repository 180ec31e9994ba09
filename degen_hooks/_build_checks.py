"""What :func:`~degen_hooks.build_bases` checks before its first pass and after each one.

Private helpers of :mod:`degen_hooks.build`. Before any pass, its arguments are resolved and
refused early: sites and the output layer become :class:`~degen_hooks.Site` objects, and
``sections=`` (a mapping, ``"auto"``: what the model's family finds, or ``None``) becomes
``{site: section}`` with each MLP section bound to its pre-activation site; the sites that
need backward passes are listed so that disabled gradients fail before the long first pass.
After a pass, a site that saw no samples, a later pass that saw no batches (a one-shot
``data``) and a site that no gradient reached raise errors a ``build_bases`` user can act on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from ._errors import EmptyStatisticsError, GradientError, ShapeMismatchError
from ._family import family_hook
from .closed_form import find_mlp_sections
from .section import bound, is_section
from .sites import Site, _unwrap
from .statistics import Statistics


def _as_site(site: str | Site) -> Site:
    return site if isinstance(site, Site) else Site(site)


def _output_site(output: str | Site | None, positions: Any, rotate: bool) -> Site | None:
    if output is not None:
        return _as_site(output)
    if rotate:
        return Site("", positions=positions, label="output")
    return None


def _resolve_sections(
    model: nn.Module,
    sections: Mapping[str, tuple[Any, str | Site | None]] | str | None,
    variant: str,
    site_objs: list[Site],
    out_site: Site | None,
    output_positions: Any,
) -> dict[str, Any]:
    """``sections=`` as ``{site: section}``, MLP sections bound to their pre-activation sites.

    Raises:
        ValueError: For a string other than ``"auto"``.
        ShapeMismatchError: If ``sections`` names sites that are not among ``site_objs``.
        TypeError: If a value is not a ``(section, pre_activation_site)`` pair.
    """
    keys = [s.key for s in site_objs]
    if variant != "lib":
        sections = {}
    elif isinstance(sections, str):
        if sections != "auto":
            raise ValueError(f"sections must be a mapping, 'auto' or None, got {sections!r}.")
        sections = _auto_sections(model, site_objs, out_site, output_positions)
    sections = dict(sections or {})
    unknown = sorted(set(sections) - set(keys))
    if unknown:
        raise ShapeMismatchError(
            f"sections= names {unknown}, which are not among the sites {keys}."
        )
    odd = {
        k: type(v[0] if isinstance(v, tuple) and v else v).__name__
        for k, v in sections.items()
        if not _is_pair(v)
    }
    if odd:
        raise TypeError(
            f"sections= values must be (section, pre_activation_site) pairs whose section has "
            f"the section interface (degen_hooks.section: an MLPSection, a NormedMLPSection, "
            f"an AttentionSection), got {odd}."
        )
    return bound(sections)  # {site: section}, MLPSections with their pre sites


def _auto_sections(
    model: nn.Module, site_objs: list[Site], out_site: Site | None, output_positions: Any
) -> Mapping[str, tuple[Any, Site | None]]:
    """``sections="auto"``: what the model's family finds (TransformerLens blocks), or the
    ``Linear -> activation -> Linear`` sections of ``nn.Sequential`` models."""
    found = family_hook(_unwrap(model)[0], "find_sections")
    if found is not None:
        return found(model, site_objs, out_site, output_positions)
    return find_mlp_sections(model, site_objs, out_site)


def _is_pair(value: Any) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and is_section(value[0])


def _backward_keys(variant: str, site_objs: list[Site], sections: Mapping[str, Any]) -> list[str]:
    """Sites whose Jacobians take backward passes (not a closed form, not a section pass)."""
    if variant == "global":
        return [s.key for s in site_objs]
    if variant == "lib":
        return [s.key for s in site_objs if s.key not in sections]
    return []


def _check_saw_samples(stats: Statistics, keys: list[str]) -> None:
    """After the activation pass: every site must have seen samples."""
    for key in keys:
        if stats[key].acts.n_samples == 0:
            raise EmptyStatisticsError(
                f"build_bases saw no samples at site {key!r} ({stats[key].n_batches} batches) "
                "in its first pass over data: data is empty, or yields only empty batches (or, for "
                "a site with positions=, batches without those positions). Pass batches of "
                "model inputs, e.g. list(x.split(256))."
            )


def _check_pass_saw_batches(
    label: str, first: Statistics, now: Statistics, key: str, data: Any
) -> None:
    """A later pass that saw no batch where the first saw some: ``data`` was exhausted."""
    n_first = first[key].n_batches
    if n_first and (key not in now or now[key].n_batches == 0):
        raise EmptyStatisticsError(
            f"build_bases pass {label!r} saw no batches, but data yielded {n_first} batches "
            f"in the first pass: data ({type(data).__name__}) is exhausted after one pass. "
            "Pass a re-iterable: a list of batches or a torch DataLoader."
        )


def _no_gradient_error(model: nn.Module, run: Any) -> GradientError | None:
    """The error for a site that gradients did not reach, with advice a build_bases user can
    follow, or ``None`` for another gradient error (raised unchanged).

    ``collect``'s message advises changing the forward pass, which build_bases runs itself:
    here the fix goes through ``forward=`` (or the model).
    """
    reasons = getattr(run, "_no_grad_reason", None) or {}
    if not reasons:
        return None
    key, reason = next(iter(reasons.items()))
    fix = (
        "build_bases runs the forward passes itself, so make the input require grad "
        "with forward=lambda model, batch: model(batch.requires_grad_()) (a "
        "floating-point tensor batch; the Jacobians need no parameter gradients), or "
        "unfreeze the model with model.requires_grad_(True)."
    )
    if "no_grad()" in reason or "inference_mode()" in reason:
        why = (
            "forward= ran the model without gradients (under torch.no_grad() or "
            "torch.inference_mode()). Let forward= run the model with gradients enabled: "
            "build_bases takes the Jacobians by backward passes through its forward passes."
        )
    elif not any(p.requires_grad for p in model.parameters()):
        why = (
            "the model is frozen (none of its parameters requires grad) and the batches do "
            f"not require grad. {fix}"
        )
    else:
        why = (
            "nothing upstream of it requires grad: the site is at the model input, or "
            f"everything before it is frozen (requires_grad=False). {fix}"
        )
    return GradientError(
        f"build_bases cannot take the Jacobians of site {key!r}: no gradient reaches it, "
        f"because {why}"
    )
