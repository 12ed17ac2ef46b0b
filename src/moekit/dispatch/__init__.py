"""Dispatch: permute tokens to experts and back (dropless, capacity, expert choice)."""

from moekit.config import MoEConfig
from moekit.dispatch.base import Dispatcher, DispatchState
from moekit.dispatch.capacity import CapacityDispatcher, capacity_assignment
from moekit.dispatch.dropless import DroplessDispatcher
from moekit.dispatch.expert_choice import ExpertChoiceDispatcher


def make_dispatcher(cfg: MoEConfig) -> Dispatcher:
    """The dispatcher the config asks for."""
    if cfg.router == "expert_choice":
        return ExpertChoiceDispatcher()
    if cfg.capacity_factor is None:
        return DroplessDispatcher()
    return CapacityDispatcher(cfg)


__all__ = [
    "CapacityDispatcher",
    "DispatchState",
    "Dispatcher",
    "DroplessDispatcher",
    "ExpertChoiceDispatcher",
    "capacity_assignment",
    "make_dispatcher",
]
