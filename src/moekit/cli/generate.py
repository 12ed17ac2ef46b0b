"""`moekit generate RUN_DIR [CONFIG.json] [--a.b=value ...]`: stream text from a trained run or a
Hugging Face checkpoint (`--chat=true`: the reply to the prompt in the checkpoint's chat
template); its resolved `GenerateConfig` goes to stderr, so stdout holds the text alone."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from moekit.cli.common import (
    Command,
    print_config,
    resolve_config,
    stream_text,
    warnings_as_notes,
)
from moekit.config import GenerateConfig, OffloadConfig
from moekit.cpu_memory import use_huge_pages
from moekit.inference.budget import BUDGET_FORMS, check_budget_form
from moekit.inference.offload import format_stats
from moekit.interop.chat import ChatSession, MessageTooLong, chat_prompt, check_chat_files
from moekit.loading import is_hf_directory, load
from moekit.model import MoETransformer
from moekit.model.speculative import SpeculativeStats, check_speculative


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="a run directory (moekit train, convert, quantize) or a Hugging Face checkpoint",
    )


def run(args: argparse.Namespace) -> None:
    cfg = resolve_config(GenerateConfig, args.config, args.overrides)
    check_offload(cfg.offload, args.run_dir)  # before anything is read
    if cfg.system and not cfg.chat:
        raise ValueError("--system is the system message of a chat: add --chat=true")
    if cfg.speculative is None and cfg.draft_tokens != GenerateConfig().draft_tokens:
        raise ValueError(
            f"--draft_tokens={cfg.draft_tokens} is how many tokens --speculative=mtp drafts: add "
            "--speculative=mtp or leave it out"
        )
    if cfg.chat and not cfg.prompt and cfg.speculative is not None:
        raise ValueError(
            "--speculative=mtp answers one --prompt: a conversation (--chat=true without "
            "--prompt) keeps its cache across turns, which speculative decoding does not"
        )
    if cfg.chat:
        check_chat_files(args.run_dir)  # before the model is read
    with warnings_as_notes():  # e.g. prefetch standing down
        loaded = load(args.run_dir, experts=cfg.offload)  # a budget: the experts stay on disk
    # A chat's template read before anything is printed: a checkpoint without one is one line.
    chat = session = None
    if cfg.chat and cfg.prompt:
        messages = [{"role": "system", "content": cfg.system}] if cfg.system else []
        messages.append({"role": "user", "content": cfg.prompt})
        chat = chat_prompt(loaded.folder, loaded.tokenizer, messages)
    elif cfg.chat:  # without a prompt, a conversation read from stdin
        session = ChatSession(loaded.model, loaded.tokenizer, loaded.folder, cfg.system)
    print_config(cfg, sys.stderr)  # once the model loaded: a bad run is one line of error
    if cfg.temperature == 0 and (unused := sampling_unused(cfg)):
        verb = "have" if " and " in unused else "has"
        print(f"note: {unused} {verb} no effect with --temperature=0 (greedy decoding takes "
              "the likeliest token)", file=sys.stderr)  # fmt: skip
    use_huge_pages(loaded.model)  # decode streams every weight per token (cpu_memory)
    sampling = {"temperature": cfg.temperature, "top_k": cfg.top_k or None, "top_p": cfg.top_p}
    stats = None
    if cfg.speculative is not None:
        check_speculative(loaded.model, 1, cfg.draft_tokens)  # before any text is printed
        stats = SpeculativeStats()
        sampling.update(speculative=cfg.speculative, draft_tokens=cfg.draft_tokens, stats=stats)
    if session is not None:
        converse(session, loaded.model, cfg, sampling)
    else:
        text = stream_text(loaded.model, loaded.tokenizer, cfg.prompt, cfg.max_new_tokens,
                           seed=cfg.seed, chat=chat, **sampling)  # fmt: skip
        if text.cut_by_context:  # as a conversation says it (converse)
            print(f"note: the text stopped at the model's context (max_seq_len="
                  f"{loaded.model.cfg.max_seq_len}), {len(text.ids)} of --max_new_tokens="
                  f"{cfg.max_new_tokens} tokens", file=sys.stderr)  # fmt: skip
    if stats is not None:
        print(stats.format(), file=sys.stderr)
    if loaded.offload is not None:
        loaded.offload.close()
        print(format_stats(loaded.offload.stats()))


def sampling_unused(cfg: GenerateConfig) -> str:
    """The sampling settings given other than their defaults ("--top_k=5 and --top_p=0.9"), which
    greedy decoding does not read; "" if none."""
    default = GenerateConfig()
    return " and ".join(f"--{name}={getattr(cfg, name)}" for name in ("top_k", "top_p")
                        if getattr(cfg, name) != getattr(default, name))  # fmt: skip


def check_offload(offload: OffloadConfig, path: str) -> None:
    """The --offload.* settings, in the command line's words: the cache's settings need a budget
    (without one every expert stays in memory), and a budget needs a run's checkpoint."""
    if offload.budget is None:
        default = OffloadConfig()
        given = [f"--offload.{name}={str(value).lower() if isinstance(value, bool) else value}"
                 for name in ("policy", "prefetch", "trace")
                 if (value := getattr(offload, name)) != getattr(default, name)]  # fmt: skip
        if given:
            raise ValueError(
                f"{' and '.join(given)} {'needs' if len(given) == 1 else 'need'} --offload.budget: "
                "without a budget every expert stays in memory and there is no expert cache; add "
                f"--offload.budget ({BUDGET_FORMS}) or leave {'it' if len(given) == 1 else 'them'}"
                " out"
            )
        return
    check_budget_form(offload.budget)
    if offload.policy == "static" and offload.trace is None:
        raise ValueError(
            "--offload.policy=static keeps the most used experts of a routing trace: add "
            "--offload.trace=TRACE (record one of this model with `moekit trace`)"
        )
    if offload.trace is not None and offload.policy != "static":
        raise ValueError(
            f"--offload.trace={offload.trace} is read by --offload.policy=static alone (policy "
            f"{offload.policy} keeps no trace's experts): add --offload.policy=static or leave "
            "the trace out"
        )
    if is_hf_directory(path):
        raise ValueError(
            f"--offload.budget={offload.budget} offloads the experts of a run's checkpoint, and "
            f"{path} is a Hugging Face directory: convert it first (moekit convert --from-hf "
            f"{path} --out RUN_DIR), then moekit generate RUN_DIR --offload.budget={offload.budget}"
        )


