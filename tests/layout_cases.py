"""What each process does in the parallel-layout tests (tests/test_parallel_layouts.py): a few
training steps of one small MoE transformer under a layout of 4 gloo processes, and the same
steps on one process, gathered into single-process terms for comparison."""

from __future__ import annotations

from typing import Any

import torch

from moekit.config import ModelConfig, MoEConfig, ParallelConfig

# Every piece a layout splits: GQA heads with sinks, a dense layer, shared experts, expert
# biases, an aux loss and aux-loss-free bias updates, a multi-token-prediction block.
MODEL = ModelConfig(
    vocab_size=64,
    d_model=32,
    n_layers=3,
    n_heads=4,
    n_kv_heads=4,
    d_ff=48,
    first_dense=1,
    attn_sinks=True,
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
    "dp_shard4": {"dp_shard": 4},
    "hsdp2x2_ep2": {"dp_replicate": 2, "dp_shard": 2, "ep": 2},
}
BATCH, SEQ, STEPS, LR = 8, 12, 3, 1e-2


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, MODEL.vocab_size, (BATCH, SEQ), generator=g) for _ in range(STEPS)]


def build(state: dict[str, torch.Tensor] | None = None) -> Any:
    from moekit.model import MoETransformer

    torch.manual_seed(0)
    model = MoETransformer(MODEL)
    if state is not None:
        model.load_state_dict(state)
    return model


def step(forward: Any, model: Any, ids: torch.Tensor, clip: Any, optimizer: Any) -> dict:
    out = forward(ids, labels=ids)
    out.loss.backward()
    norm = clip(model)
    optimizer.step()
    model.update_expert_bias()
    return {"loss": out.loss.detach(), "norm": norm.detach()}


def one_process(steps: int = STEPS, resume: dict | None = None) -> dict:
    """The reference: every step on the whole batch, one process."""
    model = build(None if resume is None else resume["model"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    if resume is not None:
        optimizer.load_state_dict(resume["optim"])
    clip = lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)  # noqa: E731
    results = []
    first = 0 if resume is None else 1
    for ids in batches()[first:steps]:
        optimizer.zero_grad(set_to_none=True)
        results.append(step(model, model, ids, clip, optimizer))
        if not results[1:]:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            saved = {"model": model.state_dict(), "optim": optimizer.state_dict()}
    return {"steps": results, "grads": grads, "saved": saved, "final": model.state_dict()}


def layout_run(rank: int, world: int, layout: dict, resume: dict | None = None) -> dict:
    """`one_process` under `layout`: losses and norms per step, the first step's gradients, the
    checkpoint after it and the final weights, all in single-process terms (on rank 0)."""
    from moekit.distributed import init_distributed
    from moekit.distributed.checkpoint import full_state_dicts, shard_optimizer_state
    from moekit.distributed.data_parallel import clip_grad_norm_
    from moekit.distributed.parallelize import parallelize
    from moekit.distributed.shard_specs import full_tensor, shard_specs
    from moekit.distributed.trainer import my_share

    parallel = ParallelConfig(**layout, backend="gloo", timeout_s=60)
    mesh = init_distributed(parallel)
    model = build(None if resume is None else resume["model"])
    forward = parallelize(model, parallel, mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    if resume is not None:
        optimizer.load_state_dict(shard_optimizer_state(resume["optim"], optimizer, model))
    clip = lambda m: clip_grad_norm_(m, 1.0)  # noqa: E731
    results, grads, saved = [], {}, None
    first = 0 if resume is None else 1
    for ids in batches()[first:]:
        optimizer.zero_grad(set_to_none=True)
        mine = my_share(ids, mesh.data_rank, mesh.data_size)
        results.append(step(forward, model, mine, clip, optimizer))
        if len(results) == 1 and resume is None:
            specs = shard_specs(model)
            for name, p in model.named_parameters():
                grads[name] = full_tensor(p.grad, specs.get(name))
            saved = dict(zip(("model", "optim"), full_state_dicts(model, optimizer), strict=True))
    for r in results:  # the loss of the global batch: the mean over data-parallel processes
        torch.distributed.all_reduce(r["loss"])
        r["loss"] /= world
    final, _ = full_state_dicts(model)
    return {"steps": results, "grads": grads, "saved": saved, "final": final}
