"""Headless execution of ``analysis/report.ipynb`` (what ``make report`` runs): owns the command line.

``python -m analysis.run_report [RESULTS] [--out DIR]`` executes the notebook with nbclient, papermill-style:
the values are injected as a cell after the notebook's ``parameters`` cell. Tables and figures go to
``<RESULTS>/report/`` (or ``--out``), together with the executed notebook ``report.ipynb`` and its HTML
rendering ``report.html`` (:func:`write_html`: nbconvert, figures embedded, no code cells, viewable offline).
The notebook's printed output (loaded records, skipped files, notes) is echoed here.

Exit status: 0 on success, including an empty results folder (a clear message, nothing written); 2 when the
folder does not exist; 1 when a notebook cell fails (the error line is printed, not the traceback).
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path
from typing import Optional

NOTEBOOK = Path(__file__).resolve().parent / "report.ipynb"
ROOT = NOTEBOOK.parent.parent


def inject_parameters(nb, **values: str) -> None:
    """Insert a cell assigning ``values`` right after the cell tagged ``parameters`` (else at the top)."""
    import nbformat

    source = "# Injected parameters\n" + "\n".join(f"{k} = {v!r}" for k, v in values.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    cell["id"] = "injected-parameters"
    position = next((i + 1 for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])),
                    0)
    nb.cells.insert(position, cell)


def _echo_streams(nb) -> None:
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                target = sys.stderr if output.get("name") == "stderr" else sys.stdout
                target.write(output.get("text", ""))


def run(results: Path, out: Optional[Path] = None, timeout: int = 600) -> int:
    """Execute the report notebook on ``results``; returns the exit status described in the module docstring."""
    import nbformat
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    results = results.resolve()
    if not results.is_dir():
        print(f"report: no results folder at {results}; pass an existing folder (make report RESULTS=path) "
              f"holding records in runs/*.json", file=sys.stderr)
        return 2
    out = (out or results / "report").resolve()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    inject_parameters(nb, RESULTS=str(results), OUT=str(out))
    status = 0
    with tempfile.TemporaryDirectory(prefix="report-kernel-") as sockets:
        # IPC sockets in a private folder: no open TCP ports, no files left in the working tree
        km = KernelManager(kernel_name="python3", transport="ipc", ip=str(Path(sockets) / "kernel"))
        client = NotebookClient(nb, km=km, timeout=timeout, resources={"metadata": {"path": str(ROOT)}})
        try:
            client.execute()
        except CellExecutionError as error:
            lines = [line for line in str(error).splitlines() if line.strip()]
            print(f"report: a notebook cell failed: {lines[-1] if lines else error}", file=sys.stderr)
            status = 1
        finally:
            if km.has_kernel:  # nbclient only shuts down kernels it started itself
                km.shutdown_kernel(now=False)
    _echo_streams(nb)
    if out.is_dir():
        nbformat.write(nb, out / "report.ipynb")
        print(f"report: executed notebook saved to {out / 'report.ipynb'}")
        html = write_html(nb, out / "report.html")
        if html is not None:
            print(f"report: HTML rendering saved to {html}")
    return status


def write_html(nb, path: Path) -> Optional[Path]:
    """The executed notebook ``nb`` as one self-contained HTML file at ``path`` (nbconvert's ``lab`` template:
    styles inlined, figures embedded as data, code cells and prompts left out; no script is needed to read it,
    so it opens offline). Returns ``path``, or ``None`` with a note when nbconvert is not installed (a dev
    dependency: ``make install``)."""
    try:
        from nbconvert import HTMLExporter
    except ImportError:
        print("report: nbconvert is not installed, so no report.html (make install, or pip install nbconvert)",
              file=sys.stderr)
        return None
    exporter = HTMLExporter(template_name="lab", embed_images=True, exclude_input=True, exclude_input_prompt=True,
                            exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": "Token-reduction benchmark report"}})
    # the template's remote scripts (require.js, MathJax) are not needed to read the report: left out, so the file
    # asks the network for nothing
    body = re.sub(r'<script[^>]*\ssrc="https?://[^"]*"[^>]*>\s*</script>\s*', "", body)
    path.write_text(body, encoding="utf-8")
    return path


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.run_report", description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", default="results", help="folder with the records (default: results)")
    parser.add_argument("--out", default=None, help="output folder (default: <results>/report)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds allowed per notebook cell")
    args = parser.parse_args(argv)
    return run(Path(args.results), Path(args.out) if args.out else None, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
