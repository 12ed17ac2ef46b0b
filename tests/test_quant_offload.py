"""Offloaded experts of a quantized run (`moekit quantize`): read, cached and computed in their
quantized format, bit-identical to the in-memory quantized model at every budget, a miss reading
the quantized bytes, and a budget below top_k experts one clear error before anything runs."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tests.run_cases import quantizable_model, train_quantizable_run
from tests.test_offload import greedy

from moekit import load
from moekit.cli import main
from moekit.config import OffloadConfig
from moekit.inference.offload import apply_expert_offload
from moekit.inference.offloaded_experts import OffloadedExperts
from moekit.inference.store import layer_file, write_expert_files
from moekit.quant import QuantizedWeight
from moekit.quant.modules import QuantizedLinear
from moekit.train.sample import find_run

CFG = quantizable_model()
TOP_K = CFG.moe.top_k
N_EXPERTS = len(CFG.moe_layer_indices) * CFG.moe.n_experts
# Quantized runs by name: the `moekit quantize` options that wrote them.
QUANTIZED = {"int4": ["--weights=int4"], "mixed": ["--experts=mxfp4", "--attention=int8"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A float run trained 2 steps (widths multiples of 32) and its quantized runs, by name."""
    tmp = tmp_path_factory.mktemp("quant_offload")
    runs = {"float": train_quantizable_run(tmp, "float")}
    for name, options in QUANTIZED.items():
        runs[name] = tmp / name
        assert main(["quantize", str(runs["float"]), *options, f"--out={runs[name]}"]) == 0
    return runs


def prompt() -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("name", list(QUANTIZED))
def test_offloaded_quantized_experts_generate_bit_identically(runs, name) -> None:
    """Prefill (the grouped path, in chunks of the budget) and decode (the selected path) with the
    experts read from the checkpoint as stored give the in-memory quantized model's logits
    exactly, at the least budget, with prefetch, and with every expert."""
    resident = load(runs[name]).model
    want_ids, want_logits = greedy(resident, prompt(), 6)
    for budget, prefetch in ((TOP_K, False), (TOP_K + 1, True), ("100%", False)):
        loaded = load(runs[name], experts=OffloadConfig(budget=str(budget), prefetch=prefetch))
        try:
            layers = loaded.model.moe_layers()
            assert all(isinstance(layer.experts, OffloadedExperts) for layer in layers)
            assert all(layer.experts.quantized for layer in layers)
            assert isinstance(loaded.model.layers[0].attn.o_proj, QuantizedLinear)
            ids, logits = greedy(loaded.model, prompt(), 6)
            stats = loaded.offload.stats()
        finally:
            loaded.offload.close()
        assert torch.equal(ids, want_ids) and torch.equal(logits, want_logits), (budget, prefetch)
        assert stats["misses"] > 0 and (stats["prefetched"] > 0) == prefetch
        assert loaded.offload.cache.resident_bytes <= stats["capacity"] * stats["expert_bytes"]
    resident_weights = loaded.offload.cache.resident.values()
    assert all(isinstance(w, QuantizedWeight) for pair in resident_weights for w in pair)


def stored_expert_bytes(run: Path) -> int:
    """One expert's bytes in the run's checkpoint: every routed expert tensor of the first MoE
    layer, as the file's header gives them, over the experts."""
    path = find_run(run)[1] / "model.safetensors"
    total = 0
    with safe_open(str(path), "pt") as f:
        for key in f.keys():  # noqa: SIM118
            if key.startswith("layers.0.ffn.experts.w_"):
                total += f.get_tensor(key).nbytes
    return total // CFG.moe.n_experts


