"""moekit.inference: expert offloading and its cache (see ../shared/DESIGN.md)."""

from moekit.inference.cache import CacheStats, ExpertCache
from moekit.inference.offload import (
    ExpertOffload,
    apply_expert_offload,
    load_offloaded,
    resolve_budget,
    write_expert_files,
)

__all__ = [
    "CacheStats",
    "ExpertCache",
    "ExpertOffload",
    "apply_expert_offload",
    "load_offloaded",
    "resolve_budget",
    "write_expert_files",
]
