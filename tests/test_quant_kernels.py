"""moekit.quant.kernels: the C kernels over each stored layout (every body: portable, AVX2, and
AVX-512 where the CPU runs it)
against their reference F.linear(x, qw.dequantize(), b), the inputs they leave to the reference,
the torch op they are registered as, and their build.

Tolerance: the kernels sum in float32 in another order than torch's F.linear (MKL), so both carry
rounding error; for a dot product of I terms summed in 8 lanes x a few accumulators, then a
fixed tree, each side's error is at most about (I / 32 + 16) float32 rounding units times
sum_i |x_i w_i| (a sequential sum of n terms errs by at most ~n units of that sum; ours chains
I / 32 terms a lane, plus the tree and the group-scale multiply). `_assert_matches` allows twice
that, elementwise against |x| @ |W|^T: a real bug (a wrong nibble, scale or tail element) is
off by whole weights, orders of magnitude above it.
"""

from __future__ import annotations

import contextlib
import ctypes

import pytest
import torch
import torch.nn.functional as F
from tests.test_cpu_kernels import on_one_and_two_threads

from moekit import cbuild
from moekit.experts.experts import activate
from moekit.quant import kernels, quantize
from moekit.quant.kernels import KERNEL_ROWS, MAX_ROWS, linear, qualifies
from moekit.quant.schemes import QuantizedWeight

# (scheme, zero_point): int4 with and without offsets
SCHEMES = [("bf16", False), ("int8", False), ("int4", False), ("int4", True), ("mxfp4", False)]
IDS = ["bf16", "int8", "int4", "int4_zp", "mxfp4"]
PATHS = list(kernels.PATHS)


@contextlib.contextmanager
def _path(name: str, activations: str = "float"):
    """The kernels' `name` body for the block, x taken as `activations` ("float": the weights
    dequantized in registers; the int8-activation path has its own tests below); skips the test
    where this CPU cannot run the body."""
    if not _runs_here(name):
        pytest.skip(f"this CPU cannot run the {name} body")
    with kernels.use_path(name), kernels.use_activations(activations):
        yield


def _runs_here(name: str) -> bool:
    return kernels.cannot_run(name) is None


def _weight(scheme: str, zero_point: bool, O: int, I: int, seed: int) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    return quantize(torch.randn(O, I, generator=g) / I**0.5, scheme, zero_point=zero_point)


def _assert_matches(y: torch.Tensor, x: torch.Tensor, qw: QuantizedWeight, b=None) -> None:
    w = qw.dequantize()
    reference = F.linear(x, w, b)
    units = x.shape[-1] // 32 + 16
    bound = 2 * units * 2.0**-24 * (x.abs() @ w.abs().T) + 1e-30
    excess = ((y - reference).abs() - bound).max().item()
    assert excess <= 0, f"off the reference by {excess:.3g} beyond the float32 bound"


def test_kernels_are_built_here() -> None:
    """This machine (and CI) has a C compiler: the fast path must be live, not silently off."""
    assert kernels.available()
    assert kernels.path() in kernels.PATHS


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("scheme", "zero_point"), SCHEMES, ids=IDS)
def test_every_row_count_matches_the_reference(scheme: str, zero_point: bool, path: str) -> None:
    """R = 1..16 rows, odd O, and for bf16 / int8 an I that leaves a tail after the vector body
    (100 = 3 * 32 + 4; 7 has no vector body at all); 4-bit I must be a multiple of 32."""
    shapes = [(37, 96), (5, 64)] if scheme in ("int4", "mxfp4") else [(37, 100), (3, 7)]
    with _path(path):
        for qw, x, b in _cases(scheme, zero_point, shapes):
            assert qualifies(x, qw, b)
            _assert_matches(linear(x, qw, b), x, qw, b)
            _assert_matches(linear(x, qw), x, qw)


