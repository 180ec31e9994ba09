"""The benchmark suite in one run: ``OMP_NUM_THREADS=1 python -m benchmarks``.

Runs every benchmark (``bench_*.py``, each a ``main(quick=False) -> list[dict]``) in one
process on one thread, prints one table of ratios and writes ``BENCHMARKS.md`` at the
repository root: the table, the machine (CPU model, cores, memory, torch version), the date,
the commit and the command that reproduces it.

Every ratio compares two measurements taken side by side in this run (interleaved repeats,
minimum time), so load from other processes on a shared machine hits both sides alike; the
absolute seconds are only indicative.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks                  # everything (~12 min)
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks --quick          # smoke run (~3 min)
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks --only build --only transformer

Only a full run of every benchmark writes ``BENCHMARKS.md`` by default; ``--out PATH`` writes
the report of any run, ``--json PATH`` the raw rows. The exit status is 1 when a benchmark
raised (a missed target is reported, not an error).
"""

from __future__ import annotations

import os

# One thread, pinned before torch (or numpy) is imported by anything below.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import datetime  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
# name -> (module, what it compares); run in this order.
BENCHMARKS: dict[str, tuple[str, str]] = {
    "stats": ("benchmarks.bench_stats", "activation statistics vs bare GEMMs / IncrementalPCA"),
    "cofiring": ("benchmarks.bench_cofiring", "co-firing counts and synchronized neurons"),
    "jacobians": ("benchmarks.bench_jacobians", "Jacobian Grams: exact probes, closed form"),
    "build": ("benchmarks.bench_build", "full interaction-basis build, peak memory"),
    "graph": ("benchmarks.bench_graph", "interaction-graph edges: closed form vs backward"),
    "transformer": ("benchmarks.bench_transformer", "GPT-2-small-shaped MLP statistics"),
    "lm": ("benchmarks.bench_lm", "LM-shaped LIB builds without backward passes"),
    "lm_hf": ("benchmarks.bench_lm_hf", "the same on Hugging Face transformers models"),
    "llc": ("benchmarks.bench_llc_devinterp", "LLC estimate vs devinterp"),
    "llc_parallel": ("benchmarks.bench_llc_parallel", "LLC chains stacked vs one after another"),
    "llc_calibration": ("benchmarks.bench_llc_calibration", "LLC of potentials with known values"),
}


# -- running ----------------------------------------------------------------------------------
def run_benchmark(name: str, quick: bool) -> tuple[list[dict[str, Any]], float, bool]:
    """Import and run one benchmark; returns its rows, its wall time and whether it raised."""
    module_name, _ = BENCHMARKS[name]
    started = time.perf_counter()
    try:
        module = importlib.import_module(module_name)
        rows = list(module.main(quick=quick))
        ok = True
    except Exception as err:  # report and carry on with the other benchmarks
        traceback.print_exc()
        rows = [
            {
                "name": f"{name}: raised {type(err).__name__}",
                "target": "runs",
                "met": False,
                "note": str(err).splitlines()[0][:200] if str(err) else "",
            }
        ]
        ok = False
    for row in rows:
        row["suite"] = name
    return rows, time.perf_counter() - started, ok


# -- formatting -------------------------------------------------------------------------------
def _value(row: dict[str, Any], side: str) -> str:
    for key, unit in ((f"{side}_s", "s"), (f"{side}_mib", "MiB")):
        value = row.get(key)
        if isinstance(value, (int, float)):
            return f"{value:.3f} {unit}" if unit == "s" else f"{value:.1f} {unit}"
    return ""


def _ratio(row: dict[str, Any]) -> tuple[str, str]:
    """``ours / baseline`` and its inverse, from the row's values (or its ``ratio``)."""
    for unit in ("s", "mib"):
        ours, base = row.get(f"ours_{unit}"), row.get(f"baseline_{unit}")
        if isinstance(ours, (int, float)) and isinstance(base, (int, float)) and ours and base:
            return f"{ours / base:.3f}", f"{base / ours:.2f}"
    ratio = row.get("ratio")
    if isinstance(ratio, (int, float)) and ratio:
        return f"{ratio:.3f}", f"{1 / ratio:.2f}"
    return "", ""


def _met(row: dict[str, Any]) -> str:
    met = row.get("met")
    return "—" if met is None else ("yes" if met else "**no**")


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as one Markdown table."""
    header = ["benchmark", "ours", "baseline", "ours/base", "base/ours", "target", "met", "note"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for row in rows:
        name = row.get("name") or row.get("benchmark") or "?"
        ratio, inverse = _ratio(row)
        cells = [
            f"{row['suite']}: {name.strip()}" if not name.startswith(" ") else f"↳ {name.strip()}",
            _value(row, "ours"),
            _value(row, "baseline"),
            ratio,
            inverse,
            row.get("target", ""),
            _met(row),
            row.get("note", ""),
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


# -- the machine ------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=True, timeout=10
        )
        return done.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, versions and load: what the numbers depend on."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    commit = _git("rev-parse", "--short", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    memory = _memory_gib()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "memory_gib": None if memory is None else round(memory, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": importlib.import_module("numpy").__version__,
        "load_average_1min": load,
        "commit": commit + (" + uncommitted changes" if dirty else "") if commit else "unknown",
    }


def command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run."""
    python = Path(sys.executable)
    try:
        python_text = str(python.relative_to(REPO))
    except ValueError:
        python_text = "python"
    parts = [python_text, "-m", "benchmarks"]
    if args.quick:
        parts.append("--quick")
    for name in args.only or []:
        parts += ["--only", name]
    return "OMP_NUM_THREADS=1 " + " ".join(shlex.quote(p) for p in parts)


