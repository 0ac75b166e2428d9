"""Results records: schema checks, provenance, and atomic writes that leave nothing behind on failure."""
import json
import multiprocessing
import os

import pytest

from experiments import records


def minimal_record(record_id="r1"):
    return {"schema_version": 1, "record_id": record_id, "kind": "run", "method": "dense", "model": "m",
            "data": "digits", "seed": 0, "metrics": {"top1": 1.0}, "config": {}, "provenance": {}}


def test_write_and_load_round_trip(tmp_path):
    path = records.write_record(tmp_path, minimal_record())
    assert path == tmp_path / "runs" / "r1.json"
    assert records.load_record(path)["metrics"]["top1"] == 1.0
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["r1.json"]


def test_record_missing_keys_is_refused_and_nothing_written(tmp_path):
    record = minimal_record()
    del record["metrics"]
    with pytest.raises(ValueError, match="missing \\['metrics'\\]"):
        records.write_record(tmp_path, record)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space"):
        records.write_record(tmp_path, minimal_record())
    assert list((tmp_path / "runs").iterdir()) == []


def test_nan_metric_is_refused(tmp_path):
    record = minimal_record()
    record["metrics"]["top1"] = float("nan")
    with pytest.raises(ValueError):
        records.write_record(tmp_path, record)
    assert list((tmp_path / "runs").iterdir()) == []


def test_corrupt_record_names_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"record_id": ')
    with pytest.raises(ValueError, match="bad.json"):
        records.load_record(bad)


def _writer(args):
    folder, index = args
    for repeat in range(20):
        records.write_record(folder, minimal_record(f"w{index}"))
    return index


def test_concurrent_writers_never_expose_partial_records(tmp_path):
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        pool.map(_writer, [(tmp_path, i) for i in range(8)])
    names = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert names == sorted(f"w{i}.json" for i in range(8))
    for name in names:
        json.loads((tmp_path / "runs" / name).read_text())


def test_record_ids_are_unique():
    assert len({records.new_record_id("a", "b", 0) for _ in range(200)}) == 200


def test_provenance_has_commit_versions_and_device():
    prov = records.provenance(records.now_iso())
    assert {"git_commit", "packages", "device", "hostname", "start_time", "end_time"} <= set(prov)
    assert prov["packages"]["torch"] and prov["packages"]["timm"]


def test_token_maps_in_a_record_are_compact_and_lossless():
    """Eight 224 px eval images of a 14x14-patch model: depths exact, thumbnails 64 px, a few KB in all."""
    import numpy as np
    import torch

    from analysis import load
    from experiments.train import engine

    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 224), torch.linspace(-1, 1, 224), indexing="ij")
    grey = torch.stack([torch.exp(-((xx - 0.1 * i) ** 2 + yy ** 2) / 0.2) for i in range(8)])[:, None]
    images = grey.expand(8, 3, 224, 224).clone()  # digits are grey images replicated to 3 channels
    images[7, 0] = 0.0  # one colour image
    patch_depth = torch.randint(0, 13, (10, 196), generator=torch.Generator().manual_seed(0))
    result = engine.EvalResult(metrics={}, token_counts=torch.full((10, 12, 2), 197), patch_depth=patch_depth,
                               map_images=images)
    tokens = json.loads(json.dumps(engine.token_summary(result, 12, (14, 14), 8)))
    assert len(json.dumps(tokens["maps"])) < 20_000  # under 2.5 KB a map; the plain lists took 45 KB a map
    maps = load.depth_maps(tokens)
    assert [m["index"] for m in maps] == list(range(8))
    for i, entry in enumerate(maps):
        assert np.array_equal(entry["depth"], patch_depth[i].reshape(14, 14).numpy())
    assert [m["image"].shape for m in maps] == [(64, 64)] * 7 + [(64, 64, 3)]
    assert all(m["image"].min() == 0.0 and m["image"].max() == 1.0 for m in maps)  # min-max scaled per image
