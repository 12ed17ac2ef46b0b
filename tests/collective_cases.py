"""What each process does in the collective-counting tests (tests/test_parallel_costs.py) and in
benchmarks/parallel_layouts.py: one small MoE transformer under a layout of gloo processes, its
training steps' collectives counted by `CollectiveCounter`."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from moekit.config import ModelConfig, MoEConfig, ParallelConfig

# Every piece a layout splits: a dense first layer, GQA heads with sinks and biases, shared
# experts, expert biases, an aux loss, a multi-token-prediction block.
MODEL = ModelConfig(
    vocab_size=96,
    d_model=32,
    n_layers=2,
    n_heads=8,
    n_kv_heads=4,
    d_ff=40,
    first_dense=1,
    attn_bias=True,
    attn_sinks=True,
    qk_norm="head",
    mtp_depth=1,
    moe=MoEConfig(
        d_model=32,
        d_expert=24,
        n_experts=8,
        top_k=2,
        n_shared_experts=1,
        expert_bias=True,
        aux_loss_coef=0.01,
    ),
)


def counted_steps(
    rank: int,
    world: int,
    layout: dict[str, Any],
    model: dict[str, Any],
    micro_batch: int,
    seq_len: int,
    steps: int = 1,
    warmup: int = 2,
) -> dict[str, Any]:
    """`warmup` then `steps` forward/backward passes of the model (ModelConfig as a dict) on
    this process's micro_batch sequences, under `layout` (ParallelConfig fields). Returns the
    collectives of the last counted step (`CollectiveCounter.records`), each step's seconds, the
    process's parameter elements (its local pieces) and peak RSS (KiB). Two warm-up steps: DDP
    rebuilds its buckets (a broadcast) in the second."""
    from moekit.distributed import init_distributed
    from moekit.distributed.count import CollectiveCounter
    from moekit.distributed.parallelize import parallelize
    from moekit.model import MoETransformer

    parallel = ParallelConfig(**layout, backend="gloo", timeout_s=120.0)
    mesh = init_distributed(parallel)
    cfg = ModelConfig.from_dict(model)
    torch.manual_seed(0)
    net = parallelize(MoETransformer(cfg), parallel, mesh)
    g = torch.Generator().manual_seed(1 + mesh.data_rank)
    batch = torch.randint(0, cfg.vocab_size, (micro_batch, seq_len), generator=g)
    records, seconds = [], []
    for _ in range(warmup + steps):
        counter = CollectiveCounter()
        begin = time.perf_counter()
        with counter:
            out = net(batch, labels=batch)
            out.loss.backward()
        seconds.append(time.perf_counter() - begin)
        records = counter.records
        for p in net.parameters():
            p.grad = None
    local = sum(
        p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in net.parameters()
    )
    return {
        "records": records,
        "seconds": seconds[warmup:],
        "local_params": local,
        "peak_rss_kib": peak_rss_kib(),
    }


def counted_layouts(
    rank: int, world: int, layouts: dict[str, dict[str, Any]], *args: Any
) -> dict[str, dict[str, Any]]:
    """`counted_steps` under each of `layouts` in turn, on the same processes (one spawn: most
    of a layout's time is starting processes). FSDP2 layouts count their first step: only DDP
    changes its collectives after the first (its buckets are rebuilt in the second); FSDP2's
    first step hands in the same as its second, which this test counted before."""
    return {
        name: counted_steps(
            rank, world, layout, *args, warmup=0 if ParallelConfig(**layout).fully_sharded else 2
        )
        for name, layout in layouts.items()
    }


def peak_rss_kib() -> int:
    """This process's peak resident memory (VmHWM), KiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
