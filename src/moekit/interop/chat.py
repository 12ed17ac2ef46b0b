"""A checkpoint's chat template: the prompt a chat model was trained to answer, rendered as
`transformers` renders it, and the tokens that end its reply; `ChatSession`, a conversation that
keeps its KV cache from turn to turn.

Instruct and chat checkpoints (Qwen3, GPT-OSS, Mixtral-Instruct, DeepSeek-V3, OLMoE-Instruct) ship
a Jinja template (`chat_template.jinja`, or `chat_template` in tokenizer_config.json) that wraps
the conversation in the role markers the model was tuned on; given raw text they ramble. The
template is untrusted code from the checkpoint, so it is rendered by transformers' own sandboxed
renderer (`PreTrainedTokenizerFast.apply_chat_template`), never by a Jinja environment of ours;
its text is then encoded by the checkpoint's tokenizer without added special tokens (the template
writes its own), which gives transformers' ids (tests/test_chat.py). The reply ends at any of the
ids generation_config.json lists as `eos_token_id` (a chat model's end of turn and end of text)
or the tokenizer's own end token.

`moekit convert` (both ways), `quantize` and `upcycle` copy these files beside tokenizer.json
(`moekit.data.tokenizer.CHAT_FILES`): a converted or quantized chat model chats.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from moekit.interop.files import read_checkpoint_json
from moekit.model import MoETransformer
from moekit.model.generation import KVCache
from moekit.train.checkpoint import CHECKPOINT_DIR
from moekit.userfiles import REDOWNLOAD, read_text

# GPT-OSS's harmony tokens: a message's channel, its text, and what ends it.
HARMONY = ("<|channel|>", "<|message|>", "<|end|>", "<|start|>")
NEEDS_TRANSFORMERS = (
    "rendering a chat template needs transformers (its sandboxed renderer): "
    "pip install 'moekit[hf]'"
)


@dataclass
class ChatPrompt:
    """A conversation rendered for the model: text (what the template wrote), ids (its tokens;
    from a `ChatSession`, those its cache does not hold), end_ids (the tokens that end the reply,
    in the order found) and reply_text (a reply's ids, or the first of them -> the answer shown:
    `ChatTemplate.reply_text`)."""

    text: str
    ids: list[int]
    end_ids: tuple[int, ...]
    reply_text: Callable[[list[int]], str]


class ChatTemplate:
    """The chat template of `folder` (a Hugging Face checkpoint, or a run holding its tokenizer
    files) over `tokenizer` (the folder's tokenizer.json as loaded), read once. Raises
    ValueError where there is no template, no end token, or no transformers."""

    def __init__(self, folder: str | Path, tokenizer: Tokenizer) -> None:
        self.folder, self.tokenizer = Path(folder), tokenizer
        self.template = _chat_template(self.folder)
        self.renderer = _renderer_class()(
            tokenizer_object=tokenizer, **_tokenizer_settings(self.folder)
        )
        self.end_ids = _end_ids(self.folder, tokenizer, self.renderer.eos_token)
        harmony = [tokenizer.token_to_id(t) for t in HARMONY]
        self.harmony = None if None in harmony[:2] else tuple(i for i in harmony if i is not None)

    def render(self, messages: list[dict]) -> ChatPrompt:
        """`messages` ([{"role": "system" | "user" | "assistant", "content": str}, ...]) ready
        for the assistant's reply; ValueError if the template fails on them (its own
        raise_exception, or any error of its code) or writes nothing."""
        try:
            text = self.renderer.apply_chat_template(
                messages, chat_template=self.template, add_generation_prompt=True, tokenize=False
            )
        except Exception as e:  # the checkpoint's code: whatever it raises is about its input
            raise ValueError(
                f"{self.folder}'s chat template failed on the conversation: {type(e).__name__}: {e}"
            ) from e
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if not ids:
            raise ValueError(f"{self.folder}'s chat template rendered the conversation as nothing")
        return ChatPrompt(text, ids, self.end_ids, self.reply_text)

    def reply_text(self, reply: list[int]) -> str:
        """The answer in a reply's ids (or the first of them): their text, special tokens
        skipped; for a tokenizer with GPT-OSS's harmony channels (`<|channel|>NAME<|message|>`),
        the text of the last `final` channel only, up to its message's end (`<|end|>`, or the
        next `<|start|>`), "" before one opens (the `analysis` channel, the model's reasoning,
        is not the answer)."""
        if self.harmony is None:
            return self.tokenizer.decode(reply)
        channel, message, *ends = self.harmony
        start = stop = None
        for i, token in enumerate(reply):
            if token == channel:
                name_end = next((j for j in range(i + 1, len(reply)) if reply[j] == message), None)
                if name_end is not None:
                    name = self.tokenizer.decode(reply[i + 1 : name_end]).strip()
                    start, stop = (name_end + 1 if name == "final" else None), None
            elif token in ends and start is not None and stop is None:
                stop = i
        return "" if start is None else self.tokenizer.decode(reply[start:stop])


def check_chat_files(path: str | Path) -> None:
    """Before a model is read (minutes, for a 30B one): ValueError, as `ChatTemplate` would raise
    it, where the tokenizer folder of `path` (a run, one of its checkpoints, or a Hugging Face
    checkpoint) has no chat template or transformers is missing; a folder without a
    tokenizer.json is left to the loader to report."""
    path = Path(path)
    folder = path.parent.parent if path.parent.name == CHECKPOINT_DIR else path
    if (folder / "tokenizer.json").is_file():
        _renderer_class()
        _chat_template(folder)


def _renderer_class() -> type:
    """transformers' PreTrainedTokenizerFast, whose sandboxed apply_chat_template renders a
    template; ValueError saying how to install it where it is missing."""
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError as e:
        raise ValueError(NEEDS_TRANSFORMERS) from e
    return PreTrainedTokenizerFast


def chat_prompt(folder: str | Path, tokenizer: Tokenizer, messages: list[dict]) -> ChatPrompt:
    """`messages` in the chat template of `folder`, ready for the reply (`ChatTemplate.render`)."""
    return ChatTemplate(folder, tokenizer).render(messages)


def _read_json(path: Path) -> dict:
    """A JSON object file of the checkpoint, or {} where there is none."""
    return read_checkpoint_json(path) if path.is_file() else {}


def _token_text(value: object) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _tokenizer_settings(folder: Path) -> dict[str, str]:
    """The special tokens a template reads (bos_token, eos_token, ...), from
    special_tokens_map.json, then tokenizer_config.json over it."""
    merged = {**_read_json(folder / "special_tokens_map.json"),
              **_read_json(folder / "tokenizer_config.json")}  # fmt: skip
    names = ("bos_token", "eos_token", "unk_token", "pad_token")
    return {n: text for n in names if (text := _token_text(merged.get(n))) is not None}


def _chat_template(folder: Path) -> str:
    """chat_template.jinja, else chat_template.json's or tokenizer_config.json's chat_template
    (a string, or a list of {"name", "template"}: the one named "default")."""
    if (folder / "chat_template.jinja").is_file():
        return read_text(folder / "chat_template.jinja", REDOWNLOAD)
    for name in ("chat_template.json", "tokenizer_config.json"):
        template = _read_json(folder / name).get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            if not isinstance(named.get("default"), str):
                raise ValueError(
                    f"{folder / name} lists chat templates named {sorted(map(str, named))}, "
                    'none "default": moekit uses the default one'
                )
            template = named["default"]
        if isinstance(template, str):
            return template
        if template is not None:  # a number, say: the key is there, its value is not a template
            raise ValueError(
                f"{folder / name}: chat_template is {template!r}, not a template (a Jinja string, "
                'or a list of {"name", "template"}): restore the checkpoint\'s file'
            )
    raise ValueError(
        f"{folder} has no chat template (chat_template.jinja, or chat_template in "
        "chat_template.json or tokenizer_config.json): generate without --chat, or copy the "
        "checkpoint's tokenizer_config.json and chat_template.jinja beside its tokenizer.json"
    )


def _end_ids(folder: Path, tokenizer: Tokenizer, eos_token: str | None) -> tuple[int, ...]:
    """generation_config.json's eos_token_id (one id or a list), then the tokenizer's end token;
    each once, in that order."""
    listed = _read_json(folder / "generation_config.json").get("eos_token_id")
    ids = [] if listed is None else [listed] if not isinstance(listed, list) else listed
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(
            f"{folder / 'generation_config.json'}: eos_token_id={listed!r} is not a token id or "
            "a list of them"
        )
    if eos_token is not None and (eos := tokenizer.token_to_id(eos_token)) is not None:
        ids.append(eos)
    remedy = "set eos_token_id in generation_config.json or eos_token in tokenizer_config.json"
    if not ids:
        raise ValueError(f"{folder} names no token that ends a reply: {remedy}")
    vocab = tokenizer.get_vocab_size()
    if any(not 0 <= i < vocab for i in ids):
        raise ValueError(
            f"{folder}: the chat's end tokens {ids} are not all ids of its {vocab}-token "
            f"tokenizer: {remedy}"
        )
    return tuple(dict.fromkeys(ids))


class MessageTooLong(ValueError):
    """A message that fills the model's context alone: the conversation can go on without it."""


