"""collect(): activation statistics on real passes, hook hygiene, sites, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import degen_hooks as dh
from tests.cases import inputs, position_mixer, relu_mlp

F64 = torch.float64


def hook_counts(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    return {
        name: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
        for name, m in model.named_modules()
    }


def model_state(model: nn.Module):
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {
            n: (p.requires_grad, None if p.grad is None else p.grad.clone())
            for n, p in model.named_parameters()
        },
        {n: m.training for n, m in model.named_modules()},
    )


def assert_unchanged(model, before):
    params, grads, modes = model_state(model)
    for key, value in before[0].items():
        assert torch.equal(params[key], value), key
    for name, (flag, grad) in before[1].items():
        assert grads[name][0] == flag
        assert (grad is None and grads[name][1] is None) or torch.equal(grad, grads[name][1])
    assert modes == before[2]


def test_stats_match_stacked_activations():
    model, x = relu_mlp(seed=0), inputs(64, 5, seed=1)
    with dh.collect(model, ["0", "1", "2"]) as run:
        for xb in x.split(10):
            model(xb)
    h0 = model[0](x)
    for key, act in (("0", h0), ("1", torch.relu(h0)), ("2", model[2](torch.relu(h0)))):
        stats = run.stats[key].acts
        torch.testing.assert_close(
            stats.cov(), torch.cov(act.detach().T, correction=0), rtol=1e-9, atol=1e-12
        )
        torch.testing.assert_close(stats.mean(), act.detach().mean(0), rtol=1e-9, atol=1e-12)
    assert run.stats["0"].n_batches == 7


def test_input_sites_and_glob_patterns():
    model, x = relu_mlp(seed=0), inputs(32, 5)
    with dh.collect(model, [dh.Site("2", io="input"), "[34]"]) as run:
        model(x)
    assert list(run.stats) == ["2:input", "3", "4"]
    expected = torch.relu(model[0](x)).detach()
    torch.testing.assert_close(run.stats["2:input"].acts.cov(), torch.cov(expected.T, correction=0))


def test_outputs_bitwise_identical_and_model_untouched():
    model, x = relu_mlp(seed=0), inputs(16, 5)
    model.train()
    model[2].weight.requires_grad_(False)
    model(x).sum().backward()  # give some parameters a .grad
    reference = model(x)
    before, counts = model_state(model), hook_counts(model)
    with dh.collect(model, ["0", "1", "2", "3", "4"], jacobians="exact", firing=True) as run:
        out = model(x)
        run.backward(out)
    assert torch.equal(out, reference)
    assert_unchanged(model, before)
    assert hook_counts(model) == counts


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_hooks_removed_when_block_raises(exc):
    model, x = relu_mlp(seed=0), inputs(8, 5)
    counts = hook_counts(model)
    with pytest.raises(exc):
        with dh.collect(model, ["0", dh.Site("2", io="input")], jacobians="rademacher") as run:
            run.backward(model(x))
            model(x)  # a batch left without its backward when the block raises
            raise exc("boom")
    assert hook_counts(model) == counts
    # What was collected stays valid: the complete batch, not the unfinished one.
    assert run.stats["0"].acts.n_samples == run.stats["0"].grads.n_samples == 8


def test_no_grad_inference_mode_and_inplace_relu():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)).double()
    x = inputs(20, 4)
    with dh.collect(model, ["0", "1"]) as run:
        with torch.no_grad():
            model(x[:10])
        with torch.inference_mode():
            model(x[10:])
    pre = model[0](x).detach()
    # the site "0" saw its value before the in-place ReLU overwrote it
    torch.testing.assert_close(run.stats["0"].acts.cov(), torch.cov(pre.T, correction=0))
    torch.testing.assert_close(
        run.stats["1"].acts.cov(), torch.cov(torch.relu(pre).T, correction=0)
    )


def test_nested_and_overlapping_collections():
    model, x = relu_mlp(seed=0), inputs(12, 5)
    counts = hook_counts(model)
    with dh.collect(model, ["0", "1"]) as outer:
        model(x)
        with dh.collect(model, ["1", "2"]) as inner:
            model(x)
        assert hook_counts(model) != counts
    assert hook_counts(model) == counts
    assert outer.stats["1"].acts.n_samples == 24 and inner.stats["1"].acts.n_samples == 12


def test_model_called_several_times_per_batch():
    model, x = relu_mlp(seed=0), inputs(12, 5)
    with dh.collect(model, ["2"], jacobians="exact") as run:
        out = model(x[:6]) + model(x[6:])
        run.backward(out)
    h = model[2](torch.relu(model[0](x))).detach()
    torch.testing.assert_close(run.stats["2"].acts.cov(), torch.cov(h.T, correction=0))
    assert run.stats["2"].grads.n_samples == 12


def test_positions_and_masks():
    model = position_mixer(seed=0)
    x = inputs(6, 4, n_pos=5, seed=2)
    name = dh.find_sites(model, "*")[0]
    mask = torch.rand(6, 5, generator=torch.Generator().manual_seed(0)) > 0.3
    with dh.collect(
        model, [dh.Site(name, positions="last", label="last"), dh.Site(name, label="all")]
    ) as run:
        run.set_mask(mask)
        model(x)
    act = dict(model.named_modules())[name](x).detach() if name != "" else None
    assert act is not None
    torch.testing.assert_close(
        run.stats["all"].acts.cov(), torch.cov(act[mask].T, correction=0), rtol=1e-9, atol=1e-12
    )
    last = torch.stack([row[m][-1] for row, m in zip(act, mask, strict=True) if m.any()])
    torch.testing.assert_close(
        run.stats["last"].acts.cov(), torch.cov(last.T, correction=0), rtol=1e-9, atol=1e-12
    )


def test_over_drives_the_loop_with_progress(capsys):
    model, x = relu_mlp(seed=0), inputs(40, 5)
    with dh.collect(model, ["1"]) as run:
        run.over(x.split(8), progress=True, desc="unit")
    assert run.stats["1"].acts.n_samples == 40 and run.stats["1"].n_batches == 5


# -- errors ---------------------------------------------------------------------------------


def test_unknown_site_suggests_close_names():
    model = nn.Sequential()
    model.add_module("encoder", nn.Linear(2, 2))
    model.add_module("decoder", nn.Linear(2, 2))
    with pytest.raises(
        dh.SiteNotFoundError,
        match=r"Site 'decodr' not found in Sequential\. Did you mean 'decoder'",
    ):
        dh.collect(model, ["decodr"]).__enter__()
    with pytest.raises(dh.SiteNotFoundError, match="find_sites"):
        dh.find_sites(model, "blocks.*")


def test_nonfinite_activation_names_site_and_batch_and_keeps_stats():
    model = relu_mlp(seed=0)
    x = inputs(8, 5)
    with dh.collect(model, ["0"]) as run:
        model(x)
        before = run.stats["0"].acts.state_dict()
        bad = x.clone()
        bad[3, 0] = float("nan")
        with pytest.raises(dh.NonFiniteError, match=r"Site '0', batch 1 .*1 of 8 rows"):
            model(bad)
    for key, value in run.stats["0"].acts.state_dict().items():
        assert torch.equal(value, before[key])


def test_skip_policy_in_collect():
    model = relu_mlp(seed=0)
    x = inputs(8, 5)
    x[2] = float("inf")
    with dh.collect(model, ["1"], nonfinite="skip", firing=True) as run, torch.no_grad():
        model(x)
    assert run.stats["1"].acts.n_skipped == 1
    assert run.stats["1"].acts.n_samples == 7 and run.stats["1"].firing.n_samples == 7


def test_shape_change_is_refused():
    model = nn.Sequential(nn.Identity())
    with dh.collect(model, ["0"]) as run:
        model(torch.randn(4, 3))
        with pytest.raises(
            dh.ShapeMismatchError,
            match=r"Site '0', batch 1 .*width 5, but earlier batches had width 3",
        ):
            model(torch.randn(4, 5))
    assert run.stats["0"].acts.n_samples == 4


def test_positions_on_a_site_without_positions():
    model = relu_mlp(seed=0)
    with dh.collect(model, [dh.Site("0", positions="last")]):
        with pytest.raises(dh.ShapeMismatchError, match="no position dimension"):
            model(inputs(4, 5))


def test_duplicate_sites_and_bad_settings():
    model = relu_mlp(seed=0)
    with pytest.raises(ValueError, match="more than once"):
        dh.collect(model, ["0", "0"]).__enter__()
    with pytest.raises(ValueError, match="n_probes must be at least 1"):
        dh.collect(model, ["0"], jacobians="rademacher", n_probes=0)
    with pytest.raises(ValueError, match="No sites given"):
        dh.collect(model, []).__enter__()


def test_stats_merge_across_runs_equals_one_run():
    model, x = relu_mlp(seed=0), inputs(30, 5)
    runs = []
    for part in (x[:11], x[11:], x):
        with dh.collect(model, ["1", "3"], firing=True) as run:
            model(part)
        runs.append(run.stats)
    merged = runs[0].merge(runs[1])
    for key in ("1", "3"):
        torch.testing.assert_close(
            merged[key].acts.cov(), runs[2][key].acts.cov(), rtol=1e-12, atol=1e-14
        )
        assert torch.equal(merged[key].firing.cofire_counts(), runs[2][key].firing.cofire_counts())


def test_last_position_with_padding_is_the_last_real_token():
    model = position_mixer(seed=0)
    x = inputs(4, 4, n_pos=5, seed=3)
    mask = torch.tensor(
        [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool
    )
    with dh.collect(model, [dh.Site("embed", positions="last")]) as run:
        run.set_mask(mask)
        model(x)
    act = model.embed(x).detach()
    expected = torch.stack([act[0, 2], act[1, 4], act[3, 0]])  # the padding-only row is dropped
    torch.testing.assert_close(run.stats["embed"].acts.cov(), torch.cov(expected.T, correction=0))
    assert run.stats["embed"].acts.n_samples == 3


def test_resuming_with_other_settings_is_refused():
    model, x = relu_mlp(seed=0), inputs(8, 5)
    with dh.collect(model, ["1"]) as run:
        model(x)
    with pytest.raises(dh.ShapeMismatchError, match=r"Cannot resume site '1'.*firing"):
        with dh.collect(model, ["1"], firing=True, stats=run.stats):
            pass
