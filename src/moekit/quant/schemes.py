"""Weight-only quantization schemes: how a float weight (..., O, I) in nn.Linear layout is stored,
and the reference quantizer and dequantizer of each. The decode kernels (`quant/kernels.py`) read
these layouts as they are; `dequantize` is their reference.

| scheme | data                 | scales                 | offsets              | bits/weight |
|--------|----------------------|------------------------|----------------------|-------------|
| bf16   | bfloat16 (..., O, I)  | -                      | -                    | 16          |
| int8   | int8 (..., O, I)      | float32 (..., O)       | -                    | 8           |
| int4   | uint8 (..., O, I/2)   | float16 (..., O, I/32) | float16 or none      | 4.5 (5)     |
| mxfp4  | uint8 (..., O, I/2)   | uint8 (..., O, I/32)   | -                    | 4.25        |

- int8: symmetric per output channel, w = scales[o] * q, q in [-127, 127].
- int4: groups of 32 along I. Symmetric (llama.cpp's q4_0 rule): the group's value of largest
  magnitude m maps to -8, d = m / -8, q = clamp(round(w / d), -8, 7) stored as q + 8, and
  w = d * (nibble - 8). With a zero point (`zero_point=True`, q4_1's rule): d = (max - min) / 15,
  nibble = round((w - min) / d), w = d * nibble + min; `offsets` holds min.
- mxfp4 (OCP Microscaling, as GPT-OSS ships its experts): groups of 32 share a power-of-two scale
  stored as a biased exponent byte (2^(byte - 127), E8M0); each element is an E2M1 code (bit 3 the
  sign, bits 0-2 index [0, 0.5, 1, 1.5, 2, 3, 4, 6]).
- Nibble order (int4 and mxfp4, GPT-OSS's order): byte j of a row holds element 2j in its low
  nibble and element 2j + 1 in its high nibble.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from moekit.userfiles import SLICE_BYTES

SCHEMES = ("bf16", "int8", "int4", "mxfp4")
GROUP = 32  # int4 and mxfp4 group size along the input axis
# The 16 E2M1 codes' values: bit 3 is the sign.
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_VALUES = E2M1_MAGNITUDES + tuple(-v for v in E2M1_MAGNITUDES)
E8M0_BIAS = 127


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight (..., O, I) stored in one of `SCHEMES` (layouts in the module docstring). Leading
    dimensions stack experts: `qw[e]` is expert e's (O, I) weight, its tensors views."""

    scheme: str
    data: Tensor
    scales: Tensor | None = None
    offsets: Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        """The float weight's shape (..., O, I)."""
        if self.scheme in ("int4", "mxfp4"):
            return torch.Size((*self.data.shape[:-1], self.data.shape[-1] * 2))
        return self.data.shape

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict[str, Tensor]:
        """{"data": ..., "scales": ..., "offsets": ...}, the ones present (what a file stores)."""
        named = {"data": self.data, "scales": self.scales, "offsets": self.offsets}
        return {name: t for name, t in named.items() if t is not None}

    def __getitem__(self, index) -> QuantizedWeight:
        """Index the leading (stacking) dimensions of every tensor alike."""
        return replace(self, **{name: t[index] for name, t in self.tensors().items()})

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The float weight (..., O, I) in `dtype`: the reference every kernel is held to."""
        return dequantize(self, dtype)


def check_quantizable(shape: tuple[int, ...] | torch.Size, scheme: str, name: str = "the weight"):
    """Raise ValueError naming `name` if a weight of `shape` cannot be stored in `scheme`."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r} for {name}: use one of {SCHEMES}")
    if len(shape) < 2:
        raise ValueError(f"{name} has shape {tuple(shape)}: only matrices (..., O, I) quantize")
    if scheme in ("int4", "mxfp4") and shape[-1] % GROUP:
        raise ValueError(
            f"{name} has {shape[-1]} input features, not a multiple of {GROUP}: {scheme} "
            f"quantizes groups of {GROUP}; store it as int8 or bf16 instead"
        )


def quantize(w: Tensor, scheme: str, zero_point: bool = False) -> QuantizedWeight:
    """Quantize a float weight w (..., O, I) to `scheme` (`zero_point`: int4 only)."""
    check_quantizable(w.shape, scheme)
    w = w.detach().float()
    if scheme == "bf16":
        return QuantizedWeight("bf16", w.to(torch.bfloat16))
    if scheme == "int8":
        scales = w.abs().amax(-1) / 127
        q = torch.round(w / _nonzero(scales)[..., None]).clamp(-127, 127)
        return QuantizedWeight("int8", q.to(torch.int8), scales)
    w_G32 = w.unflatten(-1, (-1, GROUP))
    if scheme == "mxfp4":
        return _quantize_mxfp4(w_G32)
    if zero_point:
        low, high = w_G32.amin(-1), w_G32.amax(-1)
        scales = ((high - low) / 15).half()
        offsets = low.half()
        q = torch.round((w_G32 - offsets.float()[..., None]) / _nonzero(scales.float())[..., None])
        return QuantizedWeight("int4", _pack(q.clamp(0, 15).flatten(-2)), scales, offsets)
    largest = w_G32.gather(-1, w_G32.abs().argmax(-1, keepdim=True)).squeeze(-1)
    scales = (largest / -8).half()
    q = torch.round(w_G32 / _nonzero(scales.float())[..., None]).clamp(-8, 7) + 8
    return QuantizedWeight("int4", _pack(q.flatten(-2)), scales)


