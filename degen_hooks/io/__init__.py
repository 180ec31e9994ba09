"""Save and load results: safetensors for tensors, a JSON header for everything else.

``dh.save(obj, path)`` writes a *directory*::

    path/
      meta.json             format_version, versions, type, layout, summary, fingerprint
      tensors.safetensors   every tensor, bit for bit (no pickle anywhere)

A directory rather than one file keeps ``meta.json`` readable with any text tool (``cat``,
``jq``) and leaves room for later formats to add files. ``meta.json`` records the byte size and
SHA-256 of the tensor file, so truncation and corruption are caught before anything is parsed.
Loading never unpickles: a pickle / ``torch.save`` file given by mistake is recognised by its
magic bytes and refused with a message.

What can be saved is decided by a registry ``{type name: (class, to_parts, from_parts)}``:

* ``to_parts(obj) -> (tensors, layout)``: a flat ``{name: Tensor}`` dict and a JSON-able dict.
* ``from_parts(tensors, layout) -> obj``: rebuilds the object.

:class:`~degen_hooks.Statistics` and the accumulators are registered here (they sit below this
package). Higher modules are *not* imported by this package at import time: the built-in types
above it (``InteractionBasis``, ``SynchronizedNeurons``, ``InteractionGraph``, ``LLCResult``)
are listed by import path in ``_DEFERRED`` and imported the first time they are needed, using
their ``state_dict()`` / ``metadata()`` / ``from_state_dict`` (or ``from_state``) methods. Other
code registers its own classes with :func:`register`.
"""

from __future__ import annotations

from ._files import load, save
from ._fingerprint import check_fingerprint, fingerprint
from ._metadata import FORMAT_VERSION, read_metadata
from ._metadata import META_FILE as META_FILE
from ._metadata import TENSORS_FILE as TENSORS_FILE
from ._metadata import _sha256 as _sha256
from ._registry import register

__all__ = [
    "FORMAT_VERSION",
    "check_fingerprint",
    "fingerprint",
    "load",
    "read_metadata",
    "register",
    "save",
]
