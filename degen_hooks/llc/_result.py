"""LLCResult: the estimate, its per-chain values and traces, and a safetensors+JSON form."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

__all__ = ["LLCResult"]


@dataclass(frozen=True, eq=False)
class LLCResult:
    """Outcome of :func:`~degen_hooks.llc.estimate_llc`.

    Attributes:
        llc: The LLC estimate λ̂, the mean of ``llc_per_chain``.
        llc_std_err: Standard error of ``llc`` across chains (NaN for one chain).
        llc_per_chain: λ̂ of each chain, shape ``(n_chains,)``, float64.
        loss_traces: Batch loss at each draw, shape ``(n_chains, n_draws)``, float64.
        init_loss: Mean batch loss at the trained parameters w* over the draws' batches.
        n_beta: The inverse temperature nβ used.
        n_samples: Number of samples in one pass over the data.
        n_params: Number of sampled scalar parameters.
        param_names: Names of the sampled parameters, in ``named_parameters()`` order.
        hyperparameters: Sampler settings (``step_size``, ``gamma``, ``seed``, ...).

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
    """

    llc: float
    llc_std_err: float
    llc_per_chain: Tensor
    loss_traces: Tensor
    init_loss: float
    n_beta: float
    n_samples: int
    n_params: int
    param_names: tuple[str, ...]
    hyperparameters: dict[str, Any] = field(default_factory=dict)

    @property
    def n_eff(self) -> float:
        """Effective parameter count N_eff = 2·λ̂ (equal to d for a regular model)."""
        return 2.0 * self.llc

    def __repr__(self) -> str:
        n_chains, n_draws = self.loss_traces.shape
        return (
            f"LLCResult(llc={self.llc:.4g} ± {self.llc_std_err:.2g}, n_params={self.n_params}, "
            f"n_beta={self.n_beta:.4g}, n_chains={n_chains}, n_draws={n_draws})"
        )

    def state_dict(self) -> dict[str, Tensor]:
        """The tensors of the result, for safetensors; the rest is in :meth:`metadata`."""
        return {"llc_per_chain": self.llc_per_chain, "loss_traces": self.loss_traces}

    def metadata(self) -> dict[str, Any]:
        """Everything but the tensors, as a JSON-able dict (a NaN becomes ``None``)."""
        return {
            "type": "LLCResult",
            "llc": self.llc,
            "llc_std_err": self.llc_std_err if math.isfinite(self.llc_std_err) else None,
            "init_loss": self.init_loss,
            "n_beta": self.n_beta,
            "n_samples": self.n_samples,
            "n_params": self.n_params,
            "param_names": list(self.param_names),
            "hyperparameters": dict(self.hyperparameters),
        }

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, Tensor], metadata: Mapping[str, Any]
    ) -> LLCResult:
        """Rebuild a result from :meth:`state_dict` and :meth:`metadata`.

        Args:
            state_dict: ``llc_per_chain`` (shape ``(n_chains,)``) and ``loss_traces``
                (shape ``(n_chains, n_draws)``).
            metadata: The dict from :meth:`metadata`, e.g. after a JSON round trip.

        Returns:
            The result that produced them.
        """
        std_err = metadata["llc_std_err"]
        return cls(
            llc=float(metadata["llc"]),
            llc_std_err=math.nan if std_err is None else float(std_err),
            llc_per_chain=state_dict["llc_per_chain"],
            loss_traces=state_dict["loss_traces"],
            init_loss=float(metadata["init_loss"]),
            n_beta=float(metadata["n_beta"]),
            n_samples=int(metadata["n_samples"]),
            n_params=int(metadata["n_params"]),
            param_names=tuple(metadata["param_names"]),
            hyperparameters=dict(metadata["hyperparameters"]),
        )

    def plot_trace(self, ax: Any = None) -> Any:
        """Plot each chain's batch loss against the draw index (needs matplotlib).

        A trace that drifts instead of fluctuating around a level has not mixed: use more
        burn-in draws or a larger ``step_size``. A trace below ``init_loss`` means w* is not
        a local minimum of the loss.

        Args:
            ax: A matplotlib ``Axes`` to draw on; a new figure is made if ``None``.

        Returns:
            The matplotlib ``Figure`` holding the plot.
        """
        # matplotlib is an optional dependency; Figure() avoids pyplot's global state.
        from matplotlib.figure import Figure

        if ax is None:
            ax = Figure(figsize=(6, 3.5), layout="constrained").add_subplot()
        for chain, trace in enumerate(self.loss_traces):
            ax.plot(trace.numpy(), lw=0.8, label=f"chain {chain}")
        ax.axhline(self.init_loss, color="k", ls="--", lw=1, label="loss at w*")
        title = f"LLC = {self.llc:.3g} ± {self.llc_std_err:.2g}"
        ax.set(xlabel="draw", ylabel="batch loss", title=title)
        ax.legend(fontsize="small")
        return ax.figure
