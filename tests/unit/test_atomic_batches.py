"""A batch updates every site or none: after any error the statistics equal those before it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import degen_hooks as dh
from tests.cases import inputs

F64 = torch.float64


class Switch(nn.Module):
    """Identity, or (when armed) a module that poisons or raises: faults on demand."""

    def __init__(self) -> None:
        super().__init__()
        self.mode: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "nan":
            return x * float("nan")
        if self.mode == "raise":
            raise RuntimeError("user code failed mid-forward")
        if self.mode == "nan_grad":
            return _NanGrad.apply(x)
        return x


class _NanGrad(torch.autograd.Function):
    """Identity forward; NaN gradients backward (a bad backward at the sites before it)."""

    @staticmethod
    def forward(ctx, x):  # noqa: D102
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return grad * float("nan")


def faulty_mlp(seed: int = 0) -> nn.Sequential:
    """Sites ``"0"``, ``"1"`` (ReLU), ``"2"`` (the switch), ``"3"``; width 8, then 3."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), Switch(), nn.Linear(8, 3)).double()


def snapshot(stats: dh.Statistics) -> dict:
    state = {k: v.clone() for k, v in stats.state_dict().items()}
    state["n_batches"] = {k: s.n_batches for k, s in stats.items()}
    state["metadata"] = dict(stats.metadata)
    return state


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


SITES = ["0", "1", "3"]


def test_nonfinite_at_a_later_site_leaves_the_earlier_sites_unchanged():
    model, x = faulty_mlp(), inputs(16, 5, seed=1)
    with dh.collect(model, SITES, firing=True, derivatives={"0": "relu"}) as run:
        model(x)
        before = snapshot(run.stats)
        model[2].mode = "nan"
        with pytest.raises(dh.NonFiniteError, match="Site '3'"):
            model(x)
        assert_same(snapshot(run.stats), before)
        model[2].mode = None
        model(x)
    with dh.collect(model, SITES, firing=True, derivatives={"0": "relu"}) as clean:
        model(x)
        model(x)
    assert_same(snapshot(run.stats), snapshot(clean.stats))


def test_a_refusal_at_the_model_output_undoes_the_inner_sites():
    model, x = faulty_mlp(), inputs(16, 5, seed=1)
    model[3].bias.data[0] = float("inf")  # only the output (site "" and "3") is non-finite
    with dh.collect(model, ["0", dh.Site("", io="input"), dh.Site("")]) as run:
        with pytest.raises(dh.NonFiniteError, match="Site 'output'"):
            model(x)
    assert all(s.acts.n_samples == 0 and s.n_batches == 0 for s in run.stats.values())


def test_the_next_good_batch_keeps_its_jacobians_after_a_refused_batch():
    model, x = faulty_mlp(), inputs(16, 5, seed=1)
    with dh.collect(model, SITES, jacobians="exact") as run:
        run.backward(model(x))
        model[2].mode = "nan"
        with pytest.raises(dh.NonFiniteError):
            model(x)
        model[2].mode = None
        run.backward(model(x))  # raised a misleading GradientError before
    with dh.collect(model, SITES, jacobians="exact") as clean:
        run_twice = [clean.backward(model(x)) for _ in range(2)]
    assert len(run_twice) == 2
    assert_same(snapshot(run.stats), snapshot(clean.stats))


