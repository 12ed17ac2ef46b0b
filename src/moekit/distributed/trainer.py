"""`moekit train` over many processes (`torchrun --nproc-per-node N -m moekit train ...`).

`train_distributed` runs the one training loop of `moekit.train` on every process, with the
processes as its `World` (`ProcessGroupWorld`) and `ExpertDataParallel` as its `Parallelism`:

- every process builds the whole model with the same seed, restores a checkpoint as one process
  would, then shards it (`apply_expert_parallel`, `shard_optimizer_state`) and wraps it in DDP
  (`apply_data_parallel`);
- each global batch of `train.batch_size` sequences (and each evaluation batch) is drawn the same
  on every process, which keeps rows [rank * B / world, (rank + 1) * B / world): the batches, and
  with `parallel.scope="global"` the whole run, are those of one process;
- logged losses, evaluation losses and the gradient norm are averaged (or totalled) over the
  processes; rank 0 alone writes metrics.jsonl, config.json, the report and the checkpoints,
  which hold the gathered experts in the single-process format, so a run resumes on any number
  of processes;
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

from moekit.config import RunConfig
from moekit.distributed.checkpoint import full_state_dicts, shard_optimizer_state
from moekit.distributed.data_parallel import apply_data_parallel, clip_grad_norm_
from moekit.distributed.expert_parallel import apply_expert_parallel
from moekit.distributed.launch import check_same_config, explain_failures, init_distributed
from moekit.train.loop import TrainResult, train
from moekit.train.world import Parallelism, World


def train_distributed(cfg: RunConfig, run_dir: str | Path, *, resume: bool = False) -> TrainResult:
    """`moekit.train.train` on every process of a torchrun launch (see the module docstring).
    Rank 0's `run_dir` is used by every process."""
    if "RANK" not in os.environ and not dist.is_initialized():
        p = cfg.parallel
        n = p.ep * (p.dp or 1)
        raise ValueError(
            f"parallel.ep={p.ep} needs {n} processes: launch with torchrun, e.g. "
            f"`torchrun --nproc-per-node {n} -m moekit train ... --parallel.ep={p.ep}`"
        )
    joined_here = not dist.is_initialized()
    timeout = cfg.parallel.timeout_s
    try:
        with explain_failures(timeout, "starting"):
            mesh = init_distributed(cfg.parallel)
            check_same_config(cfg.to_json())
            run_dir = _rank0_value(str(run_dir))
            world = ProcessGroupWorld()
            _check_batches(cfg, world.size)
        with explain_failures(timeout, "training"):
            return train(cfg, run_dir, resume=resume, world=world,
                         parallelism=ExpertDataParallel(cfg, mesh, world))  # fmt: skip
    finally:
        if joined_here and dist.is_initialized():
            dist.destroy_process_group()


def _rank0_value(value: Any) -> Any:
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


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


class ExpertDataParallel(Parallelism):
    """Experts sharded over the mesh's "ep" axis (`apply_expert_parallel`), the rest data
    parallel (DDP, gradients averaged once per step); each process takes its rows of every
    global batch. A dense model, or expert-choice routing without expert parallelism, is data
    parallel only."""

    def __init__(self, cfg: RunConfig, mesh: Any, world: World) -> None:
        self.cfg, self.mesh, self.world = cfg, mesh, world
        self.forward_model: _SyncOnLastMicroBatch | None = None

    def _expert_parallel(self) -> bool:
        moe = self.cfg.model.moe
        return moe is not None and (self.cfg.parallel.ep > 1 or moe.token_choice)

    def apply(self, model: nn.Module, grad_accum: int) -> nn.Module:
        if not self._expert_parallel():
            ddp = apply_data_parallel(model, self.mesh)
        else:
            apply_expert_parallel(model, self.mesh, scope=self.cfg.parallel.scope)
            ddp = apply_data_parallel(model)
        self.forward_model = _SyncOnLastMicroBatch(ddp, grad_accum)
        return self.forward_model

    def shard_optimizer_state(
        self, full_state: dict[str, Any], optimizer: torch.optim.Optimizer, model: nn.Module
    ) -> dict[str, Any]:
        if not self._expert_parallel():
            return full_state
        return shard_optimizer_state(full_state, optimizer, model)

    def full_state_dicts(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[dict[str, Tensor] | None, dict[str, Any] | None]:
        return full_state_dicts(model, optimizer)

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> Tensor:
        # The first call after a step's micro-batches, before the update: a step whose gradients
        # were averaged at the wrong micro-batch stops here.
        if self.forward_model is not None:
            self.forward_model.check_step()
        return clip_grad_norm_(model, max_norm)

    def my_share(self, batch: Tensor) -> Tensor:
        return my_share(batch, self.world.rank, self.world.size)

    def before_step(self, seed: int, step: int) -> None:
        # Router noise draws differ per process and step, and repeat after a resume.
        torch.manual_seed(hash((seed, step, self.world.rank)) % 2**63)
        if self.forward_model is not None:
            self.forward_model.start_step()


def my_share(batch: Tensor, rank: int, world: int) -> Tensor:
    """Rows [rank * B / world, (rank + 1) * B / world) of a global batch of B rows."""
    n = batch.shape[0] // world
    return batch[rank * n : (rank + 1) * n]


class _SyncOnLastMicroBatch(nn.Module):
    """The DDP model as the training loop calls it: of the grad_accum training forward passes of
    a step, only the last one's backward averages gradients over the processes (the others
    accumulate locally, as under `DistributedDataParallel.no_sync()`).

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
            self.ddp.require_backward_grad_sync = self.calls == self.grad_accum
        return self.ddp(*args, **kwargs)

    def _mismatch(self, calls: int) -> str:
        return (
            f"a training step made {calls} training forward passes, not "
            f"train.grad_accum={self.grad_accum}: gradients are averaged over the processes on "
            "the last one only"
        )


def _check_batches(cfg: RunConfig, world: int) -> None:
    t = cfg.train
    for name, size in (
        ("train.batch_size", t.batch_size),
        ("train.eval.batch_size", t.eval.batch_size or t.batch_size),
    ):
        if size % world:
            raise ValueError(
                f"{name}={size} does not split over {world} processes: each takes an equal share "
                f"of the global batch; use a multiple of {world}"
            )
    if t.compile:
        raise ValueError("train.compile=true is not supported in a distributed run yet")
