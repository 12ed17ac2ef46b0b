"""What each process does in the parallel-layout tests (tests/test_parallel_layouts.py): a few
SGD-with-momentum steps of one small MoE transformer under each layout of 4 gloo processes, and
the same steps on one process, in single-process terms for comparison."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from moekit.config import ModelConfig, MoEConfig, ParallelConfig

# Every piece a layout splits: GQA heads with sinks and per-head q/k norms, a dense layer,
# shared experts, expert biases, an aux loss and aux-loss-free bias updates, an MTP block.
MODEL = ModelConfig(
    vocab_size=64,
    d_model=32,
    n_layers=2,
    n_heads=8,
    n_kv_heads=4,
    d_ff=48,
    first_dense=1,
    attn_sinks=True,
    qk_norm="head",
    mtp_depth=1,
    moe=MoEConfig(
        d_model=32,
        d_expert=16,
        n_experts=8,
        top_k=2,
        n_shared_experts=1,
        expert_bias=True,
        aux_loss_coef=0.01,
        bias_update_rate=0.01,
    ),
)
LAYOUTS: dict[str, dict[str, int]] = {
    "ep4": {"ep": 4},
    "tp4": {"tp": 4},
    "dp_shard4_ep4": {"dp_shard": 4, "ep": 4},
    "dp_shard2_tp2": {"dp_shard": 2, "tp": 2},
    "ep2_tp2": {"ep": 2, "tp": 2},
    "dp_shard4_kept": {"dp_shard": 4, "reshard_after_forward": False},
    "hsdp2x2_ep2": {"dp_replicate": 2, "dp_shard": 2, "ep": 2},
    # sequence parallelism with hidden-split routed experts, and with expert-parallel ones
    "dp_shard2_tp2_sp": {"dp_shard": 2, "tp": 2, "sequence_parallel": True},
    "ep2_tp2_sp": {"ep": 2, "tp": 2, "sequence_parallel": True},
    "tp4_sp": {"tp": 4, "sequence_parallel": True},
}
BATCH, SEQ, STEPS, LR = 8, 12, 2, 0.1


@dataclass
class Job:
    """Train MODEL (or `model`) for the steps from `first`, from `start` (model and optimizer
    state dicts; None: the seed-0 weights and a fresh optimizer), with `freeze` parts frozen."""

    layout: dict[str, int]
    start: dict[str, Any] | None = None
    first: int = 0
    freeze: tuple[str, ...] = ()
    model: ModelConfig = field(default_factory=lambda: MODEL)
    record: bool = True  # gather the first step's gradients and checkpoint (slow-ish)


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, MODEL.vocab_size, (BATCH, SEQ), generator=g) for _ in range(STEPS)]


def _build(job: Job) -> tuple[Any, dict | None]:
    """The job's model (restored, frozen) and the optimizer state to start from."""
    from moekit.model import MoETransformer
    from moekit.train.freeze import freeze

    torch.manual_seed(0)
    model = MoETransformer(job.model)
    # A copy: the optimizer takes the state's tensors as its own and updates them in place.
    start = None if job.start is None else copy.deepcopy(job.start)
    if start is not None:
        model.load_state_dict(start["model"])
    freeze(model, job.freeze)
    return model, None if start is None else start.get("optim")


def trainable(model: Any) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _step(forward: Any, model: Any, ids: torch.Tensor, clip: Any, optimizer: Any) -> dict:
    out = forward(ids, labels=ids)
    out.loss.backward()
    norm = clip(model)
    optimizer.step()
    model.update_expert_bias()
    return {"loss": out.loss.detach(), "norm": norm.detach()}


def one_process(job: Job) -> dict:
    """The reference: `job` on one process, every step on the whole batch."""
    model, optim_state = _build(job)
    optimizer = torch.optim.SGD(trainable(model), lr=LR, momentum=0.9)
    if optim_state is not None:
        optimizer.load_state_dict(optim_state)
    steps, grads, saved = [], {}, None
    for ids in batches()[job.first :]:
        optimizer.zero_grad(set_to_none=True)
        steps.append(_step(model, model, ids, _clip_one, optimizer))
        if len(steps) == 1:
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            saved = copy.deepcopy({"model": model.state_dict(), "optim": optimizer.state_dict()})
    return {"steps": steps, "grads": grads, "saved": saved, "final": model.state_dict()}


def _clip_one(model: Any) -> torch.Tensor:
    return torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)


def layout_jobs(rank: int, world: int, jobs_file: str) -> list[dict] | None:
    """Each job of `jobs_file` (a torch.save'd list of `Job`: their tensors would need too many
    file descriptors as arguments) under its layout, one after another on the same processes;
    rank 0 returns what `one_process` returns for each, gathered into single-process terms."""
    jobs = torch.load(jobs_file, weights_only=False)
    return [_layout_run(job, world) for job in jobs] if rank == 0 else _rest(jobs, world)


def _rest(jobs: list[Job], world: int) -> None:
    for job in jobs:
        _layout_run(job, world)


_MESHES: dict[tuple, Any] = {}


def _layout_run(job: Job, world: int) -> dict:
    from moekit.distributed import init_distributed
    from moekit.distributed.checkpoint import full_state_dicts, shard_optimizer_state
    from moekit.distributed.data_parallel import clip_grad_norm_
    from moekit.distributed.parallelize import parallelize
    from moekit.distributed.shard_specs import full_tensor, shard_specs
    from moekit.distributed.trainer import my_share

    parallel = ParallelConfig(**job.layout, backend="gloo", timeout_s=60)
    key = tuple(sorted(job.layout.items()))
    if key not in _MESHES:  # building a mesh's gloo groups is most of a job's time
        _MESHES[key] = init_distributed(parallel)
    mesh = _MESHES[key]
    model, optim_state = _build(job)
    forward = parallelize(model, parallel, mesh)
    optimizer = torch.optim.SGD(trainable(model), lr=LR, momentum=0.9)
    if optim_state is not None:
        optimizer.load_state_dict(shard_optimizer_state(optim_state, optimizer, model))
    steps, grads, saved = [], {}, None
    for ids in batches()[job.first :]:
        optimizer.zero_grad(set_to_none=True)
        mine = my_share(ids, mesh.data_rank, mesh.data_size)
        steps.append(_step(forward, model, mine, lambda m: clip_grad_norm_(m, 1.0), optimizer))
        if len(steps) == 1 and job.record:
            specs = shard_specs(model)
            for name, p in model.named_parameters():
                if p.grad is not None:
                    grads[name] = full_tensor(p.grad, specs.get(name))
            state = full_state_dicts(model, optimizer)  # some of it may alias the live tensors
            saved = copy.deepcopy(dict(zip(("model", "optim"), state, strict=True)))
    for s in steps:  # the loss of the global batch: the mean over the processes' own batches
        torch.distributed.all_reduce(s["loss"])
        s["loss"] /= world
    final, _ = full_state_dicts(model)
    return {"steps": steps, "grads": grads, "saved": saved, "final": final}
