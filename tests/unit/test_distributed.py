"""all_reduce_ across real gloo processes: union equals one process over all data; no hangs.

Each launch starts two ``python -c`` workers (one thread each) on a free local port. The
workers build the same seeded data, collect their shard (through a DDP-wrapped model),
all-reduce and write what they hold with safetensors; the test compares against a single
process over the union. One launch plays every scenario that keeps the workers alive, so the
file pays the start-up of two Python processes once. Timeouts are sized for a slow, busy
machine (a hang fails the test after 600 s); a rank that must stay away from an exchange waits
for a file the other rank writes once it has raised, so no test depends on timing.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import degen_hooks as dh
from degen_hooks.distributed import DistributedError, all_reduce_

# Shared by the workers and the single-process reference.
SETUP = """
import torch
import degen_hooks as dh

def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
    ).double()

def make_batches():
    gen = torch.Generator().manual_seed(1)
    # Uneven batch sizes and a large mean: the merge must keep moments centred.
    return [torch.randn(7 + i, 5, generator=gen, dtype=torch.float64) + 30.0 for i in range(6)]

def make_weighted():
    gen = torch.Generator().manual_seed(2)
    xs = [torch.randn(9, 4, generator=gen, dtype=torch.float64) + 30.0 for _ in range(4)]
    ws = [torch.rand(9, generator=gen, dtype=torch.float64) for _ in range(4)]
    return xs, ws

def make_transformer():  # one TransformerLens layer, no norms: all sections closed-form
    from transformer_lens.model_bridge import TransformerBridge

    cfg = dict(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=16, n_ctx=4, d_vocab=11,
               act_fn="relu", normalization_type=None, seed=0)
    return TransformerBridge.boot_native(cfg, dtype=torch.float64).eval()

def make_tokens():
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, 11, (3 + i, 4), generator=gen) for i in range(4)]

TRANSFORMER_SITES = [dh.Site("blocks.0.hook_resid_pre"),
                     dh.Site("blocks.0.hook_resid_mid", positions="last"),
                     dh.Site("blocks.0.hook_resid_post", positions="last")]

def build_case(variant, rank=0, world=1, **kwargs):  # one build, on this rank's shard
    if variant == "transformer":
        return dh.build_bases(make_transformer(), TRANSFORMER_SITES,
                              make_tokens()[rank::world], output_positions="last",
                              progress=False, **kwargs)
    sections = "auto" if variant == "closed" else None
    return dh.build_bases(make_model(), ["0", "1"], make_batches()[rank::world],
                          sections=sections, progress=False, **kwargs)

def collect(model, batches):
    sites = ["0", "module.1", dh.Site("2")] if hasattr(model, "module") else ["0", "1", "2"]
    with dh.collect(model, sites, jacobians="exact", firing=True,
                    derivatives={"0": "relu"}) as run:
        for batch in batches:
            run.backward(model(batch))
    return run.stats

def standalone(rank, world):
    xs, ws = make_weighted()
    cov, second, firing, empty = (dh.Covariance(), dh.SecondMoment(),
                                  dh.CoFiring(threshold=0.5), dh.Covariance())
    for i in range(rank, len(xs), world):
        cov.update(xs[i], weights=ws[i])
        second.update(xs[i] - 30.0, count=3)
        firing.update(xs[i] - 30.0 + 0.5)
        if i == 0:
            empty.update(xs[i])  # rank 1 keeps an empty (unallocated) accumulator
    return {"cov": cov, "second": second, "firing": firing, "empty": empty}
"""

WORKER = """
import json, os, sys, time
from datetime import timedelta
import torch, torch.distributed as dist
from safetensors.torch import save_file
from degen_hooks.distributed import all_reduce_

torch.set_num_threads(1)
rank, world, port, out, mode = sys.argv[1:6]
rank, world = int(rank), int(world)
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                        world_size=world, timeout=timedelta(seconds=600))
report = {}

def wait_for(path):  # a file the other rank writes once it is done
    deadline = time.monotonic() + 500
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)

def save_builds(variants, name):
    state = {}
    for variant in variants:
        basis = build_case(variant, rank, world, distributed=True)
        for key in basis.sites_:
            state[f"{variant}/{key}/lambdas"] = basis.lambdas_[key]
            state[f"{variant}/{key}/projector"] = basis.projector(key)
    save_file(state, f"{out}/{name}{rank}.safetensors")

def attempt(name, fn):
    start = time.monotonic()
    try:
        fn()
        report[name] = {"ok": True}
    except Exception as err:
        report[name] = {"ok": False, "type": type(err).__name__, "message": str(err)}
    report[name]["seconds"] = time.monotonic() - start

