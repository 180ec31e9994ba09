"""Closed-form sections between consecutive TransformerLens sites, found automatically.

Part of :mod:`degen_hooks.transformer_lens`; see its docstring. ``build_bases(...,
sections="auto")`` calls :func:`find_sections` for TransformerLens models.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from .._positions import same_positions
from .._user_hooks import leave_hooked
from ..sites import Site, _unwrap
from ._attention import attention_section, attention_section_sites, unprefixed
from ._blocks import block_mlp_section, mlp_output_section, unembed_section
from ._names import _cfg

_BLOCK = re.compile(
    r"blocks\.(\d+)\.(hook_resid_pre|hook_resid_mid|hook_resid_post|mlp\.hook_pre|mlp\.hook_post)$"
)


def find_sections(
    model: nn.Module,
    sites: list[Site],
    output: Site | None = None,
    output_positions: Any = None,
) -> dict[str, tuple[Any, Site | None]]:
    """Closed-form sections between consecutive residual-stream sites of a TransformerLens model.

    Recognised, for each site and the next one (the last site's next is ``output``, or the
    model output at ``output_positions`` when ``output`` is ``None``):

    * ``blocks.L.hook_resid_pre -> blocks.L.hook_resid_mid`` (``hook_resid_post`` in
      attention-only models): :func:`~degen_hooks.transformer_lens.attention_section`, any
      positions on either side;
    * ``blocks.L.hook_resid_mid -> blocks.L.hook_resid_post``: the residual MLP, plain or
      gated (SwiGLU, GeGLU), after a LayerNorm/RMSNorm or none:
      :func:`~degen_hooks.transformer_lens.block_mlp_section` (a forward pass of its own,
      which checks the model's ``mlp.hook_post`` and ``hook_resid_post`` each batch);
    * ``blocks.L.hook_resid_mid -> blocks.L.mlp.hook_pre`` / ``mlp.hook_post``: the norm and
      the input projection (and the activation);
    * ``blocks.L.mlp.hook_post -> blocks.L.hook_resid_post`` (and ``mlp.hook_pre`` of a plain
      MLP): :func:`~degen_hooks.transformer_lens.mlp_output_section`;
    * the last block's ``hook_resid_post -> logits`` (the model output): the unembedding,
      after the final norm if there is one
      (:func:`~degen_hooks.transformer_lens.unembed_section`).

    Every pair but the attention's needs the same positions on both sides (the sections act
    position by position). A pair whose layer carries a hook of the user's (on ``attn``,
    ``ln1``, ``mlp``, ``ln2``, ``hook_attn_out``, ``hook_mlp_out``, ``ln_final`` or
    ``unembed``) is left out with a warning: the closed form cannot see what a hook does to
    the Jacobian (``act.detach()`` keeps the values), backward passes follow it. A pair the
    closed forms do not cover (attention with a norm of the whole q and k projections, sites
    of different blocks, ...) is left out: ``build_bases`` runs backward passes there.

    Returns:
        ``{site key: (section, pre-activation site or None)}``, as ``build_bases(sections=)``
        takes it.
    """
    _, prefix = _unwrap(model)
    cfg = _cfg(model)
    found: dict[str, tuple[Any, Site | None]] = {}
    targets: list[Site | None] = [*sites[1:], output]
    inner = _unwrap(model)[0]
    for site, target in zip(sites, targets, strict=True):
        section = _section_between(model, cfg, site, target, output_positions, prefix)
        if section is None:
            continue
        pair = f"{site.key} -> {'the output' if target is None else target.key}"
        if leave_hooked(inner, pair, _span(unprefixed(site, prefix), target is None)):
            continue  # backward passes follow the user's hook
        found[site.key] = section
    return found


def _span(name: str, to_output: bool) -> list[str]:
    """The modules between a site and the next one whose hooks the closed form cannot see."""
    if to_output:
        return ["ln_final", "unembed"]
    match = _BLOCK.match(name)
    if match is None:
        return []
    block, role = f"blocks.{match.group(1)}.", match.group(2)
    if role == "hook_resid_pre":  # attention
        parts = ["ln1", "attn", "hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input"]
        return [block + part for part in (*parts, "hook_attn_out")]
    return [block + part for part in ("ln2", "mlp", "hook_mlp_in", "hook_mlp_out")]


def _section_between(
    model: nn.Module,
    cfg: Any,
    site: Site,
    target: Site | None,
    output_positions: Any,
    prefix: str,
) -> tuple[Any, Site | None] | None:
    if site.io != "output" or (target is not None and target.io != "output"):
        return None
    name = unprefixed(site, prefix)
    match = _BLOCK.match(name)
    if match is None:
        return None
    layer, role = int(match.group(1)), match.group(2)
    if target is None:  # the model output: the unembedding after the last block
        last = role == "hook_resid_post" and layer == int(cfg.n_layers) - 1
        if not last or not same_positions(site.positions, output_positions):
            return None
        return unembed_section(model), None
    target_name = unprefixed(target, prefix)
    block = f"blocks.{layer}."
    target_role = target_name[len(block) :] if target_name.startswith(block) else None
    if target_name == f"blocks.{layer + 1}.hook_resid_pre":  # the same tensor
        target_role = "hook_resid_post"
    try:
        if role == "hook_resid_pre":
            if (name, target_name) != attention_section_sites(model, layer):
                return None
            return attention_section(model, layer), None
        if not same_positions(site.positions, target.positions):
            return None
        if role == "hook_resid_mid" and target_role == "hook_resid_post":
            # Normed, gated or plain: a pass of its own that checks the model's hidden
            # activation and output (a hook there is refused, not ignored).
            return block_mlp_section(model, layer, output="hook_resid_post"), None
        if role == "hook_resid_mid" and target_role in ("mlp.hook_pre", "mlp.hook_post"):
            return block_mlp_section(model, layer, output=target_role[4:]), None
        if role in ("mlp.hook_post", "mlp.hook_pre") and target_role == "hook_resid_post":
            section = mlp_output_section(model, layer, source=role[4:])
            return section, (None if section.is_linear else Site(name))
    except ValueError:  # a block the closed forms do not cover: backward passes instead
        return None
    return None
