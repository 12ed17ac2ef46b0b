"""Routing traces and the cache simulator, on hand-built traces whose answers are known."""

from __future__ import annotations

import pytest
import torch

from moekit import ModelConfig, MoETransformer
from moekit.inference.trace import (
    Trace,
    TraceRecorder,
    belady,
    load_trace,
    save_trace,
    simulate,
)
from moekit.model.generation import generate

TINY = ModelConfig.preset("tiny")
SEQ = [(0, e) for e in (1, 2, 3, 1, 2, 4, 1, 2)]


def test_belady_by_hand() -> None:
    # capacity 2: misses 1 2 3 (evict 2) hit 1, miss 2 (evict 3), miss 4 (evict 2), hit 1, miss 2
    assert belady(SEQ, 2) == 2 / 8
    assert belady(SEQ, 4) == 4 / 8


def test_lru_and_lfu_by_hand() -> None:
    assert simulate(SEQ, 2, "lru") == 0.0  # each request evicts the next one needed
    # lfu keeps 1 once it has been used twice: hits only on the last request
    assert simulate(SEQ, 2, "lfu") == 1 / 8
    assert simulate(SEQ, 4, "lru") == 4 / 8


def test_static_keeps_the_most_used() -> None:
    counts = torch.tensor([[0, 5, 1, 1, 1]])
    # capacity 2, top_k 1: expert 1 never evicted -> hits at 1, 1; 2 always misses
    assert simulate(SEQ, 2, "static", counts, top_k=1) == 2 / 8


def test_requests_are_distinct_experts_per_step_and_layer() -> None:
    ids = torch.tensor([[[0, 1], [2, 3]], [[1, 0], [3, 2]], [[1, 2], [0, 3]]])  # (N=3, L=2, K=2)
    identity = {"n_layers": 2, "n_experts": 4}
    trace = Trace(ids, torch.tensor([0, 0, 1]), identity)
    assert trace.requests() == [(0, 0), (0, 1), (1, 2), (1, 3), (0, 1), (0, 2), (1, 0), (1, 3)]
    assert trace.expert_counts().tolist() == [[2, 3, 1, 0], [1, 0, 2, 3]]


def test_recorded_trace_round_trips_and_rejects_another_model(tmp_path) -> None:
    model = MoETransformer(TINY).eval()
    with TraceRecorder(model) as rec:
        generate(model, torch.randint(0, 256, (1, 4)), 3)
    trace = rec.trace()
    assert trace.ids.shape == (4 + 2, 2, 2)
    assert trace.step.tolist() == [0, 0, 0, 0, 1, 2]
    save_trace(trace, tmp_path / "t.trace")
    back = load_trace(tmp_path / "t.trace", TINY)
    assert torch.equal(back.ids, trace.ids)
    with pytest.raises(ValueError, match="another model"):
        load_trace(tmp_path / "t.trace", TINY.replace(n_layers=3))
    (tmp_path / "bad").write_bytes(b"not a trace")
    with pytest.raises(ValueError, match="not a readable routing trace"):
        load_trace(tmp_path / "bad")
