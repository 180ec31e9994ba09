"""estimate_llc(): validate the inputs, run the SGLD chains, summarise them as an LLCResult."""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from .._checks import closest
from .._errors import EmptyStatisticsError, SiteNotFoundError
from ._losses import LLCLoss, LossFn, OutputKind, make_loss
from ._result import LLCResult
from ._sampler import Chain, Sampler, batch_size

__all__ = ["estimate_llc"]


def estimate_llc(
    model: nn.Module,
    data: Iterable[Any],
    *,
    loss: str | LLCLoss | LossFn = "behavioural",
    output_kind: str | OutputKind = "regression",
    task_loss: Callable[[Tensor, Tensor], Tensor] | None = None,
    step_size: float = 1e-4,
    n_beta: float | None = None,
    gamma: float = 100.0,
    n_chains: int = 4,
    n_draws: int = 200,
    n_burnin: int = 50,
    seed: int = 0,
    params: str | Sequence[str] | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    divergence_factor: float = 100.0,
    progress: bool = True,
) -> LLCResult:
    """Estimate the local learning coefficient of ``model`` at its current parameters w*.

    Each chain starts at w* and takes ``n_burnin + n_draws`` SGLD steps, one batch each,
    cycling through ``data`` from its first batch:

        Δw = (ε/2)·(−nβ·∇L_batch(w) − γ·(w − w*)) + N(0, ε·I),

    where L_batch is the mean loss over the batch. A chain's estimate is
    nβ·mean_t(L_t(w_t) − L_t(w*)) over its draws, both losses taken on draw t's batch (a
    paired difference; with a fixed batch order it equals nβ·(mean trace − init_loss)).
    The model runs in eval mode on its own device and dtype. Its parameters, buffers,
    gradients, ``requires_grad`` flags and train/eval modes, and the global RNG state, are
    the same afterwards.

    Args:
        model: The trained model. ``model(inputs)`` (or ``forward(model, batch)``) must
            return a tensor of shape ``(batch, ...)``.
        data: A re-iterable of batches, such as a list or a ``DataLoader``. A batch is a
            tensor ``(batch, ...)`` or a tuple ``(inputs, targets)`` whose first element is
            fed to the model. A shuffling ``DataLoader`` draws its order from the global
            RNG as usual (restored afterwards); give it a ``generator`` to fix the order.
        loss: ``"behavioural"``: divergence from the trained model's outputs on the same
            batch (see ``output_kind``), zero at w*. ``"task"``:
            ``task_loss(outputs, targets)`` on ``(inputs, targets)`` batches. Or a callable
            ``loss(outputs, batch, reference_outputs) -> scalar``, ``reference_outputs``
            being the outputs at w*.
        output_kind: For the behavioural loss. ``"regression"``: squared error summed over
            the last axis and averaged over the others. ``"logits"``: KL(trained ‖ sampled)
            between softmaxes over the last axis, averaged over the others.
        task_loss: ``(outputs, targets) -> scalar`` for ``loss="task"``; by default
            cross-entropy with the logits on the last axis.
        step_size: SGLD step size ε. Keep ε·nβ·(largest loss curvature) well below 1; the
            estimate is biased upwards by roughly that fraction over 4.
        n_beta: Inverse temperature nβ. Default n/log(n), n being the number of samples in
            ``data`` (``len(data.dataset)`` for a ``DataLoader``). devinterp's default,
            B/log(B) for batch size B, is much smaller.
        gamma: Localisation strength γ, pulling the draws back to w*. Keep it small
            compared with nβ times the loss curvature, or the LLC is underestimated.
        n_chains: Number of independent chains; the standard error is across chains.
        n_draws: Draws per chain after burn-in; each draw is one SGLD step.
        n_burnin: Steps discarded at the start of each chain.
        seed: Seeds a local ``torch.Generator`` for the SGLD noise, with an independent
            stream per chain; the global RNG is not used.
        params: Restrict sampling to some parameters (per-layer LLC); the others stay at
            w*. Parameter names, ``named_modules()`` paths (all parameters below the
            module) or glob patterns over either (``*`` also matches dots). Default: all
            parameters, including those with ``requires_grad=False``.
        forward: ``forward(model, batch) -> outputs`` for models needing more than
            ``model(inputs)``. It is called with the sampled parameters swapped in.
        divergence_factor: A draw whose loss exceeds the loss at w* by this factor times
            ``max(|L(w*)|, n_params/(2nβ))`` (the second term being the loss increase of a
            regular model) is declared divergent.
        progress: Show a tqdm progress bar over the steps.

    Returns:
        An :class:`~degen_hooks.llc.LLCResult`.

    Raises:
        DivergenceError: If a chain's loss becomes NaN or infinite, or explodes.
        EmptyStatisticsError: If ``data`` yields no batches.
        NonFiniteError: If the loss at w* is NaN or infinite.
        SiteNotFoundError: If an entry of ``params`` matches no parameter or module.
        ValueError: For invalid settings, or a one-shot iterator or bare tensor as ``data``.
        TypeError: If the outputs are not a tensor or a batch has an unexpected type.

    Examples:
        >>> import torch
        >>> from degen_hooks.llc import estimate_llc
        >>> model = torch.nn.Linear(3, 2)  # d = 8 parameters, regular: λ = d/2 = 4
        >>> g = torch.Generator().manual_seed(0)
        >>> data = [torch.randn(256, 3, generator=g) for _ in range(4)]
        >>> result = estimate_llc(
        ...     model, data, step_size=5e-4, gamma=10.0, n_draws=300, progress=False
        ... )
        >>> result.n_params, round(result.n_beta, 1)  # nβ = n/log(n) with n = 1024
        (8, 147.7)
        >>> 3.0 < result.llc < 5.0
        True
    """
    settings = _check_settings(
        loss=loss,
        output_kind=output_kind,
        task_loss=task_loss,
        step_size=step_size,
        n_beta=n_beta,
        gamma=gamma,
        n_chains=n_chains,
        n_draws=n_draws,
        n_burnin=n_burnin,
        seed=seed,
        divergence_factor=divergence_factor,
    )
    loss_fn = make_loss(loss, output_kind, task_loss)
    device = next(model.parameters(), torch.empty(0)).device
    # fork_rng restores the global RNG, which a shuffling DataLoader draws from even to
    # count or iterate; inference_mode(False) and enable_grad let us differentiate.
    with (
        torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []),
        torch.inference_mode(False),
        torch.enable_grad(),
    ):
        n_samples = _count_samples(data)
        if n_beta is None:
            if n_samples < 2:
                raise ValueError(
                    f"The default n_beta = n/log(n) needs n >= 2 samples, but data holds "
                    f"{n_samples}. Pass n_beta explicitly."
                )
            n_beta = n_samples / math.log(n_samples)
        names = _select_params(model, params)
        sampler = Sampler(model, names, forward, loss_fn, data, n_beta, divergence_factor)
        chains = _run_chains(model, sampler, settings, progress)
    return _summarise(chains, n_beta, n_samples, sampler.n_params, names, settings)


