"""Forward+backward time of moekit's MoELayer against Hugging Face's sparse MoE blocks and the dense
bound, measured side by side in one process on the same weights and the same tokens.

Contenders, per shape (T tokens, width D, E experts, top-k, expert width F):
  moekit/<impl>        MoELayer, softmax top-k with normalize=True (Mixtral routing), dropless, for
                       each expert_impl ("grouped_mm", "loop");
  hf_mixtral/<impl>    transformers' MixtralSparseMoeBlock, and
  hf_qwen3_moe/<impl>  Qwen3MoeSparseMoeBlock (norm_topk_prob=True), for every experts
                       implementation transformers registers ("eager" + ALL_EXPERTS_FUNCTIONS);
                       those that cannot run here are recorded with the reason;
  dense_swiglu         one SwiGLU FFN of width k*F over the same T tokens: the same FLOPs, the
                       practical bound for any dispatch.

Before timing, every MoE contender is run once in float32 on the same input and its output and
gradients (input, router, gate_up, down) are held to moekit/loop (max abs diff <= 1e-4, else the
script fails). The same pass records the largest activation each contender makes (saved for
backward or produced by any op, parameter-shaped gradients excluded) against T*k*max(D, F).
Timing interleaves the contenders round-robin (rotating the order every round) after a warm-up and
reports the median. Ratios, not lone times, are the result (DESIGN.md convention 12): the ratio of
medians (the headline, on which targets pass or fail) and, as checks on the noise, the median of
per-round ratios (drift between rounds cancels), the ratio of minima (the least disturbed run)
and the ratio of median process CPU times (time.process_time: with --threads 1 on a machine shared
with other work, the time this process was actually computing).

The process keeps freed memory for reuse (`moekit.cpu_memory.keep_freed_memory`, as `moekit train`
does) for every contender alike; `--malloc glibc` measures with the C library's defaults instead.

    python benchmarks/moe_layer.py            # the issue's shapes, fp32 CPU, ~4 min on 2 cores
    python benchmarks/moe_layer.py --quick    # tiny shapes, a smoke test
    python benchmarks/moe_layer.py --device cuda --dtype bfloat16 --shapes mixtral,deepseek-v3

GPU-sized layers (`--shapes`, `SHAPE_PRESETS`): "mixtral" (d_model 4096, d_expert 14336, 8 experts
top-2, softmax) and "deepseek-v3" (d_model 7168, d_expert 2048, 256 experts top-8, sigmoid scores,
4 of 8 groups, scaling 2.5, one shared expert; compared with transformers' DeepseekV3MoE), 8192
tokens each. Their float32 weights and gradients would not fit one GPU once per contender
(DeepSeek-V3's layer alone is 11.3B parameters), so for them: the parity pass runs in float32 on a
"twin" (the same routing and d_model, 1024 tokens, fewer/narrower experts), and the timed
contenders are built directly in --dtype on the device sharing one copy of the expert and router
weights (only the small shared expert and dense FFN are their own); only contenders that passed
on the twin are timed. Every shape reports TFLOP/s: the active expert products, 3 x 2*T*(k+shared)
*3*D*F per forward+backward (the router's 2*T*D*E and the dispatch are not counted), over the
median time. On CUDA every timed step is bracketed by torch.cuda.synchronize.

Prints the JSON to stdout (progress goes to stderr) and writes it to --out.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import moekit
from moekit.cli.common import results_file
from moekit.cpu_memory import keep_freed_memory
from moekit.experts import grouped_mm_available, resolve_impl
from moekit.fileio import atomic_write_json
from moekit.machine import machine_info as machine

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MOEKIT_IMPLS = ("grouped_mm", "loop")
PARITY_REFERENCE = "moekit/loop"
PARITY_ATOL = 1e-4
# The fused [gate; up] projection is T*k*2F wide: the constant in O(T*k*max(D, F)) is 2.
ACTIVATION_CONSTANT = 2.0


@dataclass(frozen=True)
class Shape:
    tokens: int
    d_model: int
    n_experts: int
    top_k: int
    d_expert: int
    # Routing beyond Mixtral's softmax top-k (the GPU presets); the defaults are the issue's shapes.
    score: str = "softmax"
    n_groups: int = 1
    topk_groups: int = 1
    routed_scaling: float = 1.0
    n_shared: int = 0
    name: str = ""

    @property
    def label(self) -> str:
        label = (
            f"T={self.tokens},D={self.d_model},E={self.n_experts},k={self.top_k},F={self.d_expert}"
        )
        if self.score != "softmax" or self.n_groups > 1 or self.n_shared:
            label += (
                f",{self.score},groups={self.topk_groups}/{self.n_groups},shared={self.n_shared}"
            )
        return f"{self.name}:{label}" if self.name else label

    @property
    def hf_families(self) -> tuple[str, ...]:
        """The transformers MoE blocks with this shape's routing."""
        if self.score == "sigmoid" or self.n_shared:
            return ("deepseek_v3",)
        return ("mixtral", "qwen3_moe")

    @property
    def active_width(self) -> int:
        """(k + shared) * F: the hidden width each token runs through, the dense FFN's."""
        return (self.top_k + self.n_shared) * self.d_expert

    @property
    def step_flops(self) -> int:
        """Forward + backward FLOPs of the active expert products: 3 x 2*T*3*D*(k+shared)*F."""
        return 3 * 2 * self.tokens * 3 * self.d_model * self.active_width

    @property
    def activation_bound(self) -> int:
        """T*k*max(D, F): the activation size a dropless MoE layer cannot avoid."""
        return self.tokens * self.top_k * max(self.d_model, self.d_expert)


