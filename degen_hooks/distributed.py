"""Combine statistics across ``torch.distributed`` ranks: every rank ends with the union.

Each rank streams its own shard of the data (``with dh.collect(...)``, typically on a DDP-wrapped
model); :func:`all_reduce_` then replaces every rank's statistics, in place, by the statistics
of the union of all shards, exactly as if one process had seen every sample:

* :class:`~degen_hooks.Covariance`: an exact parallel (Chan et al. 1979) merge in two sums.
  First ``W = sum_r w_r`` and ``sum_r w_r mu_r`` give the global mean ``mu``; then
  ``M2 = sum_r [M2_r + w_r (mu_r - mu)(mu_r - mu)^T]``. Moments stay centred, nothing is
  averaged, and memory is one extra ``(d, d)`` buffer whatever the number of ranks.
* :class:`~degen_hooks.SecondMoment` and :class:`~degen_hooks.CoFiring`: sums.
* sample, skip and batch counters: exact int64 sums.

All ranks end with bitwise-identical results: each computes them from the same reduced sums.

Failures never hang. Before any data moves, the ranks meet in
``torch.distributed.monitored_barrier`` (gloo) with ``timeout`` (default: the timeout the
process group was created with): a rank that raised earlier, died or is stuck makes the others
raise :class:`DistributedError` naming it within ``timeout``. :func:`~degen_hooks.build_bases`
goes further: a rank that raises mid-build (its data loader fails) joins the exchange the
others wait in with its error, so they raise at once, quoting it.
Then every rank contributes an error flag and a digest of its statistics' layout in one
all-gather, so a rank whose statistics are invalid (wrong type, other sites, other widths or
thresholds) makes *every* rank raise the same clear error instead of exchanging misaligned
buffers. On NCCL, which has no monitored barrier, the first all-gather waits at most
``timeout`` (but cannot name the absent ranks).

This module holds :func:`all_reduce_` and its exchanges: the layout checks, the width
agreement and the two-sum reduction. Meeting the other ranks within ``timeout`` and failing
every rank when one fails (:func:`_guard_ranks`, the arrival exchange) live in
:mod:`degen_hooks._rank_guard`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch

from ._compatibility import first_difference, provenance
from ._errors import DistributedError, ShapeMismatchError

# Defined in _rank_guard; ``X as X`` keeps the ones unused here importable from here.
from ._rank_guard import _COLLECTIVE_ERROR as _COLLECTIVE_ERROR
from ._rank_guard import _MESSAGE_BYTES as _MESSAGE_BYTES
from ._rank_guard import _announce as _announce
from ._rank_guard import _arrive, _collective, _communication_device, _timeout_of
from ._rank_guard import _from_collective as _from_collective
from ._rank_guard import _group_timeout as _group_timeout
from ._rank_guard import _guard_ranks as _guard_ranks
from .accumulators import CoFiring, Covariance, SecondMoment
from .statistics import SiteStatistics, Statistics

__all__ = ["DistributedError", "all_reduce_"]

_T = TypeVar("_T", Covariance, SecondMoment, CoFiring, Statistics)
_Acc = Covariance | SecondMoment | CoFiring


@_collective
def all_reduce_(
    stats: _T,
    group: Any = None,
    *,
    timeout: timedelta | float | None = None,
) -> _T:
    """Replace ``stats`` on every rank, in place, by the statistics of all ranks' data.

    Call it on every rank of ``group`` with statistics collected with the same settings (same
    sites, kinds and, once any rank has seen data, widths). A rank that saw no data may hold
    empty accumulators; it contributes nothing and receives the union.

    Args:
        stats: A :class:`~degen_hooks.Statistics` (every site and kind is combined), or a
            single :class:`~degen_hooks.Covariance`, :class:`~degen_hooks.SecondMoment` or
            :class:`~degen_hooks.CoFiring`.
        group: The ``torch.distributed`` process group; the default group when ``None``.
        timeout: How long a rank waits for the others to arrive before raising (a
            ``timedelta`` or a positive number of seconds); default: the timeout ``group``
            was created with (``init_process_group(timeout=...)`` or
            ``new_group(timeout=...)``), not torch's 30-minute default. On gloo a
            ``monitored_barrier`` enforces it and names the absent ranks; on NCCL the first
            all-gather waits at most ``timeout``. Once every rank has arrived, the
            exchanges themselves are bounded by the process group's timeout.

    Returns:
        ``stats`` itself, now holding the union (identical on every rank). A
        ``Statistics``' ``metadata`` and ``info`` stay as they were on each rank.

    Raises:
        DistributedError: If ``torch.distributed`` is not initialised, a rank did not arrive
            within ``timeout`` (it raised, died or hangs), the exchange failed, or ``stats``
            is of an unsupported type on some rank.
        TypeError: If ``timeout`` is neither a number nor a ``timedelta``.
        ValueError: If ``timeout`` is not positive.
        ShapeMismatchError: If ranks hold statistics of different sites, kinds, widths or
            firing thresholds (raised on every rank).

    Examples:
        >>> import torch.distributed as dist  # doctest: +SKIP
        >>> dist.init_process_group("gloo", timeout=timedelta(seconds=60))  # doctest: +SKIP
        >>> with dh.collect(ddp_model, ["module.layers.1"]) as run:  # doctest: +SKIP
        ...     run.over(my_shard_of_the_data)
        >>> dh.all_reduce_(run.stats, timeout=30)  # doctest: +SKIP
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise DistributedError(
            "all_reduce_ needs an initialised torch.distributed process group: call "
            "torch.distributed.init_process_group('gloo' or 'nccl', ...) on every rank first."
        )
    timeout = _timeout_of(dist, group, timeout)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    try:
        entries = _entries(stats)
        local_error: Exception | None = None
    except DistributedError as err:
        entries, local_error = [], err
    # Sorted like the entries, so ranks that built their sites in another order still agree.
    sites = [stats[k] for k in sorted(stats)] if isinstance(stats, Statistics) else []
    if world == 1:
        if local_error is not None:
            raise local_error
        return stats
    device = _communication_device(dist, group)
    _arrive(dist, group, timeout, rank)
    # One all-gather of (error flag, layout digest) so that every rank takes the same branch.
    signature = _signature(entries)
    record = provenance(stats) if isinstance(stats, Statistics) else None
    header = torch.tensor(
        [int(local_error is not None), signature, _digest(record)], dtype=torch.int64
    )
    headers = _all_gather(dist, group, header, world, device, "status")
    failed = [r for r in range(world) if headers[r, 0] != 0]
    if failed:
        message = (
            f"all_reduce_: rank(s) {failed} of {world} were given statistics they cannot "
            f"combine, so no rank changed its statistics (this is rank {rank})."
        )
        if local_error is not None:
            raise DistributedError(f"{message} Here: {local_error}") from local_error
        raise DistributedError(f"{message} See the error raised on rank(s) {failed}.")
    digests = headers[:, 1].tolist()
    if len(set(digests)) > 1:
        groups = {d: [r for r in range(world) if digests[r] == d] for d in digests}
        raise ShapeMismatchError(
            f"all_reduce_: ranks hold statistics of different layouts (ranks grouped by "
            f"layout: {list(groups.values())}; this is rank {rank}, holding "
            f"{_describe(entries)}). Collect with the same sites, settings and firing "
            "threshold on every rank."
        )
    if len(set(headers[:, 2].tolist())) > 1:
        _refuse_other_settings(dist, group, record, headers[:, 2].tolist(), world, device, rank)
    _agree_on_widths(dist, group, entries, world, device, rank)
    _reduce(dist, group, entries, sites, device)
    return stats


