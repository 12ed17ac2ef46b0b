"""`moekit params PRESET|CONFIG.json [--model.a=value ...] [--ep K --tp M --dp-shard N ...]`: a
model's parameters; with a layout, what each device holds and sends per training step
(`moekit.distributed.costs`)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from moekit.cli.common import Command, positive_int, resolve_config
from moekit.config import MODEL_PRESETS, ModelConfig, ParallelConfig, RunConfig
from moekit.config.base import ConfigBase
from moekit.distributed.costs import DeviceCosts, device_costs
from moekit.distributed.traffic import traffic_table
from moekit.model import parameter_table
from moekit.overrides import apply_overrides


@dataclass(kw_only=True)
class ModelOnly(ConfigBase):
    """A model config alone: `params PRESET`'s --model.key=value overrides apply to it as to a
    run's model, so that an error names the key as given (model.moe.top_k), without the checks of
    a run the preset's model is not trained in."""

    model: ModelConfig


KIND_NAMES = {
    "fsdp_all_gather": "FSDP all-gather",
    "fsdp_reduce_scatter": "FSDP reduce-scatter",
    "dp_all_reduce": "HSDP/DDP all-reduce",
    "tp_all_reduce": "TP all-reduce",
    "tp_all_gather": "TP all-gather",
    "tp_reduce_scatter": "TP reduce-scatter",
    "ep_all_to_all": "EP all-to-all",
}


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="PRESET|CONFIG.json", help="model preset or config JSON")
    p.add_argument(
        "--ep",
        type=positive_int,
        metavar="K",
        help="expert-parallel size; also prints the bytes per token per MoE layer "
        "that expert parallelism over K processes sends per training step",
    )
    p.add_argument("--tp", type=positive_int, metavar="M", help="tensor-parallel size")
    p.add_argument(
        "--dp-shard",
        type=positive_int,
        metavar="N",
        help="FSDP2 shard size (data-parallel processes sharing one copy)",
    )
    p.add_argument(
        "--dp-replicate",
        type=positive_int,
        metavar="R",
        help="data-parallel replicas (default: the fewest that ep needs, 1 or ep / dp-shard)",
    )
    p.add_argument(
        "--micro-batch",
        type=positive_int,
        metavar="B",
        default=1,
        help="sequences per data-parallel rank per step (default 1)",
    )
    p.add_argument(
        "--seq-len",
        type=positive_int,
        metavar="S",
        help="tokens per sequence (default: the model's max_seq_len, at most 4096)",
    )
    p.add_argument(
        "--param-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="FSDP2's gather and compute dtype (bfloat16 needs dp-shard or tp > 1)",
    )


def run(args: argparse.Namespace) -> None:
    model_items = [o for o in args.overrides if not o.startswith("--parallel.")]
    parallel_items = [o for o in args.overrides if o.startswith("--parallel.")]
    if args.config in MODEL_PRESETS:  # the model preset itself, not its training run's variant
        for item in model_items:
            model_override(item)  # (refuses any other key)
        preset = ModelOnly(model=ModelConfig.preset(args.config))
        cfg = apply_overrides(preset, model_items).model
    else:
        cfg = resolve_config(RunConfig, args.config, model_items).model
    if args.seq_len is not None and args.seq_len > cfg.max_seq_len:
        rule = f"must be at most the model's context, max_seq_len ({cfg.max_seq_len})"
        raise ValueError(f"--seq-len={args.seq_len} is invalid: {rule}")
    layout = any(getattr(args, f) is not None for f in ("tp", "ep", "dp_shard", "dp_replicate"))
    layout = layout or bool(parallel_items) or args.param_dtype != "float32"
    costs = None
    if layout:
        parallel = parallel_config(args, parallel_items)
        seq_len = args.seq_len or min(cfg.max_seq_len, 4096)
        name = "--seq-len" if args.seq_len else "the default --seq-len"
        parallel.check_seq_len(seq_len, name, most=cfg.max_seq_len)
        costs = device_costs(cfg, parallel, parallel.min_world_size(), args.micro_batch, seq_len)
    traffic = None if args.ep is None else traffic_table(cfg, args.ep)
    print(parameter_table(cfg, title=f"{args.config}: parameters"))
    if traffic is not None:
        print(f"\n{traffic}")
    if costs is not None:
        print(f"\n{costs_table(costs, parallel, args.micro_batch, seq_len)}")


