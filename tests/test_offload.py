"""Expert offloading: bit-identical output at every budget, budget never exceeded, clear errors."""

from __future__ import annotations

import copy
import threading
import time
import warnings

import pytest
import torch
from safetensors.torch import save_model

from moekit import ModelConfig, MoETransformer
from moekit.inference.budget import resolve_budget
from moekit.inference.cache import ExpertCache, expert_groups, make_policy
from moekit.inference.offload import apply_expert_offload, load_offloaded
from moekit.inference.offloaded_experts import OffloadedExperts
from moekit.inference.store import layer_file, write_expert_files
from moekit.model.generation import KVCache, generate

TINY = ModelConfig.preset("tiny")


@pytest.fixture(scope="module")
def model_and_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = MoETransformer(TINY).eval()
    expert_dir = write_expert_files(model, tmp_path_factory.mktemp("offload") / "experts")
    return model, expert_dir


def greedy(model: MoETransformer, x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens (B, n) and the logits (B, n, V) that chose them."""
    cache = KVCache.for_model(model, x.shape[0], x.shape[1] + n)
    logits, ids = [], []
    with torch.no_grad():
        step = model(x, kv_cache=cache).logits[:, -1]
        for _ in range(n):
            logits.append(step)
            ids.append(step.argmax(-1))
            step = model(ids[-1][:, None], kv_cache=cache).logits[:, -1]
    return torch.stack(ids, 1), torch.stack(logits, 1)


@pytest.mark.parametrize(
    ("budget", "policy", "prefetch"),
    [(2, "lru", False), (2, "lru", True), (3, "lfu", True), (0.5, "static", False),
     ("25%", "static", True), (1.0, "lru", False)],
)  # fmt: skip
def test_offloaded_generation_is_bit_identical(model_and_dir, budget, policy, prefetch) -> None:
    model, expert_dir = model_and_dir
    x = torch.randint(0, TINY.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    ids, logits = greedy(model, x, 8)
    offloaded = copy.deepcopy(model)
    counts = torch.arange(16.0).view(2, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = apply_expert_offload(
            offloaded, expert_dir, budget=budget, policy=policy, prefetch=prefetch,
            expert_counts=counts,
        )  # fmt: skip
        try:
            got_ids, got_logits = greedy(offloaded, x, 8)
        finally:
            handle.close()
    assert torch.equal(got_ids, ids)
    assert torch.equal(got_logits, logits)
    stats = handle.stats()
    assert stats["hits"] + stats["misses"] > 0
    assert stats["bytes_read"] % stats["expert_bytes"] == 0
    # at the minimum budget, top_k = 2, prefetch stands down and says so once
    stands_down = prefetch and stats["capacity"] == TINY.moe.top_k
    assert handle.prefetching == (prefetch and not stands_down)
    assert (stats["prefetched"] > 0) == handle.prefetching
    assert [str(w.message)[:22] for w in caught] == ["prefetch stands down: "] * stands_down


def test_an_mtp_blocks_experts_are_offloaded_too(tmp_path) -> None:
    """An expert directory holds the MTP block's experts after the main layers' (one file more);
    offloaded, they serve the drafts: speculative greedy output equals resident plain greedy, and
    the drafts read MTP experts through the cache."""
    torch.manual_seed(1)
    model = MoETransformer(TINY.replace(mtp_depth=1)).eval()
    n_main = len(model.moe_layers())
    expert_dir = write_expert_files(model, tmp_path / "experts")
    assert layer_file(expert_dir, n_main).is_file()
    prompt = torch.randint(0, TINY.vocab_size, (1, 7), generator=torch.Generator().manual_seed(2))
    expected = generate(model, prompt, 12)
    offloaded = copy.deepcopy(model)
    offload = apply_expert_offload(offloaded, expert_dir, budget=2 * TINY.moe.top_k)
    loaded, load = [], offload.cache.load
    offload.cache.load = lambda key: loaded.append(key) or load(key)
    try:
        mtp_layer = offloaded.moe_layers(with_mtp=True)[n_main]
        assert isinstance(mtp_layer.experts, OffloadedExperts)
        got = generate(offloaded, prompt, 12, speculative="mtp", draft_tokens=2)
        assert torch.equal(got, expected)
        assert any(layer == n_main for layer, _ in loaded)
    finally:
        offload.close()


def test_prefetch_stands_down_at_the_minimum_budget(model_and_dir) -> None:
    """At budget = top_k a layer's own experts fill the cache, so every prefetched read would be
    evicted before its use (the budget cannot hold them plus a guess): no prefetch, one warning
    for the whole run, and the same statistics as without prefetch."""
    model, expert_dir = model_and_dir
    x = torch.randint(0, TINY.vocab_size, (2, 6), generator=torch.Generator().manual_seed(4))
    stats = {}
    for prefetch in (False, True):
        offloaded = copy.deepcopy(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            handle = apply_expert_offload(offloaded, expert_dir, budget=2, prefetch=prefetch)
            greedy(offloaded, x, 6)
            handle.close()
        stats[prefetch] = handle.stats()
        assert len(caught) == prefetch and not handle.hooks
    assert "budget of 2 experts cannot hold a layer's top_k=2 experts" in str(caught[0].message)
    assert stats[True]["prefetched"] == 0 and stats[True] == stats[False] | {
        "load_wait_s": stats[True]["load_wait_s"]
    }


def test_expert_groups_are_the_pins_of_one_layer_call() -> None:
    assert expert_groups([1, 3, 4], 3, selected=False) == [[1, 3, 4]]  # fit: all at once
    assert expert_groups([1, 3, 4], 3, selected=True) == [[1, 3, 4]]
    assert expert_groups([0, 1, 3, 4, 6], 2, selected=False) == [[0, 1], [3, 4], [6]]  # chunks
    assert expert_groups([0, 1, 3], 2, selected=True) == [[0], [1], [3]]  # decode: one at a time
    assert expert_groups([], 2, selected=False) == []


def test_resident_bytes_never_exceed_the_budget(model_and_dir) -> None:
    model, expert_dir = model_and_dir
    offloaded = copy.deepcopy(model)
    handle = apply_expert_offload(offloaded, expert_dir, budget=3, prefetch=True)
    limit = 3 * handle.store.expert_bytes
    seen = []
    get = handle.cache.get

    def checked_get(key):
        seen.append(handle.cache.resident_bytes)
        return get(key)

    handle.cache.get = checked_get
    generate(offloaded, torch.randint(0, 256, (3, 5)), 6)
    handle.close()
    seen.append(handle.cache.resident_bytes)
    assert seen and max(seen) <= limit
    assert max(seen) == limit  # the budget is used
    assert handle.stats()["prefetched"] > 0  # prefetch reservations were inside it too


@pytest.fixture(scope="module")
def checkpoint(model_and_dir, tmp_path_factory):
    """The model saved as a training checkpoint saves it (one model.safetensors)."""
    path = tmp_path_factory.mktemp("checkpoint") / "model.safetensors"
    save_model(model_and_dir[0], str(path))
    return path


def tensor_bytes(model: MoETransformer) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.untyped_storage().nbytes() for t in tensors if not t.is_meta)


def test_loading_from_a_checkpoint_leaves_the_experts_in_the_file(model_and_dir, checkpoint):
    model, _ = model_and_dir
    loaded, handle = load_offloaded(checkpoint, TINY, budget=3, prefetch=True)
    experts = sum(layer.experts.w_in.nbytes + layer.experts.w_out.nbytes
                  for layer in model.moe_layers())  # fmt: skip
    assert tensor_bytes(loaded) == tensor_bytes(model) - experts
    x = torch.randint(0, TINY.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    try:
        got = greedy(loaded, x, 6)
        assert handle.cache.resident_bytes <= 3 * handle.store.expert_bytes
        assert handle.stats()["prefetched"] > 0
    finally:
        handle.close()
    want = greedy(model, x, 6)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_truncated_checkpoint_is_a_clear_error(checkpoint, tmp_path) -> None:
    short = tmp_path / "model.safetensors"
    short.write_bytes(checkpoint.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        load_offloaded(short, TINY, budget=4)


def test_budget_below_top_k_fails_before_changing_the_model(model_and_dir) -> None:
    model, expert_dir = model_and_dir
    offloaded = copy.deepcopy(model)
    with pytest.raises(ValueError, match="minimum is top_k=2"):
        apply_expert_offload(offloaded, expert_dir, budget=1)
    assert type(offloaded.moe_layers()[0].experts).__name__ == "Experts"


def test_missing_or_truncated_expert_file_is_a_clear_error(model_and_dir, tmp_path) -> None:
    model, _ = model_and_dir
    expert_dir = write_expert_files(model, tmp_path / "experts")
    path = layer_file(expert_dir, 1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="truncated"):
        apply_expert_offload(copy.deepcopy(model), expert_dir, budget=4)
    path.unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        apply_expert_offload(copy.deepcopy(model), expert_dir, budget=4)


def test_experts_of_another_model_are_rejected(model_and_dir) -> None:
    _, expert_dir = model_and_dir
    other = MoETransformer(TINY.replace(n_layers=3))
    with pytest.raises(ValueError, match="another model"):
        apply_expert_offload(other, expert_dir, budget=4)


def test_budget_forms() -> None:
    assert resolve_budget(5, 16, 1000, 2) == 5
    assert resolve_budget(0.5, 16, 1000, 2) == 8
    assert resolve_budget("25%", 16, 1000, 2) == 4
    assert resolve_budget("0.25", 16, 1000, 2) == 4
    assert resolve_budget("3kB", 16, 1000, 2) == 3
    assert resolve_budget(99, 16, 1000, 2) == 16
    with pytest.raises(ValueError, match="invalid"):
        resolve_budget("lots", 16, 1000, 2)
    # Without the experts' size (a routing trace) a budget in bytes is refused, not misread.
    assert resolve_budget("50%", 16, None, 2) == 8
    with pytest.raises(ValueError, match=r"in bytes.*a count"):
        resolve_budget("200MB", 16, None, 2)
    with pytest.raises(ValueError, match=r"minimum is top_k=2 \(12.5%"):
        resolve_budget(1, 16, None, 2)


def test_lru_and_lfu_evict_the_expected_expert() -> None:
    def run(policy: str, keys: list[int]) -> set[int]:
        cache = ExpertCache(lambda k: (torch.zeros(1),), 2, make_policy(policy))
        for k in keys:
            cache.get((0, k))
            cache.unpin((0, k))
        return {k for _, k in cache.resident}

    assert run("lru", [1, 1, 2, 3]) == {2, 3}
    assert run("lfu", [1, 1, 2, 3]) == {1, 3}


def test_get_many_overlaps_the_loads_and_counts_like_get() -> None:
    loading = {"now": 0, "most": 0}
    lock = threading.Lock()

    def slow_load(key):
        with lock:
            loading["now"] += 1
            loading["most"] = max(loading["most"], loading["now"])
        time.sleep(0.05)
        with lock:
            loading["now"] -= 1
        return (torch.full((2,), float(key[1])),)

    cache = ExpertCache(slow_load, 4, make_policy("lru"))
    try:
        cache.get((0, 0))
        cache.unpin((0, 0))
        weights = cache.get_many([(0, 0), (0, 1), (0, 2), (0, 3)])
        assert [float(w[0][0]) for w in weights] == [0, 1, 2, 3]
        assert loading["most"] >= 2  # the three misses were read at the same time
        assert (cache.stats.hits, cache.stats.misses) == (1, 4)
        assert set(cache.pinned) == {(0, e) for e in range(4)}
        for e in range(4):
            cache.unpin((0, e))
        cache.get_many([(0, 4), (0, 5)])  # evicts the least recently used, 0 and 1
        assert set(cache.resident) == {(0, 2), (0, 3), (0, 4), (0, 5)}
        with pytest.raises(ValueError, match="fit in the cache"):
            cache.get_many([(1, e) for e in range(5)])
    finally:
        cache.close()


def test_get_many_unpins_when_a_load_fails() -> None:
    def load(key):
        if key[1] == 1:
            raise OSError("disk gone")
        return (torch.zeros(1),)

    cache = ExpertCache(load, 2, make_policy("lru"))
    try:
        with pytest.raises(OSError, match="disk gone"):
            cache.get_many([(0, 0), (0, 1)])
        assert not cache.pinned and (0, 1) not in cache.resident
    finally:
        cache.close()


def test_a_failed_wait_leaves_nothing_pinned() -> None:
    """A request that waits on a failing prefetch, or runs out of room, unpins what it pinned."""
    gate = threading.Event()

    def load(key):
        if key == (0, 0):
            gate.wait(5)
            raise OSError("bad sector")
        return (torch.zeros(1),)

    cache = ExpertCache(load, 2, make_policy("lru"))
    try:
        cache.prefetch([(0, 0), (0, 1)])  # both slots reserved, (0, 0) about to fail
        gate.set()
        with pytest.raises(OSError, match="bad sector"):
            cache.get_many([(0, 0), (0, 2)])
        assert not cache.pinned
        cache.get((0, 3))
        cache.get((0, 4))  # both slots now pinned by the caller
        with pytest.raises(RuntimeError, match="full of experts in use"):
            cache.get_many([(0, 5)])
        assert cache.pinned == {(0, 3): 1, (0, 4): 1}
    finally:
        cache.close()


def test_a_failed_load_one_expert_at_a_time_raises_its_own_error() -> None:
    """More chosen experts than the cache holds: fetched one at a time; a failed read surfaces as
    itself (not as a second unpin's KeyError) and leaves nothing pinned."""
    torch.manual_seed(0)
    experts = MoETransformer(TINY).layers[0].ffn.experts

    def load(key):
        if key[1] == 1:
            raise OSError("disk gone")
        return experts.w_in[key[1]].detach(), experts.w_out[key[1]].detach()

    cache = ExpertCache(load, 2, make_policy("lru"))
    try:
        offloaded = OffloadedExperts(experts, 0, cache)
        x_TD = torch.randn(3, TINY.d_model)
        ids_TK = torch.tensor([[0, 1], [2, 3], [0, 2]])  # 4 experts chosen, 2 fit
        with torch.no_grad(), pytest.raises(OSError, match="disk gone"):
            offloaded.forward_selected(x_TD, ids_TK, torch.full((3, 2), 0.5))
        assert not cache.pinned
    finally:
        cache.close()


def test_offloading_a_model_without_experts_is_a_clear_error(tmp_path) -> None:
    """`moekit generate DENSE_RUN --offload.budget=50%` was an AttributeError traceback."""
    dense = TINY.replace(moe=None)
    path = tmp_path / "model.safetensors"
    save_model(MoETransformer(dense), str(path))
    with pytest.raises(ValueError, match="the model has no MoE layers: there are no experts"):
        load_offloaded(path, dense, budget="50%")
