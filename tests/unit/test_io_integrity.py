"""dh.save / dh.load cannot lie: checksummed meta.json, symlinks, concurrent saves, paths."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

import degen_hooks as dh
from degen_hooks import io


def _synchronized() -> dh.SynchronizedNeurons:
    """A fit with dead (1, 4), always-on (5) and duplicated (0 = 2, 3 = 6) neurons."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 7, generator=gen, dtype=torch.float64)
    x[:, 1] = -1.0
    x[:, 4] = -2.0
    x[:, 5] = 3.0
    x[:, 2] = 2 * x[:, 0]
    x[:, 6] = x[:, 3] + 0.0
    firing = dh.CoFiring(threshold=0.0).update(x)
    return dh.SynchronizedNeurons(tolerance=0.0).fit(firing)


def _covariance(seed: int = 0, d: int = 3) -> dh.Covariance:
    gen = torch.Generator().manual_seed(seed)
    return dh.Covariance(nonfinite="skip").update(
        torch.randn(9, d, generator=gen, dtype=torch.float64)
    )


def _same_synchronized(a: dh.SynchronizedNeurons, b: dh.SynchronizedNeurons) -> bool:
    state_a, state_b = a.state_dict(), b.state_dict()
    return (
        a.metadata() == b.metadata()
        and a.groups_ == b.groups_
        and state_a.keys() == state_b.keys()
        and all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    )


def _same_covariance(a: dh.Covariance, b: dh.Covariance) -> bool:
    state_a, state_b = a.state_dict(), b.state_dict()
    return (
        (a.d, a.dtype, a.nonfinite) == (b.d, b.dtype, b.nonfinite)
        and state_a.keys() == state_b.keys()
        and all(
            a_t.dtype == b_t.dtype and torch.equal(a_t, b_t)
            for a_t, b_t in zip(state_a.values(), state_b.values(), strict=True)
        )
    )


# -- meta.json is checksummed -------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["synchronized", "covariance"])
def test_every_single_digit_edit_of_meta_json_is_refused(tmp_path: Path, kind: str) -> None:
    obj = _synchronized() if kind == "synchronized" else _covariance()
    same = _same_synchronized if kind == "synchronized" else _same_covariance
    path = io.save(obj, tmp_path / kind)
    original = (path / "meta.json").read_text()
    digits = [i for i, c in enumerate(original) if c.isdigit()]
    assert len(digits) > 50
    silent, refused = [], 0
    for i in digits:
        edited = original[:i] + str((int(original[i]) + 1) % 10) + original[i + 1 :]
        (path / "meta.json").write_text(edited)
        try:
            back = io.load(path)
        except dh.FormatError:
            refused += 1
            continue
        if not same(back, obj):
            silent.append(original[max(0, i - 30) : i + 5])
    (path / "meta.json").write_text(original)
    assert same(io.load(path), obj)
    assert silent == [], f"{len(silent)} edits loaded a different object: {silent[:5]}"
    assert refused == len(digits)


def _edit(path: Path, change) -> None:
    meta = json.loads((path / "meta.json").read_text())
    change(meta)
    (path / "meta.json").write_text(json.dumps(meta, indent=2))


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m["layout"]["dead"].__setitem__(0, 2),
        lambda m: m["layout"]["dead"].append(6),
        lambda m: m["layout"]["params"].__setitem__("include_dead", True),
        lambda m: m["layout"]["params"].__setitem__("tolerance", 0.5),
        lambda m: m["layout"].__setitem__("site", "other"),
        lambda m: m.__setitem__("model_fingerprint", "sha256:" + "0" * 64),
        lambda m: m.__setitem__("library_version", "0.0.1"),
        lambda m: m["summary"].__setitem__("d_site", 8),
        lambda m: m.__setitem__("extra", 1),
        lambda m: m.pop("processing"),
        lambda m: m.__setitem__("meta_sha256", "0" * 64),
    ],
    ids=[
        "dead-index",
        "dead-added",
        "hyperparameter-bool",
        "hyperparameter-float",
        "site",
        "fingerprint",
        "version",
        "summary",
        "added-field",
        "removed-field",
        "checksum",
    ],
)
def test_field_edits_of_meta_json_are_refused_with_advice(tmp_path: Path, change) -> None:
    path = io.save(_synchronized(), tmp_path / "sync")
    _edit(path, change)
    match = r"sync/meta.json was modified after it was saved.*Re-create it with dh.save"
    with pytest.raises(dh.FormatError, match=match):
        io.load(path)
    with pytest.raises(dh.FormatError, match=match):
        io.read_metadata(path)


def test_dtype_edit_of_an_accumulator_is_refused(tmp_path: Path) -> None:
    path = io.save(_covariance(), tmp_path / "cov")
    text = (path / "meta.json").read_text()
    assert text.count('"float64"') == 1
    (path / "meta.json").write_text(text.replace('"float64"', '"float32"'))
    with pytest.raises(dh.FormatError, match="modified after it was saved"):
        io.load(path)
    (path / "meta.json").write_text(text.replace('"skip"', '"raise"'))
    with pytest.raises(dh.FormatError, match="modified after it was saved"):
        io.load(path)


def test_reformatting_meta_json_keeps_it_loadable(tmp_path: Path) -> None:
    """The checksum covers the parsed content: `jq .` or re-indenting changes no value."""
    obj = _synchronized()
    path = io.save(obj, tmp_path / "sync")
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps(meta, indent=4, sort_keys=True))
    assert _same_synchronized(io.load(path), obj)
    (path / "meta.json").write_text(json.dumps(meta, separators=(",", ":")))
    assert _same_synchronized(io.load(path), obj)


