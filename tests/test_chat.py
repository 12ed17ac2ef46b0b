"""Chat templates (`moekit.interop.chat`, `moekit generate --chat=true`): the prompt's ids are
transformers' own, the reply ends at any of the checkpoint's end tokens, converted and quantized
runs keep the template, and a checkpoint without one is one line of error."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, processors

from moekit import MoETransformer, load
from moekit.cli import main
from moekit.config import ModelConfig
from moekit.data.tokenizer import byte_tokenizer
from moekit.interop import save_hf
from moekit.interop.chat import ChatSession, chat_prompt
from moekit.model import generate

transformers = pytest.importorskip("transformers")

# Qwen's ChatML, with its default system message (as Qwen2.5's template writes one).
CHATML = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{% endif %}"
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Mistral's [INST] form: the template writes the BOS token itself, and a system turn raises.
INST = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('system messages are not supported') }}{% elif m['role'] == 'user' %}"
    "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ m['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo"}]


def chat_tokenizer(bos: bool = False) -> Tokenizer:
    """Bytes, <|endoftext|> (256), then <|im_start|>, <|im_end|>, <s>, </s> (257-260); with `bos`
    its post-processor adds <s> to every encoding, as Llama's and Mistral's tokenizer.json do."""
    tok = byte_tokenizer()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<s>", "</s>"])
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 259)]
        )
    return tok


def chat_folder(folder: Path, template: str, *, bos: bool = False, jinja: bool = False) -> Path:
    """A tiny Mixtral checkpoint with a chat tokenizer and `template` (in tokenizer_config.json,
    or with `jinja` in chat_template.jinja), ending at <|im_end|> or <|endoftext|>."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny").replace(vocab_size=261, tie_embeddings=False, max_seq_len=256)
    save_hf(MoETransformer(cfg), folder, "mixtral", tokenizer=chat_tokenizer(bos))
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    # eos as older checkpoints write special tokens: an AddedToken record
    eos = {"__type": "AddedToken", "content": "<|im_end|>", "special": True}
    settings.update(bos_token="<s>", eos_token=eos)
    if jinja:
        (folder / "chat_template.jinja").write_text(template)
    else:
        settings["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [258, 256]}))
    return folder


@pytest.mark.parametrize(
    ("template", "bos", "jinja", "messages"),
    [
        (CHATML, False, False, MESSAGES),
        (CHATML, False, True, MESSAGES[1:]),
        (INST, True, False, MESSAGES[1:]),
    ],
    ids=["chatml-with-system", "chatml-jinja-default-system", "inst-bos-in-template"],
)
def test_prompt_ids_are_transformers_own(tmp_path, template, bos, jinja, messages) -> None:
    folder = chat_folder(tmp_path / "hf", template, bos=bos, jinja=jinja)
    ours = chat_prompt(folder, Tokenizer.from_file(str(folder / "tokenizer.json")), messages)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)  # reads the files by itself
    expected = theirs.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert ours.ids == list(expected)
    assert ours.text.endswith("<|im_start|>assistant\n" if template == CHATML else " [/INST]")
    assert ours.ids.count(259) == (1 if bos else 0)  # the template's BOS, not a second one
    assert ours.end_ids == (258, 256)  # generation_config's, the tokenizer's <|im_end|> once


def test_a_template_that_refuses_or_a_folder_without_one_is_one_error(tmp_path) -> None:
    folder = chat_folder(tmp_path / "hf", INST, bos=True)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    with pytest.raises(ValueError, match="refused the conversation: system messages are not"):
        chat_prompt(folder, tok, MESSAGES)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    del settings["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError, match="has no chat template"):
        chat_prompt(folder, tok, MESSAGES[1:])
    settings["chat_template"] = CHATML
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [9999]}))
    with pytest.raises(ValueError, match=r"end tokens \[9999, 258\] are not ids"):
        chat_prompt(folder, tok, MESSAGES[1:])


