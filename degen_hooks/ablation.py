"""Node ablation: run a model with only some features of a basis kept at one site.

``ablate(model, basis, site, keep=k)`` rewrites the site's activation ``f`` as
``mu + (f - mu) @ C[:, keep] @ C_pinv[keep, :]`` for the duration of the block (the mean, the
constant direction, is always kept). ``node_ablation_curve`` evaluates a metric on held-out
data as a function of the number of features kept, for several bases side by side, the
papers' main evaluation of a basis (lib_math §7.2).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._batches import require_reiterable
from ._hooks import SiteHook
from .basis import InteractionBasis, _keep_index
from .sites import Site, position_cells, resolve_bypass, resolve_sites

__all__ = ["Ablation", "AblationCurve", "ablate", "node_ablation_curve"]


def _project(
    act: torch.Tensor,
    projector: torch.Tensor,
    mean: torch.Tensor,
    site: Site,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    def rewrite(x: torch.Tensor) -> torch.Tensor:
        x64 = x.to(torch.float64)
        return ((x64 - mean) @ projector + mean).to(x.dtype)

    features = site.features_last(act)
    if features.ndim < 3 or (site.positions is None and mask is None):
        position_cells(features, site.positions, mask, site.key)  # checks positions, mask
        return site.restore_axis(rewrite(features))
    cells = position_cells(features, site.positions, mask, site.key)
    out = features.clone()
    out[cells] = rewrite(features[cells])
    return site.restore_axis(out)


class Ablation:
    """The handle ``with dh.ablate(...) as ablation`` binds: the padding mask of the passes.

    Attributes:
        mask: ``(batch, pos)`` boolean mask of the real positions of the next forward
            passes, or ``None``; set it per batch with :meth:`set_mask`.
    """

    def __init__(self, mask: torch.Tensor | None = None) -> None:
        self.mask: torch.Tensor | None = None
        self.set_mask(mask)

    def set_mask(self, mask: torch.Tensor | None) -> None:
        """Write only the real positions (``True``) of the following forward passes."""
        self.mask = None if mask is None else torch.as_tensor(mask).bool()


@contextlib.contextmanager
def ablate(
    model: nn.Module,
    basis: InteractionBasis,
    site: str,
    *,
    keep: int | Sequence[int] | None = None,
    drop: Sequence[int] | None = None,
    mask: torch.Tensor | None = None,
) -> Iterator[Ablation]:
    """Keep only some features of ``basis`` at ``site`` while the block runs.

    The site's tensor is rewritten where every consumer sees it: the element of a
    structured output or the argument that was read, at the call that was read, and on a
    residual stream whose skip connection bypasses the hooked module (a TransformerLens
    bridge's ``hook_resid_mid``) in the skip connection as well.

    Args:
        model: The model the basis was fitted on.
        basis: A fitted :class:`~degen_hooks.InteractionBasis`.
        site: Site key.
        keep: The top ``k`` features (int) or explicit feature indices; all when ``None``.
        drop: Feature indices to ablate (removed from ``keep``).
        mask: ``(batch, pos)`` boolean mask of the real tokens of the batch (padding
            ``False``), as given to ``run.set_mask`` when the basis was collected: only the
            positions the site read are written (``positions="last"``: each row's last real
            token). Change it per batch with ``ablation.set_mask(...)``.

    Yields:
        An :class:`Ablation` handle (its ``set_mask``); the model's forward passes inside
        the block see the rewritten activation.

    Examples:
        >>> import torch, degen_hooks as dh
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU()).double()
        >>> x = torch.randn(64, 3, dtype=torch.float64)
        >>> with dh.collect(model, ["0"]) as run:
        ...     _ = model(x)
        >>> pca = dh.InteractionBasis(variant="pca").fit(run.stats)
        >>> with dh.ablate(model, pca, "0", keep=0):     # every sample -> the mean
        ...     y = model[0](x)
        >>> torch.allclose(y, run.stats["0"].acts.mean().expand_as(y))
        True
    """
    rotation, pinv, mean = basis._get(site)
    index = _keep_index(keep, rotation.shape[1])
    if drop is not None:
        dropped = set(int(i) for i in _keep_index(list(drop), rotation.shape[1]))
        index = torch.tensor([int(i) for i in index if int(i) not in dropped], dtype=torch.long)
    projector = rotation[:, index] @ pinv[index, :]
    spec = Site.from_info(basis.site_info_.get(site, {}), key=site)
    ((resolved, module),) = resolve_sites(model, [spec])

    handle = Ablation(mask)

    def rewrite(act: torch.Tensor) -> torch.Tensor:
        dev = act.device
        return _project(act, projector.to(dev), mean.to(dev), resolved, handle.mask)

    bypass = resolve_bypass(model, resolved)
    with SiteHook(model, resolved, module, rewrite, writes=True, bypass=bypass):
        yield handle


@dataclass
class AblationCurve:
    """Metric as a function of the number of features kept, per basis.

    Attributes:
        site: Site key.
        n_kept: ``{basis name: [k, ...]}``.
        values: ``{basis name: [metric at k, ...]}``.
        baseline: Metric of the unablated model.
    """

    site: str
    n_kept: dict[str, list[int]] = field(default_factory=dict)
    values: dict[str, list[float]] = field(default_factory=dict)
    baseline: float = float("nan")

    def within(self, value: float, tolerance: float, *, higher_is_better: bool = True) -> bool:
        """Whether ``value`` is at most ``tolerance`` worse than the baseline."""
        if higher_is_better:
            return value >= self.baseline - tolerance
        return value <= self.baseline + tolerance

    def min_features(
        self, tolerance: float, *, higher_is_better: bool = True
    ) -> dict[str, int | None]:
        """Fewest features keeping the metric within ``tolerance`` of the baseline, per basis."""
        out: dict[str, int | None] = {}
        for name, ks in self.n_kept.items():
            ok = [
                k
                for k, v in zip(ks, self.values[name], strict=True)
                if self.within(v, tolerance, higher_is_better=higher_is_better)
            ]
            out[name] = min(ok) if ok else None
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "site": self.site,
            "n_kept": self.n_kept,
            "values": self.values,
            "baseline": self.baseline,
        }

    def plot(self, ax: Any = None) -> Any:
        """Plot the curves (matplotlib); returns the Figure."""
        from .plotting import plot_ablation_curve

        return plot_ablation_curve(self, ax=ax)


def _evaluate(
    model: nn.Module,
    data: Iterable[Any],
    forward: Callable[[nn.Module, Any], Any],
    metric: Callable[[Any, Any], torch.Tensor | float],
    mask: Callable[[Any], torch.Tensor | None] | None = None,
    ablation: Ablation | None = None,
) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in data:
            if ablation is not None and mask is not None:
                ablation.set_mask(mask(batch))
            value = torch.as_tensor(metric(forward(model, batch), batch), dtype=torch.float64)
            total += float(value.sum())
            count += max(value.numel(), 1)
    return total / max(count, 1)


def node_ablation_curve(
    model: nn.Module,
    bases: Mapping[str, InteractionBasis],
    site: str,
    data: Iterable[Any],
    *,
    metric: Callable[[Any, Any], torch.Tensor | float],
    n_kept: Sequence[int] | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    mask: Callable[[Any], torch.Tensor | None] | None = None,
    tolerance: float | None = None,
    higher_is_better: bool = True,
    progress: bool = True,
) -> AblationCurve:
    """Metric on ``data`` versus the number of features kept at ``site``, for each basis.

    Args:
        model: The model.
        bases: ``{name: fitted basis}``, e.g. ``{"LIB": lib, "PCA": pca, "neurons": neurons}``.
        site: Site key present in every basis.
        data: Re-iterable held-out batches.
        metric: ``metric(output, batch)`` returning per-sample values (averaged) or a scalar.
        n_kept: Numbers of features to try; default: every ``k`` from 0 to the width.
        forward: ``forward(model, batch) -> output``; defaults to ``model(batch)``.
        mask: ``mask(batch) -> (batch, pos)`` boolean mask of the real tokens (padding
            ``False``), as in ``run.over(..., mask=...)``: each ablation writes only the
            positions the site read.
        tolerance: If given, bisect between the tried ``k`` for the fewest features that keep
            the metric within ``tolerance`` of the baseline (assuming the curve is monotone
            there), so :meth:`AblationCurve.min_features` is exact on a coarse schedule.
        higher_is_better: Direction of the metric, for ``tolerance``.
        progress: Show a tqdm bar over bases and ``k``.

    Returns:
        An :class:`AblationCurve`; with every feature kept the metric equals the baseline.
    """
    from tqdm.auto import tqdm

    require_reiterable(data, caller="node_ablation_curve")
    call = forward or (lambda m, batch: m(batch))
    curve = AblationCurve(site=site, baseline=_evaluate(model, data, call, metric))
    jobs = []
    for name, basis in bases.items():
        width = basis.widths_[site] if hasattr(basis, "widths_") else basis._get(site)[0].shape[1]
        ks = range(width + 1) if n_kept is None else sorted({min(k, width) for k in n_kept})
        curve.n_kept[name], curve.values[name] = list(ks), []
        jobs += [(name, basis, k) for k in ks]

    def evaluate(basis: InteractionBasis, k: int) -> float:
        with ablate(model, basis, site, keep=k) as ablation:
            return _evaluate(model, data, call, metric, mask, ablation)

    for name, basis, k in tqdm(jobs, desc=f"ablation {site}", disable=not progress, leave=False):
        curve.values[name].append(evaluate(basis, k))
    if tolerance is not None:
        for name, basis in bases.items():
            _bisect(curve, name, lambda k, b=basis: evaluate(b, k), tolerance, higher_is_better)
    return curve


def _bisect(
    curve: AblationCurve,
    name: str,
    evaluate: Callable[[int], float],
    tolerance: float,
    higher_is_better: bool,
) -> None:
    """Refine ``curve[name]`` between its last failing and first passing ``k``."""

    def ok(value: float) -> bool:
        return curve.within(value, tolerance, higher_is_better=higher_is_better)

    ks, values = curve.n_kept[name], curve.values[name]
    passing = [k for k, v in zip(ks, values, strict=True) if ok(v)]
    if not passing:
        return
    high = min(passing)
    failing = [k for k, v in zip(ks, values, strict=True) if k < high and not ok(v)]
    low = max(failing) if failing else None
    while low is not None and high - low > 1:
        mid = (low + high) // 2
        value = evaluate(mid)
        position = next(i for i, k in enumerate(ks) if k > mid)
        ks.insert(position, mid)
        values.insert(position, value)
        low, high = (low, mid) if ok(value) else (mid, high)
