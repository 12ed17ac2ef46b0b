"""`moekit train` over many processes (`torchrun --nproc-per-node N -m moekit train ...`).

`train_distributed` runs the one training loop of `moekit.train` on every process, with the
processes as its `World` (`ProcessGroupWorld`) and `MeshParallelism` as its `Parallelism`:

- every process builds the whole model with the same seed, restores a checkpoint as one process
  would, then `parallelize`s it and cuts the optimizer state the same way;
- every process draws the same global batches, and data-parallel rank d of D keeps its rows
  (`my_share`; the tp processes of one data rank share them): the batches, and with
  `parallel.scope="global"` the whole run, are those of one process;
- rank 0 alone writes the run directory; checkpoints are in the single-process format, so a run
  resumes on any number of processes;
- a collective that fails because a process died or hung past `parallel.timeout_s` raises
  `DistributedFailure` on the others.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule

from moekit.config import RunConfig
from moekit.distributed.checkpoint import full_state_dicts, shard_optimizer_state
from moekit.distributed.data_parallel import clip_grad_norm_
from moekit.distributed.launch import check_same_config, explain_failures, init_distributed
from moekit.distributed.parallelize import parallelize
from moekit.train.loop import TrainResult, train
from moekit.train.world import Parallelism, World


def train_distributed(cfg: RunConfig, run_dir: str | Path, *, resume: bool = False) -> TrainResult:
    """`moekit.train.train` on every process of a torchrun launch (see the module docstring).
    Rank 0's `run_dir` is used by every process."""
    if "RANK" not in os.environ and not dist.is_initialized():
        n = cfg.parallel.min_world_size()
        raise ValueError(
            f"this parallel layout needs {n} processes: launch with torchrun, e.g. "
            f"`torchrun --nproc-per-node {n} -m moekit train ...`"
        )
    joined_here = not dist.is_initialized()
    timeout = cfg.parallel.timeout_s
    try:
        with explain_failures(timeout, "starting"):
            mesh = init_distributed(cfg.parallel)
            check_same_config(cfg.to_json())
            holder = [str(run_dir)]
            dist.broadcast_object_list(holder, src=0)  # rank 0's run_dir
            run_dir = holder[0]
            world = ProcessGroupWorld()
            _check_batches(cfg, mesh.data_size)
        with explain_failures(timeout, "training"):
            return train(cfg, run_dir, resume=resume, world=world,
                         parallelism=MeshParallelism(cfg, mesh))  # fmt: skip
    finally:
        if joined_here and dist.is_initialized():
            dist.destroy_process_group()


class ProcessGroupWorld(World):
    """The processes of the default torch.distributed process group."""

    def __init__(self) -> None:
        self.rank, self.size = dist.get_rank(), dist.get_world_size()

    def all_reduce_mean(self, values: Tensor) -> Tensor:
        total = values.clone()
        dist.all_reduce(total)
        return total / self.size

    def barrier(self) -> None:
        dist.barrier()


class MeshParallelism(Parallelism):
    """The run's layout (`parallelize`) applied to the model; gathered single-process
    checkpoints; each data-parallel rank's rows of every global batch."""

    def __init__(self, cfg: RunConfig, mesh: Any) -> None:
        self.cfg, self.mesh = cfg, mesh
        self.forward_model: _SyncOnLastMicroBatch | None = None

    def apply(self, model: nn.Module, grad_accum: int) -> nn.Module:
        self.forward_model = _SyncOnLastMicroBatch(
            parallelize(model, self.cfg.parallel, self.mesh), grad_accum
        )
        return self.forward_model

    shard_optimizer_state = staticmethod(shard_optimizer_state)
    full_state_dicts = staticmethod(full_state_dicts)

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> Tensor:
        # The first call after a step's micro-batches, before the update: a step whose gradients
        # were averaged at the wrong micro-batch stops here.
        if self.forward_model is not None:
            self.forward_model.check_step()
        return clip_grad_norm_(model, max_norm)

    def my_share(self, batch: Tensor) -> Tensor:
        return my_share(batch, self.mesh.data_rank, self.mesh.data_size)

    def before_step(self, seed: int, step: int) -> None:
        # Router noise draws differ per data-parallel rank and step (the same on the tensor-
        # parallel processes that share its rows), and repeat after a resume.
        torch.manual_seed(hash((seed, step, self.mesh.data_rank)) % 2**63)
        if self.forward_model is not None:
            self.forward_model.start_step()


def my_share(batch: Tensor, rank: int, world: int) -> Tensor:
    """Rows [rank * B / world, (rank + 1) * B / world) of a global batch of B rows."""
    n = batch.shape[0] // world
    return batch[rank * n : (rank + 1) * n]


class _SyncOnLastMicroBatch(nn.Module):
    """The DDP or FSDP2 model as the training loop calls it: of the grad_accum training forward
    passes of a step, only the last one's backward averages gradients over the processes (the
    others accumulate locally, as under `DistributedDataParallel.no_sync()` or FSDP2's
    `set_requires_gradient_sync(False)`).

    `start_step` begins a step; `check_step` (after its micro-batches) raises unless the step
    made exactly grad_accum training forward passes, and a pass beyond grad_accum raises at
    once: gradients averaged at another micro-batch than the last would be silently wrong."""

    def __init__(self, ddp: nn.Module, grad_accum: int) -> None:
        super().__init__()
        self.ddp, self.grad_accum, self.calls = ddp, grad_accum, 0

    def start_step(self) -> None:
        self.calls = 0

    def check_step(self) -> None:
        if self.calls != self.grad_accum:
            raise RuntimeError(self._mismatch(self.calls))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            if self.calls == self.grad_accum:
                raise RuntimeError(self._mismatch(self.calls + 1))
            self.calls += 1
            sync = self.calls == self.grad_accum
            if isinstance(self.ddp, FSDPModule):
                self.ddp.set_requires_gradient_sync(sync)
            else:
                self.ddp.require_backward_grad_sync = sync
        return self.ddp(*args, **kwargs)

    def _mismatch(self, calls: int) -> str:
        return (
            f"a training step made {calls} training forward passes, not "
            f"train.grad_accum={self.grad_accum}: gradients are averaged over the processes on "
            "the last one only"
        )


def _check_batches(cfg: RunConfig, world: int) -> None:
    """Each global batch must split evenly over the `world` data-parallel ranks."""
    t = cfg.train
    for name, size in (
        ("train.batch_size", t.batch_size),
        ("train.eval.batch_size", t.eval.batch_size or t.batch_size),
    ):
        if size % world:
            raise ValueError(
                f"{name}={size} does not split over {world} data-parallel processes: each "
                f"takes an equal share of the global batch; use a multiple of {world}"
            )
    if t.compile:
        raise ValueError("train.compile=true is not supported in a distributed run yet")
