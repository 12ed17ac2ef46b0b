"""Count what a process hands to torch.distributed's collectives: `CollectiveCounter`, a
`TorchDispatchMode` that sees every collective as the dispatcher runs it, whoever calls it —
`torch.distributed.all_reduce` and friends (the c10d ops under them, FSDP2's all-gathers and
reduce-scatters included) and DTensor's functional collectives (tensor parallelism), which go
around the Python functions. It changes nothing: every op runs as called.

    with CollectiveCounter() as counter:
        loss = model(x).loss; loss.backward()
    counter.records   # one `Record` per collective: op, group size, bytes handed in, sent
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from moekit.distributed.costs import KINDS, SENT_PER_BYTE

EXTRA_KINDS = ("statistics", "one_process", "other")

# The collective ops: (namespace, name) -> (kind, index of the input argument). Inputs may be a
# tensor or a list (of lists) of tensors.
_OPS: dict[tuple[str, str], tuple[str, int]] = {
    ("c10d", "allreduce_"): ("all_reduce", 0),
    ("c10d", "allreduce_coalesced_"): ("all_reduce", 0),
    ("c10d", "allgather_"): ("all_gather", 1),
    ("c10d", "_allgather_base_"): ("all_gather", 1),
    ("c10d", "allgather_into_tensor_coalesced_"): ("all_gather", 1),
    ("c10d", "reduce_scatter_"): ("reduce_scatter", 1),
    ("c10d", "_reduce_scatter_base_"): ("reduce_scatter", 1),
    ("c10d", "reduce_scatter_tensor_coalesced_"): ("reduce_scatter", 1),
    ("c10d", "alltoall_base_"): ("all_to_all", 1),
    ("c10d", "alltoall_"): ("all_to_all", 1),
    ("c10d", "broadcast_"): ("broadcast", 0),
    ("_c10d_functional", "all_reduce"): ("all_reduce", 0),
    ("_c10d_functional", "all_reduce_"): ("all_reduce", 0),
    ("_c10d_functional", "all_reduce_coalesced"): ("all_reduce", 0),
    ("_c10d_functional", "all_gather_into_tensor"): ("all_gather", 0),
    ("_c10d_functional", "all_gather_into_tensor_out"): ("all_gather", 0),
    ("_c10d_functional", "reduce_scatter_tensor"): ("reduce_scatter", 0),
    ("_c10d_functional", "all_to_all_single"): ("all_to_all", 0),
    ("_c10d_functional", "broadcast"): ("broadcast", 0),
}


@dataclass(frozen=True)
class Record:
    """One collective call: its kind (all_reduce, all_gather, reduce_scatter, all_to_all,
    broadcast), the op's name, the size of its group and its (global) ranks, the dtype of its
    input, `payload` (bytes of the input handed in) and `sent` (bytes that leave this process:
    `costs.SENT_PER_BYTE`, or for an all-to-all the rows addressed to other ranks)."""

    kind: str
    op: str
    group: int
    ranks: tuple[int, ...]
    dtype: torch.dtype
    payload: int
    sent: float


def _group(args: tuple, kwargs: dict, namespace: str) -> dist.ProcessGroup:
    """The op's process group."""
    if namespace == "_c10d_functional":  # the group's name is the last string argument
        name = [a for a in (*args, *kwargs.values()) if isinstance(a, str)][-1]
        return dist.distributed_c10d._resolve_process_group(name)
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.ScriptObject) and "ProcessGroup" in str(a._type()):
            return dist.ProcessGroup.unbox(a)
    raise ValueError("collective without a process group")


def _sent(kind: str, n: int, payload: int, splits: list[int] | None, rank: int) -> float:
    if kind == "broadcast":  # from rank 0
        return (n - 1) * payload if rank == 0 else 0.0
    if kind == "all_to_all" and splits:  # the rows addressed to other ranks
        return payload * (sum(splits) - splits[rank]) / max(sum(splits), 1)
    return SENT_PER_BYTE[kind](n) * payload


class CollectiveCounter(TorchDispatchMode):
    """Records every collective dispatched while it is active (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[Record] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        key = (func.namespace, func._schema.name.split("::")[-1])
        if key in _OPS:
            kind, index = _OPS[key]
            tensors = [t for t in tree_leaves(args[index]) if isinstance(t, Tensor)]
            payload = sum(t.numel() * t.element_size() for t in tensors)
            pg = _group(args, kwargs, func.namespace)
            n, rank = pg.size(), pg.rank()
            ranks = tuple(dist.get_process_group_ranks(pg))
            splits = None
            if kind == "all_to_all":  # input split sizes: alltoall_base_'s 5th, functional 3rd
                pos = 4 if func.namespace == "c10d" else 2
                splits = list(args[pos]) if len(args) > pos and args[pos] else None
            sent = _sent(kind, n, payload, splits, rank)
            self.records.append(Record(kind, key[1], n, ranks, tensors[0].dtype, payload, sent))
        return func(*args, **kwargs)


def by_kind(records: list[Record], tp: int, rank: int) -> dict[str, dict[str, float]]:
    """Calls, payload and sent per kind of `moekit.distributed.costs.KINDS`, from this process's
    records (`rank` of the world, `tp` its tensor-parallel size: the all-reduces, all-gathers and
    reduce-scatters on its tensor-parallel group are tensor parallelism's). Also "statistics"
    (the MoE layers' float64 balance sums), "one_process" (collectives on a group of one: they
    send nothing) and "other"."""
    first = rank - rank % tp
    tp_ranks = tuple(range(first, first + tp))
    out = {k: {"calls": 0, "payload": 0, "sent": 0.0} for k in (*KINDS, *EXTRA_KINDS)}
    for r in records:
        if r.group == 1:
            kind = "one_process"
        elif r.kind in ("all_gather", "reduce_scatter"):
            on_tp = tp > 1 and r.ranks == tp_ranks  # sequence parallelism's, else FSDP2's
            kind = ("tp_" if on_tp else "fsdp_") + r.kind
        elif r.kind == "all_to_all":
            kind = "ep_all_to_all"
        elif r.kind == "all_reduce" and r.dtype == torch.float64:
            kind = "statistics"
        elif r.kind == "all_reduce":
            kind = "tp_all_reduce" if tp > 1 and r.ranks == tp_ranks else "dp_all_reduce"
        else:
            kind = "other"
        out[kind]["calls"] += 1
        out[kind]["payload"] += r.payload
        out[kind]["sent"] += r.sent
    return out