def _cases(scheme: str, zero_point: bool, shapes: list[tuple[int, int]]):
    """(W, x, b) for each (O, I) of `shapes` and each row count of x 1..MAX_ROWS, seeded."""
    for O, I in shapes:
        qw = _weight(scheme, zero_point, O, I, seed=O + I)
        g = torch.Generator().manual_seed(O)
        b = torch.randn(O, generator=g)
        for rows in range(1, MAX_ROWS + 1):
            yield qw, torch.randn(rows, I, generator=g), b


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("scheme", "zero_point"), SCHEMES, ids=IDS)
def test_threads_split_rows_without_changing_a_bit(
    scheme: str, zero_point: bool, path: str
) -> None:
    """A product big enough for OpenMP (>= 65536 weights) gives identical results on 1 and 2
    threads: each output is summed by one thread in a fixed order."""
    qw = _weight(scheme, zero_point, 257, 320, seed=4)
    x = torch.randn(9, 320, generator=torch.Generator().manual_seed(5))
    with _path(path):
        one, two = on_one_and_two_threads(lambda: linear(x, qw))
    assert torch.equal(one, two)
    _assert_matches(one, x, qw)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("scheme", "zero_point"), SCHEMES, ids=IDS)
def test_zero_groups_and_rows(scheme: str, zero_point: bool, path: str) -> None:
    """All-zero rows and groups quantize to zero scales (MXFP4: the smallest, subnormal scale,
    byte 0): the kernels must give exact zeros there, not NaN."""
    w = torch.randn(6, 64, generator=torch.Generator().manual_seed(6))
    w[1] = 0
    w[3, 32:] = 0
    qw = quantize(w, scheme, zero_point=zero_point)
    x = torch.randn(3, 64)
    with _path(path):
        y = linear(x, qw)
    assert torch.equal(y[:, 1], torch.zeros(3))
    _assert_matches(y, x, qw)


@pytest.mark.parametrize("path", PATHS)
def test_every_mxfp4_code_and_extreme_scales(path: str) -> None:
    """Random bytes hit all 16 E2M1 codes (-0 included) in both nibbles; scale bytes from 0
    (2^-127, subnormal) through 1 and 2 to large ones."""
    g = torch.Generator().manual_seed(7)
    data = torch.randint(0, 256, (11, 64), generator=g, dtype=torch.uint8)
    scales = torch.randint(110, 140, (11, 4), generator=g, dtype=torch.uint8)
    scales[0] = torch.tensor([0, 1, 2, 3], dtype=torch.uint8)
    qw = QuantizedWeight("mxfp4", data, scales)
    x = torch.randn(2, 128, generator=g)
    x *= 2.0**90  # lifts the 2^-127 groups' products out of float32's underflow, no overflow
    with _path(path):
        _assert_matches(linear(x, qw), x, qw)


@pytest.mark.parametrize("path", PATHS)
def test_strided_and_batched_inputs(path: str) -> None:
    """x transposed or with leading dims is made contiguous and runs the kernel; one expert of a
    stacked weight (qw[e], contiguous views) runs it too."""
    g = torch.Generator().manual_seed(8)
    stacked = quantize(torch.randn(3, 40, 64, generator=g), "int4", zero_point=True)
    x_t = torch.randn(64, 4, generator=g).t()
    x_b = torch.randn(2, 1, 64, generator=g)
    with _path(path):
        assert qualifies(x_t, stacked[1]) and qualifies(x_b, stacked[2])
        _assert_matches(linear(x_t, stacked[1]), x_t, stacked[1])
        y = linear(x_b, stacked[2])
        assert y.shape == (2, 1, 40)
        _assert_matches(y, x_b, stacked[2])


