"""Whole decode layers in one C call (`moekit.inference.decode_layers`): the MoE layer (routing,
its top-k gated experts, the weighted sum) and the attention block, against their references.

Two references, two standards:
  - the same model running its decode kernels product by product (the layer's own forward, which
    is what runs when the fast path does not qualify: hooks, say): bit for bit, for float32
    experts and every quantized scheme, resident and offloaded, so a layer that falls back
    changes no token;
  - the plain PyTorch model (no kernels; a quantized one dequantized, its kernels taking float x):
    logits within float32 rounding and the same greedy tokens.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from safetensors.torch import save_model
from tests.c_kernels import decode_logits, needs_c_kernels
from tests.test_mtp import MLA
from torch import nn

from moekit import ModelConfig, MoETransformer
from moekit.config import MoEConfig, QuantizeConfig
from moekit.inference import (
    decode_block,
    decode_dense,
    decode_glue,
    decode_layers,
    decode_mla,
    decode_moe,
    decode_shared,
    decode_step,
)
from moekit.inference.decode_kernels import apply_decode_kernels, remove_decode_kernels
from moekit.inference.offload import apply_expert_offload
from moekit.inference.store import write_expert_files
from moekit.inference.trace import TraceRecorder
from moekit.model.block import Block
from moekit.model.generation import KVCache
from moekit.moe import MoELayer
from moekit.quant import kernels as quant_kernels
from moekit.quant.modules import dequantize_model, quantize_model
from moekit.routing.topk import topk_route

pytestmark = needs_c_kernels

# Every scheme the quantized kernels read; int4 with and without its zero point.
SCHEMES = {
    "bf16": QuantizeConfig(weights="bf16"),
    "int8": QuantizeConfig(weights="int8"),
    "int4": QuantizeConfig(weights="int4", head="int8"),
    "int4_zp": QuantizeConfig(weights="int4", zero_point=True),
    "mxfp4": QuantizeConfig(weights="none", experts="mxfp4", attention="int8"),
}


def _cfg(**overrides) -> ModelConfig:
    d = 64  # widths multiples of 32: the 4-bit schemes' groups
    moe = MoEConfig(**{"d_model": d, "d_expert": 32, "n_experts": 6, "top_k": 2,
                       **overrides.pop("moe", {})})  # fmt: skip
    args = dict(vocab_size=97, d_model=d, n_layers=2, n_heads=4, n_kv_heads=2, moe=moe)
    args.update(max_seq_len=64, **overrides)
    return ModelConfig(**args)


def _model(seed: int = 0, scheme: str | None = None, **overrides) -> MoETransformer:
    torch.manual_seed(seed)
    model = MoETransformer(_cfg(**overrides)).eval()
    with torch.no_grad():  # larger routed weights than init's: outputs that differ if wrong
        for layer in model.moe_layers():
            layer.router.weight.normal_(std=0.3)
    return model if scheme is None else quantize_model(model, SCHEMES[scheme])


def _greedy(model: MoETransformer, prompt: torch.Tensor, n: int) -> tuple:
    """Greedy tokens (B, n) and the logits (B, n, V) that chose them."""
    cache = KVCache.for_model(model, prompt.shape[0], prompt.shape[1] + n)
    ids, logits = [], []
    with torch.no_grad():
        step = model(prompt, kv_cache=cache, with_aux=False).logits[:, -1]
        for _ in range(n):
            logits.append(step)
            ids.append(step.argmax(-1))
            step = model(ids[-1][:, None], kv_cache=cache, with_aux=False).logits[:, -1]
    return torch.stack(ids, 1), torch.stack(logits, 1)


def _count_calls(monkeypatch, ran_only: bool = False) -> dict[str, int]:
    """From now on, count the calls made through the glue's library, by C function; with
    ran_only, those that ran (a status of 0, or none: a call that fails leaves the work to the
    reference)."""
    calls: dict[str, int] = {}
    lib = decode_glue._library()

    class Counting:
        def __getattr__(self, name):
            fn = getattr(lib, name)

            def counted(*args):
                status = fn(*args)
                if not (ran_only and status):
                    calls[name] = calls.get(name, 0) + 1
                return status

            return counted

    modules = (decode_layers, decode_moe, decode_shared, decode_block, decode_step, decode_mla,
               decode_dense)  # fmt: skip
    for module in modules:
        monkeypatch.setattr(module, "_library", lambda: Counting())
    return calls


def _one_call_per_block(monkeypatch, model, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """`decode_logits(model, ids, 4)` and the C calls it made (counting on), having checked that
    every decode step ran one C call per block (batch 1) or per attention block (batch above 1)."""
    calls = _count_calls(monkeypatch)
    fast = decode_logits(model, ids, 4)
    batch, steps, layers = ids.shape[0], ids.shape[1] - 4, len(model.layers)
    assert calls.get("moekit_plan_one_token", 0) == (steps * layers if batch == 1 else 0)
    assert calls.get("moekit_attention_block", 0) == (0 if batch == 1 else steps * layers)
    return fast, calls


def _moe_calls(calls: dict[str, int]) -> int:
    """MoE layers run in C: alone (one token or a few), or in a whole block."""
    names = ("moekit_moe_one_token", "moekit_moe_tokens", "moekit_plan_one_token")
    return sum(calls.get(name, 0) for name in names)


def _per_product(model: MoETransformer, keep_layers: bool = False) -> MoETransformer:
    """`model` with its decode kernels (product by product) but none of the whole-block calls
    and (unless keep_layers) none of the whole-layer calls: the modules' own forwards (the glue's
    routing stays, as a falling-back layer keeps it)."""
    for module in model.modules():
        layer = isinstance(module, MoELayer) or type(module).__name__ == "Attention"
        if type(module) is Block or (layer and not keep_layers):
            module.__dict__.pop("forward", None)
    return model


# ---------------------------------------------------------------- routing


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize(
    ("E", "K", "groups", "kept"),
    [(8, 2, 1, 1), (16, 4, 1, 1), (5, 1, 1, 1), (16, 4, 4, 2), (32, 8, 8, 4), (8, 3, 8, 3),
     (12, 2, 4, 4)],
)  # fmt: skip
def test_route_topk_matches_topk_route(score, normalize, E, K, groups, kept) -> None:
    """The C routing against `topk_route`: the same experts, their weights to float32 rounding;
    group-limited too (DeepSeek-V3's 8 groups of 32 at a smaller scale, groups of one expert,
    every group kept)."""
    cfg = MoEConfig(
        d_model=8,
        d_expert=8,
        n_experts=E,
        top_k=K,
        score=score,
        normalize=normalize,
        routed_scaling=2.5,
        n_groups=groups,
        topk_groups=kept,
    )
    g = torch.Generator().manual_seed(E * 10 + K + groups)
    for _ in range(20):
        logits = torch.randn(1, E, generator=g) * 3
        bias = torch.randn(E, generator=g) * 0.1
        ref = topk_route(logits, bias, cfg)
        scores, ids, weights = decode_layers._buffers(E, K)
        decode_glue._library().moekit_route_topk_f32(
            logits.data_ptr(), E, bias.data_ptr(), K, score == "sigmoid", normalize, 2.5, groups,
            kept, scores, ids, weights,
        )  # fmt: skip
        assert list(ids) == ref.ids_TK[0].tolist()
        torch.testing.assert_close(torch.tensor(list(weights)), ref.weights_TK[0])


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize(("E", "groups", "kept"), [(7, 1, 1), (8, 4, 2)])
def test_router_forward_matches_the_router(score: str, rows: int, E, groups, kept) -> None:
    """The C routing of a few rows gives the reference's Routing to float32 rounding, the same
    experts, group-limited too (its selection -inf outside the kept groups, which capacity's
    next-best rerouting reads); gradients, many rows or training run the reference itself."""
    cfg = MoEConfig(d_model=16, d_expert=8, n_experts=E, top_k=3, score=score,
                    routed_scaling=1.5, n_groups=groups, topk_groups=kept)  # fmt: skip
    layer = MoELayer(cfg).eval()
    with torch.no_grad():
        layer.router.weight.normal_()
        layer.router.expert_bias.normal_(std=0.05)
        x = torch.randn(rows, 16)
        ref = layer.router(x)
        got = decode_moe.router_forward(layer.router, x)
    assert torch.equal(got.ids_TK, ref.ids_TK)
    for field in ("logits_TE", "scores_TE", "probs_TE", "weights_TK", "selection_TE", "scale_T"):
        torch.testing.assert_close(getattr(got, field), getattr(ref, field))
    many = torch.randn(decode_layers.MAX_ROWS + 1, 16)
    with torch.no_grad():
        assert torch.equal(decode_moe.router_forward(layer.router, many).weights_TK,
                           layer.router(many).weights_TK)  # fmt: skip
    routed = decode_moe.router_forward(layer.router, x)  # gradients wanted: the reference
    assert routed.weights_TK.grad_fn is not None


def test_route_buffers_are_each_threads_own() -> None:
    """The C calls' scratch is written with the GIL released: two threads decoding at once must
    not share it."""
    here = decode_layers._buffers(6, 2)
    assert decode_layers._buffers(6, 2) is here
    there = []
    thread = threading.Thread(target=lambda: there.append(decode_layers._buffers(6, 2)))
    thread.start()
    thread.join()
    assert all(a is not b for a, b in zip(there[0], here, strict=True))


# ---------------------------------------------------------------- whole models


@pytest.fixture(params=["threshold", "every region parallel"])
def parallel_regions(request):
    """The one-call layers' OpenMP regions as they run (one thread below ~0.5M weights, as these
    tiny models are), or forced onto two threads, so the parallel branch is tested too (the
    suite's one thread is restored after each test)."""
    if request.param == "threshold":
        yield
        return
    set_min = decode_glue._library().moekit_layers_set_min_parallel
    old = set_min(0)
    torch.set_num_threads(2)
    try:
        yield
    finally:
        set_min(old)


@pytest.mark.parametrize("scheme", [None, *SCHEMES])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_layers_equal_the_per_product_path_bit_for_bit(
    monkeypatch, parallel_regions, scheme, batch
) -> None:
    """Every decode step runs one C call per block (batch 1) or per attention block and MoE layer
    (batch 3 and 8: each chosen expert once, on its tokens' rows together), and the logits equal
    the same model's layer-by-layer and product-by-product decodes exactly: the same row
    functions, the same sums in the same order."""
    model = apply_decode_kernels(_model(1, scheme))
    ids = torch.randint(0, 97, (batch, 12), generator=torch.Generator().manual_seed(2))
    fast, calls = _one_call_per_block(monkeypatch, model, ids)
    steps, layers = 8, 2
    calls.clear()
    by_layer = decode_logits(_per_product(copy.deepcopy(model), keep_layers=True), ids, 4)
    prefill = batch * 4  # tokens: up to MAX_ROWS in one call, more through the reference
    grouped = steps * (batch > 1) + (1 < prefill <= decode_layers.MAX_ROWS)
    assert calls.get("moekit_moe_one_token", 0) == layers * steps * (batch == 1)
    assert calls.get("moekit_moe_tokens", 0) == layers * grouped
    assert calls.get("moekit_attention_block", 0) == steps * layers
    assert torch.equal(fast, by_layer)
    assert torch.equal(fast, decode_logits(_per_product(copy.deepcopy(model)), ids, 4))


@pytest.mark.parametrize("scheme", [None, "int4", "mxfp4"])
@pytest.mark.parametrize("batch", [4, 16])
def test_a_few_tokens_sum_their_experts_in_increasing_order(
    monkeypatch, parallel_regions, scheme, batch
) -> None:
    """Four experts a token (with two, a + b = b + a hides the order) and the most rows a call
    takes (batch 4: a prefill of 16 tokens; batch 16: every step): one C call a layer and the
    per-product path's logits bit for bit, the reference summing each token's experts in
    increasing expert order."""
    model = apply_decode_kernels(_model(30, scheme, moe={"n_experts": 12, "top_k": 4}))
    ids = torch.randint(0, 97, (batch, 8), generator=torch.Generator().manual_seed(31))
    calls = _count_calls(monkeypatch)
    fast = decode_logits(_per_product(copy.deepcopy(model), keep_layers=True), ids, 4)
    assert calls["moekit_moe_tokens"] == 2 * (4 + (batch == 4))  # 2 layers: 4 steps, a prefill
    assert torch.equal(fast, decode_logits(_per_product(copy.deepcopy(model)), ids, 4))


@pytest.mark.parametrize("scheme", [None, *SCHEMES])
def test_layers_match_the_plain_model(scheme) -> None:
    """Against plain PyTorch (a quantized model dequantized to float32, its kernels taking float
    x so that both compute the same products): float32 rounding, the same greedy tokens."""
    model = _model(3, scheme)
    plain = dequantize_model(copy.deepcopy(model)) if scheme else copy.deepcopy(model)
    prompt = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(4))
    want_ids, want_logits = _greedy(plain, prompt, 12)
    apply_decode_kernels(model)
    with quant_kernels.use_activations("float"):
        got_ids, got_logits = _greedy(model, prompt, 12)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [
        {"moe": {"n_shared_experts": 1}},
        {"moe": {"score": "sigmoid", "routed_scaling": 2.0}},
        {"moe": {"expert_bias": True}},
        {"moe": {"router_bias": True}},
        {"attn_bias": True, "n_kv_heads": 1},
        {"n_kv_heads": 4},
    ],
)
def test_layer_variants_equal_the_per_product_path(overrides: dict) -> None:
    model = apply_decode_kernels(_model(5, **overrides))
    with torch.no_grad():
        for layer in model.moe_layers():
            layer.router.expert_bias.normal_(std=0.05)
            if layer.router.bias is not None:
                layer.router.bias.normal_(std=0.1)
    ids = torch.randint(0, 97, (1, 10), generator=torch.Generator().manual_seed(6))
    plain = remove_decode_kernels(copy.deepcopy(model))
    fast = decode_logits(model, ids, 3)
    assert torch.equal(fast, decode_logits(_per_product(copy.deepcopy(model)), ids, 3))
    torch.testing.assert_close(fast, decode_logits(plain, ids, 3), rtol=1e-4, atol=1e-5)


