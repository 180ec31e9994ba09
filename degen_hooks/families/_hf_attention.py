"""Closed-form attention of Hugging Face decoder layers (#16): no backward passes.

Part of the ``transformers`` adapter (:mod:`degen_hooks.families.transformers`). The
mathematics is :class:`degen_hooks.attention.AttentionSection`'s; this module says where a
``transformers`` layer keeps what it needs. Hugging Face attention has no hooks and, with SDPA,
never forms its pattern, so one forward pass reads

* the layer's input ``x`` (the residual stream; the norm before attention is recomputed);
* q, k and v as the projections return them (``q_proj``/``k_proj``/``v_proj``, or GPT-2's
  fused ``c_attn``; biases included; Qwen 3's q and k before their per-head RMSNorms, which
  the section applies itself, :mod:`degen_hooks.attention.qk_norm`);
* the ``(cos, sin)`` tables the model's rotary embedding passes every layer (Llama-style);
* the input of the output projection (``o_proj``, GPT-2's ``c_proj``): the heads' outputs
  ``z``;
* the section's output, the residual stream after attention.

Each batch rotates q and k by the tables the model was passed (so ``position_ids`` shared by
the batch are followed), recomputes the causal pattern ``softmax(q k^T / scale)`` in float64
(the keys of padding masked, with the padding mask ``gram_pass(mask=...)`` is given), and
checks it twice at the real tokens: ``z`` must equal ``pattern @ v``, and the output ``x + z
W_O + b_O``, to rounding. A batch whose attention differs (padding the mask does not name,
per-row ``position_ids``, a cache, a sliding window shorter than the sequence, dropout in
train mode, GPT-2's float32 ``reorder_and_upcast_attn``, anything else added to the residual
stream between attention and the MLP's norm) is refused with what to do, never used.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from .._checks import largest
from .._errors import ShapeMismatchError
from .._weights import float64_copy
from ..attention import AttentionSection
from ..attention._checks import check_read, projection_biases
from ..attention.qk_norm import QKNorm
from ..attention.rotary import passed_rotary
from ..attention.section import heads
from ..sites import Site

__all__ = ["HFAttentionSection", "hf_attention_section"]

F64 = torch.float64
_HINT = (
    "the closed form recomputes the causal pattern softmax(q k^T / scale) in float64, with "
    "the keys of padding masked as mask= says. With padding, pass build_bases(mask=...) (or "
    "gram_pass(mask=...)) the attention_mask the model gets, e.g. mask=hf.mask; run batches "
    "without per-row position_ids or cache, with the model in eval mode, and no hook that "
    "changes the norm, q, k or v (steering), the heads' outputs or the output projection "
    "(a head ablation, a patch); "
    "otherwise leave this pair to backward passes (sections=None), which follow such hooks."
)


@dataclass
class HFAttentionSection(AttentionSection):
    """The attention of one ``transformers`` decoder layer, with its skip connection.

    The attributes are :class:`degen_hooks.attention.AttentionSection`'s (``source`` the
    decoder layer, ``target`` the norm before its MLP, whose input is the residual stream
    after attention), and:

    Attributes:
        previous: The decoder layer before (its output is this layer's input), or ``""``.
        projections: The q, k and v projections' paths (one path: GPT-2's fused ``c_attn``).
        mixer: The output projection's path: its input is the heads' outputs ``z``.
        tables: The rotary embedding module whose output is ``(cos, sin)``, or ``""``.
        b_o: The output projection's bias ``(d_out,)``, or ``None`` (checks the output).
    """

    previous: str = ""
    projections: tuple[str, ...] = ()
    mixer: str = ""
    tables: str = ""
    b_o: torch.Tensor | None = None

    def _check_sites(self, site: Site, target: Site | None) -> None:
        here = (site.name, site.io)
        inputs = {(self.source, "input"), (self.previous, "output")} - {("", "output")}
        arg_ok = site.io == "output" or site.arg in (None, 0, "hidden_states")
        if (
            here not in inputs
            or not arg_ok
            or target is None
            or ((target.name, target.io) != (self.target, "input"))
        ):
            raise ShapeMismatchError(
                f"This attention section maps the input of {self.source!r} to the input of "
                f"{self.target!r}, but was asked for {site.key!r} -> "
                f"{None if target is None else target.key!r}: build it for the right layer "
                "(hf.decoder_sites(model, ['resid_pre', 'resid_mid'], layers=...) gives its "
                "sites)."
            )

    def _reads(self) -> dict[str, Site]:
        names = ("qkv",) if len(self.projections) == 1 else ("q", "k", "v")
        reads = {role: Site(path) for role, path in zip(names, self.projections, strict=True)}
        reads["z"] = Site(self.mixer, io="input")
        reads["y"] = Site(self.target, io="input", label=f"{self.target}:section output")
        if self.tables:
            reads["cos"] = Site(self.tables, element=0, label=f"{self.tables}:cos")
            reads["sin"] = Site(self.tables, element=1, label=f"{self.tables}:sin")
        return reads

    def _read(
        self,
        reads: dict[str, torch.Tensor],
        mask: torch.Tensor | None = None,
        outputs: torch.Tensor | None = None,
    ) -> tuple[AttentionSection, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch's section and float64 q, k, v and recomputed pattern (the keys of
        padding masked), checked against the heads' outputs the model computed at the real
        tokens (a query of padding only sees padding: its row is zero, and no probe)."""
        n_heads, d_head = self.w_q.shape[0], self.w_q.shape[2]
        if "qkv" in reads:
            width = n_heads * d_head
            parts = reads["qkv"].split(width, dim=-1)
        else:
            parts = (reads["q"], reads["k"], reads["v"])
        q, k, v = (heads(part, n_heads, d_head) for part in parts)
        self.check_projections(reads["x"], (q, k, v), parts[0].dtype, mask, _HINT, outputs=outputs)
        section: AttentionSection = self
        if self.qk_norm is not None:  # the projections are raw: norm each head's q and k
            section = replace(self, qk_norm=self.qk_norm.of_batch(q, k))
            frames = section.qk_norm.frames()  # type: ignore[union-attr]
            q, k = frames.q.normalized, frames.k.normalized
        if self.tables:
            section = replace(section, rotary=passed_rotary(reads["cos"], reads["sin"]))
            q, k = section.rotary.rotate(q), section.rotary.rotate(k)  # type: ignore[union-attr]
        n_pos = q.shape[1]
        scores = torch.einsum("bqhe,bkhe->bhqk", q, k) / self.scale
        hidden = torch.ones(n_pos, n_pos, dtype=torch.bool, device=q.device).triu(1)
        real = slice(None)
        if mask is not None:  # the keys of padding are hidden too
            real = mask.to(q.device)
            hidden = hidden | ~real[:, None, None, :]
        pattern = torch.softmax(scores.masked_fill_(hidden, float("-inf")), dim=-1)
        pattern = pattern.nan_to_num_(0.0)  # a query that sees no key
        z = torch.einsum("bhqk,bkhe->bqhe", pattern, v)
        size = largest(v)
        # transformers' RMSNorm of q and k takes its variance in float32 whatever the dtype
        loose = self.qk_norm is not None
        check = {"at": self.source, "hint": _HINT, "float64": 1e-4 if loose else 1e-9}
        check_read("heads' outputs", z.flatten(2)[real], reads["z"][real], size=size, **check)
        x = reads["x"].to(F64)
        y = x + torch.einsum("bqhe,hed->bqd", z, self.w_o.to(x.device))
        if self.b_o is not None:
            y += self.b_o.to(x.device)
        check_read("output", y[real], reads["y"][real], **check)
        return section, q, k, v, pattern


