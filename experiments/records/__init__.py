"""Results records: schema, provenance and atomic writes.

One JSON file per run (``<results_dir>/runs/<record_id>.json``). Writes go to a temp file in the same folder,
are fsynced, then renamed, so a reader never sees a partial record and a failed write leaves nothing behind.
A writer killed mid-write (SIGKILL, node lost) cannot clean up: its temp file is named
``.<file>.w<pid>@<host>.<random>.tmp`` and the next write into that folder removes it once that pid is gone on
this host, or, for another host's (or an older unnamed) temp file, once it is older than ``STALE_TEMP_AGE_S``.
A live writer's temp file is never touched.

Metrics and costs are checked when a record is built (:func:`check_values`): a top-1 of inf, 150 or -5, or a
zero, negative or non-finite GFLOPs count is refused, naming the field and the value, and never written.

Schema (``schema_version`` 1); ``analysis/`` reads these keys:

- ``record_id``, ``kind`` (``run``, ``measure`` or ``tradeoff``), ``status`` (``complete``);
- ``method``, ``method_params`` (the factory's defaults applied), ``method_info`` (facts the built method reports,
  e.g. A-ViT's ``prior_target``), ``model`` (config name), ``architecture`` (timm name), ``data``, ``seed``;
- ``config``: the full resolved Hydra config;
- ``metrics``: ``top1``, ``top5`` (percent), ``val_loss``, ``num_images``;
- ``params``: parameter count of the method's model;
- ``tokens``: ``attn_mean`` and ``mlp_mean`` (per block, mean over images), ``depth_histogram`` (patch tokens
  by the number of blocks that saw them, 0..depth), ``mean_patch_depth`` (per patch, over the eval set, with
  ``grid``), ``maps`` (per-patch depth and a thumbnail for a few eval images, packed as in
  ``experiments/records/token_maps.py``; trade-off points have none);
- ``flops``: ``gflops`` (mean per image; 1 multiply-add = 1 FLOP), ``gflops_std/min/max``, ``dense_gflops``,
  ``flops_ratio``, ``convention``; ``null`` until measured;
- ``throughput``: list of ``{device, batch_size, dtype, img_per_s, dense_img_per_s, speedup_vs_dense,
  efficiency, peak_mem_mb, ...}``; ``null`` until measured. Since ``timing_protocol`` 2 (``experiments/
  throughput.py``) each entry names its ``timed_images`` (e.g. ``val[0:64]``) and carries their ``flops_ratio``
  and ``timed_gflops`` (what ``efficiency`` divides by), ``dense_reference`` (``timm``) and the harness check
  ``dense_wrapper_vs_timm``; entries re-timed by ``experiments/remeasure.py`` say so in ``remeasured``, and a
  record whose protocol-1 timing could not be redone has ``throughput: null`` and ``throughput_withdrawn``;
- ``train``: ``epochs``, ``wall_time_s``, ``history`` (per-epoch metrics), ``init`` (where weights came from);
- ``data_read`` (``run`` and ``tradeoff``; absent in older records): what the run read, as the startup check
  counted it: ``classes``, ``train_images``, ``val_images`` and, for image folders, classes per split and folders;
- ``provenance``: ``git_commit``, ``git_dirty``, ``packages``, ``device``, ``hostname``, ``start_time``,
  ``end_time``, ``run_dir``.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import platform
import re
import socket
import subprocess
import tempfile
import time
import uuid
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
REQUIRED_KEYS = ("schema_version", "record_id", "kind", "method", "model", "data", "seed", "metrics", "config",
                 "provenance")
FLOP_CONVENTION = ("1 FLOP = 1 multiply-add (fvcore/field convention, i.e. GMACs); LayerNorm, softmax, GELU, "
                   "gather and top-k not counted")
_PACKAGES = ("torch", "timm", "fvcore", "hydra-core", "submitit", "numpy", "pandas", "scikit-learn")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_record_id(method: str, model: str, seed: int) -> str:
    """Unique across concurrent array jobs: time, names, seed and a random suffix."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"{stamp}_{method}_{model}_s{seed}_{uuid.uuid4().hex[:8]}"


def git_state(repo: Path | None = None) -> dict[str, Any]:
    repo = repo or Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"git_commit": commit, "git_dirty": dirty}


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["python"] = platform.python_version()
    return versions


def device_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def provenance(start_time: str, run_dir: str | None = None) -> dict[str, Any]:
    return {**git_state(), "packages": package_versions(), "device": device_info(),
            "hostname": socket.gethostname(), "start_time": start_time, "end_time": now_iso(), "run_dir": run_dir}


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


