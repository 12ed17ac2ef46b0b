"""A decode step through the whole model in one C call (`moekit.inference.decode_step`), as
generation's steps of up to 16 sequences run it (`moekit.model.generation.step_logits`): the glued
model's forward logits bit for bit, wherever it qualifies; None, and the forward, wherever it does
not."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from tests.c_kernels import needs_c_kernels
from tests.test_decode_layers import (
    DEEPSEEK_SHARED,
    GPT_OSS,
    OLMOE,
    QWEN2_MOE,
    QWEN3_32_HEADS,
    SCHEMES,
    _count_calls,
    _model,
)
from tests.test_mtp import MLA
from torch import nn

from moekit.config import QuantizeConfig
from moekit.inference import decode_step
from moekit.inference.decode_kernels import apply_decode_kernels, remove_decode_kernels
from moekit.inference.offload import apply_expert_offload
from moekit.inference.store import write_expert_files
from moekit.inference.trace import TraceRecorder
from moekit.model.generation import KVCache, generate, step_logits
from moekit.quant.modules import quantize_model

pytestmark = needs_c_kernels


STEP = "moekit_decode_tokens"  # the decoder's C function: its calls that ran, one a step


def _block_by_block(model):
    """A copy of the glued model that decodes block by block: its decoder unset (the code
    before `decode_step`)."""
    copied = copy.deepcopy(model)
    copied.one_token_decoder = None
    return copied


def _both(model, ids: torch.Tensor, prefill: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of a prefill and then one token a step, by `step_logits` (the decoder where it
    qualifies) and by the model's forward, each on its own cache: (steps + 1, B, V) each."""
    B, S = ids.shape
    steps, forward = [], []
    with torch.no_grad():
        one, two = KVCache.for_model(model, B, S), KVCache.for_model(model, B, S)
        step = step_logits(model, one)
        for i in [prefill, *range(prefill + 1, S + 1)]:
            part = ids[:, :prefill] if i == prefill else ids[:, i - 1 : i]
            steps.append(step(part))
            out = model(part, kv_cache=two, with_aux=False, logits_to_keep=1)  # (generate's)
            forward.append(out.logits[:, -1])
        assert (
            [c.length for c in one.layers]
            == [c.length for c in two.layers]
            == [S] * len(two.layers)
        )
    return torch.stack(steps), torch.stack(forward)


CASES = {
    "float32": ({}, None),
    **{name: ({}, name) for name in SCHEMES},
    "tied_embeddings": ({"tie_embeddings": True}, None),
    "tied_int8": ({"tie_embeddings": True}, "int8"),
    "qwen3_qk_norm": (QWEN3_32_HEADS, None),
    "gpt_oss_windows_sinks": (GPT_OSS, None),
    "gpt_oss_mxfp4": (GPT_OSS, "mxfp4"),
    "olmoe_qk_norm_clip": (OLMOE, None),
    "sigmoid_scaled": ({"moe": {"score": "sigmoid", "routed_scaling": 2.5}}, None),
    "qwen2_moe_shared_gate": (QWEN2_MOE, None),
    "qwen2_moe_int4": (QWEN2_MOE, "int4"),
    "deepseek_shared_sigmoid": (DEEPSEEK_SHARED, None),
    "deepseek_latent": ({**DEEPSEEK_SHARED, "mla": MLA, "n_kv_heads": None}, None),
    "deepseek_latent_int8": ({**DEEPSEEK_SHARED, "mla": MLA, "n_kv_heads": None}, "int8"),
    "moonlight_latent_direct_q_dense": (  # big_model.py's scheme: int4 experts, int8 the rest
        {
            **DEEPSEEK_SHARED,
            "mla": MLA.replace(q_lora_rank=None),
            "n_kv_heads": None,
            "first_dense": 1,
            "d_ff": 96,
        },
        QuantizeConfig(weights="int8", experts="int4"),
    ),
    "deepseek_v3_group_limited": (  # 3 groups of 2 experts, 2 kept; latent, a dense layer
        {
            "moe": {**DEEPSEEK_SHARED["moe"], "n_groups": 3, "topk_groups": 2},
            "mla": MLA,
            "n_kv_heads": None,
            "first_dense": 1,
            "d_ff": 96,
            "n_layers": 3,
        },
        "int8",
    ),
    "first_dense": ({"first_dense": 1, "d_ff": 96}, None),
    "first_dense_int4": ({"first_dense": 1, "d_ff": 96}, "int4"),
}


