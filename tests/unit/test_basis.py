"""Interaction basis: the exact identities and closed-form cases of lib_math §5 and §10."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import degen_hooks as dh
from degen_hooks.basis import interaction_rotation
from tests.cases import deep_linear, gelu_mlp, inputs, relu_mlp

F64 = torch.float64
RTOL = 1e-9


def projector(basis, key):
    return basis.rotations_[key] @ basis.pinv_[key]


def align_signs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Flip the columns of ``b`` to match ``a`` (features are defined up to sign)."""
    signs = torch.sign((a * b).sum(0))
    return b * signs


def sequential(*layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(*layers).double().eval()


# -- identities on a nonlinear MLP -------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp_lib():
    model, x = relu_mlp(seed=0), inputs(400, 5, seed=1)
    basis = dh.build_bases(model, ["1", "3"], x.split(100), progress=False)
    return model, x, basis


def test_features_are_uncorrelated_with_variance_lambda(mlp_lib):
    model, x, basis = mlp_lib
    acts = torch.relu(model[0](x)).detach()
    features = basis.transform(acts, "1")
    cov = torch.cov(features.T, correction=0)
    lam = basis.lambdas_["1"]
    torch.testing.assert_close(cov, torch.diag(lam), rtol=RTOL, atol=RTOL * float(lam.max()))
    torch.testing.assert_close(features.mean(0), torch.zeros_like(lam), rtol=0, atol=1e-12)


def test_unit_jacobian_gram_in_feature_coordinates(mlp_lib):
    model, x, basis = mlp_lib
    c_next, mu_next = basis.rotations_["3"], basis.means_["3"]
    c_pinv, mu = basis.pinv_["1"], basis.means_["1"]

    def next_features(features: torch.Tensor) -> torch.Tensor:
        f = features @ c_pinv + mu
        return (torch.relu(model[2](f)) - mu_next) @ c_next

    feats = basis.transform(torch.relu(model[0](x)).detach(), "1")
    jac = torch.func.vmap(torch.func.jacrev(next_features))(feats)  # (n, r_next, r)
    gram = torch.einsum("nij,nik->jk", jac, jac) / len(x)
    torch.testing.assert_close(gram, torch.eye(gram.shape[0], dtype=F64), rtol=RTOL, atol=1e-9)


def test_lambda_is_the_nonzero_spectrum_of_g_m(mlp_lib):
    _, _, basis = mlp_lib
    stats = basis.stats_["1"]
    g, m = stats.acts.cov(), stats.grads.second_moment()
    spectrum = torch.linalg.eigvals(g @ m).real.sort(descending=True).values
    lam = basis.lambdas_["1"]
    torch.testing.assert_close(spectrum[: len(lam)], lam, rtol=1e-8, atol=1e-12)
    assert spectrum[len(lam) :].abs().max() < 1e-10 * float(lam.max())


def test_pinv_is_a_left_inverse(mlp_lib):
    _, _, basis = mlp_lib
    for key in ("1", "3"):
        r = basis.widths_[key]
        torch.testing.assert_close(
            basis.pinv_[key] @ basis.rotations_[key], torch.eye(r, dtype=F64), rtol=0, atol=1e-10
        )


def test_round_trips(mlp_lib):
    model, x, basis = mlp_lib
    acts = torch.relu(model[0](x)).detach()
    z = basis.transform(acts, "1")
    torch.testing.assert_close(
        basis.transform(basis.inverse_transform(z, "1"), "1"), z, rtol=1e-9, atol=1e-9
    )
    # a basis as wide as the data span reconstructs the activations exactly
    pca = dh.InteractionBasis(variant="pca").fit(basis.stats_, ["1"])
    back = pca.inverse_transform(pca.transform(acts, "1"), "1")
    torch.testing.assert_close(back, acts, rtol=1e-9, atol=1e-9)


# -- invariances --------------------------------------------------------------------------------


def reparametrised(model: nn.Sequential, a: torch.Tensor) -> nn.Sequential:
    """Insert f -> f A after the first ReLU and compensate in the next Linear (W -> W A^-T)."""
    mix = nn.Linear(a.shape[0], a.shape[0], bias=False).double()
    nxt = nn.Linear(model[2].in_features, model[2].out_features).double()
    with torch.no_grad():
        mix.weight.copy_(a.T)
        nxt.weight.copy_(model[2].weight @ torch.linalg.inv(a).T)
        nxt.bias.copy_(model[2].bias)
    return sequential(model[0], model[1], mix, nxt, model[3], model[4])


def test_gl_invariance_and_pca_negative_control():
    model, x = relu_mlp(seed=0), inputs(400, 5, seed=2)
    a = torch.eye(8, dtype=F64) + 0.5 * torch.randn(
        8, 8, generator=torch.Generator().manual_seed(3), dtype=F64
    )
    other = reparametrised(model, a)
    torch.testing.assert_close(other(x), model(x), rtol=1e-10, atol=1e-10)
    data = x.split(200)
    lib = dh.build_bases(model, ["1", "3"], data, progress=False)
    lib2 = dh.build_bases(other, ["2", "4"], data, progress=False)
    acts = torch.relu(model[0](x)).detach()
    z1, z2 = lib.transform(acts, "1"), lib2.transform(acts @ a, "2")
    torch.testing.assert_close(align_signs(z1, z2), z1, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(lib.lambdas_["1"], lib2.lambdas_["2"], rtol=1e-8, atol=1e-12)
    pca = dh.build_bases(model, ["1"], data, variant="pca", progress=False)
    pca2 = dh.build_bases(other, ["2"], data, variant="pca", progress=False)
    p1, p2 = pca.transform(acts, "1"), pca2.transform(acts @ a, "2")
    width = min(p1.shape[1], p2.shape[1])
    assert (align_signs(p1[:, :width], p2[:, :width]) - p1[:, :width]).abs().max() > 0.1


def synchronized_net(k: int = 3, seed: int = 0):
    """One hidden ReLU layer; neurons 0..k-1 fire exactly when x_0 > 0, with margin."""
    g = torch.Generator().manual_seed(seed)
    n = 600
    x = torch.randn(n, 4, generator=g, dtype=F64)
    x[:, 0] = torch.sign(x[:, 0]) * (1.0 + torch.rand(n, generator=g, dtype=F64))
    x[:, 1:] = x[:, 1:].clamp(-1, 1)
    model = sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5))
    with torch.no_grad():
        w = torch.randn(6, 4, generator=g, dtype=F64)
        w[:k, 0] = 2.0 + torch.rand(k, generator=g, dtype=F64)
        w[:k, 1:] = 0.2 * torch.randn(k, 3, generator=g, dtype=F64)  # |.| < margin 2
        model[0].weight.copy_(w)
        model[0].bias.zero_()
        model[2].weight.copy_(torch.randn(5, 6, generator=g, dtype=F64))
    return model, x


