"""Dotted command-line overrides (`--train.lr=3e-4` or `--train.lr 3e-4`) and `--help`.

Values are parsed into each field's type (numbers, booleans, tuples and dicts as Python literals, None);
an unknown key fails at once naming the closest valid keys.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import types
import typing
from typing import Any

from sd3.config.schema import Config, ConfigError, _coerce, _field_type, _resolve, field_paths


def _parse_value(text: str, annotation: Any, key: str) -> Any:
    """Parse a command-line string into the field's type: numbers, booleans, tuples, dicts, None."""
    hints = _resolve(annotation)
    origin = typing.get_origin(hints)
    args = typing.get_args(hints)
    if origin in (typing.Union, types.UnionType):
        if text.strip().lower() in ("none", "null") and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _parse_value(text, inner, key)
    if hints is bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{key}={text!r}: expected true or false")
    if hints is str:
        return text
    if hints in (int, float):
        try:
            number = float(text) if hints is float else int(text.replace("_", ""))
        except ValueError:
            raise ConfigError(f"--{key}={text!r}: expected {hints.__name__}") from None
        return number
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if origin is tuple and args and _resolve(args[0]) is str:
            return tuple(s.strip() for s in text.split(",") if s.strip())
        raise ConfigError(f"--{key}={text!r}: expected a Python literal of type {hints}") from None
    return _coerce(value, hints, key)


def set_value(cfg: Config, key: str, text: str) -> None:
    """Set one dotted key from its command-line text; unknown keys name the closest valid ones."""
    paths = field_paths(cfg)
    if key not in paths:
        close = difflib.get_close_matches(key, list(paths), n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join('--' + c for c in close)}?" if close else ""
        raise ConfigError(f"unknown config key --{key}{hint} (--help lists every key)")
    owner, f = paths[key]
    setattr(owner, f.name, _parse_value(text, _field_type(owner, f), key))


def apply_overrides(cfg: Config, args: list[str]) -> Config:
    """Apply `--a.b=value` or `--a.b value` pairs in order."""
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --train.lr=3e-4")
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"{arg} needs a value: {arg}=VALUE")
            key, text = arg[2:], args[i + 1]
            i += 2
        set_value(cfg, key.replace("-", "_"), text)
    return cfg


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass, read from its source."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def help_text(cfg: Config | None = None) -> str:
    """Every key with its current value and docstring, grouped by section."""
    cfg = Config() if cfg is None else cfg
    lines = []
    for key, (owner, f) in field_paths(cfg).items():
        doc = field_docs(type(owner)).get(f.name, "")
        lines.append(f"  --{key}={getattr(owner, f.name)!r}\n      {doc}")
    return "\n".join(lines)

