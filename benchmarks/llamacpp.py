"""llama.cpp as a decode contender on moekit's weights (issue 17), for `decode.py --llamacpp`.

The pieces, each usable alone:
  - `write_llama_tokenizer`: a tokenizer llama.cpp's Llama conversion route accepts, sized to the
    model's vocabulary: a byte-fallback BPE (as Llama 2's tokenizer.json) with <unk>, <s>, </s>,
    the 256 byte tokens <0x00>..<0xFF>, then single characters (no merges). llama.cpp's converter
    rejects byte-level BPE tokenizers whose pre-tokenizer hash it does not know, moekit's
    included; the benchmark feeds token ids, so the tokenizer only has to be a real one that both
    sides read alike.
  - `find_converter`: llama.cpp's `convert_hf_to_gguf.py`, from --converter, $MOEKIT_LLAMACPP_
    CONVERTER, or the llama-cpp-python sdist unpacked under ~/.cache/moekit/llamacpp (fetched
    with `pip download --no-binary :all: --no-deps llama-cpp-python==<installed version>` when
    absent). llama.cpp's source is never part of this repository.
  - `write_ggufs`: the model through `save_hf(..., "mixtral")` (or "deepseek_v3" for a model with
    latent attention) and the converter to f32, f16 and q8_0 GGUF files, and q4_0 by llama.cpp's
    own quantizer (`llama_model_quantize`, its defaults, as `llama-quantize model.gguf out.gguf
    Q4_0` would) from the f32 file. The converter's DeepSeek class takes only byte-level BPE
    vocabularies it knows; `python llamacpp.py convert-deepseek CONVERTER ARGS...` runs the
    converter with that class's vocabulary read by the Llama route instead (its one change).
  - `gguf_bytes_per_token` / `torch_bytes_per_token`: the bytes one batch-1 decode token reads,
    from the tensors as stored (GGUF file, or the model's state dict): every tensor in full but
    the token embedding (one row) and the routed experts (top_k / n_experts of them).
  - `LlamaCppDecoder`: one GGUF model through llama-cpp-python's low-level API (llama_batch with
    one sequence id per row, so batch 8 decodes 8 sequences in one llama_decode), greedy or fed
    a fixed token sequence, with the same call shape as decode.py's generators.

Benchmark-only: llama-cpp-python and gguf are the `bench` optional dependencies, never a test's.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import subprocess
import sys
import tarfile
import unicodedata
from pathlib import Path

import numpy as np
import torch

LLAMACPP_CACHE = Path.home() / ".cache" / "moekit" / "llamacpp"
CONVERTER = Path("vendor") / "llama.cpp" / "convert_hf_to_gguf.py"
CONVERTED = ("f32", "f16", "q8_0")  # written by convert_hf_to_gguf.py --outtype
QUANTIZED = ("q4_0",)  # written by llama.cpp's quantizer from the f32 file
FORMATS = CONVERTED + QUANTIZED
SPECIALS = ("<unk>", "<s>", "</s>")
WORD_START = "\u2581"  # sentencepiece's space marker


# --- A tokenizer llama.cpp's Llama route accepts -----------------------------------------------


def single_characters(n: int) -> list[str]:
    """n distinct single characters, the space marker first, then printable non-space,
    non-combining characters in code point order (ASCII, Latin, ..., CJK)."""
    chars = [WORD_START]
    code = 0x21
    while len(chars) < n:
        c = chr(code)
        code += 1
        if code > 0x10FFFF:
            raise ValueError(f"no {n} printable single characters")
        if c == WORD_START or not c.isprintable() or c.isspace():
            continue
        if unicodedata.category(c)[0] in "MCZ":  # combining marks, controls, separators
            continue
        chars.append(c)
    return chars


def llama_tokenizer(vocab_size: int):
    """A `tokenizers.Tokenizer` shaped as Llama 2's tokenizer.json (byte-fallback BPE, space
    marker, no pre-tokenizer) with exactly vocab_size tokens: <unk>, <s>, </s>, the 256 byte
    tokens, then single characters. No merges: text becomes characters, the rest bytes."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE

    n_fixed = len(SPECIALS) + 256
    if vocab_size <= n_fixed:
        raise ValueError(f"vocab_size {vocab_size} must exceed {n_fixed} (3 specials + 256 bytes)")
    tokens = [*SPECIALS, *(f"<0x{b:02X}>" for b in range(256))]
    tokens += single_characters(vocab_size - n_fixed)
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(BPE(vocab, [], unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend(WORD_START), normalizers.Replace(" ", WORD_START)]
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace(WORD_START, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    assert tok.get_vocab_size() == vocab_size
    return tok


def write_llama_tokenizer(vocab_size: int, folder: Path) -> Path:
    """tokenizer.json and tokenizer_config.json (<s> bos, </s> eos, <unk>) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    llama_tokenizer(vocab_size).save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


# --- llama.cpp's converter and quantizer -------------------------------------------------------


def installed_version() -> str:
    from importlib.metadata import version

    return version("llama_cpp_python")


def find_converter(explicit: Path | None = None, *, fetch: bool = True) -> Path:
    """convert_hf_to_gguf.py: `explicit`, $MOEKIT_LLAMACPP_CONVERTER, or the sdist of the
    installed llama-cpp-python unpacked under ~/.cache/moekit/llamacpp (downloaded and unpacked
    there when absent and `fetch`)."""
    given = explicit or os.environ.get("MOEKIT_LLAMACPP_CONVERTER")
    if given:
        path = Path(given)
        if not path.is_file():
            raise FileNotFoundError(f"llama.cpp converter {path} does not exist")
        return path
    version = installed_version()
    unpacked = LLAMACPP_CACHE / f"llama_cpp_python-{version}"
    if not (unpacked / CONVERTER).is_file():
        sdist = LLAMACPP_CACHE / f"llama_cpp_python-{version}.tar.gz"
        if not sdist.is_file():
            if not fetch:
                raise FileNotFoundError(f"no {unpacked / CONVERTER}; pass --converter PATH")
            cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                   f"llama-cpp-python=={version}", "-d", str(LLAMACPP_CACHE)]  # fmt: skip
            subprocess.run(cmd, check=True)
        with tarfile.open(sdist) as tar:
            tar.extractall(LLAMACPP_CACHE, filter="data")
    return unpacked / CONVERTER


def write_ggufs(model, folder: Path, converter: Path, *, threads: int = 2) -> dict:
    """The model as GGUF files of FORMATS in `folder` -> {"files": {format: path}, ...}: saved
    with save_hf (mixtral, or deepseek_v3 with latent attention; a Llama-route tokenizer),
    converted with convert_hf_to_gguf.py to CONVERTED, quantized by llama.cpp's quantizer from
    the f32 file to QUANTIZED."""
    import llama_cpp

    from moekit.interop import save_hf

    hf_dir = folder / "hf"
    tokenizer = write_llama_tokenizer(model.cfg.vocab_size, folder / "tokenizer")
    arch = "mixtral" if model.cfg.mla is None else "deepseek_v3"
    save_hf(model, hf_dir, arch, tokenizer=tokenizer,
            extra_config={"bos_token_id": 1, "eos_token_id": 2})  # fmt: skip
    run = [sys.executable, str(converter)]
    if arch == "deepseek_v3":
        run = [sys.executable, __file__, "convert-deepseek", str(converter)]
    files, logs = {}, {}
    for fmt in CONVERTED:
        out = folder / f"model-{fmt}.gguf"
        cmd = [*run, str(hf_dir), "--outfile", str(out), "--outtype", fmt]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
        logs[fmt] = [line for line in proc.stderr.splitlines() if "gguf_writer:" in line][-1:]
        files[fmt] = out
    ftypes = {"q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}
    for fmt in QUANTIZED:
        out = folder / f"model-{fmt}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        _set(params, nthread=threads, ftype=ftypes[fmt])
        rc = llama_cpp.llama_model_quantize(
            str(files["f32"]).encode(), str(out).encode(), ctypes.byref(params)
        )
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize to {fmt} failed ({rc})")
        files[fmt] = out
    return {"files": files, "converter_log_tail": logs}


# --- Bytes one decode token reads --------------------------------------------------------------


def per_token_bytes(tensors: list[tuple[str, int]], is_expert, is_embedding, rows: int,
                    top_k: int, n_experts: int) -> dict:  # fmt: skip
    """From (name, bytes) of every stored tensor: the embedding's one row, top_k/n_experts of
    the routed experts, the rest in full."""
    expert = sum(b for n, b in tensors if is_expert(n))
    embedding = sum(b for n, b in tensors if is_embedding(n))
    other = sum(b for n, b in tensors if not is_expert(n) and not is_embedding(n))
    read = other + expert * top_k / n_experts + embedding / rows
    return {"bytes_per_token": read, "expert_bytes": expert, "other_bytes": other,
            "embedding_bytes": embedding, "total_bytes": expert + other + embedding}  # fmt: skip


def gguf_tensors(path: Path) -> list[tuple[str, str, int]]:
    """(name, ggml type, bytes) of every tensor in a GGUF file."""
    from gguf import GGUFReader

    return [(t.name, t.tensor_type.name, int(t.n_bytes)) for t in GGUFReader(path).tensors]


def gguf_bytes_per_token(path: Path, cfg) -> dict:
    tensors = gguf_tensors(path)
    out = per_token_bytes(
        [(n, b) for n, _, b in tensors],
        is_expert=lambda n: "_exps." in n,
        is_embedding=lambda n: n.startswith("token_embd."),
        rows=cfg.vocab_size,
        top_k=cfg.moe.top_k,
        n_experts=cfg.moe.n_experts,
    )
    types: dict[str, list[str]] = {}
    for name, kind, _ in tensors:
        role = re.sub(r"^blk\.\d+\.", "blk.N.", name)
        if kind not in types.setdefault(role, []):
            types[role].append(kind)
    return {**out, "tensor_types": {role: "/".join(k) for role, k in types.items()}}


def torch_bytes_per_token(model) -> dict:
    """The same count over a moekit model's state dict (parameters and buffers, as stored: a
    quantized model's packed weights and scales count as they are)."""
    cfg = model.cfg
    tensors = [(n, t.numel() * t.element_size()) for n, t in model.state_dict().items()]
    return per_token_bytes(
        tensors,
        is_expert=lambda n: ".experts." in n,
        is_embedding=lambda n: n.startswith("embed."),
        rows=cfg.vocab_size,
        top_k=cfg.moe.top_k,
        n_experts=cfg.moe.n_experts,
    )


# --- Huge pages for llama.cpp's weights, as decode.py gives every model -----------------------


def anonymous_mappings() -> set[tuple[int, int]]:
    """(start, end) of this process's anonymous read-write mappings (Linux /proc/self/maps)."""
    out = set()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) == 5 and fields[1].startswith("rw"):  # no path: anonymous
            start, end = (int(x, 16) for x in fields[0].split("-"))
            out.add((start, end))
    return out


def collapse_new_mappings(before: set[tuple[int, int]]) -> tuple[int, list[str]]:
    """Back the anonymous mappings made since `before` (llama.cpp's weight buffers, loaded
    without mmap) with 2 MiB pages: MADV_HUGEPAGE then MADV_COLLAPSE over their whole 2 MiB
    pages, as moekit.cpu_memory.use_huge_pages does for tensors. Returns the bytes collapsed,
    and for each mapping not collapsed its size and the error ("512 MB: EAGAIN")."""
    from moekit.cpu_memory import HUGE_PAGE, MADV_COLLAPSE, MADV_HUGEPAGE

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    collapsed, failed = 0, []
    for begin, end in anonymous_mappings() - before:
        start, stop = -(-begin // HUGE_PAGE) * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE
        if stop - start < HUGE_PAGE:
            continue
        ok = all(libc.madvise(start, stop - start, a) == 0 for a in (MADV_HUGEPAGE, MADV_COLLAPSE))
        if ok:
            collapsed += stop - start
        else:
            failed.append(
                f"{(stop - start) / 1e6:.0f} MB: {errno.errorcode.get(ctypes.get_errno())}"
            )
    return collapsed, failed


# --- Decoding through llama-cpp-python's low-level API -----------------------------------------

_backend_ready = False
PROMPT_ROWS = 64  # the longest prompt a context takes in one llama_decode


def _quiet_logs() -> None:
    import llama_cpp

    @llama_cpp.llama_log_callback
    def ignore(level, text, user_data):
        pass

    _quiet_logs.callback = ignore  # kept alive as long as llama.cpp may call it
    llama_cpp.llama_log_set(ignore, ctypes.c_void_p(0))


def llamacpp_info() -> dict:
    """Versions and what the build uses (llama.cpp's system-info line)."""
    from importlib.metadata import version

    import llama_cpp

    return {
        "llama_cpp_python": version("llama_cpp_python"),
        "gguf": version("gguf"),
        "system_info": llama_cpp.llama_print_system_info().decode().strip(),
    }


def _set(struct, **fields) -> None:
    """Set fields of a ctypes structure, refusing names it lacks (ctypes would silently add a
    Python attribute: llama.cpp's structs change between versions)."""
    known = {name for name, *_ in type(struct)._fields_}
    for name, value in fields.items():
        if name not in known:
            raise AttributeError(f"{type(struct).__name__} has no field {name!r}")
        setattr(struct, name, value)


class LlamaCppDecoder:
    """One GGUF model, read into memory (no mmap; its buffers then backed by 2 MiB pages, as
    decode.py does for every model), one context per batch size (flash attention off, float32
    K/V cache, so the computation is moekit's; `threads` threads). `decoder(prompt_BP, n)` -> the
    (B, n) argmax tokens, greedy; with `forced` (B, >= n - 1) set, the tokens fed after the
    prompt are forced[:, :n-1] instead (a fixed sequence: the experts change every step as in
    real text), and the argmax at each position is still computed and returned."""

    def __init__(self, path: Path, *, threads: int = 2, max_len: int = 256, mmap: bool = False):
        import llama_cpp as L

        global _backend_ready
        if not _backend_ready:
            _quiet_logs()
            L.llama_backend_init()
            _backend_ready = True
        self.L, self.threads, self.max_len = L, threads, max_len
        params = L.llama_model_default_params()
        _set(params, load_mode=L.LLAMA_LOAD_MODE_MMAP if mmap else L.LLAMA_LOAD_MODE_NONE)
        before = anonymous_mappings()
        self.model = L.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.huge_page_bytes, self.huge_page_failures = (
            (0, []) if mmap else collapse_new_mappings(before)
        )
        self.vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.contexts: dict[int, tuple] = {}
        self.forced: torch.Tensor | None = None

    def context(self, batch: int):
        """(context, llama_batch) for `batch` sequences of up to max_len positions each."""
        if batch not in self.contexts:
            L = self.L
            p = L.llama_context_default_params()
            _set(
                p,
                n_ctx=self.max_len * batch,
                n_batch=PROMPT_ROWS * batch,  # a prefill of <= 64 tokens a row
                n_ubatch=PROMPT_ROWS * batch,
                n_seq_max=batch,
                n_threads=self.threads,
                n_threads_batch=self.threads,
                flash_attn_type=L.LLAMA_FLASH_ATTN_TYPE_DISABLED,
                type_k=L.GGML_TYPE_F32,
                type_v=L.GGML_TYPE_F32,
                kv_unified=False,  # each sequence its own cache stream (distinct sequences)
                no_perf=True,
            )
            ctx = L.llama_init_from_model(self.model, p)
            if not ctx:
                raise RuntimeError(f"llama.cpp could not make a context for batch {batch}")
            self.contexts[batch] = (ctx, L.llama_batch_init(PROMPT_ROWS * batch, 0, 1))
        return self.contexts[batch]

    def _decode(self, ctx, batch, rows: list[tuple[int, int, int, bool]]) -> None:
        """rows: (token, position, sequence, wants logits)."""
        for i, (token, pos, seq, logits) in enumerate(rows):
            batch.token[i], batch.pos[i] = token, pos
            batch.n_seq_id[i], batch.seq_id[i][0], batch.logits[i] = 1, seq, logits
        batch.n_tokens = len(rows)
        rc = self.L.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _logits(self, ctx, n_rows: int) -> np.ndarray:
        return np.ctypeslib.as_array(self.L.llama_get_logits(ctx), shape=(n_rows, self.vocab))

    def prompt_logits(self, prompt_P: torch.Tensor) -> np.ndarray:
        """The (P, V) logits at every position of one prompt (a fresh cache)."""
        ctx, batch = self.context(1)
        self.L.llama_memory_clear(self.L.llama_get_memory(ctx), True)
        ids = prompt_P.tolist()
        self._decode(ctx, batch, [(t, p, 0, True) for p, t in enumerate(ids)])
        return self._logits(ctx, len(ids)).copy()

    def __call__(self, prompt_BP: torch.Tensor, n: int) -> torch.Tensor:
        B, P = prompt_BP.shape
        if P + n > self.max_len or P > PROMPT_ROWS:
            raise ValueError(f"{P} + {n} positions exceed {PROMPT_ROWS} + {self.max_len}")
        ctx, batch = self.context(B)
        self.L.llama_memory_clear(self.L.llama_get_memory(ctx), True)
        ids = prompt_BP.tolist()
        rows = [(ids[b][p], p, b, p == P - 1) for b in range(B) for p in range(P)]
        self._decode(ctx, batch, rows)
        out = [self._logits(ctx, B).argmax(-1)]
        forced = None if self.forced is None else self.forced[:B].tolist()
        for step in range(1, n):
            feed = out[-1] if forced is None else [f[step - 1] for f in forced]
            self._decode(ctx, batch, [(int(feed[b]), P + step - 1, b, True) for b in range(B)])
            out.append(self._logits(ctx, B).argmax(-1))
        return torch.tensor(np.stack(out, axis=1), dtype=torch.long)

    def close(self) -> None:
        for ctx, batch in self.contexts.values():
            self.L.llama_batch_free(batch)
            self.L.llama_free(ctx)
        self.contexts = {}
        if self.model:
            self.L.llama_model_free(self.model)
            self.model = None


@torch.no_grad()
def moekit_forced(model, prompt_BP: torch.Tensor, n: int, forced: torch.Tensor) -> torch.Tensor:
    """moekit's decode loop (`generate`'s step, `step_logits`: one prefill, then one step per
    token over a preallocated KVCache, each step one C call where the model qualifies) fed
    forced[:, :n-1] after the prompt instead of its own argmax; returns the (B, n) argmax at each
    position, as LlamaCppDecoder does."""
    from moekit.model.generation import KVCache, sample_next, step_logits

    B, P = prompt_BP.shape
    next_logits = step_logits(model, KVCache.for_model(model, B, P + n - 1))
    out = [sample_next(next_logits(prompt_BP))]
    for step in range(1, n):
        out.append(sample_next(next_logits(forced[:B, step - 1 : step])))
    return torch.stack(out, dim=1)


def convert_deepseek(converter: Path, args: list[str]) -> None:
    """convert_hf_to_gguf.py with `args`, its DeepSeek class reading the vocabulary by the Llama
    route (`_set_vocab_llama_hf`, as its Llama class does for this tokenizer)."""
    import runpy

    sys.argv = [str(converter), *args]
    sys.path.insert(0, str(converter.parent))
    from conversion.deepseek import DeepseekV2Model

    DeepseekV2Model.set_vocab = lambda self: self._set_vocab_llama_hf()
    runpy.run_path(str(converter), run_name="__main__")


if __name__ == "__main__":
    if sys.argv[1:2] != ["convert-deepseek"] or len(sys.argv) < 4:
        raise SystemExit("usage: python llamacpp.py convert-deepseek CONVERTER HF_DIR [ARGS...]")
    convert_deepseek(Path(sys.argv[2]), sys.argv[3:])
