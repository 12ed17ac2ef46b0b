"""Which experts stay resident: eviction policies, the `ExpertCache` that applies them to real
weights, its statistics, and the groups in which a layer call asks it for experts.

A key is `(moe_layer, expert)`. A policy only chooses victims; the cache counts, loads, pins and
prefetches. `moekit cache-sim` drives this very cache (with no weights and no loader threads)
with the requests of a routing trace, grouped as the model pins them, so a simulated hit count is
the one the model gets on the same trace (without prefetch).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from torch import Tensor

from moekit.quant.schemes import QuantizedWeight

Key = tuple[int, int]
# One weight of an expert as the cache holds it: a float tensor, or a quantized run's
# `QuantizedWeight` (data, scales, offsets), counted at its stored bytes.
ExpertWeight = Tensor | QuantizedWeight
POLICIES = ("lru", "lfu", "static")
# Threads that read experts (prefetches and `get_many`'s misses): cold 400 KB reads from this
# machine's disk ran at 460 MB/s one at a time, 760 MB/s four at a time, 910 MB/s eight at a time.
LOADER_THREADS = 4


def expert_groups(experts: list[int], capacity: int, selected: bool) -> list[list[int]]:
    """The groups in which one MoE layer call fetches its distinct experts (ascending) from a
    cache of `capacity`, each group pinned together, in order: all at once when they fit; else,
    on the dispatch path (a prefill), chunks of `capacity`; on the selected path
    (`MoELayer.selected_path`: a decode step, few tokens), one expert at a time. `OffloadedExperts`
    fetches by these groups and `moekit cache-sim` replays them: the two count the same hits."""
    if len(experts) <= capacity:
        return [list(experts)] if experts else []
    step = 1 if selected else capacity
    return [list(experts[i : i + step]) for i in range(0, len(experts), step)]


def tensors_of(weights: tuple[ExpertWeight, ...]) -> list[Tensor]:
    """Every tensor of one expert's weights: a quantized weight's data, scales and offsets."""
    return [
        t
        for w in weights
        for t in (w.tensors().values() if isinstance(w, QuantizedWeight) else (w,))
    ]


class Policy:
    """Least recently used: `victim` is the candidate touched longest ago."""

    def __init__(self) -> None:
        self.order: OrderedDict[Key, None] = OrderedDict()

    def touch(self, key: Key) -> None:
        self.order[key] = None
        self.order.move_to_end(key)

    def insert(self, key: Key) -> None:
        """A key loaded without being requested (prefetched): known, but not a use."""
        self.order.setdefault(key)

    def victim(self, candidates: set[Key]) -> Key | None:
        return next((k for k in self.order if k in candidates), None)


class LFUPolicy(Policy):
    """Least frequently used: fewest requests since the cache began (ties: least recent)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[Key, int] = {}

    def touch(self, key: Key) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1
        super().touch(key)

    def victim(self, candidates: set[Key]) -> Key | None:
        rank = {k: i for i, k in enumerate(self.order)}
        pool = [k for k in candidates if k in rank]
        return min(pool, key=lambda k: (self.counts.get(k, 0), rank[k]), default=None)


class StaticPolicy(Policy):
    """A fixed set of experts (the most used in a recorded trace) is never evicted; the other
    slots are LRU, so any request can still be served."""

    def __init__(self, pinned: Iterable[Key]) -> None:
        super().__init__()
        self.pinned = set(pinned)

    def victim(self, candidates: set[Key]) -> Key | None:
        return super().victim(candidates - self.pinned) or super().victim(candidates)