# Qwen3-30B-A3B's head layout: 32 query heads (more per-head q norm rows than a model row count)
QWEN3_32_HEADS = {"qk_norm": "head", "n_heads": 32, "n_kv_heads": 4, "head_dim": 16}
# GPT-OSS's layers: attention with biases and sinks, a sliding window (biting after 3 positions)
# in every other layer; experts with biases and the clamped SwiGLU (its limit low enough to bite
# on these activations), a router with a bias.
# OLMoE's: q/k norms over the whole projections, then q, k and v clipped (at a bound that bites
# on these normed activations)
OLMOE = {"qk_norm": "full", "clip_qkv": 0.6}
# Qwen2-MoE's shared expert (gated by a sigmoid of its own product); DeepSeek's two ungated ones
# beside sigmoid routing
QWEN2_MOE = {"moe": {"n_shared_experts": 1, "shared_gate": True}}
DEEPSEEK_SHARED = {"moe": {"n_shared_experts": 2, "score": "sigmoid", "routed_scaling": 2.5}}
GPT_OSS = {"attn_sinks": True, "attn_bias": True, "sliding_window": 3,
           "layer_types": ("sliding", "full"),
           "moe": {"activation": "clamped_swiglu", "swiglu_limit": 0.05, "expert_bias": True,
                   "router_bias": True}}  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "scheme"),
    [
        ({"qk_norm": "head"}, None),
        (QWEN3_32_HEADS, None),
        (GPT_OSS, None),
        (GPT_OSS, "mxfp4"),
        (OLMOE, None),
        (OLMOE, "int8"),
        (QWEN2_MOE, None),
        (QWEN2_MOE, "int8"),
        (DEEPSEEK_SHARED, "int4"),
    ],
    ids=[
        "qwen3_qk_norm_head",
        "qwen3_32_heads",
        "gpt_oss",
        "gpt_oss_mxfp4",
        "olmoe",
        "olmoe_int8",
        "qwen2_moe",
        "qwen2_moe_int8",
        "deepseek_shared_int4",
    ],
)
@pytest.mark.parametrize("batch", [1, 3])
def test_qwen3_olmoe_and_gpt_oss_layers_run_in_one_call(monkeypatch, overrides, scheme, batch):
    """Qwen3's per-head q/k norms, OLMoE's whole-projection ones and clipping, GPT-OSS's sinks,
    sliding windows, biased experts and clamped SwiGLU, Qwen2-MoE's gated shared expert and
    DeepSeek's shared ones (all random, large enough to matter) run in the C layers (the whole
    block at batch 1):
    the per-product path's bits, the plain model's logits within float32 rounding."""
    model = apply_decode_kernels(_model(20, **overrides))
    with torch.no_grad():
        for layer in model.layers:
            attn, experts = layer.attn, layer.ffn.experts
            if attn.sinks is not None:
                attn.sinks.normal_(std=2.0)
            if attn.qk_norm is not None:
                attn.q_norm.weight.uniform_(0.5, 2.0)
                attn.k_norm.weight.uniform_(0.5, 2.0)
            if attn.clip_qkv is not None:  # values that the clip bites too (q and k's norm does)
                attn.v_proj.weight.normal_(std=0.2)
            for b in (experts.b_in, experts.b_out, layer.ffn.router.bias):
                if b is not None:
                    b.normal_(std=0.1)
    if scheme is not None:
        model = apply_decode_kernels(quantize_model(remove_decode_kernels(model), SCHEMES[scheme]))
    ids = torch.randint(0, 97, (batch, 10), generator=torch.Generator().manual_seed(21))
    fast, _ = _one_call_per_block(monkeypatch, model, ids)
    assert torch.equal(fast, decode_logits(_per_product(copy.deepcopy(model)), ids, 4))
    plain = remove_decode_kernels(copy.deepcopy(model))
    if scheme is not None:
        plain = dequantize_model(plain)
    with quant_kernels.use_activations("float"):  # (the plain model's products take float x)
        want = decode_logits(plain, ids, 4)
        torch.testing.assert_close(decode_logits(model, ids, 4), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("where", ["router", "experts", "q_proj", "o_proj", "global"])
def test_hooks_make_the_layer_run_its_reference_with_the_same_bits(monkeypatch, where) -> None:
    """A forward hook the C layer would bypass (it runs the router's, experts' and projections'
    products itself) sends the step through the reference, which calls the module, and the
    logits stay bit-identical (the reference routes in C too). Removed, the fast path runs."""
    model = apply_decode_kernels(_model(8))
    ids = torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(9))
    ref = decode_logits(model, ids, 4)
    calls, seen = _count_calls(monkeypatch), []
    module = {
        "router": model.moe_layers()[0].router,
        "experts": model.moe_layers()[0].experts,
        "q_proj": model.layers[0].attn.q_proj,
        "o_proj": model.layers[0].attn.o_proj,
    }.get(where)
    if module is None:
        handle = nn.modules.module.register_module_forward_pre_hook(lambda m, a: seen.append(m))
    elif where == "experts":  # the reference runs forward_selected, no hook: only the fallback
        handle = module.register_forward_pre_hook(lambda m, a: seen.append(m))
    else:
        handle = module.register_forward_hook(lambda m, a, out: seen.append(m))
    try:
        assert torch.equal(decode_logits(model, ids, 4), ref)
    finally:
        handle.remove()
    layer_calls = {"router": 5, "q_proj": 5, "o_proj": 5, "experts": 0}  # prefill + 4 steps
    if where == "global":
        assert len(seen) > 100 and not _moe_calls(calls)
    else:
        assert len(seen) == layer_calls[where]
    if where in ("router", "experts", "q_proj", "o_proj"):
        assert calls["moekit_plan_one_token"] == 4  # layer 1's steps only
    if where in ("q_proj", "o_proj"):  # layer 0's MoE layer still runs in C, alone: its 4
        # steps, and the 4 prompt tokens of both MoE layers (one call of a few tokens each)
        assert calls["moekit_moe_one_token"] == 4
        assert calls["moekit_moe_tokens"] == 2
    if where in ("router", "experts"):  # and its attention block
        assert calls["moekit_attention_block"] == 4
    blocks_before, layers_before = (calls.get(f"moekit_{name}", 0)
                                    for name in ("plan_one_token", "moe_tokens"))  # fmt: skip
    decode_logits(model, ids, 4)
    assert calls["moekit_plan_one_token"] == blocks_before + 8  # both layers' 4 steps
    assert calls["moekit_moe_tokens"] == layers_before + 2  # both layers' 4 prompt tokens


