"""Self-speculative decoding: the model's own multi-token-prediction head drafts, the main model
verifies (DeepSeek-V3's MTP as a draft model; the accept/reject rule of Leviathan et al. 2023,
*Fast inference from transformers via speculative decoding*, and Chen et al. 2023).

Each round, t_L being the last emitted token (not yet fed to the main model):
1. draft: the first MTP depth proposes d_1 from the main model's hidden state at L - 1 and t_L,
   then d_2 .. d_n each from its own output hidden state and the token it just drafted (vLLM's
   recursion of DeepSeek-V3's single depth): one `mtp_step` per draft, on its own KV cache;
2. verify: one forward of the main model over [t_L, d_1 .. d_n];
3. accept: greedy keeps the drafts equal to the main model's argmax; sampling keeps d_j with
   probability min(1, p(d_j) / q(d_j)) and at the first rejection draws from
   norm(max(0, p - q)), so every token follows the main model's distribution p exactly (q: the
   draft's distribution, under the same temperature, top-k and top-p);
4. emit the accepted drafts and the main model's token after them (its correction, or a bonus
   token when all were accepted), and crop both caches past the first rejection. The MTP cache
   keeps only positions computed from the main model's hidden states; the next round's first
   `mtp_step` recomputes the accepted positions from the verification's hidden states.
Greedy output is plain greedy `generate`'s (to float rounding: the verification runs n + 1
positions in one forward). Drafts come from the first depth only: deeper depths are not used.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from moekit.model.generation import KVCache, end_token_ids, sample_next, sampling_probs
from moekit.model.transformer import MoETransformer


@dataclass
class SpeculativeStats:
    """What one speculative `generate` call measured (pass one in to have it filled).

    proposed[j] / accepted[j]: drafts made / accepted at draft position j + 1 (a draft after a
    rejected one counts as proposed, not accepted, as vLLM counts them); verifications: main-model
    forwards after the prompt's; new_tokens: tokens returned; seconds: the call's wall time.
    """

    draft_tokens: int = 0
    proposed: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    verifications: int = 0
    new_tokens: int = 0
    seconds: float = 0.0

    def start(self, draft_tokens: int) -> None:
        """Zero every count, for a call drafting `draft_tokens` a round."""
        self.draft_tokens = draft_tokens
        self.proposed, self.accepted = [0] * draft_tokens, [0] * draft_tokens
        self.verifications = self.new_tokens = 0
        self.seconds = 0.0

    def count(self, n: int, n_ok: int) -> None:
        """One verification of n drafts, the first n_ok accepted."""
        self.verifications += 1
        for j in range(n):
            self.proposed[j] += 1
            self.accepted[j] += j < n_ok

    @property
    def acceptance_rates(self) -> list[float]:
        """Per draft position, the fraction of its drafts accepted."""
        return [a / p if p else 0.0 for a, p in zip(self.accepted, self.proposed, strict=True)]

    @property
    def mean_accepted_length(self) -> float:
        """Tokens each verification yields: accepted drafts + the main model's own token."""
        return 1 + sum(self.accepted) / self.verifications if self.verifications else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    def format(self) -> str:
        """One line for people."""
        rates = ", ".join(f"{r:.1%}" for r in self.acceptance_rates)
        return (
            f"speculative (mtp, {self.draft_tokens} drafts): acceptance by position [{rates}], "
            f"mean accepted length {self.mean_accepted_length:.2f} tokens per verification "
            f"({self.verifications} verifications), {self.new_tokens} tokens in "
            f"{self.seconds:.2f} s = {self.tokens_per_s:.1f} tokens/s"
        )


def check_speculative(model: MoETransformer, batch_size: int, draft_tokens: int) -> None:
    """One-line errors for what speculative decoding cannot run."""
    if model.cfg.mtp_depth == 0:
        raise ValueError(
            "speculative='mtp' needs a model with a multi-token-prediction head, and this one has "
            "mtp_depth=0: train one with --model.mtp_depth=1, or add a head to a trained run by "
            "training only it, on its own predictions (moekit train CONFIG --train.init_from=RUN "
            "--model.mtp_depth=1 --train.freeze=model --model.mtp_target=model)"
        )
    if batch_size != 1:
        raise ValueError(
            f"speculative decoding runs one sequence at a time, got a batch of {batch_size}: "
            "generate each prompt on its own, or without speculative"
        )
    if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or draft_tokens < 1:
        raise ValueError(f"draft_tokens={draft_tokens!r} is invalid: must be an integer >= 1")


