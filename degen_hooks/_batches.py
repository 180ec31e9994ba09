"""Batches that an entry point iterates more than once.

:func:`~degen_hooks.build_bases` runs one pass over its data per layer, and the ablation
curves and the LLC sampler re-run theirs for every evaluation. A generator or any other
one-shot iterator is exhausted by the first pass: later passes would silently see nothing.
:func:`require_reiterable` refuses such data before any pass runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["require_reiterable"]


def require_reiterable(data: Iterable[Any], *, caller: str, n_passes: int | None = None) -> None:
    """Refuse a one-shot iterator (``iter(data) is data``) that would be iterated again.

    Args:
        data: The batches given to ``caller``.
        caller: The public function, as the user called it (``"build_bases"``).
        n_passes: How many passes ``caller`` makes over ``data`` (for the message); ``None``
            for "several".

    Raises:
        ValueError: If ``data`` is an iterator (a generator, ``iter(...)``, ``map(...)``,
            a file object, ...).

    Examples:
        >>> require_reiterable([1, 2], caller="build_bases")  # a list: fine
        >>> require_reiterable(iter([1, 2]), caller="build_bases")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: build_bases makes several passes over data, ...
    """
    if not isinstance(data, Iterator):
        return
    passes = "several passes" if n_passes is None else f"{n_passes} passes"
    raise ValueError(
        f"{caller} makes {passes} over data, but data is a one-shot iterator "
        f"({type(data).__name__}): every pass after the first would see no batches. Pass a "
        "re-iterable instead: a list of batches (list(data), or x.split(batch_size)) or a "
        "torch DataLoader."
    )