def test_keyboard_interrupt_in_a_derivative_callable_changes_nothing():
    model, x = faulty_mlp(), inputs(64, 5, seed=1)
    calls = []

    def activation(z: torch.Tensor) -> torch.Tensor:  # differentiated by autograd
        calls.append(z.shape[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return torch.relu(z)

    with dh.collect(model, SITES, derivatives={"0": activation}) as run:
        model(x)
        before = snapshot(run.stats)
        with pytest.raises(KeyboardInterrupt):
            model(x)
        assert_same(snapshot(run.stats), before)
        model(x)
    site = run.stats["0"]
    assert site.acts.n_samples == site.derivs.n_samples == 128


def test_an_error_in_user_code_mid_forward_rolls_back_the_batch():
    model, x = faulty_mlp(), inputs(16, 5, seed=1)
    with dh.collect(model, SITES, jacobians="exact") as run:
        run.backward(model(x))
        before = snapshot(run.stats)
        model[2].mode = "raise"
        with pytest.raises(RuntimeError, match="mid-forward"):
            model(x)  # sites "0" and "1" fired; "3" never did
        model[2].mode = None
        assert_same(snapshot(run.stats), before)
        run.backward(model(x))
    with dh.collect(model, SITES, jacobians="exact") as clean:
        for _ in range(2):
            clean.backward(model(x))
    assert_same(snapshot(run.stats), snapshot(clean.stats))


def test_a_failed_backward_rolls_back_its_forward_pass_too():
    model, x = faulty_mlp(), inputs(16, 5, seed=1)
    with dh.collect(model, SITES, jacobians="exact") as run:
        run.backward(model(x))
        before = snapshot(run.stats)
        model[2].mode = "nan_grad"  # gradients at "0" and "1" are NaN, at "3" finite
        with pytest.raises(dh.NonFiniteError, match="Gradients at site '[01]'"):
            run.backward(model(x))
        assert_same(snapshot(run.stats), before)
        model[2].mode = None
        run.backward(model(x))
    with dh.collect(model, SITES, jacobians="exact") as clean:
        for _ in range(2):
            clean.backward(model(x))
    assert_same(snapshot(run.stats), snapshot(clean.stats))


def test_an_exception_leaving_the_block_keeps_only_complete_batches():
    model, x = faulty_mlp(), inputs(16, 5, seed=1)
    with pytest.raises(RuntimeError, match="mid-forward"):
        with dh.collect(model, SITES) as run:
            model(x)
            model[2].mode = "raise"
            model(x)
    model[2].mode = None
    with dh.collect(model, SITES) as clean:
        model(x)
    assert_same(snapshot(run.stats), snapshot(clean.stats))


def test_a_caught_error_before_a_normal_exit_is_not_committed():
    model, x = faulty_mlp(), inputs(16, 5, seed=1)
    with dh.collect(model, SITES) as run:
        model(x)
        model[2].mode = "raise"
        try:
            model(x)
        except RuntimeError:
            pass
        model[2].mode = None
    with dh.collect(model, SITES) as clean:
        model(x)
    assert_same(snapshot(run.stats), snapshot(clean.stats))


def test_submodules_called_directly_still_collect():
    # Without the model's own call there is no batch boundary: each site commits alone.
    model, x = faulty_mlp(), inputs(16, 5, seed=1)
    with dh.collect(model, ["0", "1"]) as run:
        model[1](model[0](x))
        model[1](model[0](x))
    assert run.stats["0"].acts.n_samples == run.stats["1"].acts.n_samples == 32


def test_a_resumed_collection_rolls_back_to_the_resumed_state():
    model, x = faulty_mlp(), inputs(16, 5, seed=1)
    with dh.collect(model, SITES) as first:
        model(x)
    resumed = first.stats.copy()
    with dh.collect(model, SITES, stats=resumed) as run:
        model[2].mode = "nan"
        with pytest.raises(dh.NonFiniteError):
            model(x)
        model[2].mode = None
    assert_same(snapshot(run.stats), snapshot(first.stats))


def test_model_untouched_by_the_rollback():
    model, x = faulty_mlp(), inputs(16, 5, seed=1)
    counts = {
        n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()
    }
    with dh.collect(model, SITES, jacobians="exact") as run:
        model[2].mode = "nan"
        with pytest.raises(dh.NonFiniteError):
            run.backward(model(x))
        model[2].mode = None
        out = model(x)
        run.backward(out)
    assert torch.equal(out, model(x))
    after = {
        n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()
    }
    assert after == counts


class _NanGradRows(torch.autograd.Function):
    """Identity forward; NaN gradients backward for the rows in ``bad``."""

    @staticmethod
    def forward(ctx, x, bad):  # noqa: D102
        ctx.bad = bad
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        grad = grad.clone()
        grad[ctx.bad] = float("nan")
        return grad, None


class BadRows(nn.Module):
    def __init__(self, bad: torch.Tensor) -> None:
        super().__init__()
        self.bad = bad

    def forward(self, x):  # noqa: D102
        return _NanGradRows.apply(x, self.bad)


@pytest.mark.parametrize("probes", ["exact", "rademacher"])
def test_skipped_gradient_rows_leave_the_gram_unbiased(probes):
    torch.manual_seed(0)
    bad = torch.zeros(20, dtype=torch.bool)
    bad[[1, 4, 7]] = True  # 15 % of the samples: the Gram was scaled by 0.85
    body = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh()).double()
    head = nn.Linear(6, 3).double()
    model = nn.Sequential(body, BadRows(bad), head)
    x = inputs(20, 5, seed=1)
    kw = dict(jacobians=probes, n_probes=3, nonfinite="skip")
    with dh.collect(model, ["0.1", "0.3"], **kw) as run:
        run.backward(model(x))
    clean_model = nn.Sequential(body, nn.Identity(), head)
    for site in ["0.1", "0.3"]:
        grads = run.stats[site].grads
        assert grads.n_skipped == (3 if probes == "exact" else 3) * 3
        if probes == "exact":
            with dh.collect(clean_model, [site], jacobians="exact") as clean:
                clean.backward(clean_model(x[~bad]))
            expected = clean.stats[site].grads
            assert grads.count == expected.count == 17
            torch.testing.assert_close(
                grads.second_moment(), expected.second_moment(), rtol=1e-12, atol=0
            )
        else:
            assert grads.count == pytest.approx(17.0, rel=1e-12)
