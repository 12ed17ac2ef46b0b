"""moekit.distributed: expert parallelism over torch.distributed (see ../shared/DESIGN.md).

    mesh = init_distributed(ParallelConfig(ep=2))      # under torchrun: the ("dp", "ep") mesh
    apply_expert_parallel(model, mesh)                 # shard experts, all-to-all dispatch
    ddp = apply_data_parallel(model)                   # DDP for the rest; expert replicas
    out = ddp(batch_share, labels=batch_share); out.loss.backward()
    clip_grad_norm_(ddp, 1.0); optimizer.step(); model.update_expert_bias()

Parallelism is applied to a built model from outside it; the model code never asks whether
torch.distributed is initialised.
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
from moekit.distributed.layout import Layout, layout_of
from moekit.distributed.traffic import network_bytes, traffic_table

__all__ = [
    "TRAFFIC",
    "AllToAllDispatcher",
    "DistributedFailure",
    "GlobalCapacityDispatcher",
    "Layout",
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
    "network_bytes",
    "shard_experts",
    "shard_optimizer_state",
    "traffic_table",
]
