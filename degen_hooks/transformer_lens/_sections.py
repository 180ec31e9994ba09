"""Closed-form sections between consecutive TransformerLens sites, found automatically.

Part of :mod:`degen_hooks.transformer_lens`; see its docstring. ``build_bases(...,
sections="auto")`` calls :func:`find_sections` for TransformerLens models.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from .._positions import same_positions
from ..sites import Site, _unwrap
from ._attention import attention_section, attention_section_sites, unprefixed
from ._blocks import block_mlp_section, mlp_output_section, unembed_section
from ._mlp import mlp_section, mlp_section_sites
from ._names import _NORMS, _cfg

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
    * ``blocks.L.hook_resid_mid -> blocks.L.hook_resid_post``: the residual MLP: without a
      norm before a plain MLP :func:`~degen_hooks.transformer_lens.mlp_section` (derivative
      moments at ``blocks.L.mlp.hook_pre``), else, after a LayerNorm/RMSNorm or gated
      (SwiGLU, GeGLU), :func:`~degen_hooks.transformer_lens.block_mlp_section` (a forward
      pass of its own);
    * ``blocks.L.hook_resid_mid -> blocks.L.mlp.hook_pre`` / ``mlp.hook_post``: the norm and
      the input projection (and the activation);
    * ``blocks.L.mlp.hook_post -> blocks.L.hook_resid_post`` (and ``mlp.hook_pre`` of a plain
      MLP): :func:`~degen_hooks.transformer_lens.mlp_output_section`;
    * the last block's ``hook_resid_post -> logits`` (the model output): the unembedding,
      after the final norm if there is one
      (:func:`~degen_hooks.transformer_lens.unembed_section`).

    Every pair but the attention's needs the same positions on both sides (the sections act
    position by position). A pair the closed forms do not cover (attention with a norm of
    the whole q and k projections, sites of different blocks, ...) is left out:
    ``build_bases`` runs backward passes there.

    Returns:
        ``{site key: (section, pre-activation site or None)}``, as ``build_bases(sections=)``
        takes it.
    """
    _, prefix = _unwrap(model)
    cfg = _cfg(model)
    found: dict[str, tuple[Any, Site | None]] = {}
    targets: list[Site | None] = [*sites[1:], output]
    for site, target in zip(sites, targets, strict=True):
        section = _section_between(model, cfg, site, target, output_positions, prefix)
        if section is not None:
            found[site.key] = section
    return found


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
            plain = getattr(cfg, "normalization_type", None) not in _NORMS and not getattr(
                cfg, "gated_mlp", False
            )
            if not plain:
                return block_mlp_section(model, layer, output="hook_resid_post"), None
            _, pre, _ = mlp_section_sites(model, layer, residual=True)
            return mlp_section(model, layer, residual=True), Site(pre)
        if role == "hook_resid_mid" and target_role in ("mlp.hook_pre", "mlp.hook_post"):
            return block_mlp_section(model, layer, output=target_role[4:]), None
        if role in ("mlp.hook_post", "mlp.hook_pre") and target_role == "hook_resid_post":
            section = mlp_output_section(model, layer, source=role[4:])
            return section, (None if section.is_linear else Site(name))
    except ValueError:  # a block the closed forms do not cover: backward passes instead
        return None
    return None
