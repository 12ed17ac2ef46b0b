"""Latent attention's decode steps in the latent space (`moekit.inference.decode_mla`): the
reference's (`LatentAttention.forward`, which expands the cached latents) logits to float32
rounding at every step, one position in one C call (decode_latent.h; kv_b_proj float32 or of any
quantized scheme: alone, inside its block's call or inside the whole step's, the same bits) or a
few in torch, with or without the low-rank query, a quantized kv_b_proj dequantized each step
there; exactly the reference wherever neither applies."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.c_kernels import decode_logits, needs_c_kernels, own_forward_calls
from tests.test_decode_layers import _count_calls, _model
from tests.test_decode_step import _both

from moekit.config import MLAConfig, QuantizeConfig
from moekit.inference import decode_block, decode_mla
from moekit.inference.decode_kernels import apply_decode_kernels
from moekit.model.attention import attention_mask
from moekit.model.generation import KVCache
from moekit.model.mla import LatentAttention
from moekit.quant import kernels as quant_kernels
from moekit.quant.modules import QuantizedLinear, dequantize_model, quantize_model

pytestmark = needs_c_kernels

# DeepSeek-V3's layout at a small width: a low-rank query, interleaved rotary dimensions
MLA = MLAConfig(q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                v_head_dim=16)  # fmt: skip
DIRECT_Q = MLA.replace(q_lora_rank=None, rope_interleave=False)


@pytest.fixture
def c_steps(monkeypatch) -> list[int]:
    """The batch of every step the C call ran (`decode_mla._c_step`)."""
    ran = []
    real = decode_mla._c_step

    def counted(attn, x, *args):
        out = real(attn, x, *args)
        if out is not None:
            ran.append(x.shape[0])
        return out

    monkeypatch.setattr(decode_mla, "_c_step", counted)
    return ran


@pytest.fixture
def layer_by_layer(monkeypatch):
    """From now on, models decode layer by layer: no whole-step or whole-block call (each latent
    attention's own call, `latent_attention_forward`); returns a function that unsets a model's
    whole-step decoder."""
    monkeypatch.setattr(decode_block, "_unhooked_plan", lambda *args: None)

    def unset(model):
        model.one_token_decoder = None
        return model

    return unset


def _mla_model(mla: MLAConfig = MLA, seed: int = 3, **overrides):
    model = _model(seed, mla=mla, n_kv_heads=None, **overrides)
    with torch.no_grad():  # keys that matter: scores far from uniform
        for layer in model.layers:
            layer.attn.kv_b_proj.weight.normal_(std=0.3)
    return model


@pytest.mark.parametrize("mla", [MLA, DIRECT_Q], ids=["q_lora", "direct_q"])
@pytest.mark.parametrize("batch", [1, 3])
def test_latent_decode_steps_give_the_references_logits(monkeypatch, mla, batch) -> None:
    """A prefill (the reference's), then 12 steps in the latent space (batch 1: each block one C
    call; 3: each latent attention): the plain model's logits to float32 rounding at every
    position; the greedy tokens the same."""
    plain = _mla_model(mla)
    glued = apply_decode_kernels(copy.deepcopy(plain))
    calls = _count_calls(monkeypatch, ran_only=True)
    ids = torch.randint(0, 97, (batch, 16), generator=torch.Generator().manual_seed(5))
    want, got = decode_logits(plain, ids, 4), decode_logits(glued, ids, 4)
    name = "moekit_plan_one_token" if batch == 1 else "moekit_latent_attention_block"
    assert calls[name] == 12 * 2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("batch", [1, 3])
def test_layer_block_and_step_calls_give_the_same_bits(monkeypatch, batch) -> None:
    """The whole step's call, the block's (batch 1) and the latent attention's own (with the MoE
    layer's): the same C functions on the same inputs, the same logits bit for bit."""
    model = apply_decode_kernels(_mla_model(seed=13))
    ids = torch.randint(0, 97, (batch, 12), generator=torch.Generator().manual_seed(14))
    calls = _count_calls(monkeypatch, ran_only=True)
    steps, forward = _both(model, ids, 4)  # the forward: by block at batch 1, else by layer
    assert calls["moekit_decode_tokens"] == 8
    assert calls.get("moekit_plan_one_token", 0) == (8 * 2 if batch == 1 else 0)
    assert calls.get("moekit_latent_attention_block", 0) == (0 if batch == 1 else 8 * 2)
    assert torch.equal(steps, forward)
    monkeypatch.setattr(decode_block, "_unhooked_plan", lambda *args: None)
    assert torch.equal(_both(model, ids, 4)[1], forward)  # layer by layer


@pytest.mark.parametrize("mla", [MLA, DIRECT_Q], ids=["q_lora", "direct_q"])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("batch", [1, 3])
def test_the_c_step_gives_the_torch_steps_logits(
    monkeypatch, layer_by_layer, c_steps, mla, window, batch
) -> None:
    """The C call against this module's torch path (the same algebra, torch's products and sums)
    over 12 steps of 1 or 3 sequences, under full attention and a sliding window: float32
    rounding."""
    glued = layer_by_layer(apply_decode_kernels(_mla_model(mla, seed=4, sliding_window=window)))
    ids = torch.randint(0, 97, (batch, 16), generator=torch.Generator().manual_seed(9))
    got = decode_logits(glued, ids, 4)
    assert len(c_steps) == 12 * 2
    monkeypatch.setattr(decode_mla, "_c_step", lambda *args: None)
    torch.testing.assert_close(got, decode_logits(glued, ids, 4), rtol=1e-5, atol=1e-6)


def _chunked_logits(model, ids: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """The logits of `ids` run through one cache in chunks of these lengths."""
    cache = KVCache.for_model(model, ids.shape[0], ids.shape[1])
    out, at = [], 0
    with torch.no_grad():
        for n in chunks:
            out.append(model(ids[:, at : at + n], kv_cache=cache, with_aux=False).logits)
            at += n
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("window", [None, 4])
def test_a_few_positions_at_once_are_masked_as_the_reference(window) -> None:
    """Three new positions a step over a cache (a speculative verification's: causal among
    them), under full attention and a sliding window of 4: the reference's logits to float32
    rounding."""
    plain = _mla_model(MLA, seed=8, sliding_window=window)
    glued = apply_decode_kernels(copy.deepcopy(plain))
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(6))
    want, got = (_chunked_logits(m, ids, [6, 3, 3]) for m in (plain, glued))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scheme", ["int8", "bf16"])
def test_an_int8_or_bf16_kv_b_proj_steps_in_c(layer_by_layer, c_steps, scheme) -> None:
    """int8 or bf16 attention (kv_b_proj among it): every step one C call, which reads kv_b_proj's
    rows as `dequantize` gives them; the dequantized model's logits to float32 rounding."""
    model = quantize_model(_mla_model(), QuantizeConfig(weights="none", attention=scheme))
    plain = dequantize_model(copy.deepcopy(model))
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(7))
    model = layer_by_layer(apply_decode_kernels(model))
    got = decode_logits(model, ids, 4)
    assert len(c_steps) == 8 * 2
    torch.testing.assert_close(got, decode_logits(plain, ids, 4), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scheme", ["int4", "int4_zp", "mxfp4"])
def test_a_grouped_4_bit_kv_b_proj_steps_in_c(monkeypatch, layer_by_layer, c_steps, scheme) -> None:
    """int4 (with zero points or not) and MXFP4 attention: every step one C call, which reads
    kv_b_proj's rows as `dequantize` gives them. With the kernels taking x as float32, this
    module's torch path (kv_b_proj dequantized each step) to float32 rounding; with their default
    (x as int8 per block of 32, as every other product of these weights takes it), within what
    quantizing o_lat moves."""
    config = QuantizeConfig(weights="none", attention=scheme.removesuffix("_zp"),
                            zero_point=scheme.endswith("_zp"))  # fmt: skip
    model = layer_by_layer(apply_decode_kernels(quantize_model(_mla_model(), config)))
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(7))
    with quant_kernels.use_activations("float"):
        got = decode_logits(model, ids, 4)
    default = decode_logits(model, ids, 4)
    assert len(c_steps) == 2 * 8 * 2
    monkeypatch.setattr(decode_mla, "_c_step", lambda *args: None)
    monkeypatch.setattr(decode_mla, "QUANTIZED_MIN_POSITIONS", 0)
    with quant_kernels.use_activations("float"):
        want = decode_logits(model, ids, 4)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(default[:, 4:], want[:, 4:], rtol=0.05, atol=0.02 * want.abs().max())


