"""Readable twin of the capacity assignment in `capacity.py`: plain Python loops over the
assignments, in priority order. Slow; for tests only."""

from __future__ import annotations

from torch import Tensor


def _priority(weights: list[list[float]], policy: str) -> list[tuple[int, int]]:
    T, K = len(weights), len(weights[0])
    pairs = [(t, k) for t in range(T) for k in range(K)]
    if policy == "position":
        return sorted(pairs, key=lambda p: (p[1], p[0]))
    return sorted(pairs, key=lambda p: (-weights[p[0]][p[1]], p[0] * K + p[1]))


def reference_capacity_assignment(
    ids_TK: Tensor,
    weights_TK: Tensor,
    selection_TE: Tensor,
    capacity: int,
    policy: str,
    overflow: str,
) -> list[list[int]]:
    """The expert each assignment ends on (-1 if dropped), as `capacity_assignment` defines it."""
    ids, weights, selection = ids_TK.tolist(), weights_TK.tolist(), selection_TE.tolist()
    T, K, E = len(ids), len(ids[0]), len(selection[0])
    load = [0] * E
    final = [[-1] * K for _ in range(T)]
    prio = _priority(weights, policy)
    for t, k in prio:
        if load[ids[t][k]] < capacity:
            final[t][k] = ids[t][k]
            load[ids[t][k]] += 1
    if overflow == "drop":
        return final
    ranked = [sorted(range(E), key=lambda e, t=t: -selection[t][e]) for t in range(T)]
    nxt = [K] * T
    homeless = [(t, k) for t, k in prio if final[t][k] < 0]
    while homeless:
        snapshot, proposals, seen, exhausted = list(load), [], set(), set()
        for t, k in homeless:
            if t in seen:
                continue
            seen.add(t)
            while nxt[t] < E and (
                snapshot[ranked[t][nxt[t]]] >= capacity
                or selection[t][ranked[t][nxt[t]]] == float("-inf")
            ):
                nxt[t] += 1
            if nxt[t] == E:
                exhausted.add(t)
                continue
            proposals.append((t, k, ranked[t][nxt[t]]))
            nxt[t] += 1
        for t, k, e in proposals:
            if load[e] < capacity:
                final[t][k] = e
                load[e] += 1
        homeless = [(t, k) for t, k in homeless if final[t][k] < 0 and t not in exhausted]
    return final
