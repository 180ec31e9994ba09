"""Hugging Face ``transformers`` decoder models: residual-stream and MLP sites, masks, forward.

A decoder-only ``transformers`` model (GPT-2, Llama and the Llama-style families) is a list
of decoder layers, each computing ``h = x + attn(norm_1(x))`` and ``x' = h + mlp(norm_2(h))``.
:func:`decoder_sites` gives the :class:`~degen_hooks.Site` of each tensor of a layer by kind:

* ``"resid_pre"``: the layer's input ``x`` (its ``hidden_states`` argument);
* ``"resid_mid"``: the residual stream after attention ``h``, read at the input of the norm
  before the MLP (``ln_2`` on GPT-2, ``post_attention_layernorm`` on Llama). ``h`` also
  reaches the layer's output through the MLP's skip connection, so the site names the layer
  as its ``bypass``: a write there (:func:`~degen_hooks.ablate`, graph edges) changes both the
  MLP's input and the skip connection, as a write to the residual stream should;
* ``"resid_post"``: the layer's output ``x'``;
* ``"mlp_in"``: the normalised MLP input ``norm_2(h)`` (the input of ``mlp``);
* ``"mlp_hidden"``: the MLP's hidden activation, the input of its output projection
  (``mlp.c_proj`` on GPT-2, ``mlp.down_proj`` on Llama);
* ``"mlp_out"``: the MLP's output ``mlp(norm_2(h))``.

Each site is labelled ``"<layer>.<kind>"`` (``"transformer.h.0.resid_mid"``,
``"model.layers.1.mlp_hidden"``): its statistics are stored under that key.

Batches are dicts of tensors (a tokenizer's ``BatchEncoding``): :func:`forward` runs one and
returns its logits, and :func:`mask` turns its ``attention_mask`` into the boolean padding
mask of :meth:`~degen_hooks.collect.Collection.set_mask`, so padding is no sample and
``positions="last"`` is each row's last real token, with right or left padding alike::

    sites = hf.decoder_sites(model, ["resid_mid", "mlp_hidden"])
    with dh.collect(model, sites) as run:
        run.over(batches, forward=hf.forward, mask=hf.mask)

In float64, keep transformers' default attention (SDPA): the ``"eager"`` attention of
Llama-style models takes its softmax in float32, where the float64 mask minimum becomes
``-inf``, so left-padded rows turn to NaN (and the softmax loses float64 precision).

This module never imports ``transformers``: a model's family is told from the modules of its
classes, as :mod:`degen_hooks.sites` does for TransformerLens.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._checks import closest
from .._errors import ShapeMismatchError, SiteNotFoundError
from ..sites import Positions, Site, _unwrap

__all__ = ["SITE_KINDS", "decoder_layers", "decoder_sites", "forward", "is_transformers", "mask"]

SITE_KINDS = ("resid_pre", "resid_mid", "resid_post", "mlp_in", "mlp_hidden", "mlp_out")
_LAYER_KINDS = frozenset({"resid_pre", "resid_post"})  # need no knowledge of the layer's inside
_LAYER_LIST_NAMES = frozenset({"h", "layers", "layer", "blocks", "block"})


@dataclass(frozen=True)
class _Layout:
    """Submodule paths inside one decoder layer."""

    mlp_norm: str  # its input is the residual stream after attention
    mlp: str
    down: str  # the MLP's output projection: its input is the hidden activation


_GPT2 = _Layout(mlp_norm="ln_2", mlp="mlp", down="mlp.c_proj")
_LLAMA = _Layout(mlp_norm="post_attention_layernorm", mlp="mlp", down="mlp.down_proj")

# By config.model_type, each read off its modeling code (transformers 5.x) and tested: the
# norm before the MLP reads the residual after attention, and the MLP's skip connection adds
# to that same tensor. Look-alike names mean other things elsewhere: GPT-NeoX runs attention
# and MLP in parallel from the layer input, and Gemma 2/3 and OLMo 2 use
# post_attention_layernorm on the attention output, so they are not listed.
_LAYOUTS: dict[str, _Layout] = {
    "gpt2": _GPT2,
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "olmo": _LLAMA,
    "phi3": _LLAMA,
}


def is_transformers(model: nn.Module) -> bool:
    """Whether ``model`` comes from Hugging Face ``transformers`` (imports nothing).

    Args:
        model: Any module (a DDP wrapper is looked through).

    Returns:
        ``True`` if a class in ``type(model).__mro__`` is defined in ``transformers``.

    Examples:
        >>> is_transformers(torch.nn.Linear(2, 2))
        False
    """
    inner, _ = _unwrap(model)
    return any(c.__module__.split(".")[0] == "transformers" for c in type(inner).__mro__)


def _require_transformers(model: nn.Module, caller: str) -> None:
    if not is_transformers(model):
        raise TypeError(
            f"{caller}() expects a Hugging Face transformers model (a PreTrainedModel such as "
            f"GPT2LMHeadModel or LlamaForCausalLM), got {type(model).__name__}. For other "
            'models, name the sites yourself: dh.find_sites(model, "*") lists them.'
        )


def decoder_layers(model: nn.Module) -> list[str]:
    """The module names of a decoder model's layers, in order.

    The layers are the one ``nn.ModuleList`` of ``config.num_hidden_layers`` modules of one
    class (``transformer.h`` on GPT-2, ``model.layers`` on Llama, ``gpt_neox.layers``, ...);
    where several fit, the one named ``h``, ``layers`` or ``blocks``.

    Args:
        model: A ``transformers`` model, e.g. ``GPT2LMHeadModel`` or ``LlamaForCausalLM``
            (a DDP wrapper is looked through; the names are the inner model's).

    Returns:
        Dotted module names, e.g. ``["transformer.h.0", "transformer.h.1"]``.

    Raises:
        TypeError: If ``model`` is not a ``transformers`` model.
        SiteNotFoundError: If no such list, or more than one (an encoder-decoder model), is
            found; the message lists the candidates.

    Examples:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=8, n_head=2, vocab_size=20,
        ...                                    n_positions=8, bos_token_id=0, eos_token_id=0))
        >>> decoder_layers(model)
        ['transformer.h.0', 'transformer.h.1']
    """
    inner, _ = _unwrap(model)
    _require_transformers(inner, "decoder_layers")
    n_layers = getattr(getattr(inner, "config", None), "num_hidden_layers", None)
    lists = {
        name: module
        for name, module in inner.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0
    }
    candidates = [
        name
        for name, module in lists.items()
        if len({type(layer) for layer in module}) == 1
        and (n_layers is None or len(module) == n_layers)
    ]
    if len(candidates) > 1:
        named = [n for n in candidates if n.rsplit(".", 1)[-1] in _LAYER_LIST_NAMES]
        candidates = named or candidates
    if len(candidates) != 1:
        found = ", ".join(f"{n!r} ({len(m)} x {type(m[0]).__name__})" for n, m in lists.items())
        what = "several" if candidates else f"no nn.ModuleList of {n_layers} layers of one class"
        raise SiteNotFoundError(
            f"Could not find the decoder layers of {type(inner).__name__}: expected one "
            "nn.ModuleList of config.num_hidden_layers layers of one class (like "
            f"'transformer.h' on GPT-2 or 'model.layers' on Llama), found {what} "
            f"(ModuleLists: {found or 'none'}). degen_hooks.families.hf supports decoder-only "
            "models; for others, name the sites yourself, e.g. dh.Site('<layer>', io='input', "
            "arg='hidden_states') for a layer's input (dh.find_sites(model, '*') lists the "
            "modules)."
        )
    path = candidates[0]
    return [f"{path}.{i}" for i in range(len(lists[path]))]


def decoder_sites(
    model: nn.Module,
    kind: str | Sequence[str],
    *,
    layers: int | Sequence[int] | None = None,
    positions: Positions = None,
) -> list[Site]:
    """Sites of one or several kinds at every (or some) decoder layer of ``model``.

    Args:
        model: A ``transformers`` decoder model (GPT-2 and the Llama-style families for the
            kinds inside a layer; any decoder model for ``"resid_pre"`` and
            ``"resid_post"``).
        kind: One of :data:`SITE_KINDS` (see the module docstring), or several.
        layers: Layer indices (negative ones count from the end); default: every layer.
        positions: Token positions for every site (see :class:`~degen_hooks.Site`), e.g.
            ``"last"``: with a mask (:func:`mask`), each row's last real token.

    Returns:
        The sites, layer by layer and, within a layer, in the order of ``kind``; each is
        labelled ``"<layer>.<kind>"``, e.g. ``"model.layers.0.resid_mid"``.

    Raises:
        TypeError: If ``model`` is not a ``transformers`` model.
        ValueError: For an unknown kind, or a layer index out of range.
        SiteNotFoundError: If the decoder layers are not found, or a kind inside a layer is
            asked of a model type whose layer layout is not known (the message says how to
            name such sites yourself).

    Examples:
        >>> import torch, degen_hooks as dh
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> config = GPT2Config(n_layer=2, n_embd=8, n_head=2, vocab_size=20, n_positions=8,
        ...                     bos_token_id=0, eos_token_id=0)
        >>> model = GPT2LMHeadModel(config).double().eval()
        >>> [site.key for site in decoder_sites(model, ["resid_mid", "mlp_hidden"], layers=0)]
        ['transformer.h.0.resid_mid', 'transformer.h.0.mlp_hidden']
        >>> decoder_sites(model, "resid_mid", layers=0)[0].bypass   # writes reach the skip too
        'transformer.h.0'
        >>> padding = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [0] * 3 + [1] * 3])  # right, left
        >>> batch = {"input_ids": torch.randint(0, 20, (3, 6)), "attention_mask": padding}
        >>> sites = decoder_sites(model, "resid_post", positions="last")
        >>> with dh.collect(model, sites) as run:
        ...     _ = run.over([batch], forward=forward, mask=mask, progress=False)
        >>> run.stats["transformer.h.1.resid_post"].acts.n_samples    # one real token per row
        3
    """
    kinds = [kind] if isinstance(kind, str) else list(kind)
    if not kinds:
        raise ValueError(f"No site kind given; choose one or several of {list(SITE_KINDS)}.")
    for name in kinds:
        if name not in SITE_KINDS:
            suggestions = closest(str(name), SITE_KINDS)
            hint = f" Did you mean {suggestions[0]!r}?" if suggestions else ""
            raise ValueError(f"Unknown site kind {name!r}.{hint} Choose from {list(SITE_KINDS)}.")
    names = decoder_layers(model)
    inner, _ = _unwrap(model)
    indices = _layer_indices(layers, len(names))
    layout = None
    if any(name not in _LAYER_KINDS for name in kinds):
        layout = _layout(inner, names[0], kinds)
    return [
        _site(inner, names[i], name, layout, positions)  # type: ignore[arg-type]
        for i in indices
        for name in kinds
    ]


def _layer_indices(layers: int | Sequence[int] | None, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    asked = [layers] if isinstance(layers, int) else list(layers)
    out = []
    for index in asked:
        if isinstance(index, bool) or not isinstance(index, int):
            raise ValueError(f"layers must be ints (layer indices), got {index!r}.")
        if not -n_layers <= index < n_layers:
            raise ValueError(
                f"Layer {index} is out of range: the model has {n_layers} decoder layers "
                f"(indices 0 to {n_layers - 1}, or -{n_layers} to -1)."
            )
        out.append(index % n_layers)
    return out


def _layout(model: nn.Module, first_layer: str, kinds: Sequence[str]) -> _Layout:
    """The layer layout of ``model``'s type, checked against its first layer's modules."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    layout = _LAYOUTS.get(model_type)  # type: ignore[arg-type]
    layer = model.get_submodule(first_layer)
    children = [name for name, _ in layer.named_children()]
    inside = sorted(set(kinds) - _LAYER_KINDS)
    if layout is None:
        raise SiteNotFoundError(
            f"decoder_sites() does not know the layer layout of {type(model).__name__} "
            f"(model_type {model_type!r}), needed for {inside}; it knows model types "
            f"{sorted(_LAYOUTS)}. 'resid_pre' and 'resid_post' work on any decoder model. "
            f"Otherwise name the sites yourself from a layer's modules ({children}): the MLP "
            "input is dh.Site('<layer>.<mlp>', io='input'), and the residual stream after "
            "attention, where it is the input of the norm before the MLP, is "
            "dh.Site('<layer>.<that norm>', io='input', bypass='<layer>') (the bypass makes "
            "writes reach the MLP's skip connection too)."
        )
    for path in (layout.mlp_norm, layout.mlp, layout.down):
        try:
            layer.get_submodule(path)
        except AttributeError:
            raise SiteNotFoundError(
                f"Layer {first_layer!r} of {type(model).__name__} (model_type {model_type!r}) "
                f"has no submodule {path!r}, which decoder_sites() expects there (its "
                f"children: {children}). The model's layers differ from transformers' "
                f"{model_type} layers; name the sites yourself (dh.find_sites(model, "
                f"'{first_layer}.*') lists its modules)."
            ) from None
    return layout


