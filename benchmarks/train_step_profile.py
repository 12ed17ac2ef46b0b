"""Where an MoE's training step spends the time its dense twin does not: one optimizer step
(forward, backward, fused AdamW) of dense and of the MoE designs of `moe_scaling.py` at one width,
interleaved step by step in one process, timed and then profiled by operator.

    python benchmarks/train_step_profile.py                 # the demo's width (64), 1 thread
    python benchmarks/train_step_profile.py --threads 2 --width 88

The base run is the `experiment` preset with 2 layers of 2 heads (the scaling study's), 16 x 128
tokens a step, freed memory kept for reuse as `moekit train` does. Timing: `--rounds` rounds after
a warm-up, each design's step once per round, the order rotating every round; the median ms per
step and the throughput ratio to dense (ratio of medians). Profile:
`torch.profiler` over `--profiled` further rounds, each step profiled on its own; per operator the
self CPU milliseconds per step, for every design, sorted by how much more the fine-grained design
spends than dense. Run it alone (under the CPU lock): ratios are what it measures, and another job
on the same cores changes them.

Prints the JSON; writes benchmarks/results/train_step_profile.json (or --out).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_scaling import BASE, designs
from moekit.cli.common import results_file
from moekit.config import RunConfig
from moekit.cpu_memory import keep_freed_memory
from moekit.fileio import atomic_write_json
from moekit.machine import machine_info
from moekit.model.transformer import MoETransformer
from moekit.overrides import apply_overrides
from moekit.train.optim import build_optimizer

RESULTS = Path(__file__).resolve().parent / "results" / "train_step_profile.json"
SHOWN_OPS = 25


def build(width: int) -> dict:
    """Each design's model, optimizer and config at `width`, all from seed 0."""
    base = apply_overrides(RunConfig.preset("experiment"), BASE)
    built = {}
    for name, overrides in designs(width).items():
        cfg = apply_overrides(base, overrides)
        torch.manual_seed(0)
        model = MoETransformer(cfg.model).train()
        built[name] = (model, build_optimizer(model, cfg.train), cfg)
    return built


def step(model, optimizer, batch_BS) -> None:
    model(batch_BS, labels=batch_BS).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(width: int, rounds: int, profiled: int) -> dict:
    built = build(width)
    cfg = next(iter(built.values()))[2]
    batch_BS = torch.randint(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.train.seq_len))
    for model, optimizer, _ in built.values():  # warm-up: allocator, grouped_mm probe, kernels
        for _ in range(5):
            step(model, optimizer, batch_BS)
    seconds = {name: [] for name in built}
    names = list(built)
    for r in range(rounds):  # the order rotates every round: no design always follows another
        for name in names[r % len(names) :] + names[: r % len(names)]:
            model, optimizer, _ = built[name]
            start = time.perf_counter()
            step(model, optimizer, batch_BS)
            seconds[name].append(time.perf_counter() - start)
    ms_per_step = {name: 1e3 * statistics.median(s) for name, s in seconds.items()}
    ops = {name: collections.Counter() for name in built}
    for _ in range(profiled):
        for name, (model, optimizer, _) in built.items():
            with torch.profiler.profile() as prof:
                step(model, optimizer, batch_BS)
            for event in prof.key_averages():
                ops[name][event.key] += event.self_cpu_time_total / 1e3 / profiled
    table = {op: {name: round(ops[name].get(op, 0.0), 3) for name in built}
             for op in set(ops["dense"]) | set(ops["fine-grained"])}  # fmt: skip
    order = sorted(table, key=lambda op: table[op]["dense"] - table[op]["fine-grained"])
    return {
        "width": width,
        "tokens_per_step": cfg.train.batch_size * cfg.train.seq_len,
        "ms_per_step": ms_per_step,
        "throughput_vs_dense": {n: ms_per_step["dense"] / ms for n, ms in ms_per_step.items()},
        "profiled_ms_per_step": {name: sum(c.values()) for name, c in ops.items()},
        "ops_ms_per_step": {op: table[op] for op in order[:SHOWN_OPS]},
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=64, help="d_model (the demo's: 64)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the demo's arms: 1)")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--profiled", type=int, default=8)
    p.add_argument("--out", type=results_file, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the training commands do: freed memory is reused, not page-faulted
    result = {
        "benchmark": "train_step_profile",
        "machine": machine_info(),
        **measure(args.width, args.rounds, args.profiled),
    }
    print(atomic_write_json(args.out, result))
    return result


if __name__ == "__main__":
    main()
