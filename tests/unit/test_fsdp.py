"""Collections on an FSDP2-sharded model (``fully_shard``, gloo on CPU) equal the unsharded ones.

Each launch starts two ``python -c`` workers (one thread each, like ``test_distributed``) that
shard the same seeded float64 MLP with ``fully_shard`` (every ``Linear`` and the root), collect
on their own data and save what they hold; the test compares each rank against the unsharded
model on that rank's data, in this process. FSDP2 gathers the weights again in every backward
pass, so the ranks must run equally many backward passes: the cases whose ranks need different
numbers of probe chunks (other sequence lengths, a fully masked batch, a non-finite gradient on
one rank) would otherwise pair one rank's backward all-gather with the other's forward one and
crash, hang or exchange the wrong weights. Timeouts are sized for a slow, busy machine (a hang
fails the test after 600 s); no assertion depends on timing.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import degen_hooks as dh
from degen_hooks._backward import sharding_groups
from degen_hooks.jacobians import count_probe_vectors, probe_chunks
from tests.unit.test_distributed import _free_port, launch_workers

dist = pytest.importorskip("torch.distributed")
if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)
try:
    from torch.distributed.fsdp import FSDPModule, fully_shard
except ImportError:  # torch < 2.6
    pytest.skip("torch.distributed.fsdp.fully_shard is not available", allow_module_level=True)

# Shared by the workers and the unsharded reference in this process.
SETUP = """
import torch
from torch import nn
import degen_hooks as dh

def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                         nn.Linear(8, 3)).double()

class Root(nn.Module):  # sqrt|x|: finite values, a NaN gradient at an exact zero (0 * inf)
    def forward(self, x):
        return x.abs().sqrt()

def make_rooted():
    torch.manual_seed(1)
    return nn.Sequential(Root(), nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()

def make_data(case, rank):
    gen = torch.Generator().manual_seed(10 + rank)
    if case in ("uneven", "uneven_root", "masked"):  # (batch, pos, 5)
        n_pos = 3 if case == "masked" else 2 + rank  # "uneven": positions differ per rank
        return [torch.randn(3, n_pos, 5, generator=gen, dtype=torch.float64) for _ in range(3)]
    xs = [torch.randn(6 + rank, 5, generator=gen, dtype=torch.float64) for _ in range(3)]
    if case == "nonfinite" and rank == 0:
        xs[1][0, 0] = 0.0  # rank 0's second batch: a NaN gradient at the input site
    return [x.requires_grad_() for x in xs]

def make_masks(rank):  # rank 1's second batch is all padding: it has no probe at all
    masks = [torch.ones(3, 3, dtype=torch.bool) for _ in range(3)]
    masks[1][:, 0] = False
    if rank == 1:
        masks[1][:] = False
    return masks

READOUT = torch.linspace(-1.0, 1.0, 16, dtype=torch.float64).reshape(8, 2)
SITES = [dh.Site("0", io="input"), "1", "3"]
CASES = {  # name: (sites, collect keywords); no jacobians: a no_grad forward
    "acts": (SITES, dict(firing=True)),
    "closed": ([dh.Site("2", io="input"), "2"], dict(derivatives={"2": "tanh"})),
    "exact_chunk1": (SITES, dict(jacobians="exact", chunk=1)),
    "exact_auto": (SITES, dict(jacobians="exact")),
    "rademacher": (SITES, dict(jacobians="rademacher", n_probes=5, chunk=2, seed=3)),
    "target": (["1"], dict(jacobians="exact", target="3", readout=READOUT, chunk=1)),
    "uneven": (["1", "3"], dict(jacobians="exact", chunk=4)),
    "uneven_root": (["1", "3"], dict(jacobians="exact", chunk=4)),  # fully_shard(root) only
    "masked": (["1", "3"], dict(jacobians="exact", chunk=4)),
    "nonfinite": ([dh.Site("0", io="input"), "2"], dict(jacobians="exact", chunk=1)),
}

def collect_case(model, case, batches, masks=None):
    # The statistics of one case, and the batches that raised (caught: the run goes on).
    sites, kwargs = CASES[case]
    failed = {}
    with dh.collect(model, sites, **kwargs) as run:
        for i, x in enumerate(batches):
            if masks is not None:
                run.set_mask(masks[i])
            if "jacobians" not in kwargs:
                with torch.no_grad():
                    model(x)
                continue
            try:
                run.backward(model(x))
            except dh.NonFiniteError as err:
                failed[i] = str(err)
    return run.stats, failed
"""

WORKER = """
import json, sys
from datetime import timedelta
import torch, torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

torch.set_num_threads(1)
rank, world, port, out = sys.argv[1:5]
rank, world = int(rank), int(world)
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                        world_size=world, timeout=timedelta(seconds=600))
mesh = init_device_mesh("cpu", (world,))
report, state = {}, {}

