"""Data parallelism around expert parallelism: DDP for what is replicated, replicas for experts.

`apply_data_parallel` wraps a model in torch's `DistributedDataParallel` over every process of the
run, with the routed experts excluded (the processes of an expert-parallel group hold different
experts): each expert shard's gradients are averaged over the processes that hold copies of it
instead, whenever DDP synchronises (so `no_sync()` covers both). After `loss.backward()` on every
process, every gradient is that of the mean loss over the global batch (an expert's was already
the mean over its expert-parallel group, `apply_expert_parallel`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed import ProcessGroup
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from moekit.distributed.checkpoint import unwrap
from moekit.distributed.expert_parallel import expert_parallel_layers
from moekit.distributed.mesh import group_timeout, layout_of
from moekit.distributed.shard_specs import shard_specs


def apply_data_parallel(
    model: nn.Module, mesh_or_group: Any = None, **ddp_kwargs: Any
) -> DistributedDataParallel:
    """Wrap `model` (expert-parallel or not) in DDP over every process of the run.

    mesh_or_group: the layout (`layout_of`), needed only when no layer was made expert-parallel
        (a dense model); otherwise the layers' own layout is used.
    ddp_kwargs: passed to `DistributedDataParallel` (e.g. find_unused_parameters=True).
    """
    layers = expert_parallel_layers(model)
    if layers:
        layout = layers[0][2].layout
    elif mesh_or_group is None:
        raise ValueError(
            "the model has no expert-parallel layer: pass the device mesh or process group"
        )
    else:
        layout = layout_of(mesh_or_group)
    names, params = expert_parameters(model)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    # A group of its own: DDP's asynchronous all-reduces must not interleave with the
    # synchronous collectives of the forward and backward passes.
    world = dist.get_process_group_ranks(layout.batch_group)
    group = dist.new_group(
        world, timeout=group_timeout(layout.batch_group), use_local_synchronization=True
    )
    ddp_kwargs.setdefault("broadcast_buffers", False)
    ddp = DistributedDataParallel(model, process_group=group, **ddp_kwargs)
    trained = [p for p in params if p.requires_grad]  # frozen experts have nothing to average
    if trained and layout.dp_size > 1:
        sync = ExpertReplicaSync(trained, layout.dp_group, group)
        ddp.register_comm_hook(sync, ExpertReplicaSync.on_bucket)
    return ddp


def expert_parameters(model: nn.Module) -> tuple[list[str], list[nn.Parameter]]:
    """Names and parameters of the routed experts of the expert-parallel layers of `model`."""
    names, params = [], []
    for layer_name, layer, _ in expert_parallel_layers(model):
        for name, p in layer.experts.named_parameters():
            names.append(f"{layer_name}.experts.{name}" if layer_name else f"experts.{name}")
            params.append(p)
    return names, params


class ExpertReplicaSync:
    """Averages expert gradients over their copies at the end of each backward DDP syncs."""

    def __init__(
        self, params: list[nn.Parameter], dp_group: ProcessGroup, ddp_group: ProcessGroup
    ) -> None:
        self.params, self.dp_group, self.ddp_group = params, dp_group, ddp_group
        self.queued = False

    def on_bucket(self, bucket):  # type: ignore[no-untyped-def]
        """DDP's comm hook (this object its state): DDP is reducing a bucket, so this backward
        syncs; average the experts after it. Unannotated: DDP checks a hook's annotations
        against the real classes, and this module's annotations are strings."""
        if not self.queued:
            self.queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.average)
        return default_hooks.allreduce_hook(self.ddp_group, bucket)

    def average(self) -> None:
        self.queued = False
        grads = []
        for p in self.params:
            if p.grad is None:  # this process's experts got no rows; its copies may have
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=self.dp_group)
        flat /= self.dp_group.size()
        for grad, averaged in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
            grad.copy_(averaged)


def clip_grad_norm_(model: nn.Module, max_norm: float) -> Tensor:
    """Clip every gradient of a parallel model by the norm of the whole model's gradient (each
    entry of the single-process model counted once); returns that norm, the same on every
    process. Each gradient's squares are summed over the processes that hold other pieces of it
    (the sharded axes of a DTensor's mesh, the groups of its `shard_specs` splits) and nowhere
    else: copies are counted once."""
    module = unwrap(model)
    specs = shard_specs(module)
    device = next(module.parameters()).device
    buckets: dict[tuple[ProcessGroup, ...], list[Tensor]] = {}
    grads = []
    for name, p in module.named_parameters():
        if p.grad is None:
            continue
        grad = p.grad
        groups: list[ProcessGroup] = []
        if isinstance(grad, DTensor):
            mesh = grad.device_mesh
            # Shard and FSDP2's _StridedShard split; Replicate copies (a Partial gradient would
            # be a bug upstream: its squares do not add up).
            assert not any(pl.is_partial() for pl in grad.placements), grad.placements
            groups += [
                mesh.get_group(i) for i, pl in enumerate(grad.placements) if not pl.is_replicate()
            ]
            grad = grad.to_local()
        spec = specs.get(name)
        if spec is not None:
            groups += [group for group, _ in spec.splits]
        buckets.setdefault(tuple(groups), []).append(grad)
        grads.append(p.grad)
    total_sq = torch.zeros((), dtype=torch.float32, device=device)
    for groups, local in buckets.items():
        sq = (torch.nn.utils.get_total_norm(local).float().to(device) ** 2).reshape(1)
        for group in groups:
            if group.size() > 1:
                dist.all_reduce(sq, group=group)
        total_sq = total_sq + sq[0]
    total = total_sq.sqrt()
    if math.isfinite(max_norm):
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0).item()
        for grad in grads:
            grad.mul_(scale)
    return total
