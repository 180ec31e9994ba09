"""The trace plot of an LLC estimate: burn-in, draws, the loss at w* and every diagnostic."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

from .._checks import optional_import

if TYPE_CHECKING:
    from ._result import LLCResult

__all__ = ["plot_trace"]

MAX_LEGEND_CHAINS = 8


def _figure_class() -> type:
    """A ``Figure`` that a notebook displays whatever the matplotlib backend.

    ``matplotlib.figure.Figure()`` stays out of pyplot's global state, but then nothing
    registers it with IPython, and a notebook cell shows ``<Figure size ...>`` (or nothing
    when assigned). ``_repr_png_`` renders it with Agg on request.
    """
    figure = optional_import("matplotlib.figure", "Plotting")

    class TraceFigure(figure.Figure):
        def _repr_png_(self) -> bytes:
            buffer = io.BytesIO()
            self.savefig(buffer, format="png", dpi=100)
            return buffer.getvalue()

    return TraceFigure


def plot_trace(result: LLCResult, ax: Any = None) -> Any:
    """Draw ``result``'s traces on ``ax`` (a new figure if ``None``); return the figure."""
    if ax is None:
        ax = _figure_class()(figsize=(7, 3.8), layout="constrained").add_subplot()
    burnin = result.burnin_traces.numpy()
    draws = result.loss_traces.numpy()
    n_chains, n_burnin = burnin.shape
    show_legend = n_chains <= MAX_LEGEND_CHAINS
    for chain in range(n_chains):
        label = f"chain {chain}: {float(result.llc_per_chain[chain]):.3g}" if show_legend else None
        (line,) = ax.plot(range(draws.shape[1]), draws[chain], lw=0.8, label=label)
        if n_burnin:
            ax.plot(range(-n_burnin, 0), burnin[chain], lw=0.8, color=line.get_color(), alpha=0.4)
    if n_burnin:
        ax.axvspan(-n_burnin, 0, color="0.9", zorder=0, label="burn-in")
    ax.axhline(result.init_loss, color="k", ls="--", lw=1, label="loss at w*")
    for diagnostic in result.diagnostics:
        if diagnostic.kind == "divergence" and diagnostic.chains:
            step = diagnostic.step - n_burnin
            ends = [(draws if step >= 0 else burnin)[chain][-1] for chain in diagnostic.chains]
            ax.plot([step] * len(ends), ends, "rx", ms=9, mew=2, label="divergence")
    if result.diagnostics:
        text = "\n".join(f"⚠ {d.label}" for d in result.diagnostics)
        ax.text(
            0.01,
            0.98,
            text,
            transform=ax.transAxes,
            va="top",
            ha="left",
            color="firebrick",
            fontsize="small",
            bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "firebrick"},
        )
    sampler = result.hyperparameters.get("sampler", "sgld")
    title = f"LLC = {result.llc:.3g} ± {result.llc_std_err:.2g} ({sampler}, {n_chains} chains)"
    ax.set(xlabel="step (burn-in < 0 ≤ draw)", ylabel="batch loss", title=title)
    if show_legend or n_burnin:
        ax.legend(fontsize="x-small", loc="upper right")
    return ax.figure