def converse(
    session: ChatSession, model: MoETransformer, cfg: GenerateConfig, sampling: dict[str, Any]
) -> None:
    """A conversation: each line of stdin a user turn, each reply streamed (a `> ` prompt on
    stderr where stdin is a terminal); ends at end of input (Ctrl-D), or with one line when the
    conversation fills the model's context."""
    asked = False
    while True:
        if sys.stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            if not asked:  # (an empty stdin said nothing at all)
                print("note: no input to answer: write a line a turn on stdin, or give --prompt",
                      file=sys.stderr)  # fmt: skip
            return
        if not line.strip():
            continue
        try:
            line.encode("utf-8")  # stdin read with surrogateescape (a C locale): bytes kept
        except UnicodeEncodeError:
            print("note: that line is not UTF-8 text; say it again in UTF-8", file=sys.stderr)
            continue
        asked = True
        try:
            prompt = session.ask(line.rstrip("\r\n"), cfg.max_new_tokens)
        except MessageTooLong as too_long:  # the conversation so far stays: say it shorter
            print(f"note: {too_long}", file=sys.stderr)
            continue
        reply = stream_text(model, session.template.tokenizer, "", cfg.max_new_tokens,
                            seed=cfg.seed, chat=prompt, kv_cache=session.cache,
                            **sampling)  # fmt: skip
        session.answered(reply.ids)
        if reply.cut_by_context:
            print(f"note: the reply stopped at the model's context (max_seq_len="
                  f"{session.max_seq_len})", file=sys.stderr)  # fmt: skip


COMMAND = Command("generate", "stream text from a run or a Hugging Face checkpoint", configure, run,
                  overrides=True, config=GenerateConfig)  # fmt: skip
