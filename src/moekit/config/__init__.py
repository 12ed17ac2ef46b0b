"""Configs: plain, validated, JSON-round-trippable dataclasses.

Every config is `@dataclass(kw_only=True)` data (no tensors, devices or callables) whose fields
`ConfigBase` (base.py) checks against their type hints (rules.py), then the class against its own
rules between fields; a bad value raises `ValueError` naming the field, the value and what is
allowed. moe.py holds the MoE layer's config, model.py the model's, run.py a training run's,
commands.py those of the commands with settings of their own (generate, analyze, quantize,
trace, cache-sim, convert, upcycle), presets.py the named presets.
"""

from moekit.config.base import ConfigBase, config_from_data
from moekit.config.commands import (
    AnalyzeConfig,
    CacheSimConfig,
    ConvertConfig,
    GenerateConfig,
    OffloadConfig,
    QuantizeConfig,
    TraceConfig,
    UpcycleConfig,
)
from moekit.config.model import MLAConfig, ModelConfig, RopeScaling, dense_twin
from moekit.config.moe import MoEConfig
from moekit.config.presets import MODEL_PRESETS, RUN_PRESETS
from moekit.config.rules import check_choice
from moekit.config.run import (
    FREEZE_PARTS,
    RUN_FILE_REMEDY,
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
)

__all__ = [
    "FREEZE_PARTS",
    "MODEL_PRESETS",
    "RUN_FILE_REMEDY",
    "RUN_PRESETS",
    "AnalyzeConfig",
    "CacheSimConfig",
    "CheckpointConfig",
    "ConfigBase",
    "ConvertConfig",
    "DataConfig",
    "EvalConfig",
    "GenerateConfig",
    "MLAConfig",
    "MoEConfig",
    "ModelConfig",
    "OffloadConfig",
    "ParallelConfig",
    "QuantizeConfig",
    "RopeScaling",
    "RunConfig",
    "TraceConfig",
    "TrainConfig",
    "UpcycleConfig",
    "check_choice",
    "config_from_data",
    "dense_twin",
]
