"""moekit: Mixture-of-Experts layers, models, training, checkpoints and analysis."""

from typing import Any

from moekit.config import ModelConfig, MoEConfig
from moekit.model import ModelOutput, MoETransformer
from moekit.moe import MoEAux, MoELayer
from moekit.routing import Router, Routing

__all__ = [
    "MoEAux",
    "MoEConfig",
    "MoELayer",
    "MoETransformer",
    "ModelConfig",
    "ModelOutput",
    "Router",
    "Routing",
    "load",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """`moekit.load` (moekit.loading), imported on first use: it reads checkpoints and
    tokenizers, which `import moekit` does not need."""
    if name == "load":
        from moekit.loading import load

        return load
    raise AttributeError(f"module 'moekit' has no attribute {name!r}")
