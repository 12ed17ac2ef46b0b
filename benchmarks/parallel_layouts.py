"""Parallel layouts side by side: one MoE transformer's training step under each layout that 4 gloo
processes allow, against one process.

    baseline        1 process (the whole model, the whole global batch)
    ep4             experts split over 4 processes, the rest DDP
    tp4             tensor parallelism over 4 (attention, dense FFN, shared experts, routed
                    experts on their hidden width)
    dp_shard4       FSDP2 over 4 (every parameter sharded)
    dp_shard4_ep4   FSDP2 over 4 for the rest, experts split over the same 4
    dp_shard2_tp2   FSDP2 over 2 x tensor parallelism over 2
    ep2_tp2         experts split over 2 data ranks x tensor parallelism over 2
    *_sp            tp4, dp_shard2_tp2 and ep2_tp2 with sequence parallelism
                    (parallel.sequence_parallel: norms and the residual stream split over the
                    tp processes along the sequence)

Each layout trains on the same global batch (GLOBAL_BATCH sequences of SEQ_LEN tokens: each
data-parallel rank takes its share, the tp processes of one data rank the same rows). Per layout:
the bytes every collective is handed and sends in one step, counted in every process by
`moekit.distributed.count.CollectiveCounter` (a separate step: the counter slows every op), and
the same figures from `moekit.distributed.costs.device_costs`; the step time (forward, backward,
AdamW step; median over steps after warm-up, slowest process per step); each process's peak RSS
and its memory per `device_costs`. Prints JSON and writes benchmarks/results/parallel_layouts.json.

    .venv/bin/python benchmarks/parallel_layouts.py [--quick] [--steps N] [--rounds R] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from moekit.config import ModelConfig, MoEConfig, ParallelConfig
from moekit.distributed.costs import KINDS, device_costs
from moekit.fileio import atomic_write_json
from moekit.machine import machine_info

RESULTS = Path(__file__).resolve().parent / "results" / "parallel_layouts.json"
WORLD = 4
LAYOUTS: dict[str, dict[str, Any]] = {  # each *_sp right after its layout: compare neighbours
    "baseline": {},
    "ep4": {"ep": 4},
    "tp4": {"tp": 4},
    "tp4_sp": {"tp": 4, "sequence_parallel": True},
    "dp_shard4": {"dp_shard": 4},
    "dp_shard4_ep4": {"dp_shard": 4, "ep": 4},
    "dp_shard2_tp2": {"dp_shard": 2, "tp": 2},
    "dp_shard2_tp2_sp": {"dp_shard": 2, "tp": 2, "sequence_parallel": True},
    "ep2_tp2": {"ep": 2, "tp": 2},
    "ep2_tp2_sp": {"ep": 2, "tp": 2, "sequence_parallel": True},
}
# 4 layers (the first dense), 8 heads over 4 KV heads, 8 experts of 256 top-2 and a shared one.
MODEL = ModelConfig(
    vocab_size=2048,
    d_model=128,
    n_layers=4,
    n_heads=8,
    n_kv_heads=4,
    d_ff=512,
    first_dense=1,
    max_seq_len=256,
    moe=MoEConfig(
        d_model=128, d_expert=256, n_experts=8, top_k=2, n_shared_experts=1, aux_loss_coef=0.01
    ),
)
GLOBAL_BATCH, SEQ_LEN = 8, 128
QUICK_MODEL = MODEL.replace(
    vocab_size=128,
    d_model=32,
    d_ff=64,
    moe=MODEL.moe.replace(d_model=32, d_expert=32),  # type: ignore[union-attr]
)
SCOPE_NOTE = (
    "One machine with 2 CPU cores running 4 processes of one thread each: the processes are "
    "oversubscribed two to a core and 'communication' is gloo over loopback TCP (a memory copy "
    "through the kernel, no network). Step times are relative at best: they mix compute split "
    "over processes with scheduling contention and the fixed cost of each collective call, and "
    "say nothing of a GPU cluster's NVLink/InfiniBand. The byte counts are exact (they depend on "
    "the model, the layout and the batch, not on the machine) and are what a layout would send "
    "anywhere; the memory figures are per process, RSS including torch itself (~300 MB)."
)


def worker(spec: dict[str, Any], out: str) -> None:
    """One process of a layout: warm-up steps, one counted step, then timed steps."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from moekit.distributed import init_distributed
    from moekit.distributed.count import CollectiveCounter
    from moekit.distributed.parallelize import parallelize
    from moekit.model import MoETransformer

    torch.set_num_threads(1)
    cfg = ModelConfig.from_dict(spec["model"])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    if world > 1:
        parallel = ParallelConfig(**spec["layout"], backend="gloo", timeout_s=300.0)
        mesh = init_distributed(parallel)
        net, data_rank, data_size = (
            parallelize(model, parallel, mesh),
            mesh.data_rank,
            mesh.data_size,
        )
    else:
        net, data_rank, data_size = model, 0, 1
    rows = spec["global_batch"] // data_size
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, cfg.vocab_size, (spec["global_batch"], spec["seq_len"]), generator=g)
    batch = batch[data_rank * rows : (data_rank + 1) * rows]
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    rss_built = _status_kib("VmRSS")

    def step(counter: CollectiveCounter | None = None) -> float:
        if world > 1:
            dist.barrier()
        begin = time.perf_counter()
        if counter is None:
            out = net(batch, labels=batch)
            out.loss.backward()
        else:
            with counter:
                out = net(batch, labels=batch)
                out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - begin

    for _ in range(spec["warmup"]):
        step()
    counter = CollectiveCounter()
    step(counter)
    seconds = [step() for _ in range(spec["steps"])]
    local = sum(
        p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in net.parameters()
    )
    result = {
        "records": [
            {"kind": r.kind, "group": r.group, "ranks": list(r.ranks), "dtype": str(r.dtype),
             "payload": r.payload, "sent": r.sent}
            for r in counter.records
        ],
        "seconds": seconds,
        "local_params": local,
        "rss_built_kib": rss_built,
        "peak_rss_kib": _status_kib("VmHWM"),
    }  # fmt: skip
    Path(out).write_text(json.dumps(result))
    if world > 1:
        dist.destroy_process_group()


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def launch(spec: dict[str, Any], world: int) -> list[dict[str, Any]]:
    """Run `worker` in `world` fresh processes (as torchrun would); each rank's result."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for rank in range(world):
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world),
                   "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                   "OMP_NUM_THREADS": "1"}  # fmt: skip
            out = str(Path(tmp) / f"rank{rank}.json")
            command = [sys.executable, __file__, "--worker", json.dumps(spec), out]
            procs.append(subprocess.Popen(command, env=env))
        for p in procs:
            if p.wait(timeout=900) != 0:
                raise RuntimeError(f"a benchmark process failed (exit {p.returncode})")
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(world)]


def by_kind(records: list[dict[str, Any]], tp: int, rank: int) -> dict[str, dict[str, float]]:
    """`moekit.distributed.count.by_kind` over the records as the worker wrote them."""
    from moekit.distributed.count import Record, by_kind

    dtypes = {str(d): d for d in (torch.float32, torch.float64, torch.bfloat16, torch.int64)}
    typed = [
        Record(r["kind"], "", r["group"], tuple(r["ranks"]), dtypes.get(r["dtype"], torch.int32),
               r["payload"], r["sent"])
        for r in records
    ]  # fmt: skip
    return by_kind(typed, tp, rank)


def summarise(name: str, rounds: list[list[dict[str, Any]]], model: ModelConfig) -> dict[str, Any]:
    """Communication (rank 0, and summed over the ranks) measured and predicted per kind, the
    median step time of the slowest rank (over the steps of every round, and per round), memory
    per rank measured and predicted (the last round's)."""
    ranks = rounds[-1]
    layout = LAYOUTS[name]
    world = len(ranks)
    parallel = ParallelConfig(**layout)
    sizes = parallel.sizes(world)
    micro_batch = GLOBAL_BATCH // (sizes["dp_replicate"] * sizes["dp_shard"])
    predicted = [
        device_costs(model, parallel, world, micro_batch, SEQ_LEN, r) for r in range(world)
    ]
    measured = [by_kind(result["records"], sizes["tp"], r) for r, result in enumerate(ranks)]
    comm: dict[str, Any] = {}
    for kind in (*KINDS, "statistics", "one_process"):
        row: dict[str, Any] = {
            "calls_rank0": measured[0][kind]["calls"],
            "payload_bytes_all_ranks": sum(m[kind]["payload"] for m in measured),
            "sent_bytes_all_ranks": sum(m[kind]["sent"] for m in measured),
        }
        if kind in KINDS:
            row |= {
                "predicted_calls_rank0": predicted[0].comms[kind].calls,
                "predicted_payload_bytes_all_ranks": sum(p.comms[kind].payload for p in predicted),
                "predicted_sent_bytes_all_ranks": sum(p.comms[kind].sent for p in predicted),
            }
        if row["calls_rank0"] or row.get("predicted_calls_rank0"):
            comm[kind] = row
    steps = len(ranks[0]["seconds"])
    per_round = [[max(r["seconds"][s] for r in ranks) for s in range(steps)] for ranks in rounds]
    slowest = [t for times in per_round for t in times]
    sent = [sum(m[k]["sent"] for k in KINDS) for m in measured]
    return {
        "layout": layout,
        "sizes": sizes,
        "micro_batch_per_data_rank": micro_batch,
        "step_ms_median": 1e3 * statistics.median(slowest),
        "step_ms_min": 1e3 * min(slowest),
        "step_ms_median_per_round": [1e3 * statistics.median(times) for times in per_round],
        "steps": steps * len(rounds),
        "bytes_sent_per_process_per_step": statistics.mean(sent),
        "bytes_sent_predicted_per_process_per_step": statistics.mean(
            sum(p.comms[k].sent for k in KINDS) for p in predicted
        ),
        "payload_matches_prediction": all(
            row["payload_bytes_all_ranks"] == row["predicted_payload_bytes_all_ranks"]
            and row["calls_rank0"] == row["predicted_calls_rank0"]
            for kind, row in comm.items()
            if kind in KINDS
        ),
        "communication": comm,
        "per_rank": [
            {
                "local_params": r["local_params"],
                "predicted_local_params": p.params,
                "peak_rss_mib": r["peak_rss_kib"] / 1024,
                "rss_after_build_mib": r["rss_built_kib"] / 1024,
                "predicted_memory_mib": {
                    "parameters": p.param_bytes / 2**20,
                    "gradients": p.grad_bytes / 2**20,
                    "adamw": p.optimizer_bytes / 2**20,
                    "gathered": p.gathered_bytes / 2**20,
                    "activations": p.activation_bytes / 2**20,
                    "total": p.memory_bytes / 2**20,
                },
            }
            for r, p in zip(ranks, predicted, strict=True)
        ],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model, 1 step (smoke run)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every layout this many times, one after the other (times pooled over rounds)",
    )
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    model = QUICK_MODEL if args.quick else MODEL
    steps, warmup = (1, 2) if args.quick else (args.steps, args.warmup)
    info = machine_info()
    runs: dict[str, list[list[dict[str, Any]]]] = {name: [] for name in LAYOUTS}
    for _ in range(args.rounds):
        for name, layout in LAYOUTS.items():
            spec = {"model": model.to_dict(), "layout": layout, "global_batch": GLOBAL_BATCH,
                    "seq_len": SEQ_LEN, "steps": steps, "warmup": warmup}  # fmt: skip
            runs[name].append(launch(spec, 1 if name == "baseline" else WORLD))
            median = statistics.median(max(r["seconds"][i] for r in runs[name][-1])
                                       for i in range(steps))  # fmt: skip
            print(f"{name}: {1e3 * median:.0f} ms", file=sys.stderr)
    results = {name: summarise(name, rounds, model) for name, rounds in runs.items()}
    base = results["baseline"]["step_ms_median"]
    for run in results.values():
        run["time_vs_baseline"] = run["step_ms_median"] / base
    report = {
        "benchmark": "parallel_layouts",
        "what": (
            f"one MoE transformer ({model.n_layers} layers, d_model {model.d_model}, "
            f"{model.moe.n_experts} experts top-{model.moe.top_k} + 1 shared, first layer dense), "  # type: ignore[union-attr]
            f"one training step (forward, backward, AdamW) on {GLOBAL_BATCH} x {SEQ_LEN} tokens, "
            "float32, under each layout of 4 gloo processes and on 1 process"
        ),
        "model": model.to_dict(),
        "settings": {
            "rounds": args.rounds,
            "timed_steps_per_round": steps,
            "warmup": warmup,
            "order": "each round runs the layouts in this order: " + ", ".join(LAYOUTS),
        },
        "machine": info | {"backend": "gloo (localhost TCP)", "threads_per_process": 1},
        "loadavg_end": list(os.getloadavg()),
        "results": results,
        "bytes_definitions": (
            "payload: bytes of the tensors handed to each collective (what the tests check "
            "against costs.py); sent: bytes leaving the process by a ring (all-gather (n-1) x "
            "input, reduce-scatter (n-1)/n x input, all-reduce 2(n-1)/n x size) or, for the "
            "all-to-all, the rows addressed to other processes (measured from the split sizes; "
            "predicted for balanced routing)"
        ),
        "single_machine_scope": SCOPE_NOTE,
    }
    print(atomic_write_json(args.out, report))
    return report


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(json.loads(sys.argv[2]), sys.argv[3])
    else:
        main()
