"""Decode speed: moekit's `generate` against transformers' `generate` on the same weights (written
with `save_hf(..., "mixtral")`, loaded with `AutoModelForCausalLM.from_pretrained`, eager
attention), and against two memory bounds, at batch 1 and 8, greedy, float32, CPU.

Three generators: moekit (its decode kernels swapped in, `moekit.inference.decode_kernels`, as
`moekit generate` does), moekit without them (the model as built: every product through torch's
F.linear, as transformers does), and transformers. Prefill and decode are timed separately:
prefill = `generate(..., 1 new token)`; decode tokens/s = (N - 1) * batch / (time of N new
tokens - time of 1). The generators alternate within each repetition; every figure is the median
of the repetitions. All must emit the same tokens (checked). Every model's parameters are first
backed by 2 MiB transparent huge pages (`moekit.cpu_memory.use_huge_pages`), as `moekit generate`
does.

The bounds, for batch 1: the bytes one decode token must read (every weight matrix but the
embedding table, of which it reads one row, and the experts no token chose: attention, routers,
top_k experts per MoE layer, LM head) divided by
  - the streaming read bandwidth (`sum` over 1 GiB; median of 7): what the memory can deliver;
  - the GEMV bandwidth on the model's own matrix shapes (one row against a pool of distinct
    weights larger than L3, as in decode; median of 7), of torch's F.linear (MKL) and of
    moekit's kernel: what a decode step built from those products can reach at best; and of
    numpy's OpenBLAS, for comparison (not used: its thread pool would compete with torch's).
The model (~210M parameters, Mixtral-style, random weights) is built in the script. The CPU may be
shared: run it under the machine's CPU lock, and compare ratios measured side by side.

Self-speculative decoding (issue 16), on a model whose MTP head is trained so that acceptance is
real: a DeepSeek-V3-shaped model (8 layers of width 128, latent attention, 8 experts top-2, one
MTP depth; 5.0M parameters, 0.5M of them the MTP module) trained from scratch with its MTP head
on the built-in corpus for 1,200 steps, then its head alone for 1,000 more on the frozen model's
own predictions (`--train.init_from`, `--train.freeze=model`, `--model.mtp_target=model`; about
6 + 4 minutes, once: the run directories are cached under ~/.cache/moekit/benchmarks by their
configs' hashes; the JSON says how they were trained). Batch 1,
greedy, a 32-token prompt of standard-library text, 128 new tokens, the same side-by-side
method: moekit plain, moekit drafting 1, 2 and 3 tokens with its MTP head (`generate(...,
speculative="mtp")`), and transformers eager, plain and with `generate(use_mtp=True)` (its
generic `MtpModel` on the same weights, written with `save_hf(..., "deepseek_v3")`; one draft a
round), all emitting the same tokens (checked). Reported per draft count: the acceptance rate of
each draft position, the mean accepted length L (tokens per verification), the speedup over
plain decode, the bound L (a round costs at least a plain step) and a cost model of the round
from the forwards and draft steps timed inside `generate`. Also: the first draft's acceptance
on real text, teacher-forced, greedy and sampled, for the head before and after its second stage;
and plain against MTP drafting when sampling
at temperature 0.8 on 6 prompts (tokens differ by design; acceptance by the accept/reject rule;
tokens/s over all six). The speculative part takes about 2 minutes (plus the first training).

    python benchmarks/decode.py                      # minutes (+ the MTP model's training)
    python benchmarks/decode.py --speculative-only   # the MTP contenders: decode_speculative.json
    python benchmarks/decode.py --quick              # small models, for the tests
    python benchmarks/decode.py --llamacpp           # against llama.cpp: decode_llamacpp.json
    python benchmarks/decode.py --llamacpp --arch deepseek_v3   # DeepSeek-V3's layout (MLA)

llama.cpp on the same weights (issue 17; `--llamacpp`, needs the `bench` extras: llama-cpp-python
built from source, gguf, sentencepiece): the model saved with `save_hf` and a Llama-style
tokenizer, converted by llama.cpp's convert_hf_to_gguf.py to f32, f16 and q8_0 GGUF and quantized
by llama.cpp's quantizer to q4_0 (benchmarks/llamacpp.py). llama.cpp's f32 logits on a 16-token
prompt are compared with moekit's first (flash attention off, float32 K/V cache). Then batch 1
and 8, 128 new tokens after a 16-token prompt, 2 threads, medians of 3 side by side, greedy and
fed a fixed random token sequence (experts change every step, as in real text), against moekit's
fp32 decode; effective GB/s = tokens/s x the bytes a batch-1 token reads in each format (all but
the embedding's other rows and the unchosen experts), against a 2 GiB `sum`. Each moekit
contender also runs block by block (`*_block_by_block`: its decoder unset, so the model's forward
runs between its C calls, a block's at batch 1 and a layer's at batch 8, as before
`moekit.inference.decode_step`), in the same alternation: the one-call step's gain, and its tokens
checked the same. `--arch deepseek_v3` runs the comparison on DeepSeek-V3's layout at the same
widths (latent attention, which llama.cpp also decodes in the latent space; a dense first layer;
a shared expert): llama.cpp's converter reads it as its `deepseek2` architecture.

Prints JSON; writes benchmarks/results/decode.json (decode_speculative.json with
--speculative-only, decode_llamacpp.json with --llamacpp; or --out).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from moekit.cli.common import results_file
from moekit.config import QuantizeConfig
from moekit.machine import machine_info
from moekit.quant import kernels

RESULTS = Path(__file__).resolve().parent / "results" / "decode.json"
SPECULATIVE_RESULTS = RESULTS.with_name("decode_speculative.json")
TARGET_SPEEDUP = 2.0  # issue 5: batch-1 decode at least 2x transformers eager
TARGET_FRACTION_OF_BOUND = 0.5  # and at least half the streaming-bandwidth bound


ARCHS = ("mixtral", "deepseek_v3")  # --arch: the layouts of decode.py's model


def model_config(quick: bool, arch: str = "mixtral"):
    """8 layers, d_model 768, 8 experts top-2 of width 1024, vocab 32000: 213M parameters. With
    arch deepseek_v3, DeepSeek-V3's layout at those widths: latent attention (a low-rank query of
    384, latent rank 256, 12 heads of 64 + 32 rotary), a dense first layer of width 2048, sigmoid
    routing scaled by 2.5 and one shared expert."""
    from moekit import ModelConfig, MoEConfig
    from moekit.config import MLAConfig

    d, f, layers, vocab = (128, 256, 2, 1024) if quick else (768, 1024, 8, 32000)
    heads = 12 if not quick else 4
    if arch == "deepseek_v3":
        q, r, nope, rope = (64, 64, 32, 16) if quick else (384, 256, 64, 32)
        mla = MLAConfig(q_lora_rank=q, kv_lora_rank=r, qk_nope_head_dim=nope,
                        qk_rope_head_dim=rope, v_head_dim=nope)  # fmt: skip
        moe = MoEConfig(d_model=d, d_expert=f, n_experts=8, top_k=2, score="sigmoid",
                        routed_scaling=2.5, n_shared_experts=1)  # fmt: skip
        return ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads, moe=moe,
                           mla=mla, first_dense=1, d_ff=2 * f, max_seq_len=512)  # fmt: skip
    return ModelConfig(
        vocab_size=vocab,
        d_model=d,
        n_layers=layers,
        n_heads=heads,
        n_kv_heads=4 if not quick else 2,
        moe=MoEConfig(d_model=d, d_expert=f, n_experts=8, top_k=2),
        max_seq_len=512,
    )


def stream_bandwidth(repeats: int = 7, n_bytes: int = 2**30) -> dict:
    """Bytes/s of summing an n_bytes (1 GiB) float32 tensor: the median and the best of
    `repeats`."""
    x = torch.ones(n_bytes // 4)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return {"median": x.numel() * 4 / statistics.median(times), "best": x.numel() * 4 / min(times)}


def decode_weights(model) -> dict[str, tuple[tuple[int, int], int]]:
    """The matrices one batch-1 decode step multiplies by, by role: (shape, how many per token).
    Everything but the embedding table (one row read) and the experts no token chose."""
    cfg, moe = model.cfg, model.cfg.moe
    attn = model.layers[0].attn
    n_moe = len(model.moe_layers())
    return {
        "attention q/o": (tuple(attn.q_proj.weight.shape), 2 * cfg.n_layers),
        "attention k/v": (tuple(attn.k_proj.weight.shape), 2 * cfg.n_layers),
        "expert w_in": (tuple(model.moe_layers()[0].experts.w_in.shape[1:]), moe.top_k * n_moe),
        "expert w_out": (tuple(model.moe_layers()[0].experts.w_out.shape[1:]), moe.top_k * n_moe),
        "router": ((moe.n_experts, cfg.d_model), n_moe),
        "lm_head": ((cfg.vocab_size, cfg.d_model), 1),
    }


def gemv_bandwidth(shape: tuple[int, int], linear, pool_bytes: int, repeats: int = 7) -> float:
    """Bytes/s of linear(x (1, I), W (O, I)) over a pool of distinct weights of `pool_bytes` (more
    than L3, so each is read from memory, as in decode): the median of `repeats` passes."""
    O, I = shape
    n = max(2, pool_bytes // (O * I * 4))
    pool = [torch.randn(O, I) for _ in range(n)]
    x = torch.randn(1, I)
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            for w in pool:
                linear(x, w)
            times.append(time.perf_counter() - t0)
    return n * O * I * 4 / statistics.median(times)


def bounds(model, quick: bool) -> dict:
    """Bytes one batch-1 decode token reads, and the tokens/s they allow at the streaming (sum)
    bandwidth and at the GEMV bandwidths of torch's F.linear and moekit's kernel."""
    import torch.nn.functional as F

    from moekit.inference import decode_kernels

    weights = decode_weights(model)
    bytes_per_token = sum(o * i * 4 * n for (o, i), n in weights.values())
    pool = (64 if quick else 256) * 2**20
    stream = stream_bandwidth()
    gemv = {}

    def numpy_gemv(x, w):  # OpenBLAS, for comparison only (its thread pool is not torch's)
        return w.numpy() @ x.numpy()[0]

    for name, linear in (
        ("torch", F.linear),
        ("moekit", decode_kernels.linear),
        ("numpy", numpy_gemv),
    ):
        per_role = {r: gemv_bandwidth(s, linear, pool) for r, (s, _) in weights.items()}
        seconds = sum(o * i * 4 * n / per_role[r] for r, ((o, i), n) in weights.items())
        gemv[name] = {
            "per_role_gb_s": {r: bw / 1e9 for r, bw in per_role.items()},
            "token_weighted_gb_s": bytes_per_token / seconds / 1e9,
            "bound_tokens_per_s": 1 / seconds,
        }
    return {
        "bytes_per_token": bytes_per_token,
        "weights_per_token": {r: {"shape": s, "count": n} for r, (s, n) in weights.items()},
        "stream_gb_s": {k: v / 1e9 for k, v in stream.items()},
        "stream_bound_tokens_per_s": stream["median"] / bytes_per_token,
        "gemv": gemv,
    }


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def side_by_side(gens: dict, prompt, n_new: int, repeats: int) -> dict:
    """Prefill seconds and decode tokens/s of each generator, the generators alternating within
    each repetition; medians over `repeats`. Decode tokens/s = (n_new - 1) * batch / (time of
    n_new tokens - time of 1 token), both from the same repetition."""
    for gen in gens.values():
        gen(prompt, 2)  # warm up
    runs = {name: [] for name in gens}
    for _ in range(repeats):
        for name, gen in gens.items():
            t1 = timed(lambda g=gen: g(prompt, 1))
            tn = timed(lambda g=gen: g(prompt, n_new))
            runs[name].append((t1, (n_new - 1) * prompt.shape[0] / max(tn - t1, 1e-9)))
    return {
        name: {
            "prefill_s": statistics.median(t for t, _ in r),
            "decode_tokens_per_s": statistics.median(v for _, v in r),
            "each_decode_tokens_per_s": [v for _, v in r],
            "tokens": gens[name](prompt, n_new),
        }
        for name, r in runs.items()
    }


def measure(quick: bool) -> dict:
    import transformers

    from moekit import MoETransformer
    from moekit.cpu_memory import use_huge_pages
    from moekit.inference import decode_kernels
    from moekit.interop import save_hf
    from moekit.model.generation import generate

    torch.manual_seed(0)
    cfg = model_config(quick)
    model = MoETransformer(cfg).eval()
    n_new, prompt_len, repeats = (8, 16, 2) if quick else (32, 32, 5)
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(model, Path(tmp) / "hf", "mixtral")
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            Path(tmp) / "hf", dtype=torch.float32, attn_implementation="eager"
        ).eval()

    # Every model's weights in 2 MiB pages, alike (what `moekit generate` does; cpu_memory).
    huge_page_bytes = {
        "moekit": use_huge_pages(model.parameters()),
        "transformers": use_huge_pages(hf.parameters()),
    }

    def hf_gen(x, n):
        with torch.no_grad():
            out = hf.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return out[:, x.shape[1] :]

    # The same model with the kernels swapped in, sharing its parameters (the deepcopy's memo
    # maps each one to itself): both generators read the same weights.
    shared = {id(p): p for p in model.parameters()}
    with_kernels = decode_kernels.apply_decode_kernels(copy.deepcopy(model, shared))

    gens = {
        "moekit": lambda x, n: generate(with_kernels, x, n),
        "moekit_without_kernels": lambda x, n: generate(model, x, n),
        "transformers_eager": hf_gen,
    }
    result = {
        "benchmark": "decode",
        "machine": machine(),
        "model": {
            "parameters": model.num_parameters(),
            "active_parameters": model.num_parameters(active=True),
            "prompt_tokens": prompt_len,
            "new_tokens": n_new,
            "repeats": repeats,
            "kernels": decode_kernels.available(),
            "huge_page_bytes": huge_page_bytes,
        },
        "bandwidth": bounds(model, quick),
        "batches": {},
    }
    for batch in (1, 8):
        prompt = torch.randint(0, cfg.vocab_size, (batch, prompt_len))
        runs = side_by_side(gens, prompt, n_new, repeats)
        tokens = [r.pop("tokens") for r in runs.values()]
        theirs = runs["transformers_eager"]["decode_tokens_per_s"]
        result["batches"][str(batch)] = {
            **runs,
            "same_tokens": all(torch.equal(t, tokens[0]) for t in tokens),
            "speedup": runs["moekit"]["decode_tokens_per_s"] / theirs,
            "speedup_without_kernels": runs["moekit_without_kernels"]["decode_tokens_per_s"]
            / theirs,
        }
    result["checks"] = checks(result)
    result["speculative"] = speculative(quick)
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    result["note"] = note(result)
    return result


def checks(result: dict) -> dict:
    """The issue's targets at batch 1, and the fractions of the bounds."""
    bw = result["bandwidth"]
    b1 = result["batches"]["1"]
    ours = b1["moekit"]["decode_tokens_per_s"]
    stream_bound = bw["stream_bound_tokens_per_s"]
    return {
        "batch1_speedup_vs_transformers": b1["speedup"],
        "target_speedup": TARGET_SPEEDUP,
        "batch1_fraction_of_stream_bound": ours / stream_bound,
        "target_fraction_of_bound": TARGET_FRACTION_OF_BOUND,
        "batch1_fraction_of_kernel_gemv_bound": ours / bw["gemv"]["moekit"]["bound_tokens_per_s"],
        "batch1_without_kernels_fraction_of_torch_gemv_bound": b1["moekit_without_kernels"][
            "decode_tokens_per_s"
        ]
        / bw["gemv"]["torch"]["bound_tokens_per_s"],
        "batch8_speedup_vs_transformers": result["batches"]["8"]["speedup"],
        "met": b1["speedup"] >= TARGET_SPEEDUP and ours / stream_bound >= TARGET_FRACTION_OF_BOUND,
    }


