"""`load_hf` and `save_hf`: Hugging Face checkpoint directories <-> `MoETransformer`.

Loading builds the model on the meta device (swapped for its quantized form there when loaded
quantized), allocates it once, checks every tensor's name and shape against the checkpoint
headers (`interop.plan`), then streams the weights into place one expert or one slice of rows at
a time (`interop.quantized.fill`). Saving writes config.json, the safetensors shards and the
tokenizer into a temporary directory renamed to the destination only when complete.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from moekit.config import ModelConfig, QuantizeConfig
from moekit.config.rules import invalid
from moekit.data.tokenizer import CHAT_FILES, END_OF_TEXT, copy_chat_files
from moekit.fileio import atomic_path, check_no_file_in_the_way
from moekit.interop.architecture import Architecture
from moekit.interop.archs import architecture_named, architecture_of
from moekit.interop.configs import HF, HF_NAMES
from moekit.interop.files import (
    WEIGHT_DTYPES,
    CheckpointError,
    find_weight_files,
    parse_size,
    plan_shards,
    read_checkpoint_json,
    write_shards,
)
from moekit.interop.keymaps import LAYOUTS, OPS, expected_shapes, placements
from moekit.interop.plan import check_copies, choose_mtp, plan_load
from moekit.interop.quantized import (
    DequantizingReader,
    check_kept,
    destination,
    fill,
    load_schemes,
    quantized_view,
    read_quantization,
)
from moekit.model import MoETransformer
from moekit.quant.files import allocate_on_cpu, is_quantized
from moekit.quant.modules import quantize_model
from moekit.train.checkpoint import CHECKPOINT_DIR, is_hf_checkpoint
from moekit.userfiles import read_tokenizer

TOKENIZER_FILES = ("tokenizer.json", *CHAT_FILES, "tokenizer.model", "vocab.json", "merges.txt")


def is_transformers_config(data: object) -> bool:
    """Whether the JSON `data` of a config.json is transformers' (its `model_type` or
    `architectures`) rather than a moekit run's (which holds a `model`)."""
    keys = ("model_type", "architectures")
    return isinstance(data, dict) and "model" not in data and any(k in data for k in keys)


def read_hf_config(folder: str | Path) -> HF:
    """config.json of a checkpoint directory, as a dict."""
    path = Path(folder) / "config.json"
    if (Path(folder) / CHECKPOINT_DIR).is_dir():
        raise ValueError(
            f"{folder} is a moekit run directory, not a Hugging Face checkpoint (moekit convert "
            f"--to-hf {folder} --arch ARCH --out DIR writes one from it)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a Hugging Face checkpoint: it has no config.json")
    return read_checkpoint_json(path)


def hf_model_config(hf: HF, source: str | Path = "config.json") -> ModelConfig:
    """The `ModelConfig` of a Hugging Face config dict (read from `source`); a value moekit cannot
    take is one `CheckpointError` naming the file and the config.json key where moekit's field
    has one (num_local_experts, not n_experts)."""
    arch = architecture_of(hf, source)
    try:
        return arch.model_config(hf)
    except CheckpointError:
        raise
    except KeyError as err:
        needs = f"which {arch.model_type} needs"
        raise CheckpointError(f"{source} has no {err.args[0]!r}, {needs}") from None
    except ValueError as err:  # the config's rules: a value moekit cannot take
        given = {
            name: alias for alias, name in arch.aliases.items() if name not in hf and alias in hf
        }
        names = {field: given.get(key, key) for field, key in {**HF_NAMES, **arch.names}.items()}
        raise CheckpointError(f"{source}: {_in_hf_terms(str(err), hf, names)}") from None


def read_hf_model_config(folder: str | Path) -> ModelConfig:
    """The `ModelConfig` of a Hugging Face checkpoint directory's config.json (`hf_model_config`,
    its errors naming that file)."""
    return hf_model_config(read_hf_config(folder), Path(folder) / "config.json")


