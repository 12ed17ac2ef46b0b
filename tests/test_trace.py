"""Routing traces and the cache simulator, on hand-built traces whose answers are known, and
against the real offloaded model, whose hit counts the simulator must reproduce exactly."""

from __future__ import annotations

import copy
import json
from unittest import mock

import pytest
import torch
from safetensors.torch import save_file

from moekit import ModelConfig, MoETransformer
from moekit.cli import main
from moekit.data import byte_tokenizer
from moekit.inference.cache_sim import belady, cache_sim_rows, simulate
from moekit.inference.offload import apply_expert_offload
from moekit.inference.store import write_expert_files
from moekit.inference.trace import (
    LayerCall,
    Trace,
    TraceRecorder,
    load_trace,
    record_prompts,
    save_trace,
)
from moekit.model.generation import generate
from moekit.userfiles import DamagedFile

TINY = ModelConfig.preset("tiny")
SEQ = [(0, e) for e in (1, 2, 3, 1, 2, 4, 1, 2)]
CALLS = [LayerCall(layer, (e,), True) for layer, e in SEQ]  # SEQ, one expert per layer call


def hit_rate(*args, **kwargs) -> float:
    return simulate(*args, **kwargs).hit_rate


def test_belady_by_hand() -> None:
    # capacity 2: misses 1 2 3 (evict 2) hit 1, miss 2 (evict 3), miss 4 (evict 2), hit 1, miss 2
    assert belady(SEQ, 2) == 2 / 8
    assert belady(SEQ, 4) == 4 / 8


def test_lru_and_lfu_by_hand() -> None:
    assert hit_rate(CALLS, 2, "lru") == 0.0  # each request evicts the next one needed
    # lfu keeps 1 once it has been used twice: hits only on the last request
    assert hit_rate(CALLS, 2, "lfu") == 1 / 8
    assert hit_rate(CALLS, 4, "lru") == 4 / 8


def test_static_keeps_the_most_used() -> None:
    counts = torch.tensor([[0, 5, 1, 1, 1]])
    # capacity 2, top_k 1: expert 1 never evicted -> hits at 1, 1; 2 always misses
    assert hit_rate(CALLS, 2, "static", counts, top_k=1) == 2 / 8


def test_a_layer_call_pins_its_experts_together() -> None:
    # capacity 2, lfu: 3 used five times, then 1; a call of (1, 2) holds 1 pinned while it
    # fetches 2, so it must evict 3 (the model's way), and 3 then misses. Key by key, the cache
    # would evict 1 (fewer uses than 3) and 3 would hit: the old simulator's overstatement.
    calls = [LayerCall(0, (3,), True)] * 5 + [LayerCall(0, (1,), True)]
    grouped = simulate([*calls, LayerCall(0, (1, 2), False), LayerCall(0, (3,), True)], 2, "lfu")
    assert (grouped.hits, grouped.misses) == (5, 4)
    alone = [*calls, *(LayerCall(0, (e,), True) for e in (1, 2, 3))]
    assert (simulate(alone, 2, "lfu").hits, simulate(alone, 2, "lfu").misses) == (6, 3)
    # more experts than the capacity: fetched in chunks (dispatch) or one at a time (decode)
    for selected in (False, True):
        stats = simulate([LayerCall(0, (0, 1, 2, 3), selected)] * 2, 2, "lru")
        assert (stats.hits, stats.misses) == (0, 8)


def test_requests_are_distinct_experts_per_step_and_layer() -> None:
    ids = torch.tensor([[[0, 1], [2, 3]], [[1, 0], [3, 2]], [[1, 2], [0, 3]]])  # (N=3, L=2, K=2)
    identity = {"n_layers": 2, "n_experts": 4}
    trace = Trace(ids, torch.tensor([0, 0, 1]), identity)
    assert trace.requests() == [(0, 0), (0, 1), (1, 2), (1, 3), (0, 1), (0, 2), (1, 0), (1, 3)]
    assert trace.expert_counts().tolist() == [[2, 3, 1, 0], [1, 0, 2, 3]]
    assert trace.derived and trace.layer_calls()[2] == LayerCall(0, (1, 2), True)


def test_recorded_trace_round_trips_and_rejects_another_model(tmp_path) -> None:
    model = MoETransformer(TINY).eval()
    with TraceRecorder(model) as rec:
        generate(model, torch.randint(0, TINY.vocab_size, (1, 4)), 3)
    trace = rec.trace()
    assert trace.ids.shape == (4 + 2, len(TINY.moe_layer_indices), TINY.moe.top_k)
    assert trace.step.tolist() == [0, 0, 0, 0, 1, 2]
    save_trace(trace, tmp_path / "t.trace")
    back = load_trace(tmp_path / "t.trace", TINY)
    assert torch.equal(back.ids, trace.ids) and not back.derived
    assert back.layer_calls() == trace.layer_calls()
    with pytest.raises(ValueError, match="another model"):
        load_trace(tmp_path / "t.trace", TINY.replace(n_layers=3))
    (tmp_path / "bad").write_bytes(b"not a trace")
    with pytest.raises(ValueError, match=r"bad is not a readable safetensors file.*moekit trace"):
        load_trace(tmp_path / "bad")


