"""The Hugging Face architectures moekit reads and writes, by config.json's `model_type`.

Each file here is one architecture: its config map, key map and anything special to it, as an
`Architecture`. Adding one is adding its file, importing it below and listing it in `ARCHS`; the
parity tests then ask for a case in tests/interop_cases.py.
"""

from __future__ import annotations

from pathlib import Path

from moekit.interop.architecture import Architecture
from moekit.interop.archs.deepseek_v3 import DEEPSEEK_V3
from moekit.interop.archs.gpt_oss import GPT_OSS
from moekit.interop.archs.mixtral import MIXTRAL
from moekit.interop.archs.olmoe import OLMOE
from moekit.interop.archs.qwen2_moe import QWEN2_MOE
from moekit.interop.archs.qwen3_moe import QWEN3_MOE
from moekit.interop.configs import HF
from moekit.interop.files import CheckpointError

ARCHS: dict[str, Architecture] = {
    arch.model_type: arch for arch in (MIXTRAL, QWEN2_MOE, QWEN3_MOE, OLMOE, DEEPSEEK_V3, GPT_OSS)
}
ARCHITECTURES = tuple(ARCHS)


def architecture_named(name: str) -> Architecture:
    """The architecture called `name` (a model_type), to write a checkpoint in."""
    if name not in ARCHS:
        raise ValueError(f"arch={name!r} is invalid: allowed values are {', '.join(ARCHITECTURES)}")
    return ARCHS[name]


def architecture_of(hf: HF, source: str | Path = "config.json") -> Architecture:
    """The architecture of a config.json (read from `source`), or an error naming the file and
    what it says when unsupported (its quantization_config, if any, is `interop.quantized`'s)."""
    kind, classes = hf.get("model_type"), hf.get("architectures")
    if kind is None:
        raise CheckpointError(
            f"{source} has no model_type (architectures: {classes}), which names the "
            f"architecture; moekit reads {', '.join(ARCHITECTURES)}: restore the checkpoint's "
            "config.json"
        )
    if kind not in ARCHS:
        raise CheckpointError(
            f"{source}: architecture {kind!r} ({classes}) is not supported; moekit reads and "
            f"writes {', '.join(ARCHITECTURES)}"
        )
    return ARCHS[kind]
