"""`moekit <command>`: the one command-line entry point.

Each subcommand registers itself in `COMMANDS` with a function `(args) -> int` and an argparse
configurator. Subcommands that take a config accept a preset name or a JSON file plus
`--a.b=value` overrides, print the resolved config and save it beside their outputs.

    moekit train [PRESET|CONFIG.json] [--a.b=value ...] [--out RUN_DIR] [--resume RUN_DIR]
    moekit generate RUN_DIR --prompt "def fib(" --max-new-tokens 200
    moekit params PRESET|CONFIG.json [--ep N]
    moekit convert --from-hf DIR --out RUN_DIR
    moekit convert --to-hf RUN_DIR --arch mixtral --out DIR
    moekit demo
"""

from __future__ import annotations

import argparse
import math
import shlex
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

Handler = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Handler]] = {}


# Subcommands whose extra arguments are `--a.b=value` config overrides (in `args.overrides`).
TAKES_OVERRIDES: set[str] = set()
# Subcommands that train: their process keeps freed memory for reuse (moekit.cpu_memory).
TRAINS = {"train", "demo", "experiment"}
# Errors that are the user's input, printed as one line instead of a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError)


# Types of numeric arguments: argparse reports a value out of range as
# "argument --max-new-tokens: must be an integer >= 1, not -3" and exits 2.


