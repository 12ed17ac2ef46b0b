"""Where a process sits in an expert-parallel run: the process groups it talks to.

A run's processes form a (dp, ep) grid, usually one `DeviceMesh` with dimensions named "dp" and
"ep" (`init_device_mesh("cpu", (dp, ep), mesh_dim_names=("dp", "ep"))`):

    ep group     the ep processes of one row, which split every MoE layer's experts between them
                 and exchange tokens by all-to-all;
    dp group     the dp processes of one column, which hold copies of the same expert shard and
                 average those experts' gradients;
    batch group  every process of the grid: their tokens form the global batch that balance
                 statistics and capacity are computed over, and that DDP averages over.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

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


def layout_of(mesh_or_group: DeviceMesh | ProcessGroup) -> Layout:
    """The layout of a process group (every process holds a share of the experts; no copies), a
    1-D device mesh (the same), or a 2-D mesh whose dimensions are named "ep" and "dp"."""
    if isinstance(mesh_or_group, ProcessGroup):
        return Layout(mesh_or_group, mesh_or_group, None)
    mesh = mesh_or_group
    if mesh.ndim == 1:
        group = mesh.get_group()
        return Layout(group, group, None)
    names = mesh.mesh_dim_names or ()
    if mesh.ndim != 2 or set(names) != {"dp", "ep"}:
        raise ValueError(
            f"expert parallelism takes a process group, a 1-D device mesh, or a 2-D mesh with "
            f"dimensions named ('dp', 'ep'); got a mesh of shape {tuple(mesh.shape)} with names "
            f"{names}"
        )
    ep_group, dp_group = mesh.get_group("ep"), mesh.get_group("dp")
    return Layout(ep_group, _whole_mesh_group(mesh, ep_group), dp_group)


def _whole_mesh_group(mesh: DeviceMesh, like: ProcessGroup) -> ProcessGroup:
    """A group of every process of the mesh: the default group when the mesh is the world."""
    ranks = sorted(int(r) for r in mesh.mesh.flatten())
    if ranks == list(range(dist.get_world_size())):
        return dist.group.WORLD  # type: ignore[return-value]
    return dist.new_group(ranks, timeout=group_timeout(like), use_local_synchronization=True)


def group_timeout(group: ProcessGroup | None) -> timedelta | None:
    """The timeout a process group was made with (None if it cannot be read)."""
    group = group or dist.group.WORLD
    for device in ("cpu", "cuda"):
        try:
            return group._get_backend(torch.device(device)).options._timeout  # type: ignore[union-attr]
        except (RuntimeError, AttributeError):
            continue
    return None
