"""Only compatible statistics combine: merge, resume (stats=) and their metadata."""

from __future__ import annotations

import pytest
import torch

import degen_hooks as dh
from tests.cases import inputs, position_mixer, relu_mlp

F64 = torch.float64


def collected(model, x, sites, **kw) -> dh.Statistics:
    with dh.collect(model, sites, **kw) as run:
        if kw.get("jacobians"):
            run.backward(model(x))
        else:
            with torch.no_grad():
                model(x)
    return run.stats


def state(stats: dh.Statistics) -> dict:
    out = {k: v.clone() for k, v in stats.state_dict().items()}
    out["metadata"] = dict(stats.metadata)
    out["n_batches"] = {k: s.n_batches for k, s in stats.items()}
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        same = torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key]
        assert same, key


READOUT = torch.eye(3, 2, dtype=F64)

# (what differs, settings of the first run, settings of the second, message fragment)
MISMATCHES = [
    ("probe kind", {"jacobians": "exact"}, {"jacobians": "rademacher"}, "'jacobians'"),
    (
        "number of random probes",
        {"jacobians": "rademacher", "n_probes": 1},
        {"jacobians": "rademacher", "n_probes": 4},
        "'n_probes'",
    ),
    ("target", {"jacobians": "exact"}, {"jacobians": "exact", "target": "3"}, "'target'"),
    (
        "readout",
        {"jacobians": "exact", "readout": READOUT},
        {"jacobians": "exact", "readout": 2 * READOUT},
        "'readout'",
    ),
    ("firing threshold", {"firing": 0.0}, {"firing": 0.5}, "firing threshold"),
    ("accumulation dtype", {}, {"dtype": torch.float32}, "dtype"),
]


@pytest.mark.parametrize(
    ("what", "first", "second", "match"), MISMATCHES, ids=[m[0] for m in MISMATCHES]
)
def test_merge_refuses_other_settings_naming_both_values(what, first, second, match):
    model, x = relu_mlp(seed=0), inputs(16, 5, seed=1)
    a, b = collected(model, x, ["1"], **first), collected(model, x, ["1"], **second)
    before = state(a)
    with pytest.raises(dh.ShapeMismatchError, match=f"Cannot merge.*{match}.*here.*in the other"):
        a.merge(b)
    assert_same(state(a), before)


def test_merge_refuses_another_module_or_io_under_one_label():
    model, x = relu_mlp(seed=0), inputs(16, 5, seed=1)
    a = collected(model, x, [dh.Site("1", label="h")])
    b = collected(model, x, [dh.Site("3", label="h")])
    module = r"site 'h': its module differs \('1' here, '3'"
    with pytest.raises(dh.ShapeMismatchError, match=module):
        a.merge(b)
    c = collected(model, x, [dh.Site("2", io="input", label="h")])
    with pytest.raises(dh.ShapeMismatchError, match="site 'h': its module|site 'h': its io"):
        a.merge(c)


def test_merge_refuses_other_positions():
    model, x = position_mixer(seed=0), inputs(8, 4, seed=1, n_pos=5)
    sites = {"all": dh.Site("embed"), "last": dh.Site("embed", positions="last")}
    a, b = (collected(model, x, [sites[k]]) for k in ("all", "last"))
    with pytest.raises(dh.ShapeMismatchError, match=r"its positions differs \(None here, 'last'"):
        a.merge(b)


def test_merge_is_all_or_nothing_across_sites():
    model, x = relu_mlp(seed=0), inputs(16, 5, seed=1)
    a = collected(model, x, [dh.Site("1", label="p"), dh.Site("3", label="q")])
    b = collected(model, x, [dh.Site("1", label="p"), dh.Site("4", label="q")])
    b["q"].info = dict(a["q"].info)  # same description, another width: refused at merge time
    before = state(a)
    with pytest.raises(dh.ShapeMismatchError, match="Site 'q'"):
        a.merge(b)
    assert_same(state(a), before)  # site 'p' was merged before the refusal at 'q'


def test_compatible_merge_adds_up_and_keeps_the_metadata_true():
    model, x = relu_mlp(seed=0), inputs(32, 5, seed=1)
    kw = {"jacobians": "rademacher", "n_probes": 2, "readout": READOUT}
    a, b = collected(model, x[:16], ["1"], **kw), collected(model, x[16:], ["1"], seed=1, **kw)
    metadata = dict(a.metadata)
    a.merge(b)
    assert a["1"].acts.n_samples == 32
    assert a.metadata["n_backward_calls"] == 2
    assert {k: v for k, v in a.metadata.items() if k != "n_backward_calls"} == {
        k: v for k, v in metadata.items() if k != "n_backward_calls"
    }
    assert a.metadata["readout"]["shape"] == [3, 2]


RESUME = [
    ("probe kind", {"jacobians": "exact"}, {"jacobians": "gaussian"}, "'jacobians'"),
    (
        "readout",
        {"jacobians": "exact", "readout": READOUT},
        {"jacobians": "exact", "readout": -READOUT},
        "'readout'",
    ),
    (
        "target positions",
        {"jacobians": "exact"},
        {"jacobians": "exact", "target_positions": "last"},
        "'target_positions'",
    ),
]


@pytest.mark.parametrize(("what", "first", "second", "match"), RESUME, ids=[m[0] for m in RESUME])
def test_resume_refuses_other_settings(what, first, second, match):
    model, x = position_mixer(seed=0), inputs(8, 4, seed=1, n_pos=5)
    held = collected(model, x, ["act"], **first)
    before = state(held)
    with pytest.raises(dh.ShapeMismatchError, match=f"Cannot resume.*{match}"):
        with dh.collect(model, ["act"], stats=held, **second) as run:
            run.backward(model(x))
    assert_same(state(held), before)


def test_resume_refuses_other_positions_or_module():
    model, x = position_mixer(seed=0), inputs(8, 4, seed=1, n_pos=5)
    held = collected(model, x, [dh.Site("embed", label="s")])
    for site in (dh.Site("embed", positions="last", label="s"), dh.Site("act", label="s")):
        with pytest.raises(dh.ShapeMismatchError, match="Cannot resume.*site 's'"):
            with dh.collect(model, [site], stats=held):
                model(x)


def test_resume_with_the_same_settings_continues_and_keeps_the_metadata_true():
    model, x = relu_mlp(seed=0), inputs(16, 5, seed=1)
    held = collected(model, x, ["1", "3"], jacobians="exact")
    with dh.collect(model, ["1"], stats=held, jacobians="exact") as run:
        run.backward(model(x))
    assert held["1"].acts.n_samples == 32 and held["3"].acts.n_samples == 16
    assert held.metadata["sites"] == ["1", "3"]  # what the statistics hold, not the last run
    assert held.metadata["n_backward_calls"] == 2
