"""moekit.distributed: data (DDP, FSDP2), expert and tensor parallelism over torch.distributed.

    parallel = ParallelConfig(dp_shard=2, ep=2, tp=2)
    mesh = init_distributed(parallel)                   # under torchrun: the run's meshes
    forward = parallelize(model, parallel, mesh)        # tp, then ep, then FSDP2 (or DDP)
    rows = my_share(batch, mesh.data_rank, mesh.data_size)
    out = forward(rows, labels=rows); out.loss.backward()
    clip_grad_norm_(model, 1.0); optimizer.step(); model.update_expert_bias()

Parallelism is applied to a built model from outside it; the model code never asks whether
torch.distributed is initialised. `full_state_dicts` and `shard_optimizer_state` convert between
a parallel model's pieces and the single-process checkpoint format.
"""

from moekit.distributed.checkpoint import full_state_dicts, shard_optimizer_state
from moekit.distributed.comm import TRAFFIC, Traffic, all_reduce_sum, all_to_all
from moekit.distributed.data_parallel import apply_data_parallel, clip_grad_norm_
from moekit.distributed.dispatch import AllToAllDispatcher, GlobalCapacityDispatcher
from moekit.distributed.expert_parallel import (
    apply_expert_parallel,
    expert_parallel_layers,
    shard_experts,
)
from moekit.distributed.launch import (
    DistributedFailure,
    check_same_config,
    explain_failures,
    init_distributed,
)
from moekit.distributed.mesh import Layout, ParallelMesh, layout_of
from moekit.distributed.parallelize import parallelize
from moekit.distributed.traffic import network_bytes, traffic_table
from moekit.distributed.trainer import my_share

__all__ = [
    "TRAFFIC",
    "AllToAllDispatcher",
    "DistributedFailure",
    "GlobalCapacityDispatcher",
    "Layout",
    "ParallelMesh",
    "Traffic",
    "all_reduce_sum",
    "all_to_all",
    "apply_data_parallel",
    "apply_expert_parallel",
    "check_same_config",
    "clip_grad_norm_",
    "expert_parallel_layers",
    "explain_failures",
    "full_state_dicts",
    "init_distributed",
    "layout_of",
    "my_share",
    "network_bytes",
    "parallelize",
    "shard_experts",
    "shard_optimizer_state",
    "traffic_table",
]