@pytest.mark.parametrize(
    ("scheme", "moe", "latent"),
    [(None, {}, False), ("int4", {}, False), ("mxfp4", {}, False), (None, GPT_OSS["moe"], False),
     ("mxfp4", GPT_OSS["moe"], False), (None, QWEN2_MOE["moe"], False),
     ("int4", DEEPSEEK_SHARED["moe"], False), ("int8", DEEPSEEK_SHARED["moe"], True),
     ("int8", {**DEEPSEEK_SHARED["moe"], "n_groups": 3, "topk_groups": 2}, True)],
    ids=["float32", "int4", "mxfp4", "gpt_oss_moe", "gpt_oss_moe_mxfp4", "qwen2_moe_shared",
         "deepseek_shared_int4", "deepseek_latent_int8", "deepseek_group_limited"],
)  # fmt: skip
def test_offloaded_experts_are_bit_identical_to_resident_ones(
    monkeypatch, tmp_path, scheme, moe, latent
):
    """Offloaded experts (the block's attention half in one C call, grouped-query or latent, the
    chosen experts fetched, then one C call over them; GPT-OSS's biased, clamped ones too; shared
    experts added by their own call) give the resident glued model's logits exactly, at the
    least budget and with prefetch; and so does the resident model recorded by a TraceRecorder
    (hooks: its layers fall back), which the offload benchmark checks against."""
    attention = {"mla": MLA, "n_kv_heads": None} if latent else {}
    model = _model(10, None, moe=dict(moe), **attention)
    with torch.no_grad():
        for layer in model.moe_layers():
            for b in (layer.experts.b_in, layer.experts.b_out, layer.router.bias):
                if b is not None:
                    b.normal_(std=0.1)
    if scheme is not None:
        model = quantize_model(model, SCHEMES[scheme])
    model = apply_decode_kernels(model)
    prompt = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(11))
    want = _greedy(model, prompt, 10)
    with TraceRecorder(model):
        traced = _greedy(model, prompt, 10)
    assert torch.equal(traced[0], want[0]) and torch.equal(traced[1], want[1])
    expert_dir = write_expert_files(model, tmp_path / "experts")
    calls = _count_calls(monkeypatch)
    for budget, prefetch in ((2, False), (3, True)):
        offloaded = copy.deepcopy(model)
        handle = apply_expert_offload(offloaded, expert_dir, budget=budget, prefetch=prefetch)
        try:
            got = _greedy(offloaded, prompt, 10)
        finally:
            handle.close()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (budget, prefetch)
    assert calls["moekit_experts_one_token"] == 2 * 10 * 2  # runs x steps x layers
    # each step's attention half in one C call too, prefetch's hook on the MoE layer or not
    assert calls["moekit_plan_attention_one_token"] == 2 * 10 * 2
    assert decode_block.blocks_in_one_call(offloaded) == len(offloaded.layers)


