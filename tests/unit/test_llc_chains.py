"""Parallel chains: stacked chains equal sequential ones, and both equal a plain SGLD loop.

The reference is a brute-force SGLD (and RMSProp-SGLD) loop written out here, one chain
at a time, with the per-chain seeding of ``estimate_llc``: one ``torch.Generator`` per
chain, seeded from ``numpy.random.SeedSequence(seed)``, drawing noise parameter by
parameter. Everything is float64, so equal means equal to 1e-12 (rounding only).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from degen_hooks.llc import RMSPropSGLD, estimate_llc

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*(effective draws|not flattened|disagree)"),
    pytest.mark.usefixtures("one_thread"),
]


def tanh_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def batches(n: int = 512, size: int = 128) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return list((torch.rand(n, 3, generator=g, dtype=torch.float64) * 2 - 1).split(size))


def reference_traces(
    model, data, *, sampler, step_size, n_beta, gamma, n_chains, n_steps, n_burnin, seed
):
    """Batch losses of a plain loop over chains, steps and parameters (brute force)."""
    with torch.no_grad():
        targets = [model(x) for x in data]
    seeds = np.random.SeedSequence(seed).generate_state(n_chains)
    traces = np.zeros((n_chains, n_steps))
    for chain in range(n_chains):
        sampled = copy.deepcopy(model)
        params = list(sampled.parameters())
        anchors = [p.detach().clone() for p in params]
        square_avg = [torch.zeros_like(p) for p in params]
        generator = torch.Generator().manual_seed(int(seeds[chain]))
        for step in range(n_steps):
            x, target = data[step % len(data)], targets[step % len(data)]
            loss = (sampled(x) - target).square().sum(-1).mean()
            grads = torch.autograd.grad(loss, params)
            traces[chain, step] = loss.item()
            with torch.no_grad():
                for p, g, anchor, v in zip(params, grads, anchors, square_avg, strict=True):
                    noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
                    if sampler == "sgld":
                        drift = n_beta * g + gamma * (p - anchor)
                        p += -step_size / 2 * drift + math.sqrt(step_size) * noise
                    else:  # RMSProp-SGLD, the preconditioner adapted during burn-in only
                        if step < n_burnin:
                            v.mul_(0.99).add_(0.01 * g * g)
                        precond = 1 / (v.sqrt() + 0.1)
                        drift = precond * (n_beta * g + gamma * (p - anchor))
                        p += -step_size / 2 * drift + (step_size * precond).sqrt() * noise
    return traces


@pytest.mark.parametrize("sampler", ["sgld", "rmsprop"])
def test_parallel_and_sequential_chains_equal_a_plain_loop(sampler):
    model, data = tanh_mlp(), batches()
    settings = dict(
        step_size=2e-4 if sampler == "sgld" else 2e-5,
        n_beta=50.0,
        gamma=10.0,
        n_chains=5,
        n_burnin=10,
        n_draws=40,
        seed=7,
        sampler=sampler,
        progress=False,
    )
    runs = {
        parallel: estimate_llc(model, data, parallel=parallel, **settings)
        for parallel in [True, False, 2]  # all at once, one at a time, in pairs
    }
    expected = reference_traces(
        model,
        data,
        sampler=sampler,
        step_size=settings["step_size"],
        n_beta=50.0,
        gamma=10.0,
        n_chains=5,
        n_steps=50,
        n_burnin=10,
        seed=7,
    )
    for parallel, result in runs.items():
        both = torch.cat([result.burnin_traces, result.loss_traces], dim=1).numpy()
        np.testing.assert_allclose(both, expected, rtol=1e-12, atol=1e-15, err_msg=str(parallel))
        assert result.hyperparameters["parallel"] == parallel
    np.testing.assert_allclose(
        runs[True].llc_per_chain.numpy(), runs[False].llc_per_chain.numpy(), rtol=1e-12
    )
    assert runs[True].llc == pytest.approx(runs[False].llc, rel=1e-12)


def test_a_chain_gives_the_same_trace_alone_or_with_others():
    model, data = tanh_mlp(), batches()
    settings = dict(step_size=2e-4, n_beta=50.0, gamma=10.0, n_draws=30, seed=3, progress=False)
    four = estimate_llc(model, data, n_chains=4, **settings)
    one = estimate_llc(model, data, n_chains=1, **settings)
    np.testing.assert_allclose(four.loss_traces[0], one.loss_traces[0], rtol=1e-12)


class ItemModel(nn.Module):
    """Reads a value with .item() in forward: fine for one chain, impossible under vmap."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 1.0 + 0.0 * self.linear.weight.sum().item()
        return self.linear(x) * scale


