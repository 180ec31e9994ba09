"""The TransformerLens family (``HookedTransformer``, ``TransformerBridge``) as an adapter.

Found by :func:`degen_hooks._family.family_of` for any model whose classes come from
``transformer_lens``; the implementation lives in :mod:`degen_hooks.transformer_lens`
(hook aliases, closed-form sections, weight processing).
"""

from __future__ import annotations

from ..transformer_lens import find_sections, record_metadata, site_modules, write_bypass

__all__ = ["find_sections", "record_metadata", "site_modules", "write_bypass"]
