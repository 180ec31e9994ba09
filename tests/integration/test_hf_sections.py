"""Closed-form sections of Hugging Face decoder models (#16): the norm and MLP of every layer
(GPT-2's LayerNorm and ``Conv1D``, the SwiGLU of Llama, Mistral and Qwen), the output
projection and the final norm and unembedding, each equal to exact probes at rtol 1e-10;
``build_bases(sections="auto")`` finds them and equals backward passes end to end.
"""

from __future__ import annotations

import pytest
import torch

import degen_hooks as dh
from degen_hooks.families import hf
from degen_hooks.families.transformers import find_sections
from tests.reference import assert_same_bases

from .test_hf import build

pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
F64 = torch.float64
COVERED = ["gpt2", "llama", "mistral", "qwen2", "qwen3"]


def float64_norms(model):
    """Llama-style RMSNorm takes its variance in float32 whatever the dtype: the model's own
    Jacobian is then exact to ~1e-7. Compute it in float64, so exact probes test the closed
    form at float64 precision."""

    def forward(self, x):
        return self.weight * (
            x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        )

    for module in model.modules():
        if "RMSNorm" in type(module).__name__:
            module.forward = forward.__get__(module)
    return model


@pytest.fixture
def tokens():
    return torch.randint(1, 50, (6, 5), generator=torch.Generator().manual_seed(2))


def exact(model, tokens, site, readout, **target):
    with dh.collect(model, [site], jacobians="exact", readout=readout, **target) as run:
        run.backward(model(tokens).logits)
    return run.stats[site.key].grads.second_moment()


def assert_gram(actual, expected, rtol=1e-10):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


def readout_for(width, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(width, max(1, width - 3), generator=gen, dtype=F64)


@pytest.mark.parametrize("family", COVERED)
@pytest.mark.parametrize("positions", [None, "last"])
def test_every_pair_equals_exact_probes(family, positions, tokens):
    model = float64_norms(build(family))
    kinds = ["resid_mid", "mlp_hidden", "resid_post"]
    sites = hf.decoder_sites(model, kinds, layers=[1], positions=positions)
    found = find_sections(model, sites, None, positions)
    assert list(found) == [site.key for site in sites]  # every pair, the unembedding included
    for site, target in zip(sites, [*sites[1:], None], strict=True):
        section, pre = found[site.key]
        assert pre is None
        width = (section.w_out if section.w_out is not None else section.w_in).shape[0]
        readout = readout_for(width)
        if target is None:
            expected = exact(model, tokens, site, readout, target_positions=positions)
            out = dh.Site("", positions=positions)
        else:
            expected = exact(model, tokens, site, readout, target=target)
            out = target
        if isinstance(section, dh.MLPSection):
            closed = section.jacobian_gram(None, readout)
        else:
            gram = section.gram_pass(model, [tokens[:4], tokens[4:]], site, out, readout,
                                     forward=lambda m, b: m(b), progress=False)  # fmt: skip
            closed = gram.second_moment()
        assert_gram(closed, expected)


def test_uncovered_layers_are_left_to_backward_passes():
    model = build("phi3")  # a fused gate_up_proj
    sites = hf.decoder_sites(model, ["resid_mid", "resid_post"], layers=[0])
    assert find_sections(model, sites) == {}
    gpt2 = build("gpt2")
    crossing = hf.decoder_sites(gpt2, ["resid_mid"], layers=[0, 1])  # two layers apart
    assert find_sections(gpt2, crossing[:1], crossing[1]) == {}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_auto_build_equals_backward_passes(family, tokens):
    model = float64_norms(build(family))
    sites = hf.decoder_sites(model, ["resid_pre", "resid_mid", "mlp_hidden", "resid_post"])
    data = [tokens[:3], tokens[3:]]
    common = {"forward": hf.forward, "progress": False}
    auto = dh.build_bases(model, sites, data, **common)
    probed = dh.build_bases(model, sites, data, sections=None, **common)
    closed = {label for label in auto.timings_ if label.endswith("(closed form)")}
    # Everything but attention (resid_pre -> resid_mid) and layer 0's output -> layer 1's
    # input (the same tensor) in closed form.
    assert len(closed) == len(sites) - 3
    assert auto.sites_ == probed.sites_
    assert_same_bases(auto, probed)
