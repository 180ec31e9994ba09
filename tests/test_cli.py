"""The command line: help everywhere, the demo's report, inspect, and errors."""

from __future__ import annotations

import json
import subprocess
import sys
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