def test_a_few_positions_dequantize_a_quantized_kv_b_proj_for_the_step(
    monkeypatch, c_steps
) -> None:
    """int8 attention, steps of 3 positions (a speculative verification's: the torch path): from
    QUANTIZED_MIN_POSITIONS cached positions on, each step dequantizes kv_b_proj's weight; below,
    the reference runs (dequantizing cost more); the dequantized model's logits to float32
    rounding either way."""
    model = quantize_model(_mla_model(), QuantizeConfig(weights="none", attention="int8"))
    plain = dequantize_model(copy.deepcopy(model))
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(7))
    model = apply_decode_kernels(model)
    assert type(model.layers[0].attn.kv_b_proj) is QuantizedLinear
    dequantized = []
    weight_q = type(model.layers[0].attn.kv_b_proj.weight_q)
    real = weight_q.dequantize
    monkeypatch.setattr(weight_q, "dequantize", lambda *a: dequantized.append(1) or real(*a))
    chunks = [3, 3, 3, 3]
    want = _chunked_logits(plain, ids, chunks)
    torch.testing.assert_close(_chunked_logits(model, ids, chunks), want, rtol=1e-4, atol=1e-4)
    assert not dequantized  # 12 positions: below the threshold
    monkeypatch.setattr(decode_mla, "QUANTIZED_MIN_POSITIONS", 6)
    torch.testing.assert_close(_chunked_logits(model, ids, chunks), want, rtol=1e-4, atol=1e-4)
    assert len(dequantized) == 3 * 2  # the steps over 6, 9 and 12 positions, 2 layers
    assert not c_steps  # steps of 3 positions: the torch path throughout


