"""The command line: help everywhere, the demo's report, inspect, and errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import degen_hooks as dh
from degen_hooks.cli import main


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["inspect", "--help"]])
def test_help_everywhere(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    assert "usage: degen-hooks" in capsys.readouterr().out


def test_inspect_summarises_a_saved_result(tmp_path: Path, capsys):
    stats = dh.Covariance().update(torch.randn(10, 3, dtype=torch.float64))
    dh.save(stats, tmp_path / "acc")
    assert main(["inspect", str(tmp_path / "acc")]) == 0
    out = capsys.readouterr().out
    assert "Covariance" in out and "format_version" in out


def test_inspect_shows_the_groups_of_saved_synchronized_neurons(tmp_path: Path, capsys):
    z = torch.tensor([[1.0, 2.0, -1.0, 3.0, 1.0], [-1.0, -2.0, 1.0, 1.0, -1.0]])
    sync = dh.SynchronizedNeurons().fit(dh.CoFiring().update(z))
    dh.save(sync, tmp_path / "sync")
    assert main(["inspect", str(tmp_path / "sync")]) == 0
    out = capsys.readouterr().out
    assert "SynchronizedNeurons(tolerance=0.0" in out  # the hyperparameters, and then:
    assert "1 groups (3 neurons), 6 degenerate directions" in out
    assert "0, 1, 4" in out and "min agreement" in out


def test_inspect_shows_the_widths_of_a_saved_basis(tmp_path: Path, capsys):
    acts = torch.randn(50, 3, dtype=torch.float64)
    stats = dh.Statistics({"h": dh.SiteStatistics(dh.Covariance().update(acts))})
    dh.save(dh.InteractionBasis(variant="pca").fit(stats), tmp_path / "basis")
    assert main(["inspect", str(tmp_path / "basis")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-3].split()[:4] == ["site", "d_site", "width", "leading"]
    assert lines[-1].split()[:3] == ["h", "3", "3"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--quick", "--full"], "not allowed with argument"),
        (["demo", "--threads", "0"], "--threads must be at least 1"),
    ],
)
def test_demo_refuses_contradictory_options(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_inspect_reports_errors_without_a_traceback(tmp_path: Path, capsys):
    (tmp_path / "junk").write_bytes(b"\x80\x04not a save")
    assert main(["inspect", str(tmp_path / "junk")]) == 1
    assert "degen-hooks inspect:" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_writes_its_report(tmp_path: Path):
    out = tmp_path / "report"
    done = subprocess.run(
        [sys.executable, "-m", "degen_hooks", "demo", "--out", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "LIB width" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy"] == pytest.approx(1 - 4 / 8939)
    for figure in ("spectra.png", "ablation.png", "cofiring.png"):
        assert (out / figure).stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "spectra.png" in report and "LIB" in report
    basis = dh.load(out / "lib_basis")
    assert basis.widths_ == summary["widths"]["LIB"]
    # the saved basis checks the model it is applied to
    from degen_hooks.zoo import load_modadd

    model, _ = load_modadd(0)
    dh.io.check_fingerprint(out / "lib_basis", model)
    other, _ = load_modadd(1)
    with pytest.raises(dh.FormatError, match="fingerprint"):
        dh.io.check_fingerprint(out / "lib_basis", other)


@pytest.mark.slow
def test_demo_quick_is_quick(tmp_path: Path):
    out = tmp_path / "report"
    started = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "degen_hooks",
            "demo",
            "--quick",
            "--out",
            str(out),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    elapsed = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_kept"] == [8, 16]
    assert summary["features_needed"]["blocks.0.hook_resid_post"] == {"LIB": 8, "PCA": 8}
    assert not list(out.glob("*.png")) and "8, 16" in (out / "report.md").read_text()
    # About 8 s of CPU on one core (imports included); a loose bound for busy CI machines.
    assert elapsed < 60, elapsed
