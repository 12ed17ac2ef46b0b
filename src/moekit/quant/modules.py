"""A built model's projections swapped for quantized ones, from outside the model:
`quantize_model(model, QuantizeConfig(weights="int4", attention="int8"))`.

Parts, each with its own scheme (`QuantizeConfig`): the routed experts ("experts"), the attention
projections ("attention"), every other projection ("ffn": dense FFN layers, shared experts, the
MTP blocks' input projection) and an untied LM head ("head"). Embeddings, norms, routers and a
shared expert's one-output gate stay as they are: they are small or read one row at a time, and
routing decisions are the most sensitive to error. A tied head stays the embedding.

`QuantizedLinear` and `QuantizedExperts` keep the quantized tensors as buffers (the state dict a
quantized checkpoint stores: "<module>.weight_data", "weight_scales", "weight_offsets"; experts
"w_in_data", ...) and compute through `moekit.quant.kernels.linear`, which is the decode kernel
for a step's or a prompt's rows (up to `kernels.kernel_rows`) and F.linear over the dequantized
weight beyond. They are for inference: nothing in them trains.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import Tensor, nn

from moekit.config import ModelConfig, MoEConfig, QuantizeConfig
from moekit.experts import Experts
from moekit.experts.experts import expert_ffn, selected_experts_forward
from moekit.model.transformer import MoETransformer
from moekit.quant import kernels
from moekit.quant.schemes import (
    QuantizedWeight,
    check_quantizable,
    empty_quantized,
    quantize,
    quantize_into,
)


def _register(module: nn.Module, prefix: str, qw: QuantizedWeight) -> None:
    for name, t in qw.tensors().items():
        module.register_buffer(f"{prefix}_{name}", t)


def _stored(module: nn.Module, prefix: str, scheme: str) -> QuantizedWeight:
    get = module._buffers.get
    return QuantizedWeight(
        scheme, get(f"{prefix}_data"), get(f"{prefix}_scales"), get(f"{prefix}_offsets")
    )


def _frozen(p: Tensor | None) -> nn.Parameter | None:
    return None if p is None else nn.Parameter(p.detach(), requires_grad=False)


class QuantizedLinear(nn.Module):
    """nn.Linear with its weight (O, I) stored as a `QuantizedWeight`; the bias stays float."""

    def __init__(self, weight: QuantizedWeight, bias: Tensor | None = None) -> None:
        super().__init__()
        self.scheme = weight.scheme
        self.out_features, self.in_features = weight.shape
        _register(self, "weight", weight)
        self.bias = _frozen(bias)

    @property
    def weight_q(self) -> QuantizedWeight:
        return _stored(self, "weight", self.scheme)

    def forward(self, x: Tensor) -> Tensor:
        return kernels.linear(x, self.weight_q, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme}"


def quantized_expert_ffn(
    x_ND: Tensor,
    w_in: QuantizedWeight,
    w_out: QuantizedWeight,
    b_in: Tensor | None,
    b_out: Tensor | None,
    cfg: MoEConfig,
) -> Tensor:
    """`expert_ffn` (one expert on N rows) with quantized weights, its products through
    `kernels.linear` and a gated activation through `kernels.glu`; a SwiGLU expert without biases
    in one call (`kernels.swiglu_expert`)."""
    if cfg.activation == "swiglu" and b_in is None and b_out is None:
        return kernels.swiglu_expert(x_ND, w_in, w_out)
    return expert_ffn(
        x_ND, w_in, w_out, b_in, b_out, cfg, linear=kernels.linear, activation=kernels.glu
    )


def experts_on_their_rows(
    x_RD: Tensor, counts_E: Tensor, expert: Callable[[int, Tensor], Tensor]
) -> Tensor:
    """Expert-sorted rows x_RD (R, D) with counts_E (E,) rows per expert -> y_RD (R, D): each
    expert e with rows runs `expert(e, x_ND)` on its own N rows (one expert's weight in use at a
    time). `QuantizedExperts.forward`, and the offloaded quantized experts on each group of experts
    they fetched (`moekit.inference.OffloadedExperts`; e then indexes the group)."""
    pieces, start = [], 0
    for e, count in enumerate(counts_E.tolist()):
        if count:
            pieces.append(expert(e, x_RD[start : start + count]))
            start += count
    return torch.cat(pieces) if pieces else x_RD.new_zeros(0, x_RD.shape[-1])


class QuantizedExperts(nn.Module):
    """Drop-in for `Experts` (inference) with w_in (E, 2F|F, D) and w_out (E, D, F) stored as
    `QuantizedWeight`s; biases stay float. Every expert runs on its own rows (`expert_ffn` over
    the quantized products): the decode path's way, and in prefill only one expert's weight is
    ever dequantized at a time. `Experts` on the dequantized weights is its reference."""

    def __init__(self, experts: Experts, w_in: QuantizedWeight, w_out: QuantizedWeight) -> None:
        super().__init__()
        self.cfg: MoEConfig = experts.cfg
        self.schemes = (w_in.scheme, w_out.scheme)
        _register(self, "w_in", w_in)
        _register(self, "w_out", w_out)
        self.b_in, self.b_out = _frozen(experts.b_in), _frozen(experts.b_out)

    def quantized_weights(self) -> tuple[QuantizedWeight, QuantizedWeight]:
        """(w_in, w_out) of all experts, stacked."""
        return _stored(self, "w_in", self.schemes[0]), _stored(self, "w_out", self.schemes[1])

    def _expert(self, e: int, x_ND: Tensor) -> Tensor:
        w_in, w_out = self.quantized_weights()
        b_in = None if self.b_in is None else self.b_in[e]
        b_out = None if self.b_out is None else self.b_out[e]
        return quantized_expert_ffn(x_ND, w_in[e], w_out[e], b_in, b_out, self.cfg)

    def forward(self, x_RD: Tensor, counts_E: Tensor) -> Tensor:
        """x_RD (R, D) rows sorted by expert, counts_E (E,) rows per expert -> y_RD (R, D)."""
        return experts_on_their_rows(x_RD, counts_E, self._expert)

    def forward_selected(self, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor) -> Tensor:
        """`Experts.forward_selected` (the decode path) over the quantized experts."""
        return selected_experts_forward(x_TD, ids_TK, weights_TK, self._expert)

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"experts={c.n_experts}, d_model={c.d_model}, d_expert={c.d_expert}, "
            f"{c.activation}, w_in {self.schemes[0]}, w_out {self.schemes[1]}"
        )


PARTS = ("experts", "attention", "ffn", "head")  # QuantizeConfig's parts, each its own scheme


def _part_of(name: str, module: nn.Module) -> str | None:
    """The part ("experts", "attention", "ffn", "head") module `name` belongs to, float or
    already quantized; None for a module `quantize_model` leaves alone."""
    if isinstance(module, Experts | QuantizedExperts):
        return "experts"
    linear = type(module) is nn.Linear and not name.endswith("shared_experts.gate")
    if not (linear or isinstance(module, QuantizedLinear)):
        return None
    if name == "lm_head":
        return "head"
    return "attention" if ".attn." in f".{name}." else "ffn"


def parts_of(cfg: ModelConfig) -> set[str]:
    """The parts ("experts", "attention", "ffn", "head") a model of `cfg` has: a dense model has
    no experts, a tied head no head, a model of MoE layers alone without shared experts no ffn."""
    with torch.device("meta"):
        model = MoETransformer(cfg)
    return {part for name, module in model.named_modules() if (part := _part_of(name, module))}


def quantize_model(
    model: MoETransformer, config: QuantizeConfig, *, empty: bool = False
) -> MoETransformer:
    """Swap `model`'s projections for quantized ones in place, each part in the scheme
    `config.scheme_of(part)` gives (None leaves it float); returns `model`. Every weight is
    checked before any is swapped (a scheme that cannot store one -> ValueError naming it).
    `empty`: allocate the quantized tensors without quantizing (to load a quantized checkpoint
    into; the model may be on the meta device).

    Modules already quantized (a quantized run's, GPT-OSS's MXFP4 experts kept as shipped by
    `load_hf(..., keep_quantized=True)`) stay as they are where their part's scheme is theirs;
    another scheme requantizes them one expert at a time (dequantized to float32, then
    quantized), never the whole part in float; None ("none": float) dequantizes them to the
    dtype of the model's embedding."""
    swaps, floats = {}, []
    for name, module in model.named_modules():
        part = _part_of(name, module)
        scheme = None if part is None else config.scheme_of(part)
        if scheme is None:
            if isinstance(module, QuantizedExperts | QuantizedLinear):
                floats.append(name)
            continue
        if isinstance(module, QuantizedExperts):
            weights = module.quantized_weights()
        elif isinstance(module, QuantizedLinear):
            weights = (module.weight_q,)
        else:
            weights = (module.w_in, module.w_out) if part == "experts" else (module.weight,)
        zero_point = config.zero_point and scheme == "int4"
        if all(
            isinstance(w, QuantizedWeight)
            and w.scheme == scheme
            and (w.offsets is not None) == zero_point
            for w in weights
        ):
            continue  # already stored as asked
        for w in weights:
            stored = f"{w.scheme}, " if isinstance(w, QuantizedWeight) else ""
            check_quantizable(w.shape, scheme, f"{name} ({part}, {stored}shape {tuple(w.shape)})")
        swaps[name] = (module, scheme, weights)
    for name, (module, scheme, weights) in swaps.items():
        new_weights = [_stored_as(w, scheme, config.zero_point, empty) for w in weights]
        if isinstance(module, Experts | QuantizedExperts):
            new = QuantizedExperts(module, *new_weights)
        else:
            new = QuantizedLinear(new_weights[0], module.bias)
        model.set_submodule(name, new.train(False))
    for name in floats:
        model.set_submodule(name, _dequantized(model.get_submodule(name), model.embed.weight.dtype))
    return model