class RecordValueError(ValueError):
    """A metric or cost of a record is out of its valid range; the message names the field, the value and the range."""


# field -> (lowest, highest, lowest allowed itself); every value must also be a finite number (or null: not measured)
METRIC_RANGES = {"top1": (0.0, 100.0, True), "top5": (0.0, 100.0, True), "val_loss": (0.0, math.inf, True),
                 "num_images": (0.0, math.inf, True)}
FLOPS_RANGES = {"gflops": (0.0, math.inf, False), "dense_gflops": (0.0, math.inf, False),
                "gflops_min": (0.0, math.inf, False), "gflops_max": (0.0, math.inf, False),
                "gflops_std": (0.0, math.inf, True), "flops_ratio": (0.0, math.inf, False)}


def _check_range(field: str, value: Any, low: float, high: float, closed_low: bool) -> None:
    if value is None:
        return
    valid = f"{'[' if closed_low else '('}{low:g}, {high:g}]" if math.isfinite(high) else \
        f"{'>=' if closed_low else '>'} {low:g}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RecordValueError(f"{field}={value!r} is not a number; valid: a finite number {valid}")
    if not (math.isfinite(value) and (value >= low if closed_low else value > low) and value <= high):
        raise RecordValueError(f"{field}={value!r} is outside the valid range {valid}; nothing was written")


def check_values(record: dict[str, Any]) -> None:
    """Refuse out-of-range metrics and costs (``metrics.top1`` of inf, 150 or -5; zero, negative or non-finite
    ``flops.gflops``) with a :class:`RecordValueError` naming the field and the value."""
    metrics = record.get("metrics")
    if not isinstance(metrics, dict):
        raise RecordValueError(f"metrics={metrics!r} is not an object of metric values")
    for field, (low, high, closed) in METRIC_RANGES.items():
        _check_range(f"metrics.{field}", metrics.get(field), low, high, closed)
    flops = record.get("flops")
    if flops is not None:
        if not isinstance(flops, dict):
            raise RecordValueError(f"flops={flops!r} is not an object of FLOP counts (or null: not measured)")
        for field, (low, high, closed) in FLOPS_RANGES.items():
            _check_range(f"flops.{field}", flops.get(field), low, high, closed)


def write_record(results_dir: Path, record: dict[str, Any]) -> Path:
    """Validate the required keys and the values (:func:`check_values`) and write ``record`` to
    ``results_dir/runs/<record_id>.json``."""
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise ValueError(f"results record is missing {missing}")
    runs = Path(results_dir) / "runs"
    runs.mkdir(parents=True, exist_ok=True)  # the folder, as before; a refused record itself never appears in it
    check_values(record)
    return atomic_write_json(runs / f"{record['record_id']}.json", record)


def load_record(path: Path) -> dict[str, Any]:
    """Read one record; raises ``ValueError`` naming the file when it is corrupt or incomplete."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: unreadable record: {error}") from error
    missing = [k for k in REQUIRED_KEYS if k not in record] if isinstance(record, dict) else list(REQUIRED_KEYS)
    if missing:
        raise ValueError(f"{path}: incomplete record, missing {missing}")
    return record


def build_record(kind: str, config: dict[str, Any], method: str, method_params: dict[str, Any],
                 metrics: dict[str, Any], tokens: dict[str, Any], costs: dict[str, Any], train: dict[str, Any],
                 start_time: str, run_dir: str | None, params: int, method_info: dict[str, Any] | None = None,
                 **extra: Any) -> dict[str, Any]:
    """The one record builder of ``run``, ``measure`` and ``tradeoff`` records. ``config`` is the resolved config;
    ``method_params`` have the factory's defaults applied (a record written before a parameter existed stays
    comparable); ``extra`` adds top-level entries (``tradeoff``, ``subset_metrics``)."""
    check_values({"metrics": metrics, "flops": costs.get("flops")})  # before anything else: never written
    model = config["model"]
    short = str(model.get("short_name") or model["name"])
    return {
        "schema_version": SCHEMA_VERSION,
        "record_id": new_record_id(method, short, config["seed"]),
        "kind": kind,
        "status": "complete",
        "method": method,
        "method_params": method_params,
        "method_info": method_info or {},
        "model": short,
        "architecture": model["name"],
        "data": config["data"]["name"],
        "seed": config["seed"],
        "metrics": metrics,
        "params": params,
        "tokens": tokens,
        "flops": costs.get("flops"),
        "throughput": costs.get("throughput"),
        "train": train,
        "config": config,
        "provenance": provenance(start_time, run_dir),
        **extra,
    }