@pytest.mark.parametrize(
    "case",
    [
        "too many rows",
        "float64 x",
        "x needs grad",
        "stacked weight",
        "strided data",
        "strided scales",
        "float32 scales",
        "broadcast bias",
        "float64 x and bias",
        "offsets on int8",
    ],
)
def test_falls_back_to_the_reference(case: str) -> None:
    g = torch.Generator().manual_seed(9)
    qw = _weight("int4", False, 16, 64, seed=9)
    x, b = torch.randn(4, 64, generator=g), None
    if case == "too many rows":  # a GEMM over the dequantized weight is cheaper
        x = torch.randn(KERNEL_ROWS["int4"] + 1, 64, generator=g)
    elif case == "float64 x":
        x = x.double()
    elif case == "x needs grad":
        x.requires_grad_(True)
    elif case == "stacked weight":
        qw = quantize(torch.randn(2, 16, 64, generator=g), "int4")
    elif case == "strided data":
        wide = _weight("int8", False, 16, 128, seed=9)
        qw = QuantizedWeight("int8", wide.data[:, ::2], wide.scales)
    elif case == "strided scales":
        qw = QuantizedWeight("int4", qw.data, qw.scales.t().contiguous().t())
    elif case == "float32 scales":
        qw = QuantizedWeight("int4", qw.data, qw.scales.float())
    elif case == "broadcast bias":
        b = torch.ones(1)
    elif case == "float64 x and bias":
        x, b = x.double(), torch.ones(16, dtype=torch.float64)
    elif case == "offsets on int8":
        int8 = _weight("int8", False, 16, 64, seed=9)
        qw = QuantizedWeight("int8", int8.data, int8.scales, offsets=qw.scales)
    assert not qualifies(x, qw, b)
    if case == "stacked weight":  # no product with a stacked weight: the reference's error too
        with pytest.raises(RuntimeError):
            linear(x, qw, b)
        return
    if case == "offsets on int8":
        return  # a malformed weight: only that the kernel never reads it
    y = linear(x, qw, b)
    assert torch.equal(y, F.linear(x, qw.dequantize(x.dtype), b))
    assert (y.grad_fn is not None) == (case == "x needs grad")


def test_fake_tensors_never_reach_the_kernel() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    qw = _weight("int8", False, 4, 8, seed=10)
    with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
        y = linear(torch.randn(1, 8), qw)
    assert y.shape == (1, 4)


def test_op_is_a_torch_op_with_a_fake_implementation() -> None:
    """torch.compile and the profiler see moekit::quant_linear."""
    qw = _weight("int4", True, 16, 64, seed=11)
    x, b = torch.randn(2, 64), torch.randn(16)
    args = (x, "int4", qw.data, qw.scales, qw.offsets, b)
    op = torch.ops.moekit.quant_linear.default
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    compiled = torch.compile(op, backend="eager", fullgraph=True)
    with kernels.use_activations("float"):
        _assert_matches(compiled(*args), x, qw, b)
    with torch.profiler.profile() as prof:
        linear(x, qw, b)
    assert "moekit::quant_linear" in {event.name for event in prof.events()}


@contextlib.contextmanager
def _fresh_library():
    """Reload the library inside the block and after it (each load chooses its body afresh)."""
    kernels._library.cache_clear()
    try:
        yield
    finally:
        kernels._library.cache_clear()


def test_no_compiler_means_the_reference(monkeypatch) -> None:
    qw = _weight("mxfp4", False, 16, 64, seed=12)
    x = torch.randn(1, 64)
    with _fresh_library():
        monkeypatch.setenv("CC", "/nonexistent/cc")  # also a new cache key: no cached library
        with pytest.warns(RuntimeWarning, match="could not build its quantized decode kernels"):
            assert not kernels.available()
        assert not qualifies(x, qw)
        assert torch.equal(linear(x, qw), F.linear(x, qw.dequantize()))


def test_moekit_portable_forces_the_portable_body(monkeypatch) -> None:
    with _fresh_library():
        monkeypatch.setenv("MOEKIT_PORTABLE", "1")
        assert kernels.path() == "portable"


def test_source_builds_without_the_x86_intrinsics() -> None:
    """Other CPUs (aarch64, Apple clang) compile only the portable body, as -DMOEKIT_PORTABLE
    does here: it runs, and refuses to be switched to AVX2."""
    lib = _built_with("-DMOEKIT_PORTABLE")
    assert lib.moekit_q_set_path(1) == lib.moekit_q_set_path(2) == -1
    assert lib.moekit_q_set_path(-1) == 0
    _assert_matches(*_int4_product(lib))


def _built_with(flag: str) -> ctypes.CDLL:
    """kernels.c built with one more compiler flag (and -Wall -Werror), loaded apart."""
    flags = (*cbuild.FLAGS_O2, "-Wall", "-Werror", flag)
    return ctypes.CDLL(str(cbuild.build(kernels.SOURCE, flags)))


