"""moekit.inference: the CPU decode kernels, expert offloading (store, budget, cache, offloaded
experts), routing traces and the cache simulator (see ../shared/DESIGN.md)."""

from moekit.inference.budget import resolve_budget
from moekit.inference.cache import CacheStats, ExpertCache
from moekit.inference.decode_kernels import apply_decode_kernels, remove_decode_kernels
from moekit.inference.offload import ExpertOffload, apply_expert_offload, load_offloaded
from moekit.inference.store import write_expert_files

__all__ = [
    "CacheStats",
    "ExpertCache",
    "ExpertOffload",
    "apply_decode_kernels",
    "apply_expert_offload",
    "load_offloaded",
    "remove_decode_kernels",
    "resolve_budget",
    "write_expert_files",
]