def test_a_bfloat16_model_steps_to_bfloat16_rounding() -> None:
    """A bfloat16 model: its latent steps round as bfloat16 does, the reference's logits within
    what bfloat16 allows (the two differ from float32 by as much)."""
    plain = _mla_model().to(torch.bfloat16)
    glued = apply_decode_kernels(copy.deepcopy(plain))
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(11))
    want, got = decode_logits(plain, ids, 4).float(), decode_logits(glued, ids, 4).float()
    assert (got - want).abs().max() <= 0.02 * want.abs().max()


@pytest.mark.parametrize("hooked", ["kv_b_proj", "kv_a_norm", "q_a_proj"])
def test_a_hooked_projection_or_norm_runs_as_a_module(layer_by_layer, c_steps, hooked) -> None:
    """A hook on kv_b_proj: the latent path would never call it; the reference runs and the hook
    sees every call. On another of the attention's modules: the torch path, which
    calls it. No C call bypasses the hook."""
    model = layer_by_layer(apply_decode_kernels(_mla_model()))
    seen = []
    getattr(model.layers[1].attn, hooked).register_forward_hook(lambda *args: seen.append(1))
    ids = torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(12))
    decode_logits(model, ids, 4)
    assert len(seen) == 5  # the prefill and 4 steps
    assert len(c_steps) == 4  # the unhooked layer's


def test_what_does_not_apply_runs_the_reference(monkeypatch) -> None:
    """No cache, a prefill of more than 16 positions, gradients wanted, a kv_b_proj of another
    dtype than x, one with a bias or of a subclass: the reference, no step in the latent space."""
    model = _mla_model()
    attn = model.layers[0].attn
    calls = []
    monkeypatch.setattr(
        LatentAttention, "forward", lambda *args: calls.append(args[1].shape) or args[1]
    )
    x = torch.randn(1, 17, 64)
    rope, cache = model._rope(0, 17, x.device), KVCache.for_model(model, 1, 18).layers[0]
    step = decode_mla.latent_attention_forward
    with torch.no_grad():
        step(attn, x, rope, attention_mask(0, 17, None))  # no cache
        step(attn, x, rope, attention_mask(0, 17, None), cache)  # 17 positions
        with torch.autocast("cpu", enabled=False):
            step(attn, x[:, :1].double(), rope, attention_mask(0, 1, None), cache)  # float64 x
    step(attn, x[:, :1], rope, attention_mask(0, 1, None), cache)  # gradients
    assert len(calls) == 4
    attn.kv_b_proj.bias = torch.nn.Parameter(torch.zeros(attn.kv_b_proj.out_features))
    with torch.no_grad():
        step(attn, x[:, :1], rope, attention_mask(0, 1, None), cache)  # a bias
        attn.kv_b_proj.bias = None
        attn.kv_b_proj.__class__ = type("Sub", (torch.nn.Linear,), {})
        step(attn, x[:, :1], rope, attention_mask(0, 1, None), cache)  # a subclass
    assert len(calls) == 6


@pytest.mark.parametrize(
    ("replaced", "latent"),
    [("attn.kv_b_proj", True), ("attn.q_a_proj", True), ("attn.kv_a_norm", True),
     ("attn.o_proj", True), ("attn_norm", True), ("ffn_norm", True), ("attn_norm", False),
     ("ffn_norm", False)],
)  # fmt: skip
def test_a_module_with_a_forward_of_its_own_is_called(replaced, latent) -> None:
    """A forward of its own put in a projection's or norm's place (a wrapper, an adapter): no C
    call bypasses it, in the latent attention's call or its block's (the block's norms in a
    grouped-query model's too); it runs at the prefill and every step."""
    model = apply_decode_kernels(_mla_model() if latent else _model(3))
    module = model.layers[1].get_submodule(replaced)
    assert own_forward_calls(model, module, seed=15) == 5  # the prefill and 4 steps


def test_changing_the_attention_in_place_is_seen_by_the_next_step() -> None:
    """Its latent settings changed in place after a first decode (rope_interleave flipped, as a
    corrected config would): the C calls read the new ones, the plain model's logits to float32
    rounding, not the old settings'."""
    plain = _mla_model(seed=16)
    glued = apply_decode_kernels(copy.deepcopy(plain))
    ids = torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(17))
    decode_logits(glued, ids, 4)
    for model in (plain, glued):
        for layer in model.layers:
            layer.attn.m = layer.attn.m.replace(rope_interleave=not layer.attn.m.rope_interleave)
    want = decode_logits(plain, ids, 4)
    torch.testing.assert_close(decode_logits(glued, ids, 4), want, rtol=1e-4, atol=1e-5)