def make_policy(name: str, counts: Tensor | None = None, n_static: int = 0) -> Policy:
    """The policy called `name`; "static" keeps the `n_static` keys (layer, expert) with the
    largest `counts` (n_moe_layers, n_experts), e.g. a routing trace's `expert_counts()`."""
    if name == "lru":
        return Policy()
    if name == "lfu":
        return LFUPolicy()
    if name == "static":
        if counts is None:
            raise ValueError("policy='static' needs a routing trace's counts (--offload.trace)")
        rows = counts.tolist()
        by_key = {(i, e): int(c) for i, row in enumerate(rows) for e, c in enumerate(row)}
        top = sorted(by_key, key=lambda k: (-by_key[k], k))[: max(n_static, 0)]
        return StaticPolicy(top)
    raise ValueError(f"policy={name!r} is unknown; choose one of {', '.join(POLICIES)}")


@dataclass
class CacheStats:
    """What the cache did. A hit is a request served without a synchronous load (a prefetched
    expert counts as a hit even if the request had to wait for its load to finish)."""

    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    load_wait_s: float = 0.0
    prefetched: int = 0
    prefetch_used: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / max(self.hits + self.misses, 1)

    @property
    def prefetch_accuracy(self) -> float:
        """Share of the prefetched experts that were requested before being evicted."""
        return self.prefetch_used / max(self.prefetched, 1)

    def as_dict(self) -> dict[str, float]:
        d = asdict(self)
        d.update(hit_rate=self.hit_rate, prefetch_accuracy=self.prefetch_accuracy)
        return d