def _number(kind: type, ok: Callable[[Any], bool], noun: str, doc: str) -> Callable[[str], Any]:
    """An argparse type: `text` as a finite `kind` for which `ok` holds, else "must be NOUN"."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {noun}, not {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, not {text!r}")
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {noun}, not {text}")
        return value

    parse.__doc__ = doc
    return parse


positive_int = _number(int, lambda v: v >= 1, "an integer >= 1",
                       "A count of tokens, experts, processes or seeds.")  # fmt: skip
seed_int = _number(int, lambda v: 0 <= v < 2**64, "an integer in [0, 2**64)", "A random seed.")
non_negative_float = _number(float, lambda v: v >= 0, "a number >= 0",
                             "A temperature (0 is greedy) or a noise scale.")  # fmt: skip
positive_float = _number(float, lambda v: v > 0, "a number > 0", "A capacity factor.")
probability = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]",
                      "A probability mass (top-p; 1 keeps every token).")  # fmt: skip
_top_k = _number(int, lambda v: v >= 0, "an integer >= 1, or 0 for no top-k", "Top-k sampling.")


def top_k_or_off(text: str) -> int | None:
    """Top-k sampling: an integer >= 1, or 0 for none (None)."""
    return _top_k(text) or None


def byte_size(text: str) -> int:
    """A number of bytes > 0: 2000000, "2GB", "500MB", "2GiB"."""
    from moekit.interop.files import parse_size

    try:
        value = parse_size(text)
    except ValueError:
        value = None
    if not value or value < 1:
        raise argparse.ArgumentTypeError(
            f"must be a size above 0 in bytes or with a unit (5GB, 500MB, 2GiB), not {text!r}"
        )
    return value


def _budget(in_bytes: bool, doc: str) -> Callable[[str], str]:
    """An argparse type for expert budgets `resolve_budget` can read (bytes only if in_bytes)."""

    def parse(text: str) -> str:
        from moekit.inference.budget import check_budget_form

        try:
            return check_budget_form(text, in_bytes)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__doc__ = doc
    return parse


expert_budget = _budget(True, "A budget for `moekit generate`: a count, a fraction, N% or bytes.")
trace_budget = _budget(False, "A budget for `moekit cache-sim`: a count, a fraction or N%.")


def command(
    name: str,
    help_text: str,
    configure: Callable[[argparse.ArgumentParser], None],
    overrides: bool = False,
):
    """Register a subcommand; with `overrides`, it receives `--a.b=value` arguments."""

    def register(fn: Handler) -> Handler:
        COMMANDS[name] = (help_text, configure, fn)
        if overrides:
            TAKES_OVERRIDES.add(name)
        return fn

    return register


def _layer_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=positive_int, default=4096)
    p.add_argument("--experts", type=positive_int, default=8)
    p.add_argument("--top-k", type=positive_int, default=2)
    p.add_argument("--capacity-factor", type=positive_float, default=None)


@command(
    "layer-demo",
    "route a random batch through one MoE layer and print its expert load",
    _layer_demo_args,
)
def layer_demo(args: argparse.Namespace) -> int:
    import torch

    from moekit import MoEConfig, MoELayer
    from moekit.analysis.tables import load_table

    torch.manual_seed(0)
    cfg = MoEConfig(
        d_model=256,
        d_expert=512,
        n_experts=args.experts,
        top_k=args.top_k,
        capacity_factor=args.capacity_factor,
        aux_loss_coef=1e-2,
    )
    print(cfg.to_json())
    layer = MoELayer(cfg)
    x = torch.randn(args.tokens, cfg.d_model)
    y, aux = layer(x)
    shape = tuple(y.shape)
    print(f"\nrouted {args.tokens} tokens, top-{cfg.top_k} of {cfg.n_experts} experts -> {shape}")
    print(load_table(aux.routed_counts, aux.counts))
    print(
        f"balance loss {aux.balance_loss.item():.4f} (1.0 = uniform)   "
        f"MaxVio {aux.max_vio.item():.3f}   dropped {aux.dropped_fraction.item():.1%}   "
        f"entropy {aux.entropy.item():.3f} nats"
    )
    return 0


DEFAULT_PRESET = "small"
CONFIG_FILE_REMEDY = (
    "fix it: a config file is one JSON object, a RunConfig or a ModelConfig, such as the resolved "
    "config `moekit train` prints"
)
DEMO_PROMPT = "def main("  # no trailing space: byte-level BPE tokens carry their leading space


def resolve_run_config(spec: str | None, overrides: list[str]) -> Any:
    """A `RunConfig` from a preset name or a JSON file (a RunConfig, or a bare ModelConfig),
    with `--a.b=value` overrides applied."""
    from moekit.config import ModelConfig, RunConfig, config_from_data
    from moekit.overrides import apply_overrides
    from moekit.userfiles import read_json

    spec = spec or DEFAULT_PRESET
    if spec.endswith(".json") or Path(spec).is_file():
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"config file {spec} does not exist")
        data = read_json(path, CONFIG_FILE_REMEDY)
        if "model" in data:
            cfg = config_from_data(RunConfig, data, path)
        else:
            cfg = RunConfig(model=config_from_data(ModelConfig, data, path))
    else:
        cfg = RunConfig.preset(spec)
    return apply_overrides(cfg, overrides)


def _print_config(cfg: Any) -> None:
    print("resolved config:")
    print(cfg.to_json(), flush=True)


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help=f"preset or config JSON (default {DEFAULT_PRESET})")
    p.add_argument("--out", help="run directory (default runs/<preset>-<date>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its last checkpoint")


@command(
    "train",
    "train a model on the built-in corpus (or any text) and write a run directory",
    _train_args,
    overrides=True,
)
def train_command(args: argparse.Namespace) -> int:
    from moekit.config import RUN_FILE_REMEDY, RunConfig
    from moekit.overrides import apply_overrides
    from moekit.train import train
    from moekit.train.loop import wants_processes

    if args.resume:
        if args.config or args.out:
            raise ValueError("--resume RUN_DIR continues that run: give no config and no --out")
        run_dir = Path(args.resume)
        if not (run_dir / "config.json").is_file():
            raise FileNotFoundError(f"cannot resume {run_dir}: it has no config.json")
        cfg = RunConfig.from_file(run_dir / "config.json", RUN_FILE_REMEDY)
        cfg = apply_overrides(cfg, args.overrides)
    else:
        cfg = resolve_run_config(args.config, args.overrides)
        run_dir = Path(args.out or _default_run_dir(args.config))
    _print_config(cfg)
    if wants_processes(cfg):  # torchrun, or parallel.ep / parallel.dp asked for
        from moekit.distributed.trainer import train_distributed as train
    return _report_training(lambda: train(cfg, run_dir, resume=bool(args.resume)))


def _default_run_dir(spec: str | None) -> str:
    name = Path(spec).stem if spec and spec.endswith(".json") else (spec or DEFAULT_PRESET)
    return f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _report_training(run: Callable[[], Any]) -> int:
    """Run a training call; print how it ended. 1 if it diverged or lost a process."""
    from moekit.distributed import DistributedFailure
    from moekit.train import TrainingDiverged

    try:
        result = run()
    except (TrainingDiverged, DistributedFailure) as err:
        print(f"\nerror: {err}", file=sys.stderr)
        return 1
    _print_result(result)
    return 0


def _print_result(result: Any) -> None:
    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    if result.interrupted:
        print(f"\ninterrupted at step {result.step}; checkpoint {result.checkpoint}")
        print(f"continue with: moekit train --resume {result.run_dir}")
    print(
        f"\nstep {result.step}: train loss {fmt(result.train_loss)}, "
        f"validation loss {fmt(result.val_loss)} ({fmt(result.val_bpb)} bits/byte), "
        f"{result.tokens_per_s:,.0f} tokens/s"
    )
    print(f"report: {result.run_dir / 'report.md'}")


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by moekit train")
    p.add_argument("--prompt", default="", help="text to continue (default: a new document)")
    p.add_argument("--max-new-tokens", type=positive_int, default=200)
    p.add_argument("--temperature", type=non_negative_float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=top_k_or_off, default=50, help="0 turns top-k off")
    p.add_argument("--top-p", type=probability, default=0.95, help="in (0, 1]; 1 turns it off")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument(
        "--expert-budget",
        type=expert_budget,
        metavar="N|FRACTION|N%|BYTES",
        help="keep experts on disk with at most this many in memory (e.g. 12, 0.5, 50%%, 200MB)",
    )
    p.add_argument("--policy", choices=["lru", "lfu", "static"], default="lru")
    p.add_argument("--prefetch", action="store_true", help="load the next layer's experts early")
    p.add_argument("--trace", help="routing trace (moekit trace) whose top experts 'static' keeps")


@command("generate", "stream text from a trained run's newest checkpoint", _generate_args)
def generate_command(args: argparse.Namespace) -> int:
    from moekit.cpu_memory import use_huge_pages
    from moekit.inference.decode_kernels import apply_decode_kernels
    from moekit.loading import load
    from moekit.train.sample import sample_text

    if args.expert_budget is not None:
        model, tokenizer, offload = _offloaded_run(args)
    else:
        loaded, offload = load(args.run_dir), None
        model, tokenizer = loaded.model, loaded.tokenizer
    use_huge_pages(model.parameters())  # decode streams every weight per token (cpu_memory)
    print(args.prompt, end="", flush=True)
    sample_text(
        apply_decode_kernels(model),
        tokenizer,
        args.prompt,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        on_text=lambda text: print(text, end="", flush=True),
    )
    print()
    if offload is not None:
        from moekit.inference.offload import format_stats

        offload.close()
        print(format_stats(offload.stats()))
    return 0


def _offloaded_run(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """The run's newest checkpoint with its routed experts left in the checkpoint file behind a
    cache (the whole model is never in memory), checked before generation starts."""
    from moekit.inference.offload import load_offloaded
    from moekit.inference.trace import load_trace
    from moekit.train.checkpoint import checkpoint_remedy
    from moekit.train.sample import find_run, read_run_tokenizer

    cfg, checkpoint = find_run(args.run_dir)
    tokenizer = read_run_tokenizer(checkpoint.parent.parent)  # RUN/checkpoints/step-N -> RUN
    counts = load_trace(args.trace, cfg.model).expert_counts() if args.trace else None
    with warnings.catch_warnings(record=True) as notes:  # e.g. prefetch standing down
        warnings.simplefilter("always")
        model, offload = load_offloaded(
            checkpoint / "model.safetensors",
            cfg.model,
            remedy=checkpoint_remedy(checkpoint),
            budget=args.expert_budget,
            policy=args.policy,
            prefetch=args.prefetch,
            expert_counts=counts,
        )
    for note in notes:
        print(f"note: {note.message}", file=sys.stderr)
    return model, tokenizer, offload


def _trace_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="RUN_DIR|HF_DIR", help="a moekit run or a HF checkpoint dir")
    p.add_argument("--prompts", required=True, help="text file, one prompt per line")
    p.add_argument("--out", required=True, help="trace file to write (safetensors)")
    p.add_argument(
        "--max-new-tokens", type=positive_int, default=32, help="greedy tokens per prompt"
    )


@command("trace", "record which experts each token uses while generating", _trace_args)
def trace_command(args: argparse.Namespace) -> int:
    from moekit.inference.decode_kernels import apply_decode_kernels
    from moekit.inference.trace import record_prompts, save_trace
    from moekit.loading import load
    from moekit.userfiles import read_text

    text = read_text(args.prompts, "give a UTF-8 text file, one prompt per line")
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{args.prompts} has no prompts (one per non-empty line)")
    loaded = load(args.path)
    model = apply_decode_kernels(loaded.model)
    trace = record_prompts(model, loaded.tokenizer, prompts, args.max_new_tokens)
    save_trace(trace, args.out)
    print(f"trace of {len(trace.ids)} tokens, {len(trace.requests())} requests: {args.out}")
    return 0


def _cache_sim_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("trace", metavar="TRACE", help="a trace written by moekit trace")
    p.add_argument(
        "--budget",
        type=trace_budget,
        nargs="+",
        default=["100%", "50%", "25%"],
        help="budgets: counts, fractions or N%% of all experts (the minimum, top_k, is added)",
    )
    p.add_argument(
        "--policy", nargs="+", choices=["lru", "lfu", "static"], default=["lru", "lfu", "static"]
    )


@command("cache-sim", "replay a routing trace against cache policies and Belady's oracle",
         _cache_sim_args)  # fmt: skip
def cache_sim_command(args: argparse.Namespace) -> int:
    from moekit.inference.budget import resolve_budget
    from moekit.inference.cache_sim import cache_sim_rows
    from moekit.inference.trace import load_trace
    from moekit.moe import SELECTED_MAX_TOKENS

    trace = load_trace(args.trace)
    if trace.derived:
        print(f"note: {args.trace} predates the record of each layer call's path: calls of at most "
              f"{SELECTED_MAX_TOKENS} tokens count as decode steps; record it again for the "
              "model's exact figures", file=sys.stderr)  # fmt: skip
    ident = trace.identity
    n_total, k = ident["n_layers"] * ident["n_experts"], ident["top_k"]
    caps = sorted({k, *(resolve_budget(b, n_total, None, k) for b in args.budget)}, reverse=True)
    print(f"{len(trace.requests())} requests, {n_total} experts, top_k={k}")
    print("budget  " + "".join(f"{p:>9}" for p in [*args.policy, "belady"]))
    for row in cache_sim_rows(trace, caps, args.policy):
        rates = "".join(f"{row[p]:>9.1%}" for p in [*args.policy, "belady"])
        print(f"{row['budget']:>6}  {rates}")
    return 0


def _params_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="PRESET|CONFIG.json", help="model preset or config JSON")
    p.add_argument(
        "--ep",
        type=positive_int,
        metavar="N",
        help="also print the bytes per token per MoE layer that expert parallelism over N "
        "processes sends per training step",
    )


@command(
    "params",
    "print a model's parameters: total, active per token, and by part",
    _params_args,
    overrides=True,
)
def params_command(args: argparse.Namespace) -> int:
    from moekit.config import MODEL_PRESETS, ModelConfig
    from moekit.model import parameter_table

    if args.config in MODEL_PRESETS:  # the model preset itself, not its training run's variant
        model_overrides = [_model_override(o) for o in args.overrides]
        from moekit.overrides import apply_overrides

        cfg = apply_overrides(ModelConfig.preset(args.config), model_overrides)
    else:
        cfg = resolve_run_config(args.config, args.overrides).model
    from moekit.distributed.traffic import traffic_table

    traffic = None if args.ep is None else traffic_table(cfg, args.ep)
    print(parameter_table(cfg, title=f"{args.config}: parameters"))
    if traffic is not None:
        print(f"\n{traffic}")
    return 0


def _model_override(item: str) -> str:
    """ "--model.a=v" -> "--a=v" (params takes model keys only)."""
    if not item.startswith("--model."):
        raise ValueError(f"params takes model overrides only (--model.key=value), not {item!r}")
    return "--" + item[len("--model.") :]


def _convert_args(p: argparse.ArgumentParser) -> None:
    from moekit.interop.archs import ARCHITECTURES
    from moekit.interop.files import WEIGHT_DTYPES
    from moekit.interop.keymaps import LAYOUTS

    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-hf", metavar="DIR", help="Hugging Face checkpoint -> run directory")
    source.add_argument(
        "--to-hf", metavar="RUN_DIR", help="run's newest checkpoint -> Hugging Face"
    )
    p.add_argument(
        "--out", required=True, help="the run directory or checkpoint directory to write"
    )
    p.add_argument("--arch", choices=ARCHITECTURES, help="architecture to write (with --to-hf)")
    p.add_argument("--layout", choices=LAYOUTS, default="per_expert", help="expert key layout")
    p.add_argument("--dtype", choices=WEIGHT_DTYPES, help="of the weights")
    p.add_argument(
        "--max-shard-size", type=byte_size, default="2GB", help="bytes per safetensors shard"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (--to-hf)")


@command(
    "convert",
    "convert Hugging Face checkpoints to run directories (--from-hf) and back (--to-hf)",
    _convert_args,
)
def convert_command(args: argparse.Namespace) -> int:
    from moekit.interop import save_hf
    from moekit.interop.convert import hf_to_run
    from moekit.loading import load

    if args.from_hf:
        out = hf_to_run(args.from_hf, args.out, dtype=args.dtype)
        print(f"wrote run directory {out} (weights as checkpoint step 0)")
        return 0
    if args.arch is None:
        raise ValueError("--to-hf needs --arch (one of the architectures in `moekit convert -h`)")
    loaded = load(args.to_hf, require_tokenizer=False)  # its tokenizer is copied where it has one
    out = save_hf(
        loaded.model,
        args.out,
        args.arch,
        tokenizer=loaded.tokenizer,
        layout=args.layout,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
    )
    print(f"wrote {args.arch} checkpoint {out}")
    return 0


DEMO_PRESET = "demo"


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="folder of both runs (replaced if a demo)")
    p.add_argument("--max-new-tokens", type=positive_int, default=200)
    p.add_argument("--prompt", default=DEMO_PROMPT)


@command(
    "demo",
    f"train the `{DEMO_PRESET}` MoE and its dense twin side by side for a few minutes, compare "
    "them, then sample from the MoE",
    _demo_args,
    overrides=True,
)
def demo_command(args: argparse.Namespace) -> int:
    from moekit.loading import load
    from moekit.train import TrainingDiverged, write_report
    from moekit.train.lockstep import SideBySideFailed
    from moekit.train.twin import MOE, train_with_dense_twin, write_twin_report

    start = time.perf_counter()
    cfg = resolve_run_config(DEMO_PRESET, args.overrides)
    out = Path(args.out)
    _clear_previous_demo(out)
    _print_config(cfg)
    try:
        result = train_with_dense_twin(cfg, out)
    except (TrainingDiverged, SideBySideFailed) as err:
        print(f"\nerror: {err}", file=sys.stderr)
        return 1
    loaded = load(out / MOE)
    model, tokenizer = loaded.model, loaded.tokenizer
    sample = args.prompt + _stream_sample(model, tokenizer, args.prompt, args.max_new_tokens)
    write_report(out / MOE, cfg, model, sample=sample)  # its training wrote it without one
    report = write_twin_report(result, cfg, sample)
    _print_twin_figures(result, cfg, report, args.prompt, time.perf_counter() - start)
    return 0


def _stream_sample(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int) -> str:
    """Print a sample from the model (its decode kernels swapped in) as it is generated; return
    its new text."""
    from moekit.inference.decode_kernels import apply_decode_kernels
    from moekit.train.sample import sample_text

    print(f"\n--- sample (prompt {prompt!r}, temperature 0.8, top-k 50, top-p 0.95) ---")
    print(prompt, end="", flush=True)
    on_text = lambda text: print(text, end="", flush=True)  # noqa: E731
    sample = sample_text(
        apply_decode_kernels(model), tokenizer, prompt, max_new_tokens, on_text=on_text
    )
    print("\n--- end of sample ---")
    return sample


def _print_twin_figures(result: Any, cfg: Any, report: Path, prompt: str, seconds: float) -> None:
    from moekit.model import format_count
    from moekit.train.twin import DENSE, MOE, balance_table, ratio_text

    moe = cfg.model.moe
    shapes = {
        MOE: f"{cfg.model.n_layers} layers, d_model {cfg.model.d_model}, {moe.n_experts} experts "
        f"of {moe.d_expert} top-{moe.top_k}"
        + (f" + shared {moe.shared_width}" if moe.shared_width else ""),
        DENSE: f"the same with a dense FFN of {moe.active_width}",
    }
    print(f"\n=== an MoE and its dense twin, side by side ({report}) ===")
    for name, run in result.runs.items():
        print(
            f"{name:<6} {format_count(run['parameters'])} parameters, "
            f"{format_count(run['active_parameters'])} active ({shapes[name]}): validation "
            f"{run['final_val_loss']:.3f} nats/token, {run['final_val_bpb']:.3f} bits/byte, "
            f"{run['tokens_per_s']:,.0f} tokens/s"
        )
    cmp = result.comparison[MOE]
    reached = "MoE did not reach dense's final validation loss"
    if cmp["step_ratio"] is not None:
        reached = (
            f"MoE reached dense's final validation loss in {ratio_text(result, 'step_ratio')} "
            f"the steps and {ratio_text(result, 'time_ratio')} the training time"
        )
    print(f"{reached} (throughput {cmp['throughput_ratio']:.2f}x dense's; {result.steps} steps)")
    print("expert balance over the last quarter of training (share of the mean load):")
    print(balance_table(result.balance))
    print(f"report      {report} (loss.png: both models; expert_load.png: the MoE's experts)")
    print(f"more text   moekit generate {result.moe_dir} --prompt {shlex.quote(prompt)}")
    minutes, rest = divmod(round(seconds), 60)
    print(f"demo time   {minutes} min {rest} s")


def _clear_previous_demo(out: Path) -> None:
    """Remove an earlier demo in `out`; refuse to delete anything else."""
    if not out.exists():
        return
    from moekit.train.twin import DENSE, MOE

    if not all((out / name / "config.json").is_file() for name in (MOE, DENSE)):
        raise FileExistsError(
            f"{out} exists and is not a demo of an MoE and its dense twin (an older demo's single "
            "run, or a run of yours?): delete it yourself or choose another --out"
        )
    shutil.rmtree(out)


def _analyze_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="RUN_DIR|HF_DIR", help="a moekit run or a HF checkpoint dir")
    p.add_argument("--data", help="corpus whose validation split is traced (default: the run's)")
    p.add_argument("--tokens", type=positive_int, default=16384, help="held-out tokens to trace")
    p.add_argument("--seq-len", type=positive_int, default=256, help="tokens per traced sequence")
    p.add_argument("--out", help="report folder (default: PATH/analysis)")


@command("analyze", "trace a model's routing over held-out text; write a report", _analyze_args)
def analyze_command(args: argparse.Namespace) -> int:
    from moekit.analysis.analyze import analyze

    print(f"report: {analyze(args.path, args.data, args.tokens, args.out, args.seq_len)}")
    return 0


def _upcycle_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dense_run", metavar="DENSE_RUN", help="a run directory of a dense model")
    p.add_argument(
        "--experts", type=positive_int, default=8, help="experts per layer (copies of the FFN)"
    )
    p.add_argument("--top-k", type=positive_int, default=2)
    p.add_argument(
        "--noise",
        type=non_negative_float,
        default=0.0,
        help="expert noise, times each weight's std",
    )
    p.add_argument("--out", required=True, help="the new run directory")


@command("upcycle", "turn a dense run into an MoE run (sparse upcycling)", _upcycle_args)
def upcycle_command(args: argparse.Namespace) -> int:
    from moekit.train.upcycle import upcycle_run

    out = upcycle_run(args.dense_run, args.out, args.experts, args.top_k, args.noise)
    print(f"upcycled run: {out}\ntrain it with: moekit train --resume {out}")
    return 0


def _experiment_args(p: argparse.ArgumentParser) -> None:
    from moekit.experiments.arms import EXPERIMENTS

    p.add_argument("name", metavar="NAME", choices=list(EXPERIMENTS), help=", ".join(EXPERIMENTS))
    p.add_argument(
        "--preset",
        default="experiment",
        help="base run preset of every arm (default experiment: each experiment takes about 9 "
        "minutes on 2 CPU cores, with its own train.steps); scale up with another preset (e.g. "
        "small) or overrides such as --train.steps=2000 --model.n_layers=8",
    )
    p.add_argument("--seeds", type=positive_int, default=1, help="repeat each arm with N seeds")
    p.add_argument("--out", help="report folder (default runs/experiments/NAME); runs in OUT/arms")


@command(
    "experiment",
    "train a paper's arms side by side and report the measured direction",
    _experiment_args,
    overrides=True,
)
def experiment_command(args: argparse.Namespace) -> int:
    from moekit.config import RunConfig
    from moekit.experiments.arms import EXPERIMENTS
    from moekit.experiments.runner import run_experiment
    from moekit.overrides import apply_overrides
    from moekit.train.lockstep import SideBySideFailed

    out = args.out or f"runs/experiments/{args.name}"
    base = RunConfig.preset(args.preset)
    if args.preset == "experiment":  # each experiment's steps fit its arms in the time budget
        base = base.replace(train=base.train.replace(steps=EXPERIMENTS[args.name].steps))
    _print_config(apply_overrides(base, args.overrides))
    command = shlex.join(["moekit", "experiment", args.name, "--preset", args.preset,
                          "--seeds", str(args.seeds), "--out", out, *args.overrides])  # fmt: skip
    try:
        report = run_experiment(args.name, base, out, args.seeds, args.overrides, command)
    except SideBySideFailed as err:  # an arm failed in its process; its error is above
        print(f"\nerror: {err}", file=sys.stderr)
        return 1
    print(f"report: {report}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moekit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, configure, _) in COMMANDS.items():
        epilog = "Config overrides: --a.b=value, e.g. --train.lr=3e-4 --model.moe.top_k=1"
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            allow_abbrev=False,
            epilog=epilog if name in TAKES_OVERRIDES else None,
        )
        configure(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in TAKES_OVERRIDES:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    if args.command in TRAINS:
        from moekit.cpu_memory import keep_freed_memory

        keep_freed_memory()
    try:
        return COMMANDS[args.command][2](args)
    except USER_ERRORS as err:
        print(f"moekit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside a training loop, or a second Ctrl-C inside one
        print(f"\nmoekit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