def test_generation_ends_at_any_of_several_end_tokens() -> None:
    """The reply stops after the first of the end ids it emits; a finished row of a batch is
    padded with the first end id; speculative decoding stops alike."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny").replace(vocab_size=97, mtp_depth=1)
    model = MoETransformer(cfg).eval()
    prompt = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(1))
    free = generate(model, prompt, 12)
    stop = int(free[0, 3])
    first = next(i for i, t in enumerate(free[0].tolist()) if t == stop)
    unused = next(t for t in range(97) if t not in free.tolist()[0])
    ends = [unused, stop]
    out = generate(model, prompt, 12, eos_token_id=ends)
    assert out[0, : first + 1].tolist() == free[0, : first + 1].tolist()
    row1_ends = [i for i, t in enumerate(free[1].tolist()) if t in ends]
    if out.shape[1] > first + 1:  # row 1 ran on: row 0 is padded with the first end id
        assert set(out[0, first + 1 :].tolist()) == {ends[0]}
    assert out.shape[1] == max(first, row1_ends[0] if row1_ends else 11) + 1
    spec = generate(model, prompt[:1], 12, eos_token_id=ends, speculative="mtp")
    assert spec[0].tolist() == free[0, : first + 1].tolist()
    with pytest.raises(ValueError, match="eos_token_id"):
        generate(model, prompt, 3, eos_token_id=[1, -2])


def test_generate_chat_replies_and_converted_or_quantized_runs_keep_the_template(
    tmp_path, capsys
) -> None:
    folder = chat_folder(tmp_path / "hf", CHATML)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    chat = chat_prompt(folder, tok, [{"role": "user", "content": "def f("}])
    loaded = load(folder)
    ids = generate(loaded.model, torch.tensor([chat.ids]), 6, eos_token_id=chat.end_ids)
    # what the stream shows: the longest decoded prefix that does not end inside a character
    texts = [tok.decode(ids[0, : k + 1].tolist()) for k in range(ids.shape[1])]
    expected = max((t for t in texts if not t.endswith("\ufffd")), key=len, default="")
    assert expected  # the reply is not empty
    args = ["--chat=true", "--prompt=def f(", "--max_new_tokens=6", "--temperature=0"]
    run, quantized = tmp_path / "run", tmp_path / "int8"
    assert main(["convert", "--from-hf", str(folder), "--out", str(run)]) == 0
    assert main(["quantize", str(folder), "--weights=int8", "--out", str(quantized)]) == 0
    capsys.readouterr()
    for source in (folder, run):
        assert main(["generate", str(source), *args]) == 0
        out = capsys.readouterr().out
        assert out == expected + "\n"  # the reply alone: the prompt is not echoed
    assert (quantized / "chat_template.jinja").exists() or (
        "chat_template" in json.loads((quantized / "tokenizer_config.json").read_text())
    )
    assert main(["generate", str(quantized), *args]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["generate", str(folder), "--system=be brief", "--prompt=x"]) == 2
    assert "add --chat=true" in capsys.readouterr().err
    (run / "tokenizer_config.json").unlink()
    assert main(["generate", str(run), *args]) == 2
    err = capsys.readouterr().err
    assert "has no chat template" in err and "Traceback" not in err


# ChatML whose history shows each earlier reply after a marker: a template that rewrites past
# turns (as Qwen3's drops a reply's reasoning), so a turn departs from the cached tokens where the
# last reply began.
MARKED_REPLIES = "(('[said] ' + m['content']) if m['role'] == 'assistant' else m['content'])"
CHATML_REWRITING = CHATML.replace("m['content']", MARKED_REPLIES)


def fresh_reply(folder: Path, messages: list[dict], n: int) -> list[int]:
    """The greedy reply to `messages` from a model loaded anew, the whole conversation fed."""
    loaded = load(folder)
    prompt = chat_prompt(folder, loaded.tokenizer, messages)
    return generate(loaded.model, torch.tensor([prompt.ids]), n, eos_token_id=prompt.end_ids)[
        0
    ].tolist()


@pytest.mark.parametrize("template", [CHATML, CHATML_REWRITING], ids=["chatml", "rewriting"])
def test_a_conversation_reuses_its_cache_and_replies_as_a_fresh_model(tmp_path, template) -> None:
    """Each turn feeds only the tokens past what the cache holds (cropped where the template
    rewrote history) and replies with the tokens a fresh model fed the whole conversation gives."""
    folder = chat_folder(tmp_path / "hf", template)
    loaded = load(folder)
    session = ChatSession(loaded.model, loaded.tokenizer, folder, system="Be brief.")
    history = [{"role": "system", "content": "Be brief."}]
    reply_start = 0  # where the last reply's tokens begin in the cache
    for text in ["héllo", "and then?", "why"]:
        before = session.cache.length
        prompt = session.ask(text)
        full = chat_prompt(folder, loaded.tokenizer, [*history, {"role": "user", "content": text}])
        assert prompt.ids == full.ids[len(full.ids) - len(prompt.ids) :]  # a suffix of it
        assert session.cache.length == len(full.ids) - len(prompt.ids) <= before
        if template == CHATML:  # history renders as it was fed, up to the reply at least (the
            assert session.cache.length >= reply_start  # reply's text may encode otherwise)
        reply_start = session.cache.length + len(prompt.ids)
        ids = torch.tensor([prompt.ids])
        reply = generate(loaded.model, ids, 5, eos_token_id=prompt.end_ids, kv_cache=session.cache)
        reply = reply[0].tolist()
        history += [{"role": "user", "content": text}]
        assert reply == fresh_reply(folder, history, 5)
        session.answered(prompt.ids, reply)
        history += [{"role": "assistant", "content": loaded.tokenizer.decode(reply)}]
        assert session.messages == history
        if template == CHATML_REWRITING:  # the marker departs from the reply's cached tokens
            assert session.ask("ok").text.count("[said]") == len(history) // 2
            assert session.cache.length == reply_start
            session.messages.pop()  # "ok" was not answered


def test_generate_chat_without_a_prompt_converses_over_stdin(tmp_path, capsys, monkeypatch):
    folder = chat_folder(tmp_path / "hf", CHATML)
    monkeypatch.setattr("sys.stdin", io.StringIO("héllo\n\nand then?\n"))
    args = ["--chat=true", "--max_new_tokens=4", "--temperature=0"]
    assert main(["generate", str(folder), *args]) == 0
    replies = capsys.readouterr().out.splitlines()
    history, expected = [], []
    tok = load(folder).tokenizer
    for text in ("héllo", "and then?"):  # the blank line is no turn
        history.append({"role": "user", "content": text})
        ids = fresh_reply(folder, history, 4)
        history.append({"role": "assistant", "content": tok.decode(ids)})
        texts = [tok.decode(ids[: k + 1]) for k in range(len(ids))]
        expected.append(max((t for t in texts if not t.endswith("\ufffd")), key=len, default=""))
    assert replies == expected
    monkeypatch.setattr("sys.stdin", io.StringIO("x\n"))
    assert main(["generate", str(folder), *args, "--speculative=mtp"]) == 2
    assert "a conversation" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO("x" * 600 + "\n"))
    assert main(["generate", str(folder), *args]) == 2
    assert "leaves no room to generate" in capsys.readouterr().err
