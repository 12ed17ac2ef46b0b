"""A checkpoint's chat template: the prompt a chat model was trained to answer, rendered as
`transformers` renders it, and the tokens that end its reply.

Instruct and chat checkpoints (Qwen3, GPT-OSS, Mixtral-Instruct, DeepSeek-V3, OLMoE-Instruct) ship
a Jinja template (`chat_template.jinja`, or `chat_template` in tokenizer_config.json) that wraps
the conversation in the role markers the model was tuned on; given raw text they ramble. The
template is untrusted code from the checkpoint, so it is rendered by transformers' own sandboxed
renderer (`PreTrainedTokenizerFast.apply_chat_template`), never by a Jinja environment of ours;
its text is then encoded by the checkpoint's tokenizer without added special tokens (the template
writes its own), which gives transformers' ids (tests/test_chat.py). The reply ends at any of the
ids generation_config.json lists as `eos_token_id` (a chat model's end of turn and end of text)
or the tokenizer's own end token.

`moekit convert --from-hf`, `quantize` and `upcycle` copy these files into the run beside its
tokenizer.json (`moekit.data.tokenizer.CHAT_FILES`): a converted or quantized chat model chats.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from moekit.model import MoETransformer
from moekit.model.generation import KVCache
from moekit.userfiles import REDOWNLOAD, read_json

NEEDS_TRANSFORMERS = (
    "rendering a chat template needs transformers (its sandboxed renderer): "
    "pip install 'moekit[hf]'"
)


@dataclass
class ChatPrompt:
    """A conversation rendered for the model: text (what the template wrote), ids (its tokens)
    and end_ids (the tokens that end the reply, in the order found)."""

    text: str
    ids: list[int]
    end_ids: tuple[int, ...]


def chat_prompt(folder: str | Path, tokenizer: Tokenizer, messages: list[dict]) -> ChatPrompt:
    """`messages` ([{"role": "system" | "user" | "assistant", "content": str}, ...]) in the chat
    template of `folder` (a Hugging Face checkpoint or a run holding its tokenizer files), ready
    for the assistant's reply; `tokenizer` is the folder's tokenizer.json as loaded. Raises
    ValueError when the folder has no template or the template refuses the conversation."""
    folder = Path(folder)
    template = chat_template(folder)
    from jinja2.exceptions import TemplateError  # (transformers' dependency, checked above)
    from transformers import PreTrainedTokenizerFast

    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, **_tokenizer_settings(folder)
    )
    try:
        text = hf_tokenizer.apply_chat_template(
            messages, chat_template=template, add_generation_prompt=True, tokenize=False
        )
    except TemplateError as e:
        raise ValueError(f"{folder}'s chat template refused the conversation: {e}") from e
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    return ChatPrompt(text, ids, _end_ids(folder, tokenizer, hf_tokenizer.eos_token))


def _read_json(path: Path) -> dict:
    """A JSON object file of the checkpoint, or {} where there is none."""
    return read_json(path, REDOWNLOAD) if path.is_file() else {}


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


def chat_template(folder: Path) -> str:
    """The template of `folder`: chat_template.jinja, else chat_template.json's, else
    tokenizer_config.json's (a string, or a list of {"name", "template"}: the one named
    "default"). Raises ValueError where there is none or transformers is not installed."""
    try:
        import transformers  # noqa: F401 (its renderer renders the template)
    except ImportError as e:
        raise ValueError(NEEDS_TRANSFORMERS) from e
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        template = _read_json(folder / name).get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if isinstance(template, str):
            return template
    raise ValueError(
        f"{folder} has no chat template (chat_template.jinja, or chat_template in "
        "tokenizer_config.json): generate without --chat, or copy the checkpoint's "
        "tokenizer_config.json and chat_template.jinja beside its tokenizer.json"
    )


def _end_ids(folder: Path, tokenizer: Tokenizer, eos_token: str | None) -> tuple[int, ...]:
    """generation_config.json's eos_token_id (one id or a list), then the tokenizer's end token;
    each once, in that order."""
    listed = _read_json(folder / "generation_config.json").get("eos_token_id")
    ids = [listed] if isinstance(listed, int) else list(listed or [])
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(
            f"{folder / 'generation_config.json'}: eos_token_id={listed!r} is not a token id or "
            "a list of them"
        )
    if eos_token is not None and (eos := tokenizer.token_to_id(eos_token)) is not None:
        ids.append(eos)
    vocab = tokenizer.get_vocab_size()
    if not ids or any(not 0 <= i < vocab for i in ids):
        raise ValueError(
            f"{folder}: the chat's end tokens {ids} are not ids of its {vocab}-token tokenizer: "
            "set eos_token_id in generation_config.json or eos_token in tokenizer_config.json"
        )
    return tuple(dict.fromkeys(ids))


class ChatSession:
    """A conversation with `model`, turn by turn, that reads each earlier token once: the cache
    keeps the keys and values of every token fed so far, and each turn's whole conversation,
    rendered afresh (a template may rewrite earlier turns: drop a reply's reasoning, say), is fed
    only from where it departs from what the cache holds.

        session = ChatSession(model, tokenizer, folder, system="Be brief.")
        prompt = session.ask("Why MoE?")  # prompt.ids: the tokens the cache has not seen
        new_ids = generate(model, torch.tensor([prompt.ids]), 200,
                           eos_token_id=prompt.end_ids, kv_cache=session.cache)
        session.answered(prompt.ids, new_ids[0].tolist())
    """

    def __init__(self, model: MoETransformer, tokenizer: Tokenizer, folder: str | Path,
                 system: str = "") -> None:  # fmt: skip
        self.tokenizer, self.folder = tokenizer, Path(folder)
        chat_template(self.folder)  # there is one (else a ValueError now, not at the first turn)
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.cache = KVCache.for_model(model, 1, model.cfg.max_seq_len)
        self.fed: list[int] = []  # the tokens whose keys and values the cache holds, in order

    def ask(self, text: str) -> ChatPrompt:
        """The conversation with the user's `text` appended, ready for the reply: its ids only
        from where they depart from the cached tokens (the cache cropped to there; at least one
        id, whose logits start the reply)."""
        messages = [*self.messages, {"role": "user", "content": text}]
        prompt = chat_prompt(self.folder, self.tokenizer, messages)
        same = 0
        for cached, new in zip(self.fed, prompt.ids[:-1], strict=False):
            if cached != new:
                break
            same += 1
        self.cache.crop(same)
        self.fed = self.fed[:same]
        self.messages = messages
        return ChatPrompt(prompt.text, prompt.ids[same:], prompt.end_ids)

    def answered(self, fed: list[int], reply: list[int]) -> None:
        """Record a turn: `fed` the prompt ids generate was given, `reply` the ids it returned
        (their last one was never fed: the cache ends before it)."""
        self.fed += fed + reply[:-1]
        if len(self.fed) != self.cache.length:
            raise RuntimeError(
                f"the chat cache holds {self.cache.length} positions, {len(self.fed)} tokens fed"
            )
        text = self.tokenizer.decode(reply)  # special tokens (the end of turn) skipped
        self.messages.append({"role": "assistant", "content": text})
