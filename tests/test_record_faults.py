"""Results folders and records that are not what they seem (issue 18): output folders that are dangling or looping
symlinks are refused at startup; temp files of record writers that died mid-write are cleaned up by the next write
(never a live writer's); out-of-range metrics and costs are never written, and on disk they, unhashable seeds,
duplicate record ids and non-numeric token statistics are skipped with a warning naming the file, while the rest
loads and aggregates."""
import json
import math
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from analysis import aggregation, load
from analysis.load import RecordWarning
from experiments import records
from experiments.records import store
from experiments.config import ConfigError
from test_schema import assert_refused_at_startup, no_data  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
HOST = store._host_tag()


# ------------------------------------------------------------------------------ output folders at startup
@pytest.mark.parametrize("key,folder,overrides", [
    ("paths.results_dir", "results", []),
    ("paths.state_dir", "state", ["experiment.train=true"]),  # a run that trains keeps resume state there
    ("paths.cache_dir", "cache", []),  # the digits baseline is trained once and cached there
])
def test_dangling_symlink_output_folder_is_refused_at_startup(tmp_path, no_data, key, folder, overrides):
    target = tmp_path / "deleted-scratch"
    (tmp_path / folder).symlink_to(target)  # the folder the config names is a link to nothing
    assert_refused_at_startup(tmp_path, overrides, ConfigError,
                              rf"{key}=.*{folder} is not writable: .*symlink to {target}, which does not exist")


def test_symlink_loop_results_folder_is_refused_at_startup(tmp_path, no_data):
    (tmp_path / "results").symlink_to(tmp_path / "results")  # ELOOP: exists() says no, mkdir fails later
    assert_refused_at_startup(tmp_path, [], ConfigError, r"paths\.results_dir=.*results is not writable: .*symlink")


# ------------------------------------------------------------------------------ temp files of dead writers
def minimal_record(record_id="r1", **changes):
    record = {"schema_version": 1, "record_id": record_id, "kind": "run", "method": "dense", "model": "m",
              "data": "digits", "seed": 0, "metrics": {"top1": 50.0}, "config": {}, "provenance": {}}
    record.update(changes)
    return record


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid  # reaped: no process has this pid (until it is reused, which a test run will not see)


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_temp_file_of_a_dead_writer_on_this_host_is_removed_by_the_next_write(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    stale = runs / f".old.json.w{dead_pid()}@{HOST}.abcd1234.tmp"
    stale.write_text('{"record_id": "old", "half')
    live = runs / f".busy.json.w{os.getppid()}@{HOST}.efgh5678.tmp"  # the parent of pytest: alive
    live.write_text('{"record_id": "busy", "half')
    age(live, 10 * 24 * 3600)  # a live writer's file is never removed, however old
    records.write_record(tmp_path, minimal_record())
    assert not stale.exists(), "the dead writer's temp file survived the next write"
    assert live.exists(), "a live writer's temp file was removed"
    assert sorted(p.name for p in runs.iterdir()) == sorted([live.name, "r1.json"])


def test_temp_files_of_other_hosts_and_old_names_are_removed_only_when_old(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    other_old = runs / ".a.json.w123@another-node.01.cluster.abcd1234.tmp"
    other_new = runs / ".b.json.w123@another-node.01.cluster.efgh5678.tmp"
    legacy_old = runs / ".c.json.ijkl9012.tmp"  # the name mkstemp gave before temp names carried pid and host
    legacy_new = runs / ".d.json.mnop3456.tmp"
    unrelated = runs / ".notes.tmp"  # not a record temp file: not ours to remove
    for path in (other_old, other_new, legacy_old, legacy_new, unrelated):
        path.write_text("{")
    for path in (other_old, legacy_old, unrelated):
        age(path, 3 * 24 * 3600)
    records.write_record(tmp_path, minimal_record())
    left = {p.name for p in runs.iterdir()}
    assert left == {other_new.name, legacy_new.name, unrelated.name, "r1.json"}


KILLED_WRITER = """
import os, sys
sys.path.insert(0, sys.argv[2])
from experiments import records
def killed(fd):
    os._exit(9)  # SIGKILL-like: no except, no finally, the temp file stays
os.fsync = killed
records.write_record(sys.argv[1], {"schema_version": 1, "record_id": "killed", "kind": "run", "method": "dense",
                                   "model": "m", "data": "digits", "seed": 0, "metrics": {"top1": 1.0},
                                   "config": {}, "provenance": {}})
"""


def test_writer_killed_mid_write_leaves_a_temp_file_the_next_write_removes(tmp_path):
    done = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(tmp_path), str(ROOT)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 9, done.stderr
    runs = tmp_path / "runs"
    left = [p.name for p in runs.iterdir()]
    assert len(left) == 1 and left[0].startswith(".killed.json.") and left[0].endswith(".tmp"), left
    records.write_record(tmp_path, minimal_record("next"))
    assert [p.name for p in runs.iterdir()] == ["next.json"], "the killed writer's temp file survived"


# ------------------------------------------------------------------------------ values refused at build time
def build(metrics=None, flops=None):
    config = {"model": {"name": "vit_tiny_patch16_224", "short_name": "deit_t"}, "data": {"name": "digits"},
              "seed": 0}
    return records.build_record("run", config, "dense", {}, metrics or {"top1": 50.0, "top5": 90.0},
                                {}, {"flops": flops, "throughput": None}, {}, records.now_iso(), None, 10)


@pytest.mark.parametrize("field,value", [("top1", math.inf), ("top1", 150.0), ("top1", -5.0),
                                         ("top5", math.nan), ("top1", "95")])
def test_out_of_range_metric_is_refused_at_build_time(field, value):
    with pytest.raises(ValueError, match=rf"metrics\.{field}={value!r}.*valid"):
        build(metrics={"top1": 50.0, "top5": 90.0, field: value})


@pytest.mark.parametrize("field,value", [("gflops", 0.0), ("gflops", -1.5), ("gflops", math.inf),
                                         ("gflops", math.nan), ("dense_gflops", 0.0), ("flops_ratio", -0.1)])
def test_out_of_range_gflops_is_refused_at_build_time(field, value):
    flops = {"gflops": 1.0, "dense_gflops": 1.2, "flops_ratio": 1.0 / 1.2, field: value}
    with pytest.raises(ValueError, match=rf"flops\.{field}={value!r}.*valid"):
        build(flops=flops)


def test_valid_values_build_and_a_hand_built_bad_record_is_never_written(tmp_path):
    record = build(flops={"gflops": 1.0, "dense_gflops": 1.2, "flops_ratio": 0.8, "gflops_std": 0.0})
    assert record["metrics"]["top1"] == 50.0
    with pytest.raises(ValueError, match=r"metrics\.top1=150"):
        records.write_record(tmp_path, minimal_record(metrics={"top1": 150}))
    with pytest.raises(ValueError, match=r"flops\.gflops=0"):
        records.write_record(tmp_path, minimal_record(flops={"gflops": 0}))
    assert not any((tmp_path / "runs").iterdir()), "a refused record was written"


# ------------------------------------------------------------------------------ bad records on disk
def write_raw(folder: Path, name: str, record: dict) -> Path:
    path = folder / "runs" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))  # json.dumps writes inf/nan as Infinity/NaN, as a foreign writer might
    return path


