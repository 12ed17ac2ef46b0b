"""Weight-only quantization: the schemes against independent decoders and their rules, the
quantized model against its dequantized twin, quantized checkpoints through the commands."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from tests.run_cases import JSON_PACKAGE, quantizable_model, train_quantizable_run

from moekit import load
from moekit.cli import main
from moekit.config import ModelConfig, QuantizeConfig
from moekit.experts import Experts
from moekit.model import MoETransformer
from moekit.quant import QuantizedWeight, dequantize, kernels, quantize
from moekit.quant.modules import (
    QuantizedExperts,
    QuantizedLinear,
    dequantize_model,
    parts_of,
    quantize_model,
)
from moekit.quant.schemes import GROUP, empty_quantized


def weight(*shape: int) -> torch.Tensor:
    w = torch.randn(*shape) * 0.02
    w[..., 0, :GROUP] = 0  # an all-zero group
    w[..., 1, 5] = 0.3  # an outlier
    return w


def unpack_nibbles(data: np.ndarray) -> np.ndarray:
    return np.stack([data & 15, data >> 4], -1).reshape(*data.shape[:-1], -1).astype(np.uint8)


@pytest.mark.parametrize("scheme", ["bf16", "int8", "int4", "mxfp4"])
def test_every_scheme_round_trips_within_its_step(scheme: str) -> None:
    w = weight(3, 16, 96)
    qw = quantize(w, scheme)
    assert qw.shape == w.shape and qw[1].shape == w.shape[1:]
    back = qw.dequantize()
    assert back[..., 0, :GROUP].abs().max() == 0  # zero groups stay zero, not NaN
    # the error of each element is at most half a quantization step of its group (int4: a whole
    # step, for values of the other sign than the largest beyond +7 steps, clamped as in q4_0)
    groups = w.unflatten(-1, (-1, GROUP)).abs().amax(-1, keepdim=True)
    rows = w.abs().amax(-1, keepdim=True)
    bound = {
        "bf16": w.abs() * 2**-8,
        "int8": rows / 127 / 2,
        "int4": (groups / 8).expand(-1, -1, -1, GROUP).flatten(-2),
        "mxfp4": (groups / 2).expand(-1, -1, -1, GROUP).flatten(-2),  # half the step at 6 (2)
    }[scheme]
    assert ((back - w).abs() <= bound * (1 + 1e-3) + 1e-9).all()
    # stored bytes: (O * I) x bits / 8, plus scales; the layout written out (empty_quantized
    # derives it from quantize, so quantize's own output is checked against it here)
    u8, f16 = torch.uint8, torch.float16
    layout = {
        "bf16": {"data": ((3, 16, 96), torch.bfloat16)},
        "int8": {"data": ((3, 16, 96), torch.int8), "scales": ((3, 16), torch.float32)},
        "int4": {"data": ((3, 16, 48), u8), "scales": ((3, 16, 3), f16)},
        "mxfp4": {"data": ((3, 16, 48), u8), "scales": ((3, 16, 3), u8)},
    }[scheme]
    for qw_or_empty in (
        qw,
        empty_quantized(w.shape, scheme),
        empty_quantized(w.shape, scheme, device="meta"),
    ):
        assert {k: (tuple(t.shape), t.dtype) for k, t in qw_or_empty.tensors().items()} == layout
    assert empty_quantized(w.shape, scheme, device="meta").data.device.type == "meta"
    assert empty_quantized(w.shape, scheme).nbytes == qw.nbytes
    if scheme == "int4":  # with a zero point, offsets beside the scales
        offsets = empty_quantized(w.shape, scheme, zero_point=True).tensors()["offsets"]
        assert (tuple(offsets.shape), offsets.dtype) == ((3, 16, 3), f16)


def test_mxfp4_matches_ml_dtypes_independent_decoder_and_rounding() -> None:
    w = weight(2, 8, 64)
    w[0, 2, 32:] = torch.linspace(-6, 6, 32) * 2.0**-5  # every code, one exponent
    qw = quantize(w, "mxfp4")
    codes = unpack_nibbles(qw.data.numpy())
    values = codes.view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    scales = qw.scales.numpy().view(ml_dtypes.float8_e8m0fnu).astype(np.float32)
    expected = (values.reshape(2, 8, 2, GROUP) * scales[..., None]).reshape(2, 8, 64)
    assert np.array_equal(qw.dequantize().numpy(), expected)
    # each element is w / scale rounded to E2M1 as ml_dtypes rounds it
    scaled = w.numpy().reshape(2, 8, 2, GROUP) / scales[..., None]
    rounded = scaled.astype(ml_dtypes.float4_e2m1fn).astype(np.float32).reshape(2, 8, 64)
    assert np.array_equal(rounded, values)


def test_mxfp4_tables_are_built_on_the_weights_device(monkeypatch) -> None:
    """quantize and dequantize build the E2M1 tables on the input's device (meta here, an
    accelerator alike): no CPU table meets a tensor elsewhere."""
    real = torch.bucketize

    def bucketize(x: torch.Tensor, boundaries: torch.Tensor, **kwargs) -> torch.Tensor:
        assert boundaries.device == x.device, (boundaries.device, x.device)
        return real(x, boundaries, **kwargs)

    monkeypatch.setattr(torch, "bucketize", bucketize)
    qw = quantize(torch.empty(2, 8, 64, device="meta"), "mxfp4")
    assert qw.data.is_meta and qw.scales.is_meta
    assert dequantize(qw).is_meta  # the CPU table indexed by meta codes raised
    if torch.cuda.is_available():
        w = weight(2, 8, 64)
        on_gpu = quantize(w.cuda(), "mxfp4")
        assert torch.equal(on_gpu.data.cpu(), quantize(w, "mxfp4").data)
        assert torch.equal(on_gpu.dequantize().cpu(), quantize(w, "mxfp4").dequantize())


def test_int4_follows_q4_0_and_q4_1_rules() -> None:
    w = torch.randn(4, 64) * 0.02
    qw = quantize(w, "int4")
    nibbles = torch.from_numpy(unpack_nibbles(qw.data.numpy())).view(4, 2, GROUP)
    w_G = w.view(4, 2, GROUP)
    largest = w_G.abs().argmax(-1, keepdim=True)
    assert (nibbles.gather(-1, largest) == 0).all()  # the largest magnitude is -8 (nibble 0)
    signs = torch.sign(w_G.gather(-1, largest)).squeeze(-1)
    assert torch.equal(torch.sign(qw.scales.float()), -signs)
    zp = quantize(w, "int4", zero_point=True)
    back = zp.dequantize().view(4, 2, GROUP)
    # min is represented exactly (to float16), max within half a step
    assert torch.allclose(back.amin(-1), w_G.amin(-1), atol=1e-4)
    step = (w_G.amax(-1) - w_G.amin(-1)) / 15
    assert ((back.amax(-1) - w_G.amax(-1)).abs() <= step / 2 + 1e-4).all()


def test_int8_matches_an_independent_numpy_rule() -> None:
    w = weight(5, 40)  # int8 and bf16 take any width
    qw = quantize(w, "int8")
    scales = np.abs(w.numpy()).max(-1) / 127
    with np.errstate(invalid="ignore", divide="ignore"):
        q = np.clip(np.rint(w.numpy() / scales[:, None]), -127, 127)
    q = np.nan_to_num(q)
    assert np.array_equal(qw.data.numpy(), q.astype(np.int8))
    assert torch.equal(dequantize(qw), qw.data.float() * qw.scales[:, None])


def test_unquantizable_widths_and_schemes_are_named() -> None:
    with pytest.raises(ValueError, match=r"40 input features, not a multiple of 32: int4"):
        quantize(torch.randn(8, 40), "int4")
    with pytest.raises(ValueError, match="unknown quantization scheme 'int3'"):
        quantize(torch.randn(8, 64), "int3")
    model = MoETransformer(ModelConfig.preset("tiny"))  # widths 48 and 40
    with pytest.raises(ValueError, match=r"layers\.0\.attn\.q_proj \(attention, shape"):
        quantize_model(model, QuantizeConfig(weights="mxfp4"))
    assert type(model.layers[0].attn.q_proj) is torch.nn.Linear  # nothing was swapped


def test_quantized_model_is_its_dequantized_twin_and_close_to_float() -> None:
    """On the kernels' float path (weights dequantized in registers) the quantized model is its
    dequantized twin; the int8-activation path (int4's and MXFP4's default) is held to it in
    tests/test_quant_kernels.py."""
    model = MoETransformer(quantizable_model()).eval()
    ids = torch.randint(0, 257, (2, 12))
    with torch.no_grad(), kernels.use_activations("float"):
        reference = model(ids).logits
        for config, tolerance in [
            (QuantizeConfig(weights="bf16"), 0.01),
            (QuantizeConfig(weights="int8"), 0.05),
            (QuantizeConfig(weights="int4", zero_point=True), 0.2),
            (QuantizeConfig(weights="mxfp4"), 0.3),
            (QuantizeConfig(weights="int4", attention="int8", head="none"), 0.2),
        ]:
            quantized = quantize_model(copy.deepcopy(model), config)
            logits = quantized(ids).logits
            twin = dequantize_model(copy.deepcopy(quantized))
            # the decode kernels (a few rows) sum in another order than F.linear
            assert torch.allclose(twin(ids).logits, logits, atol=1e-5), config
            assert (logits - reference).abs().max() < tolerance, config
    assert isinstance(quantized.layers[0].ffn.experts, QuantizedExperts)
    assert quantized.layers[0].attn.q_proj.scheme == "int8"
    assert type(quantized.lm_head) is torch.nn.Linear  # head="none"
    kept = [n for n, m in quantized.named_modules() if isinstance(m, QuantizedLinear)]
    assert not [n for n in kept if "router" in n or "norm" in n or "embed" in n], kept
    floats = dict(quantized.named_parameters())  # embeddings, norms and routers stay float
    for name in ("embed.weight", "norm.weight", "layers.0.attn_norm.weight",
                 "layers.0.ffn.router.weight"):  # fmt: skip
        assert floats[name].dtype == torch.float32, name


def test_quantized_experts_decode_path_equals_grouped_path_and_reference() -> None:
    cfg = quantizable_model().moe
    experts = Experts(cfg)
    w_in, w_out = quantize(experts.w_in, "int4"), quantize(experts.w_out, "int8")
    quantized = QuantizedExperts(experts, w_in, w_out)
    reference = Experts(cfg)
    reference.w_in.data, reference.w_out.data = w_in.dequantize(), w_out.dequantize()
    x_TD = torch.randn(5, cfg.d_model)
    ids_TK = torch.tensor([[0, 3], [3, 1], [5, 0], [0, 3], [2, 4]])
    weights_TK = torch.rand(5, 2)
    with torch.no_grad(), kernels.use_activations("float"):
        expected = reference.forward_selected(x_TD, ids_TK, weights_TK)
        assert torch.allclose(quantized.forward_selected(x_TD, ids_TK, weights_TK), expected,
                              atol=1e-6)  # fmt: skip
        order = ids_TK.flatten().argsort(stable=True)
        x_RD = x_TD.repeat_interleave(2, 0)[order]
        counts_E = torch.bincount(ids_TK.flatten(), minlength=cfg.n_experts)
        assert torch.allclose(quantized(x_RD, counts_E), reference(x_RD, counts_E), atol=1e-6)


def test_quantized_weight_indexes_its_stacked_experts() -> None:
    qw = quantize(weight(3, 8, 64), "int4", zero_point=True)
    for e in range(3):
        one = qw[e]
        assert isinstance(one, QuantizedWeight) and one.offsets is not None
        assert torch.equal(one.dequantize(), qw.dequantize()[e])


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return train_quantizable_run(tmp_path_factory.mktemp("quant_cli"))


def test_quantize_command_writes_a_run_that_generate_and_convert_read(
    run: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "q"
    assert main(["quantize", str(run), "--weights=int4", "--attention=int8", f"--out={out}"]) == 0
    printed = capsys.readouterr().out
    assert "MB ->" in printed
    saved = json.loads((out / "checkpoints/step-000000/quantization.json").read_text())
    assert saved["weights"] == "int4" and saved["attention"] == "int8"
    loaded, original = load(out), load(run)
    expected = quantize_model(original.model, QuantizeConfig(weights="int4", attention="int8"))
    ids = torch.randint(0, 257, (1, 10))
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, expected(ids).logits)
    assert isinstance(loaded.model.layers[1].attn.o_proj, QuantizedLinear)
    assert main(["generate", str(out), "--prompt=def f(", "--max_new_tokens=5",
                 "--temperature=0"]) == 0  # fmt: skip
    assert capsys.readouterr().out.startswith("def f(")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def f(\nimport os\n")
    trace = ["trace", str(out), "--prompts", str(prompts), "--out", str(tmp_path / "routing.trace"),
             "--max_new_tokens=3"]  # fmt: skip
    assert main(trace) == 0
    analyze = ["analyze", str(out), f"--data={JSON_PACKAGE}", "--tokens=200", "--seq_len=32"]
    assert main(analyze) == 0 and (out / "analysis/report.md").is_file()
    hf = tmp_path / "hf"
    capsys.readouterr()
    assert main(["convert", "--to-hf", str(out), "--arch=mixtral", f"--out={hf}"]) == 0
    assert "is quantized; Hugging Face checkpoints hold float weights" in capsys.readouterr().err
    with torch.no_grad(), kernels.use_activations("float"):  # the dequantized twin's path
        assert torch.allclose(load(hf).model(ids).logits, expected(ids).logits, atol=1e-5)


def test_quantized_runs_refuse_training_and_existing_outputs(
    run: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "q"
    out.mkdir()  # an empty folder is refused, naming it: the command makes its own
    assert main(["quantize", str(run), "--weights=int8", f"--out={out}"]) == 2
    assert f"{out} exists (an empty folder: the command makes its own" in capsys.readouterr().err
    out.rmdir()
    assert main(["quantize", str(run), "--weights=int8", f"--out={out}"]) == 0
    capsys.readouterr()
    assert main(["quantize", str(run), f"--out={out}"]) == 2
    assert "exists; choose a new directory" in capsys.readouterr().err
    assert main(["train", "--resume", str(out), "--train.progress=false"]) == 2
    assert (
        "holds a quantized model (moekit quantize): it is for inference" in capsys.readouterr().err
    )
    assert main(["quantize", str(run), "--weights=int3", f"--out={tmp_path / 'r'}"]) == 2
    assert "int3" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_requantizing_a_quantized_run_to_none_makes_those_parts_float(
    run: Path, tmp_path: Path, capsys
) -> None:
    """The scheme "none" is float: a quantized run's parts given it are dequantized (they had
    stayed int8 while quantization.json called them float, a checkpoint that did not load);
    every part none is refused (nothing quantized: convert --to-hf writes the float weights)."""
    int8, mixed = tmp_path / "int8", tmp_path / "mixed"
    assert main(["quantize", str(run), "--weights=int8", f"--out={int8}"]) == 0
    assert main(["quantize", str(int8), "--weights=none", "--experts=int4", f"--out={mixed}"]) == 0
    capsys.readouterr()
    source, loaded = load(int8).model, load(mixed).model
    o_proj = loaded.layers[1].attn.o_proj
    assert type(o_proj) is torch.nn.Linear and o_proj.weight.dtype == torch.float32
    assert torch.equal(o_proj.weight, source.layers[1].attn.o_proj.weight_q.dequantize())
    experts = loaded.layers[1].ffn.experts
    assert isinstance(experts, QuantizedExperts) and experts.schemes == ("int4", "int4")
    assert main(["quantize", str(int8), "--weights=none", f"--out={tmp_path / 'f'}"]) == 2
    assert "every part is none" in capsys.readouterr().err and not (tmp_path / "f").exists()


def test_a_part_the_model_lacks_is_refused_before_a_weight_is_read(
    run: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """--experts on a dense model, --head on a tied head, --ffn on a model of MoE layers alone
    were ignored; each is refused from the config, the weights never read."""
    tiny = ModelConfig.preset("tiny")
    assert parts_of(tiny) == {"experts", "attention", "head"}  # MoE layers alone
    assert parts_of(tiny.replace(moe_layers=2)) == {"experts", "attention", "ffn", "head"}
    assert parts_of(tiny.replace(moe=None)) == {"attention", "ffn", "head"}
    assert parts_of(tiny.replace(tie_embeddings=True)) == {"experts", "attention"}
    monkeypatch.setattr("moekit.cli.quantize.load", None)  # reading the weights would raise
    out = tmp_path / "q"
    assert main(["quantize", str(run), "--ffn=int8", f"--out={out}"]) == 2
    err = capsys.readouterr().err
    assert "--ffn=int8: " in err and "has no dense FFN layer or shared expert" in err
    assert err.count("\n") == 1 and not out.exists()


def test_a_quantization_record_that_does_not_fit_its_tensors_is_named(
    run: Path, tmp_path: Path, capsys
) -> None:
    """int4 tensors under a record saying MXFP4 (the same shapes; float16 scales, not bytes) had
    decoded as MXFP4, silently; a record that names another scheme or is missing pointed at
    config.json alone."""
    q = tmp_path / "q"
    assert main(["quantize", str(run), "--weights=int4", f"--out={q}"]) == 0
    record = q / "checkpoints/step-000000/quantization.json"
    args = ["generate", str(q), "--prompt=x", "--max_new_tokens=2"]
    record.write_text(record.read_text().replace('"int4"', '"mxfp4"'))
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "weight_scales is torch.float16 in the checkpoint, torch.uint8 in the model" in err
    assert "restore the config.json and quantization.json" in err
    assert main([*args, "--offload.budget=50%"]) == 2  # the expert files are checked
    assert "should be torch.uint8 as its quantization scheme stores it" in capsys.readouterr().err
    q2 = tmp_path / "q2"  # MXFP4 experts as recorded, int4 attention under a record of MXFP4
    assert main(["quantize", str(run), "--weights=int4", "--experts=mxfp4", f"--out={q2}"]) == 0
    record2 = q2 / "checkpoints/step-000000/quantization.json"
    record2.write_text(record2.read_text().replace('"weights": "int4"', '"weights": "mxfp4"'))
    capsys.readouterr()
    assert main(["generate", str(q2), "--max_new_tokens=2", "--offload.budget=50%"]) == 2
    assert "weight_scales is torch.float16 in the checkpoint, torch.uint8 in the model" in (
        capsys.readouterr().err
    )  # the offloaded load's other tensors, assigned as stored, are checked too
    record.unlink()
    assert main(args) == 2
    assert "its tensors are quantized (..._scales): restore the quantization.json" in (
        capsys.readouterr().err
    )


def test_a_quantization_record_with_a_zero_point_but_no_int4_part_still_reads(
    run: Path, tmp_path: Path
) -> None:
    """quantize refuses --zero_point without an int4 part (tests/test_cli_args.py); a checkpoint
    an earlier version wrote that way (its int8 parts never took it) still loads."""
    cfg = QuantizeConfig.from_json(QuantizeConfig(weights="int8", zero_point=True).to_json())
    assert cfg.zero_point and cfg.scheme_of("experts") == "int8"
    q = tmp_path / "q"
    assert main(["quantize", str(run), "--weights=int8", f"--out={q}"]) == 0
    (q / "checkpoints/step-000000/quantization.json").write_text(cfg.to_json())
    assert load(q).model.layers[0].attn.q_proj.scheme == "int8"  # the record of an earlier one
