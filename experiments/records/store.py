"""Records on disk: owns the atomic write, the clean-up of dead writers' temp files, and load.

Writes go to a temp file in the same folder, are fsynced, then renamed, so a reader never sees a partial record
and a failed write leaves nothing behind. A writer killed mid-write (SIGKILL, node lost) cannot clean up: its
temp file is named ``.<file>.w<pid>@<host>.<random>.tmp`` and the next write into that folder removes it once
that pid is gone on this host, or, for another host's (or an older unnamed) temp file, once it is older than
``STALE_TEMP_AGE_S``. A live writer's temp file is never touched.
"""
from __future__ import annotations

import json
import os
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from experiments.records import migrate
from experiments.records.schema import IncompleteRecordError, RecordValueError, missing_keys, validate_record


class RecordWriteError(OSError):
    """A record (or other JSON file) could not be written; the message names the file. Nothing partial is left."""


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


STALE_TEMP_AGE_S = 24 * 3600  # a record write takes seconds: a day-old temp file of another host is a dead writer's
# .<name>.w<pid>@<host>.<mkstemp's 8 random characters>.tmp; the older form lacked the w<pid>@<host> part
_TEMP_NAME = re.compile(r"^\.(?P<name>.+?)\.w(?P<pid>\d+)@(?P<host>[A-Za-z0-9._-]+)\.[a-z0-9_]{8}\.tmp$")
_OLD_TEMP_NAME = re.compile(r"^\.(?P<name>.+\.json)\.[a-z0-9_]{8}\.tmp$")


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "unknown"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process (or a pid we cannot ask about): treat it as live
    return True


def _dead_writer(name: str, age_s: float) -> bool:
    """Whether the temp file ``name`` belongs to a writer that can no longer finish it."""
    match = _TEMP_NAME.match(name)
    if match:
        if match["host"] == _host_tag():
            return int(match["pid"]) != os.getpid() and not _pid_alive(int(match["pid"]))
        return age_s > STALE_TEMP_AGE_S  # another host's pid cannot be asked about: only its age tells
    return bool(_OLD_TEMP_NAME.match(name)) and age_s > STALE_TEMP_AGE_S


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Remove the temp files that dead writers left in ``folder`` (module docstring); returns them. Never fails:
    a file another cleaner removed first, or one that cannot be removed, is left to the next write."""
    removed = []
    try:
        candidates = [entry for entry in os.scandir(folder)
                      if entry.name.startswith(".") and entry.name.endswith(".tmp")]
    except OSError:
        return removed
    now = time.time()
    for entry in candidates:
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            if _dead_writer(entry.name, now - entry.stat(follow_symlinks=False).st_mtime):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue
    return removed


def atomic_write_json(path: Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` via temp file + fsync + rename; on any error no file is left behind. Temp
    files of dead writers in the same folder are removed first (module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Compact: indenting would put every pixel of the depth-map thumbnails on a line of its own.
    text = json.dumps(payload, separators=(",", ":"), sort_keys=False, allow_nan=False, default=_json_default)
    remove_stale_temp_files(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.w{os.getpid()}@{_host_tag()}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp creates 0600; records are shared results, readable by others
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):  # disk full, I/O error: say which file failed
            message = f"could not write {path} ({type(error).__name__}: {error}); nothing was written there"
            raise (RecordWriteError(error.errno, message) if error.errno else RecordWriteError(message)) from error
        raise
    return path


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_record(results_dir: Path, record: dict[str, Any]) -> Path:
    """Validate ``record`` against the schema (required keys first, then every section and value) and write it
    as built to ``results_dir/runs/<record_id>.json``."""
    missing = missing_keys(record)
    if missing:
        raise ValueError(f"results record is missing {missing}")
    runs = Path(results_dir) / "runs"
    runs.mkdir(parents=True, exist_ok=True)  # the folder, as before; a refused record itself never appears in it
    try:
        validate_record(record)
    except RecordValueError as error:
        raise type(error)(f"{error}; nothing was written") from None
    return atomic_write_json(runs / f"{record['record_id']}.json", record)


def read_json(path: Path) -> Any:
    """The JSON value in ``path``; ``ValueError`` naming the file when it cannot be read or parsed."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: unreadable record: {error}") from error


def load_record(path: Path) -> dict[str, Any]:
    """Read one record, upgraded to the current schema version in memory (``migrate``); raises ``ValueError``
    naming the file when it is corrupt or incomplete."""
    record = read_json(path)
    try:
        return migrate.as_current(record)
    except RecordValueError as error:
        kind = "incomplete" if isinstance(error, IncompleteRecordError) else "corrupt"
        raise ValueError(f"{path}: {kind} record, {error}") from error


# folders of a results tree that hold no records: the generated report; the shipped baselines and their manifest
NOT_RECORD_FOLDERS = ("report", "baselines")


def find_record_files(folder: str | Path) -> list[Path]:
    """Every ``*.json`` under ``folder``, recursively and sorted; skips hidden paths and the top-level
    :data:`NOT_RECORD_FOLDERS`. The one listing the report, the upgrade and the regeneration read."""
    root = Path(folder)
    if not root.is_dir():
        return []
    found = []
    for path in root.rglob("*.json"):
        rel = path.relative_to(root).parts
        if any(part.startswith(".") for part in rel) or rel[0] in NOT_RECORD_FOLDERS or not path.is_file():
            continue
        found.append(path)
    return sorted(found)