def note(result: dict) -> str:
    """What the batch-1 figure is made of, in the measured numbers."""
    bw, c = result["bandwidth"], result["checks"]
    gemv, stream = bw["gemv"], bw["stream_gb_s"]["median"]
    b1 = result["batches"]["1"]
    return (
        f"A batch-1 decode token reads {bw['bytes_per_token'] / 1e6:.0f} MB of float32 weights "
        "(all but the embedding table and the unchosen experts), one matrix-vector product each. "
        f"torch's F.linear (MKL) streams the model's matrices at "
        f"{gemv['torch']['token_weighted_gb_s']:.1f} GB/s, moekit's kernel at "
        f"{gemv['moekit']['token_weighted_gb_s']:.1f} GB/s, a plain sum over 1 GiB at "
        f"{stream:.1f} GB/s: bounds of {gemv['torch']['bound_tokens_per_s']:.1f}, "
        f"{gemv['moekit']['bound_tokens_per_s']:.1f} and "
        f"{bw['stream_bound_tokens_per_s']:.1f} tokens/s. moekit decodes "
        f"{b1['moekit']['decode_tokens_per_s']:.1f} tokens/s "
        f"({c['batch1_fraction_of_stream_bound']:.0%} of the stream bound, "
        f"{c['batch1_fraction_of_kernel_gemv_bound']:.0%} of its GEMV bound), "
        f"{b1['moekit_without_kernels']['decode_tokens_per_s']:.1f} with the kernels off, "
        f"transformers eager {b1['transformers_eager']['decode_tokens_per_s']:.1f}: "
        f"{c['batch1_speedup_vs_transformers']:.2f}x. The rest of a step is the work outside "
        "the matrix products (norms, RoPE, attention over the cache, routing, Python), which "
        "runs with caches the streamed weights have just evicted."
    )