class ChatSession:
    """A conversation with `model`, turn by turn. The cache keeps the keys and values of every
    token fed so far (it grows with the conversation, up to max_seq_len), and each turn's whole
    conversation, rendered afresh, is fed only from where it departs from what the cache holds:
    a template may rewrite earlier turns (drop a reply's reasoning, say), and a reply's text may
    encode to other tokens than the model emitted.

        session = ChatSession(model, tokenizer, folder, system="Be brief.")
        prompt = session.ask("Why MoE?", max_new_tokens=200)  # ids: what the cache lacks
        new_ids = generate(model, torch.tensor([prompt.ids]), 200,
                           eos_token_id=prompt.end_ids, kv_cache=session.cache)
        session.answered(new_ids[0].tolist())
    """

    FIRST_ROOM = 256  # positions the cache starts with; it doubles (or more) when a turn needs

    def __init__(self, model: MoETransformer, tokenizer: Tokenizer, folder: str | Path,
                 system: str = "") -> None:  # fmt: skip
        self.template = ChatTemplate(folder, tokenizer)
        self.max_seq_len = model.cfg.max_seq_len
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.cache = KVCache.for_model(model, 1, min(self.FIRST_ROOM, self.max_seq_len))
        self.fed: list[int] = []  # the tokens whose keys and values the cache holds, in order
        self._pending: tuple[list[dict], list[int]] | None = None  # asked, not yet answered

    def ask(self, text: str, max_new_tokens: int) -> ChatPrompt:
        """The conversation with the user's `text` appended, ready for a reply of up to
        `max_new_tokens` (room made for it within max_seq_len): its ids only from where they
        depart from the cached tokens (the cache cropped to there; at least one id, whose
        logits start the reply). The turn joins the conversation with `answered`; a ValueError
        (the conversation fills the model's context) changes nothing."""
        messages = [*self.messages, {"role": "user", "content": text}]
        prompt = self.template.render(messages)
        if len(prompt.ids) >= self.max_seq_len:
            raise self._too_long(messages, len(prompt.ids))
        same = 0
        for cached, new in zip(self.fed, prompt.ids[:-1], strict=False):
            if cached != new:
                break
            same += 1
        self.cache.crop(same)
        self.fed = self.fed[:same]
        needed = min(self.max_seq_len, len(prompt.ids) + max_new_tokens)
        if needed > self.cache.max_len:
            self.cache.reserve(min(self.max_seq_len, max(needed, 2 * self.cache.max_len)))
        self._pending = messages, prompt.ids[same:]
        return dataclasses.replace(prompt, ids=prompt.ids[same:])

    def _too_long(self, messages: list[dict], n_tokens: int) -> ValueError:
        """Why a conversation of `n_tokens` (rendered, with the new message last) leaves no room
        for a reply: the message itself (MessageTooLong), where it fills the context without the
        earlier turns (a new conversation would not help), else the conversation."""
        alone = [m for m in messages[:-1] if m["role"] == "system"][:1] + messages[-1:]
        n_alone = n_tokens if alone == messages else len(self.template.render(alone).ids)
        room = self.max_seq_len - 1  # a reply needs one position
        if n_alone > room:
            return MessageTooLong(
                f"the message is too long for the model's context: {n_alone} tokens in the chat "
                f"template, {n_alone - room} more than the {room} that max_seq_len="
                f"{self.max_seq_len} leaves before a reply; shorten it by at least "
                f"{n_alone - room} tokens"
            )
        return ValueError(
            f"the conversation is {n_tokens} tokens with this message, the model's whole "
            f"context (max_seq_len={self.max_seq_len}): start a new conversation (the message "
            f"alone is {n_alone} tokens)"
        )

    def answered(self, reply: list[int]) -> None:
        """The reply to the last `ask`, as generate returned it (its last token was never fed:
        the cache ends before it); the turn and the reply join the conversation."""
        if self._pending is None or not reply:
            raise ValueError("answered() takes the non-empty reply to the turn `ask` started")
        messages, fed = self._pending
        fed = self.fed + fed + reply[:-1]
        if len(fed) != self.cache.length:
            raise ValueError(
                f"the chat cache holds {self.cache.length} positions where {len(fed)} tokens "
                "were fed: generate with kv_cache=session.cache on the ids `ask` returned"
            )
        self.fed = fed
        text = self.template.reply_text(reply)  # the answer: no end token, no reasoning
        self.messages = [*messages, {"role": "assistant", "content": text}]
        self._pending = None
