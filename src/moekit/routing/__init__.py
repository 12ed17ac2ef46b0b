"""Routers: tokens -> (expert ids, weights). One file per family."""

from moekit.routing.base import Routing, expert_capacity
from moekit.routing.expert_choice import expert_choice_route
from moekit.routing.router import Router
from moekit.routing.topk import group_limit, topk_route

__all__ = [
    "Router",
    "Routing",
    "expert_capacity",
    "expert_choice_route",
    "group_limit",
    "topk_route",
]