# --- Self-speculative decoding with the MTP head (issue 16) --------------------------------------

TARGET_MTP_SPEEDUP = 1.4  # issue 16: batch-1 decode with MTP drafting >= 1.4x plain decode
MTP_CACHE = Path.home() / ".cache" / "moekit" / "benchmarks"


def mtp_hf_config(quick: bool):
    """A DeepSeek-V3-shaped model with one MTP depth, as transformers' `DeepseekV3Config` (so
    that `save_hf(..., "deepseek_v3")` writes it and transformers' `MtpModel` loads it): latent
    attention, 8 experts top-2, sigmoid routing. Default: 8 layers of width 128, vocabulary 2048
    (the `experiment` run's BPE); quick: 2 layers of 64 over bytes."""
    from transformers import DeepseekV3Config

    d, layers, vocab = (64, 2, 257) if quick else (128, 8, 2048)
    return DeepseekV3Config(
        vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=2 * d, moe_intermediate_size=d,
        n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
        first_k_dense_replace=0, n_shared_experts=1, routed_scaling_factor=1.0,
        q_lora_rank=None, kv_lora_rank=d // 4, qk_rope_head_dim=16, qk_nope_head_dim=16,
        v_head_dim=d // 4, max_position_embeddings=256, rms_norm_eps=1e-6,
        tie_word_embeddings=False, num_nextn_predict_layers=1, bos_token_id=None,
        eos_token_id=None, pad_token_id=None, rope_parameters={"rope_type": "default",
                                                               "rope_theta": 1e4},
    )  # fmt: skip


def mtp_run_config(quick: bool, work: Path):
    """The `experiment` run (its BPE, the built-in corpus, 16 x 128 tokens a step) training the
    model of `mtp_hf_config` with its MTP head (lambda 0.3) from scratch; quick: 12 steps on
    the json package in bytes."""
    from moekit.config import RunConfig
    from moekit.interop import hf_model_config

    base = RunConfig.preset("experiment")
    model = hf_model_config(mtp_hf_config(quick).to_dict()).replace(mtp_loss_weight=0.3)
    assert model.moe is not None
    model = model.replace(moe=model.moe.replace(bias_update_rate=0.001))  # V3's balancing
    train = base.train.replace(steps=MTP_STEPS if not quick else 12, log_every=50)
    train = train.replace(eval=train.eval.replace(every=0))
    if quick:
        import sysconfig

        data = train.data.replace(source=str(Path(sysconfig.get_paths()["stdlib"]) / "json"),
                                  tokenizer="bytes", cache_dir=str(work / "cache"))  # fmt: skip
        train = train.replace(batch_size=4, seq_len=64, warmup_steps=2, data=data)
    return base.replace(model=model, train=train)


