"""Decode speed: moekit's `generate` against transformers' `generate` on the same weights (written
with `save_hf(..., "mixtral")`, loaded with `AutoModelForCausalLM.from_pretrained`, eager
attention), and against the memory-bandwidth bound, at batch 1 and 8, greedy, float32, CPU.

Prefill and decode are timed separately: prefill = `generate(..., 1 new token)`; decode
tokens/s = (N - 1) * batch / (time of N new tokens - time of 1). The bandwidth bound is the bytes
one decode step must read (every weight but the routed experts, plus top_k experts per MoE layer:
`num_parameters(active=True)` x 4 bytes; for batch 8 the union of the experts its tokens chose is
larger, so the bound is reported for batch 1) over this machine's read bandwidth, measured as the
best of 5 sums over a 1 GiB tensor. Both generators must emit the same tokens (checked). The model
(~210M parameters, Mixtral-style, random weights) is built in the script. The CPU may be shared:
compare the ratios, measured side by side, not absolute times.

    python benchmarks/decode.py            # a few minutes
    python benchmarks/decode.py --quick    # small model

Prints JSON; writes benchmarks/results/decode.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from moekit.machine import machine_info

RESULTS = Path(__file__).resolve().parent / "results" / "decode.json"


def model_config(quick: bool):
    """8 layers, d_model 768, 8 experts top-2 of width 1024, vocab 32000: 213M parameters."""
    from moekit import ModelConfig, MoEConfig

    d, f, layers, vocab = (128, 256, 2, 1024) if quick else (768, 1024, 8, 32000)
    return ModelConfig(
        vocab_size=vocab,
        d_model=d,
        n_layers=layers,
        n_heads=12 if not quick else 4,
        n_kv_heads=4 if not quick else 2,
        moe=MoEConfig(d_model=d, d_expert=f, n_experts=8, top_k=2),
        max_seq_len=512,
    )


def read_bandwidth() -> float:
    """Bytes/s of summing a 1 GiB float32 tensor (best of 5)."""
    x = torch.ones(2**28)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def best_time(fn, repeats: int = 2) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def speeds(gen, prompt, n_new: int) -> dict:
    """Prefill seconds and decode tokens/s of `gen(prompt, n)`; and the tokens of n_new."""
    gen(prompt, 2)  # warm up
    t1 = best_time(lambda: gen(prompt, 1))
    tn = best_time(lambda: gen(prompt, n_new))
    return {
        "prefill_s": t1,
        "decode_tokens_per_s": (n_new - 1) * prompt.shape[0] / max(tn - t1, 1e-9),
        "tokens": gen(prompt, n_new),
    }


def measure(quick: bool) -> dict:
    import transformers

    from moekit import MoETransformer
    from moekit.interop import save_hf
    from moekit.model.generation import generate

    torch.manual_seed(0)
    cfg = model_config(quick)
    model = MoETransformer(cfg).eval()
    n_new, prompt_len = (8, 16) if quick else (32, 32)
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(model, Path(tmp) / "hf", "mixtral")
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            Path(tmp) / "hf", dtype=torch.float32, attn_implementation="eager"
        ).eval()

    def moekit_gen(x, n):
        return generate(model, x, n)

    def hf_gen(x, n):
        with torch.no_grad():
            out = hf.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return out[:, x.shape[1] :]

    bandwidth = read_bandwidth()
    bytes_per_token = model.num_parameters(active=True) * 4
    result = {
        "benchmark": "decode",
        "machine": machine(),
        "model": {
            "parameters": model.num_parameters(),
            "active_parameters": model.num_parameters(active=True),
            "prompt_tokens": prompt_len,
            "new_tokens": n_new,
        },
        "read_bandwidth_gb_s": bandwidth / 1e9,
        "bound_tokens_per_s_batch1": bandwidth / bytes_per_token,
        "batches": {},
    }
    for batch in (1, 8):
        prompt = torch.randint(0, cfg.vocab_size, (batch, prompt_len))
        ours, theirs = speeds(moekit_gen, prompt, n_new), speeds(hf_gen, prompt, n_new)
        same = torch.equal(ours.pop("tokens"), theirs.pop("tokens"))
        result["batches"][str(batch)] = {
            "moekit": ours,
            "transformers_eager": theirs,
            "same_tokens": same,
            "speedup": ours["decode_tokens_per_s"] / theirs["decode_tokens_per_s"],
        }
    b1 = result["batches"]["1"]["moekit"]["decode_tokens_per_s"]
    result["checks"] = {
        "batch1_speedup_vs_transformers": result["batches"]["1"]["speedup"],
        "target_speedup": 2.0,
        "batch1_fraction_of_bandwidth_bound": b1 / result["bound_tokens_per_s_batch1"],
        "target_fraction_of_bound": 0.5,
    }
    return result


def machine() -> dict:
    import transformers

    return {**machine_info(), "transformers": transformers.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, for tests")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = measure(args.quick)
    text = json.dumps(result, indent=2)
    print(text)
    from moekit.fileio import atomic_write_text

    atomic_write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