FULL_SHAPES = (
    Shape(tokens=4096, d_model=512, n_experts=8, top_k=2, d_expert=1024),
    Shape(tokens=4096, d_model=512, n_experts=32, top_k=4, d_expert=256),
    Shape(tokens=4096, d_model=512, n_experts=64, top_k=8, d_expert=128),
)
QUICK_SHAPES = (
    Shape(tokens=128, d_model=32, n_experts=4, top_k=2, d_expert=32),
    Shape(tokens=128, d_model=32, n_experts=8, top_k=4, d_expert=16),
)

_DSV3_ROUTING = dict(score="sigmoid", n_groups=8, topk_groups=4, routed_scaling=2.5, n_shared=1)
# GPU-sized layers, each with the float32 twin its parity pass runs on (see the docstring).
SHAPE_PRESETS: dict[str, tuple[Shape, Shape]] = {
    "mixtral": (
        Shape(tokens=8192, d_model=4096, n_experts=8, top_k=2, d_expert=14336, name="mixtral"),
        Shape(tokens=1024, d_model=4096, n_experts=8, top_k=2, d_expert=1024, name="mixtral-twin"),
    ),
    "deepseek-v3": (
        Shape(8192, 7168, 256, 8, 2048, **_DSV3_ROUTING, name="deepseek-v3"),
        Shape(1024, 7168, 32, 8, 512, **_DSV3_ROUTING, name="deepseek-v3-twin"),
    ),
}
PARITY_TWINS = dict(SHAPE_PRESETS.values())

# The issue's targets (issue 2, "Experts and speed"), as ratios measured in the same run.
# kind "vs_dense": moekit / dense <= bound.  kind "vs_hf": fastest HF / moekit >= bound.
TARGETS = (
    {"name": "moekit <= 1.10 x dense at E=8", "E": 8, "kind": "vs_dense", "bound": 1.10},
    {"name": "moekit <= 1.35 x dense at E=64", "E": 64, "kind": "vs_dense", "bound": 1.35},
    {"name": "moekit no slower than fastest HF at E=8", "E": 8, "kind": "vs_hf", "bound": 1.0},
    {
        "name": "moekit >= 1.5 x faster than fastest HF at E=32",
        "E": 32,
        "kind": "vs_hf",
        "bound": 1.5,
    },
    {
        "name": "moekit >= 1.5 x faster than fastest HF at E=64",
        "E": 64,
        "kind": "vs_hf",
        "bound": 1.5,
    },
)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class DenseSwiGLU(nn.Module):
    """silu(x W_gate^T) * (x W_up^T) W_down^T with hidden width `width` ([gate; up] fused)."""

    def __init__(self, d_model: int, width: int) -> None:
        super().__init__()
        self.w_in = nn.Linear(d_model, 2 * width, bias=False)
        self.w_out = nn.Linear(width, d_model, bias=False)
        nn.init.normal_(self.w_in.weight, std=0.02)
        nn.init.normal_(self.w_out.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(F.silu(gate) * up)


@dataclass
class Contender:
    """One implementation under test. `weights` are its (router, gate_up, down) parameters in the
    moekit/HF layout (None for the dense FFN), used for the gradient parity check."""

    name: str
    group: str  # "moekit", "hf" or "dense"
    module: nn.Module
    call: Callable[[Tensor], Tensor]
    weights: tuple[Tensor, Tensor, Tensor] | None = None
    times_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)  # the round each sample was taken in


# --- building the contenders --------------------------------------------------------------------


def build_moekit(shape: Shape, impl: str) -> Contender:
    cfg = moekit.MoEConfig(
        d_model=shape.d_model,
        d_expert=shape.d_expert,
        n_experts=shape.n_experts,
        top_k=shape.top_k,
        score=shape.score,
        normalize=True,
        n_groups=shape.n_groups,
        topk_groups=shape.topk_groups,
        routed_scaling=shape.routed_scaling,
        n_shared_experts=shape.n_shared,
        capacity_factor=None,
        expert_impl=impl,
    )
    return moekit_contender(moekit.MoELayer(cfg), impl)


def moekit_contender(layer: nn.Module, impl: str) -> Contender:
    weights = (layer.router.weight, layer.experts.w_in, layer.experts.w_out)
    return Contender(f"moekit/{impl}", "moekit", layer, lambda x: layer(x)[0], weights)


