"""The package's layering ([tool.importlinter] in pyproject.toml): the contracts hold, and they catch an
upward import, a sibling import, an import hidden in a function and a module that no layer names."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """Run lint-imports on the package under root/src with root's pyproject.toml, as a user would."""
    env = os.environ | {"PYTHONPATH": str(root / "src"), "COLUMNS": "400"}  # the report wraps at the width
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_contracts_hold():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"Contracts: 3 kept, 0 broken", result.stdout), result.stdout


@pytest.fixture
def copy(tmp_path) -> Path:
    """The package and its contracts in a scratch folder, to break on purpose."""
    shutil.copytree(ROOT / "src" / "sd3", tmp_path / "src" / "sd3", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def add_line(path: Path, line: str) -> None:
    path.write_text(path.read_text() + "\n" + line + "\n")


@pytest.mark.parametrize(("module", "line", "broken", "named"), [
    # the network reaching up into the training run: both the layers and the model's own contract
    ("model/rope.py", "from sd3.train import ema  # noqa", ["layers", "network knows nothing"],
     "sd3.model.rope -> sd3.train.ema"),
    # the config reaching a leaf utility of its own layer, inside a function, where it is easy to miss
    ("config/cli.py", "def _f():\n    from sd3 import paths  # noqa\n    return paths", ["layers", "config imports"],
     "sd3.config.cli -> sd3.paths"),
    # two siblings of one layer: the loader role's wire format used by the offline scores
    ("eval/scores.py", "import sd3.dist.batch  # noqa", ["layers"], "sd3.eval.scores -> sd3.dist.batch"),
])
def test_a_wrong_import_breaks_the_contracts(copy, module, line, broken, named):
    add_line(copy / "src" / "sd3" / module, line)
    result = lint_imports(copy)
    assert result.returncode == 1, result.stdout + result.stderr
    report = result.stdout
    for contract in broken:
        assert re.search(rf"{contract}.* BROKEN", report), report
    assert named in report, report


def test_a_module_no_layer_names_breaks_the_contracts(copy):
    """A new top-level module must be given a place in the layers (`exhaustive`), not slip past them."""
    (copy / "src" / "sd3" / "helpers.py").write_text('"""Somewhere to put things."""\n')
    result = lint_imports(copy)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "sd3.helpers" in result.stdout, result.stdout


def test_no_script_edits_sys_path():
    """The set-up installs the package, so entry scripts, data tools and the notebook import it as is."""
    places = [ROOT / "infer.py", *(ROOT / "src").rglob("*.py"), *(ROOT / "data").glob("*.py"),
              *(ROOT / "notebooks").glob("*.ipynb")]
    offenders = [str(p.relative_to(ROOT)) for p in places if re.search(r"sys\.path\.(insert|append)", p.read_text())]
    assert not offenders, offenders