def sharded(model, root_only=False):
    # root_only: one group, kept unsharded after the forward (no DTensor left to ask)
    for module in model:
        if isinstance(module, nn.Linear) and not root_only:
            fully_shard(module, mesh=mesh)
    return fully_shard(model, mesh=mesh)

def attempt(name, fn):
    try:
        report[name] = {"ok": True, "value": fn()}
    except Exception as err:
        report[name] = {"ok": False, "type": type(err).__name__, "message": str(err)}

def run_case(case):
    model = make_rooted() if case == "nonfinite" else make_model()
    model = sharded(model, root_only=case.endswith("_root"))
    masks = make_masks(rank) if case == "masked" else None
    stats, failed = collect_case(model, case, make_data(case, rank), masks)
    state.update({f"{case}/{k}": v for k, v in stats.state_dict().items()})
    if case == "closed":  # the section needs the full weights: full_tensor() gathers them
        section = dh.MLPSection(model[2].weight.full_tensor(), model[4].weight.full_tensor(),
                                "tanh")
        state["closed/gram"] = section.jacobian_gram(stats["2"].derivs)
    if case == "exact_chunk1":  # FSDP2 still trains: no .grad was touched, grads reduce
        report["grads_untouched"] = all(p.grad is None for p in model.parameters())
        model(make_data("acts", rank)[0]).pow(2).sum().backward()
        for name, p in model.named_parameters():
            state[f"train/{name}"] = p.grad.full_tensor()
    return {"failed": failed, "sharded": isinstance(model, FSDPModule),
            "sites": dh.find_sites(model, "*")}

for case in CASES:
    attempt(case, lambda: run_case(case))
save_file(state, f"{out}/rank{rank}.safetensors")
dist.barrier()

# Last, as it leaves the group unusable: rank 1 skips run.backward() and leaves; rank 0 must
# raise (not hang) in the exchange where the ranks agree on the number of backward passes.
model = sharded(make_model())
x = make_data("acts", rank)[0]
if rank == 1:
    model(x)