def _run_chains(
    model: nn.Module, sampler: Sampler, settings: dict[str, Any], progress: bool
) -> list[Chain]:
    """Run the chains in eval mode, then restore every module's train/eval flag."""
    n_chains, n_draws, n_burnin = settings["n_chains"], settings["n_draws"], settings["n_burnin"]
    seeds = np.random.SeedSequence(settings["seed"]).generate_state(n_chains)
    modes = {module: module.training for module in model.modules()}
    chains: list[Chain] = []
    try:
        model.eval()
        with tqdm(total=n_chains * (n_burnin + n_draws), disable=not progress, desc="SGLD") as bar:
            for chain, seed in enumerate(seeds):
                bar.set_postfix(chain=chain)
                draws = sampler.run_chain(
                    chain=chain,
                    seed=int(seed),
                    step_size=settings["step_size"],
                    gamma=settings["gamma"],
                    n_burnin=n_burnin,
                    n_draws=n_draws,
                    on_step=bar.update,
                )
                chains.append(draws)
    finally:
        # Restore the flags themselves: calling train() again could run user overrides.
        for module, is_training in modes.items():
            module.training = is_training
    return chains


def _summarise(
    chains: list[Chain],
    n_beta: float,
    n_samples: int,
    n_params: int,
    names: list[str],
    settings: dict[str, Any],
) -> LLCResult:
    loss_traces = torch.tensor([trace for trace, _ in chains], dtype=torch.float64)
    reference_traces = torch.tensor([ref for _, ref in chains], dtype=torch.float64)
    llc_per_chain = n_beta * (loss_traces - reference_traces).mean(dim=1)
    llc = float(llc_per_chain.mean())
    n_chains = len(chains)
    std_err = float(llc_per_chain.std() / math.sqrt(n_chains)) if n_chains > 1 else math.nan
    if llc < 0:
        warnings.warn(
            f"The LLC estimate is negative ({llc:.3g}): the chains found lower loss than at "
            "w*, so w* is not a local minimum of this loss. Train further, or use the "
            "behavioural loss, which is minimal at w* by construction.",
            RuntimeWarning,
            stacklevel=3,
        )
    return LLCResult(
        llc=llc,
        llc_std_err=std_err,
        llc_per_chain=llc_per_chain,
        loss_traces=loss_traces,
        init_loss=float(reference_traces.mean()),
        n_beta=float(n_beta),
        n_samples=n_samples,
        n_params=n_params,
        param_names=tuple(names),
        hyperparameters=settings,
    )


def _count_samples(data: Iterable[Any]) -> int:
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


def _select_params(model: nn.Module, params: str | Sequence[str] | None) -> list[str]:
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


def _check_settings(**settings: Any) -> dict[str, Any]:
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
            "loss must be 'behavioural', 'task' or a callable "
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
    for key in ["loss", "output_kind", "task_loss"]:
        value = settings[key]
        if isinstance(value, str):  # str enums included
            settings[key] = str(getattr(value, "value", value))
        elif value is not None:
            settings[key] = getattr(value, "__qualname__", type(value).__qualname__)
    settings["n_beta_source"] = "n/log(n)" if settings["n_beta"] is None else "user"
    settings.pop("n_beta")  # the value used is LLCResult.n_beta
    return settings
