"""Jacobian Grams from ``dh.collect(jacobians=...)`` against brute-force ``torch.func.jacrev``.

Every path (global and local targets, readouts, chunks smaller than the number of probes,
several batches, in-place ReLU, positions, masks) is compared in float64 with the Gram of
Jacobians stacked over samples (``tests/reference.py``). Random probes are checked for
unbiasedness and ``1/sqrt(n_probes)`` convergence; errors, hook hygiene and the state of the
statistics after a failed backward are checked with real forward and backward passes.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import degen_hooks as dh
from degen_hooks.jacobians import probe_chunks
from tests import reference as ref
from tests.cases import (
    attn_only_transformer,
    build,
    inputs,
    position_mixer,
    relu_mlp,
    tokens,
)

RTOL = 1e-9


def assert_gram(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    """Relative comparison; ``atol`` scaled to the largest entry of the reference."""
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


def gram(run: dh.Collection, key: str) -> torch.Tensor:
    return run.stats[key].grads.second_moment()


def backward_in_batches(run: dh.Collection, model: nn.Module, x: torch.Tensor, cuts=(5, 11)):
    """Three uneven batches, one backward each."""
    bounds = [0, *cuts, x.shape[0]]
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        run.backward(model(x[start:stop]))


def hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


# -- exact probes against jacrev ---------------------------------------------------------------
GLOBAL_CASES = {
    "relu_mlp": ["0", "1", "2", "3"],
    "relu_mlp_inplace": ["0", "2"],
    "gelu_mlp": ["0", "1"],
    "residual_mlp": ["resid_pre", "linear_in", "act", "resid"],
    "deep_linear": ["0", "1"],
    "position_mixer": ["embed", "mix", "act"],
}


@pytest.mark.parametrize("name", GLOBAL_CASES)
def test_exact_global_target_matches_jacrev(name):
    model, x = build(name, n=16)
    sites = GLOBAL_CASES[name]
    with dh.collect(model, sites, jacobians="exact", chunk=2) as run:
        # "resid_pre" is the model input: it needs grad to be differentiated.
        backward_in_batches(run, model, x.clone().requires_grad_(name == "residual_mlp"))
    for site in sites:
        expected = ref.jacobian_gram(ref.site_jacobians(model, x, site))
        assert_gram(gram(run, site), expected)
        assert run.stats[site].grads.n_samples == ref.activations(model, x, site)[..., 0].numel()


def test_exact_input_site_matches_jacrev_and_leaves_input_grad():
    model, x = build("relu_mlp", n=12)
    x.requires_grad_(True)
    with dh.collect(model, [dh.Site("0", io="input")], jacobians="exact", chunk=2) as run:
        backward_in_batches(run, model, x, cuts=(4,))
    expected = ref.jacobian_gram(ref.site_jacobians(model, x.detach(), "0", io="input"))
    assert_gram(gram(run, "0:input"), expected)
    assert x.grad is None


def test_exact_local_target_with_readout():
    model, x = build("relu_mlp_inplace", n=16)
    readout = inputs(6, 4, seed=7)  # reads site "2" (width 6) as 4 features
    with dh.collect(
        model, ["0", "1"], jacobians="exact", target="2", readout=readout, chunk=3
    ) as run:
        for part in (x[:7], x[7:]):
            model(part)
            run.backward()
    for site in ["0", "1"]:
        jac = ref.site_jacobians(model, x, site, target="2")
        assert_gram(gram(run, site), ref.jacobian_gram(jac, readout=readout))


def test_exact_local_target_with_positions_and_readout():
    model = position_mixer(seed=1)
    x = inputs(6, 4, seed=2, n_pos=5)
    readout = inputs(6, 2, seed=3)
    with dh.collect(
        model, ["embed"], jacobians="exact", target="mix", readout=readout, chunk=4
    ) as run:
        for part in (x[:2], x[2:]):
            model(part)
            run.backward()
    jac = ref.site_jacobians(model, x, "embed", target="mix")
    assert_gram(gram(run, "embed"), ref.jacobian_gram(jac, readout=readout))


@pytest.mark.parametrize(
    ("site_positions", "target_positions"),
    [("last", "last"), (None, "last"), ("last", None), ([0, 2], [1, 3]), (slice(1, 4), 2)],
    ids=["last-last", "all-last", "last-all", "list-list", "slice-int"],
)
def test_positions(site_positions, target_positions):
    model = position_mixer(seed=0)
    x = inputs(6, 4, seed=4, n_pos=5)
    site = dh.Site("embed", positions=site_positions)
    with dh.collect(
        model, [site], jacobians="exact", target_positions=target_positions, chunk=4
    ) as run:
        backward_in_batches(run, model, x, cuts=(2,))
    jac = ref.site_jacobians(model, x, "embed")
    expected = ref.jacobian_gram(
        jac,
        target_cells=ref.cells(6, 5, target_positions),
        site_cells=ref.cells(6, 5, site_positions),
    )
    assert_gram(gram(run, "embed"), expected)


def test_target_site_positions_are_probed_positions():
    model = position_mixer(seed=0)
    x = inputs(5, 4, seed=5, n_pos=5)
    with dh.collect(
        model, ["embed"], jacobians="exact", target=dh.Site("act", positions="last")
    ) as run:
        model(x)
        run.backward()
    jac = ref.site_jacobians(model, x, "embed", target="act")
    assert_gram(gram(run, "embed"), ref.jacobian_gram(jac, target_cells=ref.cells(5, 5, "last")))


@pytest.mark.parametrize("target", [None, "mix"], ids=["global", "local"])
def test_per_batch_mask(target):
    model = position_mixer(seed=2)
    x = inputs(8, 4, seed=6, n_pos=5)
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(8, 5, generator=gen) > 0.35
    mask[:, 0] = True  # left-aligned padding: every row keeps its first token
    with dh.collect(model, ["embed", "mix"], jacobians="exact", target=target, chunk=3) as run:
        for part in (slice(0, 3), slice(3, 8)):
            run.set_mask(mask[part])
            out = model(x[part])
            run.backward(out if target is None else None)
    for site in ["embed"] if target else ["embed", "mix"]:
        jac = ref.site_jacobians(model, x, site, target=target)
        expected = ref.jacobian_gram(jac, target_cells=mask, site_cells=mask)
        assert_gram(gram(run, site), expected)
        assert run.stats[site].grads.n_samples == int(mask.sum())


def test_several_targets_before_one_backward_with_a_target_site():
    # Forward passes accumulate target captures; one backward serves all of them.
    model, x = build("gelu_mlp", n=12)
    with dh.collect(model, ["0"], jacobians="exact", target="1", chunk=5) as run:
        model(x[:5])
        model(x[5:])
        run.backward()
    assert_gram(gram(run, "0"), ref.jacobian_gram(ref.site_jacobians(model, x, "0", target="1")))


def test_resume_matches_single_collection():
    model, x = build("relu_mlp", n=16)
    with dh.collect(model, ["1"], jacobians="exact") as whole:
        backward_in_batches(whole, model, x)
    with dh.collect(model, ["1"], jacobians="exact") as first:
        first.backward(model(x[:9]))
    with dh.collect(model, ["1"], jacobians="exact", stats=first.stats) as second:
        second.backward(model(x[9:]))
    assert_gram(gram(second, "1"), gram(whole, "1"))


def test_float32_model_accumulates_in_float64():
    model, x = build("gelu_mlp", n=16)
    with dh.collect(model.float(), ["0"], jacobians="exact", chunk=3) as run:
        run.backward(model(x.float()))
    result = gram(run, "0")
    assert result.dtype == torch.float64
    expected = ref.jacobian_gram(ref.site_jacobians(model.double(), x, "0"))
    assert_gram(result, expected, rtol=1e-5)


@pytest.mark.slow
def test_exact_on_attention_only_transformer():
    model = attn_only_transformer(seed=0)
    toks = tokens(3, n_pos=5, seed=1)
    sites = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z"]
    with dh.collect(model, sites[:1], jacobians="exact", target=dh.Site(sites[1]), chunk=16) as run:
        model(toks)
        run.backward()
    # hook_z is (batch, pos, head, d_head): every (pos, head, feature) is one probe.
    jac = ref.site_jacobians(model, toks, sites[0], target=sites[1])
    assert_gram(gram(run, sites[0]), ref.jacobian_gram(jac))


# -- random probes -------------------------------------------------------------------------
def random_gram(kind: str, n_probes: int, seed: int, model, x, chunk: int = 64):
    with dh.collect(
        model, ["embed"], jacobians=kind, n_probes=n_probes, seed=seed, chunk=chunk
    ) as run:
        backward_in_batches(run, model, x, cuts=(3,))
    return gram(run, "embed")


@pytest.fixture(scope="module")
def mixer_and_exact():
    model = position_mixer(seed=3)
    x = inputs(6, 4, seed=8, n_pos=5)
    return model, x, ref.jacobian_gram(ref.site_jacobians(model, x, "embed"))


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_random_probes_unbiased_and_converge(kind, mixer_and_exact):
    model, x, exact = mixer_and_exact

    def error(estimate: torch.Tensor) -> float:
        return float(torch.linalg.matrix_norm(estimate - exact) / torch.linalg.matrix_norm(exact))

    seeds = range(6)
    few = [random_gram(kind, 4, seed, model, x, chunk=3) for seed in seeds]
    many = [random_gram(kind, 64, seed, model, x, chunk=48) for seed in seeds]
    err_few = sum(map(error, few)) / len(few)
    err_many = sum(map(error, many)) / len(many)
    # 16x probes: the error shrinks ~4x (1/sqrt(n)); a generous bound against flakiness.
    assert err_many < 0.5 * err_few
    # Unbiased: averaging independent estimates also converges to the exact Gram.
    assert error(torch.stack(few).mean(0)) < 0.6 * err_few
    assert error(torch.stack(many + few).mean(0)) < 0.1


def test_rademacher_with_one_output_coordinate_is_exact():
    # phi^2 = 1: with a single target coordinate, one Rademacher probe is the exact Gram.
    model, x = build("relu_mlp", n=10)
    readout = inputs(3, 1, seed=9)
    grams = {}
    for kind in ("exact", "rademacher"):
        with dh.collect(model, ["1"], jacobians=kind, readout=readout, seed=5) as run:
            run.backward(model(x))
        grams[kind] = gram(run, "1")
    assert_gram(grams["rademacher"], grams["exact"], rtol=1e-12)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_random_probes_reproducible_from_seed(kind):
    model = position_mixer(seed=0)
    x = inputs(4, 4, seed=1, n_pos=5)
    first = random_gram(kind, 5, 11, model, x, chunk=2)
    again = random_gram(kind, 5, 11, model, x, chunk=2)
    other = random_gram(kind, 5, 12, model, x, chunk=2)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_probe_chunks_cover_every_coordinate_once():
    readout = inputs(3, 2, seed=0)
    shape = torch.Size([2, 4, 3])
    chunks = list(probe_chunks("exact", shape, readout=readout, chunk=3, dtype=torch.float64))
    assert [c.shape[0] for c in chunks] == [3, 3, 2]  # 4 positions x 2 readout columns
    probes = torch.cat(chunks)  # (8, 2, 4, 3)
    # Sum of v v^T over probes, per sample: blockdiag over positions of R R^T.
    per_sample = torch.einsum("kpi,kqj->piqj", probes[:, 0], probes[:, 0])
    expected = torch.einsum("pq,ij->piqj", torch.eye(4, dtype=torch.float64), readout @ readout.T)
    torch.testing.assert_close(per_sample, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(probes[:, 0], probes[:, 1])  # the same coordinate for every sample


def test_probe_chunks_random_scale():
    gen = torch.Generator().manual_seed(0)
    chunks = probe_chunks(
        "rademacher", torch.Size([3, 5]), n_probes=4, chunk=3, generator=gen, dtype=torch.float64
    )
    probes = torch.cat(list(chunks))
    assert probes.shape == (4, 3, 5)
    assert torch.all(probes.abs() == 0.5)  # +-1 / sqrt(4)


# -- errors ------------------------------------------------------------------------------------
def test_error_no_grad_at_backward_names_site_and_cause():
    model, x = build("relu_mlp")
    before = hook_count(model)
    with pytest.raises(dh.GradientError, match=r"Site '0' was reached without gradients.*no_grad"):
        with dh.collect(model, ["0"], jacobians="exact") as run:
            with torch.no_grad():
                out = model(x)
            run.backward(out)
    assert hook_count(model) == before


def test_error_inference_mode_at_exit_when_backward_never_called():
    model, x = build("relu_mlp")
    with pytest.raises(dh.GradientError, match=r"No gradients reached '2'.*inference_mode"):
        with dh.collect(model, ["2"], jacobians="exact"):
            with torch.inference_mode():
                model(x)


def test_error_backward_never_called_at_exit():
    model, x = build("relu_mlp")
    with pytest.raises(dh.GradientError, match=r"No gradients reached '2'.*never called"):
        with dh.collect(model, ["2"], jacobians="exact"):
            model(x)


def test_error_model_input_without_requires_grad():
    model, x = build("relu_mlp")
    with pytest.raises(dh.GradientError, match=r"'0:input'.*x\.requires_grad_\(\)"):
        with dh.collect(model, [dh.Site("0", io="input")], jacobians="exact") as run:
            run.backward(model(x))


def test_error_target_not_downstream_of_site():
    model, x = build("relu_mlp")
    with pytest.raises(dh.GradientError, match=r"does not depend on site\(s\) \['3'\]"):
        with dh.collect(model, ["1", "3"], jacobians="exact", target="2") as run:
            model(x)
            run.backward()
    assert run.stats["1"].grads.n_samples == 0  # nothing half-written


def test_error_forward_passes_without_their_backward():
    model, x = build("relu_mlp")
    with dh.collect(model, ["1"], jacobians="exact") as run:
        model(x[:4])
        with pytest.raises(dh.GradientError, match=r"do not lead to the target.*'1': 1 of 2"):
            run.backward(model(x[4:]))
        run.backward(model(x))
    assert_gram(gram(run, "1"), ref.jacobian_gram(ref.site_jacobians(model, x, "1")))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n_probes": 0}, ValueError, r"n_probes must be at least 1, got 0"),
        ({"chunk": 0}, ValueError, r"chunk must be .auto. or at least 1"),
        ({"jacobians": "exakt"}, ValueError, r"Unknown jacobians='exakt'.*'rademacher'"),
        ({"readout": torch.ones(3)}, dh.ShapeMismatchError, r"readout must be a \(d_target, r\)"),
    ],
    ids=["n_probes", "chunk", "probe-name", "readout-1d"],
)
def test_error_bad_settings(kwargs, error, match):
    model, _ = build("relu_mlp")
    settings = {"jacobians": "exact", **kwargs}
    with pytest.raises(error, match=match):
        dh.collect(model, ["1"], **settings)


def test_error_readout_width_mismatch():
    model, x = build("relu_mlp")
    with pytest.raises(dh.ShapeMismatchError, match=r"Readout of shape \(5, 2\).*width 3"):
        with dh.collect(model, ["1"], jacobians="exact", readout=torch.ones(5, 2)) as run:
            run.backward(model(x))


def test_error_target_without_feature_dimension():
    model, x = build("relu_mlp")
    with pytest.raises(dh.ShapeMismatchError, match=r"needs a batch and a feature dimension"):
        with dh.collect(model, ["1"], jacobians="exact") as run:
            run.backward(model(x).sum(-1))


def test_error_backward_without_jacobians():
    model, x = build("relu_mlp")
    with dh.collect(model, ["1"]) as run:
        with pytest.raises(dh.GradientError, match=r"needs Jacobian statistics.*jacobians='exact'"):
            run.backward(model(x))


def test_error_backward_without_forward():
    model, _ = build("relu_mlp")
    with pytest.raises(dh.GradientError, match=r"found no activations captured"):
        with dh.collect(model, ["1"], jacobians="exact") as run:
            run.backward(torch.ones(2, 3, requires_grad=True))
    with pytest.raises(dh.GradientError, match=r"No activation of the target site '2'"):
        with dh.collect(model, ["1"], jacobians="exact", target="2") as run:
            run.backward()


def test_warning_for_forward_pass_left_without_backward():
    model, x = build("relu_mlp")
    with pytest.warns(UserWarning, match=r"after the last run\.backward\(\)"):
        with dh.collect(model, ["1"], jacobians="exact") as run:
            run.backward(model(x))
            model(x)


class _ItemInBackward(torch.autograd.Function):
    """Identity whose backward calls ``.item()``: cannot run under ``torch.vmap``."""

    @staticmethod
    def forward(ctx, x):  # noqa: D102
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return grad * (1.0 + 0.0 * float(grad.abs().max()))


class _Wrap(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn.apply(x)


def test_error_unbatchable_backward_suggests_chunk_one():
    model = nn.Sequential(*relu_mlp(0), _Wrap(_ItemInBackward))
    x = inputs(6, 5, seed=1)
    with pytest.raises(dh.GradientError, match=r"torch\.vmap.*chunk=1"):
        with dh.collect(model, ["1"], jacobians="exact", chunk=3) as run:
            run.backward(model(x))
    with dh.collect(model, ["1"], jacobians="exact", chunk=1) as run:
        run.backward(model(x))
    # The extra module is the identity: the reference runs without it (jacrev cannot
    # differentiate a custom autograd.Function without setup_context).
    assert_gram(gram(run, "1"), ref.jacobian_gram(ref.site_jacobians(relu_mlp(0), x, "1")))


# -- hygiene ---------------------------------------------------------------------------------
def test_grads_flags_outputs_and_hooks_untouched():
    model, x = build("relu_mlp_inplace", n=10)
    model[2].bias.requires_grad_(False)
    params = list(model.parameters())
    model[0].weight.grad = torch.randn_like(model[0].weight)
    grads_before = [None if p.grad is None else p.grad.clone() for p in params]
    flags_before = [p.requires_grad for p in params]
    hooks_before = hook_count(model)
    plain = model(x)
    with dh.collect(model, ["0", "2"], jacobians="exact", chunk=2) as run:
        out = model(x)
        run.backward(out, retain_graph=True)
        assert torch.equal(out, plain)
        assert hook_count(model) > hooks_before
    for p, g in zip(params, grads_before, strict=True):
        assert (p.grad is None) if g is None else torch.equal(p.grad, g)
    assert [p.requires_grad for p in params] == flags_before
    assert hook_count(model) == hooks_before
    # The retained graph still serves the user's own backward, with the usual result.
    model.zero_grad(set_to_none=True)
    out.sum().backward()
    after_collection = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(after_collection[name], p.grad)


def test_hooks_removed_after_error_in_backward():
    model, x = build("relu_mlp")
    before = hook_count(model)
    with pytest.raises(dh.GradientError):
        with dh.collect(model, ["3"], jacobians="exact", target="1") as run:
            model(x)
            run.backward()
    assert hook_count(model) == before


# -- statistics after a failed backward ---------------------------------------------------------
class _PoisonGrad(torch.autograd.Function):
    """Identity whose backward writes NaN into the gradient of the samples in ``rows``."""

    rows: tuple[int, ...] = ()

    @staticmethod
    def forward(ctx, x):  # noqa: D102
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        poisoned = torch.zeros(grad.shape[0], 1, dtype=torch.bool)
        poisoned[list(_PoisonGrad.rows)] = True
        return torch.where(poisoned, torch.full_like(grad, float("nan")), grad)


@pytest.fixture
def poisoned_model():
    """``relu_mlp(0)`` with a NaN-gradient identity after ``"0"``: sites "0", "1", "2" (ReLU)."""
    base = relu_mlp(0)
    yield nn.Sequential(base[0], _Wrap(_PoisonGrad), *base[1:])
    _PoisonGrad.rows = ()


def test_nan_gradient_raises_and_keeps_previous_statistics(poisoned_model):
    model, x = poisoned_model, inputs(8, 5, seed=2)
    with dh.collect(model, ["0", "2"], jacobians="exact", chunk=2) as run:
        run.backward(model(x))
        before = {k: run.stats[k].grads.state_dict() for k in ("0", "2")}
        _PoisonGrad.rows = (3,)
        with pytest.raises(dh.NonFiniteError, match=r"Gradients at site '0': 2 of 16 .*NaN"):
            run.backward(model(x))
        for key in ("0", "2"):
            after = run.stats[key].grads.state_dict()
            assert all(torch.equal(before[key][f], after[f]) for f in after)
        _PoisonGrad.rows = ()
        run.backward(model(x))  # the collection is still usable
    # Site "2" is the first ReLU, "1" of the model without the extra identity.
    expected = ref.jacobian_gram(ref.site_jacobians(relu_mlp(0), torch.cat([x, x]), "1"))
    assert_gram(gram(run, "2"), expected)


def test_nan_gradient_skipped_and_counted(poisoned_model):
    model, x = poisoned_model, inputs(8, 5, seed=2)
    _PoisonGrad.rows = (1, 6)
    with dh.collect(model, ["0"], jacobians="exact", nonfinite="skip") as run:
        run.backward(model(x))
    grads = run.stats["0"].grads
    assert grads.n_skipped == 2 * 3  # two samples x three exact probes
    assert grads.n_samples == 6 and grads.count == 6  # the Gram is a mean over clean samples
    assert torch.isfinite(grads.second_moment()).all()


def test_an_empty_readout_gives_a_zero_gram_not_an_error():
    """A read-out of width 0 (the next site's basis kept no feature) probes nothing: the Gram
    is zero over the site's samples, as the closed forms give (it used to raise 'the target
    does not depend on the site')."""
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)
    ).double()
    x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    empty = torch.zeros(2, 0, dtype=torch.float64)
    with dh.collect(model, ["1"], jacobians="exact", readout=empty) as run:
        run.backward(model(x))
    grads = run.stats["1"].grads
    assert grads.n_samples == 8
    assert torch.equal(grads.second_moment(), torch.zeros(4, 4, dtype=torch.float64))
