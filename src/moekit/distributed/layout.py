"""Where a process sits in an expert-parallel run: the process groups it talks to.

    ep group     the ep processes that split every MoE layer's experts between them and
                 exchange tokens by all-to-all;
    dp group     the processes that hold copies of the same expert shard and average those
                 experts' gradients (None when there are none);
    batch group  the data-parallel processes (of this tensor-parallel index): their tokens form
                 the global batch that balance statistics and capacity are computed over.

A run's layout is `ParallelMesh.expert_layout` (moekit.distributed.mesh); a process group or a
1-D mesh is the layout of experts split over all of its processes, with no copies.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh


@dataclass(frozen=True)
class Layout:
    """The process groups of this process (see the module docstring)."""

    ep_group: ProcessGroup
    batch_group: ProcessGroup
    dp_group: ProcessGroup | None

    @property
    def ep_size(self) -> int:
        return self.ep_group.size()

    @property
    def ep_rank(self) -> int:
        return dist.get_rank(self.ep_group)

    @property
    def dp_size(self) -> int:
        return 1 if self.dp_group is None else self.dp_group.size()

    @property
    def world_size(self) -> int:
        return self.batch_group.size()


def layout_of(mesh_or_group: Any) -> Layout:
    """The layout of a `ParallelMesh`, a process group or a 1-D device mesh (every process holds
    a share of the experts; no copies)."""
    if isinstance(mesh_or_group, ProcessGroup):
        return Layout(mesh_or_group, mesh_or_group, None)
    if isinstance(mesh_or_group, DeviceMesh):
        if mesh_or_group.ndim != 1:
            raise ValueError(
                f"expert parallelism takes a ParallelMesh (moekit.distributed.init_distributed), "
                f"a process group or a 1-D device mesh; got a {mesh_or_group.ndim}-D mesh"
            )
        group = mesh_or_group.get_group()
        return Layout(group, group, None)
    return mesh_or_group.expert_layout


def group_timeout(group: ProcessGroup | None) -> timedelta | None:
    """The timeout a process group was made with (None if it cannot be read)."""
    group = group or dist.group.WORLD
    for device in ("cpu", "cuda"):
        try:
            return group._get_backend(torch.device(device)).options._timeout  # type: ignore[union-attr]
        except (RuntimeError, AttributeError):
            continue
    return None
