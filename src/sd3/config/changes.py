"""What changed between the config a checkpoint was written with and the config of the run that loads it.

Fields that decide the shapes of the weights (the model's shape, the encoders' widths it reads) cannot
change when a run resumes or starts from another run's weights: the weights would not load. Everything
else may (the learning rate, the number of steps, logging, the data), and a run that changes it says so.
"""

from __future__ import annotations

from typing import Any

from sd3.config.schema import Config, ConfigError, field_paths

FIXED_SHAPE = (
    "model.in_channels", "model.patch_size", "model.depth", "model.width", "model.num_heads", "model.mlp_type",
    "model.mlp_ratio", "model.text_dims", "model.pooled_dim", "model.mixer_depth", "model.mixer_joint",
)
"""The fields the weights' shapes follow: a checkpoint loads only into a model with the same values."""

_NOT_A_CHANGE = ("run_dir", "preset")
"""Fields that name the run rather than configure it (a stage started with --init_from has its own)."""


def config_changes(old: Config, new: Config) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) for every field that differs, in the order of the schema."""
    before, after = field_paths(old), field_paths(new)
    changes = []
    for key, (owner, spec) in after.items():
        if key in _NOT_A_CHANGE or key not in before:
            continue
        was, now = getattr(before[key][0], spec.name), getattr(owner, spec.name)
        if was != now:
            changes.append((key, was, now))
    return changes


def _shown(changes: list[tuple[str, Any, Any]]) -> str:
    return ", ".join(f"{key} {was!r} -> {now!r}" for key, was, now in changes)


def check_changes(old: Config, new: Config, *, checkpoint: str, how: str) -> str | None:
    """Raise ConfigError, in one line, when a field of FIXED_SHAPE differs; else return the one line that
    says what else differs (None when nothing does). `checkpoint` names it; `how` is 'resume' or
    'start from' (--init_from)."""
    changes = config_changes(old, new)
    fixed = [c for c in changes if c[0] in FIXED_SHAPE]
    if fixed:
        raise ConfigError(f"cannot {how} {checkpoint}: it was trained with another model shape ({_shown(fixed)}), "
                          "and these fields cannot change (the weights would not load): drop those overrides, or "
                          "train the new shape as a new run in another run_dir")
    if not changes:
        return None
    return f"{how} {checkpoint} with a changed config, going on with the new values: {_shown(changes)}"