def test_a_glued_model_saves_and_copies(tmp_path) -> None:
    """Nothing is fused or re-pointed: safetensors saves the glued model; a deepcopy runs its own
    (changed) weights, and replaced parameter data is read, not a stale pointer."""
    model = apply_decode_kernels(_model(12, attn_bias=True))
    save_model(model, str(tmp_path / "model.safetensors"))
    ids = torch.randint(0, 97, (1, 10), generator=torch.Generator().manual_seed(13))
    decode_logits(model, ids, 4)  # the refs are built
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for layer in clone.layers:
            layer.attn.q_proj.weight.mul_(-2.0)
            layer.ffn.experts.w_in.mul_(0.5)
    expected = decode_logits(remove_decode_kernels(copy.deepcopy(clone)), ids, 4)
    torch.testing.assert_close(decode_logits(clone, ids, 4), expected, rtol=1e-4, atol=1e-5)
    for layer in model.layers:
        k = layer.attn.k_proj
        k.weight.data = torch.randn_like(k.weight) * 0.2
        k.bias.data = torch.randn_like(k.bias)
        layer.ffn.experts.w_out.data = layer.ffn.experts.w_out.data * 3
    expected = decode_logits(remove_decode_kernels(copy.deepcopy(model)), ids, 4)
    torch.testing.assert_close(decode_logits(model, ids, 4), expected, rtol=1e-4, atol=1e-5)