def _entries(stats: Any) -> list[tuple[str, str, _Acc]]:
    """``(site, kind, accumulator)`` triples in a fixed order (the same on every rank)."""
    if isinstance(stats, (Covariance, SecondMoment, CoFiring)):
        return [("", type(stats).__name__, stats)]
    if isinstance(stats, Statistics):
        return [
            (key, kind, acc)
            for key in sorted(stats)
            for kind, acc in sorted(stats[key].accumulators().items())
        ]
    raise DistributedError(
        f"all_reduce_ combines Statistics, Covariance, SecondMoment or CoFiring, got "
        f"{type(stats).__name__}."
    )


def _signature(entries: Sequence[tuple[str, str, _Acc]]) -> int:
    """A 63-bit digest of what each rank holds (sites, kinds, classes, thresholds)."""
    layout = [
        (key, kind, type(acc).__name__, getattr(acc, "threshold", None))
        for key, kind, acc in entries
    ]
    digest = hashlib.sha256(json.dumps(layout).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _digest(record: Any) -> int:
    digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _refuse_other_settings(
    dist: Any,
    group: Any,
    record: dict[str, Any],
    digests: list[int],
    world: int,
    device: torch.device,
    rank: int,
) -> None:
    """Every rank knows the settings differ: share them, and raise naming both values."""
    text = json.dumps(record, sort_keys=True).encode()
    size = _all_gather(dist, group, torch.tensor([len(text)]), world, device, "settings")
    buffer = torch.zeros(int(size.max()), dtype=torch.uint8)
    buffer[: len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    texts = _all_gather(dist, group, buffer, world, device, "settings")
    other = next(r for r in range(world) if digests[r] != digests[rank])
    theirs = json.loads(bytes(texts[other, : int(size[other])].tolist()).decode())
    where, ours, other_value = first_difference(record, theirs) or ("a setting", record, theirs)
    raise ShapeMismatchError(
        f"all_reduce_: ranks collected their statistics with different settings, so no rank "
        f"changed its statistics: {where} is {ours!r} on rank {rank} and {other_value!r} on "
        f"rank {other}. Call dh.collect(...) with the same arguments on every rank."
    )


def _describe(entries: Sequence[tuple[str, str, _Acc]]) -> str:
    return ", ".join(f"{key or '<accumulator>'}/{kind}(d={acc.d})" for key, kind, acc in entries)


def _all_gather(
    dist: Any, group: Any, tensor: torch.Tensor, world: int, device: torch.device, what: str
) -> torch.Tensor:
    tensor = tensor.to(device)
    parts = [torch.empty_like(tensor) for _ in range(world)]
    _guarded(dist.all_gather, parts, tensor, group=group, what=what)
    return torch.stack(parts).cpu()


def _all_reduce(dist: Any, group: Any, tensor: torch.Tensor, what: str) -> None:
    _guarded(dist.all_reduce, tensor, op=dist.ReduceOp.SUM, group=group, what=what)


def _guarded(fn: Any, *args: Any, what: str, **kwargs: Any) -> None:
    try:
        fn(*args, **kwargs)
    except RuntimeError as err:  # DistBackendError is a RuntimeError
        raise DistributedError(
            f"all_reduce_: the {what} exchange between ranks failed ({err}). Another rank "
            "probably raised or died mid-exchange: see its traceback. The statistics on "
            "this rank were not changed (results are written back only after every exchange)."
        ) from err


def _agree_on_widths(
    dist: Any,
    group: Any,
    entries: Sequence[tuple[str, str, _Acc]],
    world: int,
    device: torch.device,
    rank: int,
) -> None:
    """Gather every accumulator's width; allocate empty ones at the common width."""
    if not entries:
        return
    local = torch.tensor([-1 if acc.d is None else acc.d for _, _, acc in entries])
    widths = _all_gather(dist, group, local, world, device, "width")
    for i, (key, kind, acc) in enumerate(entries):
        seen = {int(w) for w in widths[:, i].tolist() if w >= 0}
        if len(seen) > 1:
            per_rank = {r: int(widths[r, i]) for r in range(world)}
            raise ShapeMismatchError(
                f"all_reduce_: {key or '<accumulator>'}/{kind} has different widths on "
                f"different ranks ({per_rank}, -1 = no data yet; this is rank {rank}). "
                "Collect the same sites of the same model on every rank."
            )
        if seen and acc.d is None:
            acc._allocate(seen.pop(), acc.device or torch.device("cpu"))


def _reduce(
    dist: Any,
    group: Any,
    entries: Sequence[tuple[str, str, _Acc]],
    sites: Sequence[SiteStatistics],
    device: torch.device,
) -> None:
    """The data exchange proper: an int64 sum of counters and two float64 sums."""
    allocated = [(k, kind, acc) for k, kind, acc in entries if acc.d is not None]
    f64 = {"dtype": torch.float64, "device": device}

    counters = [(acc.n_samples, acc.n_skipped) for _, _, acc in entries]
    n_batches = [site.n_batches for site in sites]
    ints = torch.tensor([v for pair in counters for v in pair] + n_batches, dtype=torch.int64)
    ints = ints.to(device)
    _all_reduce(dist, group, ints, "counter")

    # Pass 1: O(d) per accumulator. Covariance: [w, w * mu]; SecondMoment: [count];
    # CoFiring: [counts].
    first = []
    for _, _, acc in allocated:
        if isinstance(acc, Covariance):
            w = acc._weight_sum.to(**f64)
            first += [w.reshape(1), w * acc._mean.to(**f64)]
        elif isinstance(acc, SecondMoment):
            first.append(acc._count.to(**f64).reshape(1))
        else:
            first.append(acc._counts.to(**f64))
    flat1 = torch.cat(first) if first else torch.zeros(0, **f64)
    _all_reduce(dist, group, flat1, "first-moment")

    # Pass 2: O(d^2) per accumulator, centred at the global mean for Covariance.
    second, offset, means = [], 0, []
    for _, _, acc in allocated:
        d = acc.d
        if isinstance(acc, Covariance):
            total, weighted = flat1[offset], flat1[offset + 1 : offset + 1 + d]
            offset += 1 + d
            mean = weighted / total if float(total) > 0 else torch.zeros_like(weighted)
            means.append((total, mean))
            w = acc._weight_sum.to(**f64)
            delta = acc._mean.to(**f64) - mean
            second.append((acc._m2.to(**f64) + w * torch.outer(delta, delta)).reshape(-1))
        elif isinstance(acc, SecondMoment):
            offset += 1
            second.append(acc._sum.to(**f64).reshape(-1))
        else:
            offset += d
            second.append(acc._co.to(**f64).reshape(-1))
    flat2 = torch.cat(second) if second else torch.zeros(0, **f64)
    _all_reduce(dist, group, flat2, "second-moment")

    # Write back only now: a failed exchange above leaves the accumulators untouched.
    offset1 = offset2 = 0
    cov_index = 0
    for _, _, acc in allocated:
        d, dev, dtype = acc.d, acc.device, acc.dtype
        square = flat2[offset2 : offset2 + d * d].reshape(d, d)
        offset2 += d * d
        if isinstance(acc, Covariance):
            total, mean = means[cov_index]
            cov_index += 1
            offset1 += 1 + d
            acc._weight_sum = total.to(device=dev, dtype=dtype).clone()
            acc._mean = mean.to(device=dev, dtype=dtype).clone()
            acc._m2 = square.to(device=dev, dtype=dtype).clone()
        elif isinstance(acc, SecondMoment):
            acc._count = flat1[offset1].to(device=dev, dtype=dtype).clone()
            offset1 += 1
            acc._sum = square.to(device=dev, dtype=dtype).clone()
        else:
            acc._counts = flat1[offset1 : offset1 + d].to(device=dev, dtype=dtype).clone()
            offset1 += d
            acc._co = square.to(device=dev, dtype=dtype).clone()
    ints = ints.cpu().tolist()
    for i, (_, _, acc) in enumerate(entries):
        acc.n_samples, acc.n_skipped = ints[2 * i], ints[2 * i + 1]
    for site, value in zip(sites, ints[2 * len(entries) :], strict=True):
        site.n_batches = value
