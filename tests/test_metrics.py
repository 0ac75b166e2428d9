"""Metrics as data: the registered metric functions, checked by hand, and a new metric reaching a record and the
report's DataFrame with no edit outside its own registration."""
import math

import pytest
import torch
from annotated_types import Interval
from torch.utils.data import DataLoader, TensorDataset

import methods
from analysis import load
from experiments import records
from experiments.train import engine, metrics
from methods.models import create_backbone


def outputs(correct1, correct5, loss):
    return {"correct1": torch.tensor(correct1), "correct5": torch.tensor(correct5),
            "loss": torch.tensor(loss, dtype=torch.float32)}


def test_registered_metrics_by_hand():
    got = metrics.compute_metrics(outputs([True, False, False, True], [True, True, False, True],
                                          [0.5, 1.5, 2.0, 0.0]))
    assert list(got) == ["top1", "top5", "val_loss", "num_images"]
    assert got["top1"] == pytest.approx(50.0, abs=1e-12) and got["top5"] == pytest.approx(75.0, abs=1e-12)
    assert got["val_loss"] == pytest.approx(1.0, abs=1e-12) and got["num_images"] == 4
    assert isinstance(got["num_images"], int)


def test_a_second_metric_of_one_name_is_refused():
    with pytest.raises(ValueError, match=r"metric 'top1' is already registered \(by top1\)"):
        metrics.register_metric("top1", Interval(ge=0.0, le=100.0))(lambda out: 0.0)


@pytest.fixture
def error_rate():
    """A throwaway metric, registered only for the test."""
    @metrics.register_metric("error_rate", Interval(ge=0.0, le=100.0))
    def error_rate(out):
        return 100.0 - 100.0 * int(out["correct1"].sum().item()) / len(out["correct1"])

    yield error_rate
    metrics.unregister_metric("error_rate")


def tiny_eval():
    torch.manual_seed(0)
    model = methods.create_method("dense", create_backbone("deit_digits_patch4_32", num_classes=10, depth=1))
    images, labels = torch.rand(12, 3, 32, 32), torch.arange(12) % 10
    return engine.evaluate(model, DataLoader(TensorDataset(images, labels), batch_size=5), torch.device("cpu"),
                           progress=False)


def test_a_new_metric_is_one_function_and_reaches_the_record_and_the_frame(tmp_path, error_rate):
    result = tiny_eval()
    assert result.metrics["error_rate"] == pytest.approx(100.0 - result.metrics["top1"], abs=1e-9)
    config = {"model": {"name": "deit_digits_patch4_32"}, "data": {"name": "digits"}, "seed": 0}
    record = records.build_record("run", config, "dense", {}, result.metrics, {}, {"flops": None}, {},
                                  records.now_iso(), None, 1)
    records.write_record(tmp_path, record)
    frame = load.load_records(tmp_path)
    assert frame.loc[0, "error_rate"] == pytest.approx(result.metrics["error_rate"], abs=1e-9)
    assert frame.loc[0, "top1"] == pytest.approx(result.metrics["top1"], abs=1e-9)
    # its registered range is checked like top-1's
    with pytest.raises(records.RecordValueError, match=r"metrics\.error_rate=120\.0 is outside the valid range"):
        records.check_values({"metrics": {**result.metrics, "error_rate": 120.0}})


def test_the_frame_carries_every_numeric_metric_of_the_records_without_naming_it(tmp_path):
    base = {"schema_version": 1, "kind": "run", "method": "dense", "model": "m", "data": "digits",
            "config": {}, "provenance": {}}
    records.write_record(tmp_path, {**base, "record_id": "a", "seed": 0, "metrics": {"top1": 60.0, "ece": 0.1}})
    records.write_record(tmp_path, {**base, "record_id": "b", "seed": 1, "metrics": {"top1": 70.0}})
    frame = load.load_records(tmp_path).set_index("record_id")
    assert frame.loc["a", "ece"] == pytest.approx(0.1, abs=1e-12) and math.isnan(frame.loc["b", "ece"])
    assert math.isnan(frame.loc["a", "top5"])  # a registered metric the records lack is still a column