def _int4_product(lib: ctypes.CDLL) -> tuple[torch.Tensor, torch.Tensor, QuantizedWeight]:
    """y = x @ W^T by `lib`'s moekit_q_linear over an int4 W (24, 96), x (3, 96): (y, x, W)."""
    qw = _weight("int4", False, 24, 96, seed=13)
    x, y = torch.randn(3, 96), torch.empty(3, 24)
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.moekit_q_linear.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, ptr, ptr, i64, ptr, ptr]
    status = lib.moekit_q_linear(
        2, x.data_ptr(), 3, 96, qw.data.data_ptr(), qw.scales.data_ptr(), None, 24, None,
        y.data_ptr(),
    )  # fmt: skip
    assert status == 0
    return y, x, qw


def test_source_builds_without_the_avx512_body() -> None:
    """-DMOEKIT_NO_AVX512 (a compiler that lacks the AVX-512 VNNI intrinsics) leaves the AVX2 and
    portable bodies, and refuses the AVX-512 one."""
    lib = _built_with("-DMOEKIT_NO_AVX512")
    assert lib.moekit_q_set_path(kernels.PATHS.index("avx512")) == -1
    assert lib.moekit_q_set_path(len(kernels.PATHS)) == -1  # no such body
    assert lib.moekit_q_set_path(-1) == (1 if _runs_here("avx2") else 0)
    lib.moekit_q_set_x8(1 << 2)  # int4 on int8 x: the path whose steps the AVX-512 body widens
    _assert_int8_path_matches(*_int4_product(lib))


def test_the_kernel_refuses_what_it_cannot_run() -> None:
    """Called directly (not through `linear`), the op raises with what to do, writing nothing."""
    data = torch.zeros(4, 20, dtype=torch.uint8)  # int4 codes of 40 inputs: not groups of 32
    scales = torch.ones(4, 1, dtype=torch.float16)
    with pytest.raises(ValueError, match="multiple of 32"):
        kernels._linear_cpu(torch.randn(MAX_ROWS + 1, 40), "int4", data, scales, None, None)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("scheme", ["bf16", "int8", "int4", "mxfp4"])
@pytest.mark.parametrize("activations", ["float", "int8"])
def test_more_rows_than_a_pass_run_in_passes(scheme: str, path: str, activations: str) -> None:
    """The kernel takes any number of rows of x (a prompt's) in passes of MAX_ROWS: each pass's
    rows equal a lone call on them, bit for bit, the last pass a short one (45 rows: 16 + 16 + 13;
    O != I, so swapped offsets show); the expert alike."""
    g = torch.Generator().manual_seed(18)
    qw, b = _weight(scheme, False, 48, 64, seed=18), torch.randn(48, generator=g)
    w_in = _weight(scheme, False, 64, 64, seed=19)  # (2F, D), F = 32
    w_out = quantize(torch.randn(64, 32, generator=g), scheme)
    x = torch.randn(45, 64, generator=g)
    args, expert = (qw.scheme, qw.data, qw.scales, qw.offsets, b), (w_in, w_out)

    def expert_call(x_ND: torch.Tensor) -> torch.Tensor:
        w = [t for q in expert for t in (q.scheme, q.data, q.scales, q.offsets)]
        return kernels._swiglu_expert_cpu(x_ND.contiguous(), *w)

    with _path(path, activations):
        passes = [kernels._linear_cpu(x[r : r + MAX_ROWS].contiguous(), *args)
                  for r in range(0, 45, MAX_ROWS)]  # fmt: skip
        assert torch.equal(kernels._linear_cpu(x, *args), torch.cat(passes))
        experts = [expert_call(x[r : r + MAX_ROWS]) for r in range(0, 45, MAX_ROWS)]
        assert torch.equal(expert_call(x), torch.cat(experts))
        y, reference = kernels._linear_cpu(x, *args), F.linear(x, qw.dequantize(), b)
        torch.testing.assert_close(y, reference, rtol=0.05, atol=0.05 * float(x.abs().max()))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("scheme", ["bf16", "int8", "int4", "mxfp4"])
