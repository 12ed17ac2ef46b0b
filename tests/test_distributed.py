"""Expert parallelism gives one process's results: a layer's outputs, balance losses, metrics,
gradients and bias updates on 2 and 4 processes (EP=2, EP=4, EP=2 x DP=2) equal those of one
process on the same global batch. Processes are spawned on localhost with gloo; each layout runs
every case in one launch (module-scoped fixtures) and the tests below check one claim each."""

from __future__ import annotations

import socket

import pytest
import torch
from tests import distributed_cases
from tests.distributed_cases import (
    AUX_FIELDS,
    DP_ONLY_CASE,
    LAYER_CASES,
    STEPS,
    layer_and_batch,
    layer_cases,
    reference_case,
    reference_case_per_process,
    reference_model_pass,
    spawn,
)

from moekit.config import ModelConfig
from moekit.distributed import network_bytes, traffic_table

# float32 results computed in a different order (per-process sums, then an all-reduce).
TOL = dict(rtol=1e-5, atol=1e-6)

EVERY_CASE = list(LAYER_CASES)
FEW_CASES = ["dropless", "capacity", "sigmoid-bias"]
LAYOUTS = {  # name -> (ep, dp, cases)
    "ep2": (2, 1, EVERY_CASE),
    "ep4": (4, 1, FEW_CASES),
    "ep2xdp2": (2, 2, FEW_CASES),
}


@pytest.fixture(scope="module")
def runs() -> dict:
    """Each layout's per-process results, launched once per module."""
    cache: dict = {}

    def get(layout: str) -> list[dict]:
        if layout not in cache:
            ep, dp, cases = LAYOUTS[layout]
            extras = {"ep4": ("refused",), "ep2xdp2": ("model", "dp_only")}.get(layout, ())
            args = (ep, dp, cases, "global", extras)
            cache[layout] = spawn(layer_cases, ep * dp, *args, timeout=120)
        return cache[layout]

    return get  # type: ignore[return-value]


@pytest.fixture(scope="module")
def references() -> dict:
    cache: dict = {}

    def get(case: str, world: int) -> list[dict]:
        if (case, world) not in cache:
            cache[case, world] = reference_case(case, world)
        return cache[case, world]

    return get  # type: ignore[return-value]


CASES = [(layout, case) for layout, (_, _, cases) in LAYOUTS.items() for case in cases]


def whole(results: list[dict], case: str, step: int, key: str) -> torch.Tensor:
    """A per-token result of every process, concatenated in rank order (the global batch)."""
    return torch.cat([r[case]["passes"][step][key] for r in results])


@pytest.mark.parametrize(("layout", "case"), CASES)
def test_outputs_equal_one_process(runs, references, layout, case) -> None:
    ep, dp, _ = LAYOUTS[layout]
    results, ref = runs(layout), references(case, ep * dp)
    for step in range(STEPS):
        torch.testing.assert_close(whole(results, case, step, "y"), ref[step]["y"], **TOL)


@pytest.mark.parametrize(("layout", "case"), CASES)
def test_input_gradients_are_world_times_one_process(runs, references, layout, case) -> None:
    """Each process's loss is the mean over its share, so the gradient reaching each input is
    world times that of the global mean (as under any data parallelism: averaging the parameter
    gradients over the processes undoes it), balance-loss terms included."""
    ep, dp, _ = LAYOUTS[layout]
    results, ref = runs(layout), references(case, ep * dp)
    for step in range(STEPS):
        got = whole(results, case, step, "x_grad") / (ep * dp)
        torch.testing.assert_close(got, ref[step]["x_grad"], **TOL)


@pytest.mark.parametrize(("layout", "case"), CASES)
def test_losses_and_metrics_are_those_of_the_global_batch(runs, references, layout, case) -> None:
    ep, dp, _ = LAYOUTS[layout]
    results, ref = runs(layout), references(case, ep * dp)
    for step in range(STEPS):
        for rank, r in enumerate(results):
            aux = r[case]["passes"][step]["aux"]
            for field in AUX_FIELDS:
                expected = ref[step]["aux"][field]
                got = aux[field].to(expected.dtype)
                torch.testing.assert_close(got, expected, **TOL, msg=f"rank {rank} {field}")


