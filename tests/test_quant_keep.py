"""GPT-OSS's MXFP4 experts kept as shipped: `load_hf(keep_quantized=True)` (and `moekit.load`'s
default) holds the checkpoint's bytes in `QuantizedExperts`, never decoded to float, and computes
the logits of the dequantized load; `moekit quantize GPT_OSS_DIR --experts=mxfp4` writes those
bytes, `--experts=int4` requantizes them one expert at a time. A tiny synthetic checkpoint (the
builder of tests/test_quant_formats.py) with a byte tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from tests.interop_cases import randomize, tokens
from tests.test_quant_formats import (
    MXFP4_CONFIG,
    gpt_oss_config,
    random_mxfp4,
    saved,
    write_checkpoint,
)

from moekit import load
from moekit.cli import main
from moekit.config import QuantizeConfig
from moekit.data import byte_tokenizer
from moekit.experts import Experts
from moekit.interop import load_hf, save_hf
from moekit.interop import quantized as interop_quantized
from moekit.quant import kernels
from moekit.quant import modules as quant_modules
from moekit.quant.modules import QuantizedExperts, QuantizedLinear, quantize_model
from moekit.quant.schemes import QuantizedWeight

VOCAB = 260  # the byte tokenizer's 257 tokens fit


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory) -> tuple[Path, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(an MXFP4 GPT-OSS checkpoint directory with tokenizer.json, {dense key: (blocks,
    scales)} as shipped)."""
    root = tmp_path_factory.mktemp("gpt_oss_keep")
    config = gpt_oss_config()
    config.vocab_size = VOCAB
    model = randomize(transformers.GptOssForCausalLM(config).float())
    tensors, config_json = saved(model, root / "src")
    quantized, shipped = dict(tensors), {}
    for seed, key in enumerate(k for k in tensors if k.endswith(("gate_up_proj", "down_proj"))):
        e, cols, rows = tensors[key].shape  # stored transposed: (E, D, 2F) or (E, F, D)
        pair = random_mxfp4((e, rows), cols, seed, scale_bytes=[119, 120, 121, 122, 123])
        del quantized[key]
        quantized |= {key + "_blocks": pair[0], key + "_scales": pair[1]}
        shipped[key] = pair
    folder = write_checkpoint(
        root / "mxfp4", quantized, config_json | {"quantization_config": MXFP4_CONFIG}
    )
    byte_tokenizer().save(str(folder / "tokenizer.json"))
    return folder, shipped