def _in_hf_terms(message: str, hf: HF, names: dict[str, str]) -> str:
    """ "moe.top_k=10 is invalid..." -> "num_experts_per_tok (moekit's moe.top_k)=10 is ...": the
    config.json key `names` gives, or else the one key of `hf` holding the value named (not
    None); other fields the message names with their value ("n_experts (6)") by their key too."""
    field = re.match(r"((?:moe\.)?(\w+))=(\S+) ", message)
    if field is None:
        return message
    name = names.get(field.group(2))
    if name is None and field.group(3) != "None":  # (None is every unset key's value)
        keys = [k for k, v in hf.items() if repr(v) == field.group(3)]
        name = keys[0] if len(keys) == 1 else None
    rest = re.sub(
        r"\b(?:moe\.)?(\w+) \(",
        lambda m: f"{names.get(m.group(1), m.group(0)[:-2])} (",
        message[field.end(1) :],
    )
    if name is None:
        return message[: field.end(1)] + rest
    ours = "" if name == field.group(1) else f" (moekit's {field.group(1)})"
    return f"{name}{ours}{rest}"


def load_hf(
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    *,
    progress: bool = False,
    mtp: bool = True,
    keep_quantized: bool = False,
    quantize: QuantizeConfig | None = None,
) -> MoETransformer:
    """A `MoETransformer` (eval mode, on CPU) with the weights of a Hugging Face checkpoint
    directory: config.json plus model.safetensors, or shards listed by
    model.safetensors.index.json, in the hub's per-expert key layout or transformers 5's fused one.

    dtype: of the weights; None takes the config's "dtype" (or "torch_dtype"), else float32, and
    bfloat16 for a quantized checkpoint. The routers' correction biases stay float32. The peak
    memory is about the model's own. Unsupported architectures, missing, unexpected or misshapen
    tensors and truncated or corrupt files raise `CheckpointError` before any weight is read.
    `progress` shows a progress bar (bytes read, rate, ETA).

    Quantized checkpoints (quant_method "fp8": DeepSeek-V3's block-scaled weights; "mxfp4":
    GPT-OSS's experts; see `interop.quantized`) are dequantized on load, a tensor or slice at a
    time; a problem of the format raises `CheckpointError` naming it, before any weight is read.

    keep_quantized: GPT-OSS's MXFP4 experts stay MXFP4 (`QuantizedExperts` holding the bytes as
        shipped, rows reordered to moekit's layout; never decoded to float), everything else
        loads as without it (in `dtype`); the model then needs about the checkpoint's memory
        (gpt-oss-20b: ~13 GB instead of ~42 GB in bfloat16). FP8 weights have no kept form in
        moekit's schemes: with keep_quantized they are dequantized as without it (to quantize
        them instead, int8 is the closest, give `quantize`). No effect on an unquantized
        checkpoint.
    quantize: load straight into `quantize_model(model, quantize)`'s form, each tensor quantized
        as it is read (one expert, or a slice of rows, in float at a time), so the float model is
        never in memory: what `moekit quantize HF_DIR` writes. The weights quantize from what
        the float load reads (in `dtype`); an MXFP4 expert pair given the "mxfp4" scheme is
        taken as shipped, in another scheme it is dequantized one expert at a time and
        requantized. Not with keep_quantized (quantize's experts="mxfp4" keeps them).

    Multi-token prediction (DeepSeek-V3's layers after the last, `num_nextn_predict_layers`) is
    loaded into `model.mtp`; its copies of the embedding and head must equal the main ones.
    mtp=False drops it (with a warning naming what is dropped). A config that declares MTP layers
    of which the checkpoint holds no tensor (as transformers' save_pretrained writes) loads a
    model without MTP.
    """
    folder = Path(path)
    hf = read_hf_config(folder)
    arch = architecture_of(hf, folder / "config.json")
    quantization = read_quantization(hf)
    schemes = load_schemes(quantize, keep_quantized, quantization)
    view = quantized_view(find_weight_files(folder), quantization)
    cfg, dropped = choose_mtp(hf_model_config(hf, folder / "config.json"), view.files, mtp)
    if dtype is None and quantization is not None:
        dtype = torch.bfloat16
    float_dtype = resolve_dtype(dtype, hf)
    with torch.device("meta"):
        model = MoETransformer(cfg)
    for p in model.parameters():  # buffers (the routers' correction biases) stay float32
        p.data = p.data.to(float_dtype)
    plan = plan_load(model, arch, view, dropped)
    if schemes is not None:
        quantize_model(model, schemes, empty=True)  # still on the meta device
        if keep_quantized:
            check_kept(model, plan, view)
    allocate_on_cpu(model)
    targets = [(destination(model, name), source, keys) for name, source, keys in plan]
    reader = DequantizingReader(view, float_dtype)
    total = sum(dest.nbytes for dest, _, _ in targets)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="load_hf", disable=not progress)
    try:
        check_copies(arch, cfg, reader)
        with torch.no_grad():
            for dest, source, keys in targets:
                fill(dest, source.op, keys, reader)
                bar.update(dest.nbytes)
    finally:
        reader.close()
        bar.close()
    return model.eval()


