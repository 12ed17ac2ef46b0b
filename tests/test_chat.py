"""Chat templates (`moekit.interop.chat`, `moekit generate --chat=true`): the prompt's ids are
transformers' own, the reply ends at any of the checkpoint's end tokens, converted and quantized
runs keep the template, and a checkpoint without one is one line of error."""

from __future__ import annotations

import io
import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, processors

from moekit import MoETransformer, load
from moekit.cli import main
from moekit.config import ModelConfig
from moekit.data.tokenizer import byte_tokenizer
from moekit.interop import save_hf
from moekit.interop.chat import ChatSession, ChatTemplate, chat_prompt
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
    or with `jinja` in chat_template.jinja), ending at <|im_end|> or <|endoftext|>, whose greedy
    replies are ASCII (so their text encodes back to the tokens emitted)."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny").replace(vocab_size=261, tie_embeddings=False, max_seq_len=256)
    model = MoETransformer(cfg)
    with torch.no_grad():  # ASCII replies: every other token's logit 0, below the best ASCII one
        model.lm_head.weight[128:] = 0
    save_hf(model, folder, "mixtral", tokenizer=chat_tokenizer(bos))
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


def test_a_template_that_fails_or_a_folder_without_one_is_one_error(tmp_path) -> None:
    folder = chat_folder(tmp_path / "hf", INST, bos=True)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    with pytest.raises(ValueError, match="failed on the conversation: TemplateError: system"):
        chat_prompt(folder, tok, MESSAGES)
    settings = json.loads((folder / "tokenizer_config.json").read_text())

    def with_settings(**changes) -> None:
        (folder / "tokenizer_config.json").write_text(json.dumps({**settings, **changes}))

    for template, message in [
        ("{{ 'a' + 1 }}", "failed on the conversation: TypeError"),  # the template's own bug
        ("{% if false %}x{% endif %}", "rendered the conversation as nothing"),
        ([{"name": "tool_use", "template": CHATML}], "named \\['tool_use'\\], none \"default\""),
        (5, "chat_template is 5, not a template"),  # it said "has no chat template"
    ]:
        with_settings(chat_template=template)
        with pytest.raises(ValueError, match=message):
            chat_prompt(folder, tok, MESSAGES[1:])
    with_settings(chat_template=None)
    with pytest.raises(ValueError, match="has no chat template"):
        chat_prompt(folder, tok, MESSAGES[1:])
    (folder / "chat_template.jinja").write_bytes(b"\xff\xfe{{ x }}")  # not UTF-8
    with pytest.raises(ValueError, match=r"chat_template\.jinja"):
        chat_prompt(folder, tok, MESSAGES[1:])
    (folder / "chat_template.jinja").unlink()
    with_settings(chat_template=CHATML)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [9999]}))
    with pytest.raises(ValueError, match=r"end tokens \[9999, 258\] are not all ids"):
        chat_prompt(folder, tok, MESSAGES[1:])
    for bad in (2.5, "258", [258, None]):
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": bad}))
        with pytest.raises(ValueError, match="is not a token id or a list of them"):
            chat_prompt(folder, tok, MESSAGES[1:])
    (folder / "generation_config.json").unlink()
    with_settings(chat_template=CHATML, eos_token=None)
    with pytest.raises(ValueError, match="names no token that ends a reply"):
        chat_prompt(folder, tok, MESSAGES[1:])