def report(
    rows: list[dict[str, Any]],
    seconds: dict[str, float],
    info: dict[str, Any],
    args: argparse.Namespace,
    date: str,
) -> str:
    """The Markdown text of ``BENCHMARKS.md``."""
    missed = [r for r in rows if r.get("met") is False]
    met = [r for r in rows if r.get("met") is True]
    kind = "quick (smoke) run" if args.quick else "full run"
    details = [
        f"- *{_cell(r.get('name') or r.get('benchmark')).strip()}*: {r['detail']}"
        for r in rows
        if r.get("detail")
    ]
    details += [""] if details else []
    memory = f", {info['memory_gib']} GiB RAM" if info["memory_gib"] else ""
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `{command(args)}` ({kind}) on {date}, commit {info['commit']}.",
        "Regenerate with the same command; `--quick` for a smoke run, `--only NAME` for one",
        f"benchmark ({', '.join(BENCHMARKS)}).",
        "",
        "**Machine:** "
        f"{info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable){memory}; "
        f"{info['os']}; Python {info['python']}, torch {info['torch']}, numpy {info['numpy']}; "
        f"{info['torch_threads']} torch thread (`OMP_NUM_THREADS=1`). "
        + (
            f"1-minute load average at the start: {info['load_average_1min']:.2f}. "
            if info["load_average_1min"] is not None
            else ""
        )
        + "The machine is shared: absolute times are noisy, the ratios are measured side by "
        "side in this run (interleaved repeats, minimum time).",
        "",
        "**Reading the table:** `ours/base` is our time (or memory) over the baseline's, lower "
        "is better; `base/ours` is its inverse: the speedup, or for the transformer row the "
        "fraction of the matrix-product limit reached. Rows marked ↳ break the row above down "
        "(no target of their own).",
        "",
        f"Targets: {len(met)} met, {len(missed)} missed"
        + (
            " ("
            + "; ".join(_cell(r.get("name") or r.get("benchmark")).strip() for r in missed)
            + ")."
            if missed
            else "."
        ),
        "",
        table(rows),
        "",
        *details,
        "Wall time per benchmark: "
        + ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items())
        + f"; total {sum(seconds.values()) / 60:.1f} min.",
        "",
    ]
    return "\n".join(lines)


# -- entry point ------------------------------------------------------------------------------
def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="reduced run (a smoke test)")
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help=f"run only this benchmark (repeatable, or comma-separated): {', '.join(BENCHMARKS)}",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write the report here (default: BENCHMARKS.md for a full run of everything)",
    )
    parser.add_argument("--no-write", action="store_true", help="print only; write no report")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw rows here")
    args = parser.parse_args(argv)
    if args.only:
        names = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
        unknown = sorted(set(names) - set(BENCHMARKS))
        if unknown:
            parser.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
        args.only = list(dict.fromkeys(names))
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the suite; returns the exit status (1 if a benchmark raised)."""
    args = _parse(argv)
    names = args.only or list(BENCHMARKS)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    info = machine()
    print(
        f"{len(names)} benchmark(s), {'quick' if args.quick else 'full'} run, 1 thread; "
        f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    seconds: dict[str, float] = {}
    all_ok = True
    for name in names:
        print(f"[{name}] {BENCHMARKS[name][1]} ...", flush=True)
        bench_rows, elapsed, ok = run_benchmark(name, args.quick)
        rows += bench_rows
        seconds[name] = elapsed
        all_ok &= ok
        print(f"[{name}] done in {elapsed:.0f} s", flush=True)
    print()
    print(table(rows))
    print()
    print(", ".join(f"{name} {value:.0f} s" for name, value in seconds.items()))
    out = args.out
    if out is None and not args.quick and not args.only:
        out = REPO / "BENCHMARKS.md"
    if out is not None and not args.no_write:
        out.write_text(report(rows, seconds, info, args, date))
        print(f"wrote {out}")
    elif not args.no_write:
        print("quick or partial run: no report written (pass --out PATH to write one)")
    if args.json is not None:
        payload = {"date": date, "machine": info, "seconds": seconds, "rows": rows}
        args.json.write_text(json.dumps(payload, indent=1, default=str))
        print(f"wrote {args.json}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