def _site(
    model: nn.Module, layer: str, kind: str, layout: _Layout | None, positions: Positions
) -> Site:
    common: dict[str, Any] = {"positions": positions, "label": f"{layer}.{kind}"}
    if kind == "resid_pre":
        return Site(layer, io="input", arg=_hidden_states_arg(model.get_submodule(layer)), **common)
    if kind == "resid_post":
        return Site(layer, **common)
    assert layout is not None  # set by decoder_sites for every kind inside a layer
    if kind == "resid_mid":
        return Site(f"{layer}.{layout.mlp_norm}", io="input", bypass=layer, **common)
    if kind == "mlp_in":
        return Site(f"{layer}.{layout.mlp}", io="input", **common)
    if kind == "mlp_hidden":
        return Site(f"{layer}.{layout.down}", io="input", **common)
    return Site(f"{layer}.{layout.mlp}", **common)  # mlp_out


def _hidden_states_arg(layer: nn.Module) -> int | str:
    # Decoder layers also get masks, position embeddings and caches as (keyword) tensors:
    # name the residual stream. Layers take it first (positionally, for checkpointing).
    try:
        parameters = inspect.signature(layer.forward).parameters
    except (TypeError, ValueError):
        return 0
    return "hidden_states" if "hidden_states" in parameters else 0


