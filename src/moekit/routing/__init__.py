"""Routers: tokens -> (expert ids, weights). One file per family."""

from moekit.routing.base import Routing, expert_capacity
from moekit.routing.router import Router

__all__ = [
    "Router",
    "Routing",
    "expert_capacity",
]
