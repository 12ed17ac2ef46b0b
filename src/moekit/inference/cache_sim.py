"""`moekit cache-sim`: a routing trace replayed against the cache policies (on the very
`ExpertCache` the offloaded model uses) and against Belady's optimal oracle."""

from __future__ import annotations

from torch import Tensor

from moekit.inference.cache import CacheStats, ExpertCache, Key, expert_groups, make_policy
from moekit.inference.trace import LayerCall, Trace


def simulate(
    calls: list[LayerCall],
    capacity: int,
    policy: str,
    counts: Tensor | None = None,
    top_k: int = 1,
) -> CacheStats:
    """The statistics of an `ExpertCache` of `capacity` with `policy` (no weights, no loader
    threads, no prefetch) fed the layer calls in the groups of `expert_groups`, as
    `OffloadedExperts` pins them: the model's hits and misses on the same routing. "static" keeps
    the `capacity - top_k` most counted keys of `counts` (L, E), as the model does."""
    pol = make_policy(policy, counts, n_static=capacity - top_k)
    cache = ExpertCache(lambda key: (), capacity, pol, loader_threads=0)
    for call in calls:
        for group in expert_groups(list(call.experts), capacity, call.selected):
            with cache.using([(call.layer, e) for e in group]):
                pass
    return cache.stats


def belady(requests: list[Key], capacity: int) -> float:
    """Hit rate of the optimal offline policy (Belady 1966): on a miss with the cache full, evict
    the resident key whose next request is furthest away (or never comes).

    It serves the requests one key at a time and may evict any resident key, even one that the
    same layer call requested just before (the model keeps those pinned) and it reads nothing
    ahead of its request. Any cache without prefetch that serves the same sequence in the same
    order, `ExpertCache` with its group pins included, is such a demand-paging cache, so this is
    an upper bound on its hit rate; with prefetch a cache can count more hits."""
    next_use = [0] * len(requests)
    seen: dict[Key, int] = {}
    for i in range(len(requests) - 1, -1, -1):
        next_use[i] = seen.get(requests[i], len(requests))
        seen[requests[i]] = i
    resident: dict[Key, int] = {}  # key -> index of its next request
    hits = 0
    for i, key in enumerate(requests):
        if key in resident:
            hits += 1
        elif len(resident) >= capacity:
            del resident[max(resident, key=resident.__getitem__)]
        resident[key] = next_use[i]
    return hits / max(len(requests), 1)


def cache_sim_rows(trace: Trace, capacities: list[int], policies: list[str]) -> list[dict]:
    """Hit rate of each policy (as the model gets it, see `simulate`) and of Belady's oracle at
    each capacity (in experts)."""
    calls, requests, counts = trace.layer_calls(), trace.requests(), trace.expert_counts()
    top_k = trace.identity["top_k"]
    rows = []
    for cap in capacities:
        row = {"budget": cap, "belady": belady(requests, cap)}
        for p in policies:
            stats = simulate(calls, cap, p, counts if p == "static" else None, top_k)
            row[p] = stats.hit_rate
        rows.append(row)
    return rows
