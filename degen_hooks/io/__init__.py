"""Save and load results: safetensors for tensors, a JSON header for everything else.

``dh.save(obj, path)`` writes a *directory*::

    path/
      meta.json             format_version, versions, type, layout, summary, fingerprint
      tensors.safetensors   every tensor, bit for bit (no pickle anywhere)

A directory rather than one file keeps ``meta.json`` readable with any text tool (``cat``,
``jq``) and leaves room for later formats to add files. ``meta.json`` records the byte size and
SHA-256 of the tensor file, and ``"meta_sha256"``, a SHA-256 of its own content: every byte
:func:`load` uses is checked, so truncation, corruption and edits (of a dtype, a dead neuron,
any field) are refused before anything is rebuilt. Loading never unpickles: a pickle /
``torch.save`` file given by mistake is recognised by its magic bytes and refused with a message.

Saves are atomic: the directory is written under a unique temporary name beside ``path`` and
renamed into place, so concurrent saves to one path leave one complete save of one of them, and
a failure is a :class:`SaveError` (an ``OSError``), never a half-written directory.

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

from ._files import SaveError, SaveExistsError, load, save
from ._fingerprint import check_fingerprint, fingerprint
from ._metadata import FORMAT_VERSION, read_metadata
from ._metadata import META_FILE as META_FILE
from ._metadata import TENSORS_FILE as TENSORS_FILE
from ._metadata import _sha256 as _sha256
from ._metadata import _write_metadata as _write_metadata
from ._registry import register

__all__ = [
    "FORMAT_VERSION",
    "SaveError",
    "SaveExistsError",
    "check_fingerprint",
    "fingerprint",
    "load",
    "read_metadata",
    "register",
    "save",
]