def test_synchronized_relu_reparametrisation_leaves_features_unchanged():
    k = 3
    model, x = synchronized_net(k)
    fires = model[0](x) > 0
    assert torch.equal(fires[:, 0], fires[:, 1]) and torch.equal(fires[:, 0], fires[:, 2])
    a = torch.eye(k, dtype=F64) + 0.1 * torch.randn(
        k, k, generator=torch.Generator().manual_seed(1), dtype=F64
    )
    other = sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5))
    with torch.no_grad():
        other.load_state_dict(model.state_dict())
        other[0].weight[:k] = a @ model[0].weight[:k]
        other[2].weight[:, :k] = model[2].weight[:, :k] @ torch.linalg.inv(a)
    torch.testing.assert_close(other(x), model(x), rtol=1e-10, atol=1e-10)
    raw, raw2 = model[1](model[0](x)).detach(), other[1](other[0](x)).detach()
    assert (raw - raw2).abs().max() > 0.05  # the neurons themselves changed
    data = x.split(200)
    lib = dh.build_bases(model, ["1"], data, progress=False)
    lib2 = dh.build_bases(other, ["1"], data, progress=False)
    z1, z2 = lib.transform(raw, "1"), lib2.transform(raw2, "1")
    torch.testing.assert_close(align_signs(z1, z2), z1, rtol=1e-8, atol=1e-8)


