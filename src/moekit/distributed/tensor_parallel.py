"""`apply_tensor_parallel`: split a built model's attention and FFNs over a tensor-parallel
mesh, from outside the model, on torch's `parallelize_module` (Megatron-LM's layout, Shoeybi et
al. 2019).

For every `Block` of the model (the main stack and the multi-token-prediction blocks):

- attention: q/k/v column-wise (each process computes n_heads / tp query heads and
  n_kv_heads / tp key/value heads: the module's head counts are divided accordingly), o_proj
  row-wise (its partial sums are all-reduced); attention sinks are split by head. The input
  enters as one replicated DTensor, so the backward sums q, k and v's input gradients in one
  all-reduce rather than one each; per-head q/k norms (qk_norm="head") keep one replicated
  weight whose gradient is summed over the group;
- a dense FFN: w_gate and w_up column-wise, w_down row-wise (the same one-input preparation
  measured no fewer backward all-reduces inside the model, 2 per dense block, so it is not
  applied);
- shared experts: the fused [gate; up] input projection column-wise (its rows reordered so that
  each process holds matching gate and up rows, `set_permutation`), the output row-wise; the
  shared-expert gate stays whole;
- routed experts (`split_experts=True`, the ep=1 layout): each expert's hidden dimension is split
  the same way (w_in column-wise, w_out row-wise; `TensorParallelExperts`); otherwise they stay
  whole (expert-parallel, or replicated);
- routers, norms, embeddings and the LM head stay whole on every process.

Activations between blocks are whole (replicated) on every process of the tensor-parallel group;
sequence parallelism is not applied. Checkpoints stay single-process: `shard_specs` records each
split that is not a DTensor.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from moekit.distributed.shard_specs import add_split, set_permutation, split_piece
from moekit.experts import Experts
from moekit.experts.experts import grouped_experts_forward
from moekit.model.attention import Attention
from moekit.model.block import Block, DenseFFN
from moekit.moe import MoELayer


def apply_tensor_parallel(
    model: nn.Module, tp_mesh: DeviceMesh, *, split_experts: bool
) -> nn.Module:
    """Split every block of `model` over the 1-D `tp_mesh` (see the module docstring); returns
    `model`. Every process of the mesh must call it with the same model."""
    tp = tp_mesh.size()
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} contains no Block to make tensor-parallel")
    for block in blocks:
        if not isinstance(block.attn, Attention):
            raise ValueError(
                "tensor parallelism splits multi-head and grouped-query attention; this model "
                "uses multi-head latent attention (MLA): use parallel.tp=1"
            )
    group = tp_mesh.get_group()
    # parallelize_module's replicated parameters (SequenceParallel's) come back trainable
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    for block in blocks:
        _split_attention(block.attn, tp_mesh, group)
        if isinstance(block.ffn, DenseFFN):
            parallelize_module(
                block.ffn,
                tp_mesh,
                {
                    "w_gate": ColwiseParallel(),
                    "w_up": ColwiseParallel(),
                    "w_down": RowwiseParallel(),
                },
            )
        elif isinstance(block.ffn, MoELayer):
            layer = block.ffn
            if layer.shared_experts is not None:
                shared = layer.shared_experts
                if layer.cfg.gated:
                    _interleave_gate_up(shared.w_in, tp)
                parallelize_module(
                    shared, tp_mesh, {"w_in": ColwiseParallel(), "w_out": RowwiseParallel()}
                )
            if split_experts:
                layer.experts = TensorParallelExperts.split(layer.experts, group)
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    return model


def _one_input(n_args: int) -> PrepareModuleInput:
    """The module's first argument as one replicated DTensor (the others untouched), which its
    column-wise projections share: their input gradients are summed over the group once."""
    rest = (None,) * (n_args - 1)
    return PrepareModuleInput(
        input_layouts=(Replicate(), *rest),
        desired_input_layouts=(Replicate(), *rest),
        use_local_output=False,
    )


def _split_attention(attn: Attention, tp_mesh: DeviceMesh, group: ProcessGroup) -> None:
    tp = tp_mesh.size()
    parallelize_module(attn, tp_mesh, _one_input(4))  # x, rope, mask, cache
    plan: dict[str, Any] = {
        "q_proj": ColwiseParallel(),
        "k_proj": ColwiseParallel(),
        "v_proj": ColwiseParallel(),
        "o_proj": RowwiseParallel(),
    }
    if attn.qk_norm == "head":
        # One weight shared by every head, applied here to this process's heads (dim 1 of
        # (B, H, S, hd)): a replicated DTensor, whose gradient is summed over the group.
        per_head = SequenceParallel(sequence_dim=1, use_local_output=True)
        plan |= {"q_norm": per_head, "k_norm": per_head}
    parallelize_module(attn, tp_mesh, plan)
    attn.n_heads //= tp
    attn.n_kv_heads //= tp
    if attn.sinks is not None:
        attn.sinks = nn.Parameter(
            split_piece(attn.sinks.detach(), group, 0), requires_grad=attn.sinks.requires_grad
        )
        add_split(attn, "sinks", group, 0)


def gate_up_order(width: int, tp: int) -> Tensor:
    """The order of a fused [gate (F); up (F)] axis of `width` = 2F that puts each of the tp
    pieces' gate rows next to its up rows: [gate_0; up_0; gate_1; up_1; ...]."""
    f = width // 2 // tp
    pieces = [
        torch.cat([torch.arange(t * f, (t + 1) * f), width // 2 + torch.arange(t * f, (t + 1) * f)])
        for t in range(tp)
    ]
    return torch.cat(pieces)


def _interleave_gate_up(linear: nn.Linear, tp: int) -> None:
    """Reorder a fused [gate; up] projection's output rows (`gate_up_order`), so that
    column-wise pieces hold matching gate and up rows."""
    order = gate_up_order(linear.weight.shape[0], tp)
    with torch.no_grad():
        for name, p in (("weight", linear.weight), ("bias", linear.bias)):
            if p is not None:
                p.copy_(p.index_select(0, order))
                set_permutation(linear, name, 0, order)


class _CopyToGroup(torch.autograd.Function):
    """Identity forward; the gradient is summed over the group (each process's use of a whole
    input is one part of its gradient)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: ProcessGroup) -> Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _SumOverGroup(torch.autograd.Function):
    """The sum of the group's partial outputs forward; every process's part gets the whole
    (replicated) gradient back."""

    @staticmethod
    def forward(ctx: Any, y: Tensor, group: ProcessGroup) -> Tensor:
        y = y.contiguous().clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class TensorParallelExperts(Experts):
    """Routed experts whose hidden dimension is split over a tensor-parallel group: this process
    holds hidden units [t F / tp, (t + 1) F / tp) of every expert (w_in's matching gate and up
    rows, w_out's columns, b_in's entries) and the whole b_out, which is added once after the
    partial outputs are summed. State-dict keys are those of `Experts`."""

    group: ProcessGroup

    @classmethod
    def split(cls, experts: Experts, group: ProcessGroup) -> TensorParallelExperts:
        tp = group.size()
        with torch.device("meta"):
            local = cls(experts.cfg)
        local.group = group
        for name, tensor in experts.named_parameters():
            full = tensor.detach()
            if name in ("w_in", "b_in"):
                if experts.cfg.gated:
                    order = gate_up_order(full.shape[1], tp)
                    full = full.index_select(1, order)
                    set_permutation(local, name, 1, order)
                full = split_piece(full, group, 1)
                add_split(local, name, group, 1)
            elif name == "w_out":
                full = split_piece(full, group, 2)
                add_split(local, name, group, 2)
            else:  # b_out: whole
                full = full.clone()
            setattr(local, name, nn.Parameter(full, requires_grad=tensor.requires_grad))
        local.train(experts.training)
        return local

    def forward(self, x_RD: Tensor, counts_E: Tensor) -> Tensor:
        x_RD = _CopyToGroup.apply(x_RD, self.group)
        part_RD = grouped_experts_forward(
            x_RD, counts_E, self.w_in, self.w_out, self.b_in, None, self.cfg
        )
        y_RD = _SumOverGroup.apply(part_RD, self.group)
        if self.b_out is not None:
            y_RD = y_RD + self.b_out.repeat_interleave(counts_E, dim=0, output_size=len(y_RD))
        return y_RD

    def forward_selected(self, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor) -> Tensor:
        raise NotImplementedError(
            "tensor-parallel experts run training steps; decode from the gathered checkpoint"
        )