def hf_config(family: str, shape: Shape, impl: str):
    """A transformers config with the benchmark's sizes and the given experts implementation."""
    if family == "deepseek_v3":
        from transformers import DeepseekV3Config

        cfg = DeepseekV3Config(
            hidden_size=shape.d_model,
            moe_intermediate_size=shape.d_expert,
            n_routed_experts=shape.n_experts,
            num_experts_per_tok=shape.top_k,
            n_group=shape.n_groups,
            topk_group=shape.topk_groups,
            routed_scaling_factor=shape.routed_scaling,
            n_shared_experts=shape.n_shared,
            norm_topk_prob=True,
        )
    elif family == "mixtral":
        from transformers import MixtralConfig

        cfg = MixtralConfig(
            hidden_size=shape.d_model,
            intermediate_size=shape.d_expert,
            num_local_experts=shape.n_experts,
            num_experts_per_tok=shape.top_k,
            router_jitter_noise=0.0,
        )
    else:
        from transformers import Qwen3MoeConfig

        cfg = Qwen3MoeConfig(
            hidden_size=shape.d_model,
            moe_intermediate_size=shape.d_expert,
            num_experts=shape.n_experts,
            num_experts_per_tok=shape.top_k,
            norm_topk_prob=True,  # Mixtral routing: renormalise the top-k weights
        )
    cfg._experts_implementation = impl
    return cfg


def hf_block_class(family: str) -> type[nn.Module]:
    if family == "deepseek_v3":
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE as Block
    elif family == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block
    else:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as Block
    return Block


def copy_shared_expert(block: nn.Module, source: nn.Module) -> None:
    """moekit's fused shared expert (w_in = [gate; up]) into DeepseekV3MLP's three projections."""
    if source.shared_experts is None:
        return
    gate, up = source.shared_experts.w_in.weight.chunk(2, dim=0)
    with torch.no_grad():
        block.shared_experts.gate_proj.weight.copy_(gate)
        block.shared_experts.up_proj.weight.copy_(up)
        block.shared_experts.down_proj.weight.copy_(source.shared_experts.w_out.weight)


def build_hf(family: str, shape: Shape, impl: str, source: nn.Module) -> Contender:
    """HF sparse MoE block with `source`'s (a moekit MoELayer) weights copied in."""
    block = hf_block_class(family)(hf_config(family, shape, impl))
    pairs = (
        (block.gate.weight, source.router.weight),
        (block.experts.gate_up_proj, source.experts.w_in),
        (block.experts.down_proj, source.experts.w_out),
    )
    with torch.no_grad():
        for hf_param, ours in pairs:
            if hf_param.shape != ours.shape:
                raise RuntimeError(f"HF {family} shape {hf_param.shape} != moekit {ours.shape}")
            hf_param.copy_(ours)
        if family == "deepseek_v3":
            block.gate.e_score_correction_bias.copy_(source.router.expert_bias)
    copy_shared_expert(block, source)
    weights = tuple(p for p, _ in pairs)
    return Contender(f"hf_{family}/{impl}", "hf", block, block, weights)


def share_parameters(dst: nn.Module, src: nn.Module) -> None:
    """Make dst (built on the meta device) use src's parameters and buffers, by name."""
    params, buffers = dict(src.named_parameters()), dict(src.named_buffers())
    for name in [n for n, _ in dst.named_parameters()] + [n for n, _ in dst.named_buffers()]:
        owner_name, _, leaf = name.rpartition(".")
        owner = dst.get_submodule(owner_name)
        if name in params:
            setattr(owner, leaf, params[name])
        else:
            persistent = leaf not in owner._non_persistent_buffers_set
            owner.register_buffer(leaf, buffers[name], persistent=persistent)


