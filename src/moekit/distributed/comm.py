"""Collectives that autograd differentiates, and the traffic they cause.

`all_to_all` and `all_reduce_sum` wrap `torch.distributed`'s own collectives in autograd functions
(the backward of an all-to-all is the reverse all-to-all; the backward of a sum over processes is
the sum of the gradients over processes), so gradients flow back through the exchange. Every
all-to-all adds the bytes it sends to other processes, and the time it spends, to `TRAFFIC`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup


@dataclass
class Traffic:
    """Communication of this process's MoE layers since the last `reset()`.

    bytes_sent: bytes of rows the all-to-alls sent to other processes (rows that stay are not
        counted).
    seconds: wall time inside those all-to-alls, forward and backward (waiting for the slowest
        process included).
    calls: number of those all-to-alls.
    other_seconds: wall time in the small collectives: counts exchange, batch statistics,
        global-capacity gathers.
    """

    bytes_sent: int = 0
    seconds: float = 0.0
    calls: int = 0
    other_seconds: float = 0.0

    def reset(self) -> None:
        self.bytes_sent, self.seconds, self.calls, self.other_seconds = 0, 0.0, 0, 0.0


TRAFFIC = Traffic()


@contextmanager
def _timed() -> Iterator[None]:
    """Adds the wall time of a block to TRAFFIC.other_seconds."""
    begin = time.perf_counter()
    try:
        yield
    finally:
        TRAFFIC.other_seconds += time.perf_counter() - begin


def _exchange(x: Tensor, send: list[int], recv: list[int], group: ProcessGroup) -> Tensor:
    """Rows x[sum(send[:j]) : sum(send[:j+1])] go to rank j of `group`; returns the rows
    received, rank by rank (recv[j] rows from rank j)."""
    out = x.new_empty((sum(recv), *x.shape[1:]))
    begin = time.perf_counter()
    dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
    TRAFFIC.seconds += time.perf_counter() - begin
    TRAFFIC.calls += 1
    me = dist.get_rank(group)
    TRAFFIC.bytes_sent += (sum(send) - send[me]) * math.prod(x.shape[1:]) * x.element_size()
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, send: list[int], recv: list[int], group: ProcessGroup) -> Tensor:  # type: ignore[override]
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return _exchange(x, send, recv, group)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        return _exchange(grad, ctx.recv, ctx.send, ctx.group), None, None, None


def all_to_all(x_RD: Tensor, send: list[int], recv: list[int], group: ProcessGroup) -> Tensor:
    """Differentiable all-to-all of rows with per-rank split sizes.

    x_RD (sum(send), D): the first send[0] rows go to rank 0 of `group`, the next send[1] to rank
    1, ... Returns (sum(recv), D): recv[j] rows from rank j, in rank order.
    """
    return _AllToAll.apply(x_RD, send, recv, group)


def _summed(x: Tensor, group: ProcessGroup) -> Tensor:
    out = x.clone(memory_format=torch.contiguous_format)
    with _timed():
        dist.all_reduce(out, group=group)
    return out


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup) -> Tensor:  # type: ignore[override]
        ctx.group = group
        return _summed(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        # Every process's loss may depend on the sum, so each input's gradient is the sum of the
        # gradients of all processes.
        return _summed(grad, ctx.group), None


def all_reduce_sum(x: Tensor, group: ProcessGroup) -> Tensor:
    """Differentiable sum of `x` over the processes of `group` (a new tensor, same shape)."""
    return _AllReduceSum.apply(x, group)


def exchange_counts(counts_E: Tensor, group: ProcessGroup) -> Tensor:
    """counts_E (E,): rows this process sends to each expert, experts split evenly and in order
    over the ranks of `group`. Returns (ep, E / ep): row j is what rank j sends to each of this
    process's experts."""
    received = torch.empty_like(counts_E)
    with _timed():
        dist.all_to_all_single(received, counts_E.contiguous(), group=group)
    return received.view(group.size(), -1)


def gather_rows(x_TC: Tensor, group: ProcessGroup) -> tuple[Tensor, int]:
    """Every process's rows, concatenated in rank order, and where this process's rows start.

    The processes may hold different numbers of rows; they are padded to the longest for the
    collective and trimmed after.
    """
    n = group.size()
    sizes = torch.tensor([x_TC.shape[0]], dtype=torch.long, device=x_TC.device)
    all_sizes = [torch.empty_like(sizes) for _ in range(n)]
    with _timed():
        dist.all_gather(all_sizes, sizes, group=group)
    lengths = [int(s) for s in all_sizes]
    longest = max(lengths)
    padded = x_TC.new_zeros((longest, *x_TC.shape[1:]))
    padded[: x_TC.shape[0]] = x_TC
    parts = [torch.empty_like(padded) for _ in range(n)]
    with _timed():
        dist.all_gather(parts, padded, group=group)
    me = dist.get_rank(group)
    rows = torch.cat([part[:length] for part, length in zip(parts, lengths, strict=True)])
    return rows, sum(lengths[:me])
