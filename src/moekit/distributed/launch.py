"""Starting a distributed run under `torchrun` (the process group its environment describes:
RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), and failing clearly when a process is lost."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from moekit.config import ParallelConfig
from moekit.distributed.mesh import ParallelMesh, build_mesh


class DistributedFailure(RuntimeError):
    """A collective operation failed: another process died, hung past the timeout, or the
    processes disagree (their configs differ)."""


def init_distributed(parallel: ParallelConfig) -> ParallelMesh:
    """Join the process group (if not joined yet) and build the run's meshes (`build_mesh`),
    every group with `parallel.timeout_s`. On CUDA, each process takes the GPU LOCAL_RANK."""
    backend = parallel.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    device_type = "cuda" if backend == "nccl" else "cpu"
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=parallel.timeout_s))
    return build_mesh(parallel, device_type, backend)


def check_same_config(config_json: str) -> None:
    """Raise `DistributedFailure` on every process unless all hold the same config (and the same
    torch version); the error names the ranks and the fields that differ from rank 0's."""
    mine = _flatten(json.loads(config_json)) | {"torch version": torch.__version__}
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    reference = everyone[0]
    problems = []
    for rank, flat in enumerate(everyone[1:], start=1):
        keys = sorted(k for k in reference.keys() | flat.keys() if reference.get(k) != flat.get(k))
        if keys:
            diffs = ", ".join(f"{k}={flat.get(k)!r} (rank 0: {reference.get(k)!r})" for k in keys)
            problems.append(f"rank {rank}: {diffs}")
    if problems:
        raise DistributedFailure(
            "the processes were started with different configs; every process must get the same "
            "command line and config file. Differences from rank 0: " + "; ".join(problems)
        )


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat |= _flatten(value, f"{prefix}.{key}" if prefix else key)
    return flat


# What gloo and NCCL say when the other side of a collective is gone or silent.
_LOST_PEER = re.compile(
    r"[Tt]imed out|[Tt]imeout|Connection (reset|closed|refused)|pair closure|[Bb]roken pipe|"
    r"NCCL (error|communicator)|ProcessGroup.*(abort|shut ?down)|Socket Timeout"
)


@contextmanager
def explain_failures(timeout_s: float, doing: str = "training") -> Iterator[None]:
    """Re-raise a collective failure caused by a lost process as a `DistributedFailure` that
    says what happened, this process's rank, and what to do."""
    try:
        yield
    except DistributedFailure:
        raise
    except (RuntimeError, dist.DistError) as err:
        if not (isinstance(err, dist.DistError) or _LOST_PEER.search(str(err))):
            raise
        rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DistributedFailure(
            f"rank {rank}: a collective operation failed while {doing}: another process died or "
            f"did not answer within parallel.timeout_s={timeout_s:g} s. Its own log says why "
            f"(torchrun names the rank that failed first). Cause: {first_line}"
        ) from err