if mode == "union":
    model = torch.nn.parallel.DistributedDataParallel(make_model())
    stats = collect(model, make_batches()[rank::world])
    accs = standalone(rank, world)
    attempt("stats", lambda: all_reduce_(stats, timeout=20))
    for name, acc in accs.items():
        attempt(name, lambda acc=acc: all_reduce_(acc, timeout=20))
    state = {f"stats/{k}": v for k, v in stats.state_dict().items()}
    for name, acc in accs.items():
        state.update({f"{name}/{k}": v for k, v in acc.state_dict().items()})
    state["n_batches"] = torch.tensor([stats[k].n_batches for k in sorted(stats)])
    save_file(state, f"{out}/rank{rank}.safetensors")
    # The group stays usable after refused exchanges: every rank takes the same branch.
    bad = {"not": "statistics"} if rank == 1 else dh.Covariance().update(torch.ones(2, 3))
    attempt("invalid", lambda: all_reduce_(bad, timeout=20))
    other = dh.SecondMoment() if rank == 1 else dh.Covariance()
    attempt("layout", lambda: all_reduce_(other.update(torch.ones(2, 3)), timeout=20))
    wide = dh.Covariance().update(torch.ones(2, 3 + rank))
    attempt("width", lambda: all_reduce_(wide, timeout=20))
    plain = make_model()  # same sites and widths, other probes: refused, naming both
    with dh.collect(plain, ["1"], jacobians="exact" if rank == 0 else "rademacher") as run:
        run.backward(plain(make_batches()[rank]))
    attempt("settings", lambda: all_reduce_(run.stats, timeout=20))
    attempt("build", lambda: save_builds(("closed", "probes"), "build"))
    # Last, as it leaves the group unusable: a rank that raises before the exchange and
    # lingers (a notebook, a caught error) does not close its connection, so only the timeout
    # can free rank 0. Rank 1 lingers until rank 0 has raised.
    acc = dh.Covariance().update(torch.ones(2, 3))
    if rank == 1:
        try:
            raise RuntimeError("data loader failed on rank 1")
        except RuntimeError:
            wait_for(f"{out}/crash.done")
    else:
        attempt("crash", lambda: all_reduce_(acc, timeout=3))
        open(f"{out}/crash.done", "w").close()
elif mode == "transformer":
    attempt("build", lambda: save_builds(("transformer",), "build"))
