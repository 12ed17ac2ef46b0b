"""How each tensor of a parallel model is held on this process, relative to the single-process
model, so that checkpoints, gradient norms and optimizer states can go between the two.

A tensor of the single-process model becomes this process's piece in up to three steps:

1. `permute`: its entries along one axis are reordered (the fused [gate; up] rows of a SwiGLU
   input projection, so that each tensor-parallel piece holds matching gate and up rows);
2. `splits`: it is cut into equal chunks along an axis over a process group, and this process
   keeps chunk `rank` (routed experts over the expert-parallel group, an expert's hidden
   dimension or the attention sinks over the tensor-parallel group), in order;
3. a `DTensor` on top (FSDP2's shards, `parallelize_module`'s splits) carries its own layout and
   is undone with `full_tensor()`.

Steps 1-2 are recorded here (`add_split`, `set_permutation`) on the module that owns the tensor;
`full_tensor` and `local_piece` undo and redo all three.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.distributed.tensor import DTensor, distribute_tensor

_ATTR = "_moekit_shard_specs"


@dataclass(frozen=True)
class ShardSpec:
    """Steps 1-2 of the module docstring for one tensor: permute (dim, order), then splits."""

    splits: tuple[tuple[ProcessGroup, int], ...] = ()
    permute: tuple[int, Tensor] | None = None


def _specs(module: nn.Module) -> dict[str, ShardSpec]:
    return module.__dict__.setdefault(_ATTR, {})


def add_split(module: nn.Module, name: str, group: ProcessGroup, dim: int) -> None:
    """Record that `module.<name>` holds chunk rank-of-`group` of the full tensor along `dim`
    (after the steps recorded before)."""
    specs = _specs(module)
    spec = specs.get(name, ShardSpec())
    specs[name] = replace(spec, splits=(*spec.splits, (group, dim)))


def set_permutation(module: nn.Module, name: str, dim: int, order: Tensor) -> None:
    """Record that `module.<name>` is the full tensor's entries `order` along `dim` (before any
    split)."""
    specs = _specs(module)
    specs[name] = replace(specs.get(name, ShardSpec()), permute=(dim, order))


def shard_specs(model: nn.Module) -> dict[str, ShardSpec]:
    """Every recorded spec of `model`, by state-dict key (as `model.state_dict()` names it)."""
    found = {}
    for prefix, module in model.named_modules():
        for name, spec in module.__dict__.get(_ATTR, {}).items():
            found[f"{prefix}.{name}" if prefix else name] = spec
    return found


def split_piece(full: Tensor, group: ProcessGroup, dim: int) -> Tensor:
    """This process's chunk of `full` along `dim` over `group` (a copy)."""
    n = group.size()
    if full.shape[dim] % n:
        raise ValueError(f"a tensor of shape {tuple(full.shape)} does not split in {n} along {dim}")
    return full.chunk(n, dim)[dist.get_rank(group)].clone()


def full_tensor(piece: Tensor, spec: ShardSpec | None) -> Tensor:
    """The single-process tensor `piece` is this process's part of (collective over the groups
    of `spec` and the DTensor's mesh: every process holding a part must call it)."""
    full = piece.full_tensor() if isinstance(piece, DTensor) else piece
    if spec is None:
        return full
    for group, dim in reversed(spec.splits):
        parts = [torch.empty_like(full) for _ in range(group.size())]
        dist.all_gather(parts, full.contiguous(), group=group)
        full = torch.cat(parts, dim)
    if spec.permute is not None:
        dim, order = spec.permute
        full = full.index_select(dim, torch.argsort(order))
    return full


def local_piece(full: Tensor, spec: ShardSpec | None, like: Tensor) -> Tensor:
    """This process's piece of the single-process tensor `full`, laid out as `like` (the
    parameter or state it will replace; a DTensor gets `like`'s mesh and placements). Local:
    no communication."""
    piece = full
    if spec is not None:
        if spec.permute is not None:
            dim, order = spec.permute
            piece = piece.index_select(dim, order)
        for group, dim in spec.splits:
            piece = split_piece(piece, group, dim)
    if isinstance(like, DTensor):
        return distribute_tensor(piece, like.device_mesh, like.placements, src_data_rank=None)
    return piece