def test_a_miss_reads_the_quantized_bytes(runs) -> None:
    """int4 (groups of 32, float16 scales): 4.5 bits a weight against float32's 32, so a miss
    reads 1/7.1 of the bytes; MXFP4 (uint8 scales) 4.25 bits."""
    per_miss = {}
    for name in ("float", *QUANTIZED):
        loaded = load(runs[name], experts=TOP_K)
        try:
            greedy(loaded.model, prompt(), 4)
        finally:
            loaded.offload.close()
        stats = loaded.offload.stats()
        assert stats["expert_bytes"] == stored_expert_bytes(runs[name])
        assert stats["bytes_read"] == stats["misses"] * stats["expert_bytes"]
        per_miss[name] = stats["bytes_read"] / stats["misses"]
    weights = 3 * CFG.moe.d_expert * CFG.moe.d_model  # gated: w_in (2F, D), w_out (D, F)
    assert per_miss["float"] == weights * 4
    assert per_miss["int4"] / per_miss["float"] == 4.5 / 32
    assert per_miss["mixed"] / per_miss["float"] == 4.25 / 32


def test_a_budget_below_top_k_quantized_experts_is_one_clear_error(runs, capsys) -> None:
    """In bytes a budget counts the experts as stored: two int4 experts' bytes hold top_k of
    them, but not of the float run's; one byte less is refused, naming offload.budget, the
    minimum and its size in int4, before any text is generated."""
    int4_bytes = stored_expert_bytes(runs["int4"])
    enough = f"{TOP_K * int4_bytes}B"
    loaded = load(runs["int4"], experts=enough)
    loaded.offload.close()
    assert loaded.offload.cache.capacity == TOP_K
    with pytest.raises(ValueError, match=r"expert budget '\d+B' holds 0 experts"):
        load(runs["float"], experts=enough)
    minimum = (
        rf"the minimum is top_k={TOP_K} \({TOP_K / N_EXPERTS:.1%} of the {N_EXPERTS} experts; "
        rf"{TOP_K} x {int4_bytes:,} bytes \(int4\) = {TOP_K * int4_bytes:,} bytes\): give "
        rf"offload.budget at least {TOP_K} experts or {TOP_K * int4_bytes}B"
    )
    for budget in (1, f"{TOP_K * int4_bytes - 1}B", 1 / N_EXPERTS):
        with pytest.raises(ValueError, match=minimum):
            load(runs["int4"], experts=budget)
    capsys.readouterr()
    code = main(["generate", str(runs["int4"]), "--prompt=def f(", "--offload.budget=1"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and "offload.budget at least 2 experts" in err


def test_offloaded_generate_command_prints_the_resident_text(runs, capsys) -> None:
    """`moekit generate --offload.budget` on a quantized run (its decode kernels swapped in, which
    the quantized experts do not take) prints the in-memory quantized model's text."""
    command = ["generate", str(runs["mixed"]), "--prompt=def f(", "--max_new_tokens=6",
               "--temperature=0"]  # fmt: skip
    capsys.readouterr()
    assert main(command) == 0
    resident = capsys.readouterr().out
    assert main([*command, "--offload.budget=3", "--offload.prefetch=true"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(resident.rstrip("\n")) and "expert cache: 3 experts" in text
    assert "MB read (mxfp4)" in text


def test_expert_directory_of_a_quantized_model(runs, tmp_path) -> None:
    """write_expert_files writes quantized experts as stored; offloading from the directory is
    bit-identical; a float model's directory is refused for the quantized model."""
    resident = load(runs["int4"]).model
    want = greedy(resident, prompt(), 5)
    expert_dir = write_expert_files(resident, tmp_path / "experts")
    offloaded = copy.deepcopy(resident)
    handle = apply_expert_offload(offloaded, expert_dir, budget=TOP_K + 1, prefetch=True)
    try:
        got = greedy(offloaded, prompt(), 5)
    finally:
        handle.close()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert handle.store.stored_as == "int4"
    assert handle.store.expert_bytes == stored_expert_bytes(runs["int4"])
    float_dir = write_expert_files(load(runs["float"]).model, tmp_path / "float_experts")
    with pytest.raises(ValueError, match="belong to another model"):
        apply_expert_offload(copy.deepcopy(resident), float_dir, budget=TOP_K)
    # a quantized tensor of another dtype than its scheme's is refused, naming both
    path = layer_file(expert_dir, 1)
    tensors = load_file(path)
    tensors["3.w_out_scales"] = tensors["3.w_out_scales"].float()
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"'3.w_out_scales' should be torch.float16.*found F32"):
        apply_expert_offload(copy.deepcopy(resident), expert_dir, budget=TOP_K)
