"""moekit.inference.decode_kernels: the kernels against their reference F.linear, the fallbacks,
the torch ops they are registered as, and their swap into a built model."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moekit import ModelConfig, MoETransformer, cbuild
from moekit.inference import decode_kernels
from moekit.inference.decode_kernels import (
    MAX_ROWS,
    KernelLinear,
    apply_decode_kernels,
    linear,
    qualifies,
    remove_decode_kernels,
    swiglu_expert,
)


@pytest.fixture
def no_kernel(monkeypatch):
    """The library as on a machine without a C compiler."""
    decode_kernels._library.cache_clear()
    monkeypatch.setenv("CC", "/nonexistent/cc")  # also a new cache key: no cached library
    yield
    decode_kernels._library.cache_clear()


def test_kernel_is_built_here() -> None:
    """This machine (and CI) has a C compiler: the fast path must be live, not silently off."""
    assert decode_kernels.available()


@pytest.mark.parametrize("rows", [1, 2, 5, 8, MAX_ROWS])
@pytest.mark.parametrize("out_in", [(8, 768), (2048, 768), (768, 1024), (100, 37), (1, 1)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_f_linear(rows: int, out_in: tuple[int, int], bias: bool) -> None:
    O, I = out_in
    g = torch.Generator().manual_seed(rows * 1000 + O + I)
    x = torch.randn(rows, I, generator=g)
    w = torch.randn(O, I, generator=g) / I**0.5
    b = torch.randn(O, generator=g) if bias else None
    assert qualifies(x, w, b)
    torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_leading_dims_and_strided_rows() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 64, generator=g)  # (B, S=1, D), as a decode step
    w_big = torch.randn(48, 100, generator=g)
    w = w_big[:, 10:74]  # rows of 64 floats, 100 apart: a view into a stacked weight
    assert qualifies(x, w, None)
    y = linear(x, w)
    assert y.shape == (2, 1, 48)
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-5)


def on_one_and_two_threads(call):
    """(call() on 1 thread, call() on 2 threads), torch's thread count restored after."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = call()
        torch.set_num_threads(2)
        return one, call()
    finally:
        torch.set_num_threads(before)


def test_deterministic_across_thread_counts() -> None:
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(3, 512, generator=g), torch.randn(1024, 512, generator=g)
    one, two = on_one_and_two_threads(lambda: linear(x, w))
    assert torch.equal(one, two)


@pytest.mark.parametrize(
    "case",
    [
        "too many rows",
        "float64",
        "transposed weight",
        "needs grad",
        "bias needs grad",
        "broadcast bias",
        "zero width",
    ],
)
def test_falls_back_to_f_linear(case: str) -> None:
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(4, 32, generator=g), torch.randn(16, 32, generator=g)
    b = None
    if case == "bias needs grad":
        b = torch.zeros(16, requires_grad=True)
    elif case == "broadcast bias":
        b = torch.ones(1)
    elif case == "zero width":
        x, w = torch.randn(2, 0), torch.randn(3, 0)
    elif case == "too many rows":
        x = torch.randn(MAX_ROWS + 1, 32, generator=g)
    elif case == "float64":
        x, w = x.double(), w.double()
    elif case == "transposed weight":
        w = torch.randn(32, 16, generator=g).t()
    elif case == "needs grad":
        w.requires_grad_(True)
    assert not qualifies(x, w, b)
    y = linear(x, w, b)
    assert torch.equal(y, F.linear(x, w, b))
    assert (y.grad_fn is not None) == (case in ("needs grad", "bias needs grad"))


def test_weights_off_the_cpu_or_a_meta_default_device_are_not_read() -> None:
    x = torch.randn(1, 64)
    assert not qualifies(x, torch.empty(128, 64, device="meta"), None)
    assert not qualifies(x, torch.randn(128, 64), torch.empty(128, device="meta"))
    w = torch.randn(128, 64)
    with torch.device("meta"):  # outputs are made on x's device, not the default one
        y = linear(x, w)
    assert y.device.type == "cpu"
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_expert_checks_shapes_and_gradients() -> None:
    x, w_in, w_out = torch.randn(2, 8), torch.randn(12, 8), torch.randn(8, 6)
    assert decode_kernels.expert_qualifies(x, w_in, w_out)
    assert not decode_kernels.expert_qualifies(x[0], w_in, w_out)
    assert not decode_kernels.expert_qualifies(x, w_in, w_out[None])
    w_out.requires_grad_(True)
    assert not decode_kernels.expert_qualifies(x, w_in, w_out)
    assert swiglu_expert(x, w_in, w_out).grad_fn is not None


def test_vmap_runs_f_linear() -> None:
    x, w = torch.randn(3, 1, 16), torch.randn(8, 16)
    y = torch.vmap(lambda row: linear(row, w))(x)
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_no_compiler_means_f_linear(no_kernel) -> None:
    with pytest.warns(RuntimeWarning, match="could not build its CPU decode kernels"):
        assert not decode_kernels.available()
    x, w = torch.randn(1, 32), torch.randn(16, 32)
    assert torch.equal(linear(x, w), F.linear(x, w))
    w_in, w_out = torch.randn(64, 32), torch.randn(32, 32)
    gate, up = F.linear(x, w_in).chunk(2, dim=-1)
    assert torch.equal(swiglu_expert(x, w_in, w_out), F.linear(F.silu(gate) * up, w_out))