MTP_STEPS = 1200
# Then the head alone, on the frozen model's own predictions (--train.init_from, freeze=model,
# mtp_target=model): scratch runs on this model's 1200-step head, 1000 steps from it, teacher-
# forced sampled acceptance (T = 0.8) 0.753 -> 0.818 with this target, 0.753 -> 0.712 with more
# cross-entropy (the head learns the data, which the main model has not fully learned).
MTP_DISTILL_STEPS = 1000


def mtp_distill_config(quick: bool, work: Path, joint_run: Path):
    """The second stage: a new run from `joint_run`'s weights training only the MTP head on the
    main model's predictions (KL from its logits, `mtp_target="model"`)."""
    cfg = mtp_run_config(quick, work)
    train = cfg.train.replace(steps=6 if quick else MTP_DISTILL_STEPS, init_from=str(joint_run),
                              freeze=("model",))  # fmt: skip
    return cfg.replace(model=cfg.model.replace(mtp_target="model"), train=train)


def cached_run(cfg, quick: bool, work: Path) -> tuple[Path, float | None]:
    """A run directory of `cfg`, trained on first use and cached under ~/.cache/moekit/benchmarks
    by its config's hash; and the seconds it took to train now (None if cached)."""
    import hashlib
    import json

    from moekit.train import train

    key = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
    run_dir = (work if quick else MTP_CACHE) / f"decode-mtp-{key}"
    if (run_dir / "checkpoints").is_dir():
        return run_dir, None
    t0 = time.perf_counter()
    train(cfg, run_dir)
    return run_dir, time.perf_counter() - t0


def trained_mtp_run(quick: bool, work: Path) -> tuple[Path, Path, dict]:
    """The MTP model's two run directories (a few minutes each on first use, then cached): the
    model and head trained together, then the head alone distilled from the frozen model (the
    benchmark's model: the same main weights); and how they were trained."""
    from moekit.train.metrics import read_metrics

    joint_cfg = mtp_run_config(quick, work)
    joint, joint_s = cached_run(joint_cfg, quick, work)
    distill_cfg = mtp_distill_config(quick, work, joint)
    distilled, distill_s = cached_run(distill_cfg, quick, work)

    def last_logged(run_dir: Path) -> dict:
        train = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
        return {k: v for k, v in train[-1].items() if k != "layers"}

    how = {
        "run_dir": str(distilled),
        "joint_run_dir": str(joint),
        "trained_in_this_run": joint_s is not None or distill_s is not None,
        "training_seconds": {"joint": joint_s, "head_distillation": distill_s},
        "recipe": "the `experiment` run preset (its 2048-token BPE on the built-in stdlib corpus, "
        "16 x 128 tokens a step, AdamW at its lr) training the DeepSeek-V3-shaped model below "
        "from scratch (aux-loss-free balancing, bias update 0.001, as V3) with "
        f"--model.mtp_depth=1 --model.mtp_loss_weight=0.3 for {joint_cfg.train.steps} steps "
        "(main model and MTP head together); then a new run from its weights "
        f"(--train.init_from) training the head alone for {distill_cfg.train.steps} steps on "
        "the frozen model's own predictions (--train.freeze=model --model.mtp_target=model)",
        "steps": joint_cfg.train.steps,
        "head_distillation_steps": distill_cfg.train.steps,
        "final_logged": last_logged(joint),
        "final_logged_head_distillation": last_logged(distilled),
        "model": distill_cfg.model.to_dict(),
    }
    return distilled, joint, how


