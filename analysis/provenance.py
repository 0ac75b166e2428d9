"""Provenance of the records a report reads: owns the checks that a record can be followed from a clean clone,
and the report's header (the commit it was generated at, the records it read per kind, the ones it skipped).

:func:`record_issues` names, per record, what a reader of a clone could not follow:

- an **absolute path** anywhere in the record (``config.paths.run_dir: /work/...``): records name files by their
  path relative to the repository (``experiments/records/build.py``), so a machine's own path means the record
  was written elsewhere or before that rule;
- a **cited checkpoint that is missing**: a value under a key named ``checkpoint`` (``config.model.checkpoint``)
  or a ``checkpoint:<path>`` label (``train.init``, ``tradeoff.weights``): missing when the file is not in the
  repository, or not committed there (``git ls-files``, where the repository is a git checkout);
- a **dirty tree** (``provenance.git_dirty``): the code that wrote it is not a commit.

These are reported by record, never silently dropped: the records still count (a reader decides). The header
(:func:`header`) states the report's commit, the records read per kind, every file skipped and why (unreadable,
incomplete, a duplicate id, superseded by a newer record of the same run, throughput entries left out for
another timing protocol) and the records with provenance issues; :func:`write_provenance` lists them all in
``provenance.csv``. Pure Python and pandas (``git`` is asked through a subprocess, when present).
"""
from __future__ import annotations

import functools
import posixpath
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Optional

import pandas as pd

REPOSITORY = Path(__file__).resolve().parents[1]
CHECKPOINT_KINDS = {"missing": "a missing checkpoint", "not committed": "an uncommitted checkpoint",
                    "outside the repository": "a checkpoint outside the repository"}
SHOWN = 10  # names listed inline in the header per kind of problem; the CSV has all of them


