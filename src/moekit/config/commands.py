"""Configs of the commands that read a trained model: `moekit generate` (`GenerateConfig`, with
its `OffloadConfig`), `moekit analyze` (`AnalyzeConfig`) and `moekit quantize`
(`QuantizeConfig`); and of `moekit trace` (`TraceConfig`), `cache-sim` (`CacheSimConfig`),
`convert` (`ConvertConfig`) and `upcycle` (`UpcycleConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from moekit.config.base import ConfigBase
from moekit.config.rules import In, NonNegFloat, NonNegInt, invalid

# The expert cache's policies, as inference.cache.POLICIES names them (tests/test_cli.py).
Policy = Literal["lru", "lfu", "static"]


@dataclass(kw_only=True)
class OffloadConfig(ConfigBase):
    """Expert offloading: the routed experts stay in the checkpoint file, at most `budget` of them
    in memory behind a cache (the whole model is never in memory).

    budget: None keeps the whole model in memory; else a count (12), a fraction of all experts
        (0.5 or 50%) or bytes (200MB).
    policy: what the cache keeps: "lru", "lfu" or "static" (the most used experts of `trace`).
    prefetch: load the next layer's experts early.
    trace: a routing trace (written by `moekit trace`) whose most used experts "static" keeps.
    """

    budget: str | None = None
    policy: Policy = "lru"
    prefetch: bool = False
    trace: str | None = None


@dataclass(kw_only=True)
class GenerateConfig(ConfigBase):
    """`moekit generate`: what to continue and how to sample it.

    prompt: text to continue; "" starts a new document. With chat, the user's message instead.
    chat: wrap the prompt as a user message (after `system`, if given) in the checkpoint's chat
        template and print the model's reply alone, which ends at the template's end-of-turn
        tokens (an instruct model's way to be asked; needs transformers, `moekit[hf]`). Without a
        prompt, a conversation: each line of stdin a user turn, until end of input.
    system: the system message of a chat; "" sends none (the template may add its own).
    max_new_tokens: tokens to generate (fewer at end-of-text or at the model's max_seq_len).
    temperature: 0 is greedy.
    top_k: sample among the k likeliest tokens; 0 or None turns it off.
    top_p: sample among the likeliest tokens holding this probability; 1 turns it off.
    seed: seeds the sampler.
    speculative: "mtp" drafts with the model's multi-token-prediction head and verifies the drafts
        in one forward (greedy output unchanged, sampling from the same distribution; batch 1);
        None decodes one token per forward.
    draft_tokens: tokens the head drafts per verification (with speculative).
    """

    prompt: str = ""
    chat: bool = False
    system: str = ""
    max_new_tokens: int = 200
    temperature: NonNegFloat = 0.8
    top_k: NonNegInt | None = 50
    top_p: Annotated[float, In("(0, 1]")] = 0.95
    seed: Annotated[int, In("[0, 2**64)")] = 0
    speculative: Literal["mtp"] | None = None
    draft_tokens: int = 2
    offload: OffloadConfig = field(default_factory=OffloadConfig)


@dataclass(kw_only=True)
class AnalyzeConfig(ConfigBase):
    """`moekit analyze`: the held-out text a model's routing is traced over.

    data: the corpus whose validation split is traced ("stdlib", a file, a folder or a glob); None
        means the run's own corpus (the standard library for a Hugging Face checkpoint).
    tokens: held-out tokens to trace.
    seq_len: tokens per traced sequence, at least 2 (the repetition metrics compare each token's
        experts with the next's) and at most the model's max_seq_len; None: 256, or max_seq_len
        where that is shorter (the resolved config saved beside the report holds the number used).
    """

    data: str | None = None
    tokens: int = 16384
    seq_len: Annotated[int, In("[2, inf)")] | None = None


Scheme = Literal["bf16", "int8", "int4", "mxfp4", "none"]


@dataclass(kw_only=True)
class QuantizeConfig(ConfigBase):
    """`moekit quantize`: weight-only quantization of a model's projections, part by part
    (`moekit.quant.schemes` has the formats).

    weights: the scheme of every part not given its own: "int4" (groups of 32), "int8" (per
        output channel), "mxfp4" (OCP microscaling, GPT-OSS's), "bf16", or "none" (float).
    experts: the routed experts' scheme (None: `weights`).
    attention: the attention projections' scheme (None: `weights`).
    ffn: every other projection's: dense FFN layers, shared experts (None: `weights`).
    head: an untied LM head's (None: `weights`); a tied head stays the embedding.
    zero_point: int4 with a zero point per group (q4_1's rule) instead of symmetric (q4_0's).
    """

    weights: Scheme = "int4"
    experts: Scheme | None = None
    attention: Scheme | None = None
    ffn: Scheme | None = None
    head: Scheme | None = None
    zero_point: bool = False

    def scheme_of(self, part: str) -> str | None:
        """The scheme of `part` ("experts", "attention", "ffn" or "head"); None: left float."""
        scheme = getattr(self, part) or self.weights
        return None if scheme == "none" else scheme


@dataclass(kw_only=True)
class TraceConfig(ConfigBase):
    """`moekit trace`: how each prompt of the prompts file is continued while its routing is
    recorded (greedily).

    max_new_tokens: greedy tokens generated per prompt (fewer at end-of-text or at the model's
        max_seq_len; a prompt that fills max_seq_len is refused, as generate refuses it).
    """

    max_new_tokens: int = 32


@dataclass(kw_only=True)
class CacheSimConfig(ConfigBase):
    """`moekit cache-sim`: the expert caches a routing trace is replayed against.

    budget: the cache sizes to replay, each a count of experts (12) or a fraction of all the
        trace's experts (0.5 or 50%), as `generate --offload.budget` takes them; a trace knows no
        sizes in bytes. The minimum, top_k, is always added.
    policy: the cache policies to compare ("lru", "lfu", "static"); Belady's oracle is always
        shown.
    """

    budget: tuple[str, ...] = ("100%", "50%", "25%")
    policy: tuple[Policy, ...] = ("lru", "lfu", "static")

    def check(self) -> None:
        for name in ("budget", "policy"):
            if not getattr(self, name):
                raise invalid(name, getattr(self, name), f"must list at least one {name}")
        twice = sorted({p for p in self.policy if self.policy.count(p) > 1})
        if twice:  # (its column would be printed twice)
            raise invalid("policy", ",".join(self.policy), f"lists {', '.join(twice)} twice")


@dataclass(kw_only=True)
class ConvertConfig(ConfigBase):
    """`moekit convert`: how the checkpoint is written (which one, and into what, are the
    command's arguments: `--from-hf DIR` | `--to-hf RUN_DIR --arch ARCH`, `--out`).

    dtype: the weights' dtype, "float32", "bfloat16" or "float16"; None keeps the source's (the
        dtype of the Hugging Face config with --from-hf, the model's with --to-hf).
    layout: the experts' keys written with --to-hf: "per_expert" (one tensor per expert, as on
        the Hub) or "fused" (transformers 5's: one tensor of all experts per projection).
    max_shard_size: the largest safetensors shard written with --to-hf, in bytes or with a unit
        ("2GB", "500MB", "2GiB").
    """

    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    layout: Literal["per_expert", "fused"] = "per_expert"
    max_shard_size: str = "2GB"


@dataclass(kw_only=True)
class UpcycleConfig(ConfigBase):
    """`moekit upcycle`: the MoE a dense run becomes (sparse upcycling, Komatsuzaki et al. 2022).

    n_experts: experts per MoE layer, each a copy of the dense layer's FFN.
    top_k: experts per token.
    noise: Gaussian noise added to each expert copy, times each weight's std (0: exact copies).
    """

    n_experts: int = 8
    top_k: int = 2
    noise: NonNegFloat = 0.0

    def check(self) -> None:
        if self.top_k > self.n_experts:
            raise invalid("top_k", self.top_k, f"must be <= n_experts ({self.n_experts})")
