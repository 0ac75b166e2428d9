"""The README's method/knob table, generated from the registry, so it cannot drift from the code.

``python -c "from methods.catalog import tradeoff_table; print(tradeoff_table())"`` prints it, and
``tests/test_registry.py`` fails (showing the expected table) when the README's copy differs.
"""
from __future__ import annotations

from .registry import list_methods, method_spec


def tradeoff_table() -> str:
    """Markdown table: each method, its summary, its inference knob, the knob's default grid, and whether
    the harness fine-tunes it by default."""
    lines = ["| method | what it does | knob (`method.params.*`) | default grid (`method.tradeoff_values`) "
             "| fine-tuned by default |",
             "|---|---|---|---|---|"]
    for name in list_methods():
        spec = method_spec(name)
        knob = f"`{spec.inference_knob}`" if spec.inference_knob else "none"
        grid = ", ".join(str(v) for v in spec.tradeoff_values) if spec.tradeoff_values else "none"
        lines.append(f"| `{name}` | {spec.summary} | {knob} | {grid} | {'yes' if spec.finetune else 'no'} |")
    return "\n".join(lines) + "\n"
