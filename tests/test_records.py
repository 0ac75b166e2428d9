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


def test_object_masks_and_tokens_in_the_maps_round_trip():
    """Data with ground truth: each map carries its image's object mask at the thumbnail's resolution (a pixel
    is object when at least half of what it covers is) and its object tokens, decoded exactly by the report."""
    import numpy as np
    import torch

    from analysis import load
    from experiments.train import engine

    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[0, 2:6, 2:6] = True  # a centred square
    masks[1, 0:2, 0:8] = True  # a band along the top
    masks[2, 0, 0] = True  # one pixel: a quarter of its 2x2 thumbnail pixel, not object there
    objects = torch.tensor([[False, False, False, False] * 4, [True] * 4 + [False] * 12, [False] * 16])
    objects[0, [5, 6, 9, 10]] = True
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    result = engine.EvalResult(metrics={}, token_counts=torch.full((3, 2, 2), 17),
                               patch_depth=torch.full((3, 16), 2), map_images=images)
    tokens = json.loads(json.dumps(engine.token_summary(result, 2, (4, 4), 3, objects=objects, masks=masks)))
    maps = load.depth_maps(tokens)
    assert [m["object_mask"].shape for m in maps] == [(8, 8)] * 3  # thumbnails keep sides up to 64 px
    for i, entry in enumerate(maps):
        assert np.array_equal(entry["object_mask"], masks[i].numpy())
        assert np.array_equal(entry["object_tokens"], objects[i].reshape(4, 4).numpy())
    # at a smaller thumbnail the mask is area-averaged and thresholded at one half
    from experiments.records import token_maps
    packed = token_maps.encode_maps(np.full((1, 16), 2), None, (4, 4), object_masks=np.array([[[1, 0], [0, 0]]]))
    assert np.array_equal(load.depth_maps({"maps": packed})[0]["object_mask"], [[True, False], [False, False]])
    big = torch.zeros(1, 128, 128, dtype=torch.bool)
    big[0, :3, :1] = True  # thumbnail pixel (0, 0) covers 2 of its 4 pixels in the mask, (1, 0) only 1
    result = engine.EvalResult(metrics={}, token_counts=torch.full((1, 2, 2), 17),
                               patch_depth=torch.full((1, 16), 2), map_images=torch.rand(1, 3, 128, 128))
    [entry] = load.depth_maps(engine.token_summary(result, 2, (4, 4), 1, masks=big))
    assert entry["object_mask"].shape == (64, 64) and entry["object_tokens"] is None
    assert np.flatnonzero(entry["object_mask"]).tolist() == [0]  # half is object, a quarter is not
    with pytest.raises(ValueError, match="0/1"):
        token_maps.pack_mask(np.array([0, 2]))


