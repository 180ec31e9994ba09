"""dh.save / dh.load: bitwise round trips, clear refusals, fingerprints, checkpoint/resume."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import degen_hooks as dh
from degen_hooks import io
from degen_hooks.statistics import Statistics

SITES = ["0", "1", "2"]


def _model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
    ).double()


def _batches(n: int = 6) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(7 + i, 5, generator=gen, dtype=torch.float64) for i in range(n)]


def _collected(jacobians: str = "exact", batches: list[torch.Tensor] | None = None) -> Statistics:
    model = _model()
    kw = {"jacobians": jacobians, "firing": True, "derivatives": {"0": "relu"}}
    with dh.collect(model, SITES, **kw) as run:
        for batch in batches or _batches():
            run.backward(model(batch))
    return run.stats


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8) if t.numel() else t


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Bitwise equality, dtypes included (distinguishes -0.0 from 0.0, unlike torch.equal)."""
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(_bits(a[key].contiguous()), _bits(b[key].contiguous())), key


def _accumulator_cases() -> dict[str, object]:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(40, 4, generator=gen, dtype=torch.float64) * 1e3 + 7.0
    x[3, 1] = float("nan")
    return {
        "covariance-weighted-skip": dh.Covariance(nonfinite="skip").update(
            x, weights=torch.rand(40, generator=gen, dtype=torch.float64)
        ),
        "covariance-float32": dh.Covariance(dtype=torch.float32).update(x[:3]),
        "covariance-empty": dh.Covariance(),
        "second-moment": dh.SecondMoment().update(x[4:], count=7),
        "cofiring-threshold": dh.CoFiring(threshold=0.5).update(x[4:24]),
    }


@pytest.mark.parametrize("name", list(_accumulator_cases()))
def test_accumulator_round_trip_is_bitwise(tmp_path: Path, name: str) -> None:
    acc = _accumulator_cases()[name]
    back = io.load(io.save(acc, tmp_path / name))
    assert type(back) is type(acc)
    assert_same_state(acc.state_dict(), back.state_dict())
    assert (back.d, back.dtype, back.nonfinite) == (acc.d, acc.dtype, acc.nonfinite)
    assert (back.n_samples, back.n_skipped) == (acc.n_samples, acc.n_skipped)
    assert getattr(back, "threshold", None) == getattr(acc, "threshold", None)


def test_statistics_round_trip_is_bitwise(tmp_path: Path) -> None:
    stats = _collected()
    stats.metadata["processing"] = {"fold_ln": True, "center_writing_weights": False}
    back = io.load(io.save(stats, tmp_path / "stats"))
    assert isinstance(back, Statistics) and list(back) == list(stats)
    assert_same_state(stats.state_dict(), back.state_dict())
    assert back.metadata == stats.metadata
    for key in stats:
        assert back[key].n_batches == stats[key].n_batches
        assert back[key].info == stats[key].info
        assert back[key].firing.threshold == stats[key].firing.threshold
        assert sorted(back[key].accumulators()) == sorted(stats[key].accumulators())
    # Equal statistics, not just equal tensors: a derived quantity matches bit for bit.
    assert torch.equal(back["1"].acts.cov(), stats["1"].acts.cov())


def test_meta_json_describes_the_save(tmp_path: Path) -> None:
    stats, model = _collected(), _model()
    stats.metadata["processing"] = {"fold_ln": True}
    path = io.save(stats, tmp_path / "stats", model=model)
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "tensors.safetensors"]
    meta = json.loads((path / "meta.json").read_text())
    assert meta == io.read_metadata(path)
    assert meta["format_version"] == io.FORMAT_VERSION == 1
    assert meta["type"] == "Statistics"
    assert meta["torch_version"] == torch.__version__
    assert {"library_version", "transformer_lens_version"} <= set(meta)
    assert meta["summary"] == {
        "sites": {"0": 8, "1": 8, "2": 3},
        "n_samples": dict.fromkeys(SITES, sum(b.shape[0] for b in _batches())),
    }
    assert meta["model_fingerprint"] == io.fingerprint(model)
    assert meta["processing"] == {"fold_ln": True}
    # dh.transformer_lens.record_metadata stores its flags under "transformer_lens".
    stats.metadata["transformer_lens"] = {"fold_ln": False, "is_processed": False}
    meta = io.read_metadata(io.save(stats, tmp_path / "stats"))
    assert meta["processing"] == {"fold_ln": False, "is_processed": False}


