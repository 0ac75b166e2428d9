"""The regeneration command (experiments/regenerate.py): stages expand from the registry, a job whose records
exist with the same identity is skipped, and a second run recomputes nothing."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import methods
from experiments import regenerate, regeneration_jobs
from experiments.train import checkpoints


def test_the_committed_stages_expand_from_the_registry():
    spec = regeneration_jobs.load_spec()
    jobs = regeneration_jobs.expand(spec, ["scenes_headline", "scenes_default"])
    per_method = {}
    for job in jobs:
        name = next(o.split("=", 1)[1] for o in job.overrides if o.startswith("method="))
        per_method.setdefault(name, []).append(job)
    assert sorted(per_method) == methods.list_methods()  # every registered method, no list to keep
    for name, method_jobs in per_method.items():
        assert len(method_jobs) == (5 if name in spec["headline_methods"] else 3)
    tome = per_method["tome"][0].overrides
    assert "method.params.r=4" in tome  # the embedded backbone's registered setting (65 tokens), not r=13
    curves = regeneration_jobs.expand(spec, ["scenes_curves"])
    assert {next(o for o in j.overrides if o.startswith("method=")) for j in curves} == \
        {f"method={name}" for name in methods.methods_with_knob()}
    ablations = regeneration_jobs.expand(spec, ["adavit_ablations"])
    assert all("method=adavit" in job.overrides for job in ablations)
    assert len(ablations) == 3 * (2 + 4 + 5 + 5)  # halting 2, target depth 4, ponder 5, prior 5 values


def test_a_job_that_would_be_refused_stops_the_command_before_anything_runs(tmp_path, capsys):
    spec = {"seeds": {"headline": [0], "other": [0]}, "headline_methods": [],
            "stages": {"bad": {"entry": "run", "methods": ["topk"], "seeds": [0],
                               "overrides": ["model=deit_digits", "+model.depth=2"]}}}
    (tmp_path / "stages.yaml").write_text(yaml.safe_dump(spec))
    assert regenerate.main(["--spec", str(tmp_path / "stages.yaml"), "--results", str(tmp_path / "r")]) == 2
    assert "bad/0000 (python -m experiments.run method=topk" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_bad_stage_and_shard_are_refused_in_one_line(capsys):
    assert regenerate.main(["--stage", "nope", "--dry-run"]) == 2
    assert "--stage 'nope' unknown; valid: scenes_headline" in capsys.readouterr().err
    assert regenerate.main(["--shard", "2/2", "--dry-run"]) == 2
    assert "valid: I/N with 0 <= I < N" in capsys.readouterr().err
    assert regenerate.main(["--extra", "train.epochs=1", "--dry-run"]) == 2
    assert "--extra 'train.epochs=1': only keys that cannot change a result" in capsys.readouterr().err


def test_a_calibrate_stage_evaluates_with_run_py_or_measure_py_and_nothing_else(tmp_path):
    stage = {"entry": "calibrate", "methods": ["tome"], "seeds": [0], "overrides": ["model=deit_small"]}
    spec = {"seeds": {"headline": [0], "other": [0]}, "headline_methods": [], "stages": {"cost": stage}}
    for evaluate, module in ((None, "experiments.run"), ("measure", "experiments.measure")):
        spec["stages"]["cost"] = {**stage, **({"evaluate": evaluate} if evaluate else {})}
        (tmp_path / "stages.yaml").write_text(yaml.safe_dump(spec))
        [job] = regeneration_jobs.expand(regeneration_jobs.load_spec(tmp_path / "stages.yaml"))
        calibrate, evaluation = job.commands(tmp_path / "r", tmp_path / "logs")
        assert calibrate[2] == "experiments.calibrate" and evaluation[2] == module
        assert job.evaluates == module.split(".")[1]
        assert "method.params.threshold=calibrated" in evaluation
    for stage_evaluate in ({**stage, "evaluate": "tradeoff"}, {**stage, "entry": "run", "evaluate": "measure"}):
        (tmp_path / "stages.yaml").write_text(yaml.safe_dump({**spec, "stages": {"cost": stage_evaluate}}))
        with pytest.raises(ValueError, match=r"stages\.cost\.evaluate=.*valid: run, measure, and only with entry: "
                                             r"calibrate"):
            regeneration_jobs.load_spec(tmp_path / "stages.yaml")


@pytest.mark.slow
def test_a_tiny_regeneration_end_to_end_then_again_recomputes_nothing(tmp_path, monkeypatch):
    tiny = ["model=deit_digits", "+model.embed_dim=16", "data.img_size=16", "baseline.epochs=1", "train.epochs=1",
            "measure.throughput=false", "eval.map_images=0", f"paths.cache_dir={tmp_path / 'cache'}",
            f"paths.state_dir={tmp_path / 'state'}", "num_workers=0"]
    spec = {"seeds": {"headline": [0, 1], "other": [0]}, "headline_methods": ["dense"],
            "stages": {"runs": {"entry": "run", "methods": ["dense", "topk"], "seeds": [0, 1], "overrides": tiny},
                       "curve": {"entry": "tradeoff", "methods": ["topk"], "seeds": [0],
                                 "overrides": [*tiny, "experiment.train=true", "method.tradeoff_values=[0.5,0.8]"]},
                       "dtome": {"entry": "calibrate", "methods": ["tome"], "seeds": [0],
                                 "overrides": [*tiny, "method.params.r=2", "calibration.images=64"]}}}
    spec_file = tmp_path / "stages.yaml"
    spec_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    monkeypatch.chdir(tmp_path)  # the job logs go to ./outputs/regenerate
    results = tmp_path / "results"
    args = ["--spec", str(spec_file), "--results", str(results)]

    assert regenerate.main(args) == 0
    written = sorted(results.rglob("*.json"))
    kinds = [json.loads(p.read_text())["kind"] for p in written]
    assert kinds.count("run") == 5 and kinds.count("tradeoff") == 2
    assert (tmp_path / "outputs" / "regenerate" / "runs" / "0000.log").exists()
    times = [json.loads(line) for line in (tmp_path / "outputs" / "regenerate" / "times.jsonl").read_text()
             .splitlines()]
    assert times[-1]["ran"] == 6 and set(times[-1]["stages_s"]) == {"runs", "curve", "dtome"}
    dtome = [json.loads(p.read_text()) for p in written if json.loads(p.read_text())["method"] == "tome"]
    assert [(r["method_params"]["threshold"], r["method_params"]["r"]) for r in dtome] == [("calibrated", 2)]
    assert set(dtome[0]["method_info"]["calibration_r"]) == {2}
    calibrated = tmp_path / "outputs" / "regenerate" / "dtome" / "0000" / "calibrated.pth"
    assert dtome[0]["identity"]["start_weights_sha256"] == checkpoints.file_sha256(calibrated)

    assert regenerate.main(args) == 0
    assert sorted(results.rglob("*.json")) == written  # nothing recomputed
    again = json.loads((tmp_path / "outputs" / "regenerate" / "times.jsonl").read_text().splitlines()[-1])
    assert again["ran"] == 0 and again["skipped"] == 6

    calibrated.unlink()  # calibrated again to the same bytes: the evaluation is not run twice
    assert regenerate.main([*args, "--stage", "dtome"]) == 0
    assert sorted(results.rglob("*.json")) == written and calibrated.exists()
    recal = json.loads((tmp_path / "outputs" / "regenerate" / "times.jsonl").read_text().splitlines()[-1])
    assert recal["ran"] == 0 and recal["skipped"] == 1

    # the same curve's points fine-tuned at another knob value are other results: they run
    spec["stages"]["curve"]["overrides"].append("method.params.keep_rate=0.6")
    spec_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert regenerate.main(args) == 0
    third = json.loads((tmp_path / "outputs" / "regenerate" / "times.jsonl").read_text().splitlines()[-1])
    assert third["ran"] == 1 and third["skipped"] == 5
    trained_at = {json.loads(p.read_text())["config"]["method"].get("fine_tuned_at", {}).get("keep_rate")
                  for p in results.rglob("*.json") if json.loads(p.read_text())["kind"] == "tradeoff"}
    assert trained_at == {0.6, 0.7}  # topk's default, then the override
