"""Console lines of every rank: one place decides which rank prints, and copies each line to the run's
`train.log`. Every layer may use it (it imports nothing of `sd3`)."""

from __future__ import annotations

import sys
from pathlib import Path

_IS_MAIN = True
_LOG_FILE = None


def set_main(is_main: bool) -> None:
    global _IS_MAIN
    _IS_MAIN = is_main


def open_log(path: Path) -> None:
    """Append every console line of this rank (print0, log0, log_rank; not the progress bar) to `path`
    as well: `<run_dir>/train.log`, the run's own record without wandb."""
    global _LOG_FILE
    close_log()
    path.parent.mkdir(parents=True, exist_ok=True)
    _LOG_FILE = open(path, "a", buffering=1)  # noqa: SIM115  (kept open for the run: line-buffered appends)


def close_log() -> None:
    global _LOG_FILE
    if _LOG_FILE is not None:
        _LOG_FILE.close()
        _LOG_FILE = None


def _to_file(text: str) -> None:
    if _LOG_FILE is not None:
        _LOG_FILE.write(text.rstrip("\n") + "\n")


def print0(*args, **kwargs) -> None:
    """print on the rank that logs (the first model rank), nowhere else; also to its train.log."""
    if _IS_MAIN:
        print(*args, **kwargs, flush=True)
        _to_file(" ".join(map(str, args)))


def log0(message: str) -> None:
    """A console line on the logging rank that does not break the progress bar (tqdm.write)."""
    if _IS_MAIN:
        from tqdm import tqdm

        tqdm.write(message)
        _to_file(message)


def log_rank(rank: int, role: str, message: str) -> None:
    """A line from any rank, tagged (for errors and loader notes that every rank may need to say)."""
    line = f"[rank {rank} {role}] {message}"
    print(line, file=sys.stderr, flush=True)
    _to_file(line)