def test_a_prompts_rows_take_the_kernel_up_to_kernel_rows(scheme: str, path: str) -> None:
    """`linear` runs the kernel up to KERNEL_ROWS rows on a SIMD body (beyond, dequantize and a
    GEMM are faster; KERNEL_ROWS_FLOAT_X for 4-bit weights on float x), one pass on the portable
    body."""
    qw = _weight(scheme, False, 48, 64, seed=20)
    with _path(path, "default"):
        expected = MAX_ROWS if path == "portable" else KERNEL_ROWS[scheme]
        assert kernels.kernel_rows(scheme) == expected
        x = torch.randn(expected + 1, 64)
        assert qualifies(x[:expected], qw) and not qualifies(x, qw)
        with kernels.use_activations("float"):
            float_x = kernels.KERNEL_ROWS_FLOAT_X.get(scheme, expected)
            assert kernels.kernel_rows(scheme) == (MAX_ROWS if path == "portable" else float_x)
    assert kernels.kernel_rows(scheme) == KERNEL_ROWS[scheme] or kernels.path() == "portable"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("scheme_in", "scheme_out"), [("int4", "mxfp4"), ("bf16", "int8")])
def test_swiglu_expert_matches_torch(scheme_in: str, scheme_out: str, path: str) -> None:
    """The fused expert (one call, two products and the activation) against linear, silu and
    linear; the weights may be stored in different schemes."""
    g = torch.Generator().manual_seed(15)
    D, F_ = 64, 96
    w_in = quantize(torch.randn(2 * F_, D, generator=g) / D**0.5, scheme_in, zero_point=True)
    w_out = quantize(torch.randn(D, F_, generator=g) / F_**0.5, scheme_out)
    with _path(path):
        for rows in (1, 5, MAX_ROWS):
            x = torch.randn(rows, D, generator=g)
            assert kernels.expert_qualifies(x, w_in, w_out)
            gate, up = F.linear(x, w_in.dequantize()).chunk(2, dim=-1)
            reference = F.linear(F.silu(gate) * up, w_out.dequantize())
            torch.testing.assert_close(
                kernels.swiglu_expert(x, w_in, w_out), reference, rtol=1e-5, atol=1e-5
            )


@pytest.mark.parametrize("activation", ["swiglu", "clamped_swiglu"])
def test_glu_is_the_activation(activation: str) -> None:
    """The C gated activations (the ones the C MoE layers run) against `activate`, with gates and
    ups well past the clamp (limit 1.5), infinities and a NaN, which clamping keeps as torch does;
    gradients and ungated activations run `activate` itself."""
    g = torch.Generator().manual_seed(17)
    h = torch.randn(5, 2 * 40, generator=g) * 4
    h[0, :3] = torch.tensor([float("inf"), -float("inf"), float("nan")])
    h[1, 40:43] = torch.tensor([float("inf"), -float("inf"), float("nan")])
    want = activate(h, activation, 1.3, 1.5)
    got = kernels.glu(h, activation, 1.3, 1.5)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6, equal_nan=True)
    if activation == "clamped_swiglu":
        assert torch.equal(got.isnan(), want.isnan()) and got.isnan().any()
    hg = h.clone().requires_grad_()
    assert kernels.glu(hg, activation, 1.3, 1.5).grad_fn is not None
    assert torch.equal(kernels.glu(h[2:], "gelu"), activate(h[2:], "gelu"))


def test_swiglu_expert_falls_back_and_is_a_torch_op() -> None:
    g = torch.Generator().manual_seed(16)
    w_in = quantize(torch.randn(64, 32, generator=g), "int4")
    w_out = quantize(torch.randn(32, 32, generator=g), "int8")
    x = torch.randn(2, 32, generator=g)
    many = torch.randn(max(KERNEL_ROWS.values()) + 1, 32, generator=g)  # a GEMM's for either
    assert not kernels.expert_qualifies(many, w_in, w_out)
    assert not kernels.expert_qualifies(x, w_in, w_in)  # w_out of the wrong shape
    gate, up = F.linear(many, w_in.dequantize()).chunk(2, dim=-1)
    expected = F.linear(F.silu(gate) * up, w_out.dequantize())
    assert torch.equal(kernels.swiglu_expert(many, w_in, w_out), expected)
    op = torch.ops.moekit.quant_swiglu_expert.default
    args = (x, "int4", w_in.data, w_in.scales, None, "int8", w_out.data, w_out.scales, None)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    with torch.profiler.profile() as prof:
        kernels.swiglu_expert(x, w_in, w_out)
    assert "moekit::quant_swiglu_expert" in {event.name for event in prof.events()}