def test_layers_that_do_not_qualify_run_their_reference(monkeypatch) -> None:
    """Aux wanted, training, gradients, a glue without the decode kernels' products, other
    experts: `MoELayer.forward` and `Attention.forward`, and no C layer call."""
    from moekit.inference.decode_glue import apply_decode_glue

    model = apply_decode_glue(_model(14))  # the glue alone: plain products, which C would not
    ids = torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(15))
    calls = _count_calls(monkeypatch)
    decode_logits(model, ids, 4)
    assert set(calls) == {"moekit_route_topk_f32"}  # the routers' C routing, nothing more
    glued = apply_decode_kernels(_model(14))
    layer = glued.moe_layers()[0]
    x = torch.randn(1, 1, 64)
    with torch.no_grad():
        ref, _ = MoELayer.forward(layer, x, with_aux=False, decoding=True)
        y_aux, aux = decode_moe.moe_forward(layer, x, with_aux=True, decoding=True)
        assert aux is not None and torch.equal(y_aux, ref)
        assert not calls.get("moekit_moe_one_token")
        y, aux = decode_moe.moe_forward(layer, x, with_aux=False, decoding=True)
        assert aux is None and torch.equal(y, ref) and calls["moekit_moe_one_token"] == 1
    y = decode_moe.moe_forward(layer.train(), x, with_aux=False, decoding=True)[0]
    assert y.grad_fn is not None and calls["moekit_moe_one_token"] == 1


