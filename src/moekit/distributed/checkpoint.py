"""Checkpoints of expert-parallel models, in the single-process format.

Saving gathers every expert shard (weights and optimizer moments) to global rank 0, which then
holds exactly the state dicts one process training the whole model would hold, so the files on
disk are those of a single-process run (same keys, shapes, dtypes and layout) and any process
count, `moekit generate` or `moekit convert` reads them. Loading builds the whole model, loads the
checkpoint as one process would, then shards it: `shard_optimizer_state` cuts the optimizer's
moments the way `apply_expert_parallel` cut the weights.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from moekit.distributed.expert_parallel import expert_parallel_layers


def _expert_shards(model: nn.Module) -> dict[int, tuple[Any, int]]:
    """id(expert parameter) -> (its layer's dispatcher, the layer's n_experts)."""
    shards = {}
    for _, layer, dispatcher in expert_parallel_layers(model):
        for p in layer.experts.parameters():
            shards[id(p)] = (dispatcher, layer.cfg.n_experts)
    return shards


def _expert_keys(model: nn.Module) -> dict[str, Any]:
    """state_dict key of each expert tensor -> its layer's dispatcher."""
    keys = {}
    for name, layer, dispatcher in expert_parallel_layers(model):
        prefix = f"{name}.experts." if name else "experts."
        for key in layer.experts.state_dict():
            keys[prefix + key] = dispatcher
    return keys


def _gather_shard(tensor: Tensor, dispatcher: Any) -> Tensor | None:
    """Concatenate the expert-parallel group's shards of `tensor` on its rank 0 (else None)."""
    group = dispatcher.group
    if dispatcher.ep == 1:
        return tensor
    me = dist.get_rank(group)
    parts = [torch.empty_like(tensor) for _ in range(dispatcher.ep)] if me == 0 else None
    dist.gather(tensor.contiguous(), parts, group=group, group_dst=0)
    return torch.cat(parts) if parts is not None else None


def _holds_copy_zero(model: nn.Module) -> bool:
    """Whether this process is in the first copy (dp rank 0) of the expert shards."""
    layers = expert_parallel_layers(model)
    if not layers:
        return True
    dp_group = layers[0][2].layout.dp_group
    return dp_group is None or dist.get_rank(dp_group) == 0


def full_state_dicts(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> tuple[dict[str, Tensor] | None, dict[str, Any] | None]:
    """The whole model's state dict and the optimizer's, experts gathered, on global rank 0;
    (None, None) on every other process. Every process must call it (it is collective)."""
    module = model.module if isinstance(model, DistributedDataParallel) else model
    gathers = _holds_copy_zero(module)
    model_sd: dict[str, Tensor] | None = module.state_dict()
    keys = _expert_keys(module)
    for key, dispatcher in keys.items():
        if gathers:
            full = _gather_shard(model_sd[key], dispatcher)  # type: ignore[index]
            if full is not None:
                model_sd[key] = full  # type: ignore[index]
    optim_sd = None if optimizer is None else _full_optimizer_state(module, optimizer, gathers)
    if dist.get_rank() != 0:
        return None, None
    return model_sd, optim_sd


def _full_optimizer_state(
    module: nn.Module, optimizer: torch.optim.Optimizer, gathers: bool
) -> dict[str, Any]:
    shards = _expert_shards(module)
    sd = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, p in enumerate(params):
        if id(p) not in shards or index not in sd["state"] or not gathers:
            continue
        dispatcher, _ = shards[id(p)]
        # A copy: optimizer.state_dict() shares these dicts with the live optimizer state.
        entries = sd["state"][index] = dict(sd["state"][index])
        for name, value in entries.items():
            if isinstance(value, Tensor) and value.dim() and value.shape[0] == dispatcher.n_local:
                full = _gather_shard(value, dispatcher)
                if full is not None:
                    entries[name] = full
    return sd


def shard_optimizer_state(
    full_sd: dict[str, Any], optimizer: torch.optim.Optimizer, model: nn.Module
) -> dict[str, Any]:
    """`full_sd`, the state dict of an optimizer over the whole model, cut for `optimizer`, the
    same optimizer built over the expert-parallel `model` (same parameters, in the same order):
    each expert's moments keep this process's experts only."""
    module = model.module if isinstance(model, DistributedDataParallel) else model
    shards = _expert_shards(module)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, entries in full_sd["state"].items():
        p = params[int(index)]
        if id(p) not in shards:
            state[index] = entries
            continue
        dispatcher, n_experts = shards[id(p)]
        first, n = dispatcher.first_expert, dispatcher.n_local
        state[index] = {
            name: value[first : first + n]
            if isinstance(value, Tensor) and value.dim() and value.shape[0] == n_experts
            else value
            for name, value in entries.items()
        }
    return {"state": state, "param_groups": full_sd["param_groups"]}
