"""Decoding with multi-head latent attention (DeepSeek-V3, Moonlight, Kimi K2): the decode glue's
steps in the latent space (`moekit.inference.decode_mla`) against the reference's, which expands
every cached latent into per-head keys and values at every step (`LatentAttention.forward`).

The model: Moonlight-16B-A3B's attention layout at a smaller width (d_model 1024, 16 heads, latent
rank 512, rotary 64, nope and value heads 128, no low-rank query), 8 layers of 16 experts (top-4
of width 512) and two shared experts, vocab 32000: 356M parameters, built from a seed. Each
context length is prefilled once per contender, then `--steps` decode steps are timed through
generate's step (`step_logits`) after an untimed warm-up of each, the two contenders alternating
`--rounds` times in ABBA order in one process (the host's drift falls on both alike); the last
step's logits of the two must agree (1e-4 of the largest). `float32` keeps kv_b_proj a float
matrix; `int8` quantizes the attention (kv_b_proj dequantized each layer and step by the latent
path from `decode_mla.QUANTIZED_MIN_POSITIONS` cached positions on; below, both contenders run
the reference).

    python benchmarks/latent_attention.py                  # ~5 minutes, under the CPU lock
    python benchmarks/latent_attention.py --quick          # scaled-down shapes (tests)
    python benchmarks/latent_attention.py --contexts 1 8 16 32 64 --steps 8 \
        --quantized-min-positions 0    # where dequantizing kv_b_proj each step starts to win

Prints the JSON; writes benchmarks/results/latent_attention.json (or --out).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from moekit import ModelConfig, MoEConfig, MoETransformer
from moekit.cli.common import results_file
from moekit.config import MLAConfig, QuantizeConfig
from moekit.fileio import atomic_write_json
from moekit.inference import decode_mla
from moekit.inference.decode_kernels import apply_decode_kernels
from moekit.machine import machine_info
from moekit.model.generation import KVCache, step_logits
from moekit.model.mla import LatentAttention
from moekit.quant.modules import quantize_model

sys.path.insert(0, str(Path(__file__).resolve().parent))  # (kernel_ab.py)
RESULTS = Path(__file__).resolve().parent / "results" / "latent_attention.json"
WEIGHTS = {"float32": None, "int8": QuantizeConfig(weights="none", attention="int8")}
LOGIT_TOLERANCE = 1e-4  # of the largest |logit|


def model_config(quick: bool) -> ModelConfig:
    d, layers, vocab, rank, head = (128, 2, 1024, 64, 16) if quick else (1024, 8, 32000, 512, 128)
    mla = MLAConfig(q_lora_rank=None, kv_lora_rank=rank, qk_nope_head_dim=head,
                    qk_rope_head_dim=head // 2, v_head_dim=head)  # fmt: skip
    moe = MoEConfig(d_model=d, d_expert=d // 2, n_experts=16, top_k=4, n_shared_experts=2)
    return ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=16 if not quick else 4,
                       moe=moe, mla=mla, max_seq_len=4096)  # fmt: skip


def latent_steps(model, on: bool) -> None:
    """The glue's latent-space steps in every latent attention (on), or the reference (off)."""
    for module in model.modules():
        if isinstance(module, LatentAttention):
            module.__dict__.pop("forward", None)
            if on:
                module.forward = functools.partial(decode_mla.latent_attention_forward, module)


def time_steps(model, ids: torch.Tensor, context: int) -> tuple[float, torch.Tensor]:
    """Decode tokens/s of ids' last positions after a prefill of `context`, and the last logits."""
    step = step_logits(model, KVCache.for_model(model, 1, ids.shape[1]))
    with torch.no_grad():
        step(ids[:, :context])
        start = time.perf_counter()
        for i in range(context, ids.shape[1]):
            logits = step(ids[:, i : i + 1])
        seconds = time.perf_counter() - start
    return (ids.shape[1] - context) / seconds, logits


def measure(quick: bool, contexts: list[int], steps: int, rounds: int) -> tuple[dict, int]:
    """Each weights' and context's tokens/s of both contenders; the model's parameter count."""
    torch.manual_seed(0)
    base = MoETransformer(model_config(quick)).eval()
    out: dict = {}
    for weights, config in WEIGHTS.items():
        model = (
            copy.deepcopy(base) if config is None else quantize_model(copy.deepcopy(base), config)
        )
        model = apply_decode_kernels(model)
        for context in contexts:
            g = torch.Generator().manual_seed(context)
            ids = torch.randint(0, model.cfg.vocab_size, (1, context + steps), generator=g)
            runs: dict[str, list[float]] = {"expanded": [], "latent": []}
            last = {}
            for name in runs:  # untimed: each contender's first steps at this context
                latent_steps(model, name == "latent")
                time_steps(model, ids[:, : context + 2], context)
            for i in range(rounds):  # ABBA: a round's first place falls on both alike
                for name in list(runs)[:: -1 if i % 2 else 1]:
                    latent_steps(model, name == "latent")
                    tokens_per_s, last[name] = time_steps(model, ids, context)
                    runs[name].append(tokens_per_s)
            diff = (last["latent"] - last["expanded"]).abs().max() / last["expanded"].abs().max()
            medians = {name: statistics.median(v) for name, v in runs.items()}
            out.setdefault(weights, {})[str(context)] = {
                "tokens_per_s": medians,
                "each_tokens_per_s": runs,
                "speedup": medians["latent"] / medians["expanded"],
                "last_logits_difference": float(diff),
            }
    return out, sum(p.numel() for p in base.parameters())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[16, 128, 512, 2048])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--quick", action="store_true", help="scaled-down shapes (tests)")
    p.add_argument("--out", type=results_file, default=RESULTS)
    p.add_argument(
        "--quantized-min-positions", type=int, default=decode_mla.QUANTIZED_MIN_POSITIONS,
        help="cached positions from which a quantized kv_b_proj takes the latent path "
        "(0: always; to measure where that starts to win)",
    )  # fmt: skip
    args = p.parse_args(argv)
    decode_mla.QUANTIZED_MIN_POSITIONS = args.quantized_min_positions
    if min(args.contexts) < 1 or args.steps < 1 or args.rounds < 1:
        p.error("--contexts, --steps and --rounds must be >= 1")
    if max(args.contexts) + args.steps > model_config(args.quick).max_seq_len:
        p.error(f"--contexts plus --steps must fit {model_config(args.quick).max_seq_len}")
    torch.set_num_threads(2)
    from kernel_ab import provenance

    code = provenance()  # (the code as the runs import it, not as it may be after them)
    measured, parameters = measure(args.quick, args.contexts, args.steps, args.rounds)

    worst = max(r["last_logits_difference"] for w in measured.values() for r in w.values())
    result = {
        "benchmark": "latent_attention",
        "machine": machine_info(),
        "settings": {k: str(v) for k, v in vars(args).items()},
        **code,
        "parameters": parameters,
        "results": measured,
        "logits_agree": worst <= LOGIT_TOLERANCE,
    }
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))
    if not result["logits_agree"]:
        raise SystemExit("latent_attention.py: the contenders' logits disagree (see `results`)")
    return result


if __name__ == "__main__":
    main()
