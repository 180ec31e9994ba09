"""Exceptions raised by degen_hooks.

Every error the library raises derives from :class:`DegenHooksError`, and each subclass also
inherits the builtin it refines (``SiteNotFoundError`` is a ``KeyError``), so callers can catch
either. Messages say what was wrong, with the values, and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "DegenHooksError",
    "DistributedError",
    "DivergenceError",
    "EmptyStatisticsError",
    "FormatError",
    "GradientError",
    "NonFiniteError",
    "NotFittedError",
    "SaveError",
    "SaveExistsError",
    "ShapeMismatchError",
    "SiteNotFoundError",
    "SiteNotFiredError",
    "StatisticsTooLargeError",
    "UnsupportedDtypeError",
]


class DegenHooksError(Exception):
    """Base class of every error raised by degen_hooks."""


class SiteNotFoundError(DegenHooksError, KeyError):
    """A site name does not name a module of the model (or a key of the statistics)."""

    def __str__(self) -> str:
        # KeyError.__str__ wraps the message in quotes; keep the message readable.
        return str(self.args[0]) if self.args else ""


class ShapeMismatchError(DegenHooksError, ValueError):
    """Widths, shapes or sites that must agree do not."""


class SiteNotWritableError(DegenHooksError, ValueError):
    """A write at a site could not reach every consumer of its tensor (refused instead)."""


class UnsupportedDtypeError(DegenHooksError, TypeError):
    """A site's tensor is complex or integer: it has no real features to take moments of."""


class SiteNotFiredError(DegenHooksError, RuntimeError):
    """A requested site was not reached by a forward pass of the model."""


class NonFiniteError(DegenHooksError, ValueError):
    """Activations or gradients contain NaN or infinite values."""


class EmptyStatisticsError(DegenHooksError, ValueError):
    """A statistic was asked of an accumulator that has seen no samples."""


class GradientError(DegenHooksError, RuntimeError):
    """Jacobian statistics were requested but gradients could not reach a site."""


class NotFittedError(DegenHooksError, AttributeError):
    """An estimator was used before ``fit``."""


class FormatError(DegenHooksError, ValueError):
    """A saved file is corrupted, truncated, of an unknown version or of another model."""


class DivergenceError(DegenHooksError, RuntimeError):
    """A sampler diverged: its loss became NaN, infinite or exploded."""


class DistributedError(DegenHooksError, RuntimeError):
    """A collective operation failed: a rank raised, died, timed out or disagreed."""


class StatisticsTooLargeError(DegenHooksError, MemoryError):
    """Statistics would not fit in the memory of their device (raised before allocating)."""


class SaveError(DegenHooksError, OSError):
    """A save could not be written (an unwritable or full disk, a path that cannot be a folder)."""


class SaveExistsError(SaveError, FileExistsError):
    """The save path is taken by something :func:`~degen_hooks.save` may not replace."""
