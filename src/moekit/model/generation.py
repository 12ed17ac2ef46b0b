"""Autoregressive generation with a preallocated KV cache: one prefill of the prompt, then one
forward per new token. Greedy, temperature, top-k and top-p (nucleus) sampling; stops at EOS."""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from moekit.config import ModelConfig
from moekit.model.attention import LayerKVCache
from moekit.model.transformer import MoETransformer

if TYPE_CHECKING:
    from moekit.model.speculative import SpeculativeStats


class KVCache:
    """Keys and values of every layer for `batch_size` sequences of up to `max_len` positions,
    preallocated as (batch_size, n_kv_heads, max_len, head_dim) per layer (with multi-head latent
    attention: its latent (batch_size, 1, max_len, kv_lora_rank) and rotary key).

    The cache keeps every position; a sliding window is applied by the attention mask, so cached
    decoding sees exactly what a full forward sees. With `mtp`, `self.mtp` is one more layer, the
    first multi-token-prediction depth's own (`MoETransformer.mtp_step`), with its own length.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        mtp: bool = False,
    ) -> None:
        if mtp and cfg.mtp_depth == 0:
            raise ValueError("KVCache(mtp=True) needs a model with multi-token prediction")
        k_shape = v_shape = (batch_size, cfg.kv_heads, max_len, cfg.d_head)
        if cfg.mla is not None:  # latent attention caches its latent and its shared rotary key
            k_shape = (batch_size, 1, max_len, cfg.mla.kv_lora_rank)
            v_shape = (batch_size, 1, max_len, cfg.mla.qk_rope_head_dim)

        def layer() -> LayerKVCache:
            k = torch.zeros(k_shape, device=device, dtype=dtype)
            return LayerKVCache(k, torch.zeros(v_shape, device=device, dtype=dtype))

        self.layers = [layer() for _ in range(cfg.n_layers)]
        self.mtp = layer() if mtp else None

    @classmethod
    def for_model(
        cls, model: MoETransformer, batch_size: int, max_len: int, *, mtp: bool = False
    ) -> KVCache:
        """A cache on the model's device, in its dtype."""
        weight = model.embed.weight
        device, dtype = weight.device, weight.dtype
        return cls(model.cfg, batch_size, max_len, device=device, dtype=dtype, mtp=mtp)

    @property
    def max_len(self) -> int:
        """Positions it has room for."""
        return self.layers[0].k_BKLd.shape[2]

    @property
    def length(self) -> int:
        """Positions cached so far (the position of the next token)."""
        return self.layers[0].length

    def crop(self, length: int) -> None:
        """Forget the main layers' positions from `length` on (speculative decoding's rollback
        past a rejected draft); the MTP layer crops on its own (`self.mtp.crop`)."""
        for layer in self.layers:
            layer.crop(length)

    def reserve(self, max_len: int) -> None:
        """Room for max_len positions in every layer (a conversation's cache grows with it): each
        smaller one's tensors reallocated, its filled positions copied."""
        for layer in [*self.layers, *([self.mtp] if self.mtp is not None else [])]:
            for name in ("k_BKLd", "v_BKLd"):
                old = getattr(layer, name)
                if old.shape[2] < max_len:
                    new = old.new_zeros(*old.shape[:2], max_len, old.shape[3])
                    new[:, :, : layer.length] = old[:, :, : layer.length]
                    setattr(layer, name, new)