# ---------------------------------------------------------------- the int8-activation path


def _quantized_x(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (R, I) quantized per block of 32 as the kernels do it, written independently: scale
    d = max|x| / 127, codes round-half-even(x / d); returns (the dequantized x, d per element)."""
    x_B32 = x.unflatten(-1, (-1, 32))
    d = x_B32.abs().amax(-1, keepdim=True) / 127
    codes = torch.round(x_B32 / torch.where(d == 0, torch.ones_like(d), d))
    assert codes.abs().max() <= 127
    return (codes * d).flatten(-2), d.expand_as(x_B32).flatten(-2)


def _assert_int8_path_matches(y, x, qw, b=None) -> None:
    """Tight: y is F.linear(dequantized x, dequantized W, b) up to float32 summation order (the
    integer dots are exact), so `_assert_matches` with the quantized x. Against the float
    reference F.linear(x, W, b): each code is off x by at most half its block's scale d, so
    |y - reference| <= (d / 2) @ |W|^T elementwise, plus the same float32 rounding."""
    x_q, d = _quantized_x(x)
    _assert_matches(y, x_q, qw, b)
    w = qw.dequantize()
    reference = F.linear(x, w, b)
    units = x.shape[-1] // 32 + 16
    rounding = 2 * units * 2.0**-24 * (x.abs() @ w.abs().T)  # _assert_matches' float32 bound
    bound = (d / 2) @ w.abs().T + 2 * rounding + 1e-30  # |x_q| <= 2 |x|: twice it covers the kernel
    excess = ((y - reference).abs() - bound).max().item()
    assert excess <= 0, f"off the float reference by {excess:.3g} beyond the quantization bound"


X8_SCHEMES = SCHEMES[1:]  # bf16 always takes float x
X8_IDS = IDS[1:]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("scheme", "zero_point"), X8_SCHEMES, ids=X8_IDS)
def test_int8_activations_match_the_quantized_reference(
    scheme: str, zero_point: bool, path: str
) -> None:
    """R = 1..16 (both sides of the 8-row blocks), odd O, odd block counts (the AVX2 body takes
    4-bit blocks in pairs), a row with an outlier channel (its
    block's other codes lose precision: the bound still holds), an all-zero row."""
    with _path(path, "int8"):
        shapes = [(37, 96), (5, 64), (3, 32 * 67)]  # 67 blocks: past a 64-block segment
        for qw, x, b in _cases(scheme, zero_point, shapes):
            x[0, 5] = 40.0
            if x.shape[0] > 2:
                x[2] = 0
            _assert_int8_path_matches(linear(x, qw, b), x, qw, b)
            _assert_int8_path_matches(linear(x, qw), x, qw)


@pytest.mark.parametrize("path", PATHS)
def test_int8_activations_leave_int8_tails_to_the_float_path(path: str) -> None:
    """int8 weights with I not a multiple of 32 take the float path (exact to float32)."""
    qw = _weight("int8", False, 9, 100, seed=17)
    x = torch.randn(3, 100, generator=torch.Generator().manual_seed(17))
    with _path(path):
        float_path = linear(x, qw)
        with kernels.use_activations("int8"):
            assert torch.equal(linear(x, qw), float_path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("scheme", "zero_point"), X8_SCHEMES, ids=X8_IDS)
def test_int8_activations_do_not_depend_on_threads(
    scheme: str, zero_point: bool, path: str
) -> None:
    qw = _weight(scheme, zero_point, 257, 320, seed=4)
    x = torch.randn(9, 320, generator=torch.Generator().manual_seed(5))
    with _path(path, "int8"):
        one, two = on_one_and_two_threads(lambda: linear(x, qw))
    assert torch.equal(one, two)
    _assert_int8_path_matches(one, x, qw)


def test_activation_path_choice(monkeypatch) -> None:
    """The default per scheme; set_activations / use_activations switch it (and restore it);
    MOEKIT_QUANT_ACTIVATIONS forces one path for every quantized scheme; bf16 stays float."""
    assert kernels.activations() == kernels.DEFAULT_ACTIVATIONS
    qw = _weight("int4", False, 16, 64, seed=18)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(18))
    with kernels.use_activations("float"):
        assert set(kernels.activations().values()) == {"float"}
        _assert_matches(linear(x, qw), x, qw)
    with kernels.use_activations({"int4": "int8"}):
        assert kernels.activations()["int4"] == "int8"
        _assert_int8_path_matches(linear(x, qw), x, qw)
    assert kernels.activations() == kernels.DEFAULT_ACTIVATIONS
    with pytest.raises(ValueError, match="bf16 takes float x only"):
        kernels.set_activations({"bf16": "int8"})
    with _fresh_library():
        monkeypatch.setenv("MOEKIT_QUANT_ACTIVATIONS", "float")
        assert kernels.available()
        assert set(kernels.activations().values()) == {"float"}
        monkeypatch.delenv("MOEKIT_QUANT_ACTIVATIONS")
    assert kernels.available() and kernels.activations() == kernels.DEFAULT_ACTIVATIONS


@pytest.mark.parametrize("path", PATHS)
def test_swiglu_expert_on_int8_activations(path: str) -> None:
    """The fused expert quantizes each product's x (the activation too) per call."""
    g = torch.Generator().manual_seed(19)
    D, F_ = 64, 96
    w_in = quantize(torch.randn(2 * F_, D, generator=g) / D**0.5, "int4")
    w_out = quantize(torch.randn(D, F_, generator=g) / F_**0.5, "mxfp4")
    x = torch.randn(3, D, generator=g)
    with _path(path, "int8"):
        gate, up = linear(x, w_in).chunk(2, dim=-1)
        expected = linear(F.silu(gate) * up, w_out)
        torch.testing.assert_close(kernels.swiglu_expert(x, w_in, w_out), expected)


def test_bfloat16_activations_run_the_kernel_in_float32(monkeypatch) -> None:
    """A model loaded as it ships (kept MXFP4 experts beside bfloat16 weights) decodes through the
    kernels: x is taken to float32 and the result cast back, not the weight dequantized."""
    qw = quantize(torch.randn(48, 64) * 0.02, "mxfp4")
    x = torch.randn(2, 64).bfloat16()
    bias = torch.randn(48).bfloat16()
    expected = kernels.linear(x.float(), qw, bias.float())
    monkeypatch.setattr(QuantizedWeight, "dequantize", lambda *a: pytest.fail("dequantized"))
    y = kernels.linear(x, qw, bias)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected.bfloat16())


