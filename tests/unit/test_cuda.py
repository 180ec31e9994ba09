"""On a GPU, statistics stay on the activation's device and equal the CPU results.

Marked ``cuda``: skipped on machines without a GPU (see tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

import degen_hooks as dh
from tests.cases import inputs, relu_mlp

pytestmark = pytest.mark.cuda


def test_accumulators_live_on_the_gpu_and_match_the_cpu():
    x = inputs(500, 6, seed=0)
    gpu = dh.Covariance().update(x.cuda())
    assert gpu.cov().device.type == "cuda" and gpu.cov().dtype == torch.float64
    torch.testing.assert_close(
        gpu.cov().cpu(), dh.Covariance().update(x).cov(), rtol=1e-12, atol=1e-14
    )
    counts = dh.CoFiring().update(x.cuda())
    assert torch.equal(counts.cofire_counts().cpu(), dh.CoFiring().update(x).cofire_counts())


def test_collect_and_build_on_the_gpu_equal_the_cpu():
    model, x = relu_mlp(seed=0), inputs(256, 5, seed=1)
    cpu = dh.build_bases(model, ["1", "3"], x.split(64), sections=None, progress=False)
    gpu_model = relu_mlp(seed=0).cuda()
    gpu = dh.build_bases(gpu_model, ["1", "3"], x.cuda().split(64), sections=None, progress=False)
    for key in ("1", "3"):
        assert gpu.stats_[key].acts.cov().device.type == "cuda"
        torch.testing.assert_close(
            gpu.lambdas_[key].cpu(), cpu.lambdas_[key], rtol=1e-9, atol=1e-12
        )


def test_transformer_closed_forms_on_the_gpu_equal_the_cpu():
    """sections="auto" on a TransformerLens model: attention, MLP and unembedding on the GPU."""
    from tests.integration.conftest import build_hooked

    sites = [
        dh.Site("blocks.1.hook_resid_pre"),
        dh.Site("blocks.1.hook_resid_mid", positions="last"),
        dh.Site("blocks.1.hook_resid_post", positions="last"),
    ]
    tokens = torch.randint(0, 11, (12, 5), generator=torch.Generator().manual_seed(3))
    common = {"output_positions": "last", "progress": False}
    cpu = dh.build_bases(build_hooked(), sites, tokens.split(4), **common)
    gpu_model = build_hooked().to("cuda")
    gpu = dh.build_bases(gpu_model, sites, tokens.cuda().split(4), **common)
    assert all(k.endswith("(closed form)") for k in gpu.timings_ if k.startswith("jacobians"))
    for site in sites:
        assert gpu.stats_[site.key].grads.second_moment().device.type == "cuda"
        torch.testing.assert_close(
            gpu.lambdas_[site.key].cpu(), cpu.lambdas_[site.key], rtol=1e-9, atol=1e-12
        )
