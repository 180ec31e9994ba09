"""``degen-hooks`` command line: a thin layer over the public API.

``degen-hooks demo`` runs the main job on the embedded default model (the shipped
modular-addition transformer, seed 0) and writes a report folder (``--quick``: a coarse
node-ablation schedule and no figures, under 10 s on one CPU core; ``--full``: a fine
schedule, minutes);
``degen-hooks inspect PATH`` summarises saved results: the groups of a
``SynchronizedNeurons``, the widths and leading Lambdas of a basis. Also runnable as
``python -m degen_hooks``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]

# Numbers of features kept in the node-ablation curves, per demo schedule.
_QUICK_N_KEPT = (8, 16)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=True)]
    line = "  ".join("-" * w for w in widths)
    fmt = lambda row: "  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True))  # noqa: E731
    return "\n".join([fmt(header), line, *(fmt(r) for r in rows)])


def _summary_table(summary: dict[str, Any]) -> str:
    rows = []
    for site, lib_width in summary["widths"]["LIB"].items():
        needed = summary["features_needed"].get(site, {})
        rows.append(
            [
                site,
                str(summary["widths"]["PCA"][site]),
                str(lib_width),
                str(needed.get("PCA", "-")),
                str(needed.get("LIB", "-")),
            ]
        )
    header = ["site", "PCA width", "LIB width", "PCA feats @0.1%", "LIB feats @0.1%"]
    return _table(rows, header)


def _report_markdown(summary: dict[str, Any], figures: list[str]) -> str:
    lines = [
        f"# degen_hooks demo: modular addition, seed {summary['seed']}",
        "",
        f"Test accuracy of the unablated model: {summary['test_accuracy']:.5f}.",
        "",
        "Local interaction basis (LIB) vs centred PCA, fitted on the 3,830 training examples;",
        "features needed = fewest features kept at the site for test accuracy within 0.1 % of",
        "the unablated model (node ablation on the 8,939 test examples), among the numbers",
        f"of features tried: {', '.join(map(str, summary['n_kept']))}.",
        "",
        "```",
        _summary_table(summary),
        "```",
        "",
        f"Synchronized MLP neuron groups (exact agreement): {len(summary['synchronized_groups'])}"
        f"; sizes {[len(g) for g in summary['synchronized_groups']]}; dead neurons: "
        f"{len(summary['dead_neurons'])}.",
        "",
        "Dominant 2-D Fourier frequencies (f_a, f_b) of the leading LIB features:",
        "",
    ]
    for site, feats in summary["fourier"].items():
        freqs = ", ".join(f"{tuple(f['frequency'])} {f['power_fraction']:.2f}" for f in feats)
        lines.append(f"- `{site}`: {freqs}")
    lines += ["", *[f"![{Path(f).stem}]({f})" for f in figures], ""]
    return "\n".join(lines)


def run_demo(
    out: Path,
    *,
    seed: int = 0,
    schedule: str = "standard",
    figures: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Analyse the shipped modular-addition model and write a report folder.

    Args:
        out: Report folder (created).
        seed: Which shipped model.
        schedule: Numbers of features tried in the node-ablation curves: ``"quick"``
            (8 and 16: seconds), ``"standard"`` (8 values up to 128) or ``"full"`` (19
            values: minutes).
        figures: Draw the spectra, ablation curves and co-firing counts (matplotlib).
        progress: Show progress bars.

    Returns:
        The JSON summary that was written.

    Raises:
        ValueError: For an unknown ``schedule``.
    """
    from . import io
    from .modadd import DEFAULT_N_KEPT, QUICK_N_KEPT, analyse_modadd

    schedules = {"quick": _QUICK_N_KEPT, "standard": QUICK_N_KEPT, "full": DEFAULT_N_KEPT}
    if schedule not in schedules:
        raise ValueError(f"schedule must be one of {sorted(schedules)}, got {schedule!r}.")
    started = time.perf_counter()
    analysis = analyse_modadd(seed, n_kept=schedules[schedule], progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    summary = analysis.summary()
    summary["n_kept"] = list(schedules[schedule])
    # The fingerprint of the shipped weights: applying these results to another model fails.
    model = analysis.model
    io.save(analysis.lib, out / "lib_basis", model=model)
    io.save(analysis.pca, out / "pca_basis", model=model)
    io.save(analysis.lib.stats_, out / "statistics", model=model)
    io.save(analysis.synchronized, out / "synchronized", model=model)
    drawn = _figures(analysis, out) if figures else []
    summary["wall_seconds"] = time.perf_counter() - started
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "report.md").write_text(_report_markdown(summary, drawn))
    return summary