def hf_attention_section(
    model: nn.Module,
    model_type: str,
    layers: list[str],
    index: int,
    norm: tuple[str, torch.Tensor | None, torch.Tensor | None, float],
    target: str,
) -> HFAttentionSection:
    """The closed-form attention of decoder layer ``index``, input to the residual after it.

    Args:
        model: The (unwrapped) ``transformers`` model.
        model_type: ``"gpt2"`` or a Llama-layout type (``"llama"``, ``"mistral"``,
            ``"qwen2"``, ``"qwen3"``).
        layers: The decoder layers' paths.
        index: The layer.
        norm: ``(kind, gain, bias, eps)`` of the norm before attention.
        target: The path of the norm before the MLP (its input is the section's output).

    Raises:
        ValueError: For attention the closed form does not cover (norms of q or k other than
            Qwen 3's per-head RMSNorms, cross attention, attention sinks, soft-capped scores).
    """
    layer_path = layers[index]
    layer = model.get_submodule(layer_path)
    kind, gain, beta, eps = norm
    if model_type == "gpt2":
        attn = layer.attn
        if getattr(attn, "is_cross_attention", False) or hasattr(layer, "crossattention"):
            raise ValueError("No closed form for a layer with cross attention.")
        fused = float64_copy(attn.c_attn.weight)  # Conv1D: x @ W, (d, 3 d)
        d_model = fused.shape[0]
        n_heads = int(attn.num_heads)
        w_q, w_k, w_v = (_heads_in(w, n_heads) for w in fused.split(d_model, dim=1))
        w_o = float64_copy(attn.c_proj.weight).reshape(n_heads, -1, d_model)
        d_head = w_o.shape[1]
        fused_bias = _bias(attn.c_attn)
        biases = (None,) * 3 if fused_bias is None else fused_bias.split(d_model)
        out_proj = attn.c_proj
        projections, mixer, tables = (f"{layer_path}.attn.c_attn",), "attn.c_proj", ""
        qk_norm = None
    else:
        attn = layer.self_attn
        odd = [name for name in ("sinks",) if hasattr(attn, name)]
        if odd or getattr(model.config, "attn_logit_softcapping", None):
            raise ValueError(f"No closed form for attention with {odd or 'soft-capped scores'}.")
        d_head = int(attn.head_dim)
        qk_norm = QKNorm.of_modules(
            getattr(attn, "q_norm", None), getattr(attn, "k_norm", None), d_head
        )
        w_q, w_k, w_v = (
            _heads_in(float64_copy(getattr(attn, f"{n}_proj").weight).T, None, d_head)
            for n in "qkv"
        )
        w_o = float64_copy(attn.o_proj.weight).T.reshape(w_q.shape[0], d_head, -1)
        biases = tuple(_bias(getattr(attn, f"{n}_proj")) for n in "qkv")
        out_proj = attn.o_proj
        projections = tuple(f"{layer_path}.self_attn.{n}_proj" for n in "qkv")
        mixer, tables = "self_attn.o_proj", _rotary_module(model)
    if qk_norm is not None and not tables:
        raise ValueError("No closed form for norms of q and k without rotary embeddings.")
    # Grouped-query attention: each key/value head serves consecutive query heads.
    w_k, w_v = (w.repeat_interleave(w_q.shape[0] // w.shape[0], dim=0) for w in (w_k, w_v))
    biases = tuple(None if b is None else b.reshape(-1, d_head) for b in biases)
    b_q, b_k, b_v = projection_biases(biases, (w_q, w_k, w_v), beta)
    if gain is not None:  # q = (n * gain + bias) W_Q + b_Q: the gain scales W_Q's rows
        w_q, w_k, w_v = (w * gain[None, :, None] for w in (w_q, w_k, w_v))
    scaling = getattr(attn, "scaling", None)
    if not isinstance(scaling, (int, float)):
        raise ValueError(f"{type(attn).__name__} keeps no scaling of its scores.")

    return HFAttentionSection(
        w_q=w_q.contiguous(), w_k=w_k.contiguous(), w_v=w_v.contiguous(),
        w_o=w_o.contiguous(), scale=1.0 / float(scaling), residual=True,
        source=layer_path, target=target, norm=kind, eps=eps,
        previous=layers[index - 1] if index else "", projections=projections,
        mixer=f"{layer_path}.{mixer}", tables=tables, b_o=_bias(out_proj), qk_norm=qk_norm,
        b_q=b_q, b_k=b_k, b_v=b_v,
    )  # fmt: skip


def _bias(module: nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return None if bias is None else float64_copy(bias)


def _heads_in(weight: torch.Tensor, n_heads: int | None, d_head: int | None = None) -> torch.Tensor:
    """A projection ``(d_in, n d_head)`` (``x @ W``) as ``(n, d_in, d_head)``."""
    d_in = weight.shape[0]
    split = weight.reshape(d_in, n_heads or -1, d_head or -1)
    return split.permute(1, 0, 2).clone()


def _rotary_module(model: nn.Module) -> str:
    """The path of the module whose output is the ``(cos, sin)`` every layer is passed."""
    found = [
        name
        for name, module in model.named_modules()
        if name.endswith("rotary_emb") and "RotaryEmbedding" in type(module).__name__
    ]
    if len(found) != 1:
        raise ValueError(
            f"Expected one rotary embedding module for the whole model, found {found}: the "
            "closed form reads the (cos, sin) it passes every layer."
        )
    return found[0]