def _stored_as(
    w: Tensor | QuantizedWeight, scheme: str, zero_point: bool, empty: bool
) -> QuantizedWeight:
    """`w` (float, or quantized: then one matrix, one expert, at a time dequantized to float32 and
    quantized) stored in `scheme`; `empty`: its storage, uninitialised."""
    if empty or isinstance(w, QuantizedWeight):
        out = empty_quantized(w.shape, scheme, zero_point, device=w.data.device)
        if not empty:
            for index in itertools.product(*map(range, w.shape[:-2])):
                quantize_into(out[index], w[index].dequantize())
        return out
    return quantize(w, scheme, zero_point)


def dequantize_model(model: MoETransformer, dtype: torch.dtype = torch.float32) -> MoETransformer:
    """Undo `quantize_model` with the dequantized weights (computed in float32, kept in `dtype`),
    in place: plain `Experts` and nn.Linear again, e.g. to save a Hugging Face checkpoint.
    Returns `model`."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedExperts | QuantizedLinear):
            model.set_submodule(name, _dequantized(module, dtype))
    return model


def _dequantized(module: QuantizedExperts | QuantizedLinear, dtype: torch.dtype) -> nn.Module:
    """The plain `Experts` or nn.Linear of a quantized module, its weights dequantized to `dtype`
    (its biases as they are), in eval mode."""
    if isinstance(module, QuantizedExperts):
        with torch.device("meta"):
            plain = Experts(module.cfg)
        w_in, w_out = module.quantized_weights()
        plain.w_in, plain.w_out = (nn.Parameter(w.dequantize(dtype)) for w in (w_in, w_out))
        plain.b_in, plain.b_out = module.b_in, module.b_out
    else:
        plain = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
        plain.weight = nn.Parameter(module.weight_q.dequantize(dtype))
        plain.bias = module.bias
    return plain.train(False)