def good(record_id: str, seed: int) -> dict:
    return minimal_record(record_id, seed=seed, metrics={"top1": 60.0 + seed},
                          flops={"gflops": 1.0, "dense_gflops": 1.2},
                          tokens={"attn_mean": [197.0, 100.0], "mlp_mean": [197.0, 100.0]},
                          provenance={"end_time": f"2026-01-0{seed + 1}T00:00:00+00:00"})


def load_with_warnings(folder: Path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frame = load.load_records(folder)
    return frame, [str(w.message) for w in caught if issubclass(w.category, RecordWarning)]


BAD_ON_DISK = [
    pytest.param({"metrics": {"top1": math.inf}}, r"metrics\.top1=inf", id="top1-inf"),
    pytest.param({"metrics": {"top1": 150.0}}, r"metrics\.top1=150", id="top1-150"),
    pytest.param({"metrics": {"top1": -5.0}}, r"metrics\.top1=-5", id="top1-negative"),
    pytest.param({"flops": {"gflops": 0.0, "dense_gflops": 1.2}}, r"flops\.gflops=0", id="gflops-zero"),
    pytest.param({"flops": {"gflops": math.nan, "dense_gflops": 1.2}}, r"flops\.gflops=nan", id="gflops-nan"),
    pytest.param({"flops": {"gflops": 1.0, "dense_gflops": -1.2}}, r"flops\.dense_gflops=-1\.2",
                 id="dense-gflops-negative"),
    pytest.param({"seed": [0, 1]}, r"seed=\[0, 1\]", id="unhashable-seed"),
    pytest.param({"seed": {"value": 0}}, r"seed=", id="dict-seed"),
    pytest.param({"tokens": {"attn_mean": ["a"]}}, r"tokens\.attn_mean\[0\]='a'", id="attn-mean-text"),
    pytest.param({"tokens": {"mlp_mean": "197"}}, r"tokens\.mlp_mean", id="mlp-mean-not-a-list"),
    pytest.param({"tokens": {"depth_histogram": [3, None, math.inf]}}, r"tokens\.depth_histogram\[2\]",
                 id="depth-histogram-inf"),
]


@pytest.mark.parametrize("changes,field", BAD_ON_DISK)
def test_bad_record_on_disk_is_skipped_with_a_warning_and_the_rest_aggregates(tmp_path, changes, field):
    write_raw(tmp_path, "a.json", good("a", 0))
    write_raw(tmp_path, "b.json", good("b", 1))
    bad = {**good("bad", 2), **changes}
    write_raw(tmp_path, "bad.json", bad)
    frame, messages = load_with_warnings(tmp_path)
    assert sorted(frame["record_id"]) == ["a", "b"]
    assert any("bad.json" in m and re.search(field, m) for m in messages), messages
    agg = aggregation.aggregate(aggregation.without_tradeoff(frame))  # what the report computes first
    assert len(agg) == 1


def test_duplicate_record_id_across_two_files_is_skipped_with_a_warning(tmp_path):
    write_raw(tmp_path, "a.json", good("same", 0))
    copy = write_raw(tmp_path, "z_copy.json", good("same", 1))  # another run (seed 1) claiming the same id
    write_raw(tmp_path, "b.json", good("b", 2))
    frame, messages = load_with_warnings(tmp_path)
    assert sorted(frame["record_id"]) == ["b", "same"]
    assert frame.loc[frame["record_id"] == "same", "seed"].tolist() == [0]  # the file sorted first is kept
    assert any(str(copy) in m and "duplicate record_id 'same'" in m and "a.json" in m for m in messages), messages
    aggregation.aggregate(aggregation.without_tradeoff(frame))
