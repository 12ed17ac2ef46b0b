"""CPU decode kernels: a few-row float32 linear (GEMV) and a whole SwiGLU expert, in C
(`decode_kernels.c`), registered as the torch ops `moekit::linear` and `moekit::swiglu_expert`
and swapped into a built model for generation by `apply_decode_kernels(model)`.

A batch-1 decode step is a chain of matrix-vector products, as fast as the weights stream from
memory. On this project's machine (AMD EPYC, 2 cores) torch's F.linear (MKL) streams a (2048, 768)
float32 matrix at 11-12 GB/s, a third of what a plain `sum` reads (33 GB/s); numpy's OpenBLAS
streams 23-25 GB/s on its own, but its thread pool and torch's OpenMP pool then spin on the same
two cores, and a decode step got slower (measured). The kernel reads each weight row once for
every input row, the output rows split over torch's own OpenMP threads.

Built with `cc` through `moekit.cbuild`, not `torch.utils.cpp_extension`: 1.4 s against 62 s for
a minimal C++ op on first use (which also needs ninja and a C++ toolchain), to save about 3.5 us a
call (the C++ op's call took 5.5 us with an empty body; this op's takes 9 us, 5.8 of them the
ctypes call). The ops' fake implementations give `torch.compile` the output shapes. Without a
compiler the kernels are F.linear, their reference (tests/test_cpu_kernels.py).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit import cbuild
from moekit.config import MoEConfig
from moekit.experts.experts import expert_ffn
from moekit.model.transformer import MoETransformer
from moekit.quant import kernels as quant_kernels
from moekit.quant.modules import QuantizedExperts

SOURCE = Path(__file__).with_name("decode_kernels.c")
MAX_ROWS = 16  # the decode path's batch sizes; larger products are GEMMs, MKL's domain

_ops = torch.library.Library("moekit", "DEF")
_ops.define("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
_ops.define("swiglu_expert(Tensor x, Tensor w_in, Tensor w_out) -> Tensor")


def plain_matrix(w: Tensor) -> bool:
    """Whether the kernels read `w` as it is: a plain CPU float32 (O, I), O, I > 0, rows of unit
    stride."""
    return (
        cbuild.plain_cpu(w, torch.float32)
        and w.dim() == 2
        and w.shape[0] > 0
        and w.shape[1] > 0
        and w.stride(1) == 1
    )


def _plain(t: Tensor) -> bool:
    """A plain contiguous CPU float32 tensor (`cbuild.plain_contiguous`)."""
    return cbuild.plain_contiguous(t, torch.float32)


def qualifies(x: Tensor, w: Tensor, b: Tensor | None) -> bool:
    """Whether `linear` runs the kernel: x (..., I) plain CPU float32 with at most MAX_ROWS rows,
    w a `plain_matrix`, b (O,) contiguous, no gradient needed by any of them, the kernel built.
    Anything else is F.linear's."""
    return (
        not (torch.is_grad_enabled() and cbuild.any_requires_grad(x, w, b))
        and cbuild.plain_cpu(x, torch.float32)
        and plain_matrix(w)
        and x.dim() >= 1
        and x.shape[-1] == w.shape[1]
        and x.numel() <= MAX_ROWS * w.shape[1]
        and (b is None or (_plain(b) and b.shape == (w.shape[0],)))
        and available()
    )


def expert_qualifies(x_ND: Tensor, w_in: Tensor, w_out: Tensor) -> bool:
    """Whether `swiglu_expert` runs the kernel: as `qualifies`, x 2-D, both weights contiguous,
    w_in (2F, D) and w_out (D, F)."""
    return (
        x_ND.dim() == 2
        and qualifies(x_ND, w_in, None)
        and not (torch.is_grad_enabled() and cbuild.any_requires_grad(w_out))
        and _plain(w_out)
        and w_out.dim() == 2
        and w_in.is_contiguous()
        and w_in.shape[0] == 2 * w_out.shape[1]
        and w_out.shape[0] == w_in.shape[1]
    )


def linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """F.linear(x (..., I), w (O, I), b (O,)) -> (..., O); the kernel where `qualifies`."""
    if not qualifies(x, w, b):
        return F.linear(x, w, b)
    if x.dim() == 2:  # no views in and out: ~30% less time a call (the routers' products)
        return cbuild.call(_linear_cpu, torch.ops.moekit.linear.default, x.contiguous(), w, b)
    x_RI = x.reshape(-1, w.shape[1]).contiguous()
    y_RO = cbuild.call(_linear_cpu, torch.ops.moekit.linear.default, x_RI, w, b)
    return y_RO.reshape(*x.shape[:-1], w.shape[0])


def swiglu_expert(x_ND: Tensor, w_in: Tensor, w_out: Tensor) -> Tensor:
    """One SwiGLU expert, x (N, D), w_in (2F, D) = [w_gate; w_up], w_out (D, F) -> (N, D):
    F.linear(silu(gate) * up, w_out) with [gate | up] = F.linear(x, w_in), in one kernel call
    where `expert_qualifies` (else exactly that, in torch)."""
    if not expert_qualifies(x_ND, w_in, w_out):
        gate, up = F.linear(x_ND, w_in).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, w_out)
    op = torch.ops.moekit.swiglu_expert.default
    return cbuild.call(_swiglu_expert_cpu, op, x_ND.contiguous(), w_in, w_out)