def expected_bytes(shipped: dict, layer: int) -> dict[str, torch.Tensor]:
    """moekit's expert storage of `layer` as shipped: gate_up_proj's rows (gate, up, gate, ...)
    taken as [gate rows; up rows], each row's blocks one run of bytes; down_proj as it is."""
    blocks, scales = shipped[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
    down_blocks, down_scales = shipped[f"model.layers.{layer}.mlp.experts.down_proj"]
    return {
        "w_in_data": torch.cat([blocks[:, 0::2], blocks[:, 1::2]], dim=1).flatten(-2),
        "w_in_scales": torch.cat([scales[:, 0::2], scales[:, 1::2]], dim=1),
        "w_out_data": down_blocks.flatten(-2),
        "w_out_scales": down_scales,
    }


def assert_shipped_bytes(state: dict[str, torch.Tensor], shipped: dict, n_layers: int) -> None:
    for i in range(n_layers):
        for name, expected in expected_bytes(shipped, i).items():
            assert torch.equal(state[f"layers.{i}.ffn.experts.{name}"], expected), (i, name)


def logits(model, x: torch.Tensor) -> torch.Tensor:
    """On the kernels' float path: a kept model is held to its dequantized load (the int8-activation
    path, MXFP4's default, is held to this one in tests/test_quant_kernels.py)."""
    with torch.no_grad(), kernels.use_activations("float"):
        return model(x).logits.float()


def refuse_decoding(monkeypatch) -> None:
    """Fail on any MXFP4 expert decoded to float (every decode is `QuantizedWeight.dequantize`)."""

    def refuse(*args, **kwargs):
        raise AssertionError("an MXFP4 expert was decoded to float")

    monkeypatch.setattr(QuantizedWeight, "dequantize", refuse)


def test_kept_experts_are_the_shipped_bytes_and_give_the_dequantized_logits(
    gpt_oss, monkeypatch
) -> None:
    folder, shipped = gpt_oss
    with monkeypatch.context() as patched:
        refuse_decoding(patched)
        kept = load_hf(folder, dtype="float32", keep_quantized=True)
    plain = load_hf(folder, dtype="float32")
    n_layers = kept.cfg.n_layers
    state, plain_state = kept.state_dict(), plain.state_dict()
    assert_shipped_bytes(state, shipped, n_layers)
    for i in range(n_layers):
        experts = kept.layers[i].ffn.experts
        assert isinstance(experts, QuantizedExperts) and experts.schemes == ("mxfp4", "mxfp4")
        w_in, w_out = experts.quantized_weights()
        assert torch.equal(w_in.dequantize(), plain_state[f"layers.{i}.ffn.experts.w_in"])
        assert torch.equal(w_out.dequantize(), plain_state[f"layers.{i}.ffn.experts.w_out"])
    for name, t in state.items():  # everything else loads as without keep_quantized
        if ".experts.w_" not in name:
            assert torch.equal(t, plain_state[name]), name
    x = tokens(vocab=VOCAB)
    ours, reference = logits(kept, x), logits(plain, x)
    assert (ours - reference).abs().max() <= 1e-5 * reference.abs().max()
    with pytest.raises(ValueError, match=r"save_hf writes unquantized weights.*dequantize_model"):
        save_hf(kept, folder.parent / "back", "gpt_oss")


def test_moekit_load_keeps_mxfp4_experts_by_default(gpt_oss) -> None:
    folder, _ = gpt_oss
    kept, plain = load(folder), load(folder, keep_quantized=False)
    assert isinstance(kept.model.layers[0].ffn.experts, QuantizedExperts)
    assert type(plain.model.layers[0].ffn.experts) is Experts
    assert kept.model.embed.weight.dtype == torch.bfloat16  # the rest as before: bfloat16

    def nbytes(model) -> int:
        return sum(t.numel() * t.element_size() for t in model.state_dict().values())

    assert nbytes(kept.model) < nbytes(plain.model)
    x = tokens(vocab=VOCAB)
    ours, reference = logits(kept.model, x), logits(plain.model, x)
    assert (ours - reference).abs().max() <= 2e-2 * reference.abs().max()  # bfloat16 sums


def test_quantize_takes_mxfp4_experts_as_shipped_and_generate_reads_it(
    gpt_oss, tmp_path, capsys, monkeypatch
) -> None:
    folder, shipped = gpt_oss
    out = tmp_path / "q"
    with monkeypatch.context() as patched:
        refuse_decoding(patched)
        args = ["quantize", str(folder), "--experts=mxfp4", "--weights=int8", f"--out={out}"]
        assert main(args) == 0
    assert "MB ->" in capsys.readouterr().out
    checkpoint = out / "checkpoints" / "step-000000"
    written = load_file(str(checkpoint / "model.safetensors"))
    loaded = load(out)
    n_layers = loaded.model.cfg.n_layers
    assert_shipped_bytes(written, shipped, n_layers)
    # the rest quantized from the loaded weights: what quantize_model does to the kept model
    # (its kept experts skipped: their scheme is the one asked for)
    config = QuantizeConfig(weights="int8", experts="mxfp4")
    expected = quantize_model(load_hf(folder, keep_quantized=True), config).state_dict()
    state = loaded.model.state_dict()
    assert state.keys() == expected.keys()
    for name, t in expected.items():  # a run's float tensors load as float32
        assert torch.equal(state[name], t.to(state[name].dtype)), name
    assert isinstance(loaded.model.layers[0].attn.q_proj, QuantizedLinear)
    args = ["generate", str(out), "--prompt=ab", "--max_new_tokens=4", "--temperature=0"]
    assert main(args) == 0
    assert capsys.readouterr().out.startswith("ab")


def test_quantize_to_int4_requantizes_one_expert_at_a_time(gpt_oss, tmp_path, monkeypatch) -> None:
    folder, _ = gpt_oss
    out = tmp_path / "q4"
    calls = []
    real = interop_quantized.quantize_into
    monkeypatch.setattr(
        interop_quantized,
        "quantize_into",
        lambda dest, w, *a: calls.append(tuple(w.shape)) or real(dest, w, *a),
    )
    args = ["quantize", str(folder), "--experts=int4", "--weights=int8", f"--out={out}"]
    assert main(args) == 0
    monkeypatch.undo()
    d, two_f = 64, 64
    assert (two_f, d) in calls and not any(len(s) == 3 for s in calls)  # one expert at a time
    written = load_file(str(out / "checkpoints" / "step-000000" / "model.safetensors"))
    config = QuantizeConfig(weights="int8", experts="int4")
    dequantized_then_quantized = quantize_model(load_hf(folder), config).state_dict()
    kept, calls = load_hf(folder, keep_quantized=True), []
    real = quant_modules.quantize_into
    monkeypatch.setattr(
        quant_modules,
        "quantize_into",
        lambda dest, w, *a: calls.append(tuple(w.shape)) or real(dest, w, *a),
    )
    requantized = quantize_model(kept, config)  # the kept MXFP4 experts, one at a time too
    monkeypatch.undo()
    assert (two_f, d) in calls and not any(len(s) == 3 for s in calls)
    assert isinstance(requantized.layers[0].ffn.experts, QuantizedExperts)
    assert requantized.layers[0].ffn.experts.schemes == ("int4", "int4")
    for name, t in requantized.state_dict().items():
        assert torch.equal(dequantized_then_quantized[name], t), name
        if t.dtype != torch.bfloat16:
            assert torch.equal(written[name], t), name


def test_keep_quantized_leaves_unquantized_checkpoints_as_they_are(gpt_oss, tmp_path) -> None:
    folder, _ = gpt_oss
    dense = save_hf(load_hf(folder), tmp_path / "dense", "gpt_oss")  # bfloat16, unquantized
    assert type(load_hf(dense, keep_quantized=True).layers[0].ffn.experts) is Experts
    with pytest.raises(ValueError, match="keep_quantized or quantize, not both"):
        load_hf(folder, keep_quantized=True, quantize=QuantizeConfig(weights="int8"))
