"""Decoding a MoE model with shared experts: this tree against the code of an earlier commit.

Qwen2-MoE's models (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B) add a shared expert, gated by a sigmoid
of its own product, to every MoE layer; DeepSeek's add ungated ones. The model here is
decode.py's (8 layers, d_model 768, 8 experts top-2 of width 1024, vocab 32000) with a shared
expert of width 2048 and Qwen2-MoE's gate: 251M parameters, built from a seed in each process (the
same weights in every tree: the model's construction did not change). Each of fp32, bf16, int8 and
int4 (head int8; decode.py's schemes) decodes with the decode kernels swapped in as `moekit
generate` does, greedy and on a fixed random token sequence (the experts change every step as in
real text), at batch 1 and 8: 64 new tokens after a 16-token prompt, decode tokens/s as
decode.py's `side_by_side` measures it (the time of 64 tokens less that of 1).

The trees run in fresh processes alternating `--rounds` times, in ABBA order (the host's drift
falls on both alike; `kernel_ab.runs_by_tree`), this tree's and, with --before REV, the earlier
commit's (a temporary git worktree); the results give each round's figures, the medians, and
whether the trees' greedy tokens agree (the earlier code ran the shared experts' SwiGLU and
sigmoid in torch, this one in C: float32 rounding apart, so long greedy runs of random weights may
part). The logits of one decode step through generate's step, at batch 1 and 8 (the paths timed),
must agree within LOGIT_TOLERANCE or the run fails.

    python benchmarks/shared_experts.py --before f09ef9a     # ~9 minutes, under the CPU lock
    python benchmarks/shared_experts.py --quick --rounds 1   # scaled-down shapes (tests)

Prints the JSON; writes benchmarks/results/shared_experts.json (or --out).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from moekit.fileio import atomic_write_json
from moekit.machine import machine_info

try:  # a --before child runs this file on an older tree's moekit (its parent checked --out)
    from moekit.cli.common import results_file
except ImportError:
    results_file = Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # (decode.py, llamacpp.py, kernel_ab.py)
RESULTS = Path(__file__).resolve().parent / "results" / "shared_experts.json"
SCHEMES = ("fp32", "bf16", "int8", "int4")
# How far the trees' step logits may differ, as a fraction of the largest |logit|: float32
# rounding where the products take float x (fp32, bf16, int8); int4's quantize x to int8 per row,
# where a last-bit change of one activation can move a code, and 8 layers of random weights carry
# it on (1.2% in the first run; prefill.py allows 5% there).
LOGIT_TOLERANCE = {"fp32": 1e-4, "bf16": 1e-4, "int8": 1e-4, "int4": 5e-2}


def model_config(quick: bool):
    """decode.py's model with a Qwen2-MoE shared expert (gated) of twice the experts' width."""
    from decode import model_config as decode_model

    cfg = decode_model(quick)
    shared = cfg.moe.replace(n_shared_experts=1, d_shared=2 * cfg.moe.d_expert, shared_gate=True)
    return cfg.replace(moe=shared)


def measure(quick: bool) -> dict:
    """In this process (whichever moekit is importable): each scheme's decode tokens/s."""
    from decode import MOEKIT_QUANTIZED, side_by_side
    from llamacpp import moekit_forced
    from moekit import MoETransformer
    from moekit.cpu_memory import use_huge_pages
    from moekit.inference.decode_kernels import apply_decode_kernels
    from moekit.model.generation import generate
    from moekit.quant.modules import quantize_model

    torch.manual_seed(0)
    cfg = model_config(quick)
    base = MoETransformer(cfg).eval()  # kept unglued: `quantize_model` quantizes nn.Linear
    n_new, prompt_len = (8, 8) if quick else (64, 16)
    g = torch.Generator().manual_seed(1)
    prompts = {B: torch.randint(0, cfg.vocab_size, (B, prompt_len), generator=g) for B in (1, 8)}
    forced = torch.randint(0, cfg.vocab_size, (8, n_new), generator=g)
    out: dict = {}
    for scheme in SCHEMES:
        config = MOEKIT_QUANTIZED.get(f"moekit_{scheme}")
        model = copy.deepcopy(base)
        model = model if config is None else quantize_model(model, config)
        model = apply_decode_kernels(model)
        use_huge_pages(model)  # as `moekit generate` does (and decode.py for every model)

        def fixed(x, n, m=model):  # one forced token a step: the experts change as in real text
            return moekit_forced(m, x, n, forced)

        steps = [_step_logits(model, prompts[B], forced[:B, :1]) for B in (1, 8)]
        row = {"step_logits": torch.cat(steps).tolist()}
        for B, prompt in prompts.items():
            gens = {"greedy": lambda x, n, m=model: generate(m, x, n), "fixed_sequence": fixed}
            runs = side_by_side(gens, prompt, n_new, repeats=1 if quick else 3)
            for mode, r in runs.items():
                row[f"b{B}_{mode}"] = r["decode_tokens_per_s"]
                if mode == "greedy":
                    row[f"b{B}_greedy_tokens"] = r["tokens"].tolist()
        out[scheme] = row
        del model
    return out