def test_generation_ends_at_any_of_several_end_tokens() -> None:
    """Each row stops after the first of the end ids it emits (one row at one id, the other at
    the other); a finished row is padded (with the first end id, or pad_token_id); speculative
    decoding stops alike; numpy and tensor ids are ids."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny").replace(vocab_size=97, mtp_depth=1)
    model = MoETransformer(cfg).eval()
    prompt = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(1))
    free = generate(model, prompt, 12)
    ends = [int(free[1, 2]), int(free[0, 3])]  # row 1 emits the first, row 0 the second
    out = generate(model, prompt, 12, eos_token_id=ends)
    stops = [next(i for i, t in enumerate(free[r].tolist()) if t in ends) for r in (0, 1)]
    assert out.shape[1] == max(stops) + 1
    for r, stop in enumerate(stops):
        assert out[r, : stop + 1].tolist() == free[r, : stop + 1].tolist()
        assert set(out[r, stop + 1 :].tolist()) <= {ends[0]}  # padding
    assert free[0, stops[0]] in ends and free[1, stops[1]] in ends
    pad = next(t for t in range(97) if t not in free.flatten().tolist())  # a token neither emits
    padded = generate(model, prompt, 12, eos_token_id=ends, pad_token_id=pad)
    early = min((0, 1), key=lambda r: stops[r])
    assert stops[early] < max(stops)  # one row finished first: padded until the other ends
    assert padded[early, stops[early] + 1 :].tolist() == [pad] * (max(stops) - stops[early])
    spec = generate(model, prompt[:1], 12, eos_token_id=ends, speculative="mtp")
    assert spec[0].tolist() == free[0, : stops[0] + 1].tolist()
    one = int(free[0, stops[0]])
    for same in (one, np.int64(one), torch.tensor(one), [torch.tensor(one)]):
        assert torch.equal(generate(model, prompt[:1], 12, eos_token_id=same), spec)
    for bad in ([1, -2], "x", 1.5):
        with pytest.raises(ValueError, match="eos_token_id"):
            generate(model, prompt, 3, eos_token_id=bad)


def test_generate_chat_replies_and_converted_or_quantized_runs_keep_the_template(
    tmp_path, capsys
) -> None:
    folder = chat_folder(tmp_path / "hf", CHATML)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    expected = tok.decode(fresh_reply(load(folder).model, folder, [user("def f(")], 6))
    assert expected.isascii() and expected
    args = ["--chat=true", "--prompt=def f(", "--max_new_tokens=6", "--temperature=0"]
    run, quantized, back = tmp_path / "run", tmp_path / "int8", tmp_path / "back"
    assert main(["convert", "--from-hf", str(folder), "--out", str(run)]) == 0
    assert main(["convert", "--to-hf", str(run), "--arch=mixtral", "--out", str(back)]) == 0
    assert main(["quantize", str(folder), "--weights=int8", "--out", str(quantized)]) == 0
    capsys.readouterr()
    for source in (folder, run, back):
        assert main(["generate", str(source), *args]) == 0
        assert capsys.readouterr().out == expected + "\n"  # the reply alone, not the prompt
    assert "chat_template" in json.loads((quantized / "tokenizer_config.json").read_text())
    assert main(["generate", str(quantized), *args]) == 0
    assert capsys.readouterr().out.strip()
    missing = str(tmp_path / "nothing here")  # flags are checked before a model is read
    assert main(["generate", missing, "--system=be brief", "--prompt=x"]) == 2
    assert "add --chat=true" in capsys.readouterr().err
    assert main(["generate", missing, "--chat=true", "--speculative=mtp"]) == 2
    assert "a conversation" in capsys.readouterr().err
    (run / "tokenizer_config.json").unlink()
    checkpoint = run / "checkpoints" / "step-000000"
    for path in (run, checkpoint):  # found before the model is read: no load happens
        with mock.patch("moekit.cli.generate.load", side_effect=AssertionError("loaded")):
            assert main(["generate", str(path), *args]) == 2
        err = capsys.readouterr().err
        assert "has no chat template" in err and "Traceback" not in err


# ChatML whose history shows each earlier reply after a marker: a template that rewrites past
# turns (as Qwen3's drops a reply's reasoning), so a turn departs from the cached tokens where the
# last reply began.
MARKED_REPLIES = "(('[said] ' + m['content']) if m['role'] == 'assistant' else m['content'])"
CHATML_REWRITING = CHATML.replace("m['content']", MARKED_REPLIES)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def fresh_reply(model: MoETransformer, folder: Path, messages: list[dict], n: int) -> list[int]:
    """The greedy reply to `messages`, the whole conversation fed to a fresh cache."""
    prompt = chat_prompt(folder, load(folder).tokenizer, messages)
    ids = generate(model, torch.tensor([prompt.ids]), n, eos_token_id=prompt.end_ids)
    return ids[0].tolist()


@pytest.mark.parametrize("template", [CHATML, CHATML_REWRITING], ids=["chatml", "rewriting"])
def test_a_conversation_reuses_its_cache_and_replies_as_a_fresh_model(
    tmp_path, template, monkeypatch
) -> None:
    """Each turn feeds only the tokens past what the cache holds (all of the last reply but its
    last token, or, under a template that rewrites it, up to where it began), grows the cache as
    it needs, and replies with the tokens a fresh cache fed the whole conversation gives; one
    reply ends at the end-of-turn token."""
    folder = chat_folder(tmp_path / "hf", template)
    loaded = load(folder)
    model, tok = loaded.model, loaded.tokenizer
    first = fresh_reply(model, folder, [{"role": "system", "content": "Be brief."}, user("hi")], 5)
    k = next(k for k in range(1, 5) if first[k] not in first[:k])  # its first new token after one
    with torch.no_grad():  # <|im_end|> now wins where that token would, just
        model.lm_head.weight[258] = 1.001 * model.lm_head.weight[first[k]]
    monkeypatch.setattr(ChatSession, "FIRST_ROOM", 16)  # so that it grows within this talk
    session = ChatSession(model, tok, folder, system="Be brief.")
    history, reply_start, reply, ended = [{"role": "system", "content": "Be brief."}], 0, [], 0
    for turn, text in enumerate(["hi", "and then?", "why", "ok"]):
        n = 40 if turn == 3 else 5
        prompt = session.ask(text, n)
        full = chat_prompt(folder, tok, [*history, user(text)])
        assert prompt.ids == full.ids[len(full.ids) - len(prompt.ids) :]  # a suffix of it
        assert session.cache.length == len(full.ids) - len(prompt.ids)
        if turn:  # kept: the history up to the reply, and (ChatML) the reply but its last token
            kept = reply_start + (len(reply) - 1 if template == CHATML else 0)
            assert session.cache.length == kept
        assert session.cache.max_len >= len(full.ids) + n - 1  # room made
        reply_start = session.cache.length + len(prompt.ids)
        ids = torch.tensor([prompt.ids])
        reply = generate(model, ids, n, eos_token_id=prompt.end_ids, kv_cache=session.cache)
        reply = reply[0].tolist()
        assert reply == fresh_reply(model, folder, [*history, user(text)], n)
        ended += reply[-1] == 258
        session.answered(reply)
        history += [user(text), {"role": "assistant", "content": tok.decode(reply)}]
        assert session.messages == history and session.cache.length == len(session.fed)
    assert [*first[:k], 258] == fresh_reply(model, folder, history[:2], 5) and ended >= 1


def test_a_conversation_that_fills_the_context_is_refused_unchanged(tmp_path) -> None:
    """A message too long for the context on its own says so, and by how much (a new
    conversation would not help); one that fits alone but not after the earlier turns says to
    start a new conversation. Either changes nothing."""
    folder = chat_folder(tmp_path / "hf", CHATML)
    loaded = load(folder)
    session = ChatSession(loaded.model, loaded.tokenizer, folder, system="Be brief.")
    before = (list(session.messages), session.cache.length)
    n = len(chat_prompt(folder, loaded.tokenizer, [session.messages[0], user("x" * 300)]).ids)
    over = n - 255  # max_seq_len=256 leaves 255 positions before a reply
    with pytest.raises(ValueError, match=f"message is too long for the model's context: {n} "
                       f"tokens.* shorten it by at least {over} tokens"):  # fmt: skip
        session.ask("x" * 300, 5)
    assert (session.messages, session.cache.length) == before and session._pending is None
    with pytest.raises(ValueError, match="non-empty reply to the turn `ask` started"):
        session.answered([1])
    prompt = session.ask("x" * 120, 5)
    session.answered(generate(loaded.model, torch.tensor([prompt.ids]), 5,
                              kv_cache=session.cache)[0].tolist())  # fmt: skip
    before = (list(session.messages), session.cache.length)
    with pytest.raises(ValueError, match=r"max_seq_len=256\): start a new conversation"):
        session.ask("y" * 120, 5)  # alone it fits
    assert (session.messages, session.cache.length) == before and session._pending is None
    with pytest.raises(ValueError, match="the message is too long"):
        session.ask("y" * 260, 5)  # alone it does not


def test_generate_chat_without_a_prompt_converses_over_stdin(tmp_path, capsys, monkeypatch):
    folder = chat_folder(tmp_path / "hf", CHATML)
    monkeypatch.setattr("sys.stdin", io.StringIO("héllo\r\n\nand then?\n"))
    args = ["--chat=true", "--max_new_tokens=4", "--temperature=0"]
    assert main(["generate", str(folder), *args]) == 0
    replies = capsys.readouterr().out.split("\n")[:-1]  # (not splitlines: replies hold \x1e)
    history, expected = [], []
    loaded = load(folder)
    for text in ("héllo", "and then?"):  # the blank line is no turn; the \r is no part of it
        ids = fresh_reply(loaded.model, folder, [*history, user(text)], 4)
        reply = loaded.tokenizer.decode(ids)
        history += [user(text), {"role": "assistant", "content": reply}]
        expected.append(reply)
    assert replies == expected
    run = tmp_path / "run"  # the same conversation with the experts offloaded: the same replies
    assert main(["convert", "--from-hf", str(folder), "--out", str(run)]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("héllo\r\n\nand then?\n"))
    capsys.readouterr()
    assert main(["generate", str(run), *args, "--offload.budget=50%"]) == 0
    out = capsys.readouterr().out
    assert out.split("\n")[:2] == expected and "expert cache" in out
    monkeypatch.setattr("sys.stdin", io.StringIO("x" * 200 + "\n"))  # leaves < 60 positions
    assert main(["generate", str(folder), "--chat=true", "--max_new_tokens=60"]) == 0
    assert "note: the reply stopped at the model's context" in capsys.readouterr().err
    # a message too long alone is a note, and the conversation goes on (it ended the whole one)
    monkeypatch.setattr("sys.stdin", io.StringIO("x" * 600 + "\nhéllo\n"))
    assert main(["generate", str(folder), *args]) == 0
    said = capsys.readouterr()
    assert "note: the message is too long for the model's context" in said.err
    assert "start a new conversation" not in said.err  # a new one would not help
    assert said.out.split("\n")[0] == expected[0]
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # said nothing at all
    assert main(["generate", str(folder), *args]) == 0
    assert "note: no input to answer" in capsys.readouterr().err
    # a line of bytes that are not UTF-8 (kept as surrogates): skipped with a note, no TypeError
    monkeypatch.setattr("sys.stdin", io.StringIO("hi \udcff there\nhéllo\n"))
    assert main(["generate", str(folder), *args]) == 0
    said = capsys.readouterr()
    assert "that line is not UTF-8 text" in said.err and said.out.split("\n")[0] == expected[0]


HARMONY_TOKENS = ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>"]  # 257-261
# GPT-OSS's shape: every message <|start|>ROLE<|channel|>NAME<|message|>TEXT<|end|>, the reply
# opened by the generation prompt; earlier replies shown as their final channel.
HARMONY = (
    "{% for m in messages %}{{ '<|start|>' + m['role'] }}"
    "{% if m['role'] == 'assistant' %}{{ '<|channel|>final' }}{% endif %}"
    "{{ '<|message|>' + m['content'] + '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start|>assistant' }}{% endif %}"
)


def harmony_folder(folder: Path) -> Path:
    """A tiny checkpoint with GPT-OSS's channel tokens, ending at <|return|>."""
    tok = byte_tokenizer()
    tok.add_special_tokens(HARMONY_TOKENS)
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny").replace(vocab_size=262, max_seq_len=256)
    save_hf(MoETransformer(cfg), folder, "mixtral", tokenizer=tok)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings.update(eos_token="<|return|>", chat_template=HARMONY)
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    return folder