def round_costs(model, prompt, n_new: int, n: int) -> dict:
    """Seconds measured inside a plain and a speculative (n drafts) greedy generate of n_new
    tokens, the model's forward and mtp_step timed as they run: the mean decode forward (1
    token), the mean verification forward (n + 1 tokens), the mean draft step (the first of a
    round also recomputes the positions accepted since the last), and drafts per round. The
    prompt's forward is left out."""
    from moekit.model.generation import generate

    times: dict[str, list[float]] = {"forward": [], "mtp_step": []}

    def timing(name: str, fn):
        def timed_call(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            times[name].append(time.perf_counter() - t0)
            return out

        return timed_call

    model.forward = timing("forward", model.forward)
    model.mtp_step = timing("mtp_step", model.mtp_step)
    try:
        generate(model, prompt, n_new)
        decode = times["forward"][1:]
        times["forward"], times["mtp_step"] = [], []
        generate(model, prompt, n_new, speculative="mtp", draft_tokens=n)
        verify, drafts = times["forward"][1:], times["mtp_step"]
    finally:
        del model.forward, model.mtp_step  # the class's methods again
    return {
        "decode_forward_s": statistics.mean(decode),
        "verify_forward_s": statistics.mean(verify),
        "draft_step_s": statistics.mean(drafts),
        "drafts_per_round": len(drafts) / len(verify),
    }


SAMPLING_TEMPERATURE = 0.8
SAMPLED_PROMPTS, SAMPLED_PROMPT_STRIDE, SAMPLED_REPEATS = 6, 96, 3


def sampled_contenders(model, prompts, n_new: int, repeats: int, drafts: tuple[int, ...]) -> dict:
    """Sampling at temperature 0.8 (the continuation varies instead of looping as greedy's
    does): plain against MTP drafting of each count, side by side on each of `prompts` (1, P),
    each prompt's calls seeded alike; tokens differ by design (the accept/reject rule keeps the
    distribution, tested in tests/test_speculative*.py). Tokens/s over all prompts (their decode
    seconds summed), each prompt's speedups, and acceptance and mean accepted length over the
    prompts' continuations (one each: every full-length call of a prompt repeats it): one
    continuation's acceptance is a few dozen verifications, too few alone."""
    from moekit.model.generation import generate
    from moekit.model.speculative import SpeculativeStats

    t = SAMPLING_TEMPERATURE
    last: dict[int, SpeculativeStats] = {}  # each draft count's latest call's statistics

    def contenders(seed: int) -> dict:
        def plain(x, k):
            gen = torch.Generator().manual_seed(seed + k)
            return generate(model, x, k, temperature=t, generator=gen)

        def spec(x, k, n):
            last[n], gen = SpeculativeStats(), torch.Generator().manual_seed(seed + k)
            return generate(model, x, k, temperature=t, speculative="mtp", draft_tokens=n,
                            stats=last[n], generator=gen)  # fmt: skip

        return {"moekit": plain} | {f"moekit_mtp_{n}": functools.partial(spec, n=n) for n in drafts}

    seconds: dict[str, float] = {}
    proposed = {n: [0] * n for n in drafts}
    accepted = {n: [0] * n for n in drafts}
    verifications = dict.fromkeys(drafts, 0)
    per_prompt = []
    for i, prompt in enumerate(prompts):
        runs = side_by_side(contenders(seed=1000 * i), prompt, n_new, repeats)
        for name, r in runs.items():
            seconds[name] = seconds.get(name, 0.0) + (n_new - 1) / r["decode_tokens_per_s"]
        for n in drafts:  # side_by_side's last call: the n_new-token continuation
            proposed[n] = [a + b for a, b in zip(proposed[n], last[n].proposed, strict=True)]
            accepted[n] = [a + b for a, b in zip(accepted[n], last[n].accepted, strict=True)]
            verifications[n] += last[n].verifications
        base = runs["moekit"]["decode_tokens_per_s"]
        per_prompt.append({n: runs[n]["decode_tokens_per_s"] / base for n in runs if n != "moekit"})
    tokens = len(prompts) * (n_new - 1)
    out: dict = {
        "temperature": t,
        "prompts": len(prompts),
        "decode_tokens_per_s": {name: tokens / s for name, s in seconds.items()},
        "speedup_by_prompt": per_prompt,
        "draft_tokens": {},
    }
    for n in drafts:
        rates = [a / p if p else 0.0 for a, p in zip(accepted[n], proposed[n], strict=True)]
        out["draft_tokens"][str(n)] = {
            "acceptance_by_position": rates,
            "mean_accepted_length": 1 + sum(accepted[n]) / max(verifications[n], 1),
            "speedup_vs_plain": seconds["moekit"] / seconds[f"moekit_mtp_{n}"],
        }
    return out


def teacher_forced_acceptance(model, ids) -> dict[str, float]:
    """On a text (1, S), the first draft's acceptance had decoding produced that text: "greedy",
    the share of positions where the MTP head's argmax for the token two ahead equals the main
    model's argmax for it one position later; "sampled", the mean of sum_v min(p(v), q(v)) of
    the two distributions at SAMPLING_TEMPERATURE (the accept/reject rule's acceptance)."""
    with torch.no_grad():
        out = model(ids, mtp=True, with_aux=False)
    main = out.logits[0, 1:].float()  # position i + 1: the token at i + 2
    draft = out.mtp_logits[0][0, : ids.shape[1] - 1].float()  # position i: the token at i + 2
    p, q = (torch.softmax(v / SAMPLING_TEMPERATURE, -1) for v in (main, draft))
    return {
        "greedy": float((main.argmax(-1) == draft.argmax(-1)).float().mean()),
        "sampled": float(torch.minimum(p, q).sum(-1).mean()),
    }


def speculative(quick: bool) -> dict:
    """Batch-1 greedy decode of the trained MTP model: plain, with MTP drafting of 1, 2 and 3
    tokens, transformers plain and with `generate(use_mtp=True)`; same tokens checked."""
    import transformers

    from moekit import load
    from moekit.cpu_memory import use_huge_pages
    from moekit.inference import decode_kernels
    from moekit.interop import save_hf
    from moekit.model.generation import generate
    from moekit.model.speculative import SpeculativeStats

    work = Path(tempfile.mkdtemp(prefix="decode-mtp-"))
    run_dir, joint_dir, how = trained_mtp_run(quick, work)
    loaded = load(run_dir)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    use_huge_pages(model.parameters())
    fast = decode_kernels.apply_decode_kernels(model)
    n_new, repeats = (12, 2) if quick else (128, 5)
    drafts = (1, 2) if quick else (1, 2, 3)
    # A prompt from a validation file of the corpus: real text, as a user's would be.
    text = Path(__file__).read_text()[:400] if quick else _stdlib_text()
    text_ids = tokenizer.encode(text).ids
    prompt = torch.tensor([text_ids[:32]])

    stats = {n: SpeculativeStats() for n in drafts}
    gens = {"moekit": lambda x, k: generate(fast, x, k)}
    for n in drafts:
        gens[f"moekit_mtp_{n}"] = lambda x, k, n=n: generate(
            fast, x, k, speculative="mtp", draft_tokens=n, stats=stats[n]
        )
    hf_note, hf_dir = None, work / "hf"
    try:
        save_hf(loaded.model, hf_dir, "deepseek_v3")
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            hf_dir, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        use_huge_pages(hf.parameters())
        # transformers finds the MTP layer by DeepseekV3ForCausalLM's pattern for unexpected keys,
        # written for the released checkpoint's layer number: model\.layers\.61.*. This model's
        # MTP layer is model.layers.{n_layers}: point the loaded instance's pattern at it.
        n_layers = hf.config.num_hidden_layers
        hf._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{n_layers}\..*"]
        hf_note = (
            "ran; transformers looks for DeepSeek-V3's MTP layer at model.layers.61 only "
            "(DeepseekV3ForCausalLM._keys_to_ignore_on_load_unexpected), so the loaded instance's "
            f"pattern was pointed at model.layers.{n_layers}; it drafts num_nextn_predict_layers "
            "= 1 token a round"
        )

        def hf_gen(x, k, mtp=False):
            kw = {"use_mtp": True} if mtp else {}
            with torch.no_grad():
                out = hf.generate(x, max_new_tokens=k, min_new_tokens=k, do_sample=False, **kw)
            return out[:, x.shape[1] :]

        hf_gen(prompt, 3, mtp=True)  # fails here if transformers cannot draft with this layer
        gens["transformers_eager"] = hf_gen
        gens["transformers_eager_use_mtp"] = lambda x, k: hf_gen(x, k, mtp=True)
    except Exception as err:  # recorded in the results, not hidden
        hf_note = f"transformers' generate(use_mtp=True) could not run: {type(err).__name__}: {err}"
    runs = side_by_side(gens, prompt, n_new, repeats)
    tokens = {name: r.pop("tokens") for name, r in runs.items()}
    plain = runs["moekit"]["decode_tokens_per_s"]
    same = {name: torch.equal(t, tokens["moekit"]) for name, t in tokens.items()}
    # The last call of each speculative generator was the n_new-token one: its statistics.
    step = 1 / plain  # plain decode's seconds per token, side by side
    per_draft = {}
    for n in drafts:
        s, c = stats[n], round_costs(fast, prompt, n_new, n)
        length = s.mean_accepted_length
        # A round: a plain decode step, plus what verifying n + 1 tokens adds to a forward of
        # one, plus the drafts.
        extra = c["verify_forward_s"] - c["decode_forward_s"]
        cost = (step + extra + c["drafts_per_round"] * c["draft_step_s"]) / step
        speedup = runs[f"moekit_mtp_{n}"]["decode_tokens_per_s"] / plain
        per_draft[str(n)] = {
            "acceptance_by_position": s.acceptance_rates,
            "acceptance_first_position": s.acceptance_rates[0],
            "mean_accepted_length": length,
            "verifications": s.verifications,
            "speedup_vs_plain": speedup,
            "bound_speedup": length,
            "fraction_of_bound": speedup / length,
            "in_run_seconds": c,
            "round_cost_in_decode_steps": cost,
            "cost_model_speedup": length / cost,
        }
    n_prompts = 2 if quick else SAMPLED_PROMPTS
    starts = [i * SAMPLED_PROMPT_STRIDE for i in range(n_prompts)]
    prompts = [torch.tensor([text_ids[s : s + 32]]) for s in starts if s + 32 <= len(text_ids)]
    sampled = sampled_contenders(
        fast, prompts, n_new, repeats if quick else SAMPLED_REPEATS, drafts
    )
    window = torch.tensor([text_ids[:256]])
    # The same main weights (frozen in the second stage): only the heads differ. Both plain: the
    # distilled run's model (loaded above; decoding changed none of its weights) without the
    # kernels, as the joint run's is loaded.
    heads = {
        "trained_with_the_model": teacher_forced_acceptance(load(joint_dir).model.eval(), window),
        "distilled": teacher_forced_acceptance(decode_kernels.remove_decode_kernels(model), window),
    }
    best = max(per_draft, key=lambda n: per_draft[n]["speedup_vs_plain"])
    sampled_best = max(sampled["draft_tokens"].values(), key=lambda d: d["speedup_vs_plain"])
    result = {
        "model": {
            "parameters": loaded.model.num_parameters(),
            "prompt_tokens": prompt.shape[1],
            "new_tokens": n_new,
            "repeats": repeats,
            "prompt_text": text[:200],
        },
        "training": how,
        **runs,
        "generated_text": tokenizer.decode(tokens["moekit"][0].tolist()),
        "teacher_forced_first_draft_acceptance": heads,
        "sampled": sampled,
        "same_tokens": same,
        "all_same_tokens": all(same.values()),
        "draft_tokens": per_draft,
        "transformers_use_mtp": hf_note,
        "bound": "speedup over plain decode <= L, the mean accepted length (tokens per "
        "verification: 1 + the sum of the per-position acceptance rates; for one draft the "
        "issue's 1 + acceptance): a round yields L tokens and costs at least one plain decode "
        "step (a verification forward of n + 1 tokens costs at least one of 1 token), so "
        "speedup = L * t_step / t_round <= L. cost_model_speedup puts in the measured round: "
        "L / (1 + (t_verify - t_forward + drafts_per_round * t_draft) / t_step), t_step plain "
        "decode's seconds per token side by side, t_forward, t_verify and t_draft the mean "
        "decode forward, verification forward and MTP draft step timed inside a generate call "
        "(in_run_seconds)",
        "checks": {
            "best_draft_tokens": int(best),
            "best_speedup_vs_plain": per_draft[best]["speedup_vs_plain"],
            "target_speedup": TARGET_MTP_SPEEDUP,
            "met": per_draft[best]["speedup_vs_plain"] >= TARGET_MTP_SPEEDUP,
            "sampled_best_speedup_vs_plain": sampled_best["speedup_vs_plain"],
            "sampled_met": sampled_best["speedup_vs_plain"] >= TARGET_MTP_SPEEDUP,
        },
    }
    if "transformers_eager_use_mtp" in runs:
        theirs = runs["transformers_eager"]["decode_tokens_per_s"]
        result["transformers_use_mtp_speedup_vs_its_plain"] = (
            runs["transformers_eager_use_mtp"]["decode_tokens_per_s"] / theirs
        )
    return result


# --- llama.cpp on the same weights (issue 17) ----------------------------------------------------

LLAMACPP_RESULTS = RESULTS.with_name("decode_llamacpp.json")
# How the llama-cpp-python in the `bench` group was built (benchmarks/README.md, Decoding), on
# any host: the instruction sets -march=native gave it are that host's, in the results'
# system_info (llama.cpp's own report). A build with further flags (as the Intel run's
# -mno-amx-*) says so in its results.
LLAMACPP_BUILD = (
    "pip install --no-deps --no-build-isolation llama_cpp_python-0.3.36.tar.gz with "
    "CMAKE_ARGS='-DLLAVA_BUILD=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF "
    "-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF "
    "-DCMAKE_BUILD_TYPE=Release', gcc 12.2 (-march=native: this host's instruction sets, as "
    "system_info lists them), OpenMP"
)
# moekit's side, its precision matched to a llama.cpp format for the comparison; a quantized
# variant is one more entry in `moekit_contenders`.
MATCHED = {"moekit_fp32": "f32", "moekit_bf16": "f16", "moekit_int8": "q8_0",
           "moekit_int4": "q4_0"}  # fmt: skip


def moekit_contenders(model) -> list[tuple[str, torch.nn.Module]]:
    """(name, model ready to decode) of moekit's side; each shares nothing it changes with
    `model`. Names of MATCHED pair with llama.cpp's format of the same precision."""
    from moekit.inference import decode_kernels
    from moekit.quant.modules import quantize_model

    # The fp32 copy shares the caller's weights (the decode kernels and glue change none of them).
    shared = {id(p): p for p in model.parameters()}
    out = [("moekit_fp32", decode_kernels.apply_decode_kernels(copy.deepcopy(model, shared)))]
    for name, config in MOEKIT_QUANTIZED.items():
        quantized = quantize_model(copy.deepcopy(model), config)
        out.append((name, decode_kernels.apply_decode_kernels(quantized)))
    return out


# moekit's contenders again with the model's forward between its C calls (each block one at
# batch 1, each layer one above: its decoder unset, the code before `decode_step`), beside the
# one-call step
BLOCK_BY_BLOCK = "_block_by_block"

# moekit's weights per matched format: every projection in the scheme (routers, norms and the
# embedding stay float32); with int4, the head int8, as llama.cpp's q4_0 keeps its output at
# Q6_K (and attn_k/attn_v at Q8_0; moekit's are int4).
MOEKIT_QUANTIZED = {
    "moekit_bf16": QuantizeConfig(weights="bf16"),
    "moekit_int8": QuantizeConfig(weights="int8"),
    "moekit_int4": QuantizeConfig(weights="int4", head="int8"),
}


def busiest_processes(n: int = 8) -> list[str]:
    """`ps aux --sort=-%cpu`'s first lines: what else ran on the machine."""
    import subprocess

    ps = subprocess.run(["ps", "aux", "--sort=-%cpu"], capture_output=True, text=True)
    return [" ".join(line.split()[:3] + line.split()[10:])[:160] for line in
            ps.stdout.splitlines()[: n + 1]]  # fmt: skip


def _load_sibling(stem: str):
    """benchmarks/<stem>.py, by path (decode.py runs as a script and from the tests)."""
    import importlib.util
    import sys

    name = f"benchmark_{stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{stem}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def llamacpp_section(
    quick: bool, converter: Path | None = None, build: str = LLAMACPP_BUILD, arch: str = "mixtral"
) -> dict:
    """moekit against llama.cpp (f32, f16, q8_0, q4_0 GGUF of the same weights) at batch 1 and 8,
    greedy and fed a fixed random token sequence, side by side; the f32 logits checked first.
    `arch`: the model's layout (`model_config`)."""
    from moekit import MoETransformer
    from moekit.cpu_memory import use_huge_pages
    from moekit.inference.decode_step import decodes_in_one_call, one_token_decoder

    lc = _load_sibling("llamacpp")
    code = _load_sibling("kernel_ab").provenance()  # (the code as the runs import it)
    processes_before, machine_start = busiest_processes(), machine()
    torch.manual_seed(0)
    cfg = model_config(quick, arch)
    model = MoETransformer(cfg).eval()
    prompt_len, n_new, repeats = 16, (16 if quick else 128), (2 if quick else 3)
    threads = 2
    torch.set_num_threads(threads)
    work = Path(tempfile.mkdtemp(prefix="decode-llamacpp-"))
    converter = lc.find_converter(converter)
    t0 = time.perf_counter()
    written = lc.write_ggufs(model, work, converter, threads=threads)
    convert_s = time.perf_counter() - t0
    engines = {fmt: lc.LlamaCppDecoder(path, threads=threads) for fmt, path in
               written["files"].items()}  # fmt: skip
    formats = {f"llamacpp_{fmt}": lc.gguf_bytes_per_token(p, cfg) for fmt, p in
               written["files"].items()}  # fmt: skip
    for fmt, path in written["files"].items():
        formats[f"llamacpp_{fmt}"]["file_bytes"] = path.stat().st_size
    shutil.rmtree(work)  # read into memory: the files are no longer needed
    huge_pages = {f"llamacpp_{fmt}": e.huge_page_bytes for fmt, e in engines.items()}
    not_collapsed = {
        f"llamacpp_{f}": e.huge_page_failures for f, e in engines.items() if e.huge_page_failures
    }
    huge_pages["moekit"] = use_huge_pages(model.parameters())
    ours = moekit_contenders(model)
    for name, m in ours[1:]:  # the quantized copies' stored tensors too, as llama.cpp's are
        huge_pages[name] = use_huge_pages(m)

    # The same computation first: f32 logits on a 16-token prompt (flash attention off, float32
    # K/V cache), greedy tokens below.
    gen = torch.Generator().manual_seed(1)
    prompts = {b: torch.randint(0, cfg.vocab_size, (b, prompt_len), generator=gen) for b in (1, 8)}
    forced = torch.randint(0, cfg.vocab_size, (8, n_new), generator=gen)
    with torch.no_grad():
        theirs_logits = torch.from_numpy(engines["f32"].prompt_logits(prompts[1][0]))
        our_logits = dict(ours)["moekit_fp32"](prompts[1], with_aux=False).logits[0]
    diff = (theirs_logits - our_logits).abs()
    agreement = {
        "prompt_positions": prompt_len,
        "max_abs_logit_diff": float(diff.max()),
        "max_abs_logit": float(our_logits.abs().max()),
        "max_abs_logit_diff_per_position": diff.max(-1).values.tolist(),
        "same_argmax_every_position": bool(
            torch.equal(theirs_logits.argmax(-1), our_logits.argmax(-1))
        ),
    }

    from moekit.model.generation import generate

    def moekit_gen(m, mode):
        if mode == "greedy":
            return lambda x, n: generate(m, x, n)
        return lambda x, n: lc.moekit_forced(m, x, n, forced)

    def llamacpp_gen(engine, mode):
        def run(x, n):
            engine.forced = None if mode == "greedy" else forced
            return engine(x, n)

        return run

    for name, m in ours:
        formats[name] = lc.torch_bytes_per_token(m)
    # The host's bandwidth drifts: a 2 GiB `sum` before and after the timings; the fractions
    # are of the higher of the two medians.
    stream_runs = [stream_bandwidth(n_bytes=2**31)]
    batches: dict = {}
    processes_between: dict = {}

    def block_by_block(m, mode):  # the code before the one-call token: its decoder unset
        gen = moekit_gen(m, mode)

        def run(x, n):
            m.one_token_decoder = None
            try:
                return gen(x, n)
            finally:
                m.one_token_decoder = one_token_decoder

        return run

    same_tokens: dict = {}  # one call and block by block, the same tokens
    for batch in (1, 8):
        for mode in ("greedy", "fixed_sequence"):
            gens = {name: moekit_gen(m, mode) for name, m in ours}
            gens.update({name + BLOCK_BY_BLOCK: block_by_block(m, mode) for name, m in ours})
            gens.update({f"llamacpp_{f}": llamacpp_gen(e, mode) for f, e in engines.items()})
            runs = side_by_side(gens, prompts[batch], n_new, repeats)
            same_tokens.setdefault(str(batch), {})[mode] = {
                n: torch.equal(runs[n]["tokens"], runs[n + BLOCK_BY_BLOCK]["tokens"])
                for n, _ in ours
            }
            reference = runs["moekit_fp32"]["tokens"]
            for r in runs.values():
                tokens = r.pop("tokens")
                r["tokens_agree_with_moekit_fp32"] = float((tokens == reference).float().mean())
                r["vs_moekit_fp32"] = (
                    r["decode_tokens_per_s"] / runs["moekit_fp32"]["decode_tokens_per_s"]
                )
            batches.setdefault(str(batch), {})[mode] = runs
        processes_between[str(batch)] = busiest_processes()
    stream_runs.append(stream_bandwidth(n_bytes=2**31))
    stream = max(stream_runs, key=lambda r: r["median"])
    for name, r in [item for runs in batches["1"].values() for item in runs.items()]:
        gb_s = (
            r["decode_tokens_per_s"]
            * formats[name.removesuffix(BLOCK_BY_BLOCK)]["bytes_per_token"]
            / 1e9
        )
        r["effective_gb_s"] = gb_s
        r["fraction_of_stream"] = gb_s / (stream["median"] / 1e9)
    agreement["greedy_same_tokens_f32"] = (
        batches["1"]["greedy"]["llamacpp_f32"]["tokens_agree_with_moekit_fp32"] == 1.0
    )
    for e in engines.values():
        e.close()
    one_call = {  # the one-call step over block by block, each batch, contender and mode
        batch: {name: {mode: runs[name]["decode_tokens_per_s"] / runs[name + BLOCK_BY_BLOCK][
            "decode_tokens_per_s"] for mode, runs in modes.items()} for name, _ in ours}
        for batch, modes in batches.items()
    }  # fmt: skip
    result = {
        "benchmark": "decode_llamacpp",
        "machine": machine_start,
        **code,
        "llamacpp": {
            **lc.llamacpp_info(),
            "build": build,
            "converter": str(converter),
            "convert_and_quantize_s": convert_s,
            "converter_log_tail": written["converter_log_tail"],
        },
        "settings": {
            "threads": threads,
            "torch_threads": torch.get_num_threads(),
            "prompt_tokens": prompt_len,
            "new_tokens": n_new,
            "repeats": repeats,
            "llamacpp_context": "flash attention off, float32 K/V cache, weights read into "
            "memory (no mmap) and backed by 2 MiB pages like moekit's",
            "fixed_sequence": "a seeded random sequence of new_tokens ids per row, fed one per "
            "step after the prompt instead of the argmax (the argmax is still computed); greedy "
            "with random weights repeats a token and so re-reads the same experts",
            "huge_page_bytes": huge_pages,
            "huge_page_failures": not_collapsed,  # llama.cpp's buffers MADV_COLLAPSE refused
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
            "moekit_quantized_kernel_body": kernels.path(),
            "moekit_step_in_one_call": {
                batch: {name: decodes_in_one_call(m, batch) for name, m in ours} for batch in (1, 8)
            },
        },
        "model": {
            "arch": arch,
            "parameters": model.num_parameters(),
            "active_parameters": model.num_parameters(active=True),
            "config": cfg.to_dict(),
        },
        "formats": formats,
        "agreement": agreement,
        "stream_gb_s": {k: v / 1e9 for k, v in stream.items()},
        "stream_gb_s_before_and_after": [{k: v / 1e9 for k, v in r.items()} for r in stream_runs],
        "stream_bytes": 2**31,
        "batches": batches,
        "one_call_over_block_by_block": one_call,
        "one_call_same_tokens_as_block_by_block": same_tokens,
        "matched_precisions": {k: f"llamacpp_{v}" for k, v in MATCHED.items()},
        "processes_before": processes_before,
        "processes_after_each_batch": processes_between,
        "processes_after": busiest_processes(),
    }
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    result["table"] = llamacpp_table(result)
    return result