def _tampered(trace: Trace, path, tensors=None, **meta) -> None:
    saved = {"ids": trace.ids, "step": trace.step, "fetched": trace.fetched,
             "selected": trace.selected} | (tensors or {})  # fmt: skip
    metadata = {"moekit_trace": json.dumps(trace.identity), "moekit_trace_version": "2"} | meta
    save_file({k: v.contiguous() for k, v in saved.items() if v is not None}, str(path), metadata)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"tensors": {"fetched": None}}, "has no tensor fetched"),
        ({"moekit_trace_version": "two"}, "trace version 'two'"),
        ({"moekit_trace": "{n_layers: 2"}, "is not valid JSON"),
        ({"moekit_trace": "{}"}, "has no 'n_layers' in its model identity"),
        ({"tensors": {"selected": torch.zeros(1, 2, dtype=torch.bool)}}, "'selected' of shape"),
    ],
)
def test_a_damaged_trace_is_named_with_what_to_do(tmp_path, change: dict, says: str) -> None:
    model = MoETransformer(TINY).eval()
    with TraceRecorder(model) as rec:
        generate(model, torch.randint(0, 256, (1, 4)), 3)
    _tampered(rec.trace(), tmp_path / "t.trace", **change)
    with pytest.raises(DamagedFile, match=rf"t\.trace .*{says}.*record it again"):
        load_trace(tmp_path / "t.trace")


def test_a_trace_of_version_1_is_read_with_derived_calls(tmp_path, capsys) -> None:
    """A trace written before the layer calls were recorded (ids and step only, no version):
    read, its calls derived; with dropless dispatch they are exactly the recorded ones."""
    model = MoETransformer(TINY).eval()
    with TraceRecorder(model) as rec:
        generate(model, torch.randint(0, 256, (3, 6)), 3)  # an 18-token prefill, then decode
    trace = rec.trace()
    meta = {"moekit_trace": json.dumps(trace.identity)}
    save_file({"ids": trace.ids, "step": trace.step}, str(tmp_path / "v1.trace"), metadata=meta)
    old = load_trace(tmp_path / "v1.trace", TINY)
    assert old.derived and old.layer_calls() == trace.layer_calls()
    assert [c.selected for c in old.layer_calls()] == [False, False] + [True] * 4
    assert main(["cache-sim", str(tmp_path / "v1.trace")]) == 0
    assert "predates the record of each layer call's path" in capsys.readouterr().err
    save_trace(old, tmp_path / "again.trace")  # saved again, its derived calls stay derived
    assert load_trace(tmp_path / "again.trace").derived
    meta["moekit_trace_version"] = "3"
    save_file({"ids": trace.ids, "step": trace.step}, str(tmp_path / "v3.trace"), metadata=meta)
    with pytest.raises(ValueError, match="version 3, newer than this moekit reads"):
        load_trace(tmp_path / "v3.trace")


def run_prompts(model: MoETransformer) -> None:
    """Calls on every path of `OffloadedExperts`: a 21-token prefill (dispatch path, chunked
    below a layer's experts), a 10-token prefill and 3-token decode steps (selected path, one
    expert at a time when they do not fit), one-token decode steps."""
    gen = torch.Generator().manual_seed(3)
    for shape in [(3, 7), (2, 5), (1, 6)]:
        generate(model, torch.randint(0, TINY.vocab_size, shape, generator=gen), 12)


@pytest.mark.parametrize("capacity_factor", [None, 1.0], ids=["dropless", "capacity"])
def test_simulated_hits_are_the_real_caches(tmp_path, capacity_factor) -> None:
    """The simulator replays a trace to the very hit and miss counts the offloaded model gets on
    it, for every policy at the minimum budget (top_k), in between and with every expert."""
    cfg = TINY.replace(moe=TINY.moe.replace(capacity_factor=capacity_factor))
    torch.manual_seed(0)
    model = MoETransformer(cfg).eval()
    with TraceRecorder(model) as rec:
        run_prompts(model)
    trace = rec.trace()
    # a capacity-limited layer never takes the selected path: recorded, not guessed from tokens
    assert trace.selected.any() == (capacity_factor is None)
    counts, top_k = trace.expert_counts(), cfg.moe.top_k
    expert_dir = write_expert_files(model, tmp_path / "experts")
    every = len(cfg.moe_layer_indices) * cfg.moe.n_experts
    budgets, policies = [top_k, 3, 5, 8, every], ["lru", "lfu", "static"]
    real, simulated = {}, {}
    for budget in budgets:
        for policy in policies:
            offloaded = copy.deepcopy(model)
            handle = apply_expert_offload(
                offloaded, expert_dir, budget=budget, policy=policy, expert_counts=counts
            )
            with TraceRecorder(offloaded) as again:
                run_prompts(offloaded)
            handle.close()
            assert torch.equal(again.trace().fetched, trace.fetched)  # the same routing
            real[budget, policy] = (handle.cache.stats.hits, handle.cache.stats.misses)
            stats = simulate(trace.layer_calls(), budget, policy, counts, top_k)
            simulated[budget, policy] = (stats.hits, stats.misses)
    assert simulated == real
    rows = cache_sim_rows(trace, budgets, policies)
    for row in rows:
        for policy in policies:
            hits, misses = real[row["budget"], policy]
            assert row[policy] == hits / (hits + misses) <= row["belady"]