def test_a_harmony_reply_shows_its_final_channel_only(tmp_path, capsys) -> None:
    """GPT-OSS's reply: the analysis channel (its reasoning) is not the answer; the final channel's
    text is, shown as it streams (each prefix of the ids shows a prefix of the answer) and kept
    as the turn's reply in the conversation."""
    folder = harmony_folder(tmp_path / "hf")
    loaded = load(folder)
    tok = loaded.tokenizer
    start, end, message, channel, done = (tok.token_to_id(t) for t in HARMONY_TOKENS)

    def enc(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False).ids

    analysis = [channel, *enc("analysis"), message, *enc("Think: 2+2."), end]
    final = [start, *enc("assistant"), channel, *enc("final"), message, *enc("It is 4."), done]
    reply = analysis + final
    template = ChatTemplate(folder, tok)
    assert template.reply_text(reply) == "It is 4."
    shown = [template.reply_text(reply[:k]) for k in range(1, len(reply) + 1)]
    opened = len(analysis) + final.index(message) + 1  # the final channel's text starts here
    assert shown[:opened] == [""] * opened  # nothing while it reasons
    assert all("It is 4.".startswith(text) for text in shown) and shown[opened] == "I"
    assert template.reply_text([channel, *enc("commentary"), message, *enc("x")]) == ""
    cut_after = [*final[:-1], end, start, *enc("assistant")]  # a new message's header follows
    assert template.reply_text(cut_after) == "It is 4."
    chatml = load(chat_folder(tmp_path / "chatml", CHATML)).tokenizer
    plain = ChatTemplate(tmp_path / "chatml", chatml)  # no channels: the text, specials skipped
    assert plain.reply_text(chatml.encode("a<|im_end|>", add_special_tokens=False).ids) == "a"
    session = ChatSession(loaded.model, tok, folder)
    prompt = session.ask("2+2?", len(reply))
    assert prompt.text.endswith("<|start|>assistant") and prompt.end_ids == (done,)
    with torch.no_grad():  # as if the model had emitted `reply`: all but its last token fed
        loaded.model(torch.tensor([prompt.ids + reply[:-1]]), kv_cache=session.cache)
    session.answered(reply)
    assert session.messages[-1] == {"role": "assistant", "content": "It is 4."}
    assert session.ask("and 3+3?", 5).text.count("<|channel|>final<|message|>It is 4.<|end|>") == 1
    capsys.readouterr()  # a random model opens no final channel: an empty reply and a note
    args = ["generate", str(folder), "--chat=true", "--prompt=hi", "--max_new_tokens=3"]
    assert main([*args, "--temperature=0"]) == 0
    out, err = capsys.readouterr()
    assert out == "\n" and "cut at 3 new tokens, holds no answer yet" in err
