"""What the trainer asks of the processes it runs on, and of the parallelism applied to its model.

`World` is the processes (rank, size, averaging, waiting, who writes the run directory);
`Parallelism` is how a built model is spread over them (applied before the optimizer is built),
how its state is gathered for a checkpoint and cut again on resume, and which rows of each global
batch are this process's. Both do nothing for one process (`World()`, `Parallelism()`);
`moekit.distributed.trainer` gives the torch.distributed ones, so the trainer never imports
torch.distributed and there is one training loop.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from moekit.config import RunConfig


class World:
    """One process: nothing to average, nobody to wait for, and it writes the run directory."""

    rank: int = 0
    size: int = 1

    @property
    def is_writer(self) -> bool:
        """Whether this process writes metrics, config, report and checkpoints."""
        return self.rank == 0

    def all_reduce_mean(self, values: Tensor) -> Tensor:
        """The mean over the processes of a per-process tensor."""
        return values

    def barrier(self) -> None:
        """Wait until every process is here."""


class Parallelism:
    """A model trained as it is built, on one process."""

    def apply(self, model: nn.Module, grad_accum: int) -> nn.Module:
        """Spread the built `model` (weights already restored) in place; return the module the
        training loop calls for its forward passes."""
        return model

    def shard_optimizer_state(
        self, full_state: dict[str, Any], optimizer: torch.optim.Optimizer, model: nn.Module
    ) -> dict[str, Any]:
        """A checkpoint's optimizer state (of the whole model) cut for this process's
        `optimizer`."""
        return full_state

    def full_state_dicts(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[dict[str, Tensor] | None, dict[str, Any] | None]:
        """The whole model's and optimizer's state dicts on the writer (None elsewhere)."""
        return model.state_dict(), optimizer.state_dict()

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> Tensor:
        """Clip the gradients by the whole model's gradient norm; return that norm."""
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def my_share(self, batch: Tensor) -> Tensor:
        """This process's rows of a global batch."""
        return batch

    def before_step(self, seed: int, step: int) -> None:
        """Called before each optimizer step (e.g. to seed this process's router noise)."""


def wants_processes(cfg: RunConfig) -> bool:
    """Whether a run is meant for several processes: launched by torchrun with more than one,
    or asking for expert or data parallelism."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or cfg.parallel.min_world_size() > 1
