"""Attention layers in closed form: Jacobian Grams and interaction-graph edges (#16, #19).

The mathematics of one attention layer, shared by every model family:
:class:`AttentionSection` (:mod:`.section`) holds the weights and takes a batch's q, k, v and
pattern to its Jacobian Gram (:mod:`._gram`, :mod:`._gram_rotary`) and its edges
(:mod:`._edges`); :mod:`.rotary` rotates q and k. A family subclasses the section with what
its models hook (``degen_hooks.transformer_lens``, ``degen_hooks.families.transformers``).
"""

from __future__ import annotations

from .rotary import Rotary
from .section import AttentionSection

__all__ = ["AttentionSection", "Rotary"]
