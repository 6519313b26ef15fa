"""The project's own style rules (``[tool.ruff]`` in pyproject.toml) hold on every file, and library modules do not
import Lightning (the dependency direction is ``callbacks -> calmwild``)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The modules that adapt calmwild to Lightning (the LightningModule, the data modules and the command line);
# everything else in the package must work without it.
LIGHTNING_ADAPTERS = {"module.py", "lightning_cli.py", "checkpoint_io.py", "cli.py", "commands.py"}


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    out = subprocess.run([ruff, "check", "--output-format", "concise", "."], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_library_modules_do_not_import_lightning_or_callbacks():
    offenders = []
    for path in sorted((ROOT / "calmwild").rglob("*.py")):
        used = _imports(path) & {"lightning", "pytorch_lightning", "callbacks"}
        adapter = path.name in LIGHTNING_ADAPTERS and path.parent.name == "calmwild" or path.parent.name == "data"
        if used and not adapter:
            offenders.append(f"{path.relative_to(ROOT)} imports {sorted(used)}")
    assert not offenders, offenders
