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
- a dense FFN: w_gate and w_up column-wise, w_down row-wise (the one-input preparation measured
  no fewer backward all-reduces here, so it is not applied);
- shared experts: the fused [gate; up] input projection column-wise (its rows reordered so that
  each process holds matching gate and up rows, `set_permutation`), the output row-wise; the
  shared-expert gate stays whole;
- routed experts (`split_experts=True`, the ep=1 layout): each expert's hidden dimension is split
  the same way (`TensorParallelExperts`); otherwise they stay whole;
- routers, norms, embeddings and the LM head stay whole on every process.

With `sequence_parallel=True` (Megatron-LM's sequence parallelism, as torchtitan's
`parallelize_llama` applies it) each process holds positions [t S / tp, (t + 1) S / tp) of the
residual stream between blocks, instead of the whole of it:

- the RMSNorms run on that shard (`SequenceParallel`: replicated weights, gradients summed over
  the group); attention's and a dense FFN's inputs are all-gathered and their row-wise outputs
  reduce-scattered: each all-reduce becomes a reduce-scatter and an all-gather of the same bytes;
- an MoE layer all-gathers its input too, so its router sees every token and routing, capacity
  and balance statistics are those of one process (as torchtitan does); see
  `_sequence_parallel_moe` for its output;
- the model's first block (and each MTP block) takes its shard of the replicated embeddings; the
  final norm (and each MTP depth's) gathers the whole sequence back for the LM head, the loss and
  the next MTP depth (torchtitan splits the head column-wise instead, which all-gathers the
  (T, V) logits unless the loss is computed in parallel too).

Checkpoints stay single-process: `shard_specs` records each split that is not a DTensor.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from moekit.config import ParallelConfig
from moekit.distributed.shard_specs import add_split, set_permutation, split_piece
from moekit.experts import Experts
from moekit.experts.experts import grouped_experts_forward
from moekit.model.attention import Attention
from moekit.model.block import Block, DenseFFN
from moekit.model.transformer import MoETransformer
from moekit.moe import MoELayer


def apply_tensor_parallel(
    model: nn.Module,
    tp_mesh: DeviceMesh,
    *,
    split_experts: bool,
    sequence_parallel: bool = False,
) -> nn.Module:
    """Split every block of `model` over the 1-D `tp_mesh` (see the module docstring); returns
    `model`. `sequence_parallel` also splits the residual stream and the norms along the
    sequence (an `MoETransformer` only). Every process of the mesh must call it with the same
    model."""
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
    if sequence_parallel and not isinstance(model, MoETransformer):
        raise ValueError(
            f"sequence parallelism splits an MoETransformer's residual stream, not a "
            f"{type(model).__name__}'s: use parallel.sequence_parallel=false"
        )
    # parallelize_module's replicated parameters (SequenceParallel's) come back trainable
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    stream = Shard(1) if sequence_parallel else Replicate()  # the residual stream's placement
    for block in blocks:
        _split_attention(block.attn, tp_mesh, stream)
        if sequence_parallel:
            norms = {"attn_norm": SequenceParallel(), "ffn_norm": SequenceParallel()}
            parallelize_module(block, tp_mesh, norms)
        if isinstance(block.ffn, DenseFFN):
            if sequence_parallel:
                parallelize_module(block.ffn, tp_mesh, _replicated_input(1, stream))
            plan = {
                "w_gate": ColwiseParallel(),
                "w_up": ColwiseParallel(),
                "w_down": RowwiseParallel(output_layouts=stream),
            }
            parallelize_module(block.ffn, tp_mesh, plan)
        elif isinstance(block.ffn, MoELayer):
            layer = block.ffn
            # Under sequence parallelism, shared experts without a gate keep partial sums
            # (the gate's weight would need its gradient summed over the group).
            shared = layer.shared_experts
            partial_shared = sequence_parallel and shared is not None and shared.gate is None
            if shared is not None:
                if layer.cfg.gated:
                    with torch.no_grad():
                        for name, p in shared.w_in.named_parameters():  # weight, bias
                            p.copy_(_interleave_gate_up(shared.w_in, name, p, 0, tp))
                out = Partial() if partial_shared else Replicate()
                plan = {"w_in": ColwiseParallel(), "w_out": RowwiseParallel(output_layouts=out)}
                parallelize_module(shared, tp_mesh, plan)
            if split_experts:
                layer.experts = TensorParallelExperts.split(layer.experts, tp_mesh)
            if sequence_parallel:
                _sequence_parallel_moe(layer, tp_mesh, partial_shared)
    if sequence_parallel:
        _sequence_boundaries(model, tp_mesh)
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    return model


def _replicated_input(n_args: int, stream: Placement) -> PrepareModuleInput:
    """The module's first argument as one replicated DTensor (the others untouched), which its
    column-wise projections share, so their input gradients are summed over the group once; with
    `stream` Shard(1) (sequence parallelism) it arrives as this process's positions and is
    all-gathered (the backward reduce-scatters its gradient)."""
    rest = (None,) * (n_args - 1)
    return PrepareModuleInput(
        input_layouts=(stream, *rest),
        desired_input_layouts=(Replicate(), *rest),
        use_local_output=False,
    )


def _split_attention(attn: Attention, tp_mesh: DeviceMesh, stream: Placement) -> None:
    tp, group = tp_mesh.size(), tp_mesh.get_group()
    # x, rope, mask, cache
    parallelize_module(attn, tp_mesh, _replicated_input(4, stream))
    plan: dict[str, Any] = {
        "q_proj": ColwiseParallel(),
        "k_proj": ColwiseParallel(),
        "v_proj": ColwiseParallel(),
        "o_proj": RowwiseParallel(output_layouts=stream),
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


def _sequence_parallel_moe(layer: MoELayer, tp_mesh: DeviceMesh, partial_shared: bool) -> None:
    """An MoE layer between sequence shards: its input all-gathered (the router sees every
    token), its output reduce-scattered when `partial_shared` (the shared experts' partial sums
    and, from the first process only, the routed output), else cut to this process's shard.

    The backward mirrors it. With partial shared experts every process's input gradient is a
    part of the whole: the shared experts' own, plus, on the first process only, that of the
    router and the routed experts (computed whole, the same on every process); the parts are
    reduce-scattered. Otherwise the input gradient is whole on every process and each keeps its
    shard."""
    group = tp_mesh.get_group()
    held: dict[str, Tensor] = {}  # this call's gathered input and shared-expert output

    def gather(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, tp_mesh, (Shard(1),), run_check=False)
        grads = (Partial(),) if partial_shared else None
        whole = x.redistribute(tp_mesh, (Replicate(),)).to_local(grad_placements=grads)
        if not partial_shared:
            return (whole, *args[1:])
        held["input"] = whole
        return (_GradOnFirst.apply(whole, group), *args[1:])

    def scatter(module: nn.Module, args: tuple, output: tuple) -> tuple:
        y, aux = output
        placement: Any = Replicate()
        if partial_shared:
            shared = held.pop("shared").view_as(y)
            held.clear()
            y, placement = _RoutedOnFirst.apply(y, shared, group), Partial()
        y = DTensor.from_local(y, tp_mesh, (placement,), run_check=False)
        return y.redistribute(tp_mesh, (Shard(1),)).to_local(), aux

    layer.register_forward_pre_hook(gather)
    layer.register_forward_hook(scatter)
    if not partial_shared:
        return
    shared = layer.shared_experts

    def shared_input(module: nn.Module, args: tuple) -> tuple:
        # the gathered input itself, not the layer's (whose gradient only the first keeps)
        return (held["input"].reshape(args[0].shape), *args[1:])

    def partial_grads(module: nn.Module, args: tuple) -> tuple:
        # one replicated input whose gradient stays partial (reduce-scattered with the layer's)
        x = DTensor.from_local(
            args[0], tp_mesh, (Replicate(),), run_check=False, grad_placements=(Partial(),)
        )
        return (x, *args[1:])

    def keep_output(module: nn.Module, args: tuple, output: Tensor) -> None:
        held["shared"] = output

    shared.register_forward_pre_hook(shared_input)
    shared.w_in.register_forward_pre_hook(partial_grads, prepend=True)
    shared.register_forward_hook(keep_output)


def _sequence_boundaries(model: MoETransformer, tp_mesh: DeviceMesh) -> None:
    """Where the residual stream enters its sequence shards (the first block of the model and of
    each MTP depth) and leaves them (the final norms, which all-gather their output)."""
    check = ParallelConfig(tp=tp_mesh.size(), sequence_parallel=True)

    def enter(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        check.check_seq_len(x.shape[1], "input_ids.shape[1]")
        x = DTensor.from_local(x, tp_mesh, (Replicate(),), run_check=False)
        return (x.redistribute(tp_mesh, (Shard(1),)).to_local(), *args[1:])

    def leave(module: nn.Module, args: tuple, output: DTensor) -> Tensor:
        # a copy: to_local's view, returned by the model (ModelOutput.hidden), would make FSDP2
        # warn about in-place changes to it
        return output.redistribute(tp_mesh, (Replicate(),)).to_local().clone()

    firsts: list[nn.Module] = [model.layers[0], *(depth.block for depth in model.mtp)]
    for block in firsts:
        block.register_forward_pre_hook(enter)
    for norm in [model.norm, *(depth.norm for depth in model.mtp)]:
        parallelize_module(norm, tp_mesh, SequenceParallel(use_local_output=False))
        norm.register_forward_hook(leave)


class _GradOnFirst(torch.autograd.Function):
    """Identity forward; the gradient, whole and the same on every process of the group, is kept
    on its first process and zero on the others: one part of a sum over the group."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: ProcessGroup) -> Tensor:
        ctx.first = dist.get_rank(group) == 0
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return (grad if ctx.first else torch.zeros_like(grad)), None


class _RoutedOnFirst(torch.autograd.Function):
    """An MoE layer's output y = routed + shared, with the routed part whole on every process
    and the shared part this process's partial sum, as one part of a sum over the group: y on
    the first process, `shared` on the others. Every process's y (routed and shared alike) gets
    the whole gradient back."""

    @staticmethod
    def forward(ctx: Any, y: Tensor, shared: Tensor, group: ProcessGroup) -> Tensor:
        return y.view_as(y) if dist.get_rank(group) == 0 else shared.detach().clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return grad, None, None


def _interleave_gate_up(module: nn.Module, name: str, full: Tensor, dim: int, tp: int) -> Tensor:
    """`full`, the fused [gate (F); up (F)] axis `dim` of `module.<name>`, reordered so that each
    of its tp pieces holds its gate rows next to its up rows, [gate_0; up_0; gate_1; up_1; ...]
    (recorded by `set_permutation`)."""
    order = torch.arange(full.shape[dim]).view(2, tp, -1).transpose(0, 1).reshape(-1)
    set_permutation(module, name, dim, order)
    return full.index_select(dim, order)


class TensorParallelExperts(Experts):
    """Routed experts whose hidden dimension is split over a tensor-parallel mesh: this process
    holds hidden units [t F / tp, (t + 1) F / tp) of every expert (w_in's matching gate and up
    rows, w_out's columns, b_in's entries) and the whole b_out, which is added once after the
    partial outputs are summed. State-dict keys are those of `Experts`."""

    tp_mesh: DeviceMesh

    @classmethod
    def split(cls, experts: Experts, tp_mesh: DeviceMesh) -> TensorParallelExperts:
        group = tp_mesh.get_group()
        with torch.device("meta"):
            local = cls(experts.cfg)
        local.tp_mesh = tp_mesh
        for name, tensor in experts.named_parameters():
            full = tensor.detach()
            if name == "b_out":  # whole
                full = full.clone()
            else:  # the hidden units: w_in's and b_in's dim 1, w_out's dim 2
                dim = 2 if name == "w_out" else 1
                if experts.cfg.gated and dim == 1:
                    full = _interleave_gate_up(local, name, full, 1, group.size())
                full = split_piece(full, group, dim)
                add_split(local, name, group, dim)
            setattr(local, name, nn.Parameter(full, requires_grad=tensor.requires_grad))
        local.train(experts.training)
        return local

    def forward(self, x_RD: Tensor, counts_E: Tensor) -> Tensor:
        # x_RD is whole on every process: its gradient is the sum of theirs (an all-reduce)
        x_RD = DTensor.from_local(x_RD, self.tp_mesh, (Replicate(),), run_check=False)
        x_RD = x_RD.to_local(grad_placements=(Partial(),))
        part_RD = grouped_experts_forward(
            x_RD, counts_E, self.w_in, self.w_out, self.b_in, None, self.cfg
        )
        # the partial outputs summed (an all-reduce); each gets the whole gradient back
        y_RD = DTensor.from_local(part_RD, self.tp_mesh, (Partial(),), run_check=False)
        y_RD = y_RD.redistribute(self.tp_mesh, (Replicate(),)).to_local()
        if self.b_out is not None:
            y_RD = y_RD + self.b_out.repeat_interleave(counts_E, dim=0, output_size=len(y_RD))
        return y_RD

    def forward_selected(self, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor) -> Tensor:
        raise NotImplementedError(
            "tensor-parallel experts run training steps; decode from the gathered checkpoint"
        )
