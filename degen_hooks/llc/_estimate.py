"""estimate_llc(): validate the inputs, run the chains, summarise and diagnose them."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from .._errors import DivergenceError
from ._chains import ChainRunner, Diverged, Traces, VectorizeError
from ._checks import check_settings, count_samples, select_params
from ._diagnostics import Diagnostic, DiagnosticKind, diagnose
from ._losses import LLCLoss, LossFn, OutputKind, check_behavioural_outputs, make_loss
from ._potential import PotentialModule, model_and_data
from ._presets import PRESET_DEFAULTS, Preset, default_n_beta, make_preset
from ._result import LLCResult
from ._samplers import SGLD, RMSPropSGLD, make_sampler

__all__ = ["estimate_llc"]


def estimate_llc(
    model: nn.Module | Callable[[Any], Tensor],
    data: Iterable[Any] | None = None,
    *,
    loss: str | LLCLoss | LossFn = "behavioural",
    output_kind: str | OutputKind = "regression",
    task_loss: Callable[[Tensor, Tensor], Tensor] | None = None,
    sampler: str | SGLD | RMSPropSGLD = "sgld",
    preset: str | Preset = "degen_hooks",
    step_size: float | None = None,
    n_beta: float | None = None,
    gamma: float | None = None,
    n_chains: int = 4,
    n_draws: int = 200,
    n_burnin: int | None = None,
    seed: int = 0,
    params: str | Sequence[str] | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    at: Tensor | Mapping[str, Tensor] | None = None,
    parallel: bool | int = True,
    divergence_factor: float = 100.0,
    progress: bool = True,
) -> LLCResult:
    """Estimate the local learning coefficient of ``model`` at its current parameters w*.

    Each chain starts at w* and takes ``n_burnin + n_draws`` steps of ``sampler``, one batch
    each, cycling through ``data`` from its first batch. With ``sampler="sgld"``:

        Δw = (ε/2)·(−nβ·∇L_batch(w) − γ·(w − w*)) + N(0, ε·I),

    where L_batch is the mean loss over the batch. A chain's estimate is
    nβ·mean_t(L_t(w_t) − L_t(w*)) over its draws, both losses taken on draw t's batch (a
    paired difference). The chains run together on stacked copies of the parameters
    (``torch.func.vmap``); chain c draws its noise from its own generator, so it gives the
    same trace (to rounding) alone or stacked. The model runs in eval mode on its own
    device and dtype. Its parameters, buffers, gradients, ``requires_grad`` flags and
    train/eval modes, and the global RNG state, are the same afterwards.

    Args:
        model: The trained model, whose ``model(inputs)`` (or ``forward(model, batch)``)
            returns a tensor of shape ``(batch, ...)``, or one number when it is itself a
            loss (then pass ``loss="output"``). Or a potential: a function
            ``K(w) -> scalar`` of the tensor (or dict of tensors) ``at``, sampled around
            ``at`` without data or model.
        data: A re-iterable of batches, such as a list or a ``DataLoader``; ``None`` for a
            potential. A batch is a tensor ``(batch, ...)`` or a tuple
            ``(inputs, targets)`` whose first element is fed to the model. A shuffling
            ``DataLoader`` draws its order from the global RNG (restored afterwards).
        loss: ``"behavioural"``: divergence from the trained model's outputs on the same
            batch (see ``output_kind``), zero at w*; refused for a model that returns one
            number per batch. ``"task"``: ``task_loss(outputs, targets)`` on
            ``(inputs, targets)`` batches. ``"output"``: the model's output itself (one
            number, minimal at w*); the default for a potential. Or a callable
            ``loss(outputs, batch, reference_outputs) -> scalar``.
        output_kind: For the behavioural loss. ``"regression"``: squared error summed over
            the last axis and averaged over the others. ``"logits"``: KL(trained ‖ sampled)
            between softmaxes over the last axis, averaged over the others.
        task_loss: ``(outputs, targets) -> scalar`` for ``loss="task"``; by default
            cross-entropy with the logits on the last axis.
        sampler: ``"sgld"`` (:class:`~degen_hooks.llc.SGLD`) or ``"rmsprop"``
            (:class:`~degen_hooks.llc.RMSPropSGLD` with ``alpha=0.99, eps=0.1``), or an
            instance with other settings. RMSProp's steps are up to 1/eps times larger.
        preset: ``"degen_hooks"`` or ``"devinterp"``: the defaults of ``step_size``,
            ``gamma``, ``n_beta`` and ``n_burnin``, and how the loss at w* is taken (see
            :class:`~degen_hooks.llc.Preset`). devinterp's ``lr``, ``localization`` and
            ``nbeta`` are ``step_size``, ``gamma`` and ``n_beta``.
        step_size: Step size ε (devinterp's ``lr``); default 1e-4 (devinterp: 0.01). Keep
            ε·nβ·(largest loss curvature) well below 1: the estimate is biased upwards by
            roughly that fraction over 4.
        n_beta: Inverse temperature nβ. Default n/log(n), n being the number of samples in
            ``data`` (``len(data.dataset)`` for a ``DataLoader``); devinterp: B/log(B) for
            batch size B, much smaller. Required for a potential.
        gamma: Localisation strength γ pulling the draws back to w* (devinterp's
            ``localization``); default 100 (devinterp: 0). Keep it small compared with nβ
            times the loss curvature, or the LLC is underestimated.
        n_chains: Number of independent chains; the standard error is across chains.
        n_draws: Draws per chain after burn-in; each draw is one step.
        n_burnin: Steps discarded at the start of each chain; default 50 (devinterp: 0).
        seed: Seeds one local ``torch.Generator`` per chain (from
            ``numpy.random.SeedSequence(seed)``); the global RNG is not used.
        params: Restrict sampling to some parameters (per-layer LLC); the others stay at
            w*. Parameter names, ``named_modules()`` paths (all parameters below the
            module) or glob patterns over either (``*`` also matches dots). Default: all
            parameters, including those with ``requires_grad=False``.
        forward: ``forward(model, batch) -> outputs`` for models needing more than
            ``model(inputs)``. It is called with the sampled parameters swapped in.
        at: For a potential: the point w* (a floating tensor, or a dict of them).
        parallel: ``True``: all chains advance together (one vmapped forward and backward
            pass a step; memory grows with ``n_chains``). An integer k: k chains at a time.
            ``False``: one chain at a time. A model or loss that ``vmap`` cannot run falls
            back to one chain at a time, with a warning.
        divergence_factor: A draw whose loss exceeds the loss at w* by this factor times
            ``max(|L(w*)|, n_params/(2nβ))`` (the second term being the loss increase of a
            regular model) is declared divergent.
        progress: Show a tqdm progress bar over the steps.

    Returns:
        An :class:`~degen_hooks.llc.LLCResult`, whose ``diagnostics`` list what looks wrong
        (each is also issued as a ``RuntimeWarning``): a negative estimate, a step too small
        to move, chains that disagree (R̂), few effective draws, a trace still drifting.

    Raises:
        DivergenceError: If a chain's loss becomes NaN or infinite, or explodes;
            ``err.result`` holds the traces up to there, for ``err.result.plot_trace()``.
        EmptyStatisticsError: If ``data`` yields no batches.
        NonFiniteError: If the loss at w* is NaN or infinite.
        SiteNotFoundError: If an entry of ``params`` matches no parameter or module.
        ValueError: For invalid settings, a one-shot iterator or bare tensor as ``data``,
            or the behavioural loss of a model that returns one number per batch.
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

        A potential needs neither model nor data; K = w1² + w2⁴ has λ = 1/2 + 1/4:

        >>> result = estimate_llc(
        ...     lambda w: w[0] ** 2 + w[1] ** 4, at=torch.zeros(2, dtype=torch.float64),
        ...     n_beta=100.0, step_size=1e-3, gamma=0.0, n_chains=16, n_draws=2000,
        ...     progress=False,
        ... )
        >>> abs(result.llc - 0.75) < 0.1
        True
    """
    preset = make_preset(preset)
    defaults = PRESET_DEFAULTS[preset]
    step_size = defaults["step_size"] if step_size is None else step_size
    gamma = defaults["gamma"] if gamma is None else gamma
    n_burnin = int(defaults["n_burnin"]) if n_burnin is None else n_burnin
    model, data, loss = model_and_data(model, data, at, loss, n_beta)
    the_sampler = make_sampler(sampler)
    if preset is Preset.DEVINTERP and isinstance(the_sampler, RMSPropSGLD) and sampler == "rmsprop":
        the_sampler = RMSPropSGLD(adapt="always")  # devinterp adapts at every step
    settings = check_settings(
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
        parallel=parallel,
    )
    settings.update(the_sampler.settings(), preset=preset.value)
    loss_fn = make_loss(loss, output_kind, task_loss)
    is_behavioural = isinstance(loss, str) and LLCLoss(loss) is LLCLoss.BEHAVIOURAL
    device = next(model.parameters(), torch.empty(0)).device
    # fork_rng restores the global RNG, which a shuffling DataLoader draws from even to
    # count or iterate; inference_mode(False) and enable_grad let us differentiate.
    with (
        torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []),
        torch.inference_mode(False),
        torch.enable_grad(),
    ):
        n_samples = None if isinstance(model, PotentialModule) else count_samples(data)
        if n_beta is None:
            n_beta, settings["n_beta_source"] = default_n_beta(preset, data, n_samples or 0)
        else:
            settings["n_beta_source"] = "user"
        names = select_params(model, params)
        runner = ChainRunner(
            model,
            names,
            forward,
            loss_fn,
            data,
            the_sampler,
            {**settings, "n_beta": n_beta},
            check_outputs=check_behavioural_outputs if is_behavioural else None,
        )
        run = dict(model=model, runner=runner, settings=settings, progress=progress)
        try:
            traces, init_loss = _run_chains(**run)
        except Diverged as diverged:
            partial = _summarise(diverged.traces, n_beta, n_samples, runner, names, settings)
            divergence = Diagnostic(
                DiagnosticKind.DIVERGENCE.value,
                str(diverged),
                chains=diverged.chains,
                step=diverged.step,
            )
            error = DivergenceError(str(diverged))
            error.result = _with_divergence(partial, divergence)  # type: ignore[attr-defined]
            raise error from None
    result = _summarise(traces, n_beta, n_samples, runner, names, settings, init_loss)
    for diagnostic in result.diagnostics:
        warnings.warn(diagnostic.message, RuntimeWarning, stacklevel=2)
    return result


def _groups(n_chains: int, parallel: bool | int) -> list[range]:
    size = n_chains if parallel is True else max(int(parallel), 1)
    return [range(start, min(start + size, n_chains)) for start in range(0, n_chains, size)]


def _run_chains(
    model: nn.Module, runner: ChainRunner, settings: dict[str, Any], progress: bool
) -> tuple[Traces, float | None]:
    """Run the chains in groups, in eval mode; restore every module's train/eval flag.

    Returns:
        The traces, and devinterp's loss at w* for ``preset="devinterp"`` (else ``None``).
    """
    n_chains, n_draws, n_burnin = settings["n_chains"], settings["n_draws"], settings["n_burnin"]
    seeds = np.random.SeedSequence(settings["seed"]).generate_state(n_chains)
    modes = {module: module.training for module in model.modules()}
    parallel = settings["parallel"]
    done: list[Traces] = []
    try:
        model.eval()
        with tqdm(
            total=n_chains * (n_burnin + n_draws),
            disable=not progress,
            desc=runner.sampler.name.upper(),
        ) as bar:
            while len(done) < len(groups := _groups(n_chains, parallel)):
                group = groups[len(done)]
                try:
                    traces = runner.run(
                        [int(s) for s in seeds[group.start : group.stop]],
                        group.start,
                        n_burnin,
                        n_draws,
                        vectorize=len(group) > 1,
                        on_step=bar.update,
                    )
                except VectorizeError as err:
                    warnings.warn(
                        f"The chains run one after another: torch.func.vmap cannot run this "
                        f"model or loss ({err}). Pass parallel=False to skip the attempt.",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                    parallel, done = False, []
                    bar.reset()
                    continue
                except Diverged as diverged:
                    raise Diverged(
                        str(diverged),
                        _concatenate(done, diverged.traces),
                        diverged.chains,
                        diverged.step,
                    ) from None
                done.append(traces)
        init_loss = None
        if settings["preset"] == Preset.DEVINTERP.value:  # over the first n_chains batches
            init_loss = runner.mean_loss_at_anchor(n_chains)
    finally:
        # Restore the flags themselves: calling train() again could run user overrides.
        for module, is_training in modes.items():
            module.training = is_training
    settings["parallel"] = parallel
    return _concatenate(done[:-1], done[-1]), init_loss


def _concatenate(done: list[Traces], last: Traces) -> Traces:
    """Stack groups of chains; earlier groups are cut to the length of the last one."""
    n_steps = last.losses.shape[1]
    references = [
        np.broadcast_to(t.references[:n_steps], t.losses[:, :n_steps].shape) for t in done
    ]
    return Traces(
        np.concatenate([t.losses[:, :n_steps] for t in done] + [last.losses]),
        np.concatenate([*references, np.broadcast_to(last.references, last.losses.shape)]),
        np.concatenate([t.max_displacement for t in done] + [last.max_displacement]),
    )


def _summarise(
    traces: Traces,
    n_beta: float,
    n_samples: int | None,
    runner: ChainRunner,
    names: list[str],
    settings: dict[str, Any],
    init_loss: float | None = None,
) -> LLCResult:
    n_burnin = min(settings["n_burnin"], traces.losses.shape[1])
    losses = np.broadcast_to(traces.references, traces.losses.shape)
    draws, references = traces.losses[:, n_burnin:], losses[:, n_burnin:]
    llc_traces = n_beta * (draws - references)
    n_chains = len(draws)
    if not draws.size:  # diverged during burn-in
        llc_per_chain, init_loss = np.full(n_chains, math.nan), math.nan
    elif init_loss is None:  # paired: each draw against w* on its own batch
        llc_per_chain = llc_traces.mean(axis=1)
        init_loss = float(references.mean())
    else:  # devinterp: every draw against one mean loss at w*
        llc_per_chain = n_beta * (draws.mean(axis=1) - init_loss)
    llc = float(llc_per_chain.mean()) if draws.size else math.nan
    std_err = float(llc_per_chain.std(ddof=1) / math.sqrt(n_chains)) if n_chains > 1 else math.nan
    diagnostics, r_hat, ess = [], math.nan, math.nan
    if traces.max_displacement.size:  # a finished run, not a divergence
        diagnostics, r_hat, ess = diagnose(
            llc_traces, llc, max_displacement=traces.max_displacement, settings=settings
        )
    return LLCResult(
        llc=llc,
        llc_std_err=std_err,
        llc_per_chain=torch.from_numpy(np.array(llc_per_chain, dtype=np.float64)),
        loss_traces=torch.from_numpy(np.array(draws, dtype=np.float64)),
        init_loss=init_loss,
        n_beta=float(n_beta),
        n_samples=n_samples,
        n_params=runner.n_params,
        param_names=tuple(names),
        hyperparameters=dict(settings),
        burnin_traces=torch.from_numpy(np.array(traces.losses[:, :n_burnin], dtype=np.float64)),
        diagnostics=tuple(diagnostics),
        r_hat=r_hat,
        ess=ess,
    )


def _with_divergence(result: LLCResult, divergence: Diagnostic) -> LLCResult:
    """The partial result of a diverged run: its traces and the divergence, no estimate."""
    return dataclasses.replace(
        result,
        llc=math.nan,
        llc_std_err=math.nan,
        llc_per_chain=torch.full_like(result.llc_per_chain, math.nan),
        diagnostics=(divergence,),
    )