def resolve_dtype(dtype: torch.dtype | str | None, hf: HF) -> torch.dtype:
    """`dtype` as a torch dtype; None takes the config dict's "dtype" (or "torch_dtype"), else
    float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype or hf.get("dtype") or hf.get("torch_dtype") or "float32"
    if name not in WEIGHT_DTYPES:
        raise invalid("dtype", name, f"allowed values are {', '.join(WEIGHT_DTYPES)}")
    return getattr(torch, name)


def check_hf_out(path: str | Path, overwrite: bool, flag: str = "overwrite=True") -> None:
    """What `save_hf` refuses to write into: a non-empty directory `path` unless `overwrite` (the
    remedy names `flag`, the command line's --overwrite, say), and even then one that is not a
    Hugging Face checkpoint (config.json beside its weights, no run's checkpoints/): replacing a
    run, or a folder of other files, would delete them."""
    path = Path(path)
    if not (path.is_dir() and any(path.iterdir())):
        return
    if not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; pass {flag} to replace it")
    if not ((path / "config.json").is_file() and is_hf_checkpoint(path)):
        raise FileExistsError(
            f"{path} is not a Hugging Face checkpoint (config.json beside model.safetensors or "
            f"its index, and no {CHECKPOINT_DIR}/), and {flag} replaces only one: choose another "
            "--out, or empty it yourself"
        )


def save_hf(
    model: MoETransformer,
    path: str | Path,
    arch: str,
    *,
    tokenizer: Any = None,
    layout: str = "per_expert",
    dtype: torch.dtype | str | None = None,
    max_shard_size: int | str = "2GB",
    overwrite: bool = False,
    extra_config: HF | None = None,
    chat_files: str | Path | None = None,
) -> Path:
    """Write `model` as a Hugging Face checkpoint of architecture `arch` into directory `path`,
    which `transformers.AutoModelForCausalLM.from_pretrained` loads with no missing or unexpected
    keys (but a DeepSeek-V3 MTP layer's: transformers has no MTP module and quietly skips only
    layer 61's, the published model's, so other depths' are reported unexpected), and `load_hf`
    reads back.

    layout: "per_expert" (the hub's `experts.{e}.*` keys, as transformers' save_pretrained writes)
        or "fused" (transformers 5's `experts.gate_up_proj` / `down_proj`); GPT-OSS has only one.
    tokenizer: a `tokenizers.Tokenizer`, a tokenizer.json file, or a directory whose tokenizer
        files are copied; its end-of-text token becomes the config's eos_token_id.
    dtype: of the written weights (default: the model's); correction biases stay float32.
    max_shard_size: bytes per safetensors file (int, or "2GB", "500MB" ...); above it the weights
        are sharded with a model.safetensors.index.json. One shard is held in memory at a time.
    overwrite: replace an existing non-empty directory (otherwise FileExistsError).
    extra_config: more config.json entries (e.g. bos_token_id), written last.
    chat_files: a folder whose chat files (template, special and end tokens: CHAT_FILES) are
        copied over the tokenizer's (a run converted from a chat checkpoint keeps them).

    A model the architecture cannot express (say shared experts for mixtral) raises ValueError
    naming the fields. The directory appears complete or not at all. The weights are written
    unquantized: moekit reads FP8 and MXFP4 checkpoints but does not write them, so an
    extra_config with a quantization_config is refused.
    """
    if is_quantized(model):
        raise ValueError(
            "save_hf writes unquantized weights and this model is quantized (QuantizedExperts or "
            "QuantizedLinear): dequantize it first (moekit.quant.modules.dequantize_model), or "
            "load the checkpoint with keep_quantized=False"
        )
    if extra_config and "quantization_config" in extra_config:
        raise ValueError(
            "save_hf writes unquantized weights (float32, bfloat16 or float16): a "
            "quantization_config in extra_config would describe tensors it does not write; "
            "drop it"
        )
    target = architecture_named(arch)
    if layout not in LAYOUTS:
        raise invalid("layout", layout, f"allowed values are {', '.join(LAYOUTS)}")
    check_no_file_in_the_way(path)  # even with overwrite: a checkpoint is a directory
    hf = target.hf_config(model.cfg)
    out_dtype = model.embed.weight.dtype if dtype is None else resolve_dtype(dtype, {})
    tensors = _save_plan(model, target, layout, out_dtype)
    final = Path(path)
    check_hf_out(final, overwrite)
    with atomic_path(final) as tmp:
        tmp.mkdir()
        sizes = [(key, math.prod(p.shape) * p.dtype.itemsize) for key, p in tensors.items()]
        shards = plan_shards(sizes, parse_size(max_shard_size))
        write_shards(
            tmp, shards, lambda names: _materialise(tensors, names), sum(s for _, s in sizes)
        )
        eos = write_tokenizer(tokenizer, tmp, model.cfg)
        if chat_files is not None:
            copy_chat_files(Path(chat_files), tmp)
        hf["dtype"] = str(out_dtype).split(".")[-1]
        if eos is not None:
            hf["eos_token_id"] = eos
        hf |= extra_config or {}
        (tmp / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    return final


class _Pending(NamedTuple):
    """One checkpoint tensor to write: made by the key-map `op` from the moekit `tensor` (with the
    other `keys` it produces), of `shape`, written in `dtype`."""

    tensor: Tensor
    op: str
    keys: list[str]
    shape: tuple[int, ...]
    dtype: torch.dtype


def _save_plan(
    model: MoETransformer, arch: Architecture, layout: str, dtype: torch.dtype
) -> dict[str, _Pending]:
    """{checkpoint key: what makes it} in model order."""
    keymap, cfg = arch.keys, model.cfg
    buffers = {name for name, _ in model.named_buffers()}
    out: dict[str, _Pending] = {}
    for name, tensor in model.state_dict().items():
        options = placements(keymap, name, cfg)
        if options is None:
            if name in buffers and not tensor.any():
                continue  # a zero correction bias is the architecture's plain router
            raise ValueError(
                f"{arch.model_type} cannot express this model: it has no place for {name}"
            )
        source, keys = options[min(LAYOUTS.index(layout), len(options) - 1)]
        out_dtype = dtype if name not in buffers and tensor.is_floating_point() else tensor.dtype
        shapes = expected_shapes(source, tuple(tensor.shape), keys)
        for key in keys:
            out[key] = _Pending(tensor, source.op, keys, shapes[key], out_dtype)
    for copy, original in arch.copies(cfg).items():
        out[copy] = out[original]._replace(op="copy", keys=[copy])
    return out


def _materialise(tensors: dict[str, _Pending], names: list[str]) -> dict[str, Tensor]:
    """The checkpoint tensors of one shard, contiguous and in their output dtype; a copy
    (`Architecture.copies`) gets its own memory, as safetensors wants."""
    out: dict[str, Tensor] = {}
    starts: set[int] = set()
    wanted = set(names)
    for name in names:
        if name in out:
            continue  # made with an earlier key of the same moekit tensor
        pending = tensors[name]
        for key, value in OPS[pending.op][1](pending.tensor.detach(), pending.keys):
            if key in wanted:
                value = value.to(pending.dtype).contiguous()
                out[key] = value.clone() if value.data_ptr() in starts else value
                starts.add(out[key].data_ptr())
    return out


def write_tokenizer(tokenizer: Any, folder: Path, cfg: ModelConfig) -> int | None:
    """Write or copy tokenizer files into `folder`; return the end-of-text id when known."""
    if tokenizer is None:
        return None
    if isinstance(tokenizer, (str, Path)):
        source = Path(tokenizer)
        if source.is_dir():
            copied = [n for n in TOKENIZER_FILES if (source / n).is_file()]
            if not copied:
                raise FileNotFoundError(f"{source} holds none of {', '.join(TOKENIZER_FILES)}")
            for name in copied:
                shutil.copy2(source / name, folder / name)
            return None
        tokenizer = read_tokenizer(source, "give a readable tokenizer.json")
    tokenizer.save(str(folder / "tokenizer.json"))
    eos = tokenizer.token_to_id(END_OF_TEXT)
    settings: HF = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": cfg.max_seq_len,
        "clean_up_tokenization_spaces": False,
    }
    if eos is not None:
        settings["eos_token"] = END_OF_TEXT
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    return eos