def quantize_into(dest: QuantizedWeight, w: Tensor) -> None:
    """Quantize the float weight w (..., O, I) into the storage `dest` of its shape, in dest's
    scheme (int4 with a zero point where dest has offsets), one matrix and at most SLICE_BYTES of
    its rows in float32 at a time (every scheme quantizes rows independently, so the result is
    the one `quantize(w, ...)` gives at once)."""
    if tuple(dest.shape) != tuple(w.shape):
        raise ValueError(f"a {tuple(w.shape)} weight does not fit {dest.scheme} storage of "
                         f"{tuple(dest.shape)}")  # fmt: skip
    if w.dim() > 2:
        for e in range(w.shape[0]):
            quantize_into(dest[e], w[e])
        return
    step = max(1, SLICE_BYTES // 4 // max(w.shape[-1], 1))
    for start in range(0, w.shape[0], step):
        rows = slice(start, start + step)
        q = quantize(w[rows], dest.scheme, zero_point=dest.offsets is not None).tensors()
        for name, t in dest[rows].tensors().items():
            t.copy_(q[name])


def _quantize_mxfp4(w_G32: Tensor) -> QuantizedWeight:
    """OCP MX: shared exponent floor(log2(amax)) - 2 (E2M1's largest exponent), each element
    rounded to the nearest E2M1 value (saturating at 6)."""
    amax = w_G32.abs().amax(-1)
    exponent = torch.floor(torch.log2(amax.clamp(min=2.0**-126))) - 2
    exponent = exponent.clamp(-E8M0_BIAS, E8M0_BIAS)
    scaled = w_G32 / torch.exp2(exponent)[..., None]
    magnitudes = torch.tensor(E2M1_MAGNITUDES, device=w_G32.device)
    midpoints = (magnitudes[1:] + magnitudes[:-1]) / 2
    code = torch.bucketize(scaled.abs(), midpoints) + 8 * (scaled < 0)
    scales = (exponent + E8M0_BIAS).to(torch.uint8)
    return QuantizedWeight("mxfp4", _pack(code.flatten(-2)), scales)


def empty_quantized(
    shape: tuple[int, ...] | torch.Size,
    scheme: str,
    zero_point: bool = False,
    device: torch.device | str = "cpu",
) -> QuantizedWeight:
    """Uninitialised storage of a weight of `shape` (..., O, I) in `scheme`, to load into: the
    layout `quantize` gives, worked out on the meta device."""
    layout = quantize(torch.empty(shape, device="meta"), scheme, zero_point)
    return replace(
        layout,
        **{
            k: torch.empty(t.shape, dtype=t.dtype, device=device)
            for k, t in layout.tensors().items()
        },
    )


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> Tensor:
    """The float weight (..., O, I) of `qw`, computed in float32 and returned in `dtype`."""
    if qw.scheme == "bf16":
        return qw.data.to(dtype)
    if qw.scheme == "int8":
        return (qw.data.float() * qw.scales[..., None]).to(dtype)
    q_G32 = _unpack(qw.data).unflatten(-1, (-1, GROUP))
    if qw.scheme == "mxfp4":
        values = torch.tensor(E2M1_VALUES, device=q_G32.device)[q_G32.long()]
        w_G32 = values * torch.exp2(qw.scales.float() - E8M0_BIAS)[..., None]
    elif qw.offsets is None:
        w_G32 = (q_G32.float() - 8) * qw.scales.float()[..., None]
    else:
        w_G32 = q_G32.float() * qw.scales.float()[..., None] + qw.offsets.float()[..., None]
    return w_G32.flatten(-2).to(dtype)


def _pack(q: Tensor) -> Tensor:
    """Nibbles (..., I) in [0, 15] -> bytes (..., I/2), element 2j low, 2j + 1 high."""
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def _unpack(data: Tensor) -> Tensor:
    """Bytes (..., I/2) -> nibbles (..., I) as uint8, `_pack`'s inverse."""
    return torch.stack((data & 15, data >> 4), dim=-1).flatten(-2)


def _nonzero(scales: Tensor) -> Tensor:
    """Scales with zeros replaced by 1: an all-zero group quantizes to zeros, not NaN."""
    return torch.where(scales == 0, torch.ones_like(scales), scales)
