"""The device meshes of a run: named axes from `ParallelConfig`, and the groups each piece uses.

World ranks are laid out as (dp_replicate, dp_shard, tp), tp fastest. Two meshes view them:

    dense    ("dp_replicate", "dp_shard", "tp"): FSDP2 shards every non-expert parameter over
             dp_shard and replicates it over dp_replicate; tensor parallelism runs over tp.
             "dp_replicate" and "tp" are left out when they are 1: every axis of the mesh a
             DTensor spans costs it time on every operation (its sharding propagation).
    experts  ("edp_replicate", "edp_shard", "ep", "tp"): the same ranks, with the data-parallel
             ones (dp_replicate * dp_shard) regrouped: each MoE layer's routed experts are split
             over "ep", sharded by FSDP2 over "edp_shard" (the dp_shard / ep processes that hold
             the same experts) and replicated over "edp_replicate" (as torchtitan's sparse mesh).

A process's rows of every global batch are those of its data-parallel rank, rank // tp: the tp
processes of one data rank see the same rows (with sequence parallelism, each holds 1 / tp of
their positions between blocks).

The groups expert parallelism talks to are a `Layout`:

    ep group     the ep processes that split every MoE layer's experts between them and
                 exchange tokens by all-to-all;
    dp group     the processes that hold copies of the same expert shard and average those
                 experts' gradients (None when there are none);
    batch group  the data-parallel processes (of this tensor-parallel index): their tokens form
                 the global batch that balance statistics and capacity are computed over.

A run's is `ParallelMesh.expert_layout`; a process group or a 1-D mesh is the layout of experts
split over all of its processes, with no copies (`layout_of`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from functools import cached_property
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh

from moekit.config import ParallelConfig

DENSE_AXES = ("dp_replicate", "dp_shard", "tp")
EXPERT_AXES = ("edp_replicate", "edp_shard", "ep", "tp")


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


@dataclass(frozen=True)
class ParallelMesh:
    """The run's meshes (see the module docstring) and the axis sizes they were built from."""

    dense: DeviceMesh
    experts: DeviceMesh
    sizes: dict[str, int]
    group_options: tuple[str, Any] | None = None  # (backend, options with the run's timeout)

    @property
    def tp(self) -> int:
        return self.sizes["tp"]

    @property
    def data_size(self) -> int:
        """D: the number of data-parallel ranks (each with its own rows of a batch)."""
        return self.sizes["dp_replicate"] * self.sizes["dp_shard"]

    @property
    def data_rank(self) -> int:
        return dist.get_rank() // self.tp

    @cached_property
    def dp(self) -> DeviceMesh:
        """The mesh FSDP2 runs non-expert parameters over: ("dp_replicate", "dp_shard") (HSDP),
        or ("dp_shard",) without replicas."""
        return self.dense[_data_axes("dp", self.sizes)]

    @cached_property
    def edp(self) -> DeviceMesh:
        """The mesh FSDP2 runs the routed experts over: ("edp_replicate", "edp_shard"), or
        ("edp_shard",) without replicas."""
        return self.experts[_data_axes("edp", self.sizes)]

    @cached_property
    def tp_mesh(self) -> DeviceMesh:
        if self.tp == 1:
            raise ValueError("this layout has no tensor-parallel axis (parallel.tp=1)")
        return self.dense["tp"]

    @cached_property
    def expert_layout(self) -> Layout:
        """The groups of expert parallelism: ep (split the experts), the data-parallel ranks of
        this tp index (the global batch), and the expert copies (edp)."""
        data = self.experts["edp_replicate", "edp_shard", "ep"]._flatten(
            "data", backend_override=self.group_options
        )
        copies = None
        if self.edp.size() > 1:
            copies = self.edp._flatten("edp", backend_override=self.group_options).get_group()
        return Layout(self.experts.get_group("ep"), data.get_group(), copies)


def build_mesh(
    parallel: ParallelConfig, device_type: str = "cpu", backend: str = "gloo"
) -> ParallelMesh:
    """The meshes of `parallel` over the joined default process group, every group with
    `parallel.timeout_s` (collective: every process calls it)."""
    sizes = parallel.sizes(dist.get_world_size())
    options = (
        dist.ProcessGroupNCCL.Options() if backend == "nccl" else dist.ProcessGroupGloo._Options()
    )
    options._timeout = timedelta(seconds=parallel.timeout_s)
    ranks = torch.arange(dist.get_world_size())

    def mesh(axes: tuple[str, ...]) -> DeviceMesh:
        axes = tuple(a for a in axes if sizes[a] > 1 or a not in ("dp_replicate", "tp"))
        shape = tuple(sizes[a] for a in axes)
        override = tuple((backend, options) for _ in axes)
        return DeviceMesh(
            device_type, ranks.reshape(shape), mesh_dim_names=axes, backend_override=override
        )

    return ParallelMesh(mesh(DENSE_AXES), mesh(EXPERT_AXES), sizes, (backend, options))


def _data_axes(prefix: str, sizes: dict[str, int]) -> tuple[str, ...]:
    """(prefix_replicate, prefix_shard) with replicas, else (prefix_shard,)."""
    if sizes[f"{prefix}_replicate"] > 1:
        return (f"{prefix}_replicate", f"{prefix}_shard")
    return (f"{prefix}_shard",)


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


def group_timeout(group: ProcessGroup) -> timedelta | None:
    """The timeout a process group was made with (None if it cannot be read)."""
    for device in ("cpu", "cuda"):
        try:
            return group._get_backend(torch.device(device)).options._timeout  # type: ignore[union-attr]
        except (RuntimeError, AttributeError):
            continue
    return None
