"""What weight-only quantization costs in quality: the validation loss of trained runs with their
weights in float32, bf16, int8, int4 (symmetric and with a zero point) and MXFP4, part by part,
and how many greedy tokens bf16 and int8 keep identical to float32's.

Each run is loaded (`moekit.load`), quantized in memory (`quantize_model`, as `moekit quantize`
writes it) and evaluated on the validation windows its training evaluated on (the trainer's
EVAL_SEED, train.eval.batches x eval batch size x seq_len): the float32 row equals the run's own
last validation loss, which the JSON checks. Greedy continuations: `--new-tokens` tokens after
each of the sample prompts, counted up to the first token that differs from float32's.

    python benchmarks/quant_quality.py runs/demo/moe [RUN ...]   # a minute per run
    python benchmarks/quant_quality.py --quick RUN               # two configs: a smoke run

Prints the JSON to stdout and writes it to benchmarks/results/quant_quality.json (or --out).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from moekit import load
from moekit.cli.common import results_file
from moekit.config import QuantizeConfig
from moekit.data import fixed_batches, prepare_data
from moekit.fileio import atomic_write_json
from moekit.machine import machine_info
from moekit.model import generate
from moekit.quant.modules import quantize_model
from moekit.train.loop import EVAL_SEED

RESULTS = Path(__file__).resolve().parent / "results" / "quant_quality.json"
CONFIGS = {
    "float32": None,
    "bf16": QuantizeConfig(weights="bf16"),
    "int8": QuantizeConfig(weights="int8"),
    "int4": QuantizeConfig(weights="int4"),
    "int4 zero point": QuantizeConfig(weights="int4", zero_point=True),
    "int4 experts, int8 rest": QuantizeConfig(weights="int8", experts="int4"),
    "int4 experts only": QuantizeConfig(weights="none", experts="int4"),
    "mxfp4 experts, int8 rest": QuantizeConfig(weights="int8", experts="mxfp4"),
}
QUICK = ("float32", "int4")
PROMPTS = ("def ", "import os\n", "class Tree:\n    def __init__(self")


def val_loss(model, batches: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return sum(float(model(b, labels=b).lm_loss) for b in batches) / len(batches)


def continuations(model, tokenizer, new_tokens: int) -> list[list[int]]:
    out = []
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt).ids])
        out.append(generate(model, ids, new_tokens, temperature=0.0)[0].tolist())  # new tokens
    return out


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> int:
    """Tokens identical to the reference's before the first difference, over all prompts."""
    total = 0
    for mine, theirs in zip(tokens, reference, strict=True):
        pairs = enumerate(zip(mine, theirs, strict=True))
        total += next((i for i, (a, b) in pairs if a != b), len(mine))
    return total


def measure_run(run: str, names: tuple[str, ...], new_tokens: int) -> dict:
    loaded = load(run)
    cfg = loaded.config
    t = cfg.train
    data = prepare_data(t.data, cfg.token_vocab_size, run_dir=loaded.checkpoints[-1].parent.parent)
    batches = fixed_batches(
        data.val.tokens, t.eval.batches, t.eval.batch_size or t.batch_size, t.seq_len, EVAL_SEED
    )
    rows, reference = {}, None
    for name in names:
        model = copy.deepcopy(loaded.model)
        if CONFIGS[name] is not None:
            quantize_model(model, CONFIGS[name])
        start = time.perf_counter()
        loss = val_loss(model, batches)
        tokens = continuations(model, loaded.tokenizer, new_tokens)
        reference = reference or tokens
        rows[name] = {
            "val_loss": loss,
            "bytes": sum(v.numel() * v.element_size() for v in model.state_dict().values()),
            "greedy_tokens_same": agreement(tokens, reference),
            "seconds": time.perf_counter() - start,
        }
    base = rows[names[0]]
    for row in rows.values():
        row["val_loss_delta"] = row["val_loss"] - base["val_loss"]
        row["bytes_ratio"] = row["bytes"] / base["bytes"]
    metrics = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    last_eval = [m for m in metrics if m.get("kind") == "eval"][-1]["val_loss"]
    return {
        "run": str(run),
        "model": {"parameters": loaded.model.num_parameters(), "moe": cfg.model.moe is not None},
        "eval_windows": [len(batches), *batches[0].shape],
        "run_last_val_loss": last_eval,
        "float32_equals_run": abs(base["val_loss"] - last_eval) < 1e-6,
        "greedy_tokens_total": len(PROMPTS) * new_tokens,
        "configs": rows,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="trained run directories")
    p.add_argument("--quick", action="store_true", help="float32 and int4 only")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per prompt")
    p.add_argument("--out", type=results_file, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    names = QUICK if args.quick else tuple(CONFIGS)
    result = {
        "machine": machine_info(),
        "configs": {name: c and c.to_dict() for name, c in CONFIGS.items() if name in names},
        "runs": [measure_run(run, names, args.new_tokens) for run in args.runs],
    }
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