# ------------------------------------------------------------------------------ the package, schema, migration
def test_importing_records_needs_neither_torch_nor_hydra_nor_the_methods():
    import subprocess
    import sys
    from pathlib import Path

    script = ("import sys, experiments.records, experiments.records.token_maps; "
              "bad = [m for m in sys.modules if m.split('.')[0] in "
              "('torch', 'methods', 'timm', 'hydra', 'omegaconf')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1], check=True, timeout=120)


def test_any_numeric_metric_is_carried_and_a_non_finite_one_is_refused_naming_it(tmp_path):
    record = minimal_record()
    record["metrics"].update(ece=0.03, calibration_bins=15, mystery=None)
    path = records.write_record(tmp_path, record)
    assert records.load_record(path)["metrics"] == {"top1": 1.0, "ece": 0.03, "calibration_bins": 15, "mystery": None}
    for bad, message in ((float("inf"), r"metrics\.ece=inf is not finite; valid: a finite number$"),
                         ("0.03", r"metrics\.ece='0\.03' is not a number; valid: a finite number$"),
                         (True, r"metrics\.ece=True is not a number")):
        with pytest.raises(records.RecordValueError, match=message.replace("$", "; nothing was written")):
            records.write_record(tmp_path, dict(record, record_id="bad", metrics={"top1": 1.0, "ece": bad}))
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["r1.json"]


@pytest.mark.parametrize("changes, message", [
    ({"kind": "sweep"}, r"kind='sweep' is invalid: Input should be 'run', 'measure' or 'tradeoff'"),
    ({"metrics": {"top5": 90.0}}, r"a run without a numeric metrics\.top1"),
    ({"kind": "tradeoff", "tradeoff": {"value": 0.5}}, r"a tradeoff point without tradeoff\.knob"),
    ({"flops": {"gflops": 1.0, "gflops_std": -0.5}}, r"flops\.gflops_std=-0\.5 is outside the valid range >= 0"),
    ({"tokens": {"depth_histogram": [3, -1]}}, r"tokens\.depth_histogram\[1\]=-1 is outside the valid range >= 0"),
    ({"seed": [0]}, r"seed=\[0\] is not a number \(valid: an integer\)"),
    ({"method": ""}, r"method='' is invalid"),
    ({"schema_version": "1"}, r"schema_version='1' is invalid"),
])
def test_schema_refuses_bad_sections_naming_the_field_value_and_valid_range(tmp_path, changes, message):
    with pytest.raises(records.RecordValueError, match=message):
        records.write_record(tmp_path, {**minimal_record(), **changes})
    assert list((tmp_path / "runs").iterdir()) == []


def test_a_measure_record_may_have_null_accuracies():
    records.validate_record({**minimal_record(), "kind": "measure",
                             "metrics": {"top1": None, "top5": None, "val_loss": None, "num_images": 8}})


def test_required_keys_are_the_models_required_fields_and_an_incomplete_record_names_them(tmp_path):
    assert records.REQUIRED_KEYS == ("schema_version", "record_id", "kind", "method", "model", "data", "seed",
                                     "metrics", "config", "provenance")
    record = {k: v for k, v in minimal_record().items() if k not in ("seed", "data")}
    with pytest.raises(records.IncompleteRecordError, match="missing data, seed"):
        records.validate_record(record)


def test_upgrade_applies_each_migration_in_turn_and_leaves_the_callers_record_alone():
    from experiments.records import migrate

    steps = {1: lambda r: {**r, "metrics": {**r["metrics"], "top1_fraction": r["metrics"]["top1"] / 100}},
             2: lambda r: {**{k: v for k, v in r.items() if k != "model"}, "renamed": r["model"]}}
    old = minimal_record()
    new = migrate.upgrade(old, current=3, migrations=steps)
    assert new["schema_version"] == 3 and new["renamed"] == "m" and "model" not in new
    assert new["metrics"]["top1_fraction"] == pytest.approx(0.01, abs=1e-12)
    assert old == minimal_record(), "the record read from disk was changed"
    assert migrate.upgrade(old) is old  # already current: nothing to do
    with pytest.raises(records.RecordValueError, match=r"unsupported schema_version 1: no migration from it to 3"):
        migrate.upgrade(old, current=3, migrations={2: steps[2]})
    with pytest.raises(records.RecordValueError, match=r"unsupported schema_version 2 \(this code reads up to 1\)"):
        migrate.upgrade({**old, "schema_version": 2})
    with pytest.raises(records.RecordValueError, match=r"schema_version='1' is not an integer"):
        migrate.upgrade({**old, "schema_version": "1"})


def test_an_older_record_is_upgraded_on_load_by_both_readers_and_its_file_is_never_rewritten(tmp_path, monkeypatch):
    from analysis import load
    from experiments.records import migrate

    monkeypatch.setitem(migrate.MIGRATIONS, 0, lambda r: {**r, "method": r["method_name"]})
    old = {k: v for k, v in minimal_record().items() if k != "method"}
    path = tmp_path / "runs" / "old.json"
    path.parent.mkdir()
    path.write_text(json.dumps({**old, "schema_version": 0, "method_name": "dense"}))
    before = path.read_bytes()
    loaded = records.load_record(path)
    assert loaded["schema_version"] == records.SCHEMA_VERSION and loaded["method"] == "dense"
    frame = load.load_records(tmp_path)
    assert list(frame["method"]) == ["dense"] and list(frame["top1"]) == [1.0]
    assert path.read_bytes() == before


def test_paths_inside_the_repository_are_recorded_relative_to_it(tmp_path):
    """Committed records read the same on every clone: no absolute machine path for a file of the repository."""
    from experiments.records.build import REPOSITORY, repository_relative

    run_dir = REPOSITORY / "outputs" / "2026-12-07" / "run"
    value = {"paths": {"run_dir": str(run_dir), "results_dir": "results", "root": str(tmp_path)},
             "init": f"checkpoint:{REPOSITORY}/outputs/x/final.pth", "list": [str(REPOSITORY / ".cache" / "b.pth")],
             "seed": 3, "note": "a:b"}
    assert repository_relative(value) == {
        "paths": {"run_dir": "outputs/2026-12-07/run", "results_dir": "results", "root": str(tmp_path)},
        "init": "checkpoint:outputs/x/final.pth", "list": [".cache/b.pth"], "seed": 3, "note": "a:b"}