def speculative_generate(
    model: MoETransformer,
    input_ids: Tensor,
    max_new_tokens: int,
    draft_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    stream: Callable[[Tensor], None] | None = None,
    stats: SpeculativeStats | None = None,
) -> Tensor:
    """`generate(..., speculative="mtp", draft_tokens=n)` (which checks the arguments and puts the
    model in eval mode): input_ids (1, S) -> the new ids (1, N), N <= max_new_tokens, ending at
    the first of the `eos_token_id` ids as generate's do."""
    stats = SpeculativeStats() if stats is None else stats
    end_ids = end_token_ids(eos_token_id)
    stats.start(draft_tokens)
    started = time.perf_counter()
    S, device = input_ids.shape[1], input_ids.device
    cache = KVCache.for_model(model, 1, S + max_new_tokens - 1, mtp=True)
    out = model(input_ids, kv_cache=cache, with_aux=False, logits_to_keep=1)
    new: list[int] = []
    token = int(sample_next(out.logits[:, -1], temperature, top_k, top_p, generator))
    # The MTP positions not yet cached: their hidden states and, for each, the token after it.
    h_BSD, next_ids = out.hidden, [*input_ids[0, 1:].tolist(), token]
    emitting = [token]
    while _emit(emitting, new, max_new_tokens, end_ids, stream):
        # A round emits up to n + 1 tokens: n drafts past the last token that may be emitted
        # would only fill the cache.
        n = min(draft_tokens, max_new_tokens - len(new) - 1)
        drafts, q_NV, kept = _draft(model, cache, h_BSD, next_ids, n, temperature, top_k, top_p,
                                    generator)  # fmt: skip
        ids_1N = torch.tensor([[new[-1], *drafts]], device=device)
        verified = model(ids_1N, kv_cache=cache, with_aux=False)
        logits_NV = verified.logits[0]  # row j scores the token after [t_L, d_1 .. d_j]
        if temperature == 0:
            n_ok, token = _accept_greedy(drafts, logits_NV)
        else:
            p_NV = sampling_probs(logits_NV, temperature, top_k, top_p)
            n_ok, token = _accept_sampled(drafts, p_NV, q_NV, generator)
        stats.count(n, n_ok)
        cache.crop(cache.length - n + n_ok)  # keeps t_L and the accepted drafts
        cache.mtp.crop(kept)
        h_BSD, next_ids = verified.hidden[:, : n_ok + 1], [*drafts[:n_ok], token]
        emitting = next_ids
    stats.new_tokens, stats.seconds = len(new), time.perf_counter() - started
    return torch.tensor([new], dtype=torch.long, device=device)


def _emit(
    tokens: list[int],
    new: list[int],
    max_new_tokens: int,
    eos_token_id: tuple[int, ...],
    stream: Callable[[Tensor], None] | None,
) -> bool:
    """Append `tokens` to `new`, stopping at max_new_tokens and after one of eos_token_id, streaming
    each; whether generation goes on."""
    for token in tokens:
        new.append(token)
        if stream is not None:
            stream(torch.tensor([token]))
        if len(new) == max_new_tokens or token in eos_token_id:
            return False
    return True


def _draft(
    model: MoETransformer,
    cache: KVCache,
    h_BSD: Tensor,
    next_ids: list[int],
    n: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> tuple[list[int], Tensor | None, int]:
    """n drafts; their distributions (n, V) when sampling (None when greedy); and the MTP cache's
    length after the first step: the positions computed from the main model's hidden states."""
    ids_BS = torch.tensor([next_ids], device=h_BSD.device)
    drafts, q_rows, kept = [], [], cache.mtp.length
    for j in range(n):
        logits_BSV, h_BSD = model.mtp_step(h_BSD, ids_BS, cache)
        if j == 0:
            kept = cache.mtp.length
        logits_1V = logits_BSV[:, -1]
        if temperature == 0:
            drafts.append(int(logits_1V.argmax(-1)))
        else:
            q_rows.append(sampling_probs(logits_1V, temperature, top_k, top_p)[0])
            drafts.append(int(torch.multinomial(q_rows[-1], 1, generator=generator)))
        h_BSD, ids_BS = h_BSD[:, -1:], torch.tensor([[drafts[-1]]], device=h_BSD.device)
    return drafts, torch.stack(q_rows) if q_rows else None, kept


def _accept_greedy(drafts: list[int], logits_NV: Tensor) -> tuple[int, int]:
    """(drafts accepted, the main model's token after them): drafts kept while they are its
    argmax."""
    best = logits_NV.argmax(-1).tolist()
    n_ok = 0
    while n_ok < len(drafts) and drafts[n_ok] == best[n_ok]:
        n_ok += 1
    return n_ok, best[n_ok]


def _accept_sampled(
    drafts: list[int], p_NV: Tensor, q_NV: Tensor, generator: torch.Generator | None
) -> tuple[int, int]:
    """The speculative sampling rule: (drafts accepted, the token after them). Draft x at
    position j is kept with probability min(1, p_j(x) / q_j(x)); the first one refused is
    replaced by a draw from norm(max(0, p_j - q_j)); all kept, the bonus token is drawn from p."""
    for j, x in enumerate(drafts):
        u = torch.rand((), generator=generator, device=p_NV.device)
        if u * q_NV[j, x] < p_NV[j, x]:  # u < p/q without dividing by a tiny q
            continue
        residual_V = (p_NV[j] - q_NV[j]).clamp(min=0)
        if residual_V.sum() <= 0:  # p == q to rounding: refusing had probability ~0
            residual_V = p_NV[j]
        return j, int(torch.multinomial(residual_V, 1, generator=generator))
    n = len(drafts)
    return n, int(torch.multinomial(p_NV[n], 1, generator=generator))
