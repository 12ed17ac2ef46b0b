"""Expert parallelism on one machine: time per MoE layer step and all-to-all traffic, EP = 1, 2.

One MoE layer, forward and backward, on a fixed global batch of tokens:

    ep1-1thread   one process, one thread (the per-process compute of the other runs)
    ep1-2threads  one process, two threads (the whole machine, no communication)
    ep2           two processes (gloo on localhost, one thread each), experts split 4 + 4, each
                  process holding half of the tokens; launched like torchrun (RANK, WORLD_SIZE,
                  MASTER_ADDR, MASTER_PORT)

For EP=2 it reports the bytes each process's all-to-alls sent per step (measured, and predicted by
`moekit.distributed.network_bytes` for balanced routing) and the share of the step spent inside
collectives (all-to-alls, counts exchange, global balance statistics; waiting for the other
process included). Prints JSON and writes benchmarks/results/expert_parallel.json.

    .venv/bin/python benchmarks/expert_parallel.py [--quick] [--steps N] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from moekit.fileio import atomic_write_json
from moekit.machine import cpu_model

RESULTS = Path(__file__).resolve().parent / "results" / "expert_parallel.json"
SHAPES = {  # name -> MoEConfig fields; the batch is `tokens` tokens in all
    "small": dict(d_model=256, d_expert=512, n_experts=8, top_k=2, tokens=4096),
    "wide": dict(d_model=512, d_expert=1024, n_experts=8, top_k=2, tokens=2048),
}
QUICK = {"quick": dict(d_model=32, d_expert=64, n_experts=8, top_k=2, tokens=256)}

SCOPE_NOTE = (
    "One machine with 2 CPU cores. What it shows: that expert parallelism computes what one "
    "process computes (the tests), how many bytes cross between processes per step (exact: they "
    "depend on the routing, not on the machine, and match network_bytes for balanced routing), "
    "and the fixed cost of the exchange code path through gloo on loopback. What it cannot show: "
    "multi-machine scaling. Loopback 'communication' is a memory copy through the kernel's TCP "
    "stack, with no network bandwidth or latency, no NIC, no switch, no NCCL/NVLink/InfiniBand; "
    "the two processes share the machine's two cores (and, here, with other jobs: see "
    "load_average), so EP=2's time mixes splitting the expert compute over two cores with "
    "contention, and 'waiting for the other process' inside the all-to-all is mostly scheduling "
    "noise. On real machines the all-to-all time is bytes_per_step / link bandwidth plus latency "
    "per call, which these figures let one estimate but do not measure."
)


def layer_config(shape: dict[str, int], aux: bool) -> Any:
    from moekit.config import MoEConfig

    fields = {k: v for k, v in shape.items() if k != "tokens"}
    return MoEConfig(**fields, aux_loss_coef=0.01 if aux else 0.0)


def worker(shape: dict[str, int], steps: int, warmup: int, threads: int, out: str) -> None:
    """One process of a run: time `steps` forward+backward passes of the layer (after warmup)."""
    import torch.distributed as dist

    from moekit.distributed import TRAFFIC, apply_expert_parallel
    from moekit.moe import MoELayer

    torch.set_num_threads(threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    layer = MoELayer(layer_config(shape, aux=True))
    x = torch.randn(shape["tokens"], shape["d_model"])
    share = x.shape[0] // world
    x = x[rank * share : (rank + 1) * share].requires_grad_()
    if world > 1:
        apply_expert_parallel(layer, dist.group.WORLD)
    records = []
    for step in range(warmup + steps):
        layer.zero_grad(set_to_none=True)
        if world > 1:
            dist.barrier()
        TRAFFIC.reset()
        begin = time.perf_counter()
        y, aux = layer(x)
        (y.square().mean() + aux.loss).backward()
        seconds = time.perf_counter() - begin
        if step >= warmup:
            records.append(
                {
                    "seconds": seconds,
                    "all_to_all_seconds": TRAFFIC.seconds,
                    "other_collective_seconds": TRAFFIC.other_seconds,
                    "bytes_sent": TRAFFIC.bytes_sent,
                    "all_to_all_calls": TRAFFIC.calls,
                }
            )
    Path(out).write_text(json.dumps(records))
    if world > 1:
        dist.destroy_process_group()


def launch(shape: dict[str, int], world: int, threads: int, steps: int, warmup: int) -> list:
    """Run `worker` in `world` fresh processes (as torchrun would); each rank's records."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for rank in range(world):
            env = {
                **os.environ,
                "RANK": str(rank),
                "WORLD_SIZE": str(world),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": str(threads),
            }
            spec = json.dumps({"shape": shape, "steps": steps, "warmup": warmup})
            out = str(Path(tmp) / f"rank{rank}.json")
            command = [sys.executable, __file__, "--worker", spec, str(threads), out]
            procs.append(subprocess.Popen(command, env=env))
        for p in procs:
            if p.wait(timeout=900) != 0:
                raise RuntimeError(f"a benchmark process failed (exit {p.returncode})")
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(world)]