def test_kernel_linear_is_nn_linear_with_the_kernel() -> None:
    torch.manual_seed(3)
    reference = nn.Linear(256, 512)
    layer = KernelLinear.sharing(reference)
    assert layer.weight is reference.weight and layer.bias is reference.bias
    assert layer.state_dict().keys() == reference.state_dict().keys()
    x = torch.randn(1, 256)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference(x), rtol=1e-5, atol=1e-5)
        many = torch.randn(MAX_ROWS + 1, 256)
        assert torch.equal(layer(many), reference(many))  # a GEMM: F.linear itself
    y = layer(x)  # training: F.linear, with its gradient
    assert torch.equal(y, reference(x))
    y.sum().backward()
    assert layer.weight.grad is not None


def test_ops_are_torch_ops_with_fake_implementations() -> None:
    """torch.compile and the profiler see moekit::linear and moekit::swiglu_expert."""
    x, w, b = torch.randn(2, 32), torch.randn(16, 32), torch.randn(16)
    w_in, w_out = torch.randn(24, 32), torch.randn(32, 12)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.moekit.linear.default, (x, w, b), test_utils=checks)
    torch.library.opcheck(
        torch.ops.moekit.swiglu_expert.default, (x, w_in, w_out), test_utils=checks
    )
    compiled = torch.compile(torch.ops.moekit.linear, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    with torch.profiler.profile() as prof:
        linear(x, w, b)
        swiglu_expert(x, w_in, w_out)
    names = {event.name for event in prof.events()}
    assert {"moekit::linear", "moekit::swiglu_expert"} <= names


def test_apply_decode_kernels_swaps_every_product_and_remove_undoes_it() -> None:
    cfg = ModelConfig.preset("tiny").replace(tie_embeddings=True)
    model = MoETransformer(cfg.replace(moe=cfg.moe.replace(n_shared_experts=1))).eval()
    keys = model.state_dict().keys()
    linears = {name for name, m in model.named_modules() if type(m) is nn.Linear}
    x = torch.randint(0, cfg.vocab_size, (1, 3))
    with torch.no_grad():
        plain = model(x).logits
        assert apply_decode_kernels(model) is model
        assert {name for name, m in model.named_modules() if type(m) is KernelLinear} == linears
        assert model.state_dict().keys() == keys
        layer = model.moe_layers()[0]
        assert layer.router.linear is linear
        assert layer.experts.expert_ffn is decode_kernels.kernel_expert_ffn
        assert model.tied_head_linear is linear
        with torch.profiler.profile() as prof:
            fast = model(x).logits
        assert "moekit::linear" in {event.name for event in prof.events()}
        torch.testing.assert_close(fast, plain, rtol=0, atol=1e-5)
        remove_decode_kernels(model)
        assert {name for name, m in model.named_modules() if type(m) is nn.Linear} == linears
        assert not any(isinstance(m, KernelLinear) for m in model.modules())
        assert torch.equal(model(x).logits, plain)


@pytest.mark.parametrize("rows", [1, 4, MAX_ROWS])
def test_swiglu_expert_matches_torch(rows: int) -> None:
    g = torch.Generator().manual_seed(rows)
    D, F_ = 96, 80
    x = torch.randn(rows, D, generator=g)
    w_in = torch.randn(2 * F_, D, generator=g) / D**0.5
    w_out = torch.randn(D, F_, generator=g) / F_**0.5
    gate, up = F.linear(x, w_in).chunk(2, dim=-1)
    torch.testing.assert_close(
        swiglu_expert(x, w_in, w_out), F.linear(F.silu(gate) * up, w_out), rtol=1e-5, atol=1e-5
    )


def test_a_library_is_rebuilt_when_a_file_its_source_includes_changes(tmp_path, monkeypatch):
    """cbuild's cache key covers the `#include "..."` files beside a source (quant/kernels.c
    includes its bodies), so editing one builds anew instead of loading the stale library."""
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))
    source, body, inner = tmp_path / "k.c", tmp_path / "k_body.h", tmp_path / "k_inner.h"
    source.write_text('#include <stdint.h>\n  #  include "k_body.h" // the body\n'
                      "int k(void) { return K + J; }\n")  # fmt: skip
    body.write_text('#pragma once\n#include "k_inner.h"\n#include "k_body.h"\n#define K 1\n')
    inner.write_text("#pragma once\n#define J 10\n")
    first = cbuild.build(source)
    inner.write_text("#pragma once\n#define J 20\n")  # an include's include: a cycle beside it
    second = cbuild.build(source)
    assert first != second
    assert ctypes.CDLL(str(first)).k() == 11 and ctypes.CDLL(str(second)).k() == 21


