"""moekit.interop: Hugging Face checkpoints (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3,
GPT-OSS) read into `MoETransformer` and written back, with logits equal to transformers'."""

from moekit.interop.archs import ARCHITECTURES
from moekit.interop.files import CheckpointError
from moekit.interop.hf import hf_model_config, load_hf, save_hf

__all__ = ["ARCHITECTURES", "CheckpointError", "hf_model_config", "load_hf", "save_hf"]