def materialize(module: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Give every parameter and buffer still on the meta device zeros on `device` (parameters
    in dtype, buffers in their own dtype)."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and p.is_meta:
                zeros = torch.zeros(p.shape, device=device, dtype=dtype)
                sub._parameters[name] = nn.Parameter(zeros, requires_grad=p.requires_grad)
        for name, b in list(sub._buffers.items()):
            if b is not None and b.is_meta:
                sub._buffers[name] = torch.zeros(b.shape, device=device, dtype=b.dtype)


def build_hf_shared(family: str, shape: Shape, impl: str, source: nn.Module) -> Contender:
    """HF block using `source`'s router and expert tensors themselves (no copy); its own shared
    expert (copied) and routing-bias buffer. For layers too large to hold once per contender."""
    device, dtype = source.experts.w_in.device, source.experts.w_in.dtype
    with torch.device("meta"):
        block = hf_block_class(family)(hf_config(family, shape, impl))
    pairs = (
        (block.gate, "weight", source.router.weight),
        (block.experts, "gate_up_proj", source.experts.w_in),
        (block.experts, "down_proj", source.experts.w_out),
    )
    for owner, leaf, ours in pairs:
        if getattr(owner, leaf).shape != ours.shape:
            raise RuntimeError(f"HF {family} {leaf} {getattr(owner, leaf).shape} != {ours.shape}")
        setattr(owner, leaf, ours)
    materialize(block, device, dtype)
    if family == "deepseek_v3":
        with torch.no_grad():
            block.gate.e_score_correction_bias.copy_(source.router.expert_bias)
    copy_shared_expert(block, source)
    weights = (source.router.weight, source.experts.w_in, source.experts.w_out)
    return Contender(f"hf_{family}/{impl}", "hf", block, block, weights)


def hf_experts_impls() -> list[str]:
    """Every experts implementation transformers registers for its experts classes."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return ["eager", *sorted(ALL_EXPERTS_FUNCTIONS.keys())]


def mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def batched_mm_memory_bytes(shape: Shape, dtype: torch.dtype) -> int:
    """batched_mm gathers a weight copy per assignment: (T*k, 2F, D) and (T*k, D, F), kept for
    backward, and their gradients of the same size."""
    per_row = 3 * shape.d_expert * shape.d_model
    return 2 * shape.tokens * shape.top_k * per_row * torch.finfo(dtype).bits // 8


def too_big_reason(impl: str, shape: Shape, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why an implementation is not even tried here (it would exhaust memory), or None."""
    if impl != "batched_mm":
        return None
    need = batched_mm_memory_bytes(shape, dtype)
    have = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else mem_available_bytes()
    if have is not None and need > 0.8 * have:
        return (
            f"not run: gathers a (T*k, 2F, D) + (T*k, D, F) weight copy per assignment, about "
            f"{need / 2**30:.1f} GiB with gradients, and {have / 2**30:.1f} GiB is available"
        )
    return None


def build_contenders(
    shape: Shape, device: torch.device, dtype: torch.dtype
) -> tuple[list[Contender], dict[str, str]]:
    """All contenders on `device` in float32 with shared weights; and {name: error} for those
    that could not be built or are not tried."""
    contenders = [build_moekit(shape, impl) for impl in MOEKIT_IMPLS]
    source = contenders[0].module
    for other in contenders[1:]:
        other.module.load_state_dict(source.state_dict())
    errors: dict[str, str] = {}
    for family in shape.hf_families:
        for impl in hf_experts_impls():
            name = f"hf_{family}/{impl}"
            reason = too_big_reason(impl, shape, dtype, device)
            if reason:
                errors[name] = reason
                continue
            try:
                contenders.append(build_hf(family, shape, impl, source))
            except Exception as e:  # record why, keep benchmarking the others
                errors[name] = f"{type(e).__name__}: {e}"
    dense = DenseSwiGLU(shape.d_model, shape.active_width)
    contenders.append(Contender("dense_swiglu", "dense", dense, dense))
    for c in contenders:
        c.module.to(device).train()
    return contenders, errors


def build_shared_contenders(
    shape: Shape, device: torch.device, dtype: torch.dtype, names: set[str]
) -> tuple[list[Contender], dict[str, str]]:
    """The contenders in `names` built directly in dtype on device, every MoE contender on one
    copy of the router and expert weights; and {name: error} for those not built."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in dtype: no float32 copy first
    try:
        with torch.device(device):
            first = build_moekit(shape, MOEKIT_IMPLS[0])
            source = first.module
            contenders = [first]
            for impl in MOEKIT_IMPLS[1:]:
                with torch.device("meta"):
                    layer = build_moekit(shape, impl).module
                share_parameters(layer, source)
                contenders.append(moekit_contender(layer, impl))
            errors: dict[str, str] = {}
            for family in shape.hf_families:
                for impl in hf_experts_impls():
                    name = f"hf_{family}/{impl}"
                    if name not in names:
                        continue
                    reason = too_big_reason(impl, shape, dtype, device)
                    if reason:
                        errors[name] = reason
                        continue
                    try:
                        contenders.append(build_hf_shared(family, shape, impl, source))
                    except Exception as e:
                        errors[name] = f"{type(e).__name__}: {e}"
            dense = DenseSwiGLU(shape.d_model, shape.active_width)
            contenders.append(Contender("dense_swiglu", "dense", dense, dense))
    finally:
        torch.set_default_dtype(previous)
    contenders = [c for c in contenders if c.name in names]
    for c in contenders:
        c.module.to(device, dtype).train()
    return contenders, errors


# --- one forward+backward, parity and activation size -------------------------------------------


def clear_grads(c: Contender, x: Tensor) -> None:
    x.grad = None
    for p in c.module.parameters():
        p.grad = None


def step(c: Contender, x: Tensor, r: Tensor) -> Tensor:
    """Forward, loss = sum(y * r), backward. Returns y (detached)."""
    clear_grads(c, x)
    y = c.call(x)
    (y * r).sum().backward()
    return y.detach()


class LargestOutput(TorchDispatchMode):
    """Records the largest tensor any op produces, skipping parameter-shaped ones (weight
    gradients scale with the parameters, not with the tokens)."""

    def __init__(self, skip_shapes: set[tuple[int, ...]]) -> None:
        super().__init__()
        self.skip_shapes = skip_shapes
        self.numel, self.op, self.shape = 0, "", ()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            activation = isinstance(t, Tensor) and tuple(t.shape) not in self.skip_shapes
            if activation and t.numel() > self.numel:
                self.numel, self.op, self.shape = t.numel(), str(func), tuple(t.shape)
        return out


def measured_step(c: Contender, x: Tensor, r: Tensor) -> tuple[Tensor, dict]:
    """One step under a saved-tensor hook and the op recorder: (y, activation report)."""
    params = list(c.module.parameters())
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    saved = {"numel": 0, "shape": ()}

    def pack(t: Tensor) -> Tensor:
        if t.untyped_storage().data_ptr() not in param_storages and t.numel() > saved["numel"]:
            saved.update(numel=t.numel(), shape=tuple(t.shape))
        return t

    recorder = LargestOutput({tuple(p.shape) for p in params})
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), recorder:
        y = step(c, x, r)
    report = {
        "largest_saved_numel": saved["numel"],
        "largest_saved_shape": list(saved["shape"]),
        "largest_op_output_numel": recorder.numel,
        "largest_op_output_shape": list(recorder.shape),
        "largest_op_output_op": recorder.op,
    }
    return y, report


def grads(c: Contender, x: Tensor) -> list[Tensor]:
    assert c.weights is not None and x.grad is not None
    return [x.grad.clone()] + [w.grad.clone() for w in c.weights]


def max_abs_diffs(y: Tensor, g: list[Tensor], y_ref: Tensor, g_ref: list[Tensor]) -> dict:
    names = ("grad_x", "grad_router", "grad_gate_up", "grad_down")
    diffs = {"y": (y - y_ref).abs().max().item()}
    diffs.update({n: (a - b).abs().max().item() for n, a, b in zip(names, g, g_ref, strict=True)})
    return diffs


def parity_and_activations(
    contenders: list[Contender], x: Tensor, r: Tensor, errors: dict[str, str]
) -> tuple[list[Contender], dict, dict]:
    """Run each contender once in float32 on the same input: its max abs differences to
    moekit/loop (y and gradients) and its largest activations. Contenders that raise are moved to
    `errors`. Fails loudly if any difference exceeds PARITY_ATOL."""
    ran, activations, outputs = [], {}, {}
    for c in contenders:
        try:
            y, activations[c.name] = measured_step(c, x, r)
        except Exception as e:
            errors[c.name] = f"{type(e).__name__}: {str(e)[:300]}"
            log(f"  {c.name}: error {errors[c.name]}")
            continue
        ran.append(c)
        if c.weights is not None:
            outputs[c.name] = (y, grads(c, x))
    y_ref, g_ref = outputs[PARITY_REFERENCE]
    parity = {"reference": PARITY_REFERENCE, "atol": PARITY_ATOL, "dtype": "float32", "max_abs": {}}
    parity["output_max_abs"] = y_ref.abs().max().item()
    for name, (y, g) in outputs.items():
        if name != PARITY_REFERENCE:
            parity["max_abs"][name] = max_abs_diffs(y, g, y_ref, g_ref)
    worst = max((max(d.values()) for d in parity["max_abs"].values()), default=0.0)
    parity["worst"] = worst
    parity["passed"] = worst <= PARITY_ATOL
    if not parity["passed"]:
        raise AssertionError(f"parity failed (worst {worst:.3g} > {PARITY_ATOL}): {parity}")
    return ran, parity, activations


# Shared-weight contenders at the timed shape, in dtype, against moekit/loop: norm-wise relative
# difference of the outputs. Routers that round differently (HF DeepSeek-V3 routes in float32)
# flip near-tied choices, so this is no parity test (the twin is); it catches a contender that
# does not run on the shared weights (e.g. a zero router or expert tensor gives ~1).
AGREEMENT_BOUND = 0.5


def timed_agreement(contenders: list[Contender], x: Tensor) -> dict[str, float]:
    with torch.no_grad():
        outputs = {c.name: c.call(x).float() for c in contenders if c.weights is not None}
    ref = outputs.pop(PARITY_REFERENCE)
    found = {n: round(((y - ref).norm() / ref.norm()).item(), 4) for n, y in outputs.items()}
    bad = {n: v for n, v in found.items() if not v <= AGREEMENT_BOUND}
    if bad:
        raise AssertionError(
            f"contenders disagree with {PARITY_REFERENCE} at the timed shape: {bad}"
        )
    return found


# --- timing -------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(c: Contender, x: Tensor, r: Tensor, device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one forward+backward."""
    clear_grads(c, x)  # outside the timed region
    synchronize(device)
    t0, cpu0 = time.perf_counter(), time.process_time()
    y = c.call(x)
    (y * r).sum().backward()
    synchronize(device)
    return time.perf_counter() - t0, time.process_time() - cpu0


def time_round_robin(
    contenders: list[Contender],
    x: Tensor,
    r: Tensor,
    device: torch.device,
    iters: int,
    warmup: int,
    budget_s: float,
    errors: dict[str, str],
) -> list[Contender]:
    """Warm up, then time the contenders round-robin, rotating the order every round so drift
    and ordering effects fall on all of them alike. A contender stops early once it has 3 samples
    and has used `budget_s` seconds (the far slower ones). Returns those that ran."""
    for _ in range(warmup):
        for c in list(contenders):
            try:
                timed_step(c, x, r, device)
            except Exception as e:
                errors[c.name] = f"{type(e).__name__}: {str(e)[:300]}"
                contenders.remove(c)
    for i in range(iters):
        rotated = contenders[i % len(contenders) :] + contenders[: i % len(contenders)]
        for c in rotated:
            if len(c.times_s) >= 3 and sum(c.times_s) > budget_s:
                continue
            wall, cpu = timed_step(c, x, r, device)
            c.times_s.append(wall)
            c.cpu_s.append(cpu)
            c.rounds.append(i)
    return contenders


def profile_top_ops(c: Contender, x: Tensor, r: Tensor, n: int = 12) -> list[dict]:
    """torch.profiler over one forward+backward: the top `n` ops by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if x.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    step(c, x, r)
    with profile(activities=activities) as prof:
        step(c, x, r)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [
        {
            "op": e.key,
            "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 3),
            "self_cpu_pct": round(100 * e.self_cpu_time_total / total, 1),
            "calls": e.count,
        }
        for e in events[:n]
    ]


# --- one shape ----------------------------------------------------------------------------------


def summarise(contenders: list[Contender]) -> dict[str, dict]:
    return {
        c.name: {
            "median_ms": round(1e3 * statistics.median(c.times_s), 3),
            "min_ms": round(1e3 * min(c.times_s), 3),
            "n": len(c.times_s),
            "samples_ms": [round(1e3 * t, 2) for t in c.times_s],
            "cpu_median_ms": round(1e3 * statistics.median(c.cpu_s), 3),
            "rounds": c.rounds,
        }
        for c in contenders
        if c.times_s
    }


def ratios(times: dict[str, dict], stat: str = "median_ms") -> dict:
    """moekit/dense and fastest-HF/moekit for each moekit implementation, from `stat`."""
    med = {name: t[stat] for name, t in times.items()}
    hf = {name: t for name, t in med.items() if name.startswith("hf_")}
    fastest_hf = min(hf, key=hf.__getitem__) if hf else None
    out = {"fastest_hf": fastest_hf, "fastest_hf_ms": hf.get(fastest_hf) if hf else None}
    if fastest_hf is not None:
        # The most any dispatch could gain on the fastest HF path: the dense bound's own lead.
        out["fastest_hf_over_dense"] = round(hf[fastest_hf] / med["dense_swiglu"], 3)
    for impl in MOEKIT_IMPLS:
        ours = med.get(f"moekit/{impl}")
        if ours is None:
            continue
        out[f"moekit/{impl}_over_dense"] = round(ours / med["dense_swiglu"], 3)
        if fastest_hf is not None:
            out[f"fastest_hf_over_moekit/{impl}"] = round(hf[fastest_hf] / ours, 3)
    return out


def activation_summary(shape: Shape, activations: dict) -> dict:
    bound = shape.activation_bound
    for report in activations.values():
        largest = max(report["largest_saved_numel"], report["largest_op_output_numel"])
        report["largest_over_bound"] = round(largest / bound, 3)
        report["within_bound"] = largest <= ACTIVATION_CONSTANT * bound
    return {
        "statement": (
            "no activation larger than O(T*k*max(D,F)) per layer: measured as the largest tensor "
            "saved for backward or produced by any op in forward+backward (parameter-shaped weight "
            f"gradients excluded), within {ACTIVATION_CONSTANT:g} x T*k*max(D,F) (the fused "
            "[gate; up] projection is T*k*2F)"
        ),
        "bound_T_k_maxDF": bound,
        "per_contender": activations,
        "moekit_within_bound": all(
            r["within_bound"] for n, r in activations.items() if n.startswith("moekit/")
        ),
    }


def routing_balance(c: Contender, x: Tensor) -> dict:
    with torch.no_grad():
        _, aux = c.module(x)
    counts = aux.counts.float()
    return {
        "counts_min": int(counts.min()),
        "counts_max": int(counts.max()),
        "max_vio": round(aux.max_vio.item(), 3),
    }


def paired_ratio(a: dict, b: dict) -> float | None:
    """Median over the rounds both were timed in of a's time / b's time in that round: drift
    between rounds cancels."""
    b_by_round = dict(zip(b["rounds"], b["samples_ms"], strict=True))
    pairs = [
        t / b_by_round[i]
        for i, t in zip(a["rounds"], a["samples_ms"], strict=True)
        if i in b_by_round
    ]
    return round(statistics.median(pairs), 3) if pairs else None


def paired_ratios(times: dict[str, dict]) -> dict:
    """moekit/dense and fastest-HF/moekit per round (fastest HF by median), then the median."""
    hf = [n for n in times if n.startswith("hf_")]
    fastest_hf = min(hf, key=lambda n: times[n]["median_ms"]) if hf else None
    out = {}
    for impl in MOEKIT_IMPLS:
        ours = times.get(f"moekit/{impl}")
        if ours is None:
            continue
        out[f"moekit/{impl}_over_dense"] = paired_ratio(ours, times["dense_swiglu"])
        if fastest_hf is not None:
            out[f"fastest_hf_over_moekit/{impl}"] = paired_ratio(times[fastest_hf], ours)
    return out


def run_shape(shape: Shape, args: argparse.Namespace, device: torch.device) -> dict:
    log(f"shape {shape.label}")
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    twin = PARITY_TWINS.get(shape)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    contenders, errors = build_contenders(twin or shape, device, dtype)
    x32 = torch.randn(1, (twin or shape).tokens, shape.d_model, device=device, requires_grad=True)
    r32 = torch.randn_like(x32, requires_grad=False)
    contenders, parity, activations = parity_and_activations(contenders, x32, r32, errors)
    log(f"  parity worst max abs diff {parity['worst']:.3g} (atol {PARITY_ATOL})")
    if twin is not None:
        # Parity and activations were measured on the twin; now the real shape, in dtype.
        parity["on_twin"] = twin.label
        passed = {c.name for c in contenders}
        del contenders, x32, r32
        if device.type == "cuda":
            torch.cuda.empty_cache()
        contenders, build_errors = build_shared_contenders(shape, device, dtype, passed)
        errors.update(build_errors)
        x = torch.randn(1, shape.tokens, shape.d_model, device=device, dtype=dtype)
        r = torch.randn(1, shape.tokens, shape.d_model, device=device, dtype=dtype)
        x.requires_grad_()
        parity["timed_agreement"] = timed_agreement(contenders, x.detach())
    ours = next(c for c in contenders if c.group == "moekit")
    if twin is None:
        balance = routing_balance(ours, x32)
        auto_impl = resolve_impl("auto", x32[0, :1].to(dtype), ours.module.experts.w_in.to(dtype))
        for c in contenders:
            c.module.to(dtype)
        x = x32.detach().to(dtype).requires_grad_()
        r = r32.to(dtype)
    else:
        balance = routing_balance(ours, x.detach())
        auto_impl = resolve_impl("auto", x[0, :1].detach(), ours.module.experts.w_in)
    contenders = time_round_robin(
        contenders, x, r, device, args.iters, args.warmup, args.contender_budget, errors
    )
    times = summarise(contenders)
    tflops = {
        n: round(shape.step_flops / (t["median_ms"] / 1e3) / 1e12, 3) for n, t in times.items()
    }
    for name, t in times.items():
        log(f"  {name:28s} {t['median_ms']:10.1f} ms  {tflops[name]:8.2f} TFLOP/s  (n={t['n']})")
    result = {
        "shape": asdict(shape),
        "label": shape.label,
        "step_tflop": round(shape.step_flops / 1e12, 4),
        "tflops_per_s": tflops,
        "moekit_auto_impl": auto_impl,
        "routing": balance,
        "times": times,
        "ratios": ratios(times),
        "ratios_paired": paired_ratios(times),
        "ratios_from_min": ratios(times, "min_ms"),
        "ratios_cpu_time": ratios(times, "cpu_median_ms"),
        "errors": errors,
        "parity": parity,
        "activations": activation_summary(shape, activations),
    }
    if args.profile and shape == args.shapes[-1]:
        result["moekit_profile_top_ops"] = {
            c.name: profile_top_ops(c, x, r) for c in contenders if c.group == "moekit"
        }
    if device.type == "cuda":
        result["cuda_peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    return result


# --- targets, machine, main ---------------------------------------------------------------------


# Where each target is judged: the ratio of medians (headline), then its checks on the noise.
STATS = (
    ("ratios", ""),
    ("ratios_paired", "_paired"),
    ("ratios_from_min", "_min"),
    ("ratios_cpu_time", "_cpu"),
)


def meets(value: float | None, target: dict) -> bool | None:
    if value is None:
        return None
    return value <= target["bound"] if target["kind"] == "vs_dense" else value >= target["bound"]


def evaluate_targets(shapes: list[dict], is_issue_shapes: bool) -> list[dict]:
    """Each issue target for each moekit implementation, judged on the ratio of medians
    (`passed`) and, as a check on the noise, on the paired and the min-based ratios. `auto` marks
    the implementation expert_impl="auto" picks for that shape. Only the issue's shapes are
    judged (None otherwise)."""
    by_e = {s["shape"]["n_experts"]: s for s in shapes}
    out = []
    for target in TARGETS:
        shape = by_e.get(target["E"]) if is_issue_shapes else None
        for impl in MOEKIT_IMPLS:
            key = (
                f"moekit/{impl}_over_dense"
                if target["kind"] == "vs_dense"
                else f"fastest_hf_over_moekit/{impl}"
            )
            row = {
                "target": target["name"],
                "moekit_impl": impl,
                "auto": shape is not None and shape["moekit_auto_impl"] == impl,
                "ratio": key,
                "bound": target["bound"],
            }
            for stat, suffix in STATS:
                value = shape[stat].get(key) if shape else None
                row["value" + suffix] = value
                row["passed" + suffix] = meets(value, target)
            out.append(row)
    return out


def git_state() -> dict:
    """The moekit commit measured, and whether src/ had uncommitted changes."""
    repo = Path(__file__).resolve().parent.parent

    def git(*cmd: str) -> str:
        done = subprocess.run(["git", *cmd], cwd=repo, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    return {
        "commit": git("rev-parse", "HEAD"),
        "src_dirty": bool(git("status", "--porcelain", "src")),
    }


def machine_info(device: torch.device) -> dict:
    import transformers

    info = {
        **machine(),
        "transformers": transformers.__version__,
        "moekit": getattr(moekit, "__version__", None),
        "moekit_git": git_state(),
        "mem_available_gib": round((mem_available_bytes() or 0) / 2**30, 1),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--iters", type=int, default=None, help="timed rounds (default 7, quick 2)")
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed rounds after the parity pass (1; quick 0)"
    )
    p.add_argument(
        "--contender-budget",
        type=float,
        default=6.0,
        help="seconds of timed steps after which a contender with >= 3 samples stops",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's own). On a machine shared with other work, "
        "1 thread avoids OpenMP barrier stalls that slow many-small-GEMM code far more than one "
        "big GEMM and so bias the ratios",
    )
    p.add_argument(
        "--malloc",
        default="keep",
        choices=["keep", "glibc"],
        help="keep: reuse freed memory as `moekit train` does (moekit.cpu_memory, the default); "
        "glibc: the C library's defaults (every buffer over 32 MiB is a fresh, page-faulted mmap)",
    )
    p.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test")
    p.add_argument(
        "--shapes",
        default=None,
        help="comma-separated GPU-sized layer presets instead of the issue's shapes: "
        + ", ".join(SHAPE_PRESETS)
        + " (8192 tokens each; for a GPU)",
    )
    p.add_argument("--no-profile", dest="profile", action="store_false")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=results_file, default=None)
    args = p.parse_args(argv)
    presets = [name.strip() for name in (args.shapes or "").split(",") if name.strip()]
    unknown = [name for name in presets if name not in SHAPE_PRESETS]
    if unknown or (presets and args.quick):
        p.error(
            f"--shapes {args.shapes!r}: "
            + (f"unknown {unknown}, use {list(SHAPE_PRESETS)}" if unknown else "not with --quick")
        )
    args.shapes = (
        tuple(SHAPE_PRESETS[name][0] for name in presets)
        if presets
        else QUICK_SHAPES
        if args.quick
        else FULL_SHAPES
    )
    args.iters = args.iters or (2 if args.quick else 7)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    if args.out is None:
        suffix = (
            ("_quick" if args.quick else "")
            + "".join(f"_{name}" for name in presets)
            + ("_glibc_malloc" if args.malloc == "glibc" else "")
        )
        args.out = RESULTS_DIR / f"moe_layer_{args.device}_{args.dtype}{suffix}.json"
    return args


def busy_warning(machine: dict) -> str | None:
    # The benchmark's own threads count toward the load average: only load beyond them is others'.
    busiest = max(machine["loadavg_start"][0], machine["loadavg_end"][0])
    if busiest <= machine["torch_threads"] + 0.5:
        return None
    return (
        f"other work was running (1-min load up to {busiest:.1f} on {os.cpu_count()} cores): "
        "absolute times are inflated and noisy; compare the ratios and their paired and min twins"
    )


def run(args: argparse.Namespace) -> dict:
    """Every shape, the targets and the machine, as one JSON-able dict."""
    device = torch.device(args.device)
    started = time.perf_counter()
    machine = machine_info(device)
    shapes = [run_shape(shape, args, device) for shape in args.shapes]
    machine["loadavg_end"] = list(os.getloadavg())
    if warning := busy_warning(machine):
        machine["busy_warning"] = warning
    return {
        "benchmark": "moe_layer",
        "what": "forward+backward of one MoE layer, loss = sum(y * fixed_random)",
        "device": args.device,
        "dtype": args.dtype,
        "quick": args.quick,
        "iters": args.iters,
        "warmup": args.warmup,
        "malloc": args.malloc,
        "machine": machine,
        "moekit_grouped_mm_available": grouped_mm_available(
            args.device, getattr(torch, args.dtype)
        ),
        "hf_experts_impls_tried": hf_experts_impls(),
        "shapes": shapes,
        "targets": evaluate_targets(shapes, args.shapes == FULL_SHAPES),
        "wall_s": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; print and write the JSON (to a temporary name, then renamed); return
    it. Restores torch's thread count, so it can run inside a test process."""
    args = parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.malloc == "keep":
        keep_freed_memory()  # for every contender alike; lasts for the process
    threads = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        result = run(args)
    finally:
        torch.set_num_threads(threads)
    print(atomic_write_json(args.out, result))
    return result


if __name__ == "__main__":
    main()