def test_a_replaced_module_or_setting_is_followed() -> None:
    """The C block's plan is kept only while its modules, their tensors and the settings it
    read stay: a swapped projection, a router's product or training mode are followed."""
    from moekit.inference.decode_kernels import KernelLinear

    model = apply_decode_kernels(_model(16))
    ids = torch.randint(0, 97, (1, 10), generator=torch.Generator().manual_seed(17))
    decode_logits(model, ids, 4)  # the plans are built
    for layer in model.layers:
        q = nn.Linear(64, 64, bias=False)
        layer.attn.q_proj = KernelLinear.sharing(q)
    expected = decode_logits(remove_decode_kernels(copy.deepcopy(model)), ids, 4)
    torch.testing.assert_close(decode_logits(model, ids, 4), expected, rtol=1e-4, atol=1e-5)
    model.layers[0].ffn.router.linear = torch.nn.functional.linear  # not the kernels' product
    assert torch.equal(
        decode_logits(model, ids, 4), decode_logits(_per_product(copy.deepcopy(model)), ids, 4)
    )


def test_a_changed_norm_is_followed() -> None:
    """The C attention's kept weights follow a per-head norm's eps changed, or the norm replaced
    by one sharing its weight: the per-product path's bits after each change."""
    model = apply_decode_kernels(_model(22, qk_norm="head"))
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(23))
    decode_logits(model, ids, 4)  # the plans are built
    for change in ("eps", "module"):
        for layer in model.layers:
            if change == "eps":
                layer.attn.q_norm.eps = 0.5
            else:
                layer.attn.k_norm = decode_glue.GlueRMSNorm.sharing(layer.attn.k_norm)
                layer.attn.k_norm.eps = 0.25
        want = decode_logits(_per_product(copy.deepcopy(model)), ids, 4)
        assert torch.equal(decode_logits(model, ids, 4), want), change