def test_trace_with_the_decode_kernels_and_glue_is_the_plain_models() -> None:
    """`moekit trace` runs the decode kernels and glue (apply_decode_kernels): the glue's one-token
    routing must not bypass the recorder's hooks, or every decode step goes unrecorded."""
    from moekit.inference.decode_kernels import apply_decode_kernels, remove_decode_kernels

    torch.manual_seed(0)
    model = MoETransformer(TINY).eval()
    prompt = torch.randint(0, TINY.vocab_size, (1, 5))

    def recorded() -> Trace:
        with TraceRecorder(model) as rec:
            generate(model, prompt, 6)
        return rec.trace()

    plain = recorded()
    assert plain.step.tolist() == [0] * 5 + [1, 2, 3, 4, 5]
    apply_decode_kernels(model)
    try:
        glued = recorded()
    finally:
        remove_decode_kernels(model)
    assert torch.equal(glued.ids, plain.ids) and torch.equal(glued.step, plain.step)
    assert torch.equal(glued.fetched, plain.fetched)
    assert torch.equal(glued.selected, plain.selected)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny model (max_seq_len 128) as a run directory, with the byte tokenizer."""
    from moekit.interop.convert import hf_run_config
    from moekit.train.checkpoint import write_new_run

    work = tmp_path_factory.mktemp("trace_cli")
    cfg = TINY.replace(vocab_size=257)
    byte_tokenizer().save(str(work / "tokenizer.json"))
    model = MoETransformer(cfg).eval()
    return write_new_run(work / "run", hf_run_config(cfg), model, work / "tokenizer.json")


def trace_cli(run, tmp_path, prompts: str, out: str = "r.trace", *extra: str) -> int:
    (tmp_path / "prompts.txt").write_text(prompts)
    return main(["trace", str(run), "--prompts", str(tmp_path / "prompts.txt"),
                 "--out", str(tmp_path / out), "--max_new_tokens=4", *extra])  # fmt: skip


def test_trace_refuses_a_prompt_that_fills_the_context_as_generate_does(
    tiny_run, tmp_path, capsys
) -> None:
    """A prompt of max_seq_len tokens or more is named by its line and length before the model
    is read (it was cut silently); one that leaves fewer positions than max_new_tokens is traced
    whole, with fewer new tokens, as generate does."""
    assert TINY.max_seq_len == 128
    with mock.patch("moekit.cli.trace.load", side_effect=AssertionError("loaded")):
        assert trace_cli(tiny_run, tmp_path, "def f(\n\n" + "x" * 402 + "\n") == 2
    err = capsys.readouterr().err
    assert err.endswith(
        f"moekit trace: error: the prompt on line 3 of {tmp_path / 'prompts.txt'} is 402 tokens; "
        "the model's max_seq_len=128 leaves no room to generate: shorten it to at most 127 "
        "tokens\n"
    )
    assert not (tmp_path / "r.trace").exists()
    assert trace_cli(tiny_run, tmp_path, "x" * 126 + "\n") == 0  # room for 2 of the 4 tokens
    trace = load_trace(tmp_path / "r.trace")
    assert trace.ids.shape[0] == 126 + 1  # the whole prompt, then one decode step
    model = MoETransformer(TINY.replace(vocab_size=257))
    with pytest.raises(ValueError, match=r"prompt 2 is 128 tokens; the model's max_seq_len=128"):
        record_prompts(model, byte_tokenizer(), ["x", "x" * 128], 4)


def test_trace_refuses_to_replace_an_existing_trace(tiny_run, tmp_path, capsys) -> None:
    assert trace_cli(tiny_run, tmp_path, "def f(\n") == 0
    first = (tmp_path / "r.trace").read_bytes()
    capsys.readouterr()
    assert trace_cli(tiny_run, tmp_path, "import json\n", "r.trace", "--max_new_tokens=2") == 2
    err = capsys.readouterr().err
    assert err.endswith(f"{tmp_path / 'r.trace'} exists; choose a new --out for the trace, or "
                        "remove the old one first\n")  # fmt: skip
    assert err.count("\n") == 1  # one line
    assert (tmp_path / "r.trace").read_bytes() == first
    (tmp_path / "r.trace").unlink()  # its settings file left behind: refused too, by name
    assert trace_cli(tiny_run, tmp_path, "import json\n") == 2
    assert (
        "r.trace.config.json exists (the settings of an earlier trace at" in capsys.readouterr().err
    )
    assert not (tmp_path / "r.trace").exists()
