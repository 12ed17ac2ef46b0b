"""`moekit train` over many processes (`torchrun --nproc-per-node N -m moekit train ...`).

`train_distributed` runs the training loop of `moekit.train` on every process, with these changes
(`DistributedTrainer`):

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
import types
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moekit.config import RunConfig
from moekit.data import Data
from moekit.distributed.checkpoint import full_state_dicts, shard_optimizer_state
from moekit.distributed.data_parallel import apply_data_parallel, clip_grad_norm_
from moekit.distributed.expert_parallel import apply_expert_parallel
from moekit.distributed.launch import (
    check_same_config,
    explain_failures,
    init_distributed,
    world_size_from_env,
)
from moekit.model import MoETransformer
from moekit.train.checkpoint import TrainerState, checkpoint_path, save_checkpoint
from moekit.train.loop import Trainer, TrainResult
from moekit.train.metrics import StepResult
from moekit.train.optim import build_optimizer
from moekit.train.report import write_report


def is_distributed_run(cfg: RunConfig) -> bool:
    """Whether `train` should run distributed: launched as several processes, or asked for
    expert or data parallelism."""
    p = cfg.parallel
    return world_size_from_env() > 1 or p.ep > 1 or (p.dp or 1) > 1


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
            trainer = DistributedTrainer(cfg, Path(run_dir), resume, mesh)
        try:
            with explain_failures(timeout, "training"):
                result = trainer.run()
        finally:
            trainer.close()
        trainer.write_report()
        return result
    finally:
        if joined_here and dist.is_initialized():
            dist.destroy_process_group()


def _rank0_value(value: Any) -> Any:
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


class _RankShare:
    """The rows of each global batch that belong to this process (a sampler's interface)."""

    def __init__(self, sampler: Any, rank: int, world: int) -> None:
        self.sampler, self.rank, self.world = sampler, rank, world

    def next_batch(self) -> Tensor:
        return my_share(self.sampler.next_batch(), self.rank, self.world)

    def state_dict(self) -> dict[str, Tensor]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.sampler.load_state_dict(state)


def my_share(batch: Tensor, rank: int, world: int) -> Tensor:
    """Rows [rank * B / world, (rank + 1) * B / world) of a global batch of B rows."""
    n = batch.shape[0] // world
    return batch[rank * n : (rank + 1) * n]


class _SyncOnLastMicroBatch:
    """The DDP model as the training loop calls it: of the grad_accum training forward passes of
    a step, only the last one's backward averages gradients over the processes (the others
    accumulate locally, as under `DistributedDataParallel.no_sync()`)."""

    def __init__(self, ddp: Any, grad_accum: int) -> None:
        self.ddp, self.grad_accum, self.calls = ddp, grad_accum, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            self.calls += 1
            self.ddp.require_backward_grad_sync = self.calls >= self.grad_accum
        return self.ddp(*args, **kwargs)


class _NoMetrics:
    """The metrics log of the processes that do not write the run directory."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class _Weights(nn.Module):
    """A module whose state dict is the given one: what `save_checkpoint` writes."""

    def __init__(self, state: dict[str, Tensor]) -> None:
        super().__init__()
        self._state = state

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:  # type: ignore[override]
        return dict(self._state)


class DistributedTrainer(Trainer):
    """`Trainer` on one process of a distributed run (see the module docstring)."""

    def __init__(self, cfg: RunConfig, run_dir: Path, resume: bool, mesh: Any) -> None:
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.mesh, self.full_cfg = mesh, cfg
        _check_batches(cfg, self.world)
        quiet = cfg.train.replace(progress=False, tensorboard=False)
        super().__init__(cfg if self.rank == 0 else cfg.replace(train=quiet), run_dir, resume)
        self._saved_step: int | None = self.step if resume else None
        self._parallelize()
        self.sampler = _RankShare(self.sampler, self.rank, self.world)
        self.eval_batches = [my_share(b, self.rank, self.world) for b in self.eval_batches]

    def _parallelize(self) -> None:
        """Shard the whole model and its optimizer state; DDP for the rest. (A dense model, or
        expert-choice routing without expert parallelism, is data-parallel only.)"""
        moe = self.cfg.model.moe
        if moe is None or (self.cfg.parallel.ep == 1 and not moe.token_choice):
            ddp = apply_data_parallel(self.model, self.mesh)
            self.forward_model = _SyncOnLastMicroBatch(ddp, self.cfg.train.grad_accum)
            return
        full_state = self.optimizer.state_dict()
        apply_expert_parallel(self.model, self.mesh, scope=self.cfg.parallel.scope)
        self.optimizer = build_optimizer(self.model, self.cfg.train)
        self.optimizer.load_state_dict(
            shard_optimizer_state(full_state, self.optimizer, self.model)
        )
        self.forward_model = _SyncOnLastMicroBatch(
            apply_data_parallel(self.model), self.cfg.train.grad_accum
        )

    def _prepare_data(self) -> Data:
        """Rank 0 tokenises (and caches) first; the others then read its cache."""
        if self.rank == 0:
            data = super()._prepare_data()
        dist.barrier()
        if self.rank != 0:
            data = super()._prepare_data()
        return data

    def _open_run_files(self, resume: bool) -> None:
        if self.rank == 0:
            super()._open_run_files(resume)
        else:
            self.metrics = _NoMetrics()  # type: ignore[assignment]

    def _average(self, value: float) -> float:
        """The mean of a per-process figure over the processes."""
        total = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(total)
        return float(total[0]) / self.world

    def _train_step(self) -> StepResult:
        # Router noise draws differ per process and step, and repeat after a resume.
        torch.manual_seed(hash((self.cfg.train.seed, self.step, self.rank)) % 2**63)
        self.forward_model.calls = 0
        result = super()._train_step()
        if self.forward_model.calls != self.cfg.train.grad_accum:
            raise RuntimeError(
                f"a training step made {self.forward_model.calls} forward passes, not "
                f"train.grad_accum={self.cfg.train.grad_accum}: gradients were not averaged"
            )
        losses_L = result.losses_L.to(torch.float64)
        dist.all_reduce(losses_L)
        result.losses_L = losses_L / self.world
        return result

    def _clip(self) -> Tensor:
        clip = self.cfg.train.grad_clip
        return clip_grad_norm_(self.model, clip if clip is not None else float("inf"))

    def _saved_now(self) -> bool:
        return self._saved_step == self.step

    def _save(self) -> Path:
        """Gather the experts; rank 0 writes a single-process checkpoint; all wait for it."""
        model_sd, optim_sd = full_state_dicts(self.model, self.optimizer)
        path = checkpoint_path(self.run_dir, self.step)
        if self.rank == 0:
            assert model_sd is not None and optim_sd is not None
            state = TrainerState(
                self.step, self.tokens, self.sampler.state_dict(), torch.get_rng_state()
            )
            optimizer = types.SimpleNamespace(state_dict=lambda: optim_sd)
            keep = self.cfg.train.checkpoint.keep
            save_checkpoint(self.run_dir, _Weights(model_sd), optimizer, state, keep)  # type: ignore[arg-type]
        dist.barrier()
        self._saved_step = self.step
        return path

    def write_report(self) -> None:
        """report.md on rank 0, with the whole model's parameter counts."""
        if self.rank != 0:
            return
        with torch.device("meta"):
            whole = MoETransformer(self.full_cfg.model)
        write_report(self.run_dir, self.full_cfg, whole)


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