def sample_next(
    logits_BV: Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick one token per row of logits (B, V) -> ids (B,) long.

    temperature 0 is greedy (argmax; top_k and top_p are then irrelevant). Otherwise the logits are
    divided by the temperature, restricted to the top_k best tokens (ties with the k-th kept), then
    to the smallest set of best tokens whose probability reaches top_p (Holtzman et al. 2020),
    and sampled.
    """
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    probs_BV = sampling_probs(logits_BV, temperature, top_k, top_p)
    try:
        return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)
    except RuntimeError:
        if torch.isfinite(logits_BV).all():
            raise
        raise ValueError(  # (checked only here: no cost on a step that samples)
            "the model's logits are not finite (inf or NaN): its weights are broken (an "
            "upcycle's --noise far above 1, say, or a training run that diverged)"
        ) from None


def sampling_probs(
    logits_BV: Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None
) -> Tensor:
    """The float32 distribution (B, V) that `sample_next` samples from (temperature > 0)."""
    logits_BV = logits_BV.float() / temperature
    if top_k is not None:
        kth_B1 = logits_BV.topk(min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p is not None:
        logits_BV = logits_BV.masked_fill(_outside_nucleus(logits_BV, top_p), float("-inf"))
    return logits_BV.softmax(dim=-1)


def _outside_nucleus(logits_BV: Tensor, top_p: float) -> Tensor:
    """(B, V) True for the tokens after the smallest best-first prefix with probability >= top_p."""
    sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
    probs_BV = sorted_BV.softmax(dim=-1)
    mass_before_BV = probs_BV.cumsum(dim=-1) - probs_BV
    drop_sorted_BV = mass_before_BV >= top_p
    return torch.zeros_like(drop_sorted_BV).scatter(-1, order_BV, drop_sorted_BV)


@torch.no_grad()
def generate(
    model: MoETransformer,
    input_ids: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    stream: Callable[[Tensor], None] | None = None,
    speculative: Literal["mtp"] | None = None,
    draft_tokens: int = 2,
    stats: SpeculativeStats | None = None,
    kv_cache: KVCache | None = None,
) -> Tensor:
    """Continue the prompts input_ids (B, S) -> the new ids (B, N), N <= max_new_tokens.

    Sampling is as `sample_next`. A sequence that emits `eos_token_id` (one id, or several: a chat
    model's end of turn and end of text, say) keeps it and is padded with `pad_token_id` (default:
    the first end id) afterwards; generation ends when every sequence has
    ended or after max_new_tokens. `stream`, if given, receives each new column (B,) as it is
    made. The model runs in eval mode (restored afterwards); S + max_new_tokens must fit in
    `max_seq_len`. The model runs as built (nn.Linear): on CPU, swap in the decode kernels first
    (`moekit.inference.apply_decode_kernels(model)`, as `moekit generate` does), whose GEMV
    streams the weights about twice as fast as MKL's on this project's machine.

    speculative="mtp" decodes with the model's multi-token-prediction head drafting
    `draft_tokens` tokens a round and one forward of the model verifying them
    (`moekit.model.speculative`): batch 1; greedy gives plain greedy's tokens, sampling the
    model's own distribution; `stats`, a `SpeculativeStats`, is filled with what it measured.

    kv_cache continues a cache (a chat's earlier turns, `moekit.interop.chat.ChatSession`): its
    kv_cache.length positions come before input_ids, and it is left holding every position but
    the last new token's (a row that ended early holds what it was fed, not the padding). It
    needs batch B and room for S + max_new_tokens - 1 more positions.
    """
    past = 0 if kv_cache is None else kv_cache.length
    _check_generate_args(model, input_ids, max_new_tokens, temperature, top_k, top_p, past)
    if kv_cache is not None:
        _check_cache(kv_cache, input_ids, max_new_tokens, speculative)
    end_ids = end_token_ids(eos_token_id)
    pad = (end_ids[0] if end_ids else None) if pad_token_id is None else pad_token_id
    B, S = input_ids.shape
    if max_new_tokens == 0:
        return input_ids.new_empty(B, 0)
    speculate = speculative is not None or stats is not None
    if speculate:
        # imported here: moekit.model.speculative builds on this module (KVCache, sample_next)
        from moekit.model.speculative import check_speculative, speculative_generate

        if speculative != "mtp":
            raise ValueError(f"speculative={speculative!r} is invalid: must be 'mtp' or None")
        check_speculative(model, B, draft_tokens)
    was_training = model.training
    model.eval()
    try:
        if speculate:
            args = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "stats": stats}
            args.update(eos_token_id=end_ids, generator=generator, stream=stream)
            return speculative_generate(model, input_ids, max_new_tokens, draft_tokens, **args)
        cache = kv_cache
        if cache is None:
            cache = KVCache.for_model(model, B, S + max_new_tokens - 1)
        finished_B = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        end_ids_E = torch.tensor(end_ids, dtype=torch.long, device=input_ids.device)
        new_ids: list[Tensor] = []
        next_logits = step_logits(model, cache)
        logits_BV = next_logits(input_ids)
        for step in range(max_new_tokens):
            sampled_B = sample_next(logits_BV, temperature, top_k, top_p, generator)
            ids_B = sampled_B
            if end_ids:
                ids_B = torch.where(finished_B, pad, sampled_B)
                finished_B |= torch.isin(ids_B, end_ids_E)
            new_ids.append(ids_B)
            if stream is not None:
                stream(ids_B)
            if step == max_new_tokens - 1 or bool(finished_B.all()):
                break
            # Ended rows still run (their outputs are replaced by padding): feed them a real token.
            logits_BV = next_logits(sampled_B[:, None])
        return torch.stack(new_ids, dim=1)
    finally:
        model.train(was_training)


def step_logits(model: MoETransformer, cache: KVCache) -> Callable[[Tensor], Tensor]:
    """`generate`'s step: next ids (B, S) continuing `cache` -> the last position's logits (B, V).
    Each a forward of the model, except decoded tokens (S = 1) where the model has a one-token
    decoder (`model.one_token_decoder`, set by moekit.inference's decode kernels: up to 16 rows,
    the whole step in one C call, the same logits), asked for at the first of them."""
    decoder: list = []  # [the decoder or None], once asked

    def next_logits(ids_BS: Tensor) -> Tensor:
        if ids_BS.shape[1] == 1:
            if not decoder:
                make = model.one_token_decoder
                decoder.append(None if make is None else make(model, cache))
            if decoder[0] is not None:
                logits_BV = decoder[0](ids_BS)
                if logits_BV is not None:
                    return logits_BV
        return model(ids_BS, kv_cache=cache, with_aux=False, logits_to_keep=1).logits[:, -1]

    return next_logits


def room_after_prompt(n_ids: int, max_seq_len: int, what: str) -> int:
    """The positions a context of `max_seq_len` leaves to generate after a prompt of `n_ids`
    tokens; a prompt that leaves none is one error naming it (`what`: "prompt 3", "the
    conversation") and how long it may be."""
    if n_ids >= max_seq_len:
        raise ValueError(
            f"{what} is {n_ids} tokens; the model's max_seq_len={max_seq_len} leaves no room to "
            f"generate: shorten it to at most {max_seq_len - 1} tokens"
        )
    return max_seq_len - n_ids


def end_token_ids(eos_token_id: int | Sequence[int] | None) -> tuple[int, ...]:
    """generate's eos_token_id as a tuple of ids (empty for None): an integer (Python's, numpy's,
    a 0-d tensor) or a sequence of them; ValueError for anything else."""
    try:
        ids = () if eos_token_id is None else (operator.index(eos_token_id),)
    except TypeError:
        try:
            ids = tuple(operator.index(i) for i in eos_token_id)  # type: ignore[union-attr]
        except TypeError:
            ids = (-1,)  # refused below
    if any(i < 0 for i in ids):
        raise ValueError(
            f"eos_token_id={eos_token_id!r} is invalid: must be a token id >= 0, a sequence of "
            "them, or None"
        )
    return ids


def _check_cache(
    cache: KVCache, input_ids: Tensor, max_new_tokens: int, speculative: str | None
) -> None:
    """generate's kv_cache, checked against the call."""
    if speculative is not None:
        raise ValueError("speculative decoding keeps a cache of its own: give no kv_cache")
    batch, room = cache.layers[0].k_BKLd.shape[0], cache.max_len - cache.length
    if batch != input_ids.shape[0] or input_ids.shape[1] + max_new_tokens - 1 > room:
        raise ValueError(
            f"kv_cache has batch {batch} and room for {room} more positions; this call needs "
            f"batch {input_ids.shape[0]} and {input_ids.shape[1] + max_new_tokens - 1} positions"
        )


def _check_generate_args(
    model: MoETransformer,
    input_ids: Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    past: int = 0,
) -> None:
    cfg = model.cfg
    if cfg.moe is not None and not cfg.moe.token_choice:
        raise ValueError(
            f"router={cfg.moe.router!r} is not causal (a token's experts depend on later tokens), "
            "so it cannot generate; use a token-choice router such as 'topk'"
        )
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(
            f"input_ids must be (batch, seq) with seq >= 1, got {tuple(input_ids.shape)}"
        )
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid: must be an integer >= 0")
    if past + input_ids.shape[1] + max_new_tokens > cfg.max_seq_len:
        cached = f"{past} cached + " if past else ""
        raise ValueError(
            f"prompt of {cached}{input_ids.shape[1]} tokens + max_new_tokens={max_new_tokens} is "
            f"longer than max_seq_len={cfg.max_seq_len}"
        )
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature!r} is invalid: must be >= 0 (0 is greedy)")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} is invalid: must be an integer >= 1 or None")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} is invalid: must be in (0, 1] or None")
