"""Stacked expert weights; grouped compute and its readable reference."""

from moekit.experts.experts import Experts, SharedExperts, activate
from moekit.experts.grouped import GROUPED_MATMULS, grouped_mm_available, resolve_impl

__all__ = [
    "GROUPED_MATMULS",
    "Experts",
    "SharedExperts",
    "activate",
    "grouped_mm_available",
    "resolve_impl",
]
