"""The entry points need no path patch: ``[project.scripts]`` names callables that exist, and no module of the
harness, the methods or the report edits ``sys.path`` (the project is installed, ``make`` does it)."""
from __future__ import annotations

import ast
import importlib
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_console_script_names_a_callable(name):
    module, _, function = SCRIPTS[name].partition(":")
    assert callable(getattr(importlib.import_module(module), function))


def patches_sys_path(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", None) == "sys":
            return True
    return False


def test_no_module_patches_sys_path():
    files = [path for folder in ("experiments", "methods", "analysis", "tests/fixtures")
             for path in sorted((ROOT / folder).rglob("*.py"))]
    assert len(files) > 20
    assert [str(path.relative_to(ROOT)) for path in files if patches_sys_path(path)] == []