@pytest.mark.parametrize("batch", [1, 3, 16])
@pytest.mark.parametrize("case", list(CASES))
def test_a_decoded_token_is_one_call_with_the_forwards_bits(monkeypatch, case, batch) -> None:
    """Float32 and every quantized scheme, tied heads, Qwen3's and OLMoE's q/k norms (OLMoE's
    clipping), GPT-OSS's windows, sinks and clamped experts, sigmoid routing, shared experts
    (Qwen2-MoE's gated, DeepSeek's two), latent attention (DeepSeek-V3's, Moonlight's without
    the low-rank query), a dense first layer, group-limited routing, at batch 1, 3 and 16: each
    step one C call, its logits the glued forward's bit for bit (the same C functions), past a
    change of the angles' chunk."""
    overrides, scheme = CASES[case]
    model = _model(30, **overrides)
    with torch.no_grad():
        for layer in model.layers:
            if getattr(layer.attn, "sinks", None) is not None:
                layer.attn.sinks.normal_(std=2.0)
    if scheme is not None:
        model = quantize_model(model, SCHEMES[scheme] if isinstance(scheme, str) else scheme)
    model = apply_decode_kernels(model)
    monkeypatch.setattr(decode_step, "ROPE_CHUNK", 3)  # a new chunk every third position
    calls = _count_calls(monkeypatch, ran_only=True)
    ids = torch.randint(0, 97, (batch, 16), generator=torch.Generator().manual_seed(31))
    steps, forward = _both(model, ids, 5)
    assert calls.get(STEP, 0) == 11
    assert torch.equal(steps, forward)


def test_generate_gives_the_per_block_paths_tokens(monkeypatch) -> None:
    """`generate` on the decoder: one call a token, the tokens of the same model decoding block
    by block (its decoder unset), greedy and sampled with one seed."""
    model = apply_decode_kernels(_model(32, tie_embeddings=True))
    prompt = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(33))
    calls = _count_calls(monkeypatch, ran_only=True)

    def both(**kw):
        fast = generate(model, prompt, 20, generator=torch.Generator().manual_seed(1), **kw)
        per_block = _block_by_block(model)
        slow = generate(per_block, prompt, 20, generator=torch.Generator().manual_seed(1), **kw)
        return fast, slow

    fast, slow = both()
    assert torch.equal(fast, slow) and calls.get(STEP, 0) == 19
    fast, slow = both(temperature=0.9, top_k=20)
    assert torch.equal(fast, slow) and calls.get(STEP, 0) == 38
    prompt = torch.randint(0, 97, (4, 6), generator=torch.Generator().manual_seed(44))
    fast, slow = both(eos_token_id=95)  # a batch's step; row 0 ends at once, and still runs
    assert (fast[0] == 95).all() and not (fast[1:] == 95).any()
    assert torch.equal(fast, slow) and calls.get(STEP, 0) == 38 + fast.shape[1] - 1


