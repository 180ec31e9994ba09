"""The update rules of the LLC chains: localised SGLD and RMSProp-preconditioned SGLD.

SGLD is stochastic gradient Langevin dynamics (Welling & Teh 2011) with the localisation
term of Lau et al. 2023 (arXiv:2308.12108). The RMSProp-preconditioned variant (Li et al.
2016, "Preconditioned stochastic gradient Langevin dynamics", arXiv:1512.07666) rescales
every coordinate by a running root mean square of its gradient; a 2025 comparison of local
samplers (arXiv:2507.21449) found it the most faithful up to about 10^8 parameters. Both
follow devinterp's ``SGMCMC.sgld`` / ``SGMCMC.rmsprop_sgld`` step for step.

Every tensor here carries a leading chain axis: ``current[name]`` has shape
``(n_chains, *shape)``, and the chains never interact, so one step advances all of them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._checks import closest

__all__ = ["RMSPropSGLD", "SGLD", "SamplerKind", "make_sampler"]


class SamplerKind(str, Enum):
    """Name of a sampler for ``estimate_llc(sampler=...)``: ``"sgld"`` or ``"rmsprop"``."""

    SGLD = "sgld"
    RMSPROP = "rmsprop"


@dataclass(frozen=True)
class SGLD:
    """Localised stochastic gradient Langevin dynamics, ``sampler="sgld"`` (the default).

    One step with step size ε, inverse temperature nβ and localisation γ (the arguments
    ``step_size``, ``n_beta`` and ``gamma`` of :func:`~degen_hooks.llc.estimate_llc`):

        Δw = (ε/2)·(−nβ·∇L_batch(w) − γ·(w − w*)) + N(0, ε·I).

    This is devinterp's ``SGLD(lr=ε, nbeta=nβ, localization=γ)``. It has no settings of its
    own. Its stationary law is biased by about ε·nβ·h/4 (relative) along a direction of loss
    curvature h, so ε·nβ·h must stay well below 1.

    Examples:
        >>> import torch
        >>> sampler = SGLD()
        >>> w = {"w": torch.ones(2, 3)}  # 2 chains of a 3-vector
        >>> state = sampler.init_state(w)
        >>> grads, noise = {"w": torch.zeros(2, 3)}, {"w": torch.zeros(2, 3)}
        >>> sampler.step(w, grads, {"w": torch.zeros(3)}, noise, state,
        ...              step_size=0.1, n_beta=10.0, gamma=2.0)
        >>> w["w"][0]  # w - (ε/2)·γ·w = 1 - 0.1
        tensor([0.9000, 0.9000, 0.9000])
    """

    name: ClassVar[str] = "sgld"

    def init_state(self, current: dict[str, Tensor]) -> dict[str, Tensor]:
        """The sampler's state for the chains ``current``: none for SGLD.

        Args:
            current: Parameters, each of shape ``(n_chains, *shape)``.

        Returns:
            An empty dict.
        """
        return {}

    def step(
        self,
        current: dict[str, Tensor],
        grads: dict[str, Tensor],
        anchor: dict[str, Tensor],
        noise: dict[str, Tensor],
        state: dict[str, Tensor],
        *,
        step_size: float,
        n_beta: float,
        gamma: float,
        burnin: bool = False,
    ) -> None:
        """Advance every chain by one step, in place.

        Args:
            current: Parameters w, each ``(n_chains, *shape)``; updated in place.
            grads: Gradients of the batch loss at ``current``, same shapes.
            anchor: The trained parameters w*, each ``(*shape)``.
            noise: Standard normal draws, same shapes as ``current``.
            state: The dict from :meth:`init_state` (unused).
            step_size: ε.
            n_beta: nβ.
            gamma: γ.
            burnin: Whether this is a burn-in step (unused).
        """
        with torch.no_grad():
            for name, w in current.items():
                # The same operations in the same order as devinterp's SGLD (rounding parity).
                drift = grads[name].mul(n_beta).add_(w - anchor[name], alpha=gamma)
                w.add_(drift, alpha=-step_size / 2).add_(noise[name], alpha=math.sqrt(step_size))

    def settings(self) -> dict[str, Any]:
        """The sampler's name and settings, for ``LLCResult.hyperparameters``."""
        return {"sampler": self.name}


