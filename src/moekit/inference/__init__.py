"""moekit.inference: expert offloading and its cache, routing traces and the cache simulator (see
../shared/DESIGN.md).

    budget.py             expert budgets (a count, a fraction, bytes) -> a number of experts
    cache.py              the expert cache, its eviction policies and statistics
    store.py              where offloaded experts are read from (expert files, a checkpoint)
    offloaded_experts.py  `OffloadedExperts`, the drop-in for `Experts` that reads the cache
    offload.py            `apply_expert_offload`, prefetch, `load_offloaded`
    trace.py              the routing-trace recorder and file format
    cache_sim.py          a trace replayed against the policies and Belady's oracle
"""

from moekit.inference.budget import resolve_budget
from moekit.inference.cache import CacheStats, ExpertCache
from moekit.inference.offload import ExpertOffload, apply_expert_offload, load_offloaded
from moekit.inference.store import write_expert_files

__all__ = [
    "CacheStats",
    "ExpertCache",
    "ExpertOffload",
    "apply_expert_offload",
    "load_offloaded",
    "resolve_budget",
    "write_expert_files",
]