BODY_CASES = [  # where the AVX-512 body has steps of its own: int8 x or int8 weights
    pytest.param(*scheme, a, id=f"{name}-{a}")
    for scheme, name in zip(SCHEMES, IDS, strict=True)
    for a in ("int8", "float")
    if "int8" in (scheme[0], a) and scheme[0] != "bf16"
]


@pytest.mark.parametrize(("scheme", "zero_point", "activations"), BODY_CASES)
def test_avx512_body_is_the_avx2_body_bit_for_bit(
    scheme: str, zero_point: bool, activations: str
) -> None:
    """The AVX-512 body's wide steps put each integer and product in the lanes the AVX2 body does
    and sum them in its order: every row count (both FMA arrangements: 1-4 rows, 5-8), block
    counts with every remainder after the 4-block steps (1, 3, 4, 5, 6, 8, 67, 130), odd O."""
    if not (_runs_here("avx512") and _runs_here("avx2")):
        pytest.skip("this CPU cannot run the AVX-512 body")
    shapes = [(37, 96), (5, 32), (3, 32 * 67), (9, 32 * 5), (11, 32 * 130), (7, 32 * 6)]
    shapes += [(6, 128), (4, 256)]  # whole 4-block steps only
    if scheme == "int8":  # tails after the vector body (with int8 x, they go to the float path)
        shapes += [(37, 100), (3, 7), (6, 32 * 9 + 17)]
    for qw, x, b in _cases(scheme, zero_point, shapes):
        assert qualifies(x, qw, b)
        with kernels.use_activations(activations):
            with kernels.use_path("avx2"):
                expected = linear(x, qw, b)
            with kernels.use_path("avx512"):
                assert torch.equal(linear(x, qw, b), expected), (qw.shape, x.shape[0])