def test_generate_continuing_a_cache_decodes_as_block_by_block(monkeypatch) -> None:
    """`generate(kv_cache=...)` twice on one cache (a chat's turns): the decoder starts at the
    cache's length each time; the tokens and the cache's keys are the block-by-block path's."""
    model = apply_decode_kernels(_model(43))
    per_block = _block_by_block(model)
    calls = _count_calls(monkeypatch, ran_only=True)
    turns = [
        torch.randint(0, 97, (1, n), generator=torch.Generator().manual_seed(n)) for n in (5, 3)
    ]
    caches = [KVCache.for_model(m, 1, 32) for m in (model, per_block)]
    for turn in turns:
        got = generate(model, turn, 6, kv_cache=caches[0])
        assert torch.equal(got, generate(per_block, turn, 6, kv_cache=caches[1]))
    assert calls.get(STEP, 0) == 10
    assert caches[0].layers[0].length == caches[1].layers[0].length == 18
    for one, two in zip(caches[0].layers, caches[1].layers, strict=True):
        assert torch.equal(one.k_BKLd[:, :, :18], two.k_BKLd[:, :, :18])


def _decoder(model, batch: int = 1, length: int = 4):
    cache = KVCache.for_model(model, batch, 16)
    ids = torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(34))
    with torch.no_grad():
        model(ids, kv_cache=cache, with_aux=False)
        return decode_step.one_token_decoder(model, cache), cache


def test_models_and_caches_that_do_not_qualify_get_no_decoder(tmp_path) -> None:
    """Batch above 16, offloaded experts, training mode, a hook
    on any module the call bypasses (a shared expert's projection among them), no decode
    kernels: no decoder (every step then runs the forward); the glued model gets one, and loses
    it with its kernels."""
    glued = apply_decode_kernels(_model(35))
    assert _decoder(glued)[0] is not None
    assert _decoder(glued, batch=16)[0] is not None
    assert _decoder(glued, batch=17)[0] is None  # (the C layers' MAX_ROWS)
    wide = apply_decode_kernels(_model(35, d_model=8224, head_dim=16, moe={"d_model": 8224}))
    assert _decoder(wide)[0] is not None
    # 16 rows of 8224 numbers: the layer calls' norms run torch's reference, as the C call does not
    assert _decoder(wide, batch=16)[0] is None
    shared = apply_decode_kernels(_model(35, **QWEN2_MOE))
    assert _decoder(shared)[0] is not None
    handle = shared.layers[1].ffn.shared_experts.gate.register_forward_hook(lambda *args: None)
    assert _decoder(shared)[0] is None
    handle.remove()
    for where in ("model", "embed", "norm", "lm_head", "block", "router", "q_proj"):
        model = copy.deepcopy(glued)
        module = {"model": model, "embed": model.embed, "norm": model.norm,
                  "lm_head": model.lm_head, "block": model.layers[1],
                  "router": model.layers[0].ffn.router,
                  "q_proj": model.layers[1].attn.q_proj}[where]  # fmt: skip
        handle = module.register_forward_hook(lambda *args: None)
        assert _decoder(model)[0] is None, where
        handle.remove()
        assert _decoder(model)[0] is not None, where
    with TraceRecorder(glued):
        assert _decoder(glued)[0] is None
    glued.train()
    assert _decoder(glued)[0] is None
    glued.eval()
    write_expert_files(glued, tmp_path)
    offloaded = copy.deepcopy(glued)
    apply_expert_offload(offloaded, tmp_path, budget="4")
    assert _decoder(offloaded)[0] is None
    assert remove_decode_kernels(glued).one_token_decoder is None