def kernel_expert_ffn(
    x_ND: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    b_in: Tensor | None,
    b_out: Tensor | None,
    cfg: MoEConfig,
) -> Tensor:
    """`expert_ffn` (one expert on N rows) with the kernels: a SwiGLU expert without biases is one
    `swiglu_expert` call, any other runs its two products through `linear` and a gated
    activation through the quantized kernels' `glu` (the C MoE layers' own)."""
    if cfg.activation == "swiglu" and b_in is None and b_out is None:
        return swiglu_expert(x_ND, w_in, w_out)
    return expert_ffn(
        x_ND, w_in, w_out, b_in, b_out, cfg, linear=linear, activation=quant_kernels.glu
    )


def _sharing(cls: type[nn.Linear], module: nn.Linear) -> nn.Linear:
    """A `cls` holding `module`'s own parameters (nothing is copied)."""
    new = cls(module.in_features, module.out_features, bias=False, device="meta")
    new.weight, new.bias = module.weight, module.bias
    return new.train(module.training)


class KernelLinear(nn.Linear):
    """nn.Linear (same parameters, state dict) whose forward is `linear`: the kernel for the
    few-row no-grad float32 products of decoding on CPU, F.linear otherwise. `sharing(module)`:
    a KernelLinear holding `module`'s own parameters."""

    sharing = classmethod(_sharing)

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def apply_decode_kernels(model: MoETransformer) -> MoETransformer:
    """Swap the kernels into `model` for generation, in place: every nn.Linear becomes a
    `KernelLinear` sharing its parameters, the routers, the experts' decode path (resident or
    offloaded) and a tied LM head run `linear` / `kernel_expert_ffn`; then `apply_decode_glue`.
    Outputs agree with the plain model's to float32 rounding (the sums run in another order).
    Returns `model`; `remove_decode_kernels` undoes both."""
    # here, not at the top: decode_glue builds on this module's KernelLinear and linear
    from moekit.inference.decode_glue import apply_decode_glue

    _use_products(model, nn.Linear, KernelLinear.sharing, linear, kernel_expert_ffn)
    return apply_decode_glue(model)


def remove_decode_kernels(model: MoETransformer) -> MoETransformer:
    """Undo `apply_decode_kernels`: plain nn.Linear, F.linear and `expert_ffn` again."""
    from moekit.inference.decode_glue import remove_decode_glue  # as in apply_decode_kernels

    remove_decode_glue(model)
    _use_products(model, KernelLinear, functools.partial(_sharing, nn.Linear), F.linear, expert_ffn)
    return model


def _use_products(model: MoETransformer, old: type, new, linear_fn, ffn) -> None:
    """Every module of type `old` becomes `new(module)`; the routers, the experts' decode path
    (quantized experts run the quantized kernels) and a tied LM head run `linear_fn` and `ffn`."""
    for name, module in list(model.named_modules()):
        if type(module) is old:
            model.set_submodule(name, new(module))
    for layer in model.moe_layers(with_mtp=True):
        layer.router.linear = linear_fn
        if not isinstance(layer.experts, QuantizedExperts):
            layer.experts.expert_ffn = ffn
    model.tied_head_linear = linear_fn


def _linear_cpu(x_RI: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """x (R, I) contiguous, w (O, I) rows of unit stride, b (O,) contiguous -> (R, O)."""
    R, I = x_RI.shape
    y_RO = x_RI.new_empty(R, w.shape[0])  # on x's device, whatever the default
    _loaded().moekit_linear_f32(
        x_RI.data_ptr(),
        R,
        I,
        w.data_ptr(),
        w.stride(0),
        w.shape[0],
        cbuild.optional_ptr(b),
        y_RO.data_ptr(),
    )
    return y_RO


def _swiglu_expert_cpu(x_ND: Tensor, w_in: Tensor, w_out: Tensor) -> Tensor:
    """x (N, D), w_in (2F, D), w_out (D, F), all contiguous -> (N, D)."""
    N, D = x_ND.shape
    h_NH = x_ND.new_empty(N, w_in.shape[0])
    y_ND = x_ND.new_empty(N, D)
    _loaded().moekit_swiglu_expert_f32(
        x_ND.data_ptr(),
        N,
        D,
        w_in.data_ptr(),
        w_out.shape[1],
        w_out.data_ptr(),
        h_NH.data_ptr(),
        y_ND.data_ptr(),
    )
    return y_ND


_ops.impl("linear", _linear_cpu, "CPU")
_ops.impl("swiglu_expert", _swiglu_expert_cpu, "CPU")


@torch.library.register_fake("moekit::linear")
def _linear_fake(x_RI: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return x_RI.new_empty(x_RI.shape[0], w.shape[0])


@torch.library.register_fake("moekit::swiglu_expert")
def _swiglu_expert_fake(x_ND: Tensor, w_in: Tensor, w_out: Tensor) -> Tensor:
    return x_ND.new_empty(x_ND.shape)


def available() -> bool:
    """Whether the kernel is built and loaded (else `linear` is F.linear)."""
    return _library() is not None


def _loaded() -> ctypes.CDLL:
    library = _library()
    if library is None:
        raise RuntimeError(
            "moekit's CPU decode kernels are not built (see the warning above): call "
            "moekit.inference.decode_kernels.linear, which falls back to F.linear, not the op"
        )
    return library


@functools.cache
def _library() -> ctypes.CDLL | None:
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    return cbuild.load(
        SOURCE,
        {
            "moekit_linear_f32": ([ptr, i64, i64, ptr, i64, i64, ptr, ptr], None),
            "moekit_swiglu_expert_f32": ([ptr, i64, i64, ptr, i64, ptr, ptr, ptr], None),
        },
        what="CPU decode kernels",
        fallback="decoding runs torch's F.linear",
        flags=cbuild.EXACT_FLAGS,  # the bodies' scalar tails round alike (AVX-512 = AVX2)
    )
