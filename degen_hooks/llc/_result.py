"""LLCResult: the estimate, its chains, traces and diagnostics, and a safetensors+JSON form."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ._diagnostics import Diagnostic
from ._plot import plot_trace

__all__ = ["LLCResult"]


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)


@dataclass(frozen=True, eq=False)
class LLCResult:
    """Outcome of :func:`~degen_hooks.llc.estimate_llc`.

    Attributes:
        llc: The LLC estimate λ̂, the mean of ``llc_per_chain``.
        llc_std_err: Standard error of ``llc`` across chains (NaN for one chain).
        llc_per_chain: λ̂ of each chain, shape ``(n_chains,)``, float64.
        loss_traces: Batch loss at each draw, shape ``(n_chains, n_draws)``, float64.
        init_loss: Mean batch loss at the trained parameters w* over the draws' batches
            (with ``preset="devinterp"``: over the first ``n_chains`` batches).
        n_beta: The inverse temperature nβ used.
        n_samples: Number of samples in one pass over the data (``None`` for a potential).
        n_params: Number of sampled scalar parameters.
        param_names: Names of the sampled parameters, in ``named_parameters()`` order.
        hyperparameters: Settings of the run (``sampler``, ``step_size``, ``gamma``,
            ``seed``, ``preset``, ...).
        burnin_traces: Batch loss at each burn-in step, shape ``(n_chains, n_burnin)``.
        diagnostics: Problems found in the chains, each with a message (empty if none):
            see :class:`~degen_hooks.llc.Diagnostic`.
        r_hat: Gelman-Rubin R̂ of the per-draw traces nβ·(L − L*) across chains (NaN for
            one chain); near 1 when the chains agree.
        ess: Effective sample size of those traces over all chains.

    Examples:
        >>> import torch
        >>> result = LLCResult(
        ...     llc=2.0, llc_std_err=0.1, llc_per_chain=torch.tensor([1.9, 2.1]),
        ...     loss_traces=torch.zeros(2, 5), init_loss=0.0, n_beta=100.0, n_samples=1000,
        ...     n_params=4, param_names=("weight",),
        ... )
        >>> result.n_eff
        4.0
        >>> LLCResult.from_state_dict(result.state_dict(), result.metadata()).llc
        2.0
        >>> result.is_healthy
        True
    """

    llc: float
    llc_std_err: float
    llc_per_chain: Tensor
    loss_traces: Tensor
    init_loss: float
    n_beta: float
    n_samples: int | None
    n_params: int
    param_names: tuple[str, ...]
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    burnin_traces: Tensor = field(default_factory=lambda: torch.zeros(0, 0))
    diagnostics: tuple[Diagnostic, ...] = ()
    r_hat: float = math.nan
    ess: float = math.nan

    def __post_init__(self) -> None:
        if self.burnin_traces.numel() == 0 and self.burnin_traces.shape[0] != len(self.loss_traces):
            object.__setattr__(
                self, "burnin_traces", torch.zeros(len(self.loss_traces), 0, dtype=torch.float64)
            )

    @property
    def n_eff(self) -> float:
        """Effective parameter count N_eff = 2·λ̂ (equal to d for a regular model)."""
        return 2.0 * self.llc

    @property
    def is_healthy(self) -> bool:
        """Whether no diagnostic was raised (see :attr:`diagnostics`)."""
        return not self.diagnostics

    def diagnostic(self, kind: str) -> Diagnostic | None:
        """The diagnostic of this kind (``"stuck"``, ``"not_flat"``, ...), or ``None``."""
        return next((d for d in self.diagnostics if d.kind == kind), None)

    def __repr__(self) -> str:
        n_chains, n_draws = self.loss_traces.shape
        flags = f", diagnostics={[d.kind for d in self.diagnostics]}" if self.diagnostics else ""
        return (
            f"LLCResult(llc={self.llc:.4g} ± {self.llc_std_err:.2g}, n_params={self.n_params}, "
            f"n_beta={self.n_beta:.4g}, n_chains={n_chains}, n_draws={n_draws}, "
            f"r_hat={self.r_hat:.3g}, ess={self.ess:.3g}{flags})"
        )

    def state_dict(self) -> dict[str, Tensor]:
        """The tensors of the result, for safetensors; the rest is in :meth:`metadata`."""
        return {
            "llc_per_chain": self.llc_per_chain,
            "loss_traces": self.loss_traces,
            "burnin_traces": self.burnin_traces,
        }

    def metadata(self) -> dict[str, Any]:
        """Everything but the tensors, as a JSON-able dict (a NaN becomes ``None``)."""
        return {
            "type": "LLCResult",
            "llc": self.llc,
            "llc_std_err": _finite_or_none(self.llc_std_err),
            "init_loss": self.init_loss,
            "n_beta": self.n_beta,
            "n_samples": self.n_samples,
            "n_params": self.n_params,
            "param_names": list(self.param_names),
            "hyperparameters": dict(self.hyperparameters),
            "diagnostics": [d.to_dict() for d in self.diagnostics],
            "r_hat": _finite_or_none(self.r_hat),
            "ess": _finite_or_none(self.ess),
        }

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, Tensor], metadata: Mapping[str, Any]
    ) -> LLCResult:
        """Rebuild a result from :meth:`state_dict` and :meth:`metadata`.

        Args:
            state_dict: ``llc_per_chain`` (shape ``(n_chains,)``), ``loss_traces``
                (shape ``(n_chains, n_draws)``) and ``burnin_traces`` (absent in results
                saved before burn-in traces were kept).
            metadata: The dict from :meth:`metadata`, e.g. after a JSON round trip.

        Returns:
            The result that produced them.
        """
        n_samples = metadata["n_samples"]
        return cls(
            llc=float(metadata["llc"]),
            llc_std_err=_float(metadata["llc_std_err"]),
            llc_per_chain=state_dict["llc_per_chain"],
            loss_traces=state_dict["loss_traces"],
            init_loss=float(metadata["init_loss"]),
            n_beta=float(metadata["n_beta"]),
            n_samples=None if n_samples is None else int(n_samples),
            n_params=int(metadata["n_params"]),
            param_names=tuple(metadata["param_names"]),
            hyperparameters=dict(metadata["hyperparameters"]),
            burnin_traces=state_dict.get("burnin_traces", torch.zeros(0, 0)),
            diagnostics=tuple(Diagnostic.from_dict(d) for d in metadata.get("diagnostics", [])),
            r_hat=_float(metadata.get("r_hat")),
            ess=_float(metadata.get("ess")),
        )

    def plot_trace(self, ax: Any = None) -> Any:
        """Plot each chain's batch loss against the step, burn-in included (needs matplotlib).

        Burn-in steps are drawn faintly on a grey band left of 0. A trace that drifts
        instead of fluctuating around a level has not mixed: use more burn-in or a larger
        ``step_size``. A trace below ``init_loss`` means w* is not a local minimum of the
        loss. Every diagnostic is listed in a box (a divergence is also marked with a red
        cross where it happened). In a notebook the returned figure displays itself.

        Args:
            ax: A matplotlib ``Axes`` to draw on; a new figure is made if ``None``.

        Returns:
            The matplotlib ``Figure`` holding the plot.
        """
        return plot_trace(self, ax)
