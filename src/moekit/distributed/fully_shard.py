"""`apply_fully_shard`: FSDP2 (`torch.distributed.fsdp.fully_shard`) over a built model, after
tensor and expert parallelism, as torchtitan applies it.

- Routed experts of an expert-parallel layer form their own unit over the experts' data-parallel
  mesh ("edp_replicate", "edp_shard": the processes holding the same experts), with gradients
  divided by the number of data-parallel processes D (each expert's gradient arrives summed over
  the ep processes whose tokens it served, then over its copies: the mean over D processes'
  losses).
- Every `Block` (main stack and multi-token prediction) is one unit over ("dp_replicate",
  "dp_shard"): sharded over dp_shard, replicated over dp_replicate (HSDP); the root unit holds
  the embeddings, the final norm and the LM head. Gradients are averaged over D.
- `parallel.reshard_after_forward` frees each block's gathered parameters after its forward;
  `parallel.param_dtype="bfloat16"` gathers and computes in bfloat16 while the sharded float32
  parameters, the optimizer and the gradient reduction stay float32 (`MixedPrecisionPolicy`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from moekit.config import ParallelConfig
from moekit.distributed.expert_parallel import expert_parallel_layers
from moekit.distributed.mesh import ParallelMesh
from moekit.model.block import Block

DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


def apply_fully_shard(model: nn.Module, mesh: ParallelMesh, parallel: ParallelConfig) -> nn.Module:
    """Shard `model` in place (see the module docstring); returns it, now an `FSDPModule`."""
    policy = MixedPrecisionPolicy(
        param_dtype=DTYPES[parallel.param_dtype], reduce_dtype=torch.float32
    )
    options = {"mp_policy": policy, "reshard_after_forward": parallel.reshard_after_forward}
    for _, layer, dispatcher in expert_parallel_layers(model):
        if dispatcher.ep > 1:
            fully_shard(layer.experts, mesh=mesh.edp, **options)
            layer.experts.set_gradient_divide_factor(float(mesh.data_size))
    for block in [m for m in model.modules() if isinstance(m, Block)]:
        fully_shard(block, mesh=mesh.dp, **options)
    # The root unit (embeddings, final norm, LM head) stays gathered from its forward to its
    # backward, which follows at once (FSDP2's own default for the root).
    fully_shard(model, mesh=mesh.dp, **(options | {"reshard_after_forward": False}))
    return model