def parallel_config(args: argparse.Namespace, overrides: list[str]) -> ParallelConfig:
    """The layout the flags and --parallel.key=value overrides ask for."""
    parallel = ParallelConfig(
        dp_replicate=args.dp_replicate,
        dp_shard=args.dp_shard or 1,
        ep=args.ep or 1,
        tp=args.tp or 1,
        param_dtype=args.param_dtype,
    )
    return apply_overrides(parallel, [model_override(o, "--parallel.") for o in overrides])


def costs_table(
    costs: DeviceCosts, parallel: ParallelConfig, micro_batch: int, seq_len: int
) -> str:
    """`device_costs` as text: the layout, memory by part in GB, communication per step."""
    s = costs.sizes
    world = s["dp_replicate"] * s["dp_shard"] * s["tp"]
    path = "FSDP2" if parallel.fully_sharded else "DDP"
    memory = {
        f"parameters (float32 shard: {costs.params:,})": costs.param_bytes,
        "gradients (float32" + (", + DDP buckets)" if path == "DDP" else ")"): costs.grad_bytes,
        "AdamW moments (2 x float32)": costs.optimizer_bytes,
        f"gathered units ({parallel.param_dtype}, at the peak)": costs.gathered_bytes,
        "activations (estimate, saved for backward)": costs.activation_bytes,
    }
    lines = [
        f"per device of {world}: dp_replicate {s['dp_replicate']} x dp_shard {s['dp_shard']} x "
        f"tp {s['tp']}, ep {s['ep']} (routed experts sharded over {s['edp_shard']}, replicated "
        f"over {s['edp_replicate']}); {path}, param_dtype {parallel.param_dtype}, "
        f"reshard_after_forward {parallel.reshard_after_forward}"
        + (", sequence_parallel" if parallel.sequence_parallel and s["tp"] > 1 else ""),
        f"micro-batch {micro_batch} x {seq_len} tokens per data-parallel rank; rank 0 (the "
        "largest FSDP shards)",
        "",
        f"{'memory':<44}{'GB':>10}",
        *(f"{name:<44}{_gb(n)}" for name, n in memory.items()),
        "-" * 54,
        f"{'total':<44}{_gb(costs.memory_bytes)}",
        "",
        f"{'communication per step':<24}{'calls':>8}{'handed in (GB)':>16}{'sent (GB)':>12}",
    ]
    for kind, name in KIND_NAMES.items():
        c = costs.comms[kind]
        if c.calls:
            lines.append(f"{name:<24}{c.calls:>8}{_gb(c.payload, 16)}{_gb(c.sent, 12)}")
    if not any(c.calls for c in costs.comms.values()):
        lines.append("(none: one process)")
    lines += [
        "handed in: the tensors given to each collective; sent: what leaves the device by a ring",
        "(all-gather (n-1)/n of the output, reduce-scatter (n-1)/n of the input, all-reduce",
        "2(n-1)/n of it) or, for the all-to-all, the rows bound for other devices (balanced)",
    ]
    return "\n".join(lines)


def _gb(n: float, width: int = 10) -> str:
    return f"{n / 1e9:>{width},.3f}"


def model_override(item: str, prefix: str = "--model.") -> str:
    """ "--model.a=v" -> "--a=v" (params takes model keys, and parallel keys apart)."""
    if not item.startswith(prefix):
        raise ValueError(
            f"params takes model and parallel overrides only (--model.key=value, "
            f"--parallel.key=value), not {item!r}"
        )
    return "--" + item[len(prefix) :]


COMMAND = Command("params", "print a model's parameters: total, active per token, and by part; "
                  "with --tp/--ep/--dp-shard, per-device memory and communication per step",
                  configure, run, overrides=True,
                  listed=("model", "parallel"))  # fmt: skip
