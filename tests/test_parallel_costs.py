"""`moekit.distributed.costs` against what the collectives are actually handed on gloo: one
training step (forward and backward) of a small MoE transformer under each layout of 4 processes,
every collective counted by `CollectiveCounter` in every process."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from tests.collective_cases import MODEL, counted_layouts
from tests.distributed_cases import spawn

from moekit.config import ParallelConfig
from moekit.distributed.costs import KINDS, device_costs
from moekit.distributed.count import by_kind

WORLD, MICRO_BATCH, SEQ_LEN = 4, 2, 8
LAYOUTS = {
    "dp_shard4": {"dp_shard": 4},
    "tp4": {"tp": 4},
    "ep4": {"ep": 4},
    "ep2_ddp4": {"ep": 2},  # DDP over 4, each expert shard on 2 processes (replica all-reduce)
    "dp_shard4_ep4": {"dp_shard": 4, "ep": 4},
    "dp_shard2_tp2": {"dp_shard": 2, "tp": 2},
    "ep2_tp2": {"ep": 2, "tp": 2},
    "hsdp2x2_ep2": {"dp_replicate": 2, "dp_shard": 2, "ep": 2},
    "dp_shard2_tp2_bf16_kept": {
        "dp_shard": 2,
        "tp": 2,
        "param_dtype": "bfloat16",
        "reshard_after_forward": False,
    },
    "dp_shard2_ep2_bf16": {"dp_shard": 2, "ep": 2, "dp_replicate": 2, "param_dtype": "bfloat16"},
    "dp_shard2_tp2_sp": {"dp_shard": 2, "tp": 2, "sequence_parallel": True},
    "ep2_tp2_sp": {"ep": 2, "tp": 2, "sequence_parallel": True},
    "tp4_sp_bf16": {"tp": 4, "sequence_parallel": True, "param_dtype": "bfloat16"},
}
pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def runs() -> Callable[[str], list[dict]]:
    """Every layout's counted step, by name: each rank's result."""
    args = (LAYOUTS, MODEL.to_dict(), MICRO_BATCH, SEQ_LEN)
    by_rank = spawn(counted_layouts, WORLD, *args, timeout=240)
    return lambda name: [ranks[name] for ranks in by_rank]


def predicted(name: str, rank: int):  # type: ignore[no-untyped-def]
    return device_costs(MODEL, ParallelConfig(**LAYOUTS[name]), WORLD, MICRO_BATCH, SEQ_LEN, rank)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_collectives_are_handed_the_bytes_costs_predicts(runs, name: str) -> None:
    results = runs(name)
    tp = LAYOUTS[name].get("tp", 1)
    a2a_measured = a2a_predicted = 0.0
    for rank, result in enumerate(results):
        measured = by_kind(result["records"], tp, rank)
        costs = predicted(name, rank)
        for kind in KINDS:
            got, want = measured[kind], costs.comms[kind]
            assert got["calls"] == want.calls, (name, rank, kind)
            if kind == "ep_all_to_all":  # rows received depend on the routing: summed below
                a2a_measured += got["payload"]
                a2a_predicted += want.payload
            else:
                assert got["payload"] == want.payload, (name, rank, kind)
        assert measured["other"]["calls"] == 0
    assert a2a_measured == a2a_predicted


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_each_process_holds_the_parameters_costs_predicts(runs, name: str) -> None:
    results = runs(name)
    held = [result["local_params"] for result in results]
    assert held == [predicted(name, rank).params for rank in range(WORLD)]
