"""Keeping ``torch.distributed`` ranks in step when one of them fails: nothing hangs.

Private helpers of :mod:`degen_hooks.distributed`. Before any data moves, the ranks meet in
:func:`_arrive`: a ``torch.distributed.monitored_barrier`` (gloo) with ``timeout`` (default:
the timeout the process group was created with, :func:`_timeout_of`), then one all-gather in
which every rank brings its error, if any. A rank that raised earlier, died or is stuck makes
the others raise :class:`~degen_hooks.DistributedError` naming it within ``timeout``; on NCCL,
which has no monitored barrier, the all-gather waits at most ``timeout`` (but cannot name the
absent ranks).

:func:`_guard_ranks` wraps an entry point such as :func:`~degen_hooks.build_bases`: with
``distributed=True``, a rank that raises mid-build (its data loader fails) joins the exchange
the others wait in with its error (:func:`_announce`), so they raise at once, quoting it.
Errors that left a collective (functions wrapped in :func:`_collective`, such as
:func:`~degen_hooks.all_reduce_`) are recorded in ``_COLLECTIVE_ERROR`` and not announced
again: every rank raised them already.
"""

from __future__ import annotations

import contextvars
import functools
import math
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch

from ._errors import DistributedError

_F = TypeVar("_F", bound=Callable[..., Any])

# Bytes of each rank's error message in the arrival exchange (longer messages are cut).
_MESSAGE_BYTES = 1024
# The last error that left all_reduce_: every rank raised it too or times out, so an entry
# point guarded by _guard_ranks must not announce it again (see _guard_ranks).
_COLLECTIVE_ERROR: contextvars.ContextVar[BaseException | None] = contextvars.ContextVar(
    "degen_hooks_collective_error", default=None
)


