"""Fixtures for the TransformerLens integration tests: tiny float64 models built offline.

TransformerLens must never reach the network here: weights are built from configs, never
downloaded, and no tokenizer is loaded.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from degen_hooks.zoo import _hooked_transformer  # noqa: E402

D_VOCAB, N_CTX = 11, 5


def toy_config(act_fn: str = "relu", normalization_type: str | None = None) -> dict:
    """The shared toy architecture: 2 blocks, d_model 8, d_mlp 16, 2 heads of width 4."""
    return dict(
        d_model=8,
        n_layers=2,
        d_mlp=16,
        n_ctx=N_CTX,
        d_vocab=D_VOCAB,
        n_heads=2,
        d_head=4,
        act_fn=act_fn,
        normalization_type=normalization_type,
        attn_only=False,
        seed=0,
    )


def perturbed(model: nn.Module, seed: int = 1) -> nn.Module:
    # Fresh models have zero biases and unit LayerNorm gains, which hide layout mistakes
    # (a transposed W_in, a forgotten LN gain): give every parameter a random offset.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float64)
            param.add_(0.3 * noise.to(param))
    return model.eval()


def build_hooked(act_fn: str = "relu", normalization_type: str | None = None) -> nn.Module:
    """A float64 ``HookedTransformer`` with random weights."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(**toy_config(act_fn, normalization_type), dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg)
    return perturbed(model, 1)


def build_bridge(act_fn: str = "relu", normalization_type: str | None = None) -> nn.Module:
    """A float64 ``TransformerBridge`` around a TL-native model (``boot_native``, offline)."""
    from transformer_lens.model_bridge import TransformerBridge

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = TransformerBridge.boot_native(
            toy_config(act_fn, normalization_type), dtype=torch.float64
        )
    return perturbed(model, 2)


def config_only(config: dict) -> nn.Module:
    """A module with nothing but a TransformerLens-like ``cfg`` (for config checks)."""
    from types import SimpleNamespace

    module = nn.Module()
    module.cfg = SimpleNamespace(**config)
    return module


HAS_HOOKED = _hooked_transformer() is not None  # TransformerLens 4 removed it
requires_hooked = pytest.mark.skipif(
    not HAS_HOOKED, reason="TransformerLens 4 removed HookedTransformer"
)
BUILDERS: dict[str, Callable[..., nn.Module]] = (
    {"hooked": build_hooked, "bridge": build_bridge} if HAS_HOOKED else {"bridge": build_bridge}
)
VARIANTS = [("relu", None), ("gelu", None), ("relu", "LN"), ("gelu", "LN")]


def variant_id(variant: tuple[str, str | None]) -> str:
    return f"{variant[0]}-{variant[1] or 'nonorm'}"


@pytest.fixture
def build() -> dict[str, Callable[..., nn.Module]]:
    """Model builders by family: ``build["bridge"](act_fn, normalization_type)``; ``"hooked"``
    only where TransformerLens has ``HookedTransformer`` (mark such tests ``requires_hooked``)."""
    return BUILDERS


@pytest.fixture
def tokens() -> torch.Tensor:
    """A batch of token ids, shape ``(6, 5)``."""
    return torch.randint(0, D_VOCAB, (6, N_CTX), generator=torch.Generator().manual_seed(3))


@pytest.fixture(params=list(BUILDERS), ids=list(BUILDERS))
def family(request: pytest.FixtureRequest) -> str:
    """``"hooked"`` or ``"bridge"``."""
    return request.param


@pytest.fixture(params=VARIANTS, ids=[variant_id(v) for v in VARIANTS])
def model(request: pytest.FixtureRequest, family: str) -> nn.Module:
    """Every family x activation x normalization."""
    return BUILDERS[family](*request.param)


@pytest.fixture
def plain_model(family: str) -> nn.Module:
    """One small model per family (ReLU, no LayerNorm)."""
    return BUILDERS[family]("relu", None)


def hook_state(model) -> list[tuple[str, int, int, int, int, int]]:
    """Hook counts on every module, torch's and TransformerLens's own handle lists."""
    return [
        (
            name,
            len(m._forward_hooks),
            len(m._forward_pre_hooks),
            len(m._backward_hooks),
            len(getattr(m, "fwd_hooks", [])),
            len(getattr(m, "bwd_hooks", [])),
        )
        for name, m in model.named_modules(remove_duplicate=False)
    ]


def warmed_up(model, tokens):
    """The model after one forward pass: a bridge wires its own capture hooks on first use."""
    with torch.no_grad():
        model(tokens)
    return model


@pytest.fixture
def shard():
    """``shard(model, parts)``: FSDP2's ``fully_shard`` on each of ``parts`` and the root, in
    a one-rank gloo group of this process (torch.distributed's DTensor weights, no workers)."""
    dist = pytest.importorskip("torch.distributed")
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        pytest.skip("torch.distributed.fsdp.fully_shard is not available")
    from tests.unit.test_distributed import _free_port

    address = f"tcp://127.0.0.1:{_free_port()}"
    dist.init_process_group("gloo", init_method=address, rank=0, world_size=1)

    def apply(model: nn.Module, parts: list[nn.Module]) -> nn.Module:
        mesh = init_device_mesh("cpu", (1,))
        for part in parts:
            fully_shard(part, mesh=mesh)
        return fully_shard(model, mesh=mesh)

    try:
        yield apply
    finally:
        dist.destroy_process_group()
