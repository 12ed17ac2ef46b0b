"""`apply_expert_parallel`: split a built model's experts over processes, from outside the model.

For every `MoELayer` of the model (a whole `MoETransformer`, or bare layers in any container):

- `layer.experts` becomes an `Experts` holding only this process's experts
  [first, first + E / ep) (`shard_experts`);
- `layer.dispatcher` becomes an `AllToAllDispatcher` around the layer's own dispatcher (or, for
  capacity under `scope="global"`, around a `GlobalCapacityDispatcher`);
- `layer.reduce_bias_counts` sums the routed counts of the aux-loss-free bias update over every
  process, so all move their biases alike; under `scope="global"`, `layer.reduce_stats` sums the
  layer's balance statistics over every process (one differentiable all-reduce per call), so its
  `aux` is that of the global batch and each loss's gradient that of the global loss;
- each expert weight's gradient is divided by ep: a process's loss is the mean over its own
  tokens, and an expert receives the gradients of all ep processes' losses, so its gradient
  becomes that of their mean. Gradients of the replicated parameters (routers, attention, shared
  experts, which stay whole) stay per process: `apply_data_parallel` averages them.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from moekit.config import check_choice
from moekit.distributed.comm import all_reduce_sum
from moekit.distributed.dispatch import AllToAllDispatcher, GlobalCapacityDispatcher
from moekit.distributed.mesh import Layout, layout_of
from moekit.distributed.shard_specs import add_split
from moekit.experts import Experts
from moekit.moe import MoELayer

SCOPES = ("global", "local")


def apply_expert_parallel(
    model: nn.Module,
    mesh_or_group: Any,
    *,
    scope: str = "global",
    scale_expert_grads: bool = True,
) -> nn.Module:
    """Make every MoE layer of `model` expert-parallel over `mesh_or_group`; returns `model`.

    mesh_or_group: a `ParallelMesh` (split over its "ep" axis, copies along the expert
        data-parallel ones), or a process group or 1-D mesh (split over all of its processes).
    scope: "global" or "local", as `ParallelConfig.scope` defines them.
    scale_expert_grads: divide each expert gradient by ep as it is computed (see the module
        docstring); False when FSDP2 divides instead (`apply_fully_shard`).

    Every process must call it with the same model and arguments. Raises ValueError, changing
    nothing, when a layer cannot be split (E not divisible by the group size, expert-choice
    routing) or is already expert-parallel.
    """
    check_choice("scope", scope, SCOPES)
    layout = layout_of(mesh_or_group)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]
    if not layers:
        raise ValueError(f"{type(model).__name__} contains no MoELayer to make expert-parallel")
    for name, layer in layers:
        _check_layer(name or "<model>", layer, layout.ep_size)
    for _, layer in layers:
        _parallelize(layer, layout, scope, scale_expert_grads)
    return model


def expert_parallel_layers(model: nn.Module) -> list[tuple[str, MoELayer, AllToAllDispatcher]]:
    """(name, layer, dispatcher) of every MoE layer `apply_expert_parallel` converted."""
    return [
        (name, m, m.dispatcher)
        for name, m in model.named_modules()
        if isinstance(m, MoELayer) and isinstance(m.dispatcher, AllToAllDispatcher)
    ]


def _check_layer(name: str, layer: MoELayer, ep: int) -> None:
    cfg = layer.cfg
    if isinstance(layer.dispatcher, AllToAllDispatcher):
        raise ValueError(f"MoE layer {name!r} is already expert-parallel")
    if not cfg.token_choice:
        raise ValueError(
            f"MoE layer {name!r} uses router={cfg.router!r}: expert parallelism needs a "
            "token-choice router (each expert's choice of tokens would span every process)"
        )
    if cfg.n_experts % ep:
        raise ValueError(
            f"MoE layer {name!r} has n_experts={cfg.n_experts}, which does not divide over an "
            f"expert-parallel group of {ep} processes; use a group size that divides "
            f"{cfg.n_experts}"
        )


def _parallelize(layer: MoELayer, layout: Layout, scope: str, scale_grads: bool) -> None:
    cfg = layer.cfg
    local = layer.dispatcher
    if cfg.capacity_factor is not None and scope == "global" and layout.world_size > 1:
        local = GlobalCapacityDispatcher(cfg, layout.batch_group)
    dispatcher = AllToAllDispatcher(local, cfg.n_experts, layout)
    if layout.ep_size > 1:
        layer.experts = shard_experts(layer.experts, dispatcher.first_expert, dispatcher.n_local)
        for name, _ in [*layer.experts.named_parameters(), *layer.experts.named_buffers()]:
            add_split(layer.experts, name, layout.ep_group, 0)
        for p in layer.experts.parameters():
            if p.requires_grad and scale_grads:
                p.register_hook(partial(torch.mul, other=1.0 / layout.ep_size))
    layer.dispatcher = dispatcher
    sum_over_batch = partial(all_reduce_sum, group=layout.batch_group)
    layer.reduce_bias_counts = sum_over_batch
    if scope == "global":
        layer.reduce_stats = sum_over_batch


def shard_experts(experts: Experts, first: int, n_local: int) -> Experts:
    """An `Experts` of the same config holding experts [first, first + n_local) of `experts`.

    Every parameter and buffer of an `Experts` is stacked on a leading expert axis; each is
    sliced (copied, so the full tensors can be freed). The result loads a full state dict, whose
    expert tensors it slices the same way.
    """
    n_experts = experts.cfg.n_experts
    with torch.device("meta"):
        local = Experts(experts.cfg)
    for name, tensor in [*experts.named_parameters(), *experts.named_buffers()]:
        if tensor.dim() == 0 or tensor.shape[0] != n_experts:
            raise ValueError(
                f"Experts.{name} has shape {tuple(tensor.shape)}, with no leading axis of "
                f"{n_experts} experts to split"
            )
        piece = tensor.detach()[first : first + n_local].clone()
        if isinstance(tensor, nn.Parameter):
            piece = nn.Parameter(piece, requires_grad=tensor.requires_grad)
        module_name, _, attr = name.rpartition(".")
        setattr(local.get_submodule(module_name), attr, piece)
    local.train(experts.training)
    local.register_load_state_dict_pre_hook(_slice_full_tensors(n_experts, first, n_local))
    return local


def _slice_full_tensors(n_experts: int, first: int, n_local: int) -> Callable[..., None]:
    """A load_state_dict pre-hook: full (n_experts, ...) tensors are cut to this shard."""

    def hook(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
        for key in [k for k in state_dict if k.startswith(prefix)]:
            value = state_dict[key]
            if value.dim() and value.shape[0] == n_experts != n_local:
                state_dict[key] = value[first : first + n_local]

    return hook