def test_rotating_the_output_leaves_earlier_bases_unchanged():
    model, x = relu_mlp(seed=1), inputs(300, 5, seed=4)
    plain = dh.build_bases(model, ["1", "3"], x.split(100), progress=False)
    rotated = dh.build_bases(model, ["1", "3"], x.split(100), rotate_output=True, progress=False)
    for key in ("1", "3"):
        torch.testing.assert_close(
            projector(rotated, key), projector(plain, key), rtol=1e-8, atol=1e-9
        )
        torch.testing.assert_close(
            rotated.lambdas_[key], plain.lambdas_[key], rtol=1e-8, atol=1e-12
        )


# -- closed-form cases ------------------------------------------------------------------------


def test_deep_linear_network_features_are_output_pca_coordinates():
    model = deep_linear(seed=0, widths=(4, 6, 5, 3))
    x = inputs(500, 4, seed=5) @ torch.randn(
        4, 4, generator=torch.Generator().manual_seed(1), dtype=F64
    )
    basis = dh.build_bases(model, ["0", "1"], x.split(250), rotate_output=True, progress=False)
    out = model(x).detach()
    out_eigs = torch.linalg.eigvalsh(torch.cov(out.T, correction=0)).flip(0)
    pcs = (out - out.mean(0)) @ basis.output_rotation_
    for key, act in (("0", model[0](x)), ("1", model[1](model[0](x)))):
        assert basis.widths_[key] == 3
        torch.testing.assert_close(basis.lambdas_[key], out_eigs, rtol=1e-8, atol=1e-12)
        z = basis.transform(act.detach(), key)
        torch.testing.assert_close(align_signs(pcs, z), pcs, rtol=1e-8, atol=1e-8)


def test_local_equals_global_on_linear_networks():
    model, x = deep_linear(seed=2, widths=(5, 6, 6, 4)), inputs(300, 5, seed=6)
    local = dh.build_bases(model, ["0", "1"], x.split(100), progress=False)
    glob = dh.build_bases(model, ["0", "1"], x.split(100), variant="global", progress=False)
    for key in ("0", "1"):
        torch.testing.assert_close(
            projector(local, key), projector(glob, key), rtol=1e-8, atol=1e-9
        )
        torch.testing.assert_close(local.lambdas_[key], glob.lambdas_[key], rtol=1e-8, atol=1e-12)


def hidden_layer_with(duplicate: bool, dead: bool):
    g = torch.Generator().manual_seed(7)
    model = sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 6))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(6, 3, generator=g, dtype=F64))
        model[0].bias.copy_(0.1 * torch.randn(6, generator=g, dtype=F64))
        model[2].weight.copy_(torch.randn(6, 6, generator=g, dtype=F64))
        if duplicate:
            model[0].weight[1] = model[0].weight[0]
            model[0].bias[1] = model[0].bias[0]
        if dead:
            model[0].bias[5] = -100.0
    return model


@pytest.mark.parametrize(
    ("duplicate", "dead", "lost"),
    [(False, False, 0), (True, False, 1), (False, True, 1), (True, True, 2)],
)
def test_duplicated_and_dead_neurons_reduce_the_width(duplicate, dead, lost):
    model, x = hidden_layer_with(duplicate, dead), inputs(500, 3, seed=8)
    basis = dh.build_bases(model, ["1"], x.split(250), progress=False)
    gram_rank = int((basis.gram_eigenvalues_["1"] > 1e-12 * basis.gram_eigenvalues_["1"][0]).sum())
    assert gram_rank == 6 - lost
    assert basis.widths_["1"] == 6 - lost