def test_source_builds_without_the_x86_intrinsics(tmp_path) -> None:
    """Other CPUs (aarch64, Apple clang) compile only the portable body, as MOEKIT_PORTABLE does
    here; it computes what the AVX2 body does, to float32 rounding."""
    out = cbuild.build(decode_kernels.SOURCE, (*cbuild.FLAGS, "-DMOEKIT_PORTABLE"))
    lib = ctypes.CDLL(str(out))
    x, w = torch.randn(3, 100), torch.randn(40, 100)
    y = torch.empty(3, 40)
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.moekit_linear_f32.argtypes = [ptr, i64, i64, ptr, i64, i64, ptr, ptr]
    lib.moekit_linear_f32(x.data_ptr(), 3, 100, w.data_ptr(), 100, 40, None, y.data_ptr())
    torch.testing.assert_close(y, linear(x, w), rtol=1e-5, atol=1e-5)


def _has(*flags: str) -> bool:
    """Whether /proc/cpuinfo lists every one of `flags` (no such file: False)."""
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.exists() else ""
    return all(f" {flag}" in text for flag in flags)


@pytest.mark.skipif(not _has("avx512f"), reason="this CPU has no AVX-512: only the AVX2 body runs")
@pytest.mark.parametrize(
    ("R", "I", "O"), [(1, 768, 2048), (3, 100, 41), (3, 100, 43), (16, 31, 7), (2, 65, 4)]
)
def test_the_avx512_body_sums_as_the_avx2_body_bit_for_bit(R: int, I: int, O: int) -> None:
    """The AVX-512 body (four weight rows at a time, two 8-lane sums in each register) computes
    every element as the AVX2 body does: the build without it (-DMOEKIT_NO_AVX512) gives the same
    bits, for every tail of I (32-wide part, then one by one) and of O (blocks of 4)."""
    assert_same_bits_with(R, I, O, "-DMOEKIT_NO_AVX512")


@pytest.mark.skipif(not _has("avx2", "fma"), reason="this CPU has no AVX2")
@pytest.mark.parametrize(
    ("R", "I", "O"), [(1, 768, 2048), (8, 768, 1024), (3, 100, 41), (16, 31, 7)]
)
def test_the_bodies_sum_as_one_rows_avx2_dot_bit_for_bit(R: int, I: int, O: int) -> None:
    """The body this CPU runs (AVX2: two weight rows at a time, x loaded once for both; AVX-512:
    four) computes every element as the one-row AVX2 dot does (-DMOEKIT_ONE_ROW_AVX2), bit for
    bit, for every tail of I (32-wide part, then one by one) and of O (an odd last row)."""
    assert_same_bits_with(R, I, O, "-DMOEKIT_ONE_ROW_AVX2")


def assert_same_bits_with(R: int, I: int, O: int, flag: str) -> None:
    """y (R, O) = x (R, I) @ W^T + b (W's rows I + 3 apart) from the default build and the build
    with `flag`: equal bit for bit, and F.linear's to float32 rounding."""
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    g = torch.Generator().manual_seed(R * I + O)
    x, w, b = torch.randn(R, I, generator=g), torch.randn(O, I + 3, generator=g), torch.randn(O)
    ys = []
    for flags in (cbuild.EXACT_FLAGS, (*cbuild.EXACT_FLAGS, flag)):
        lib = ctypes.CDLL(str(cbuild.build(decode_kernels.SOURCE, flags)))
        lib.moekit_linear_f32.argtypes = [ptr, i64, i64, ptr, i64, i64, ptr, ptr]
        lib.moekit_linear_rows_f32.argtypes = [ptr, i64, i64, ptr, i64, i64, i64, i64, ptr, ptr]
        y = torch.empty(R, O)
        lib.moekit_linear_f32(
            x.data_ptr(), R, I, w.data_ptr(), I + 3, O, b.data_ptr(), y.data_ptr()
        )
        # a caller's own row ranges (decode_glue.c): odd starts, one to three rows
        ranged = torch.zeros(R, O)
        for o0, o1 in ((0, 1), (1, 4), (4, O)):
            o0, o1 = min(o0, O), min(o1, O)
            args = (x.data_ptr(), R, I, w.data_ptr(), I + 3, o0, o1, O, b.data_ptr())
            lib.moekit_linear_rows_f32(*args, ranged.data_ptr())
        ys += [y, ranged]
    assert all(torch.equal(ys[0], y) for y in ys[1:])
    torch.testing.assert_close(ys[0], F.linear(x, w[:, :I], b), rtol=1e-5, atol=1e-4)


def test_fake_tensors_never_reach_the_kernel() -> None:
    """Under FakeTensorMode (torch.export, shape propagation) the tensors claim to be CPU float32
    but have no memory: torch's products run, the C kernel never reads a pointer."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with torch.no_grad(), FakeTensorMode():
        y = linear(torch.randn(1, 8), torch.randn(4, 8))
        z = swiglu_expert(torch.randn(2, 8), torch.randn(12, 8), torch.randn(8, 6))
    assert (y.shape, z.shape) == ((1, 4), (2, 8))
