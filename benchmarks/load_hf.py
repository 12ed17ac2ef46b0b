"""Loading a Hugging Face MoE checkpoint: moekit's `load_hf` against transformers'
`from_pretrained`, on the same files: wall time and peak memory.

A Mixtral-style checkpoint of about 1 GB (float32, random weights) is generated into a temporary
directory at run time, sharded like hub checkpoints, in the hub's per-expert key layout and in
transformers 5's fused layout. Each loader runs in a fresh Python process per layout (so that
neither inherits the other's memory). The process imports its libraries and loads a tiny
checkpoint of the same architecture with the same loader (paying the one-time costs: library
code paged in, lazily imported modules, allocator arenas; reported as `warmup_bytes`), then takes
its resident memory as the baseline, resets the peak (VmHWM, via /proc/self/clear_refs), loads,
and reports the wall time of the load, its peak resident memory above that baseline, and the
resident memory once every weight has been read (transformers 5 may map the files and read them
lazily, so its peak during the load can be far below the model's size). Target (issue 4):
moekit's peak is at most 1.2 x the checkpoint's size above the baseline. Other processes may
load the CPU: the memory figures are what this benchmark is about; times are only compared side
by side.

    python benchmarks/load_hf.py              # ~1 GB; a minute or two
    python benchmarks/load_hf.py --quick      # ~40 MB, for tests

Prints the JSON to stdout and writes it to benchmarks/results/load_hf.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from moekit.fileio import atomic_write_json
from moekit.machine import machine_info as machine

TARGET_RATIO = 1.2
RESULTS = Path(__file__).resolve().parent / "results" / "load_hf.json"
LOADERS = ("moekit", "transformers")
LAYOUTS = ("per_expert", "fused")


def model_config(quick: bool):
    """Mixtral-style: 8 experts top-2, GQA; 250M parameters, 1.0 GB in float32 (quick: 40 MB)."""
    from moekit import ModelConfig, MoEConfig

    d, f, layers, vocab = (256, 320, 4, 4096) if quick else (1024, 832, 8, 32000)
    moe = MoEConfig(d_model=d, d_expert=f, n_experts=8, top_k=2)
    return ModelConfig(
        vocab_size=vocab,
        d_model=d,
        n_layers=layers,
        n_heads=8,
        n_kv_heads=2,
        moe=moe,
        max_seq_len=4096,
    )


def generate(folder: Path, quick: bool, layout: str, tiny: bool = False) -> dict:
    """Write a random checkpoint of `model_config` (or a tiny one) into `folder`; its size and
    files."""
    from moekit import MoEConfig, MoETransformer
    from moekit.interop import save_hf

    cfg = model_config(quick)
    if tiny:
        moe = MoEConfig(d_model=32, d_expert=16, n_experts=8, top_k=2)
        cfg = cfg.replace(vocab_size=64, d_model=32, n_layers=2, moe=moe)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = MoETransformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    shard = "16MB" if quick else "256MB"
    save_hf(model, folder, "mixtral", layout=layout, max_shard_size=shard)
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    size = sum((folder / f).stat().st_size for f in files)
    return {"bytes": size, "files": len(files), "parameters": model.num_parameters()}


# ---- the measured side: one load in this (fresh) process ----


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size


def worker(loader: str, folder: str, warmup: str) -> dict:
    """Load `folder` with `loader` in this process, after a warm-up load of `warmup`; memory in
    bytes above the warmed-up baseline."""
    torch.set_num_threads(int(os.environ.get("LOAD_HF_THREADS", torch.get_num_threads())))
    if loader == "moekit":
        from moekit.interop import load_hf

        def load_from(path):
            return load_hf(path, dtype=torch.float32)
    else:
        import transformers

        def load_from(path):
            return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    def load():
        return load_from(folder)

    import gc

    gc.collect()
    imported = status_kib("VmRSS")
    del_me = load_from(warmup)
    del del_me
    gc.collect()
    baseline = status_kib("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - start
    peak, after = status_kib("VmHWM"), status_kib("VmRSS")
    with torch.no_grad():  # read every weight: a lazily mapped model becomes resident now
        n_params = sum(p.numel() for p in model.parameters() if p.float().sum() is not None)
    touched = status_kib("VmRSS")
    return {
        "seconds": round(seconds, 3),
        "peak_above_baseline_bytes": (peak - baseline) * 1024,
        "after_load_above_baseline_bytes": (after - baseline) * 1024,
        "after_reading_every_weight_above_baseline_bytes": (touched - baseline) * 1024,
        "baseline_rss_bytes": baseline * 1024,
        "warmup_bytes": (baseline - imported) * 1024,
        "parameters": n_params,
    }


def run_worker(loader: str, folder: Path, warmup: Path) -> dict:
    command = [sys.executable, __file__, "--worker", loader, str(folder), str(warmup)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{loader} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- the report ----


def machine_info() -> dict:
    import transformers

    import moekit

    with open("/proc/meminfo") as f:
        mem = {line.split(":")[0]: int(line.split()[1]) for line in f}
    return {
        **machine(),
        "transformers": transformers.__version__,
        "moekit": moekit.__version__,
        "mem_total_gib": round(mem["MemTotal"] / 2**20, 1),
        "mem_available_gib": round(mem["MemAvailable"] / 2**20, 1),
    }


def measure(quick: bool, loaders: list[str], layouts: list[str]) -> dict:
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="load_hf_bench_") as tmp:
        for layout in layouts:
            folder = Path(tmp) / layout
            checkpoint = generate(folder, quick, layout)
            warmup = Path(tmp) / f"{layout}-warmup"
            generate(warmup, quick, layout, tiny=True)
            size = checkpoint["bytes"]
            row: dict = {"checkpoint": checkpoint}
            for loader in loaders:
                print(f"{layout}: {loader} ...", file=sys.stderr, flush=True)
                got = run_worker(loader, folder, warmup)
                got["peak_over_checkpoint"] = round(got["peak_above_baseline_bytes"] / size, 3)
                row[loader] = got
            if "moekit" in row:
                row["moekit_peak_within_target"] = (
                    row["moekit"]["peak_over_checkpoint"] <= TARGET_RATIO
                )
            if len(loaders) == 2:
                mine, theirs = row["moekit"], row["transformers"]
                row["time_ratio_moekit_over_transformers"] = round(
                    mine["seconds"] / theirs["seconds"], 3
                )
            results[layout] = row
            for p in folder.iterdir():
                p.unlink()
    return results


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a ~40 MB checkpoint (for tests)")
    p.add_argument("--out", default=str(RESULTS), help="where to write the JSON")
    p.add_argument("--loaders", nargs="+", choices=LOADERS, default=list(LOADERS))
    p.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    args = p.parse_args(argv)
    report = {
        "benchmark": "load_hf",
        "target": f"moekit peak memory above baseline <= {TARGET_RATIO} x checkpoint size",
        "machine": machine_info(),
        "config": model_config(args.quick).to_dict(),
        "layouts": measure(args.quick, args.loaders, args.layouts),
    }
    print(atomic_write_json(args.out, report))
    return report


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        print(json.dumps(worker(*sys.argv[2:])))
    else:
        main()
