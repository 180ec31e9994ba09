"""Closed-form sections between consecutive TransformerLens sites, found automatically.

Part of :mod:`degen_hooks.transformer_lens`; see its docstring. ``build_bases(...,
sections="auto")`` calls :func:`find_sections` for TransformerLens models.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from ..closed_form import MLPSection
from ..sites import Site, _unwrap
from ._attention import attention_section, attention_section_sites, unprefixed
from ._mlp import mlp_section, mlp_section_sites
from ._names import _NORMS, _cfg

_BLOCK = re.compile(r"blocks\.(\d+)\.(hook_resid_pre|hook_resid_mid|hook_resid_post)$")


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
    * ``blocks.L.hook_resid_mid -> blocks.L.hook_resid_post``: the residual MLP
      (:func:`~degen_hooks.transformer_lens.mlp_section`, derivative moments at
      ``blocks.L.mlp.hook_pre``), without a norm before the MLP and with the same positions
      on both sides (the MLP acts position by position);
    * the last block's ``hook_resid_post -> logits`` (the model output): the linear
      unembedding, without a final norm and with the same positions on both sides.

    A pair the closed forms do not cover (a norm before the MLP, rotary attention on a
    bridge, sites of different blocks, ...) is left out: ``build_bases`` runs backward passes there.

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


def _same_positions(a: Any, b: Any) -> bool:
    return (
        Site("a", positions=a).to_info()["positions"]
        == Site("b", positions=b).to_info()["positions"]
    )


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
        if not last or getattr(cfg, "normalization_type", None) in _NORMS:
            return None
        if not _same_positions(site.positions, output_positions):
            return None
        w_unembed = _unwrap(model)[0].unembed.W_U.detach().to(torch.float64).T  # (vocab, d)
        eye = torch.eye(w_unembed.shape[0], dtype=torch.float64)
        return MLPSection(w_unembed, eye, "identity"), None
    target_name = unprefixed(target, prefix)
    try:
        if role == "hook_resid_pre":
            if (name, target_name) != attention_section_sites(model, layer):
                return None
            return attention_section(model, layer), None
        if role == "hook_resid_mid":
            source, pre, out = mlp_section_sites(model, layer, residual=True)
            if (name, target_name) != (source, out):
                return None
            if not _same_positions(site.positions, target.positions):
                return None
            return mlp_section(model, layer, residual=True), Site(pre)
    except ValueError:  # a block the closed forms do not cover: backward passes instead
        return None
    return None
