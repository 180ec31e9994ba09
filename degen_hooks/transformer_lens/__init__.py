"""TransformerLens models as sites: hook names, aliases, MLP sections and processing flags.

TransformerLens (Nanda & Bloom) exposes every intermediate activation as a ``HookPoint``
module, so :func:`degen_hooks.collect` reads them like any other module. This module adds
what is specific to the two model families of TransformerLens 3:

* ``HookedTransformer``: hook names are ``named_modules()`` paths, nothing to translate.
* ``TransformerBridge``: hooks live on a component tree (``blocks.0.mlp.out.hook_in``) and
  the familiar names (``blocks.0.mlp.hook_post``) are *aliases* of those HookPoints.
  ``named_modules()`` reaches the components through ``_original_component`` paths, so the
  names users write are not module paths there. :func:`site_modules` lists every name a
  user may write (component paths and aliases) and :func:`resolve_alias` maps an alias to
  its component path. Statistics are keyed by the name the user asked for; one HookPoint
  is hooked once per requested name, so nothing is counted twice.

It also builds the closed-form MLP section of a block (:func:`mlp_section`, lib_math §12),
of its attention layer (:func:`attention_section`: one forward pass instead of backward
probes), of a norm and a plain or gated MLP, the MLP-internal sites and the final norm and
unembedding (:func:`block_mlp_section`, :func:`mlp_output_section`, :func:`unembed_section`),
and records TransformerLens weight processing (``fold_ln``,
``center_writing_weights``, ...), which changes the weights and therefore the coordinates
any basis is expressed in
(:func:`processing_flags`, :func:`record_metadata`).

Nothing in ``degen_hooks`` imports this module at import time, and it never imports
``transformer_lens`` itself: a model's family is told from ``sys.modules``, so
``import degen_hooks`` stays fast. Use it as ``from degen_hooks.transformer_lens import ...``.
"""

from __future__ import annotations

from ._attention import AttentionSection, attention_section, attention_section_sites
from ._blocks import block_mlp_section, mlp_output_section, unembed_section
from ._mlp import mlp_section, mlp_section_sites, mlp_sites
from ._names import is_bridge, is_transformer_lens, resolve_alias, site_modules, write_bypass
from ._processing import ProcessedWeightsWarning, processing_flags, record_metadata
from ._sections import find_sections

__all__ = [
    "AttentionSection",
    "ProcessedWeightsWarning",
    "attention_section",
    "attention_section_sites",
    "block_mlp_section",
    "find_sections",
    "is_bridge",
    "is_transformer_lens",
    "mlp_output_section",
    "mlp_section",
    "mlp_section_sites",
    "mlp_sites",
    "processing_flags",
    "record_metadata",
    "resolve_alias",
    "site_modules",
    "unembed_section",
    "write_bypass",
]