@pytest.mark.parametrize("scheme", ["int4", "mxfp4", "int8"])
@pytest.mark.parametrize("activations", ["float", "int8"])
def test_layers_follow_the_kernels_body_and_activation_path(scheme, activations) -> None:
    """The C layers run the quantized kernels' rows as chosen at the time (the portable body, the
    float- or int8-activation path): still the per-product path's bits."""
    model = apply_decode_kernels(_model(18, scheme))
    ids = torch.randint(0, 97, (1, 10), generator=torch.Generator().manual_seed(19))
    with quant_kernels.use_path("portable"), quant_kernels.use_activations(activations):
        fast = decode_logits(model, ids, 4)
        assert torch.equal(fast, decode_logits(_per_product(copy.deepcopy(model)), ids, 4))


def test_chosen_experts_are_the_routers_choices() -> None:
    """An offload's prefetch guess (`chosen_experts`: the C routing without the rest of a
    `Routing`) picks the experts the router's own forward picks (its class's: the glued router
    runs `_route_rows`, as the guess does), for one row and a few, and through that forward where
    the C routing does not run (gradients wanted)."""
    model = apply_decode_kernels(_model(14))
    router = model.moe_layers()[0].router
    x = torch.randn(5, router.cfg.d_model, generator=torch.Generator().manual_seed(15))
    for rows in (x[:1], x):
        with torch.no_grad():
            want = type(router).forward(router, rows).ids_TK.unique().tolist()
            assert router(rows).ids_TK.unique().tolist() == want  # the glued router's too
            assert decode_moe.chosen_experts(router, rows) == want
        assert decode_moe.chosen_experts(router, rows.requires_grad_()) == want
        assert len(want) >= router.cfg.top_k