def forward(model: nn.Module, batch: Mapping[str, Any] | torch.Tensor) -> torch.Tensor:
    """Run ``model`` on a batch and return its logits (a base model: its last hidden state).

    Use it as ``forward=`` of ``run.over`` or :func:`~degen_hooks.node_ablation_curve`.

    Args:
        model: A ``transformers`` model.
        batch: A dict of model inputs (``input_ids``, ``attention_mask``, ...; a tokenizer's
            ``BatchEncoding``), or a tensor of token ids.

    Returns:
        ``output.logits``, shape ``(batch, pos, vocab)``, or ``output.last_hidden_state`` of
        a model without a head. No key-value cache is built (``use_cache=False`` unless the
        batch says otherwise).

    Raises:
        TypeError: If ``batch`` is neither a mapping nor a tensor, or the output holds no
            tensor.

    Examples:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=20,
        ...                                    n_positions=8, bos_token_id=0, eos_token_id=0))
        >>> forward(model, {"input_ids": torch.zeros(2, 5, dtype=torch.long)}).shape
        torch.Size([2, 5, 20])
    """
    inner, _ = _unwrap(model)
    if isinstance(batch, torch.Tensor):
        args, kwargs = (batch,), {}
    elif isinstance(batch, Mapping):
        args, kwargs = (), dict(batch)
    else:
        raise TypeError(
            "forward() takes a batch as a dict of model inputs (input_ids, attention_mask, "
            f"...) or a tensor of token ids, got {type(batch).__name__}."
        )
    if "use_cache" not in kwargs and _accepts(inner, "use_cache"):
        kwargs["use_cache"] = False  # no key-value cache: nothing generates from this pass
    output = model(*args, **kwargs)
    if isinstance(output, torch.Tensor):
        return output
    for key in ("logits", "last_hidden_state"):
        value = output.get(key) if isinstance(output, Mapping) else getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"{type(inner).__name__} returned {type(output).__name__}, with no logits, "
        "last_hidden_state or leading tensor; call the model yourself and pass "
        "forward=lambda model, batch: ... to pick its output."
    )


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def mask(batch: Mapping[str, Any] | torch.Tensor) -> torch.Tensor | None:
    """The padding mask of a batch: ``batch["attention_mask"].bool()``, ``True`` = real token.

    Pass it to ``run.set_mask`` before each forward pass (or as ``mask=`` of ``run.over``):
    padding positions are then no samples, and ``positions="last"`` is each row's last real
    token, with right or left padding.

    Args:
        batch: A dict of model inputs, or a tensor of token ids (no padding).

    Returns:
        A boolean tensor of shape ``(batch, pos)``, or ``None`` when the batch has no
        ``attention_mask`` (every position is real).

    Raises:
        TypeError: If ``batch`` is neither a mapping nor a tensor.
        ShapeMismatchError: If the attention mask is not 2-d ``(batch, pos)``.

    Examples:
        >>> mask({"input_ids": torch.zeros(2, 3), "attention_mask": torch.tensor([[1, 1, 0],
        ...                                                                    [0, 1, 1]])})
        tensor([[ True,  True, False],
                [False,  True,  True]])
    """
    if isinstance(batch, torch.Tensor):
        return None
    if not isinstance(batch, Mapping):
        raise TypeError(
            "mask() takes a batch as a dict of model inputs (with an attention_mask) or a "
            f"tensor of token ids, got {type(batch).__name__}."
        )
    attention_mask = batch.get("attention_mask")
    if attention_mask is None:
        return None
    attention_mask = torch.as_tensor(attention_mask)
    if attention_mask.ndim != 2:
        raise ShapeMismatchError(
            f"attention_mask has shape {tuple(attention_mask.shape)}; mask() needs the 2-d "
            "(batch, pos) padding mask of 1 (real token) and 0 (padding) a tokenizer returns. "
            "For a custom (e.g. 4-d) mask, pass run.set_mask() a (batch, pos) boolean tensor."
        )
    return attention_mask.bool()