def _strings(value: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """Every string of a JSON value with its dotted location (``config.paths.run_dir``, ``tokens.maps[0]``)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _strings(item, f"{where}[{index}]")
    elif isinstance(value, str):
        yield where, value


def _path_part(value: str) -> tuple[str, str]:
    """``checkpoint:/a/b.pth`` -> (``checkpoint``, ``/a/b.pth``); a plain value -> (``""``, value)."""
    label, sep, path = value.partition(":")
    if sep and label.isidentifier() and path:
        return label, path
    return "", value


def is_absolute(path: str) -> bool:
    """A POSIX absolute path (``/work/x``, not ``/`` alone) or a Windows drive path (``C:\\x``, ``C:/x``)."""
    if len(path) > 1 and path.startswith("/") and not path.startswith("//"):
        return True
    return len(path) > 2 and path[0].isalpha() and path[1] == ":" and path[2] in "\\/"


@functools.lru_cache(maxsize=4)
def committed_files(root: Path = REPOSITORY) -> Optional[frozenset[str]]:
    """The files git tracks under ``root`` (relative POSIX paths), ``None`` when ``root`` is no git checkout."""
    try:
        done = subprocess.run(["git", "-C", str(root), "ls-files", "-z"], capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return frozenset(name for name in done.stdout.decode("utf-8", "replace").split("\0") if name)


def cited_checkpoints(record: dict[str, Any]) -> list[tuple[str, str]]:
    """``(where, path)`` of every checkpoint the record cites (module docstring), in record order, unique."""
    found: dict[str, str] = {}
    for where, value in _strings({k: v for k, v in record.items() if k != "tokens"}):
        label, path = _path_part(value)
        key = where.rsplit(".", 1)[-1]
        if label == "checkpoint" or (key == "checkpoint" and not label and value):
            found.setdefault(path, where)
    return [(where, path) for path, where in found.items()]


def record_issues(record: dict[str, Any], root: Path = REPOSITORY) -> list[str]:
    """What a clone could not follow in ``record`` (module docstring), one line each; empty when nothing."""
    issues = []
    for where, value in _strings({k: v for k, v in record.items() if k != "tokens"}):
        _, path = _path_part(value)
        if is_absolute(path):
            issues.append(f"absolute path {where}={value}")
    tracked = committed_files(root)
    for where, path in cited_checkpoints(record):
        if is_absolute(path):
            issues.append(f"checkpoint {where}={path} is outside the repository")
            continue
        clean = posixpath.normpath(path)
        if not (root / clean).is_file():
            issues.append(f"checkpoint {where}={path} is missing")
        elif tracked is not None and clean not in tracked:
            issues.append(f"checkpoint {where}={path} is not committed")
    provenance = record.get("provenance") if isinstance(record.get("provenance"), dict) else {}
    if provenance.get("git_dirty") is True:
        issues.append("written from a dirty tree (provenance.git_dirty)")
    return issues


def report_commit(root: Path = REPOSITORY) -> str:
    """The commit the report code is at, ``+ uncommitted changes`` when the tree is dirty; ``unknown`` without
    git."""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=60)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


def _listed(items: list[str]) -> str:
    shown = "; ".join(items[:SHOWN])
    return shown + (f"; and {len(items) - SHOWN} more (provenance.csv)" if len(items) > SHOWN else "")


def issue_kinds(issues: list[str]) -> list[str]:
    """The kinds of ``issues`` (``absolute path``, ``checkpoint ... missing``...), for the header's counts."""
    kinds = []
    for issue in issues:
        if issue.startswith("absolute path"):
            kinds.append("an absolute path")
        elif issue.startswith("checkpoint"):
            kinds.append(CHECKPOINT_KINDS[issue.rsplit(" is ", 1)[-1]])
        else:
            kinds.append("a dirty tree")
    return kinds


def header(records: pd.DataFrame, folder: str | Path, shown_folder: str, protocol_left_out: list[dict],
           commit: Optional[str] = None) -> str:
    """The report's header (Markdown): the commit, the records read per kind, the files skipped and why, the
    throughput entries left out for another timing protocol, and the records with provenance issues, each by
    name (the first :data:`SHOWN` of each inline; ``provenance.csv`` has every one)."""
    commit = commit if commit is not None else report_commit()
    lines = [f"Generated at commit `{commit}` from the records under `{shown_folder}`."]
    kinds = Counter(records["kind"]) if not records.empty else Counter()
    counts = ", ".join(f"{kinds[k]} {k}" for k in sorted(kinds)) or "none"
    lines.append(f"Records read: {len(records)} ({counts}).")
    skipped = list(records.attrs.get("skipped", []))
    skipped += [{"path": s["path"], "reason": f"superseded by {s['by']} (same run)"}
                for s in records.attrs.get("superseded", [])]
    if skipped:
        lines.append(f"Skipped: {len(skipped)} file(s): " +
                     _listed([f"`{s['path']}` ({s['reason']})" for s in skipped]) + ".")
    else:
        lines.append("Skipped: none.")
    if protocol_left_out:
        by_record: dict[str, list[str]] = {}
        for item in protocol_left_out:
            by_record.setdefault(item["record_id"], []).append(
                f"{item['condition']}: protocol {item['protocol']}, column on {item['kept_protocol']}")
        lines.append(f"Throughput left out (one timing protocol per column, the newest): {len(by_record)} "
                     "record(s): " + _listed([f"`{rid}` ({'; '.join(v)})" for rid, v in by_record.items()]) + ".")
    if not records.empty and "provenance_issues" in records:
        flagged = records[records["provenance_issues"].map(bool)]
        if len(flagged):
            counts = Counter(kind for issues in flagged["provenance_issues"] for kind in set(issue_kinds(issues)))
            summary = ", ".join(f"{n} with {kind}" for kind, n in sorted(counts.items()))
            named = [f"`{row.path}` ({row.provenance_issues[0]}"
                     + (f", +{len(row.provenance_issues) - 1} more" if len(row.provenance_issues) > 1 else "")
                     + ")" for row in flagged.itertuples()]
            lines.append(f"Provenance issues (read, but a clone cannot follow them): {len(flagged)} record(s), "
                         f"{summary}: " + _listed(named) + ".")
    return "\n".join(f"- {line}" for line in lines)


def write_provenance(records: pd.DataFrame, out_dir: str | Path) -> Optional[Path]:
    """``provenance.csv``: one row per record issue (``path``, ``record_id``, ``issue``); ``None`` when no record
    has one."""
    if records.empty or "provenance_issues" not in records:
        return None
    rows = [{"path": row.path, "record_id": row.record_id, "issue": issue}
            for row in records.itertuples() for issue in row.provenance_issues or []]
    if not rows:
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "provenance.csv"
    path.write_text(pd.DataFrame(rows).to_csv(index=False, lineterminator="\n"), encoding="utf-8")
    return path
