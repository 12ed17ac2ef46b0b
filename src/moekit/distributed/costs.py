"""What one device holds and sends per training step under a layout (`moekit params --tp --ep
--dp-shard`): arithmetic only, from the model's parameter shapes (built on the meta device, parts
as `moekit.model.params` names them) and `ParallelConfig.sizes`.

Memory per device
    parameters: the persistent shard of every parameter, in float32 (with param_dtype="bfloat16"
        FSDP2's float32 shard is the master copy and the bfloat16 copies are transient).
        Sharding: tensor parallelism splits attention q/k/v (colwise) and o (rowwise), dense FFNs
        and shared experts (colwise in, rowwise out; row-wise biases and the shared-expert gate
        stay whole), and with ep=1 the routed experts on their hidden dimension; expert
        parallelism splits the routed experts into E / ep per process; FSDP2 then splits dim 0 of
        what is left over dp_shard (edp_shard for routed experts) in chunks of ceil(d0 / n) (the
        last ranks may hold less; the collectives move the padded chunk).
    gradients: the same shard in float32 (FSDP2 reduces in float32). Under DDP (dp_shard = tp = 1)
        DDP's buckets hold a second float32 copy of every gradient it all-reduces.
    optimizer: AdamW's two float32 moments per local parameter element.
    gathered: the transient unsharded parameters (param_dtype) at the peak: with
        reshard_after_forward the root unit and the two largest block units (one running, one
        prefetched); without it every unit (all stay gathered from the forward to the backward).
    activations: the tensors autograd saves for the backward of one micro-batch (T = micro_batch *
        seq_len tokens, element size a = that of param_dtype), per block
            attention  3*T*D (the norm's input, input * rsqrt(mean square), output)
                       + T*(H + 2*KV)*hd/tp (q, k, v) + 2*T*H*hd/tp (attention output and its
                       reshaped copy for o_proj)
            FFN norm   3*T*D
            dense FFN  4*T*F/tp (gate, silu(gate), up, their product)
            MoE        2*T*E (router logits, probabilities) + R*(2*D + 3*F/tp') (rows gathered
                       for the experts, [gate|up], product, expert outputs: the fused SwiGLU
                       keeps only [gate|up]) with R = T*top_k rows (dropless; the bound under
                       capacity dispatch), tp' = tp when ep=1 else 1; shared experts 3*T*Fs/tp
        plus the head: 3*T*D (final norm) and T*V float32 (the log-softmax the loss keeps). With
        sequence parallelism each RMSNorm saves its input and normalised input on this process's
        T/tp positions and the next projections the all-gathered output: 2*T*D/tp + T*D instead
        of 3*T*D (4 gloo processes, tiny preset, tp=4, 2 x 64 tokens: 186,636 bytes fewer saved,
        186,240 predicted with the norm statistics). Small terms (norm statistics, indices,
        routing weights) are left out; `tests/test_params.py` holds the estimate to the tensors
        autograd saves on CPU. The backward's temporaries come on top: the CPU allocator's peak
        during a forward and backward (the gradients already allocated) was 1.34x the estimate
        for tiny and 1.61x for small.

Communication per step (one forward and backward of a micro-batch)
    Two figures per collective kind: `payload`, the bytes of the tensors this process hands to
    the collective (the input of an all-gather, all-to-all or all-reduce, the full input of a
    reduce-scatter: what `count.CollectiveCounter` sees, and what the tests check), and `sent`,
    the bytes this process puts on the network (`SENT_PER_BYTE`).

    fsdp_all_gather   per FSDP unit on a group of n > 1: once in the forward, and again in the
                      backward with reshard_after_forward (not the root unit, which
                      `apply_fully_shard` keeps gathered for its backward); input = the padded
                      local chunks in param_dtype.
    fsdp_reduce_scatter  per unit once in the backward, float32, input = n * padded chunks.
    dp_all_reduce     HSDP: per unit one all-reduce of the reduced float32 chunk over
                      dp_replicate (edp_replicate for routed experts). DDP (dp_shard = tp = 1):
                      every non-expert gradient over all processes (in DDP's buckets: about one
                      call for the first MiB, then one per 25 MiB), and the routed experts' over
                      their edp_replicate copies (one call).
    tp_all_reduce     one (T, D) all-reduce in the forward per row-wise output (attention's
                      o_proj, a dense FFN's w_down, the shared experts' w_out) and one in the
                      backward per column-wise input gradient: attention's q, k and v share one
                      replicated input (one), a dense FFN's gate and up measure one each (two),
                      the shared experts one (fused [gate; up]); with ep=1 the routed experts
                      add one (R, D) all-reduce forward (output) and one backward (input
                      gradient); per-head q/k norms add two (head_dim) for their weights'
                      gradients.
    tp_all_gather, tp_reduce_scatter
                      with sequence parallelism the (T, D) all-reduces of attention, dense FFNs
                      and shared experts become a reduce-scatter (input T*D) and an all-gather
                      (input T*D/tp): attention and a dense FFN gather their input and
                      reduce-scatter their output forward, and the reverse backward (2 + 2 each:
                      a dense FFN's gate and up share one reduce-scatter); an MoE layer gathers
                      its input forward and its output's gradient backward (2 all-gathers) and,
                      with shared experts without a gate, reduce-scatters its output and its
                      input gradient (2); a gated shared expert keeps its two all-reduces. The
                      sequence enters its shards at the first block (the backward all-gathers
                      the gradient) and leaves them at the final norm (an all-gather forward),
                      once more per MTP depth; every sequence-parallel RMSNorm adds one
                      all-reduce of its weight's gradient (D, in tp_all_reduce).
    ep_all_to_all     per MoE layer: the counts exchange (E int64) and four exchanges of R rows
                      of D (dispatch and combine, forward and backward). The figure holds
                      exactly for the dispatch forward and combine backward (T*top_k rows); the
                      other two hand in the rows the process's experts received, which sum to
                      the same over the ep group. Capacity dispatch hands in at most this.
    Left out: collectives on a group of one process (they send nothing), and the MoE layers'
    balance statistics (a float64 vector of a few E per layer: per expert, not per token).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

from moekit.config import ModelConfig, ParallelConfig
from moekit.model.params import part_of
from moekit.model.transformer import MoETransformer

KINDS = (
    "fsdp_all_gather",
    "fsdp_reduce_scatter",
    "dp_all_reduce",
    "tp_all_reduce",
    "tp_all_gather",
    "tp_reduce_scatter",
    "ep_all_to_all",
)
# Bytes a process sends per byte it hands to a collective on a group of n: by a ring, or for an
# all-to-all the rows that leave the process under balanced routing.
SENT_PER_BYTE = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather": lambda n: n - 1,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_to_all": lambda n: (n - 1) / n,
}
FLOAT32 = 4
DDP_FIRST_BUCKET, DDP_BUCKET = 2**20, 25 * 2**20  # torch's DistributedDataParallel defaults
INT64 = 8
# Colwise: split on the output features (dim 0 of an nn.Linear weight, its bias); rowwise: on
# the input features (dim 1 of the weight; the bias stays whole).
_TP_DIM = {
    "attention": {"q_proj.weight": 0, "q_proj.bias": 0, "k_proj.weight": 0, "k_proj.bias": 0,
                  "v_proj.weight": 0, "v_proj.bias": 0, "o_proj.weight": 1, "sinks": 0},
    "dense_ffn": {"w_gate.weight": 0, "w_up.weight": 0, "w_down.weight": 1},
    "shared_experts": {"w_in.weight": 0, "w_in.bias": 0, "w_out.weight": 1},
    "routed_experts": {"w_in": 1, "b_in": 1, "w_out": 2},
}  # fmt: skip


@dataclass
class Comm:
    """One kind of collective per step: calls, bytes handed in (`payload`) and bytes sent
    (`sent`, `SENT_PER_BYTE` of the payload)."""

    collective: str  # a key of SENT_PER_BYTE
    calls: int = 0
    payload: float = 0.0
    sent: float = 0.0

    def add(self, calls: int, payload: float, n: int) -> None:
        """`calls` calls, each handed `payload` bytes, on a group of `n` processes."""
        self.calls += calls
        self.payload += calls * payload
        self.sent += calls * (SENT_PER_BYTE[self.collective](n) * payload)


@dataclass
class DeviceCosts:
    """Memory (bytes) one device holds and its communication per training step (`Comm` by KINDS).
    `params` counts the local parameter elements; `sizes` is `ParallelConfig.sizes`."""

    sizes: dict[str, int]
    params: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    gathered_bytes: int
    activation_bytes: int
    comms: dict[str, Comm] = field(
        default_factory=lambda: {k: Comm(k.split("_", 1)[1]) for k in KINDS}
    )

    @property
    def memory_bytes(self) -> int:
        return (
            self.param_bytes
            + self.grad_bytes
            + self.optimizer_bytes
            + self.gathered_bytes
            + self.activation_bytes
        )


def _unit_of(name: str, part: str, separate_experts: bool) -> str:
    """The FSDP unit of a parameter: "root", "layers.3", "layers.3.experts", "mtp.0.block"..."""
    pieces = name.split(".")
    if pieces[0] == "layers":
        unit = ".".join(pieces[:2])
    elif pieces[0] == "mtp" and pieces[2] == "block":
        unit = ".".join(pieces[:3])
    else:  # the embeddings, final norm, LM head and the MTP module's norms and projection
        return "root"
    return unit + EXPERTS_UNIT if part == "routed_experts" and separate_experts else unit


EXPERTS_UNIT = ".experts"  # the suffix of a block's routed experts' own unit


def _is_experts(unit: str) -> bool:
    return unit.endswith(EXPERTS_UNIT)


@functools.lru_cache(maxsize=8)
def _whole_params(cfg_json: str) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
    """(name, part, shape) of every parameter of the single-process model (built on meta once
    per config: a 61-layer model takes seconds)."""
    with torch.device("meta"):
        model = MoETransformer(ModelConfig.from_json(cfg_json))
    out = []
    for name, p in model.named_parameters():
        try:
            part = part_of(model, name)
        except ValueError:  # the MTP module's own projection and norms
            part = "other"
        out.append((name, part, tuple(p.shape)))
    return tuple(out)


def _local_params(cfg: ModelConfig, sizes: dict[str, int]) -> list[tuple[str, list[int]]]:
    """(FSDP unit, shape on one device after tensor and expert parallelism) of every parameter
    (the MTP module's too)."""
    tp, ep = sizes["tp"], sizes["ep"]
    out = []
    for name, part, whole in _whole_params(cfg.to_json()):
        shape = list(whole)
        if part == "routed_experts" and ep > 1:
            shape[0] //= ep
        elif tp > 1:
            for suffix, dim in _TP_DIM.get(part, {}).items():
                if name.endswith("." + suffix):
                    shape[dim] //= tp
                    break
        out.append((_unit_of(name, part, ep > 1), shape))
    return out


def device_costs(
    cfg: ModelConfig,
    parallel: ParallelConfig,
    world_size: int,
    micro_batch: int,
    seq_len: int,
    rank: int = 0,
) -> DeviceCosts:
    """Memory and per-step communication of process `rank` (rank 0 holds the largest FSDP
    chunks) of `world_size` under `parallel`, for a micro-batch of `micro_batch` sequences of
    `seq_len` tokens per data-parallel rank. Raises ValueError for a layout that does not fit
    (`ParallelConfig.sizes`, `check_model`)."""
    sizes = parallel.sizes(world_size)
    parallel.check_model(cfg)
    parallel.check_seq_len(seq_len, "seq_len")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not one of the {world_size} processes")
    tp, ep = sizes["tp"], sizes["ep"]
    fsdp = parallel.fully_sharded
    # The process's place on the meshes (moekit.distributed.mesh: tp fastest, then dp_shard; the
    # data-parallel ranks regrouped as (edp_replicate, edp_shard, ep)): FSDP2's group size, this
    # process's index in it and the replicas, for the dense units and the experts'.
    data_rank = rank // tp
    meshes = {
        False: (sizes["dp_shard"], data_rank % sizes["dp_shard"], sizes["dp_replicate"]),
        True: (sizes["edp_shard"], (data_rank // ep) % sizes["edp_shard"], sizes["edp_replicate"]),
    }
    act = getattr(torch, parallel.param_dtype).itemsize
    units: dict[str, dict[str, int]] = {}  # elements held (local), padded chunks, unsharded
    for unit, shape in _local_params(cfg, sizes):
        n, index, _ = meshes[_is_experts(unit)] if fsdp else (1, 0, 1)
        rows = -(-shape[0] // n)  # FSDP2's chunks (torch.chunk): ceil(d0 / n) rows each
        rest = math.prod(shape[1:])
        u = units.setdefault(unit, {"local": 0, "padded": 0, "full": 0})
        u["local"] += max(0, min(rows, shape[0] - index * rows)) * rest
        u["padded"] += rows * rest
        u["full"] += shape[0] * rest
    local = sum(u["local"] for u in units.values())
    costs = DeviceCosts(
        sizes=sizes,
        params=local,
        param_bytes=local * FLOAT32,
        grad_bytes=local * FLOAT32,
        optimizer_bytes=2 * local * FLOAT32,
        gathered_bytes=0,
        activation_bytes=activation_bytes(
            cfg, sizes, micro_batch * seq_len, act, sequence_parallel=parallel.splits_sequence
        ),
    )
    comms = costs.comms
    if fsdp:
        full = {name: u["full"] * act for name, u in units.items()}
        blocks = sorted((b for name, b in full.items() if name != "root"), reverse=True)
        if parallel.reshard_after_forward:
            costs.gathered_bytes = full["root"] + sum(blocks[:2])
        else:
            costs.gathered_bytes = sum(full.values())
        for name, u in units.items():
            n, _, replicas = meshes[_is_experts(name)]
            if n > 1:  # the root unit stays gathered for its backward (apply_fully_shard)
                gathers = 1 + int(parallel.reshard_after_forward and name != "root")
                comms["fsdp_all_gather"].add(gathers, u["padded"] * act, n)
                comms["fsdp_reduce_scatter"].add(1, n * u["padded"] * FLOAT32, n)
            if replicas > 1:
                comms["dp_all_reduce"].add(1, u["padded"] * FLOAT32, replicas)
    else:
        n = sizes["dp_replicate"] * sizes["dp_shard"]
        dense = sum(u["local"] for k, u in units.items() if not _is_experts(k)) * FLOAT32
        experts = sum(u["local"] for k, u in units.items() if _is_experts(k)) * FLOAT32
        if n > 1:  # in DDP's buckets: the first of 1 MiB, then 25 MiB each
            costs.grad_bytes += dense  # the buckets hold a copy of the gradients
            buckets = 1 + math.ceil(max(0, dense - DDP_FIRST_BUCKET) / DDP_BUCKET)
            comms["dp_all_reduce"].add(buckets, dense / buckets, n)
        r = sizes["edp_replicate"]
        if r > 1 and experts:
            comms["dp_all_reduce"].add(1, experts, r)
    _activation_comms(cfg, sizes, micro_batch * seq_len, act, comms, parallel.splits_sequence)
    return costs


def _activation_comms(
    cfg: ModelConfig,
    sizes: dict[str, int],
    tokens: int,
    act: int,
    comms: dict[str, Comm],
    sequence_parallel: bool,
) -> None:
    """tp_all_reduce, tp_all_gather, tp_reduce_scatter and ep_all_to_all of the module
    docstring."""
    tp, ep, D = sizes["tp"], sizes["ep"], cfg.d_model
    n_blocks = cfg.n_layers + cfg.mtp_depth
    n_moe = len(cfg.moe_layer_indices) + (cfg.mtp_depth if cfg.moe is not None else 0)
    n_dense = n_blocks - n_moe
    td = tokens * D * act
    rd = tokens * cfg.moe.top_k * D * act if cfg.moe is not None else 0  # the experts' rows
    reduce = comms["tp_all_reduce"]
    if tp > 1:
        moe = cfg.moe
        shared = moe is not None and moe.shared_width > 0
        # ungated shared experts under sequence parallelism leave their output partial, to be
        # reduce-scattered with the routed experts' (`tensor_parallel`); else all-reduced
        partial_shared = shared and sequence_parallel and not moe.shared_gate
        if sequence_parallel:
            gather, scatter = comms["tp_all_gather"], comms["tp_reduce_scatter"]
            # attention in every block and dense FFNs: gather in, scatter out, and back
            gather.add(2 * n_blocks + 2 * n_dense, td / tp, tp)
            scatter.add(2 * n_blocks + 2 * n_dense, td, tp)
            gather.add(2 * n_moe, td / tp, tp)  # MoE layers: the input, the output's gradient
            if partial_shared:
                scatter.add(2 * n_moe, td, tp)  # the output, the input's gradient
            # the sequence enters its shards (backward) and leaves them (forward): stack, MTP
            gather.add(2 * (1 + cfg.mtp_depth), td / tp, tp)
            # the RMSNorm weights' gradients: two per block, the final norm and each MTP depth's
            reduce.add(2 * n_blocks + 1 + cfg.mtp_depth, D * act, tp)
        else:  # one forward all-reduce per row-wise output, one backward per column-wise input
            # attention's q, k, v share one input; a dense FFN's gate and up each their own
            reduce.add(n_blocks * (1 + 1), td, tp)
            reduce.add(n_dense * (1 + 2), td, tp)
        if cfg.qk_norm == "head" and cfg.mla is None:
            # the q and k norms' weight gradients, summed in the compute dtype (DTensor's
            # reduction, before FSDP2's float32 one)
            reduce.add(2 * n_blocks, cfg.d_head * act, tp)
        if shared and not partial_shared:
            reduce.add(n_moe * (1 + 1), td, tp)  # fused [gate; up]
        if cfg.moe is not None and ep == 1:
            reduce.add(n_moe * (1 + 1), rd, tp)
    if ep > 1 and cfg.moe is not None:
        comms["ep_all_to_all"].add(n_moe, cfg.moe.n_experts * INT64, ep)  # the counts
        comms["ep_all_to_all"].add(4 * n_moe, rd, ep)


def activation_bytes(
    cfg: ModelConfig,
    sizes: dict[str, int],
    tokens: int,
    act: int,
    *,
    sequence_parallel: bool = False,
) -> int:
    """The activation estimate of the module docstring: bytes autograd saves for one micro-batch
    of `tokens` tokens per process, elements of `act` bytes (`sequence_parallel`: the norms on
    T / tp positions)."""
    tp, ep, T, D = sizes["tp"], sizes["ep"], tokens, cfg.d_model
    moe_layers = set(cfg.moe_layer_indices)
    if cfg.mla is not None:  # q and k are qk_head_dim wide per head, v v_head_dim
        m = cfg.mla
        qkv = cfg.n_heads * (2 * m.qk_head_dim + m.v_head_dim)
        out = cfg.n_heads * m.v_head_dim
    else:
        qkv = (cfg.n_heads + 2 * cfg.kv_heads) * cfg.d_head
        out = cfg.n_heads * cfg.d_head
    norm = 3 * T * D  # its input, the input times rsqrt(mean square), and the output
    if sequence_parallel and tp > 1:  # the first two on T / tp positions, the output gathered
        norm = 2 * T * D // tp + T * D
    attention = norm + T * qkv // tp + 2 * T * out // tp + norm
    dense = 4 * T * (cfg.d_ff or 0) // tp
    moe = 0
    if cfg.moe is not None:
        m = cfg.moe
        f = m.d_expert // (tp if ep == 1 else 1)
        moe = 2 * T * m.n_experts + T * m.top_k * (2 * D + 3 * f) + 3 * T * m.shared_width // tp
    blocks = [moe if i in moe_layers else dense for i in range(cfg.n_layers)]
    blocks += [moe if cfg.moe is not None else dense] * cfg.mtp_depth
    elements = sum(attention + b for b in blocks) + norm
    return elements * act + T * cfg.vocab_size * FLOAT32 * (1 + cfg.mtp_depth)