def llamacpp_table(result: dict) -> list[str]:
    """One markdown row per contender: tokens/s at batch 1 and 8, greedy and fixed sequence, the
    ratio to moekit fp32 and the batch-1 effective GB/s (fraction of the stream bandwidth)."""
    b = result["batches"]
    rows = ["| contender | b1 greedy | b1 fixed | b8 greedy | b8 fixed | b1 fixed vs moekit fp32 "
            "| b1 fixed GB/s (of stream) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name in b["1"]["greedy"]:
        r = {f"{k}{m}": b[k][m].get(name) for k in b for m in b[k]}
        fixed = r["1fixed_sequence"]
        b8 = [f"{r[f'8{m}']['decode_tokens_per_s']:.1f}" if r[f"8{m}"] else "-"
              for m in ("greedy", "fixed_sequence")]  # fmt: skip
        rows.append(
            f"| {name} | {r['1greedy']['decode_tokens_per_s']:.1f} "
            f"| {fixed['decode_tokens_per_s']:.1f} | {b8[0]} | {b8[1]} "
            f"| {fixed['vs_moekit_fp32']:.2f}x | {fixed['effective_gb_s']:.1f} "
            f"({fixed['fraction_of_stream']:.0%}) |"
        )
    return rows


def _stdlib_text() -> str:
    """The opening of a standard-library file (the corpus the model trained on)."""
    import sysconfig

    return (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()[:2000]


def machine() -> dict:
    import transformers

    return {**machine_info(), "transformers": transformers.__version__}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, for tests")
    parser.add_argument(
        "--speculative-only",
        action="store_true",
        help=f"only the MTP contenders (default --out {SPECULATIVE_RESULTS.name})",
    )
    parser.add_argument(
        "--llamacpp",
        action="store_true",
        help=f"only moekit against llama.cpp (default --out {LLAMACPP_RESULTS.name}; needs the "
        "`bench` extras)",
    )
    parser.add_argument("--converter", type=Path, help="llama.cpp's convert_hf_to_gguf.py")
    parser.add_argument(
        "--arch",
        choices=ARCHS,
        default="mixtral",
        help="with --llamacpp: the model's layout (deepseek_v3: latent attention, a dense first "
        "layer, a shared expert; default --out decode_llamacpp_deepseek_v3.json)",
    )
    parser.add_argument(
        "--body",
        choices=kernels.PATHS,
        help="with --llamacpp: the body moekit's quantized kernels run (default: the widest this "
        "CPU runs); avx2 on an AVX-512 host stands in for an AVX2-only CPU beside a llama.cpp "
        "built without AVX-512 (the float32 kernel keeps its own choice)",
    )
    parser.add_argument(
        "--llamacpp-build",
        default=LLAMACPP_BUILD,
        help="with --llamacpp: how the importable llama-cpp-python was built, for the results",
    )
    parser.add_argument("--out", type=results_file)
    args = parser.parse_args(argv)
    if (args.body or args.llamacpp_build != LLAMACPP_BUILD or args.arch != "mixtral") and not (
        args.llamacpp
    ):
        parser.error("--body, --llamacpp-build and --arch are settings of the --llamacpp run")
    if args.converter is not None and not args.llamacpp:
        parser.error("--converter is a setting of the --llamacpp run")
    if args.speculative_only and args.llamacpp:
        parser.error("--speculative-only and --llamacpp are two runs: give one")
    if args.body and (why := kernels.cannot_run(args.body)):
        parser.error(f"--body {args.body}: {why}")
    if args.llamacpp:
        with kernels.use_path(args.body) if args.body else contextlib.nullcontext():
            result = llamacpp_section(args.quick, args.converter, args.llamacpp_build, args.arch)
        suffix = "" if args.arch == "mixtral" else f"_{args.arch}"
        args.out = args.out or LLAMACPP_RESULTS.with_name(f"decode_llamacpp{suffix}.json")
    elif args.speculative_only:
        result = {"benchmark": "decode_speculative", "machine": machine(),
                  "speculative": speculative(args.quick)}  # fmt: skip
        result["machine"]["loadavg_end"] = list(os.getloadavg())
    else:
        result = measure(args.quick)
    args.out = args.out or (SPECULATIVE_RESULTS if args.speculative_only else RESULTS)
    from moekit.fileio import atomic_write_json

    print(atomic_write_json(args.out, result))
    return result


if __name__ == "__main__":
    main()
