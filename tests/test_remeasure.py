"""``experiments/remeasure.py``: protocol-1 records are re-timed once per fixed-count setting (seeds share the
entries), input-dependent ones are withdrawn with a reason, current records are left alone."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments import remeasure
from experiments.cost import throughput

RUNS = Path(__file__).resolve().parents[1] / "results" / "runs"


PROTOCOL_1_ENTRY = {"device": "cpu", "device_name": "cpu", "batch_size": 1, "dtype": "fp32", "threads": 1,
                    "img_per_s": 100.0, "dense_img_per_s": 90.0, "speedup_vs_dense": 1.1}


def aged(record):
    """``record`` as protocol 1 left it: entries without ``timing_protocol`` (batch 1 and 32, one thread)."""
    record["throughput"] = [dict(PROTOCOL_1_ENTRY), {**PROTOCOL_1_ENTRY, "batch_size": 32}]
    record.pop("throughput_withdrawn", None)
    return record


def pick(method: str, kind: str, count: int):
    """``count`` committed records of ``method`` and ``kind`` that share one setting (seeds)."""
    by_setting: dict = {}
    for path in sorted(RUNS.glob(f"*_{method}_*.json")):
        record = aged(json.loads(path.read_text()))
        if record["kind"] == kind:
            by_setting.setdefault(remeasure.setting_key(record), []).append(path)
    (paths,) = [paths for paths in by_setting.values() if len(paths) >= count][:1]
    return paths[:count]


@pytest.fixture
def runs(tmp_path):
    folder = tmp_path / "runs"
    folder.mkdir()
    chosen = pick("tome", "run", 3) + pick("adavit", "run", 1)
    for path in chosen:
        (folder / path.name).write_text(json.dumps(aged(json.loads(path.read_text()))))
    return folder, chosen


def test_fixed_counts_are_retimed_once_per_setting_and_adaptive_ones_withdrawn(runs, monkeypatch):
    folder, chosen = runs
    calls = []

    def fake_time(record, images=64):
        calls.append(record["record_id"])
        return [{"batch_size": 1, "timing_protocol": throughput.TIMING_PROTOCOL, "img_per_s": 1.0}]

    monkeypatch.setattr(remeasure, "time_setting", fake_time)
    assert remeasure.main([str(folder)]) == 0
    assert len(calls) == 1  # three seeds of one ToMe setting: timed once
    for path in chosen[:3]:
        record = json.loads((folder / path.name).read_text())
        (entry,) = record["throughput"]
        assert entry["timing_protocol"] == 2 and entry["remeasured"]["replaces_protocol"] == 1
        assert record["metrics"] == json.loads(path.read_text())["metrics"]  # nothing else changes
    adaptive = json.loads((folder / chosen[3].name).read_text())
    assert adaptive["throughput"] is None and "cannot be re-timed" in adaptive["throughput_withdrawn"]["reason"]
    assert adaptive["flops"] == json.loads(chosen[3].read_text())["flops"]
    assert not list(folder.glob("*.tmp*"))
    calls.clear()
    assert remeasure.main([str(folder)]) == 0 and calls == []  # current records are left alone


def test_a_setting_is_really_timed_with_the_current_protocol():
    (path,) = pick("topk", "run", 1)
    record = aged(json.loads(path.read_text()))
    entries = remeasure.time_setting(record, images=4)
    assert sorted(e["batch_size"] for e in entries) == sorted({e["batch_size"] for e in record["throughput"]})
    for entry in entries:
        assert entry["timing_protocol"] == 2 and entry["dense_reference"] == "timm"
        assert entry["timed_images"] == "val[0:4]"
        assert entry["flops_ratio"] == pytest.approx(record["flops"]["flops_ratio"], rel=1e-9)


def test_a_missing_folder_and_bad_flags_are_refused_naming_them(tmp_path, capsys):
    for argv, words in [([str(tmp_path / "no" / "such")], "runs="), ([str(tmp_path), "--images", "x"], "--images"),
                        ([str(tmp_path), "--images", "0"], "--images"), ([str(tmp_path), "--dryrun"], "--dryrun")]:
        with pytest.raises(SystemExit) as exit_:
            remeasure.main(argv)
        assert exit_.value.code == 2 and words in capsys.readouterr().err
    assert remeasure.main([str(tmp_path)]) == 2  # a folder without records is not "0 of 0"
    assert "holds no *.json records" in capsys.readouterr().err


@pytest.mark.parametrize("damage, words", [
    (lambda record: record["config"].pop("measure"), "its config cannot be re-run"),
    (lambda record: record.update(method="nope"), "method='nope' is not registered"),
    (lambda record: record["throughput"][1].update(threads=2), "one threads per record"),
])
def test_every_record_is_checked_before_the_first_file_is_rewritten(runs, monkeypatch, capsys, damage, words):
    folder, chosen = runs
    bad = json.loads((folder / chosen[0].name).read_text())
    damage(bad)
    bad_path = folder / "zz_last.json"  # sorted last: every other record would be rewritten before it
    bad_path.write_text(json.dumps(bad))
    before = {path: path.read_bytes() for path in folder.iterdir()}
    monkeypatch.setattr(remeasure, "time_setting", lambda record, images=64: pytest.fail("timed before checks"))
    assert remeasure.main([str(folder)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and str(bad_path) in error and words in error, error
    assert {path: path.read_bytes() for path in folder.iterdir()} == before  # nothing rewritten
