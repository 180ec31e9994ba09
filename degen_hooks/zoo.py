"""Model zoo: trained models shipped with degen_hooks, loaded without network access.

Five one-layer TransformerLens transformers that learned modular addition ``(a + b) mod 113``
("grokking"; Nanda et al. 2023), trained by Apollo Research for the Local Interaction Basis
paper (Bushnaq et al. 2024, arXiv 2405.10928; ``rib`` repository, MIT licence). The weights
and the train/test split live in ``degen_hooks/data/modadd/`` (safetensors + JSON, see its
README): input ``[a, b, 113]`` (113 is ``=``), label ``(a + b) % 113`` read at the last
position; 3,830 training and 8,939 test examples.

``transformer_lens`` is imported only when a model is loaded. TransformerLens 2.x and 3.x
give a ``HookedTransformer``; TransformerLens 4, which removed it, a ``TransformerBridge``
with the same weights (``load_modadd(family=...)`` chooses).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch
from torch import nn

from ._errors import FormatError

__all__ = [
    "MODADD_SEEDS",
    "ModAddData",
    "load_modadd",
    "load_modadd_data",
    "modadd_accuracy",
]

MODADD_SEEDS = (0, 1, 2, 3, 4)
_DATA = "data/modadd"
# TransformerLens attention buffers: recomputed from the config, may be renamed between
# versions, so they are allowed to be missing or unexpected when loading a state dict.
_BUFFERS = ("attn.mask", "attn.IGNORE")


@dataclass(frozen=True)
class ModAddData:
    """The modular-addition data set, split as the models were trained.

    Attributes:
        train_tokens: Training inputs ``[a, b, p]``, shape ``(3830, 3)``, int64.
        train_labels: ``(a + b) % p``, shape ``(3830,)``, int64.
        test_tokens: Held-out inputs, shape ``(8939, 3)``, int64.
        test_labels: Held-out labels, shape ``(8939,)``, int64.
        p: The modulus, 113; also the ``=`` token.
    """

    train_tokens: torch.Tensor
    train_labels: torch.Tensor
    test_tokens: torch.Tensor
    test_labels: torch.Tensor
    p: int = 113

    def __repr__(self) -> str:
        return (
            f"ModAddData(p={self.p}, n_train={len(self.train_labels)}, "
            f"n_test={len(self.test_labels)})"
        )


def _files() -> Any:
    return resources.files(__package__).joinpath(_DATA)


def load_modadd_data(*, device: str | torch.device = "cpu") -> ModAddData:
    """The train/test split of the shipped modular-addition models.

    Example ``i = a * p + b`` is the token sequence ``[a, b, p]`` with label ``(a + b) % p``;
    ``split.json`` lists the training indices, every other example is a test example.

    Args:
        device: Where to put the tensors.

    Returns:
        A :class:`ModAddData`.

    Raises:
        FormatError: If ``split.json`` is malformed.
    """
    split = json.loads(_files().joinpath("split.json").read_text())
    try:
        p = int(split["modulus"])
        train = torch.tensor(split["train_indices"], dtype=torch.long)
    except (KeyError, TypeError, ValueError) as err:
        raise FormatError(
            f"degen_hooks/{_DATA}/split.json lacks 'modulus' or 'train_indices' ({err}); "
            "reinstall degen_hooks."
        ) from err
    n = p * p
    if train.numel() and not (0 <= int(train.min()) and int(train.max()) < n):
        raise FormatError(f"split.json has training indices outside [0, {n}).")
    index = torch.arange(n)
    a, b = index // p, index % p
    tokens = torch.stack([a, b, torch.full_like(a, p)], dim=1)
    labels = (a + b) % p
    is_train = torch.zeros(n, dtype=torch.bool)
    is_train[train] = True
    return ModAddData(
        train_tokens=tokens[train].to(device),
        train_labels=labels[train].to(device),
        test_tokens=tokens[~is_train].to(device),
        test_labels=labels[~is_train].to(device),
        p=p,
    )


def load_modadd(
    seed: int = 0,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    family: str = "auto",
) -> tuple[nn.Module, ModAddData]:
    """A trained modular-addition TransformerLens model and its data.

    One layer, 4 heads of width 32, ``d_model=128``, ``d_mlp=512``, ReLU, no LayerNorm,
    ``d_vocab=114``, ``n_ctx=3``; the weights are unprocessed (no folding or centring).
    Test accuracy: seed 0: 0.99955, seed 1: 0.99888, seed 2: 1.0, seed 3: 0.99978,
    seed 4: 1.0; training accuracy 1.0.

    Args:
        seed: Training seed, one of :data:`MODADD_SEEDS`.
        device: Where to put the model and data.
        dtype: Parameter dtype (the stored weights are float32; ``torch.float64`` for
            numerics).
        family: ``"hooked"`` (a ``HookedTransformer``), ``"bridge"`` (a
            ``TransformerBridge.boot_native`` model, the stored weights converted to its
            layout) or ``"auto"``: the ``HookedTransformer`` where TransformerLens still has
            it (2.x, 3.x), else the bridge (4.x). Both compute the same function.

    Returns:
        ``(model, data)``: the model in eval mode and a :class:`ModAddData`.

    Raises:
        ValueError: For an unknown seed or family, or ``family="hooked"`` on TransformerLens
            4 (which removed ``HookedTransformer``).
        FormatError: If a stored weight is missing or does not fit the configuration.

    Examples:
        >>> model, data = load_modadd(0)
        >>> round(modadd_accuracy(model, data.test_tokens, data.test_labels), 5)
        0.99955
    """
    if seed not in MODADD_SEEDS:
        raise ValueError(f"No modular-addition model for seed {seed!r}; seeds: {MODADD_SEEDS}.")
    if family not in ("auto", "hooked", "bridge"):
        raise ValueError(f"family must be 'auto', 'hooked' or 'bridge', got {family!r}.")
    from safetensors.torch import load as load_safetensors

    files = _files()
    config = json.loads(files.joinpath("config.json").read_text())
    if family == "auto":
        family = "hooked" if _hooked_transformer() is not None else "bridge"
    state = load_safetensors(files.joinpath(f"seed{seed}.safetensors").read_bytes())
    if family == "hooked":
        model = _build_hooked(config, dtype, device)
    else:
        model = _build_bridge(config, dtype, device)
        try:
            state = _bridge_layout(state, config)
        except KeyError as err:
            raise FormatError(
                f"seed{seed}.safetensors lacks the weight {err}. Reinstall degen_hooks."
            ) from None
    result = model.load_state_dict(state, strict=False)
    bad = [k for k in (*result.missing_keys, *result.unexpected_keys) if not k.endswith(_BUFFERS)]
    if bad:
        raise FormatError(
            f"seed{seed}.safetensors does not fit the configuration: keys {bad} are missing "
            "or unexpected. Reinstall degen_hooks or check the transformer-lens version."
        )
    return model.eval(), load_modadd_data(device=device)


def _hooked_transformer() -> Any:
    """``transformer_lens.HookedTransformer``, or ``None`` on TransformerLens 4 (removed)."""
    try:
        from transformer_lens import HookedTransformer
    except ImportError:
        return None
    return HookedTransformer


def _build_hooked(config: dict[str, Any], dtype: torch.dtype, device: Any) -> nn.Module:
    hooked = _hooked_transformer()
    if hooked is None:
        raise ValueError(
            "family='hooked' needs a TransformerLens with HookedTransformer (2.x or 3.x); "
            "TransformerLens 4 removed it: use family='bridge' (or 'auto')."
        )
    from transformer_lens import HookedTransformerConfig

    cfg = HookedTransformerConfig(**config, dtype=dtype, device=str(device))
    with warnings.catch_warnings():
        # TransformerLens 3 deprecates HookedTransformer in favour of TransformerBridge.
        warnings.filterwarnings("ignore", "HookedTransformer is deprecated", DeprecationWarning)
        return hooked(cfg)  # built on cfg.device


def _build_bridge(config: dict[str, Any], dtype: torch.dtype, device: Any) -> nn.Module:
    from transformer_lens.model_bridge import TransformerBridge

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return TransformerBridge.boot_native({**config, "device": str(device)}, dtype=dtype)


def _bridge_layout(
    state: dict[str, torch.Tensor], config: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """TransformerLens-format weights (``W_Q``: ``(heads, d_model, d_head)``, ...) in the
    ``nn.Linear`` layout of a native bridge (``attn.q.weight``: ``(heads * d_head, d_model)``)."""
    out = {
        "embed.weight": state["embed.W_E"],
        "pos_embed.weight": state["pos_embed.W_pos"],
        "unembed.weight": state["unembed.W_U"].T,
        "unembed.bias": state["unembed.b_U"],
    }
    for layer in range(int(config["n_layers"])):
        attn, mlp = f"blocks.{layer}.attn", f"blocks.{layer}.mlp"
        for name in "QKV":
            weight = state[f"{attn}.W_{name}"]  # (heads, d_model, d_head)
            out[f"{attn}.{name.lower()}.weight"] = weight.permute(0, 2, 1).flatten(0, 1)
            out[f"{attn}.{name.lower()}.bias"] = state[f"{attn}.b_{name}"].flatten()
        out[f"{attn}.o.weight"] = state[f"{attn}.W_O"].flatten(0, 1).T  # (d_model, heads*d_head)
        out[f"{attn}.o.bias"] = state[f"{attn}.b_O"]
        out[f"{mlp}.in.weight"] = state[f"{mlp}.W_in"].T
        out[f"{mlp}.in.bias"] = state[f"{mlp}.b_in"]
        out[f"{mlp}.out.weight"] = state[f"{mlp}.W_out"].T
        out[f"{mlp}.out.bias"] = state[f"{mlp}.b_out"]
    return {key: value.contiguous() for key, value in out.items()}


@torch.no_grad()
def modadd_accuracy(
    model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 4096
) -> float:
    """Fraction of ``tokens`` whose last-position argmax logit equals ``labels``.

    Args:
        model: A model mapping tokens ``(batch, 3)`` to logits ``(batch, 3, d_vocab)``.
        tokens: Inputs, shape ``(n, 3)``.
        labels: Targets, shape ``(n,)``.
        batch_size: Examples per forward pass.

    Returns:
        The accuracy in ``[0, 1]``.
    """
    if len(tokens) != len(labels):
        raise ValueError(f"{len(tokens)} token rows but {len(labels)} labels.")
    if len(tokens) == 0:
        raise ValueError("No examples to score: tokens is empty.")
    correct = 0
    for start in range(0, len(tokens), batch_size):
        logits = model(tokens[start : start + batch_size])
        predictions = logits[:, -1].argmax(-1)
        correct += int((predictions == labels[start : start + batch_size].to(predictions)).sum())
    return correct / len(tokens)
