"""Cost plans: the estimated backward passes are the ones a pass runs (counted)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import degen_hooks as dh
import degen_hooks._backward as backward_module
from degen_hooks._plan import BatchProfile, PassCost, plan_jacobian_pass


class Mixer(nn.Module):
    """(batch, pos, 3) -> (batch, pos, 5): a per-position MLP plus a mix over positions."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.act, self.down = nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.up(x))
        return self.down(h + h.mean(1, keepdim=True))


@pytest.fixture
def counted(monkeypatch):
    calls = []
    original = backward_module.vjp_batched

    def counting(y, inputs, grad_outputs, **kwargs):
        calls.append(grad_outputs.shape[0])
        return original(y, inputs, grad_outputs, **kwargs)

    monkeypatch.setattr(backward_module, "vjp_batched", counting)
    return calls


CASES = [
    ("exact", 1, "auto", None),
    ("exact", 1, 3, None),
    ("exact", 1, 4, "last"),
    ("exact", 1, 2, slice(1, 3)),
    ("rademacher", 7, 2, None),
    ("gaussian", 5, "auto", None),
]


@pytest.mark.parametrize(("kind", "n_probes", "chunk", "positions"), CASES)
def test_planned_backward_passes_are_the_ones_that_run(counted, kind, n_probes, chunk, positions):
    model = Mixer().double()
    batches = [torch.randn(4, 6, 3, dtype=torch.float64) for _ in range(3)]
    profile, _ = BatchProfile.measure(
        model, batches[0], lambda m, b: m(b), [dh.Site("act"), dh.Site("", label="output")]
    )
    assert profile.shapes == {"act": (4, 6, 6), "output": (4, 6, 5)}
    assert profile.flops > 0 and profile.saved_bytes > 0
    cost = plan_jacobian_pass(
        "jacobians act",
        profile,
        site="act",
        target="output",
        r=5,
        kind=kind,
        positions=positions,
        n_probes=n_probes,
        chunk=chunk,
        n_batches=len(batches),
    )
    with dh.collect(
        model,
        ["act"],
        jacobians=kind,
        n_probes=n_probes,
        chunk=chunk,
        target_positions=positions,
    ) as run:
        run.over(batches, progress=False)
    assert cost.backward_passes == len(counted)
    assert cost.probe_vectors == sum(counted)
    probed_cells = (
        {"last": 1, None: 6}.get(positions, 2) if isinstance(positions, str | None) else 2
    )
    expected_vectors = probed_cells * 5 if kind == "exact" else n_probes
    assert cost.probe_vectors == expected_vectors * len(batches)


def test_a_cost_reads_as_a_line_and_flags_expensive_passes():
    cost = PassCost("jacobians x", "backward (exact probes)", 10, 120, 7680, 3.1e12, 2 * 10**9)
    assert cost.describe() == "~120 backward passes, 3.1 TFLOP, peak ~2 GB"
    assert not cost.is_expensive
    assert PassCost("x", "backward", None, 6_000).is_expensive
    assert "per batch" in PassCost("x", "backward", None, 6).describe()


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 4)
    ).double()


def test_a_dry_run_plans_the_backward_passes_the_build_runs(counted):
    model = mlp()
    data = list(torch.randn(40, 3, dtype=torch.float64).split(8))
    kwargs = dict(sections=None, chunk=3, progress=False)
    plan = dh.build_bases(model, ["1", "3"], data, dry_run=True, **kwargs)
    assert [p.name for p in plan.passes] == ["activations", "jacobians 3", "jacobians 1"]
    assert counted == []  # a dry run runs no backward pass
    basis = dh.build_bases(model, ["1", "3"], data, **kwargs)
    # The last site probes the 4 outputs; the first, the next site's basis (at most 6 wide).
    assert plan.passes[1].backward_passes == 2 * len(data)
    width = basis.widths_["3"]
    assert len(counted) == 2 * len(data) + math.ceil(width / 3) * len(data)
    assert plan.passes[2].backward_passes >= math.ceil(width / 3) * len(data)  # an upper bound
    assert basis.plan_.backward_passes == plan.backward_passes
    assert "backward passes" in repr(plan)


def test_closed_forms_plan_no_backward_pass():
    model = mlp()
    data = list(torch.randn(32, 3, dtype=torch.float64).split(8))
    plan = dh.build_bases(model, ["1", "3"], data, dry_run=True, progress=False)
    assert plan.backward_passes == 0
    assert [p.method for p in plan.passes] == ["forward", "closed form", "closed form"]


def test_an_expensive_pass_warns_with_advice(monkeypatch):
    import degen_hooks._plan as plan_module

    monkeypatch.setattr(plan_module, "WARN_BACKWARD_PASSES", 3)
    model = mlp()
    data = list(torch.randn(32, 3, dtype=torch.float64).split(8))
    with pytest.warns(UserWarning, match=r"jacobians [13].*random probes.*dry_run=True"):
        dh.build_bases(model, ["1", "3"], data, sections=None, chunk=1, progress=False)


def test_build_bases_takes_a_padding_mask():
    torch.manual_seed(0)
    model = Mixer().double()
    x = torch.randn(4, 6, 3, dtype=torch.float64)
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(1)) > 0.3
    basis = dh.build_bases(
        model,
        ["act"],
        [(x, mask)],
        forward=lambda m, b: m(b[0]),
        mask=lambda b: b[1],
        output_positions=None,
        progress=False,
    )
    assert basis.stats_["act"].acts.n_samples == int(mask.sum())
    with dh.collect(model, ["act"]) as run, torch.no_grad():
        run.set_mask(mask)
        model(x)
    torch.testing.assert_close(basis.stats_["act"].acts.cov(), run.stats["act"].acts.cov())


def test_the_statistics_arithmetic_is_not_counted_as_the_models():
    model, x = Mixer().double(), torch.randn(4, 6, 3, dtype=torch.float64)
    sites = [dh.Site("act"), dh.Site("", label="output")]
    alone, _ = BatchProfile.measure(model, x, lambda m, b: m(b), sites)
    with dh.collect(model, ["up", "act", "down"], firing=True):
        inside, _ = BatchProfile.measure(model, x, lambda m, b: m(b), sites)
    assert inside.flops == alone.flops > 0
