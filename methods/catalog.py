"""The README's two method tables, generated from the registry, so they cannot drift from the code.

``python -c "from methods.catalog import methods_table, tradeoff_table as t; print(methods_table(), t())"``
prints both; ``tests/test_registry.py`` fails (showing the expected tables) when
the README's copies differ. Each takes the method names to list (default: every registered method), so the
test can leave out a method whose module is not committed yet (see its docstring).
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Iterable, Optional

from .registry import list_methods, method_parameters, method_spec


def _names(names: Optional[Iterable[str]]) -> list[str]:
    return list_methods() if names is None else sorted(names)


def tradeoff_table(names: Optional[Iterable[str]] = None) -> str:
    """Markdown table: each method, its summary, its inference knob, the knob's default grid, and whether
    the harness fine-tunes it by default."""
    lines = ["| method | what it does | knob (`method.params.*`) | default grid (`method.tradeoff_values`) "
             "| fine-tuned by default |",
             "|---|---|---|---|---|"]
    for name in _names(names):
        spec = method_spec(name)
        knob = f"`{spec.inference_knob}`" if spec.inference_knob else "none"
        grid = ", ".join(str(v) for v in spec.tradeoff_values) if spec.tradeoff_values else "none"
        lines.append(f"| `{name}` | {spec.summary} | {knob} | {grid} | {'yes' if spec.finetune else 'no'} |")
    return "\n".join(lines) + "\n"


def module_file(name: str) -> str:
    """The repository path of the module that registers method ``name``, e.g. ``methods/topk.py``."""
    return f"methods/{Path(inspect.getfile(method_spec(name).factory)).name}"


def methods_table(names: Optional[Iterable[str]] = None) -> str:
    """Markdown table: one row per method module (methods sharing a file share a row, in name order), whether
    the harness fine-tunes them by default, and every parameter their factories take."""
    rows: dict[str, list[str]] = {}
    for name in _names(names):
        rows.setdefault(module_file(name), []).append(name)
    lines = ["| method | file | trains? | parameters (`method.params.*`) |", "|---|---|---|---|"]
    for file, members in rows.items():
        finetune = {method_spec(name).finetune for name in members}
        if len(finetune) != 1:
            raise ValueError(f"{file}: methods {members} differ in finetune; give them one row each")
        params = list(dict.fromkeys(p for name in members for p in method_parameters(name)))
        lines.append(f"| {', '.join(f'`{n}`' for n in members)} | `{file}` | "
                     f"{'fine-tunes' if finetune.pop() else 'off the shelf'} | "
                     f"{', '.join(f'`{p}`' for p in params) or 'none'} |")
    return "\n".join(lines) + "\n"
