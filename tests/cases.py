"""Tiny seeded models and inputs shared by the tests and benchmarks (float64 throughout).

Every factory takes a ``seed`` and returns a fresh float64 model in eval mode, small enough
(widths <= 8) for brute-force references (:mod:`tests.reference`) to be cheap. Sites are the
dotted ``named_modules()`` paths listed in each docstring.

Usage::

    from tests.cases import inputs, relu_mlp

    model = relu_mlp(seed=0)  # sites "0".."4"
    x = inputs(32, 5, seed=1)  # (32, 5) float64

``MODELS`` maps readable ids to ``(factory, input_shape)`` for ``pytest.mark.parametrize``::

    @pytest.mark.parametrize("name", MODELS)   # ids: "relu_mlp", "gelu_mlp", ...
    def test_something(name):
        model, x = build(name, n=16)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = [
    "MODELS",
    "PositionMix",
    "PositionMixer",
    "ResidualMLP",
    "attn_only_transformer",
    "build",
    "deep_linear",
    "gelu_mlp",
    "inputs",
    "mlp_transformer",
    "position_mixer",
    "relu_mlp",
    "residual_mlp",
    "tokens",
]


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _init_(module: nn.Module, seed: int) -> nn.Module:
    """Re-initialise every parameter from ``seed`` (N(0, 1/fan_in) weights), float64, eval."""
    gen = _seeded(seed)
    module.double().eval()
    with torch.no_grad():
        for param in module.parameters():
            fan_in = param.shape[-1] if param.ndim > 1 else param.shape[0]
            param.copy_(torch.randn(param.shape, generator=gen, dtype=param.dtype))
            param.mul_(fan_in**-0.5 if param.ndim > 1 else 0.3)
    return module


def inputs(n: int, d: int, seed: int = 0, *, n_pos: int | None = None) -> torch.Tensor:
    """Standard normal float64 inputs.

    Args:
        n: Batch size.
        d: Feature width.
        seed: Seed of the draw.
        n_pos: If given, a position dimension: shape ``(n, n_pos, d)``.

    Returns:
        Shape ``(n, d)`` or ``(n, n_pos, d)``.
    """
    shape = (n, d) if n_pos is None else (n, n_pos, d)
    return torch.randn(shape, generator=_seeded(seed), dtype=torch.float64)


def relu_mlp(
    seed: int = 0,
    *,
    d_in: int = 5,
    d_hidden: int = 8,
    d_out: int = 3,
    inplace: bool = False,
) -> nn.Sequential:
    """``Linear(5, 8) -> ReLU -> Linear(8, 6) -> ReLU -> Linear(6, 3)``.

    Sites: ``"0"`` (first pre-activation, width 8), ``"1"`` (its ReLU), ``"2"``, ``"3"``,
    ``"4"`` (output). ``inplace=True`` uses ``nn.ReLU(inplace=True)``, which overwrites the
    pre-activations ``"0"`` and ``"2"``.
    """
    d_mid = max(d_out, d_hidden - 2)
    model = nn.Sequential(
        nn.Linear(d_in, d_hidden),
        nn.ReLU(inplace=inplace),
        nn.Linear(d_hidden, d_mid),
        nn.ReLU(inplace=inplace),
        nn.Linear(d_mid, d_out),
    )
    return _init_(model, seed)


def gelu_mlp(seed: int = 0, *, d_in: int = 5, d_hidden: int = 8, d_out: int = 4) -> nn.Sequential:
    """``Linear(5, 8) -> GELU -> Linear(8, 4)``. Sites ``"0"``, ``"1"``, ``"2"``."""
    model = nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))
    return _init_(model, seed)


class ResidualMLP(nn.Module):
    """``y = x + linear_out(act(linear_in(x)))``, then a readout ``head`` (``d -> d_out``).

    Sites: ``"resid_pre"`` (``x``, an ``nn.Identity`` like TransformerLens'
    ``hook_resid_pre``: it feeds both the MLP and the skip connection), ``"linear_in"``
    (pre-activation), ``"act"``, ``"linear_out"``, ``"resid"`` (the residual sum), ``"head"``.
    """

    def __init__(self, d: int = 6, d_mlp: int = 8, d_out: int = 3, activation: str = "relu"):
        super().__init__()
        self.resid_pre = nn.Identity()
        self.linear_in = nn.Linear(d, d_mlp)
        self.act = nn.ReLU() if activation == "relu" else nn.GELU()
        self.linear_out = nn.Linear(d_mlp, d)
        self.resid = nn.Identity()
        self.head = nn.Linear(d, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.resid_pre(x)
        return self.head(self.resid(x + self.linear_out(self.act(self.linear_in(x)))))


def residual_mlp(seed: int = 0, *, activation: str = "relu") -> ResidualMLP:
    """A seeded :class:`ResidualMLP` (d = 6, d_mlp = 8, d_out = 3)."""
    return _init_(ResidualMLP(activation=activation), seed)


def deep_linear(seed: int = 0, widths: tuple[int, ...] = (4, 6, 5, 3)) -> nn.Sequential:
    """A deep linear net ``Linear(4, 6) -> Linear(6, 5) -> Linear(5, 3)`` (sites ``"0"``...)."""
    layers = [nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)]
    return _init_(nn.Sequential(*layers), seed)


class PositionMix(nn.Module):
    """Causal mixing of positions: ``y[:, t] = sum_{s <= t} W[t, s] x[:, s]`` (``(b, p, d)``)."""

    def __init__(self, n_pos: int):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(n_pos))
        self.register_buffer("causal", torch.tril(torch.ones(n_pos, n_pos)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return torch.einsum("ts,bsd->btd", self.weight * self.causal, x)


class PositionMixer(nn.Module):
    """``(batch, pos, d_in) -> (batch, pos, d_out)``: a transformer-shaped toy.

    ``embed`` (per-position ``Linear``), ``mix`` (causal position mixing), ``act`` (GELU),
    ``unembed`` (per-position ``Linear``). Sites: ``"embed"``, ``"mix"``, ``"act"``,
    ``"unembed"``; all ``(batch, pos, width)``.
    """

    def __init__(self, d_in: int = 4, d_hidden: int = 6, d_out: int = 3, n_pos: int = 5):
        super().__init__()
        self.embed = nn.Linear(d_in, d_hidden)
        self.mix = PositionMix(n_pos)
        self.act = nn.GELU()
        self.unembed = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.unembed(self.act(self.mix(self.embed(x))))


def position_mixer(seed: int = 0, *, n_pos: int = 5) -> PositionMixer:
    """A seeded :class:`PositionMixer` (d_in = 4, d_hidden = 6, d_out = 3); inputs
    ``inputs(n, 4, seed, n_pos=n_pos)``."""
    model = _init_(PositionMixer(n_pos=n_pos), seed)
    with torch.no_grad():  # near-identity mixing keeps every position informative
        model.mix.weight.mul_(0.5).add_(torch.eye(n_pos, dtype=torch.float64))
    return model


def tl_model(dtype: torch.dtype = torch.float64, **config: Any) -> nn.Module:
    """A TransformerLens model built from ``config`` (no download), in eval mode.

    A ``HookedTransformer`` where TransformerLens still has it (2.x, 3.x), else a native
    ``TransformerBridge`` (4.x): the tests then run on whichever family is installed.
    """
    import warnings

    from degen_hooks.zoo import _hooked_transformer

    hooked = _hooked_transformer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if hooked is None:  # TransformerLens 4
            from transformer_lens.model_bridge import TransformerBridge

            return TransformerBridge.boot_native(config, dtype=dtype).eval()
        from transformer_lens import HookedTransformerConfig

        return hooked(HookedTransformerConfig(**config, dtype=dtype)).eval()


def attn_only_transformer(seed: int = 0, *, n_layers: int = 2, d_vocab: int = 11):
    """A 2-layer attention-only TransformerLens model, ``d_model=8``, float64.

    Imports ``transformer_lens`` lazily (slow); feed it :func:`tokens`. Sites are TL hook
    names, e.g. ``"blocks.0.hook_resid_post"``, ``"blocks.1.attn.hook_z"``.
    """
    return tl_model(
        n_layers=n_layers,
        d_model=8,
        n_heads=2,
        d_head=4,
        n_ctx=8,
        d_vocab=d_vocab,
        attn_only=True,
        normalization_type=None,
        act_fn=None,
        seed=seed,
        device="cpu",
    )


def mlp_transformer(seed: int = 0, *, n_ctx: int = 6, d_vocab: int = 13, act_fn: str = "relu"):
    """A 1-layer TransformerLens model with an MLP (``d_model=8``, ``d_mlp=16``, no LayerNorm).

    Imports ``transformer_lens`` lazily; float32, as TransformerLens builds it by default.
    """
    return tl_model(
        torch.float32,
        n_layers=1,
        d_model=8,
        d_mlp=16,
        n_heads=2,
        d_head=4,
        n_ctx=n_ctx,
        d_vocab=d_vocab,
        act_fn=act_fn,
        normalization_type=None,
        seed=seed,
    ).train()  # as TransformerLens builds it


def tokens(n: int, n_pos: int = 6, seed: int = 0, *, d_vocab: int = 11) -> torch.Tensor:
    """Random token ids, shape ``(n, n_pos)``, for :func:`attn_only_transformer`."""
    return torch.randint(0, d_vocab, (n, n_pos), generator=_seeded(seed))


#: Readable case ids -> (factory, input width, positions or None).
MODELS: dict[str, tuple[Callable[..., nn.Module], int, int | None]] = {
    "relu_mlp": (relu_mlp, 5, None),
    "relu_mlp_inplace": (lambda seed=0: relu_mlp(seed, inplace=True), 5, None),
    "gelu_mlp": (gelu_mlp, 5, None),
    "residual_mlp": (residual_mlp, 6, None),
    "deep_linear": (deep_linear, 4, None),
    "position_mixer": (position_mixer, 4, 5),
}


def build(name: str, n: int = 16, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """``(model, inputs)`` of the case ``name`` in :data:`MODELS`."""
    factory, d_in, n_pos = MODELS[name]
    return factory(seed=seed), inputs(n, d_in, seed=seed + 1000, n_pos=n_pos)