@dataclass(frozen=True)
class RMSPropSGLD:
    """SGLD preconditioned by a running RMS of the gradient, ``sampler="rmsprop"``.

    With g the gradient of the batch loss (not multiplied by nβ):

        V ← α·V + (1 − α)·g²                      (per coordinate, V starts at 0)
        G = 1 / (√V + eps)
        Δw = (ε/2)·G·(−nβ·g − γ·(w − w*)) + √(ε·G)·N(0, I).

    Coordinates with small gradients (flat directions) take steps up to ε/eps, steep ones
    smaller steps, so one ε suits more of the model. G is at most 1/eps = 10 with the
    defaults, so start from a step_size about ten times smaller than SGLD's.

    ``adapt="burnin"`` (the default) updates V during burn-in only and keeps G fixed for
    the draws: they then come from preconditioned Langevin dynamics with a constant G,
    whose stationary law is the target (up to the O(ε) discretisation bias). With
    ``n_burnin=0``, G stays 1/eps. ``adapt="always"`` updates V at every step, as devinterp's
    ``SGMCMC.rmsprop_sgld(lr=ε, nbeta=nβ, localization=γ, alpha=α, eps=eps)`` does, step for
    step. A G that follows the position without the correction term of Li et al. samples
    ∝ exp(−U)/G instead, which over-weights the steep regions where G is small: on the
    calibration potentials (BENCHMARKS.md) that biases the LLC upwards by 3 to 17 %.

    Args:
        alpha: Decay of the running mean of g², in [0, 1).
        eps: Added to √V; bounds the preconditioner by 1/eps. Must be > 0.
        adapt: ``"burnin"`` or ``"always"`` (devinterp's): when V is updated.

    Raises:
        ValueError: If ``alpha`` is outside [0, 1), ``eps`` is not positive or ``adapt``
            is unknown.

    Examples:
        >>> RMSPropSGLD()
        RMSPropSGLD(alpha=0.99, eps=0.1, adapt='burnin')
        >>> RMSPropSGLD(alpha=1.0)
        Traceback (most recent call last):
        ...
        ValueError: RMSPropSGLD(alpha=1.0): alpha must be in [0, 1) ...
    """

    name: ClassVar[str] = "rmsprop"
    alpha: float = 0.99
    eps: float = 0.1
    adapt: str = "burnin"

    def __post_init__(self) -> None:
        if self.adapt not in ("burnin", "always"):
            raise ValueError(
                f"RMSPropSGLD(adapt={self.adapt!r}): adapt must be 'burnin' (adapt the "
                "preconditioner during burn-in, then keep it) or 'always' (devinterp's)."
            )
        if not (isinstance(self.alpha, (int, float)) and 0 <= self.alpha < 1):
            raise ValueError(
                f"RMSPropSGLD(alpha={self.alpha!r}): alpha must be in [0, 1) (the running "
                "mean's decay; 0.99 is devinterp's default)."
            )
        if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(
                f"RMSPropSGLD(eps={self.eps!r}): eps must be a finite number > 0 (it bounds "
                "the preconditioner by 1/eps; 0.1 is devinterp's default)."
            )

    def init_state(self, current: dict[str, Tensor]) -> dict[str, Tensor]:
        """The running mean of g², zero, one tensor per parameter (``(n_chains, *shape)``).

        Args:
            current: Parameters, each of shape ``(n_chains, *shape)``.

        Returns:
            ``{name: zeros_like(current[name])}``.
        """
        return {name: torch.zeros_like(w) for name, w in current.items()}

    def step(
        self,
        current: dict[str, Tensor],
        grads: dict[str, Tensor],
        anchor: dict[str, Tensor],
        noise: dict[str, Tensor],
        state: dict[str, Tensor],
        *,
        step_size: float,
        n_beta: float,
        gamma: float,
        burnin: bool = False,
    ) -> None:
        """Advance every chain by one step, in place (see :meth:`SGLD.step` for the args).

        Args:
            current: Parameters w, each ``(n_chains, *shape)``; updated in place.
            grads: Gradients of the batch loss at ``current``, same shapes.
            anchor: The trained parameters w*, each ``(*shape)``.
            noise: Standard normal draws, same shapes as ``current``.
            state: The running means of g² from :meth:`init_state`; updated in place.
            step_size: ε.
            n_beta: nβ.
            gamma: γ.
            burnin: Whether this is a burn-in step: with ``adapt="burnin"``, V is updated
                only then.
        """
        is_adapting = burnin or self.adapt == "always"
        with torch.no_grad():
            for name, w in current.items():
                grad = grads[name]
                square_avg = state[name]
                if is_adapting:
                    square_avg.mul_(self.alpha).addcmul_(grad, grad, value=1 - self.alpha)
                preconditioner = square_avg.sqrt().add_(self.eps).reciprocal_()
                drift = preconditioner * grad.mul(n_beta)
                drift.add_(preconditioner * (w - anchor[name]).mul_(gamma))
                w.add_(drift, alpha=-0.5 * step_size)
                w.add_(preconditioner.sqrt_().mul_(noise[name]), alpha=math.sqrt(step_size))

    def settings(self) -> dict[str, Any]:
        """The sampler's name and settings, for ``LLCResult.hyperparameters``."""
        return {"sampler": self.name, **{f"rmsprop_{k}": v for k, v in asdict(self).items()}}


Sampler = SGLD | RMSPropSGLD


def make_sampler(sampler: str | SamplerKind | Sampler) -> Sampler:
    """The sampler object for ``estimate_llc(sampler=...)``: a name or an instance.

    Raises:
        ValueError: For an unknown name (with the closest one).
        TypeError: For anything else.
    """
    if isinstance(sampler, (SGLD, RMSPropSGLD)):
        return sampler
    if isinstance(sampler, str):
        names = [kind.value for kind in SamplerKind]
        if sampler not in names:
            suggestion = closest(str(sampler), names, n=1)
            hint = f" Did you mean {suggestion[0]!r}?" if suggestion else ""
            raise ValueError(
                f"Unknown sampler {sampler!r}; choose one of {names}, or pass an instance "
                f"such as dh.llc.RMSPropSGLD(alpha=0.99, eps=0.1).{hint}"
            )
        return SGLD() if SamplerKind(sampler) is SamplerKind.SGLD else RMSPropSGLD()
    raise TypeError(
        f"sampler must be 'sgld', 'rmsprop' or an SGLD / RMSPropSGLD instance, got "
        f"{type(sampler).__name__}."
    )