else:
    def skipped():
        with dh.collect(model, ["1"], jacobians="exact") as run:
            run.backward(model(x))
    attempt("skipped", skipped)
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump(report, f)
"""

namespace: dict = {}
exec(SETUP, namespace)  # noqa: S102 - the same code the workers run


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], list[dict]]:
    out = tmp_path_factory.mktemp("fsdp")
    logs = launch_workers(SETUP + WORKER, out)
    reports, states = [], []
    for rank in range(2):
        path = out / f"rank{rank}.json"
        assert path.exists(), f"worker {rank} wrote no report; its output:\n{logs[rank]}"
        reports.append(json.loads(path.read_text()))
        states.append(load_file(str(out / f"rank{rank}.safetensors")))
    return reports, states


def _reference(case: str, rank: int) -> tuple[dict, dict, torch.nn.Module]:
    """The unsharded model's statistics of ``case`` on ``rank``'s data, failed batches, model."""
    model = namespace["make_rooted" if case == "nonfinite" else "make_model"]()
    masks = namespace["make_masks"](rank) if case == "masked" else None
    stats, failed = namespace["collect_case"](
        model, case, namespace["make_data"](case, rank), masks
    )
    return {f"{case}/{k}": v for k, v in stats.state_dict().items()}, failed, model


def _assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float, name: str) -> None:
    if not want.is_floating_point():
        assert torch.equal(got, want), name
        return
    scale = want.abs().max().clamp_min(1e-300) if want.numel() else 1.0
    err = float((got - want).abs().max() / scale) if want.numel() else 0.0
    assert err <= rtol, f"{name}: relative error {err:.2e} > {rtol}"


@pytest.mark.parametrize("case", list(namespace["CASES"]))
def test_statistics_under_fsdp2_equal_the_unsharded_model(fsdp_run, case: str) -> None:
    reports, states = fsdp_run
    for rank in range(2):
        result = reports[rank][case]
        assert result["ok"], result
        assert result["value"]["sharded"]
        want, failed, plain = _reference(case, rank)
        # fully_shard swaps the class in place: the site names stay the plain ones.
        assert result["value"]["sites"] == dh.find_sites(plain, "*")
        assert result["value"]["failed"] == {str(i): m for i, m in failed.items()}
        got = {k: v for k, v in states[rank].items() if k.startswith(f"{case}/")}
        got.pop("closed/gram", None)
        assert got.keys() == want.keys()
        for key, value in want.items():
            # Activations: the same float64 operations; Grams: rtol 1e-10 (probe order).
            _assert_close(got[key], value, 1e-10 if "/grads/" in key else 1e-12, key)


def test_ranks_with_different_probe_counts_pad_to_the_same_passes(fsdp_run) -> None:
    reports, _ = fsdp_run
    # The point of "uneven(_root)", "masked" and "nonfinite": the ranks need 2 vs 3 chunks of 4
    # exact probes, 3 vs 0, or one stops at a NaN; unless they agree on the passes, one
    # rank's backward all-gather meets the other's forward one.
    uneven = [count_probe_vectors("exact", torch.Size((3, 2 + rank, 3))) for rank in range(2)]
    assert [math.ceil(n / 4) for n in uneven] == [2, 3]
    padding = namespace["make_masks"](1)[1]
    assert count_probe_vectors("exact", torch.Size((3, 3, 3)), mask=padding) == 0
    assert reports[0]["nonfinite"]["value"]["failed"].keys() == {"1"}
    assert "NaN/inf" in reports[0]["nonfinite"]["value"]["failed"]["1"]
    assert reports[1]["nonfinite"]["value"]["failed"] == {}


def test_closed_form_from_full_weights_equals_the_unsharded_one(fsdp_run) -> None:
    _, states = fsdp_run
    for rank in range(2):
        model = namespace["make_model"]()
        stats, _ = namespace["collect_case"](
            model, "closed", namespace["make_data"]("closed", rank)
        )
        want = dh.MLPSection.from_modules(model[2], model[3], model[4]).jacobian_gram(
            stats["2"].derivs
        )
        _assert_close(states[rank]["closed/gram"], want, 1e-12, f"closed form, rank {rank}")


def test_training_after_a_collection_is_unchanged(fsdp_run) -> None:
    reports, states = fsdp_run
    grads = []
    for rank in range(2):
        assert reports[rank]["grads_untouched"]
        model = namespace["make_model"]()
        model(namespace["make_data"]("acts", rank)[0]).pow(2).sum().backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    for name in grads[0]:
        want = (grads[0][name] + grads[1][name]) / 2  # FSDP2 averages over the ranks
        for rank in range(2):
            _assert_close(states[rank][f"train/{name}"], want, 1e-12, name)


def test_a_rank_that_skips_backward_makes_the_other_raise(fsdp_run) -> None:
    reports, _ = fsdp_run
    result = reports[0]["skipped"]
    assert result["type"] == "DistributedError", result
    assert "could not agree on the number of backward passes (1 here)" in result["message"]
    assert (
        "every rank must call run.backward(output) after each forward pass" in (result["message"])
    )


# -- in this process -----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["exact", "rademacher"])
@pytest.mark.parametrize(
    ("shape", "positions", "with_mask"),
    [((4, 3), None, False), ((2, 5, 3), "last", False), ((2, 5, 3), None, True),
     ((2, 5, 3), slice(1, 4), True), ((0, 5, 3), None, False)],
)  # fmt: skip
def test_count_probe_vectors_is_what_probe_chunks_yields(kind, shape, positions, with_mask):
    readout = torch.ones(3, 2, dtype=torch.float64)
    mask = None
    if with_mask:
        mask = torch.tensor([[True, True, False, False, False], [True] * 4 + [False]])
    kw = dict(readout=readout, positions=positions, mask=mask, n_probes=3)
    chunks = probe_chunks(kind, torch.Size(shape), chunk=2, dtype=torch.float64, **kw)
    assert count_probe_vectors(kind, torch.Size(shape), **kw) == sum(v.shape[0] for v in chunks)


def test_an_unsharded_model_needs_no_agreement() -> None:
    assert sharding_groups(namespace["make_model"]()) == []


def test_fsdp2_on_one_rank_in_this_process() -> None:
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        model, plain = namespace["make_model"](), namespace["make_model"]()
        mesh = init_device_mesh("cpu", (1,))
        for index in (0, 2, 4):
            fully_shard(model[index], mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert isinstance(model, FSDPModule)
        assert sharding_groups(model) == []  # one rank: nothing to agree on
        batches = namespace["make_data"]("exact_chunk1", 0)
        got, _ = namespace["collect_case"](model, "exact_chunk1", batches)
        want, _ = namespace["collect_case"](plain, "exact_chunk1", batches)
        for key, value in want.state_dict().items():
            _assert_close(got.state_dict()[key], value, 1e-10, key)
    finally:
        dist.destroy_process_group()