def test_output_bottleneck_width():
    model = sequential(nn.Linear(4, 10), nn.ReLU(), nn.Linear(10, 2))
    x = inputs(300, 4, seed=9)
    basis = dh.build_bases(model, ["1"], x.split(100), progress=False)
    assert basis.widths_["1"] == 2


def test_n_components_and_thresholds():
    f = inputs(200, 6, seed=1)
    m = torch.randn(6, 6, generator=torch.Generator().manual_seed(2), dtype=F64)
    g, mp = torch.cov(f.T, correction=0), m @ m.T
    assert interaction_rotation(g, mp, n_components=2).rotation.shape == (6, 2)
    full = interaction_rotation(g, mp)
    strict = interaction_rotation(g, mp, rtol=float(full.lambdas[2] / full.lambdas[0]) * 1.0001)
    assert strict.rotation.shape[1] == 2


def test_pca_and_neuron_variants():
    model, x = relu_mlp(seed=0), inputs(200, 5)
    with dh.collect(model, ["1"]) as run:
        model(x)
    pca = dh.InteractionBasis(variant="pca").fit(run.stats)
    cov = run.stats["1"].acts.cov()
    eig = torch.linalg.eigvalsh(cov).flip(0)
    torch.testing.assert_close(pca.lambdas_["1"], eig[: pca.widths_["1"]], rtol=1e-9, atol=1e-12)
    neurons = dh.InteractionBasis(variant="neuron").fit(run.stats)
    assert torch.equal(neurons.lambdas_["1"], torch.diagonal(cov).sort(descending=True).values)


# -- errors -----------------------------------------------------------------------------------


def test_errors_teach():
    model, x = relu_mlp(seed=0), inputs(20, 5)
    with dh.collect(model, ["1"]) as run:
        model(x)
    with pytest.raises(dh.GradientError, match="needs its Jacobian Gram.*jacobians='exact'"):
        dh.InteractionBasis().fit(run.stats)
    with pytest.raises(dh.NotFittedError, match=r"not fitted yet.*fit\(stats\)"):
        dh.InteractionBasis().transform(x, "1")
    pca = dh.InteractionBasis(variant="pca").fit(run.stats)
    with pytest.raises(dh.ShapeMismatchError, match="d_site=8, but the activations have width 5"):
        pca.transform(x, "1")
    with pytest.raises(dh.SiteNotFoundError, match="no rotation for site '3'"):
        pca.transform(x, "3")
    with pytest.raises(dh.SiteNotFoundError, match="No statistics for site '7'"):
        dh.InteractionBasis(variant="pca").fit(run.stats, ["7"])
    with pytest.raises(ValueError, match="variant must be one of"):
        dh.InteractionBasis(variant="ica").fit(run.stats)
    with pytest.raises(ValueError, match="variant must be one of"):
        dh.build_bases(model, ["1"], [x], variant="ica")
    with pytest.raises(dh.ShapeMismatchError, match=r"names \['2'\], which are not among"):
        dh.build_bases(model, ["1"], [x], sections={"2": (None, None)})
    with pytest.raises(TypeError, match=r"section interface.*\{'1': 'str'\}"):
        dh.build_bases(model, ["1"], [x], sections={"1": ("relu", None)})


@pytest.mark.parametrize("factory", [relu_mlp, gelu_mlp], ids=["relu", "gelu"])
def test_closed_form_sections_equal_backward_passes(factory):
    model, x = factory(seed=0), inputs(300, 5, seed=1)
    sites = ["1", "3"] if len(model) > 4 else ["1"]
    auto = dh.build_bases(model, sites, x.split(100), progress=False)
    assert all("closed form" in label for label in auto.timings_ if label != "activations")
    probes = dh.build_bases(model, sites, x.split(100), sections=None, progress=False)
    assert not any("closed form" in label for label in probes.timings_)
    for key in sites:
        torch.testing.assert_close(
            projector(auto, key), projector(probes, key), rtol=1e-9, atol=1e-10
        )
        torch.testing.assert_close(auto.lambdas_[key], probes.lambdas_[key], rtol=1e-9, atol=1e-12)