elif mode == "die":
    acc = dh.Covariance().update(torch.ones(2, 3))
    if rank == 1:
        raise SystemExit("rank 1 died")
    attempt("die", lambda: all_reduce_(acc, timeout=20))
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump(report, f)
"""

namespace: dict = {}
exec(SETUP, namespace)  # noqa: S102 - the same code the workers run


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(mode: str, out: Path, world: int = 2, timeout: float = 600.0) -> list[str]:
    """Run ``world`` workers of this file to completion; returns their output."""
    code = SETUP + textwrap.dedent(WORKER)
    return launch_workers(code, out, mode, world=world, timeout=timeout)


def launch_workers(
    code: str, out: Path, *args: str, world: int = 2, timeout: float = 600.0
) -> list[str]:
    """Run ``world`` workers ``python -c code RANK WORLD PORT OUT *args`` to completion
    (``timeout`` seconds for all of them); returns their output."""
    port = str(_free_port())
    env = dict(os.environ, OMP_NUM_THREADS="1")
    deadline = time.monotonic() + timeout
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(r), str(world), port, str(out), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    logs = []
    try:
        for proc in procs:
            try:
                logs.append(proc.communicate(timeout=max(deadline - time.monotonic(), 1))[0])
            except subprocess.TimeoutExpired:
                logs.append(f"<killed after {timeout:g} s: a rank hung>")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return logs


def _report(out: Path, rank: int, logs: list[str]) -> dict:
    path = out / f"rank{rank}.json"
    assert path.exists(), f"worker {rank} wrote no report; its output:\n{logs[rank]}"
    return json.loads(path.read_text())


def _assert_state_close(got: dict, want: dict, rtol: float) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        if value.is_floating_point():
            scale = value.abs().max().clamp_min(1e-300)
            err = (got[key] - value).abs().max() / scale
            assert err <= rtol, f"{key}: relative error {err:.2e} > {rtol}"
        else:
            assert torch.equal(got[key], value), key


@pytest.fixture(scope="module")
def union_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("union")
    logs = _launch("union", out)
    return out, [_report(out, r, logs) for r in range(2)]


def test_all_reduce_equals_single_process_over_union(union_run: tuple[Path, list[dict]]) -> None:
    tmp_path, reports = union_run
    for report in reports:
        for name in ("stats", "cov", "second", "firing", "empty"):
            assert report[name]["ok"], report[name]
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    # Every rank holds the same bits.
    assert ranks[0].keys() == ranks[1].keys()
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key

    # Single process over the union, on the unwrapped model (DDP-prefixed site names match).
    batches = namespace["make_batches"]()
    stats = namespace["collect"](namespace["make_model"](), batches)
    want = {f"stats/{k}": v for k, v in stats.state_dict().items()}
    singles = namespace["standalone"](0, 1)
    for name, acc in singles.items():
        want.update({f"{name}/{k}": v for k, v in acc.state_dict().items()})
    got = dict(ranks[0])
    n_batches = got.pop("n_batches")
    # The DDP run stores "module.1" where the plain run stores "1": same module.
    got = {k.replace("stats/module.1/", "stats/1/"): v for k, v in got.items()}
    _assert_state_close(got, want, rtol=1e-12)
    assert n_batches.tolist() == [len(batches)] * 3
    assert stats["0"].acts.n_samples == sum(b.shape[0] for b in batches)


def test_refused_exchanges_raise_on_every_rank(union_run: tuple[Path, list[dict]]) -> None:
    _, reports = union_run
    for rank, report in enumerate(reports):
        invalid = report["invalid"]
        assert invalid["type"] == "DistributedError"
        assert "rank(s) [1] of 2" in invalid["message"]
        if rank == 1:
            assert "got dict" in invalid["message"]
        assert report["layout"]["type"] == "ShapeMismatchError"
        assert "different layouts" in report["layout"]["message"]
        assert report["width"]["type"] == "ShapeMismatchError"
        assert "{0: 3, 1: 4}" in report["width"]["message"]
        settings = report["settings"]
        assert settings["type"] == "ShapeMismatchError", settings
        values = ["'exact' on rank 0", "'rademacher' on rank 1"][:: 1 if rank == 0 else -1]
        assert f"'jacobians' is {values[0]} and {values[1]}" in (settings["message"]), settings[
            "message"
        ]


def test_rank_that_raises_and_lingers_fails_the_others_by_timeout(
    union_run: tuple[Path, list[dict]],
) -> None:
    _, reports = union_run
    result = reports[0]["crash"]
    assert result["type"] == "DistributedError"
    assert "not every rank reached all_reduce_ within 3 s" in result["message"]
    assert re.search(r"Ranks? 1 failed to pass monitoredBarrier", result["message"])


@pytest.mark.slow  # the lingering rank above covers the timeout; this is the fast path
def test_rank_that_dies_fails_the_others(tmp_path: Path) -> None:
    logs = _launch("die", tmp_path)
    result = _report(tmp_path, 0, logs)["die"]
    assert result["type"] == "DistributedError"
    assert "Another rank probably raised, died or hangs" in result["message"]


def test_needs_an_initialised_process_group() -> None:
    with pytest.raises(DistributedError, match="init_process_group"):
        all_reduce_(dh.Covariance())


def test_ddp_site_names_resolve_with_and_without_prefix(tmp_path: Path) -> None:
    import torch.distributed as dist

    from degen_hooks.sites import resolve_sites

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        model = namespace["make_model"]()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        (plain, plain_module), (prefixed, prefixed_module) = resolve_sites(ddp, ["2", "module.0"])
        assert plain_module is model[2] and prefixed_module is model[0]
        assert (plain.key, prefixed.key) == ("2", "0")  # one key, with or without the prefix
        assert dh.find_sites(ddp, "*") == ["0", "1", "2"]
        with pytest.raises(dh.SiteNotFoundError, match="'module.3' not found in Distributed"):
            resolve_sites(ddp, ["module.3"])
        # World size 1: all_reduce_ is the identity.
        acc = dh.Covariance().update(torch.ones(2, 3))
        assert all_reduce_(acc) is acc and acc.n_samples == 2
        with pytest.raises(DistributedError, match="combines Statistics, .* got list"):
            all_reduce_([acc])
    finally:
        dist.destroy_process_group()


def _assert_builds_match(out: Path, variants: tuple[str, ...]) -> None:
    ranks = [load_file(str(out / f"build{r}.safetensors")) for r in range(2)]
    for variant in variants:
        whole = namespace["build_case"](variant)
        if variant == "transformer":  # attention, MLP and unembedding: no backward pass
            assert all(k.endswith("(closed form)") for k in whole.timings_ if "jacobians" in k)
        for key in whole.sites_:
            lambdas, projector = whole.lambdas_[key], whole.projector(key)
            scale = float(lambdas.abs().max())  # spectra: relative to the largest eigenvalue
            for state in ranks:  # every rank holds the union's bases
                got = state[f"{variant}/{key}/lambdas"]
                torch.testing.assert_close(got, lambdas, rtol=1e-9, atol=1e-9 * scale)
                got = state[f"{variant}/{key}/projector"]
                torch.testing.assert_close(got, projector, rtol=1e-9, atol=1e-9)


def test_distributed_build_equals_one_process_over_the_union(
    union_run: tuple[Path, list[dict]],
) -> None:
    out, reports = union_run
    for report in reports:
        assert report["build"]["ok"], report["build"]
    _assert_builds_match(out, ("closed", "probes"))


@pytest.mark.slow  # TransformerLens' import alone takes seconds per worker
def test_distributed_transformer_build_equals_one_process_over_the_union(tmp_path: Path) -> None:
    logs = _launch("transformer", tmp_path)
    for rank in range(2):
        result = _report(tmp_path, rank, logs)["build"]
        assert result["ok"], result
    _assert_builds_match(tmp_path, ("transformer",))
