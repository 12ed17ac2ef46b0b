"""`parallelize`: spread a built model over a run's meshes, from outside the model.

In order: tensor parallelism over "tp" (`apply_tensor_parallel`; routed experts split on their
hidden dimension when ep = 1; with `parallel.sequence_parallel`, the norms and the residual
stream split along the sequence), expert parallelism over "ep" (`apply_expert_parallel`; also with
ep = 1 for token-choice routing, whose balance statistics then span every data-parallel process),
then FSDP2 over the data-parallel axes when dp_shard > 1 or tp > 1 (`apply_fully_shard`), else
DDP (`apply_data_parallel`). `ParallelConfig` documents the layouts.
"""

from __future__ import annotations

from torch import nn

from moekit.config import ParallelConfig
from moekit.distributed.data_parallel import apply_data_parallel
from moekit.distributed.expert_parallel import apply_expert_parallel
from moekit.distributed.fully_shard import apply_fully_shard
from moekit.distributed.mesh import ParallelMesh
from moekit.distributed.tensor_parallel import apply_tensor_parallel
from moekit.moe import MoELayer


def parallelize(model: nn.Module, parallel: ParallelConfig, mesh: ParallelMesh) -> nn.Module:
    """Apply `parallel`'s layout to `model` (weights already restored) in place; returns the
    module to call for forward passes (the model itself, or its DDP wrapper). Every process
    must call it with the same model."""
    if hasattr(model, "cfg"):
        parallel.check_model(model.cfg)
    if mesh.tp > 1:
        apply_tensor_parallel(
            model,
            mesh.tp_mesh,
            split_experts=parallel.ep == 1,
            sequence_parallel=parallel.sequence_parallel,
        )
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if layers and (parallel.ep > 1 or all(m.cfg.token_choice for m in layers)):
        apply_expert_parallel(
            model, mesh, scope=parallel.scope, scale_expert_grads=not parallel.fully_sharded
        )
    if parallel.fully_sharded:
        return apply_fully_shard(model, mesh, parallel)
    return apply_data_parallel(model, mesh)