def _collective(func: _F) -> _F:
    """Record every error that leaves ``func`` (a collective) in ``_COLLECTIVE_ERROR``."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except Exception as err:
            _COLLECTIVE_ERROR.set(err)
            raise

    return wrapper  # type: ignore[return-value]


def _communication_device(dist: Any, group: Any) -> torch.device:
    # NCCL only moves CUDA tensors; gloo (and MPI) move CPU tensors.
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _timeout_of(dist: Any, group: Any, timeout: timedelta | float | None) -> timedelta:
    """``timeout`` as a ``timedelta``; ``None``: the timeout ``group`` was created with."""
    if timeout is None:
        return _group_timeout(dist, group)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float, timedelta)):
        raise TypeError(
            f"timeout must be a positive number of seconds or a datetime.timedelta, got "
            f"{timeout!r} ({type(timeout).__name__})."
        )
    seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(
            f"timeout must be a positive number of seconds or a datetime.timedelta, got "
            f"{timeout!r}. Pass None for the process group's timeout."
        )
    return timedelta(seconds=seconds)


def _group_timeout(dist: Any, group: Any) -> timedelta:
    """The timeout given to ``init_process_group`` / ``new_group`` for ``group``."""
    # monitored_barrier(timeout=None) would wait torch's default (30 min for gloo), not the
    # group's own timeout; the group's backend keeps the latter in its options.
    process_group = dist.group.WORLD if group is None else group
    try:
        backend = process_group._get_backend(_communication_device(dist, group))
        timeout = backend.options._timeout
    except (AttributeError, RuntimeError, TypeError):  # a backend without options
        timeout = None
    if isinstance(timeout, timedelta) and timeout.total_seconds() > 0:
        return timeout
    return dist.distributed_c10d._get_default_timeout(dist.get_backend(group))


def _arrive(
    dist: Any,
    group: Any,
    timeout: timedelta,
    rank: int,
    error: BaseException | None = None,
    caller: str = "all_reduce_",
    place: str | None = None,
) -> None:
    """Meet every rank within ``timeout`` and share which ones failed before getting here.

    ``caller`` names the public function in messages, ``place`` where ranks meet (default:
    ``caller``).

    Each rank contributes its error (``error``, or none) to one all-gather, so every rank takes
    the same branch: if any rank failed, every rank raises.

    Raises:
        DistributedError: If a rank did not arrive within ``timeout`` (on gloo the message
            names it), or, unless this rank brings an ``error`` of its own (it raises that
            next), if any rank arrived with an error (the message quotes each one).
    """
    world = dist.get_world_size(group)
    waited, place = f"{timeout.total_seconds():g} s", place or caller
    unchanged = " No statistics were changed." if caller == "all_reduce_" else ""
    late = (
        f"{caller} on rank {rank}: not every rank reached {place} within {waited} ({{err}}). "
        f"Another rank probably raised, died or hangs before the exchange: see its traceback."
        f"{unchanged}"
    )
    if str(dist.get_backend(group)) == "gloo":  # names the absent ranks; NCCL has no such call
        try:
            dist.monitored_barrier(group=group, timeout=timeout, wait_all_ranks=True)
        except RuntimeError as err:
            raise DistributedError(late.format(err=err)) from err
    text = b"" if error is None else f"{type(error).__name__}: {error}".encode()
    text = text[: _MESSAGE_BYTES - 1]
    local = torch.zeros(_MESSAGE_BYTES, dtype=torch.uint8)
    local[: len(text)] = torch.tensor(list(text), dtype=torch.uint8)
    device = _communication_device(dist, group)
    parts = [torch.empty(_MESSAGE_BYTES, dtype=torch.uint8, device=device) for _ in range(world)]
    try:
        work = dist.all_gather(parts, local.to(device), group=group, async_op=True)
        work.wait(timeout)
    except RuntimeError as err:
        raise DistributedError(late.format(err=err)) from err
    messages = [bytes(part.cpu().tolist()).rstrip(b"\0") for part in parts]
    failed = {r: m.decode(errors="replace") for r, m in enumerate(messages) if m}
    if failed and error is None:
        quoted = "; ".join(f"rank {r}: {message}" for r, message in failed.items())
        raise DistributedError(
            f"{caller} on rank {rank}: rank(s) {sorted(failed)} of {world} raised instead of "
            f"reaching {place} ({quoted}), so every rank stops here.{unchanged} See the "
            "traceback on those ranks."
        )


def _guard_ranks(func: _F) -> _F:
    """Make a failure on one rank of ``func(..., distributed=True)`` fail every rank.

    ``func`` is an entry point whose ``distributed=True`` runs call :func:`all_reduce_` with
    its ``group=`` and ``timeout=`` keywords. When one rank raises between two exchanges (its
    data loader fails mid-pass), it joins the exchange the other ranks wait in with its error,
    so they raise a :class:`DistributedError` quoting it at once rather than after the timeout
    (or, worse, meeting that rank's next exchange); it then raises its own error. Every rank
    meets once more at the end, so a failure after the last exchange reaches the others too.
    Errors that left :func:`all_reduce_` are not announced: every rank raised them already, or
    raises them within the timeout.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not kwargs.get("distributed", False):
            return func(*args, **kwargs)
        import torch.distributed as dist

        group, timeout, name = kwargs.get("group"), kwargs.get("timeout"), func.__name__
        token = _COLLECTIVE_ERROR.set(None)
        try:
            try:
                result = func(*args, **kwargs)
            except Exception as err:
                if not _from_collective(err, _COLLECTIVE_ERROR.get()):
                    _announce(dist, group, timeout, err, name)
                raise
            if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
                waited = _timeout_of(dist, group, timeout)
                rank, place = dist.get_rank(group), f"the end of {name}"
                _arrive(dist, group, waited, rank, caller=name, place=place)
            return result
        finally:
            _COLLECTIVE_ERROR.reset(token)

    return wrapper  # type: ignore[return-value]


def _from_collective(err: BaseException, collective: BaseException | None) -> bool:
    seen: BaseException | None = err
    while seen is not None:  # the entry point may have re-raised it with context
        if seen is collective:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _announce(dist: Any, group: Any, timeout: Any, error: Exception, caller: str) -> None:
    """Tell the other ranks, waiting in their next exchange, that this rank raised ``error``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return
    try:
        _arrive(dist, group, _timeout_of(dist, group, timeout), dist.get_rank(group), error, caller)
        return  # the others received this rank's error (and perhaps sent theirs)
    except DistributedError as err:
        note = (
            f"{caller} could not tell the other ranks of this error ({err}); they raise a "
            "DistributedError once their timeout expires."
        )
    except (TypeError, ValueError) as err:  # an invalid timeout: the others time out
        note = f"{caller} could not tell the other ranks of this error ({err})."
    if hasattr(error, "add_note"):  # Python >= 3.11
        error.add_note(note)
