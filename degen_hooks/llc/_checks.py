"""Input checks of estimate_llc: settings, data and the parameters to sample."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from torch import Tensor, nn

from .._checks import closest
from .._errors import EmptyStatisticsError, SiteNotFoundError
from ._data import batch_size
from ._losses import LLCLoss, OutputKind

__all__ = ["check_settings", "count_samples", "select_params"]


def count_samples(data: Iterable[Any]) -> int:
    """Number of samples in one pass over ``data``; rejects data that cannot be cycled."""
    if isinstance(data, Tensor):
        raise ValueError(
            f"data is a single tensor of shape {tuple(data.shape)}; iterating it gives rows, "
            "not batches. Pass a list of batches, e.g. [x] or list(x.split(256))."
        )
    if isinstance(data, Iterator):
        raise ValueError(
            f"data is a one-shot iterator ({type(data).__name__}), but the sampler cycles "
            "through it many times. Pass a list of batches or a DataLoader."
        )
    try:
        n_samples = len(data.dataset)  # type: ignore[attr-defined]
    except (AttributeError, TypeError):  # not a DataLoader, or an iterable-style dataset
        n_samples = sum(batch_size(batch) for batch in data)
    if n_samples == 0:
        raise EmptyStatisticsError(
            "data holds no samples; the LLC needs at least one non-empty batch."
        )
    return n_samples


def select_params(model: nn.Module, params: str | Sequence[str] | None) -> list[str]:
    """Parameter names chosen by names, module paths or globs, in named_parameters() order."""
    named = dict(model.named_parameters())
    if not named:
        raise ValueError(f"{type(model).__name__} has no parameters to sample.")
    if params is None:
        return list(named)
    patterns = [params] if isinstance(params, str) else list(params)
    if not patterns:
        raise ValueError("params is empty; pass params=None to sample every parameter.")
    canonical = {id(p): name for name, p in named.items()}  # tied parameters: one name
    modules = {name: module for name, module in model.named_modules() if name}
    chosen: set[str] = set()
    for pattern in patterns:
        hits = {name for name in named if fnmatch.fnmatchcase(name, pattern)}
        matched = [m for name, m in modules.items() if fnmatch.fnmatchcase(name, pattern)]
        hits.update(canonical[id(p)] for module in matched for p in module.parameters())
        if not hits:
            suggestions = closest(pattern, [*modules, *named])
            hint = f" Did you mean {' or '.join(map(repr, suggestions))}?" if suggestions else ""
            what = "holds no parameters" if matched else "matches no parameter or module"
            raise SiteNotFoundError(
                f"params entry {pattern!r} {what} in {type(model).__name__}.{hint} List the "
                "candidates with [name for name, _ in model.named_parameters()]."
            )
        chosen |= hits
    return [name for name in named if name in chosen]


def check_settings(**settings: Any) -> dict[str, Any]:
    """Validate the sampler settings; return them as a JSON-able dict."""
    for key, enum in [("loss", LLCLoss), ("output_kind", OutputKind)]:
        value = settings[key]
        options = [member.value for member in enum]
        if isinstance(value, str) and value not in options:
            suggestions = closest(value, options, n=1)
            hint = f" Did you mean {suggestions[0]!r}?" if suggestions else ""
            raise ValueError(f"Unknown {key} {value!r}; choose one of {options}.{hint}")
    if not isinstance(settings["loss"], str) and not callable(settings["loss"]):
        raise TypeError(
            "loss must be 'behavioural', 'task', 'output' or a callable "
            f"loss(outputs, batch, reference_outputs), got {type(settings['loss']).__name__}."
        )
    for key in ["step_size", "n_beta", "gamma", "divergence_factor"]:
        value = settings[key]
        if value is None and key == "n_beta":
            continue
        is_number = isinstance(value, (int, float)) and math.isfinite(value)
        if not is_number or value < 0 or (value == 0 and key != "gamma"):
            bound = ">= 0" if key == "gamma" else "> 0"
            raise ValueError(f"{key} must be a finite number {bound}, got {value!r}.")
    for key, least in [("n_chains", 1), ("n_draws", 1), ("n_burnin", 0), ("seed", 0)]:
        value = settings[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{key} must be an integer >= {least}, got {value!r}.")
    parallel = settings["parallel"]
    if not isinstance(parallel, (bool, int)) or (parallel is not True and parallel < 0):
        raise ValueError(
            f"parallel must be True (all chains at once), False (one at a time) or a "
            f"number of chains to run at once, got {parallel!r}."
        )
    for key in ["loss", "output_kind", "task_loss"]:
        value = settings[key]
        if isinstance(value, str):  # str enums included
            settings[key] = str(getattr(value, "value", value))
        elif value is not None:
            settings[key] = getattr(value, "__qualname__", type(value).__qualname__)
    settings.pop("n_beta")  # the value used is LLCResult.n_beta
    return settings