def test_offloaded_hash_routed_experts_decode_as_resident_ones(tmp_path) -> None:
    """A hash router routes by token id, which only the block's reference passes on: its blocks
    keep the layer-by-layer path when offloaded (the attention half's path called the MoE layer
    without the ids and raised)."""
    model = apply_decode_kernels(_model(16, moe={"router": "hash", "top_k": 1}))
    prompt = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(17))
    want = _greedy(model, prompt, 6)
    offloaded = copy.deepcopy(model)
    handle = apply_expert_offload(offloaded, write_expert_files(model, tmp_path / "e"), budget=2)
    try:
        got = _greedy(offloaded, prompt, 6)
    finally:
        handle.close()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert decode_block.blocks_in_one_call(offloaded) == 0


@pytest.mark.parametrize("part", ["attn", "ffn"])
@pytest.mark.parametrize("overrides", [{}, {"mla": MLA, "n_kv_heads": None}], ids=["gqa", "mla"])
def test_a_block_whose_attention_or_moe_forward_is_replaced_runs_it(
    monkeypatch, part, overrides
) -> None:
    """The attention's or the MoE layer's forward put back to the class's (the reference: a
    benchmark's contender) or replaced: the block's one call would bypass it, so the block runs
    `Block.forward`, which calls it; the forward restored, the one call again."""
    model = apply_decode_kernels(_model(40, **overrides))
    module = getattr(model.layers[1], part)
    glued = module.__dict__.pop("forward")  # the class's forward again
    calls = _count_calls(monkeypatch, ran_only=True)
    ids = torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(41))
    decode_logits(model, ids, 4)
    assert calls["moekit_plan_one_token"] == 4  # layer 0's steps only
    seen = []
    module.forward = lambda *args, **kwargs: seen.append(1) or glued(*args, **kwargs)
    decode_logits(model, ids, 4)
    assert calls["moekit_plan_one_token"] == 8 and len(seen) == 5  # the prefill and 4 steps
    module.forward = glued
    decode_logits(model, ids, 4)
    assert calls["moekit_plan_one_token"] == 16