@pytest.mark.parametrize(("layout", "case"), CASES)
def test_gradients_equal_one_process(runs, references, layout, case) -> None:
    ep, dp, _ = LAYOUTS[layout]
    results, ref = runs(layout), references(case, ep * dp)
    for step in range(STEPS):
        for name, expected in ref[step]["grads"].items():
            for row in range(dp):  # every copy of the experts holds the same gradient
                procs = results[row * ep : (row + 1) * ep]
                if name.startswith("experts."):  # rank j of a row holds the j-th slice
                    got = torch.cat([r[case]["passes"][step]["grads"][name] for r in procs])
                    torch.testing.assert_close(got, expected, **TOL, msg=name)
                else:
                    for r in procs:
                        got = r[case]["passes"][step]["grads"][name]
                        torch.testing.assert_close(got, expected, **TOL, msg=name)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_bias_update_is_identical_everywhere_and_to_one_process(runs, references, layout) -> None:
    ep, dp, _ = LAYOUTS[layout]
    results, ref = runs(layout), references("sigmoid-bias", ep * dp)
    for step in range(STEPS):
        assert ref[step]["expert_bias"].abs().sum() > 0  # the update did move the biases
        for r in results:
            got = r["sigmoid-bias"]["passes"][step]["expert_bias"]
            assert torch.equal(got, ref[step]["expert_bias"])


def test_each_process_holds_its_slice_of_the_experts(runs) -> None:
    results = runs("ep4")
    assert [r["dropless"]["first_expert"] for r in results] == [0, 2, 4, 6]


def test_all_to_all_bytes_are_the_rows_that_change_process(runs) -> None:
    """Each pass runs four all-to-alls: dispatch and combine, and their gradients. Each process
    sends the rows routed to the other's experts (dispatch, combine's gradient) and returns the
    rows it computed for the other (combine, dispatch's gradient): d_model float32 values each."""
    per_process = reference_case_per_process("dropless", 2)  # each process's own routing
    away = 0  # rows that change process, both ways, over the passes
    for step in range(STEPS):
        counts_0 = per_process[0][step]["aux"]["counts"]  # experts 0-3 live on process 0
        counts_1 = per_process[1][step]["aux"]["counts"]
        away += int(counts_0[4:].sum() + counts_1[:4].sum())
    for r in runs("ep2"):
        sent_bytes, calls = r["dropless"]["traffic"]
        assert calls == 4 * STEPS
        assert sent_bytes == 2 * away * 12 * 4


def test_local_scope_is_per_process_capacity() -> None:
    """scope="local": each process applies capacity and balance losses to its own tokens alone
    (GShard's per-group capacity), as if it were a single process holding only those."""
    results = spawn(layer_cases, 2, 2, 1, ["capacity"], "local", timeout=120)
    expected = reference_case_per_process("capacity", 2)
    for rank, r in enumerate(results):
        for step in range(STEPS):
            got, want = r["capacity"]["passes"][step], expected[rank][step]
            torch.testing.assert_close(got["y"], want["y"], **TOL)
            for field in ("balance_loss", "counts", "dropped_fraction"):
                torch.testing.assert_close(got["aux"][field], want["aux"][field], **TOL)
    dropped = [r["capacity"]["passes"][0]["aux"]["dropped_fraction"] for r in results]
    assert all(d > 0 for d in dropped)  # capacity did bind, so the scope mattered


def test_layers_that_cannot_be_split_are_refused_clearly(runs) -> None:
    errors = runs("ep4")[0]["refused"]
    assert "n_experts=6" in errors["indivisible"] and "4 processes" in errors["indivisible"]
    assert "token-choice router" in errors["expert-choice"]
    assert "already expert-parallel" in errors["twice"]


def test_network_bytes_per_token_per_layer() -> None:
    """top_k copies of d_model values, (ep - 1) / ep of them leave the process; four exchanges."""
    moe = ModelConfig.preset("mixtral-8x7b").moe
    assert moe is not None
    b = network_bytes(moe, 8, torch.bfloat16)
    assert b["dispatch_fwd"] == 2 * 4096 * 2 * 7 / 8
    assert b["total"] == 4 * b["dispatch_fwd"]
    assert network_bytes(moe, 1, torch.float32)["total"] == 0