def test_a_model_vmap_cannot_run_falls_back_to_one_chain_at_a_time():
    torch.manual_seed(0)
    model, data = ItemModel(), batches()
    settings = dict(step_size=2e-4, n_chains=3, n_draws=20, seed=1, progress=False)
    with pytest.warns(RuntimeWarning, match=r"one after another: torch.func.vmap cannot run"):
        fallen_back = estimate_llc(model, data, **settings)
    sequential = estimate_llc(model, data, parallel=False, **settings)
    assert fallen_back.hyperparameters["parallel"] is False
    torch.testing.assert_close(fallen_back.loss_traces, sequential.loss_traces, rtol=0, atol=0)


@pytest.mark.parametrize("parallel", [True, False])
def test_the_model_is_bitwise_unchanged_even_with_a_module_used_twice(parallel):
    # torch.func.functional_call leaves a swapped tensor behind in a module reached by two
    # paths; the chains swap each slot once and put back the model's own parameter.
    shared = nn.Linear(3, 3).double()
    model = nn.Sequential(shared, nn.Tanh(), shared, nn.Tanh(), nn.Linear(3, 2).double())
    before = [(name, p, p.detach().clone()) for name, p in model.named_parameters()]
    estimate_llc(
        model,
        batches(),
        sampler=RMSPropSGLD(),
        n_chains=3,
        n_draws=20,
        parallel=parallel,
        progress=False,
    )
    after = list(model.named_parameters())
    assert [name for name, _ in after] == [name for name, _, _ in before]
    for (name, p, copy_), (_, q) in zip(before, after, strict=True):
        assert q is p and torch.equal(q, copy_), name
    assert model[0].weight is model[2].weight
    assert type(model[0].weight) is nn.Parameter


def test_parallel_setting_is_checked():
    with pytest.raises(ValueError, match="parallel must be True"):
        estimate_llc(tanh_mlp(), batches(), parallel=-1, progress=False)


@pytest.mark.parametrize("size", [1, 7, 16, 40])
def test_noise_drawn_in_place_equals_randn(size):
    """The stacked chains draw with ``view.normal_(generator=g)``: the values (and the
    generator's state after) of ``torch.randn(shape, generator=g)``, small and large sizes."""
    first, second = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    buffer = torch.empty(2, size, dtype=torch.float64)
    for _ in range(3):
        buffer[1].normal_(generator=first)
        expected = torch.randn(size, generator=second, dtype=torch.float64)
        assert torch.equal(buffer[1], expected)


def test_the_stacked_call_is_vmap():
    """The stacked step's direct entry into the vmap level gives vmap's results bitwise: a
    batched and an unbatched output, gradients through it, an error that leaves no level."""
    from torch.func import vmap

    from degen_hooks.llc._chains import stacked_call

    model = tanh_mlp()
    x = batches()[0]
    names = [name for name, _ in model.named_parameters()]
    stacked = [p.detach()[None].repeat(4, *[1] * p.ndim) for p in model.parameters()]
    stacked = [w + 0.1 * torch.randn_like(w) for w in stacked]

    def loss(*weights):
        out = torch.func.functional_call(model, dict(zip(names, weights, strict=True)), (x,))
        return out.square().mean()

    def constant(*weights):
        return x.sum()

    for fn in (loss, constant):
        leaves = [w.clone().requires_grad_(True) for w in stacked]
        ours, theirs = stacked_call(fn)(*leaves), vmap(fn)(*stacked)
        assert ours.shape == (4,) and torch.equal(ours, theirs)
    leaves = [w.clone().requires_grad_(True) for w in stacked]
    grads = torch.autograd.grad(stacked_call(loss)(*leaves).sum(), leaves)
    for i in range(4):  # each chain's gradient is its own
        single = [w[i].clone().requires_grad_(True) for w in stacked]
        expected = torch.autograd.grad(loss(*single), single)
        for grad, want in zip(grads, expected, strict=True):
            torch.testing.assert_close(grad[i], want, rtol=1e-13, atol=1e-15)
    with pytest.raises(TypeError, match="must return a tensor"):
        stacked_call(lambda *w: (w[0].sum(),))(*stacked)
    with pytest.raises(RuntimeError):
        stacked_call(lambda *w: w[0] @ torch.ones(7, 7, dtype=w[0].dtype))(*stacked)
    assert torch.equal(vmap(loss)(*stacked), stacked_call(loss)(*stacked))  # no level left


def test_the_stacked_call_falls_back_to_vmap(monkeypatch):
    import sys
    import types

    from degen_hooks.llc import _chains
    from degen_hooks.llc._chains import stacked_call

    wrapped = []

    def spy(fn):  # torch.func.vmap, recording that the fallback took it
        wrapped.append(fn)
        return torch.func.vmap(fn)

    monkeypatch.setitem(sys.modules, "torch._C._functorch", types.ModuleType("stripped"))
    monkeypatch.setattr(_chains, "vmap", spy)
    w = torch.randn(3, 2, dtype=torch.float64)
    call = stacked_call(lambda v: v.square().sum())
    assert len(wrapped) == 1 and torch.equal(call(w), w.square().sum(1))