def test_save_replaces_a_previous_save_only(tmp_path: Path) -> None:
    path = tmp_path / "acc"
    io.save(dh.Covariance().update(torch.ones(2, 3)), path)
    io.save(dh.SecondMoment().update(torch.ones(2, 4)), path)
    assert isinstance(io.load(path), dh.SecondMoment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acc"]  # no temporary left over
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        io.save(dh.Covariance(), path, overwrite=False)
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a degen_hooks save.*refusing to replace"):
        io.save(dh.Covariance(), tmp_path / "project")
    assert (tmp_path / "project" / "notes.txt").read_text() == "mine"


def test_save_refuses_unregistered_types_and_non_json_metadata(tmp_path: Path) -> None:
    with pytest.raises(dh.FormatError, match="no degen_hooks format is registered for it"):
        io.save({"a": torch.ones(2)}, tmp_path / "dict")
    stats = _collected()
    stats.metadata["bad"] = object()
    with pytest.raises(dh.FormatError, match="not JSON-serialisable"):
        io.save(stats, tmp_path / "stats")
    assert not (tmp_path / "stats").exists()


# -- refusals -------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path: Path) -> Path:
    return io.save(_collected(), tmp_path / "stats")


def test_truncated_tensor_file_is_refused(saved: Path) -> None:
    tensors = saved / "tensors.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-100])
    with pytest.raises(dh.FormatError, match=r"tensors.safetensors is truncated: it has \d+ bytes"):
        io.load(saved)


def test_corrupted_tensor_file_is_refused(saved: Path) -> None:
    tensors = saved / "tensors.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit pattern inside a tensor: safetensors would not notice
    tensors.write_bytes(bytes(data))
    with pytest.raises(dh.FormatError, match="is corrupted: its SHA-256"):
        io.load(saved)


def test_unreadable_tensor_file_is_refused_even_with_a_matching_checksum(saved: Path) -> None:
    tensors = saved / "tensors.safetensors"
    tensors.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    meta = json.loads((saved / "meta.json").read_text())
    meta["tensors"].update(bytes=tensors.stat().st_size, sha256=io._sha256(tensors))
    io._write_metadata(saved, meta)  # checksummed: a consistent but bad save
    with pytest.raises(dh.FormatError, match="safetensors cannot read it"):
        io.load(saved)


def test_tensors_that_do_not_match_the_layout_are_refused(saved: Path) -> None:
    meta = json.loads((saved / "meta.json").read_text())
    meta["layout"]["sites"]["1"]["accumulators"]["acts"]["d"] = 99
    io._write_metadata(saved, meta)  # checksummed: a consistent but bad save
    with pytest.raises(dh.FormatError, match="cannot rebuild the Statistics.*width 8"):
        io.load(saved)


def test_missing_or_corrupted_meta_is_refused(saved: Path) -> None:
    (saved / "meta.json").write_text('{"format": "degen_hooks", "format_')
    with pytest.raises(dh.FormatError, match="meta.json is corrupted: not valid JSON"):
        io.load(saved)
    (saved / "meta.json").unlink()
    with pytest.raises(dh.FormatError, match=r"has no meta.json.*\['tensors.safetensors'\]"):
        io.load(saved)


def test_missing_tensor_file_is_refused(saved: Path) -> None:
    (saved / "tensors.safetensors").unlink()
    with pytest.raises(dh.FormatError, match="lacks its tensor file tensors.safetensors"):
        io.load(saved)


def test_newer_format_version_is_refused_with_upgrade_advice(saved: Path) -> None:
    meta = json.loads((saved / "meta.json").read_text())
    meta.update(format_version=7, library_version="9.1.0")
    (saved / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(
        dh.FormatError,
        match=r"saved by degen_hooks 9\.1\.0 with format 7; this version \(.*\) reads formats "
        r"up to 1\. Upgrade: pip install -U degen-hooks",
    ):
        io.load(saved)


def test_unknown_type_is_refused(saved: Path) -> None:
    meta = json.loads((saved / "meta.json").read_text())
    meta["type"] = "QuantumBasis"
    io._write_metadata(saved, meta)  # checksummed, as a newer degen_hooks would write it
    with pytest.raises(dh.FormatError, match="'QuantumBasis', a type this degen_hooks does not"):
        io.load(saved)


def test_pickle_files_are_recognised_and_never_unpickled(tmp_path: Path) -> None:
    stats = _collected()
    torch.save(stats.state_dict(), tmp_path / "stats.pt")
    with pytest.raises(dh.FormatError, match="zip archive \\(the torch.save format\\).*never unp"):
        io.load(tmp_path / "stats.pt")
    with (tmp_path / "stats.pkl").open("wb") as handle:
        pickle.dump({"n": 1}, handle)
    with pytest.raises(dh.FormatError, match="is a pickle file, not a degen_hooks save"):
        io.load(tmp_path / "stats.pkl")


def test_other_files_and_paths_are_refused(tmp_path: Path, saved: Path) -> None:
    with pytest.raises(dh.FormatError, match="one file of a degen_hooks save; pass its directory"):
        io.load(saved / "tensors.safetensors")
    save_file({"a": torch.ones(2)}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(dh.FormatError, match="is a file, not a degen_hooks save"):
        io.load(tmp_path / "weights.safetensors")
    with pytest.raises(FileNotFoundError, match="path does not exist"):
        io.load(tmp_path / "nowhere")


# -- fingerprints ---------------------------------------------------------------------------
def test_fingerprint_tracks_names_shapes_dtypes_and_bytes() -> None:
    model = _model()
    assert io.fingerprint(model) == io.fingerprint(_model())
    assert io.fingerprint(model).startswith("sha256:") and len(io.fingerprint(model)) == 71
    assert io.fingerprint(model) != io.fingerprint(_model().float())
    changed = _model()
    with torch.no_grad():
        changed[2].bias[0] = torch.nextafter(changed[2].bias[0], torch.tensor(1.0).double())
    assert io.fingerprint(model) != io.fingerprint(changed)


def test_fingerprint_is_checked(tmp_path: Path) -> None:
    model, other = _model(), _model()
    with torch.no_grad():
        other[0].weight.mul_(2)
    path = io.save(_collected(), tmp_path / "stats", model=model)
    io.check_fingerprint(path, model)
    io.load(path, model=model)
    with pytest.raises(dh.FormatError, match="computed on a model with fingerprint sha256:"):
        io.load(path, model=other)
    with pytest.raises(dh.FormatError, match="parameters differ"):
        io.check_fingerprint(io.read_metadata(path), other)
    stats = _collected()
    with pytest.raises(dh.FormatError, match="No model fingerprint is recorded for this Stat"):
        io.check_fingerprint(stats, model)
    stats.metadata["model_fingerprint"] = io.fingerprint(model)
    io.check_fingerprint(stats, model)  # recorded on the object: saved without model= too
    assert io.read_metadata(io.save(stats, tmp_path / "s2"))["model_fingerprint"] is not None


# -- registry -------------------------------------------------------------------------------
class _Pair:
    def __init__(self, a: torch.Tensor, label: str) -> None:
        self.a, self.label = a, label


def test_registered_classes_round_trip_and_names_stay_unique(tmp_path: Path) -> None:
    io.register(
        _Pair,
        lambda p: ({"a": p.a}, {"label": p.label}),
        lambda tensors, layout: _Pair(tensors["a"], layout["label"]),
        name="test_io.Pair",
    )
    back = io.load(io.save(_Pair(torch.arange(3), "x"), tmp_path / "pair"))
    assert isinstance(back, _Pair) and back.label == "x" and torch.equal(back.a, torch.arange(3))
    with pytest.raises(ValueError, match="already registered"):
        io.register(dh.Covariance, lambda c: ({}, {}), lambda t, layout: None, name="test_io.Pair")


def test_higher_level_types_are_registered_on_first_use(tmp_path: Path) -> None:
    basis = dh.InteractionBasis(variant="pca").fit(_collected())
    back = io.load(io.save(basis, tmp_path / "basis"))
    assert type(back) is type(basis)
    assert_same_state(basis.state_dict(), back.state_dict())
    assert back.metadata() == basis.metadata()


# -- checkpoint / resume --------------------------------------------------------------------
def _checkpointed(tmp_path: Path, jacobians: str) -> Statistics:
    model, batches = _model(), _batches()
    kw = {"jacobians": jacobians, "firing": True, "derivatives": {"0": "relu"}}
    with dh.collect(model, SITES, **kw) as run:
        for batch in batches[:3]:
            run.backward(model(batch))
        dh.io.save(run.stats, tmp_path / "checkpoint")  # mid-run, inside the block
    with dh.collect(model, SITES, stats=dh.io.load(tmp_path / "checkpoint"), **kw) as run:
        for batch in batches[3:]:
            run.backward(model(batch))
    return run.stats


def test_checkpoint_and_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    whole, resumed = _collected("exact"), _checkpointed(tmp_path, "exact")
    assert_same_state(whole.state_dict(), resumed.state_dict())
    assert [resumed[k].n_batches for k in SITES] == [whole[k].n_batches for k in SITES] == [6] * 3


def test_checkpoint_and_resume_with_random_probes(tmp_path: Path) -> None:
    whole, resumed = _collected("rademacher"), _checkpointed(tmp_path, "rademacher")
    assert_same_state(whole.state_dict(), resumed.state_dict())


def test_load_moves_to_a_device(tmp_path: Path) -> None:
    back = io.load(io.save(_collected(), tmp_path / "stats"), device="cpu")
    assert back["0"].acts.device == torch.device("cpu")
