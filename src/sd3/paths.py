"""Where relative paths in a config point: the repository root, from any working directory.

A config (and the `config.json` a checkpoint carries) keeps paths as written, e.g. the `tiny` preset's
`data/demo/64` and `data/tiny_encoders/gemma`; they mean the same files whether `src/train.py`, `infer.py`
or the notebook runs from the repository root, from `notebooks/` or from anywhere else. Absolute paths
are used as they are. Paths given only on a command line (`--ckpt`, `--out`, `--resume DIR`) are the
shell's, relative to the current directory, as usual.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
"""The repository root (the folder that holds `src/`)."""


def resolve(path: str | Path) -> Path:
    """A config path as an absolute path: relative ones are relative to the repository root."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else REPO / path


def user_path(path: str | Path) -> Path:
    """A path typed on a command line or in an environment variable (`--ckpt`, SD3_CKPT): relative to the
    current directory when it exists there, else relative to the repository root when it exists there
    (so `runs/demo` works from `notebooks/` too), else as given (and the caller reports it missing)."""
    path = Path(path).expanduser()
    if path.is_absolute() or path.exists() or not (REPO / path).exists():
        return path
    return REPO / path


def shown(path: str | Path) -> str:
    """A path as a command typed in the current directory should give it: relative when inside it."""
    path = Path(path).absolute()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def command(script: str) -> str:
    """How to run one of the repository's scripts (`src/create_indices.py`) from here, with the interpreter
    running now (the venv's), so a command a message prints works as printed."""
    return f"{shlex.quote(shown(sys.executable))} {shlex.quote(shown(REPO / script))}"