def _figures(analysis: Any, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    from . import plotting

    written = []
    for name, fig in (
        ("spectra.png", plotting.plot_spectra(analysis.lib, analysis.pca)),
        ("ablation.png", plotting.plot_ablation_curves(list(analysis.curves.values()))),
        ("cofiring.png", plotting.plot_cofiring(analysis.synchronized, analysis.firing)),
    ):
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        written.append(name)
    return written


def _inspect(path: Path) -> str:
    from . import io

    obj = io.load(path)
    meta = io.read_metadata(path)
    lines = [f"{path}: {type(obj).__name__}"]
    for key in ("format_version", "library_version", "torch_version", "created"):
        if key in meta:
            lines.append(f"  {key}: {meta[key]}")
    lines.append(f"  {obj!r}"[:2000])
    details = _details(obj)
    if details:
        lines += ["", details]
    return "\n".join(lines)


def _details(obj: Any) -> str:
    """What a saved result found, beyond its hyperparameters (groups, widths, spectra)."""
    from .basis import InteractionBasis
    from .synchronized import SynchronizedNeurons

    if isinstance(obj, SynchronizedNeurons):
        return obj.summary(max_groups=50)
    if isinstance(obj, InteractionBasis):
        rows = [
            [
                key,
                str(obj.rotations_[key].shape[0]),
                str(obj.widths_[key]),
                ", ".join(f"{x:.4g}" for x in obj.lambdas_[key][:4].tolist()),
            ]
            for key in obj.sites_
        ]
        return _table(rows, ["site", "d_site", "width", "leading lambdas"])
    summary = getattr(obj, "summary", None)
    return summary() if callable(summary) else ""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``degen-hooks`` console script."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    parser = argparse.ArgumentParser(
        prog="degen-hooks",
        description="Degeneracy inspection for PyTorch models: interaction bases, "
        "synchronized neurons, statistics.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="Analyse the shipped modular-addition model and write a report folder.",
        description="Build the local interaction basis and PCA of the shipped modular-"
        "addition transformer, measure node ablations, synchronized neurons and Fourier "
        "content, and write summary.json, report.md, figures and saved results.",
    )
    demo.add_argument("--out", type=Path, default=Path("degen_hooks_report"), help="report folder")
    demo.add_argument("--seed", type=int, default=0, choices=range(5), help="which shipped model")
    speed = demo.add_mutually_exclusive_group()
    speed.add_argument(
        "--quick",
        action="store_true",
        help="coarse node-ablation schedule (8 and 16 features) and no figures: under 10 s",
    )
    speed.add_argument("--full", action="store_true", help="fine node-ablation schedule (minutes)")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the model is small, and more threads mostly wait "
        "on each other, the more so on a shared machine)",
    )
    inspect = sub.add_parser(
        "inspect",
        help="Summarise saved results.",
        description="Summarise a folder written by dh.save.",
    )
    inspect.add_argument("path", type=Path, help="folder written by dh.save")
    args = parser.parse_args(argv)

    if args.command == "demo":
        import torch

        if args.threads < 1:
            parser.error(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            schedule = "quick" if args.quick else "full" if args.full else "standard"
            summary = run_demo(
                args.out,
                seed=args.seed,
                schedule=schedule,
                figures=not args.quick,
                progress=not args.no_progress,
            )
        print(_summary_table(summary))
        print(
            f"\ntest accuracy {summary['test_accuracy']:.5f}; "
            f"{len(summary['synchronized_groups'])} synchronized MLP groups; "
            f"{summary['wall_seconds']:.1f} s. Report: {args.out / 'report.md'}"
        )
        return 0
    try:
        print(_inspect(args.path))
    except Exception as err:  # a CLI reports errors as text, with a non-zero exit
        print(f"degen-hooks inspect: {err}", file=sys.stderr)
        return 1
    return 0
