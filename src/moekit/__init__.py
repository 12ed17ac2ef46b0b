"""moekit: Mixture-of-Experts layers, models, training, checkpoints and analysis."""

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
]
__version__ = "0.1.0"