def summarise(ranks: list[list[dict]], shape: dict[str, int], world: int) -> dict[str, Any]:
    """Median over steps of the slowest rank's step; communication of that same step."""
    from moekit.distributed import network_bytes

    n_steps = len(ranks[0])
    slowest = [max(range(world), key=lambda r, s=s: ranks[r][s]["seconds"]) for s in range(n_steps)]
    step_s = [ranks[r][s]["seconds"] for s, r in enumerate(slowest)]
    comm_s = [
        ranks[r][s]["all_to_all_seconds"] + ranks[r][s]["other_collective_seconds"]
        for s, r in enumerate(slowest)
    ]
    out: dict[str, Any] = {
        "step_ms_median": 1e3 * statistics.median(step_s),
        "step_ms_min": 1e3 * min(step_s),
        "steps": n_steps,
    }
    if world > 1:
        a2a = [ranks[r][s]["all_to_all_seconds"] for s, r in enumerate(slowest)]
        sent = [statistics.mean(rank[s]["bytes_sent"] for rank in ranks) for s in range(n_steps)]
        predicted = network_bytes(layer_config(shape, aux=False), world, torch.float32)["total"]
        out |= {
            "communication_share": statistics.median(
                c / t for c, t in zip(comm_s, step_s, strict=True)
            ),
            "all_to_all_share": statistics.median(a / t for a, t in zip(a2a, step_s, strict=True)),
            "all_to_all_calls_per_step": ranks[0][0]["all_to_all_calls"],
            "bytes_sent_per_process_per_step": statistics.mean(sent),
            "bytes_predicted_per_process_per_step": predicted * shape["tokens"] / world,
            "all_to_all_mb_per_s": statistics.mean(sent) / statistics.median(a2a) / 1e6,
        }
    return out


def machine() -> dict[str, Any]:
    cpu = cpu_model()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "backend": "gloo (localhost TCP)",
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 steps (for tests)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    shapes = QUICK if args.quick else SHAPES
    steps, warmup = (2, 1) if args.quick else (args.steps, args.warmup)
    load_before = os.getloadavg()
    results = {}
    for name, shape in shapes.items():
        runs = {
            "ep1-1thread": summarise(launch(shape, 1, 1, steps, warmup), shape, 1),
            "ep1-2threads": summarise(launch(shape, 1, 2, steps, warmup), shape, 1),
            "ep2": summarise(launch(shape, 2, 1, steps, warmup), shape, 2),
        }
        base = runs["ep1-1thread"]["step_ms_median"]
        for run in runs.values():
            run["time_vs_ep1_1thread"] = run["step_ms_median"] / base
        results[name] = {"shape": shape, "runs": runs}
    report = {
        "benchmark": "expert_parallel",
        "what": "one MoE layer (swiglu, dropless, balance loss), forward + backward, float32",
        "machine": machine(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "results": results,
        "single_machine_scope": SCOPE_NOTE,
    }
    print(atomic_write_json(args.out, report))
    return report


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        spec = json.loads(sys.argv[2])
        worker(spec["shape"], spec["steps"], spec["warmup"], int(sys.argv[3]), sys.argv[4])
    else:
        main()