def _step_logits(model, prompt: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """The logits (B, V) of one decode step after `prompt`, through generate's step (the path
    the timings take: one call where the tree has it)."""
    from moekit.model.generation import KVCache, step_logits

    B, P = prompt.shape
    step = step_logits(model, KVCache.for_model(model, B, P + 1))
    with torch.no_grad():
        step(prompt)
        return step(token)


def in_fresh_process(src: Path, quick: bool) -> dict:
    """`measure` in a new process importing moekit from `src`."""
    command = [sys.executable, __file__, "--child", *(["--quick"] if quick else [])]
    env = {**os.environ, "PYTHONPATH": str(src)}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"shared_experts.py: the run on {src} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", help="an earlier commit to time beside this tree")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--quick", action="store_true", help="scaled-down shapes (tests)")
    p.add_argument("--out", type=results_file, default=RESULTS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    if args.child:
        result = measure(args.quick)
        print(json.dumps(result))
        return result
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    from kernel_ab import provenance, runs_by_tree

    code = provenance()  # (the code as the runs import it, not as it may be after them)
    runs = runs_by_tree(
        args.before, args.rounds, "shared-experts-before-",
        lambda src: in_fresh_process(src, args.quick),
    )  # fmt: skip
    result = summarise(runs)
    result = {
        "benchmark": "shared_experts",
        "machine": machine_info(),
        "settings": {k: str(v) for k, v in vars(args).items()},
        **code,
        **result,
    }
    atomic_write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    if not result["step_logits_agree"]:
        raise SystemExit("shared_experts.py: the trees' step logits disagree (see `runs`)")
    return result


def _figures(run: dict, figures: list[str]) -> dict:
    """A round's tokens/s figures (its logits and tokens left out)."""
    return {s: {k: v for k, v in run[s].items() if k in figures} for s in SCHEMES}


def summarise(runs: dict[str, list[dict]]) -> dict:
    """Medians of each tree's rounds, the speedup of the last tree over the first, whether the
    trees' step logits agree (LOGIT_TOLERANCE) and how many greedy tokens they share."""
    figures = [k for k in runs[next(iter(runs))][0]["fp32"] if k.endswith(("greedy", "sequence"))]
    medians = {
        tree: {s: {f: statistics.median(r[s][f] for r in rs) for f in figures} for s in SCHEMES}
        for tree, rs in runs.items()
    }
    first, last = runs[next(iter(runs))][0], runs[list(runs)[-1]][0]
    diffs, same_tokens = {}, {}
    for s in SCHEMES:
        a, b = torch.tensor(first[s]["step_logits"]), torch.tensor(last[s]["step_logits"])
        diffs[s] = float((a - b).abs().max() / a.abs().max())
        ta, tb = (torch.tensor(r[s]["b8_greedy_tokens"]) for r in (first, last))
        same_tokens[s] = float((ta == tb).float().mean())
    out = {
        "median_tokens_per_s": medians,
        "step_logits_max_difference": diffs,  # of the largest |logit|
        "step_logits_agree": all(diffs[s] <= LOGIT_TOLERANCE[s] for s in SCHEMES),
        "greedy_tokens_agree_b8": same_tokens,
        "runs": {tree: [_figures(r, figures) for r in rs] for tree, rs in runs.items()},
    }
    if len(runs) == 2:
        before, after = medians.values()
        out["speedup"] = {s: {f: after[s][f] / before[s][f] for f in figures} for s in SCHEMES}
    return out


if __name__ == "__main__":
    main()