def test_traffic_table_names_each_dtype_and_the_model_total() -> None:
    table = traffic_table(ModelConfig.preset("mixtral-8x7b"), 8)
    assert "float32" in table and "bfloat16" in table and "x 32 layers" in table
    assert f"{4 * 2 * 4096 * 2 * 7 // 8 * 32:,}" in table


def test_a_whole_model_on_ep2_x_dp2_computes_what_one_process_does(runs) -> None:
    """The tiny transformer (attention, two MoE layers) under DDP and expert parallelism on 4
    processes: logits, loss, every gradient and the global gradient norm of one process."""
    results, ref = runs("ep2xdp2"), reference_model_pass()
    logits = torch.cat([r["model"]["logits"] for r in results])
    torch.testing.assert_close(logits, ref["logits"], **TOL)
    mean_loss = torch.stack([r["model"]["loss"] for r in results]).mean()
    torch.testing.assert_close(mean_loss, ref["loss"], **TOL)
    for r in results:
        torch.testing.assert_close(r["model"]["aux_loss"], ref["aux_loss"], **TOL)
        torch.testing.assert_close(r["model"]["grad_norm"], ref["grad_norm"], **TOL)
    for name, expected in ref["grads"].items():
        if ".experts." in name:  # processes 0, 1 hold halves; 2, 3 the same halves
            for row in (results[:2], results[2:]):
                got = torch.cat([r["model"]["grads"][name] for r in row])
                torch.testing.assert_close(got, expected, **TOL, msg=name)
        else:
            for r in results:
                torch.testing.assert_close(r["model"]["grads"][name], expected, **TOL, msg=name)


def test_data_parallelism_alone_averages_every_gradient(runs) -> None:
    """A layer left whole on every process (no expert parallelism) under `apply_data_parallel`:
    DDP averages all its gradients, experts included, to one process's."""
    results = runs("ep2xdp2")
    layer, x = layer_and_batch(DP_ONLY_CASE, batch=4 * 4, seq=6)
    target = torch.randn_like(x)
    y, aux = layer(x)
    ((y * target).sum(-1).mean() + aux.loss).backward()
    for r in results:
        for name, p in layer.named_parameters():
            torch.testing.assert_close(r["dp_only"][0]["grads"][name], p.grad, **TOL, msg=name)


def test_the_cli_reports_a_lost_process_in_one_line(capsys, monkeypatch, tmp_path) -> None:
    from moekit.cli import main
    from moekit.cli import train as train_command
    from moekit.distributed import DistributedFailure

    def lose_a_process(*args, **kwargs) -> None:
        raise DistributedFailure("rank 0: a collective operation failed while training")

    monkeypatch.setattr(train_command, "train", lose_a_process)
    assert main(["train", "tiny", "--out", str(tmp_path / "run")]) == 1
    assert "error: rank 0: a collective operation failed" in capsys.readouterr().err


def test_a_shard_of_the_experts_holds_its_slice_and_loads_a_full_state_dict() -> None:
    from tests.moe_cases import make_layer

    from moekit.distributed import shard_experts

    full = make_layer(activation="gelu", expert_bias=True).experts
    shard = shard_experts(full, first=2, n_local=3)
    assert type(shard) is type(full)
    for name, p in full.named_parameters():
        assert torch.equal(getattr(shard, name), p[2:5])
    other = make_layer(seed=1, activation="gelu", expert_bias=True).experts
    shard.load_state_dict(other.state_dict())  # a single-process (full) state dict
    for name, p in other.named_parameters():
        assert torch.equal(getattr(shard, name), p[2:5])


def test_spawn_starts_again_when_rank_0_finds_its_port_taken(monkeypatch) -> None:
    """A port free_port found may be taken before rank 0 listens on it (the flake CI met): the
    processes are stopped and started again on another port, not left to time out."""
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    handed: list[int] = []  # the first port handed out is already listened on
    real = distributed_cases.free_port

    def free_port() -> int:
        handed.append(real() if handed else held.getsockname()[1])
        return handed[-1]

    monkeypatch.setattr(distributed_cases, "free_port", free_port)
    try:
        assert distributed_cases.spawn(distributed_cases.all_reduce_ranks, 2, timeout=60) == [1, 1]
    finally:
        held.close()
    assert len(handed) == 2  # the taken port was tried, then another