def test_edited_tensor_file_says_it_was_modified(tmp_path: Path) -> None:
    path = io.save(_covariance(), tmp_path / "cov")
    data = bytearray((path / "tensors.safetensors").read_bytes())
    data[-3] ^= 0x01
    (path / "tensors.safetensors").write_bytes(bytes(data))
    with pytest.raises(
        dh.FormatError, match=r"cov/tensors.safetensors is corrupted.*modified after it was saved"
    ):
        io.load(path)


def test_saves_without_a_meta_checksum_are_refused_unless_allowed(tmp_path: Path) -> None:
    """Saves written before meta.json was checksummed cannot be checked: never load silently."""
    obj = _covariance()
    path = io.save(obj, tmp_path / "cov")
    meta = json.loads((path / "meta.json").read_text())
    del meta["meta_sha256"]
    (path / "meta.json").write_text(json.dumps(meta, indent=2))
    match = r"cov/meta.json has no checksum.*allow_unchecked=True.*dh.save\(obj, "
    with pytest.raises(dh.FormatError, match=match):
        io.load(path)
    with pytest.raises(dh.FormatError, match=match):
        io.read_metadata(path)
    back = io.load(path, allow_unchecked=True)
    assert _same_covariance(back, obj)
    assert io.read_metadata(path, allow_unchecked=True)["type"] == "Covariance"
    io.save(back, path)  # re-saving adds the checksum
    assert _same_covariance(io.load(path), obj)
    # The tensor file stays checked even then.
    (path / "tensors.safetensors").write_bytes(b"\0" * 8)
    with pytest.raises(dh.FormatError, match="truncated"):
        io.load(path, allow_unchecked=True)


# -- symlinks -----------------------------------------------------------------------------------
def test_save_over_a_symlinked_folder_writes_where_it_points(tmp_path: Path) -> None:
    target = tmp_path / "runs" / "2024-01-01"
    io.save(_covariance(0, d=6), target)  # an earlier, larger save
    link = tmp_path / "latest"
    link.symlink_to(target, target_is_directory=True)
    new = _covariance(1, d=2)
    assert io.save(new, link) == link
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert _same_covariance(io.load(target), new)  # no stale save left at the target
    assert _same_covariance(io.load(link), new)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "runs"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["2024-01-01"]
    assert sorted(p.name for p in target.iterdir()) == ["meta.json", "tensors.safetensors"]


def test_save_through_a_dangling_symlink_creates_its_target(tmp_path: Path) -> None:
    link = tmp_path / "latest"
    link.symlink_to(tmp_path / "later", target_is_directory=True)
    obj = _covariance()
    io.save(obj, link)
    assert link.is_symlink()
    assert _same_covariance(io.load(tmp_path / "later"), obj)


# -- concurrent saves ---------------------------------------------------------------------------
def _save_concurrently(path: Path, objects: list, **kwargs) -> tuple[list, list[BaseException]]:
    barrier = threading.Barrier(len(objects))
    saved: list = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(obj) -> None:
        barrier.wait()
        try:
            io.save(obj, path, **kwargs)
        except BaseException as err:  # noqa: BLE001  (collected and checked below)
            with lock:
                errors.append(err)
        else:
            with lock:
                saved.append(obj)

    threads = [threading.Thread(target=work, args=(obj,)) for obj in objects]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return saved, errors


def test_concurrent_saves_to_one_path_leave_one_complete_save(tmp_path: Path) -> None:
    path = tmp_path / "cov"
    for round_ in range(4):
        objects = [_covariance(seed, d=2 + seed % 3) for seed in range(8 * round_, 8 * round_ + 8)]
        saved, errors = _save_concurrently(path, objects)
        assert errors == []
        back = io.load(path)
        assert any(_same_covariance(back, obj) for obj in saved)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["cov"]  # no temporary left


def test_concurrent_saves_without_overwrite_have_one_winner(tmp_path: Path) -> None:
    for round_ in range(3):
        path = tmp_path / f"cov{round_}"
        objects = [_covariance(seed) for seed in range(8)]
        saved, errors = _save_concurrently(path, objects, overwrite=False)
        assert len(saved) == 1 and len(errors) == 7
        for err in errors:
            assert isinstance(err, dh.DegenHooksError) and isinstance(err, FileExistsError)
            assert "pass overwrite=True" in str(err)
        assert _same_covariance(io.load(path), saved[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cov0", "cov1", "cov2"]


def test_os_failures_of_a_save_are_degen_hooks_errors(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    with pytest.raises(io.SaveError, match=r"Cannot write the save .*notes.txt/cov") as info:
        io.save(_covariance(), tmp_path / "notes.txt" / "cov")
    assert isinstance(info.value, dh.DegenHooksError) and isinstance(info.value, OSError)
    with pytest.raises(io.SaveExistsError, match="exists and is a file"):
        io.save(_covariance(), tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "a file, not a folder"


# -- paths that name a file ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["a.safetensors", "a.json", "a.pt"])
def test_save_to_a_file_name_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(
        dh.FormatError, match=rf"dh.save writes a folder.*{name}.*Save to .*/a' instead"
    ) as info:
        io.save(_covariance(), tmp_path / name)
    assert isinstance(info.value, ValueError)
    assert list(tmp_path.iterdir()) == []


def test_folder_names_with_dots_are_fine(tmp_path: Path) -> None:
    obj = _covariance()
    assert _same_covariance(io.load(io.save(obj, tmp_path / "gpt2.small")), obj)