class ExpertCache:
    """At most `capacity` experts' weights resident; `load(key)` reads one from disk.

    `get` pins an expert being computed until `unpin`. Prefetches reserve their slot when issued, so
    resident plus in-flight experts never exceed the capacity. `loader_threads=0`: every load
    runs in the requesting thread (what a simulation wants; no prefetch then), with the same
    hits, misses and evictions.
    """

    def __init__(
        self,
        load: Callable[[Key], tuple[ExpertWeight, ...]],
        capacity: int,
        policy: Policy,
        *,
        loader_threads: int = LOADER_THREADS,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity={capacity} is invalid: must hold at least one expert")
        self.load, self.capacity, self.policy = load, capacity, policy
        self.loader_threads = loader_threads
        self.resident: dict[Key, tuple[ExpertWeight, ...]] = {}
        self.pending: dict[Key, Future] = {}
        self.pinned: dict[Key, int] = {}
        self.unused_prefetch: set[Key] = set()
        self.stats = CacheStats()
        self.lock = threading.Lock()
        self.pool: ThreadPoolExecutor | None = None

    @property
    def resident_bytes(self) -> int:
        """Bytes of the weights held now (counting each tensor's storage)."""
        with self.lock:
            held = [t for w in self.resident.values() for t in tensors_of(w)]
        return sum(t.untyped_storage().nbytes() for t in held)

    def get(self, key: Key) -> tuple[ExpertWeight, ...]:
        """The weights of `key`, loading them (in this thread) if needed; the caller must
        `unpin(key)` after."""
        return self._fetch([key], background=False)[0]

    def get_many(self, keys: list[Key]) -> list[tuple[ExpertWeight, ...]]:
        """`get` for distinct keys that fit in the cache together (at most `capacity`): every
        missing one starts loading, on the loader threads, before any is waited for, so their
        disk reads overlap. Counted as `get` counts them; the caller must `unpin` each key."""
        if len(set(keys)) != len(keys) or len(keys) > self.capacity:
            raise ValueError(
                f"get_many needs distinct keys that fit in the cache together: {len(keys)} keys, "
                f"capacity {self.capacity}; use get() one key at a time"
            )
        return self._fetch(keys, background=self.loader_threads > 0)

    @contextmanager
    def using(self, keys: list[Key]) -> Iterator[list[tuple[ExpertWeight, ...]]]:
        """The weights of `keys` for the block (`get_many`; `get`, in this thread, for one key),
        each key unpinned after it whatever happens."""
        weights = self.get_many(keys) if len(keys) > 1 else [self.get(keys[0])]
        try:
            yield weights
        finally:
            for key in keys:
                self.unpin(key)

    def _fetch(self, keys: list[Key], background: bool) -> list[tuple[ExpertWeight, ...]]:
        """Pin, count and (re)load `keys`, then wait for them; on any error every key pinned
        here is unpinned again before it propagates."""
        t0 = time.perf_counter()
        pinned: list[Key] = []
        futures: list[Future | None] = []
        try:
            with self.lock:
                if background:
                    self._start_pool()
                for key in keys:
                    self.pinned[key] = self.pinned.get(key, 0) + 1
                    pinned.append(key)
                    self.policy.touch(key)
                    future = self.pending.get(key)
                    if key in self.resident or future is not None:
                        self.stats.hits += 1
                        if key in self.unused_prefetch:
                            self.unused_prefetch.discard(key)
                            self.stats.prefetch_used += 1
                    else:
                        self.stats.misses += 1
                        future = self._reserve(key, wait=True, background=background)
                    futures.append(future)
            for future in futures:
                future is None or future.result()
        except BaseException:
            for key in pinned:
                self.unpin(key)
            raise
        self.stats.load_wait_s += time.perf_counter() - t0
        with self.lock:
            return [self.resident[key] for key in keys]

    def unpin(self, key: Key) -> None:
        with self.lock:
            self.pinned[key] -= 1
            if not self.pinned[key]:
                del self.pinned[key]

    def prefetch(self, keys: Iterable[Key], protect_layer: int | None = None) -> None:
        """Start loading `keys` in a background thread, into free slots or slots of unpinned
        experts not of `protect_layer` (the layer about to run); stops when no slot is free."""
        if not self.loader_threads:
            raise ValueError("prefetch needs loader threads: this cache has loader_threads=0")
        with self.lock:
            self._start_pool()
            for key in keys:
                if key in self.resident or key in self.pending:
                    continue
                if self._reserve(key, wait=False, protect_layer=protect_layer) is None:
                    return
                self.stats.prefetched += 1
                self.unused_prefetch.add(key)

    def _start_pool(self) -> None:
        if self.pool is None:
            self.pool = ThreadPoolExecutor(self.loader_threads, thread_name_prefix="moekit-loader")

    def close(self) -> None:
        """Stop the loader threads (after their loads finish)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None

    def _reserve(
        self, key: Key, wait: bool, protect_layer: int | None = None, background: bool = False
    ) -> Future | None:
        """With the lock held: free a slot (of an unpinned expert not of `protect_layer`) and
        start loading `key` into it, in this thread when `wait` (for a free slot) and not
        `background`, else on a loader thread."""
        while len(self.resident) + len(self.pending) >= self.capacity:
            candidates = {
                k for k in self.resident if k not in self.pinned and k[0] != protect_layer
            }
            victim = self.policy.victim(candidates)
            if victim is not None:
                del self.resident[victim]
                self.unused_prefetch.discard(victim)
            elif wait and self.pending:  # every slot is loading: let one finish
                future = next(iter(self.pending.values()))
                self.lock.release()
                try:
                    future.result()
                finally:
                    self.lock.acquire()
            elif wait:
                raise RuntimeError(
                    f"expert cache of {self.capacity} experts is full of experts in use; "
                    "a layer needs more experts at once than the budget allows"
                )
            else:
                return None
        future: Future = Future()
        self.pending[key] = future
        self.policy.insert(key)
        if wait and not background:
            self.lock.release()
            try:
                self._fill(key, future)
            finally:
                self.lock.acquire()
            return future
        self.pool.submit(self._fill, key, future)
        return future

    def _fill(self, key: Key, future: Future) -> None:
        try:
            weights = self.load(key)
        except BaseException as exc:  # the waiter re-raises it
            with self.lock:
                self.pending.pop(key, None)
            future.set_exception(exc)
            return
        with self.lock:
            self.resident[key] = weights
            self.pending.pop(key, None)
            self.stats.bytes_read += sum(t.nbytes for t in tensors_of(weights))
        future.set_result(None)
