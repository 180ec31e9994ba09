"""Distributed runs never hang: every rank raises within the timeout when one rank fails.

One launch of two gloo workers plays every scenario in turn and writes what each rank
raised to a JSON report. A rank that must stay away from an exchange waits for a file the
other rank writes once it has raised, so no scenario depends on how fast the machine is.
The workers' process group has a 600 s timeout while the subprocess budget is 300 s: a
scenario that waits for the group's timeout instead of the one it was given fails the test.
"""

from __future__ import annotations

import json

import pytest
import torch

import degen_hooks as dh
from tests.unit.test_distributed import _free_port, launch_workers

WORKER = r"""
import json, os, sys, time
from datetime import timedelta
import torch, torch.distributed as dist
import degen_hooks as dh

torch.set_num_threads(1)
rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                        world_size=world, timeout=timedelta(seconds=600))
# A group with a short timeout of its own (new_group is collective: every rank calls it).
fast = dist.new_group(list(range(world)), timeout=timedelta(seconds=4))
report = {}

def save():
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(report, f)

def attempt(name, fn):
    try:
        fn()
        report[name] = {"ok": True}
    except Exception as err:
        report[name] = {"ok": False, "type": type(err).__name__, "message": str(err)}
    save()

def signal(name):  # tell the other rank that this rank has raised
    open(f"{out}/{name}.done", "w").close()

def wait_for(name):
    deadline = time.monotonic() + 250
    while not os.path.exists(f"{out}/{name}.done") and time.monotonic() < deadline:
        time.sleep(0.05)

class Batches:
    # Re-iterable batches; on rank `bad`, pass `fail_pass` raises at its second batch
    # (after waiting for `wait` when given: a loader that hangs, then fails).
    def __init__(self, bad=None, fail_pass=None, wait=None):
        gen = torch.Generator().manual_seed(1)
        self.batches = [torch.randn(6, 5, generator=gen, dtype=torch.float64)
                        for _ in range(4)][rank::world]
        self.fail = rank == bad
        self.fail_pass, self.wait, self.passes = fail_pass, wait, 0

    def __iter__(self):
        self.passes += 1
        for i, batch in enumerate(self.batches):
            if self.fail and self.passes == self.fail_pass and i == 1:
                if self.wait is not None:
                    wait_for(self.wait)
                raise RuntimeError(f"loader failed on rank {rank} in pass {self.passes}")
            yield batch

def build(data, **kwargs):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(),
                                torch.nn.Linear(4, 3)).double()
    # No closed-form sections: three passes (activations, then one backward pass per site).
    return dh.build_bases(model, ["0", "1"], data, sections=None, progress=False,
                          distributed=True, **kwargs)

# A rank whose data loader raises in the first pass, or in the last.
attempt("first_pass", lambda: build(Batches(bad=1, fail_pass=1)))
attempt("last_pass", lambda: build(Batches(bad=1, fail_pass=3)))
# A rank that fails after the last exchange (an argument only it got wrong).
attempt("after_exchanges", lambda: build(Batches(), variant="pca",
                                         n_components="two" if rank == 1 else None))
# The group is still usable: ranks that agree build the same bases.
def healthy():
    basis = build(Batches())
    report["lambdas"] = basis.lambdas_["0"].tolist()
attempt("healthy", healthy)
# all_reduce_ without timeout= waits for the group's timeout (4 s), not torch's 30 min.
if rank == 0:
    attempt("group_timeout", lambda: dh.all_reduce_(
        dh.Covariance().update(torch.ones(2, 3, dtype=torch.float64)), fast))
    signal("group_timeout")
else:
    wait_for("group_timeout")
# build_bases(timeout=4) on the world group (600 s): a rank whose loader hangs mid-pass.
attempt("build_timeout", lambda: build(Batches(bad=1, fail_pass=1, wait="build_timeout"),
                                       timeout=4))
if rank == 0:
    signal("build_timeout")
report["done"] = True
save()
"""


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out, world = tmp_path_factory.mktemp("faults"), 2
    logs = launch_workers(WORKER, out, world=world, timeout=600)  # a hang fails, never waits
    result = []
    for rank in range(world):
        path = out / f"rank{rank}.json"
        assert path.exists(), f"worker {rank} wrote no report; its output:\n{logs[rank]}"
        report = json.loads(path.read_text())
        assert report.get("done"), f"worker {rank} stopped early; its output:\n{logs[rank]}"
        result.append(report)
    return result


@pytest.mark.parametrize("scenario, n_pass", [("first_pass", 1), ("last_pass", 3)])
def test_loader_failing_on_one_rank_fails_every_rank(
    reports: list[dict], scenario: str, n_pass: int
) -> None:
    failing, other = reports[1][scenario], reports[0][scenario]
    assert failing["type"] == "RuntimeError"  # the failing rank raises its own error
    assert failing["message"] == f"loader failed on rank 1 in pass {n_pass}"
    assert other["type"] == "DistributedError"
    assert "rank(s) [1] of 2" in other["message"]
    assert f"rank 1: RuntimeError: loader failed on rank 1 in pass {n_pass}" in other["message"]


def test_failure_after_the_last_exchange_reaches_every_rank(reports: list[dict]) -> None:
    assert reports[1]["after_exchanges"]["ok"] is False
    assert reports[1]["after_exchanges"]["type"] != "DistributedError"
    other = reports[0]["after_exchanges"]
    assert other["type"] == "DistributedError"
    assert "rank(s) [1] of 2" in other["message"]


def test_group_stays_usable_after_a_failure_every_rank_saw(reports: list[dict]) -> None:
    assert reports[0]["healthy"]["ok"] and reports[1]["healthy"]["ok"]
    assert reports[0]["lambdas"] == reports[1]["lambdas"]


def test_all_reduce_waits_for_the_groups_timeout(reports: list[dict]) -> None:
    result = reports[0]["group_timeout"]
    assert result["type"] == "DistributedError"
    assert "within 4 s" in result["message"]
    assert "failed to pass monitoredBarrier" in result["message"]


def test_build_timeout_bounds_a_hanging_rank(reports: list[dict]) -> None:
    result = reports[0]["build_timeout"]
    assert result["type"] == "DistributedError"
    assert "within 4 s" in result["message"]
    assert "failed to pass monitoredBarrier" in result["message"]
    hung = reports[1]["build_timeout"]
    assert hung["type"] == "RuntimeError"
    assert hung["message"].startswith("loader failed on rank 1 in pass 1")


def test_timeout_must_be_positive() -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        acc = dh.Covariance().update(torch.ones(2, 3))
        with pytest.raises(ValueError, match="timeout must be a positive"):
            dh.all_reduce_(acc, timeout=0)
        with pytest.raises(TypeError, match="timeout must be a positive.*got '10' \\(str\\)"):
            dh.all_reduce_(acc, timeout="10")
    finally:
        dist.destroy_process_group()