def test_a_step_it_cannot_run_is_left_to_the_forward() -> None:
    """A token id out of the vocabulary or not long, gradients on, a hook added: None, the cache
    untouched, so that the forward runs (and raises its own error). A full cache: no decoder. A C
    call that fails after writing every cache at the position: None, and the forward's run of
    that token on the same cache rewrites them: its logits and the next token's are a fresh
    cache's bit for bit."""
    model = apply_decode_kernels(_model(36))
    decoder, cache = _decoder(model)
    assert decoder is not None
    assert decoder(torch.tensor([[97]])) is None and cache.layers[0].length == 4
    batched, batched_cache = _decoder(model, batch=3)
    assert batched(torch.tensor([[5], [97], [6]])) is None  # one row out of the vocabulary
    assert batched(torch.tensor([[5], [-1], [6]])) is None
    assert batched(torch.tensor([[5, 6, 7]])) is None and batched_cache.layers[0].length == 4
    assert decoder(torch.tensor([[5]], dtype=torch.int32)) is None
    with pytest.raises(IndexError):
        step_logits(model, cache)(torch.tensor([[97]]))
    with torch.enable_grad():
        assert decoder(torch.tensor([[5]])) is None
    handle = model.layers[0].ffn.experts.register_forward_pre_hook(lambda *args: None)
    assert decoder(torch.tensor([[5]])) is None
    handle.remove()
    assert [c.length for c in cache.layers] == [4, 4]
    assert _decoder(model, length=16)[0] is None  # no room left

    real = decoder.call

    def fails_after_writing(*args):
        real(*args)
        for layer in cache.layers:  # the position's keys and values, spoilt
            layer.k_BKLd[:, :, 4].fill_(float("nan"))
            layer.v_BKLd[:, :, 4].fill_(float("nan"))
        return -1

    decoder.call = fails_after_writing
    fresh = KVCache.for_model(model, 1, 16)
    ids = torch.randint(0, 97, (1, 4), generator=torch.Generator().manual_seed(34))
    with torch.no_grad():
        assert decoder(torch.tensor([[5]])) is None and cache.layers[-1].length == 4
        model(ids, kv_cache=fresh, with_aux=False)
        for token in (5, 6):
            got = model(torch.tensor([[token]]), kv_cache=cache, with_aux=False).logits
            want = model(torch.tensor([[token]]), kv_cache=fresh, with_aux=False).logits
            assert torch.equal(got, want)


def test_a_hook_added_while_generating_runs_and_the_tokens_stay() -> None:
    """A `stream` callback that hooks a router on the third token: the hook runs on every later
    token (those steps run the forward), and the tokens are the block-by-block path's."""
    model = apply_decode_kernels(_model(39))
    prompt = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(40))
    seen, streamed = [], []

    def stream(ids):
        streamed.append(ids)
        if len(streamed) == 3:
            model.layers[1].ffn.router.register_forward_hook(lambda *a: seen.append(1))

    fast = generate(model, prompt, 8, stream=stream)
    assert len(seen) == 5  # tokens 4 .. 8
    per_block = _block_by_block(model)
    assert torch.equal(fast, generate(per_block, prompt, 8))


def test_a_default_dtype_other_than_float32_changes_nothing(monkeypatch) -> None:
    """torch's default dtype float64 (or bfloat16): the decoder's buffers are float32 as the
    model, its logits the forward's bit for bit."""
    model = apply_decode_kernels(_model(41))
    calls = _count_calls(monkeypatch, ran_only=True)
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(42))
    for dtype in (torch.float64, torch.bfloat16):
        with torch.device("cpu"):
            old = torch.get_default_dtype()
            torch.set_default_dtype(dtype)
            try:
                steps, forward = _both(model, ids, 4)
            finally:
                torch.set_default_dtype(old)
        assert steps.dtype == torch.float32 and torch.equal(steps, forward)
    assert calls.get(STEP, 0) == 10


def test_the_decoder_keeps_the_weights_it_reads_alive() -> None:
    """Weights replaced while a decoder lives (not during `generate`, but a `stream` callback
    could): it reads the tensors it was made with, held until it goes, never freed memory."""
    model = apply_decode_kernels(_model(38))
    before = copy.deepcopy(model)
    decoder, _ = _decoder(model)
    old = weakref.ref(model.layers[0].ffn.experts.w_in)
    for layer in model.layers:
        layer.ffn.experts.w_in = nn.Parameter(torch.zeros_like(layer.ffn.experts.w_in))
    gc.collect()
    assert old() is not None
    with torch.no_grad():
        got = decoder(torch.tensor([[3]]))
        want = _decoder(before)[0](torch.tensor([[3]]))
    assert got is not None and torch.equal(got, want)
    del decoder
    gc.collect()
    assert old() is None
