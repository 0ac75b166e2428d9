"""The look of every figure: owns the seaborn/matplotlib style, the colour and marker of each method, the
shared axis labels, the outside legend and writing a figure as PNG and PDF (byte-stable: no timestamps).

Used by :mod:`analysis.plots` and :mod:`analysis.curves`, so a method looks the same in every figure.
"""
from __future__ import annotations

import contextlib
import textwrap
from pathlib import Path
from typing import Iterator, Mapping

import matplotlib
import seaborn as sns
from matplotlib.figure import Figure

from .formatting import REFERENCE, method_rank

DPI = 150
MARKERS = ("*", "o", "s", "D", "^", "v", "P", "X", "h", "<", ">", "p")
GFLOPS_LABEL = "GFLOPs per image (1 multiply-add = 1 FLOP)"
TOP1_LABEL = "Top-1 accuracy (%)"


@contextlib.contextmanager
def figure_style() -> Iterator[None]:
    """The report's style for the figures drawn inside the ``with`` block."""
    rc = {"pdf.fonttype": 42, "ps.fonttype": 42, "axes.titlesize": 11, "legend.fontsize": 8.5,
          "legend.title_fontsize": 9}
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.85, rc=rc), \
            matplotlib.rc_context({"svg.hashsalt": "report", "image.interpolation": "nearest"}):
        yield


def save_figure(fig: Figure, out_dir: Path, stem: str) -> list[Path]:
    """Write ``<out_dir>/<stem>.png`` and ``.pdf``; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png, pdf = out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"
    fig.savefig(png, dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    fig.savefig(pdf, bbox_inches="tight", metadata={"CreationDate": None, "Producer": None, "Creator": None})
    return [png, pdf]


def method_styles(families: Mapping[str, str]) -> dict[str, tuple[tuple[float, float, float], str]]:
    """A fixed colour and marker per method of ``families`` (method -> family, as
    :func:`analysis.formatting.method_families` reads them), stable across figures; the reference (family
    ``none``) is dark grey with a star."""
    ordered = sorted(families, key=lambda method: method_rank(method, families[method]))
    palette = sns.color_palette("colorblind", 10)
    styles, k = {}, 0
    for method in ordered:
        if families[method] == REFERENCE:
            styles[method] = ((0.2, 0.2, 0.2), "*")
            continue
        styles[method] = (palette[k % len(palette)], MARKERS[1 + k % (len(MARKERS) - 1)])
        k += 1
    return styles


def legend_outside(ax, **kwargs) -> None:
    """The axes' legend to the right of the plot, without a frame (nothing when there are no labels)."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
                  frameon=False, **kwargs)


def wrap(text: str, width: int = 30) -> str:
    """``text`` broken into lines of at most ``width`` characters (titles and legend entries)."""
    return "\n".join(textwrap.wrap(text, width)) or text
