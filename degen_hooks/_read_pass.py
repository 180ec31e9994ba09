"""One forward pass per batch that reads named sites, and stops once it has them (#16, #19).

The one reader of the closed forms: a section's Gram pass (attention, the norm and MLP) and
the interaction graph's edge reads run the model on a batch without gradients, keep each
named site's activation (detached), and end the pass as soon as every read (and the ``until``
site, when given) is in, by an exception raised in the last hook (as baukit's ``stop=True``),
unless the model output is wanted. A read that never runs, or runs twice in one pass (a
module called more than once), is refused rather than guessed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ._errors import ShapeMismatchError, SiteNotFiredError
from ._hooks import SiteHook
from .sites import Site, resolve_sites

__all__ = ["SiteReader"]

Forward = Callable[[nn.Module, Any], Any]


class _Done(Exception):  # noqa: N818 - control flow, never escapes SiteReader
    """Raised in a hook once the pass has read everything."""


def _call(model: nn.Module, batch: Any) -> Any:
    return model(batch)


class SiteReader:
    """Read ``reads`` (``{role: Site}``) in one forward pass of each batch.

    Args:
        model: The model.
        reads: The sites to read, by role.
        forward: ``forward(model, batch)``; default ``model(batch)``.
        until: A site the pass must also reach before it stops (its activation is returned
            apart: a later layer whose reads the caller needs); ``None``: none.
        output: Run the whole model and return its output (no early stop).
        what: Who reads, for messages (``"The attention section of 'blocks.0'"``).

    Raises:
        SiteNotFoundError: If a site names no module of the model.
    """

    def __init__(
        self,
        model: nn.Module,
        reads: Mapping[str, Site],
        forward: Forward | None = None,
        *,
        until: Site | None = None,
        output: bool = False,
        what: str = "A closed form",
    ) -> None:
        self.model, self.forward = model, forward or _call
        self.reads = dict(reads)
        self.resolved = {role: resolve_sites(model, [site])[0] for role, site in reads.items()}
        self.until = until
        self.resolved_until = None if until is None else resolve_sites(model, [until])[0]
        self.output, self.what = output, what

    def __call__(self, batch: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, Any]:
        """``({role: activation}, the until site's activation or None, the model output or
        None)`` of one batch, without gradients.

        Raises:
            SiteNotFiredError: If a read (or ``until``) never ran in the pass.
            ShapeMismatchError: If a read ran more than once in one pass.
        """
        captured: dict[str, torch.Tensor] = {}
        fired = dict.fromkeys(self.reads, 0)
        reached: list[torch.Tensor] = []

        def done() -> None:  # the pass may stop: every read and the last site are in
            if not self.output and all(fired.values()) and (self.until is None or reached):
                raise _Done

        with contextlib.ExitStack() as stack:
            for role, (resolved, module) in self.resolved.items():

                def keep(act: torch.Tensor, role: str = role) -> None:
                    fired[role] += 1
                    captured[role] = act.detach()
                    done()

                stack.enter_context(SiteHook(self.model, resolved, module, keep))
            if self.resolved_until is not None:
                # Not a read: a layer's hooks may fire after its output (a bridge fires
                # hook_pattern after hook_attn_out), so the pass waits for both.
                def last(act: torch.Tensor) -> None:
                    if not reached:
                        reached.append(act.detach())
                    done()

                stack.enter_context(SiteHook(self.model, *self.resolved_until, last))
            result = None
            with torch.no_grad(), contextlib.suppress(_Done):
                result = self.forward(self.model, batch)
        self._check(fired, reached)
        return captured, (reached[0] if reached else None), result

    def _check(self, fired: dict[str, int], reached: list[torch.Tensor]) -> None:
        twice = [self.reads[role].key for role, count in fired.items() if count > 1]
        missing = [self.reads[role].key for role, count in fired.items() if count == 0]
        if self.until is not None and not reached:
            missing.append(self.until.key)
        if missing:
            raise SiteNotFiredError(
                f"{self.what} reads {sorted(s.key for s in self.reads.values())}, but the "
                f"forward pass never reached {missing}: check the names, that "
                "forward(model, batch) runs them, and that the sites (node layers) are listed "
                "in forward order."
            )
        if twice:
            raise ShapeMismatchError(
                f"{self.what} reads {twice}, whose modules ran more than once in one forward "
                "pass: choose one call with Site(name, call=0) (or 1, ...), or pass "
                "sections=None for backward passes."
            )
