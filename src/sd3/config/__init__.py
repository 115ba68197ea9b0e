"""Configuration: dataclasses, named presets, dotted command-line overrides, JSON round trip.

Every field has a docstring (the string under it); `.venv/bin/python src/train.py --help` prints them.
A config is built in three steps, each of which fails loudly on a mistake:

    cfg = preset("sd3_256")                                   # the seed's stage-1 values
    cfg = apply_overrides(cfg, ["--train.lr=3e-4"])           # unknown keys name the closest valid ones
    cfg.validate()                                            # cross-field checks, before any heavy work

`to_dict` / `from_dict` round-trip exactly; a checkpoint carries its config as `config.json`. The schema
is in `sd3.config.schema`, the presets in `sd3.config.presets`, the command line in `sd3.config.cli`.
"""

from sd3.config.cli import apply_overrides, field_docs, help_text, set_value
from sd3.config.presets import PRESETS, preset
from sd3.config.schema import (
    Config,
    ConfigError,
    DataConfig,
    EncoderConfig,
    FlowConfig,
    LogConfig,
    ModelConfig,
    RankConfig,
    TrainConfig,
    field_paths,
    from_dict,
    load_json,
    save_json,
    to_dict,
)

__all__ = [
    "PRESETS", "Config", "ConfigError", "DataConfig", "EncoderConfig", "FlowConfig", "LogConfig", "ModelConfig",
    "RankConfig", "TrainConfig", "apply_overrides", "field_docs", "field_paths", "from_dict", "help_text",
    "load_json", "preset", "save_json", "set_value", "to_dict",
]
