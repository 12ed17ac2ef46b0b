"""moekit.model: the decoder-only MoE language model, its generation and parameter counts."""

from moekit.model.generation import KVCache, generate
from moekit.model.params import format_count, parameter_breakdown, parameter_table
from moekit.model.transformer import ModelOutput, MoETransformer

__all__ = [
    "KVCache",
    "MoETransformer",
    "ModelOutput",
    "format_count",
    "generate",
    "parameter_breakdown",
    "parameter_table",
]
