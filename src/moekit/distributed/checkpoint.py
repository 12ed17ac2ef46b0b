"""Checkpoints of parallel models, in the single-process format.

Saving rebuilds each tensor of the single-process model, weights and optimizer moments alike,
from the processes' pieces (`shard_specs.full_tensor`), so global rank 0 holds the state dicts
one process would. Loading builds the whole model, loads the checkpoint as one process would,
then parallelizes it: `shard_optimizer_state` cuts the optimizer's moments the way the weights
were cut (`shard_specs.local_piece`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from moekit.distributed.shard_specs import ShardSpec, full_tensor, local_piece, shard_specs


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def full_state_dicts(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> tuple[dict[str, Tensor] | None, dict[str, Any] | None]:
    """The whole model's state dict and the optimizer's, in the single-process format, on
    global rank 0; (None, None) on every other process. Every process must call it (it is
    collective); one whole tensor at a time is held."""
    module = unwrap(model)
    specs = shard_specs(module)
    writer = dist.get_rank() == 0
    model_sd: dict[str, Tensor] = {}
    for key, value in module.state_dict().items():
        whole = full_tensor(value, specs.get(key))
        if writer:
            model_sd[key] = whole
    optim_sd = None if optimizer is None else _full_optimizer_state(module, optimizer, specs)
    if not writer:
        return None, None
    return model_sd, optim_sd


def _param_specs(
    module: nn.Module, optimizer: torch.optim.Optimizer, specs: dict[str, ShardSpec]
) -> list[tuple[nn.Parameter, ShardSpec | None]]:
    """(parameter, its spec) in the optimizer's order."""
    names = {id(p): name for name, p in module.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return [(p, specs.get(names.get(id(p), ""))) for p in params]


def _full_optimizer_state(
    module: nn.Module, optimizer: torch.optim.Optimizer, specs: dict[str, ShardSpec]
) -> dict[str, Any]:
    sd = optimizer.state_dict()
    for index, (p, spec) in enumerate(_param_specs(module, optimizer, specs)):
        if index not in sd["state"]:
            continue
        # A copy: optimizer.state_dict() shares these dicts with the live optimizer state.
        entries = sd["state"][index] = dict(sd["state"][index])
        for name, value in entries.items():
            if _is_moment(value, p):
                entries[name] = full_tensor(value, spec)
    return sd


def _is_moment(value: Any, p: Tensor) -> bool:
    """Whether an optimizer state entry is laid out as its parameter (not a step count)."""
    return isinstance(value, Tensor) and value.dim() > 0 and value.dim() == p.dim()


def shard_optimizer_state(
    full_sd: dict[str, Any], optimizer: torch.optim.Optimizer, model: nn.Module
) -> dict[str, Any]:
    """`full_sd`, the state dict of an optimizer over the whole model, cut for `optimizer`, the
    same optimizer built over the parallel `model` (same parameters, in the same order): each
    moment becomes this process's piece, laid out as its parameter."""
    module = unwrap(model)
    pairs = _param_specs(module, optimizer, shard_specs(module))
    state = {}
    for index, entries in full_sd["state"].items():
        p, spec = pairs[int(index)]
        state[index] = {
            name: local_piece(value, spec, p) if _is_moment(value, p) else value
            for name, value in entries.items()
        }
    return {"state": state, "param_groups": full_sd["param_groups"]}
