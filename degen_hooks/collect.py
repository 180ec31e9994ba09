"""``collect()``: a context manager that streams statistics out of any model through hooks.

Forward hooks read activations at the chosen sites (detached, cast to float64) into
:class:`~degen_hooks.accumulators.Covariance` accumulators. With ``jacobians=...`` they also
capture each site's gradient edge, and ``run.backward(output)`` pushes probe vectors from a
target back to every site (see :mod:`degen_hooks.jacobians`), accumulating Jacobian Grams.
Every hook handle is owned by an ``ExitStack`` and removed on exit, even when the block
raises; hooks never change what the model computes.

A batch (one call of the model, plus its ``run.backward`` with Jacobians) updates every site
or none: when it fails part-way, a :class:`~degen_hooks._journal.Journal` puts back the
statistics of every site it touched.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge

from ._accumulator import unusable_rows
from ._backward import JacobianPass
from ._batch_boundaries import batch_boundaries, inside_call_of, model_class, why_no_grad
from ._compatibility import check_compatible, describe_readout, provenance
from ._errors import DegenHooksError, ShapeMismatchError, SiteNotFiredError
from ._family import family_hook
from ._hooks import SiteHook
from ._journal import Journal
from ._positions import describe_positions
from .accumulators import CoFiring, Covariance, SecondMoment
from .closed_form import activation_derivative
from .jacobians import Probe
from .sites import Site, _unwrap, resolve_sites
from .statistics import SiteStatistics, Statistics

__all__ = ["Collection", "collect"]


class Collection(JacobianPass):
    """The object bound by ``with dh.collect(...) as run``; see :func:`collect`.

    Attributes:
        stats: :class:`~degen_hooks.Statistics`, keyed by site; plain objects that stay
            valid after the block.
        sites: The resolved :class:`~degen_hooks.Site` objects.
    """

    def __init__(
        self,
        model: nn.Module,
        sites: str | Site | Iterable[str | Site],
        *,
        jacobians: Probe | str | None = None,
        n_probes: int = 1,
        target: str | Site | None = None,
        readout: torch.Tensor | None = None,
        target_positions: Any = None,
        firing: bool | float = False,
        derivatives: Mapping[str, str | Callable[[torch.Tensor], torch.Tensor]] | None = None,
        chunk: int | str = "auto",
        seed: int | None = 0,
        nonfinite: str = "raise",
        dtype: torch.dtype = torch.float64,
        stats: Statistics | None = None,
    ) -> None:
        self.model = model
        self._site_spec = sites
        try:
            self.jacobians = None if jacobians is None else Probe(jacobians)
        except ValueError:
            raise ValueError(
                f"Unknown jacobians={jacobians!r}. Choose None (activations only), 'exact', "
                "'rademacher' or 'gaussian'."
            ) from None
        if n_probes < 1:
            raise ValueError(
                f"n_probes must be at least 1, got {n_probes}. Use jacobians=None to skip "
                "Jacobian statistics."
            )
        self.n_probes = n_probes
        if chunk != "auto" and (not isinstance(chunk, int) or chunk < 1):
            raise ValueError(
                f"chunk must be 'auto' or at least 1 probe per backward pass, got {chunk!r}."
            )
        if readout is not None and (not isinstance(readout, torch.Tensor) or readout.ndim != 2):
            raise ShapeMismatchError(
                "readout must be a (d_target, r) matrix (torch.Tensor), got "
                f"{getattr(readout, 'shape', type(readout).__name__)}."
            )
        self._target_spec = target
        self.readout = readout
        self.target_positions = target_positions
        self.firing = firing
        self._derivative_spec = dict(derivatives or {})
        self.chunk = chunk
        self.seed = seed
        self.nonfinite = nonfinite
        self.dtype = dtype
        self.stats = stats if stats is not None else Statistics()
        self._stack: contextlib.ExitStack | None = None
        self._mask: torch.Tensor | None = None
        # Forward passes the current mask has served, and whether it is meant for every pass.
        self._mask_passes = 0
        self._mask_every_pass = False
        self._captures: dict[str, list[tuple[Any, torch.Tensor | None, Any]]] = {}
        self._target_captures: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self._no_grad_batches: dict[str, int] = {}
        self._no_grad_reason: dict[str, str] = {}
        self._pending_no_grad: set[str] = set()
        self._generator: torch.Generator | None = None
        self.sites: list[Site] = []
        # All-or-nothing batches: what the current batch changed, and how deep the model's
        # own forward call is (0 between batches).
        self._journal: Journal | None = None
        self._depth = 0
        # The site hooks, and whether a complete forward pass has been checked yet (every
        # site fired, at how many calls).
        self._site_hooks: list[SiteHook] = []
        self._inner_progress = False  # run.over shows a long batch's probe chunks
        self._checked_pass = False
        self._warned_axis: set[str] = set()

    # -- context management ---------------------------------------------------------------
    def __enter__(self) -> Collection:
        if self._stack is not None:
            raise DegenHooksError("This collection is already active; do not nest it in itself.")
        resolved = resolve_sites(self.model, self._site_spec)
        derivative_fns = {k: activation_derivative(v) for k, v in self._derivative_spec.items()}
        keys = {s.key for s, _ in resolved}
        unknown = set(derivative_fns) - keys
        if unknown:
            raise ShapeMismatchError(
                f"derivatives= names {sorted(unknown)}, which are not among the sites "
                f"{sorted(keys)}. Add them to the sites."
            )
        target = None
        if self._target_spec is not None:
            if self.jacobians is None:
                raise ValueError("target= only matters with jacobians='exact'/'rademacher'/...")
            target = resolve_sites(self.model, self._target_spec)[0]
        self.sites = [s for s, _ in resolved]
        self._init_stats(derivative_fns)
        self._journal, self._depth = Journal(self.stats), 0
        self._site_hooks, self._checked_pass, self._warned_axis = [], False, set()
        stack = contextlib.ExitStack()
        try:
            for site, module in resolved:
                hook = self._make_hook(site, derivative_fns.get(site.key))
                hooked = stack.enter_context(SiteHook(self.model, site, module, hook))
                self._site_hooks.append(hooked)
            if target is not None:
                self._target_site = target[0]
                stack.enter_context(SiteHook(self.model, *target, self._target_hook))
            # Registered last: the batch closes after every site hook (the model output's
            # too); it opens before them (a prepended pre-hook).
            boundaries = (self._batch_begins, self._batch_ends, self._abort_batch)
            stack.enter_context(batch_boundaries(self.model, *boundaries))
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()
        if self._journal is not None:
            # A forward pass that began and never ended raised (and was perhaps caught):
            # its batch is incomplete. Complete batches without a backward stay (warned).
            if exc_type is not None or self._depth > 0:
                self._abort_batch()
            self._journal.commit()
        # Drop references to the autograd graph so its memory is freed with the block.
        pending = {k for k, v in self._captures.items() if v}
        self._captures.clear()
        self._target_captures.clear()
        if exc_type is None and self.jacobians is not None:
            self._check_gradients_reached(pending)

    def _init_stats(self, derivative_fns: Mapping[str, Any]) -> None:
        threshold = None
        if self.firing is not False:
            threshold = 0.0 if self.firing is True else float(self.firing)
        kw = {"dtype": self.dtype, "nonfinite": self.nonfinite}
        fresh = Statistics(
            {
                site.key: SiteStatistics(
                    acts=Covariance(**kw),
                    grads=SecondMoment(**kw) if self.jacobians is not None else None,
                    firing=CoFiring(threshold=threshold, **kw) if threshold is not None else None,
                    derivs=Covariance(**kw) if site.key in derivative_fns else None,
                    info=site.to_info(),
                )
                for site in self.sites
            },
            dict(
                model=model_class(self.model),
                jacobians=None if self.jacobians is None else self.jacobians.value,
                n_probes=self.n_probes,
                target=_describe(self._target_spec),
                readout=describe_readout(self.readout),
                target_positions=describe_positions(self.target_positions),
                torch_version=torch.__version__,
            ),
        )
        record_metadata = family_hook(_unwrap(self.model)[0], "record_metadata")
        if record_metadata is not None:  # family settings, e.g. TransformerLens processing
            record_metadata(fresh, self.model, stacklevel=4)  # warns at the user's `with`
        resumed = [key for key in fresh if key in self.stats]
        for key in resumed:
            self._check_resumable(key, threshold, derivative_fns)
        if resumed:  # what the held numbers mean must be what this collection adds to them
            check_compatible(
                provenance(Statistics({k: self.stats[k] for k in resumed}, self.stats.metadata)),
                provenance(Statistics({k: fresh[k] for k in resumed}, fresh.metadata)),
                action="resume into the statistics passed as stats=",
                fix="resume with the arguments of the original dh.collect(...) call.",
            )
        for key in fresh:
            if key not in self.stats:
                self.stats[key] = fresh[key]
        calls = self.stats.metadata.get("n_backward_calls")
        self.stats.metadata.update(fresh.metadata, sites=list(self.stats))
        if calls is not None:
            self.stats.metadata["n_backward_calls"] = calls

    def _check_resumable(
        self, key: str, threshold: float | None, derivative_fns: Mapping[str, Any]
    ) -> None:
        held = self.stats[key]
        wanted = {
            "grads": self.jacobians is not None,
            "firing": threshold is not None,
            "derivs": key in derivative_fns,
        }
        differ = [kind for kind, on in wanted.items() if on != (getattr(held, kind) is not None)]
        if held.firing is not None and threshold is not None and held.firing.threshold != threshold:
            differ.append(f"firing threshold {held.firing.threshold} vs {threshold}")
        if differ:
            raise ShapeMismatchError(
                f"Cannot resume site {key!r}: the statistics passed as stats= were collected "
                f"with other settings ({', '.join(differ)}). Resume with the settings of the "
                "original collection (jacobians=, firing=, derivatives=)."
            )

    # -- hooks ----------------------------------------------------------------------------
    def _make_hook(self, site: Site, derivative: Callable | None) -> Callable[[torch.Tensor], None]:
        key = site.key

        def hook(act: torch.Tensor) -> None:
            try:
                update(act)
            except BaseException:
                # Every site of the batch goes back to its state before the batch.
                self._abort_batch()
                raise
            if self._depth == 0 and self.jacobians is None:
                self._journal.commit()  # a submodule called on its own: its own batch

        def update(act: torch.Tensor) -> None:
            site_stats = self.stats[key]
            mask = self._mask
            if site.feature_axis is None and act.ndim >= 4 and key not in self._warned_axis:
                self._warned_axis.add(key)
                warnings.warn(
                    f"Site {key!r} has activations of shape {tuple(act.shape)}: its features "
                    f"are taken on the last axis ({act.shape[-1]}) and every other axis "
                    "becomes samples. For a conv feature map (N, C, H, W) the features are "
                    f"the channels: Site({site.name!r}, feature_axis=1). If the last axis is "
                    "meant (per-head hooks (batch, pos, head, d_head): heads become samples), "
                    "say so with feature_axis=-1.",
                    stacklevel=2,
                )
            rows = site.rows(act.detach(), mask)
            if rows.shape[0] == 0:
                # No rows (an empty batch, a mask of padding only): no statistic changes and
                # n_batches does not count it; run.backward() of its output still finds the
                # edge, and adds nothing.
                if self.jacobians is not None and act.requires_grad:
                    edge = (get_gradient_edge(act), mask, act.shape, 0)
                    self._captures.setdefault(key, []).append(edge)
                return
            self._journal.touch(key)
            try:
                site_stats.acts.update(rows)
                clean = rows
                if self.nonfinite == "skip":
                    clean = rows[~unusable_rows(rows, self.dtype)]
                if site_stats.firing is not None:
                    site_stats.firing.update(clean)
                if derivative is not None:
                    site_stats.derivs.update(derivative(clean.to(self.dtype)))
            except DegenHooksError as err:
                raise type(err)(
                    f"Site {key!r}, batch {site_stats.n_batches} (activations of shape "
                    f"{tuple(act.shape)}, dtype {act.dtype}): {err}"
                ) from err
            site_stats.n_batches += 1
            if self.jacobians is not None:
                if act.requires_grad:
                    capture = (get_gradient_edge(act), mask, act.shape, rows.shape[0])
                    self._captures.setdefault(key, []).append(capture)
                else:
                    self._no_grad_batches[key] = self._no_grad_batches.get(key, 0) + 1
                    self._no_grad_reason[key] = why_no_grad(self.model)
                    self._pending_no_grad.add(key)

        return hook

    # -- batches: every site or none ----------------------------------------------------------
    def _batch_begins(self) -> None:
        if self._depth > 0 and not inside_call_of(self.model):
            # The model's last call never returned: it raised, and its batch is incomplete.
            self._abort_batch()
        if self._depth == 0 and self._mask is not None:
            self._mask_passes += 1
            if self._mask_passes == 2 and not self._mask_every_pass:
                warnings.warn(
                    "The mask set with run.set_mask() is used by a second forward pass: a "
                    "padding mask belongs to one batch, and a stale one selects the wrong "
                    "positions of a batch of the same shape. Call run.set_mask(mask) before "
                    "each forward pass (or pass mask= to run.over), or "
                    "run.set_mask(mask, every_pass=True) for a mask meant for every pass.",
                    stacklevel=3,
                )
        self._depth += 1

    def _batch_ends(self) -> None:
        self._depth = max(0, self._depth - 1)
        if self._depth == 0 and not self._checked_pass:
            self._checked_pass = True
            try:
                self._check_first_pass()
            except BaseException:
                self._abort_batch()
                raise
        if self._depth == 0 and self.jacobians is None:
            self._journal.commit()  # with Jacobians the batch ends with its run.backward()

    def _check_first_pass(self) -> None:
        """After the first forward pass: every site fired; warn of a module called twice."""
        silent = [h for h in self._site_hooks if not h.shapes]
        if silent:
            lines = []
            for hook in silent:
                calls = (
                    f"its module ran {hook.calls} time(s), but call={hook.site.call} was asked"
                    if hook.calls
                    else "its module never ran"
                )
                lines.append(f"{hook.site.key!r} ({calls})")
            raise SiteNotFiredError(
                f"The first forward pass of {type(self.model).__name__} did not reach site(s) "
                f"{', '.join(lines)}; the other sites fired. Their statistics would stay empty. "
                "Check that the model's forward runs these modules (a TransformerLens bridge "
                "alias that never fires is a known TransformerLens bug: use its component "
                "path, listed by dh.find_sites(model, '*')), or drop them from the sites."
            )
        for hook in self._site_hooks:
            if len(hook.shapes) > 1 and hook.site.call is None:
                shapes = ", ".join(str(s) for s in hook.shapes[:4])
                warnings.warn(
                    f"Site {hook.site.key!r}: its module ran {len(hook.shapes)} times in one "
                    f"forward pass (shapes {shapes}); the statistics merge every call. Read "
                    f"one call with Site({hook.site.name!r}, call=0) (or 1, ...), or pass "
                    "call='all' to merge them without this warning.",
                    stacklevel=4,
                )

    def _abort_batch(self) -> None:
        """Undo everything since the last complete batch (statistics and captured edges)."""
        self._journal.rollback()
        self._depth = 0
        self._captures.clear()
        self._target_captures.clear()
        self._pending_no_grad.clear()

    def _target_hook(self, act: torch.Tensor) -> None:
        if act.requires_grad:
            # A clone pins the value the target produced: a later in-place op would
            # otherwise make us differentiate the overwritten tensor.
            self._target_captures.append((act.clone(), self._mask))

    def set_mask(self, mask: torch.Tensor | None, *, every_pass: bool = False) -> None:
        """Keep only the ``True`` positions (shape ``(batch, pos)``) in following passes.

        Use it for padding: ``run.set_mask(attention_mask.bool())`` before each forward
        (``run.over(..., mask=...)`` does it for you). A mask left over from an earlier batch
        would silently select the wrong positions of a batch of the same shape, so a mask
        used by a second forward pass warns, unless ``every_pass=True`` says it is meant
        for every pass. ``None`` clears the mask.
        """
        self._mask = None if mask is None else torch.as_tensor(mask).bool()
        self._mask_passes, self._mask_every_pass = 0, every_pass

    # -- Jacobians ------------------------------------------------------------------------
    def _site(self, key: str) -> Site:
        return next(s for s in self.sites if s.key == key)

    # -- a loop driven by the library ---------------------------------------------------------
    def over(
        self,
        batches: Iterable[Any],
        *,
        forward: Callable[[nn.Module, Any], Any] | None = None,
        mask: Callable[[Any], torch.Tensor | None] | None = None,
        progress: bool = True,
        desc: str = "collect",
    ) -> Collection:
        """Run the model over ``batches`` (calling ``run.backward`` when Jacobians are on).

        Args:
            batches: Any iterable of model inputs.
            forward: ``forward(model, batch) -> output``; defaults to ``model(batch)``.
            mask: ``mask(batch) -> (batch, pos)`` boolean tensor of the positions to keep
                (padding is ``False``), set for each batch as :meth:`set_mask` does, e.g.
                ``lambda batch: batch["attention_mask"]``; cleared after the loop.
            progress: Show a tqdm progress bar.
            desc: Label of the progress bar.

        Returns:
            ``self``.
        """
        from tqdm.auto import tqdm

        call = forward or (lambda model, batch: model(batch))
        total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
        self._inner_progress = progress  # a long batch shows its probe chunks too
        try:
            for batch in tqdm(batches, desc=desc, total=total, disable=not progress, leave=False):
                if mask is not None:
                    self.set_mask(mask(batch))
                if self.jacobians is None:
                    with torch.no_grad():
                        call(self.model, batch)
                else:
                    self.backward(call(self.model, batch))
        finally:
            self._inner_progress = False
            if mask is not None:
                self.set_mask(None)
        return self


def collect(
    model: nn.Module, sites: str | Site | Iterable[str | Site], **kwargs: Any
) -> Collection:
    """Stream float64 statistics of ``sites`` while ``model`` runs inside the block.

    Args:
        model: Any ``nn.Module``: plain PyTorch, TransformerLens, DDP-wrapped.
        sites: Site names (dotted ``named_modules()`` paths or globs), filters over names
            (``lambda name: ...``), modules of the model, or :class:`~degen_hooks.Site`
            objects; one or a list.
        **kwargs: Keyword-only settings:

            * ``jacobians``: ``None`` (default, activations only), ``"exact"``,
              ``"rademacher"`` or ``"gaussian"``.
            * ``n_probes``: random probes per backward (default 1).
            * ``target``: a site to differentiate (local, LIB view); default: the model
              output passed to ``run.backward(output)`` (global view).
            * ``readout``: ``(d_target, r)`` matrix the target is read through (e.g. the
              next site's interaction basis ``C``).
            * ``target_positions``: positions of the target to probe.
            * ``firing``: ``True`` or a threshold: co-firing counts of ``act > threshold``.
            * ``derivatives``: ``{site: "relu" | "gelu" | ... | callable}``: moments of the
              activation derivative at pre-activation sites (MLP closed form).
            * ``chunk``: probes per batched backward, the memory bound; ``"auto"`` (default)
              keeps each batched gradient near 2**21 elements on a GPU, 2**19 on a CPU
              (1 to 64 probes).
            * ``seed``: seed of the random probes.
            * ``nonfinite``: ``"raise"`` (default) or ``"skip"``.
            * ``stats``: existing :class:`~degen_hooks.Statistics` to continue (resume).

    Returns:
        A :class:`Collection`; use it as a context manager.

    Examples:
        >>> import torch, degen_hooks as dh
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
        >>> x = torch.randn(32, 3)
        >>> with dh.collect(model, ["0"]) as run:
        ...     _ = model(x)
        >>> run.stats["0"].acts.cov().shape
        torch.Size([4, 4])
    """
    return Collection(model, sites, **kwargs)


def _describe(target: str | Site | None) -> str | None:
    return target.key if isinstance(target, Site) else target
