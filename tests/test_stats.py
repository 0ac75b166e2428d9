"""``analysis.stats`` and ``analysis.controls``: confidence intervals and the paired Δ by hand on fabricated
seeds, the "tied for best" rule, and which control each setting's Δ top-1 is paired with (fabricated records)."""
from __future__ import annotations

import math

import pytest

from analysis import aggregation, load, stats, tables
from test_curves import point_record, write

T2 = 4.302653  # t_{0.975, 2}: three seeds, two degrees of freedom
RECIPE = {"epochs": 4, "lr": 0.0005, "batch_size": 64}


def test_t_quantiles_are_the_tabulated_ones():
    assert stats.t_quantile(2) == pytest.approx(T2, abs=1e-6)
    assert stats.t_quantile(1) == pytest.approx(12.706205, abs=1e-6)
    assert stats.t_quantile(30) == pytest.approx(2.042272, abs=1e-6)
    assert math.isnan(stats.t_quantile(0))


def test_mean_ci_by_hand():
    # 97, 97.5, 98: mean 97.5, s = 0.5, half-width 4.302653 x 0.5 / sqrt(3) = 1.242069
    mean, half, n = stats.mean_ci([97.0, 97.5, 98.0, math.nan])  # NaN values do not count
    assert (mean, n) == (pytest.approx(97.5), 3) and half == pytest.approx(T2 * 0.5 / math.sqrt(3), rel=1e-6)
    assert half == pytest.approx(1.242069, abs=1e-6)
    one = stats.mean_ci([95.0])
    assert one[0] == 95.0 and math.isnan(one[1]) and one[2] == 1  # one seed: no interval
    none = stats.mean_ci([])
    assert math.isnan(none[0]) and math.isnan(none[1]) and none[2] == 0


def test_paired_difference_by_hand_on_three_seeds():
    a = {0: 76.0, 1: 78.5, 2: 80.0, 3: 99.0}  # seed 3 has no partner: left out
    b = {0: 75.0, 1: 76.0, 2: 79.5}
    # differences 1.0, 2.5, 0.5: mean 4 / 3 = 1.333333; deviations -1/3, 7/6, -5/6, squares 1/9 + 49/36 + 25/36 =
    # 13/6, s = sqrt(13/12) = 1.040833; half-width = t_{0.975,2} s / sqrt(3) = 4.302653 x 1.040833 / 1.732051
    # = 2.585573
    mean, half, n = stats.paired_difference(a, b)
    assert n == 3 and mean == pytest.approx(4 / 3, rel=1e-12)
    assert half == pytest.approx(T2 * math.sqrt(13 / 12) / math.sqrt(3), rel=1e-6)
    assert half == pytest.approx(2.585573, abs=1e-5)
    # the unpaired interval of the difference of means would be far wider: pairing removes the seed's share
    assert stats.mean_ci(a.values())[1] > half
    assert stats.paired_difference({0: 1.0}, {1: 2.0})[2] == 0  # no common seed, no pair


@pytest.mark.parametrize("means, halves, tied", [
    ([90.0, 88.0, 85.0, math.nan], [1.0, 1.5, 1.0, 1.0], [True, True, False, False]),  # 88 + 1.5 >= 90 - 1
    ([90.0, 88.0], [1.0, 1.0], [True, True]),        # intervals that touch (89 and 89) overlap
    ([90.0, 87.9], [1.0, 1.0], [True, False]),
    ([90.0, 80.0], [1.0, math.nan], [True, True]),   # one seed: no interval, cannot be told apart
    ([90.0, 80.0], [math.nan, 1.0], [True, True]),   # nor can anything from a best without an interval
    ([math.nan, math.nan], [1.0, 1.0], [False, False]),
])
def test_tied_for_best_marks_every_overlapping_interval(means, halves, tied):
    assert stats.tied_for_best(means, halves) == tied


def test_tied_for_best_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="differ in length"):
        stats.tied_for_best([1.0, 2.0], [0.1])


# --- control matching on fabricated records -------------------------------------------------------------------
def run(method: str, seed: int, top1: float, epochs: int = 0, recipe: dict | None = None, **params) -> dict:
    """A run record: fine-tuned with ``recipe`` (``config.train``) when ``epochs`` > 0, else off the shelf."""
    record = point_record(method, "unused", 0, seed, top1, 0.6 if params else 1.0)
    del record["tradeoff"]
    record.update(kind="run", method_params=params, train={"epochs": epochs},
                  record_id=f"{method}_{epochs}_{sorted((recipe or {}).items())}_{sorted(params.items())}_s{seed}",
                  config={"model": {"name": "deit_digits"}, "data": {"name": "digits"}, "seed": seed,
                          **({"train": recipe} if recipe else {})})
    return record


def aggregate(tmp_path, records):
    agg = aggregation.aggregate(load.load_records(write(tmp_path, records)))
    return agg, tables.main_table(agg, "deit_digits", "digits")


def test_a_fine_tuned_method_is_paired_with_dense_fine_tuned_with_the_same_recipe(tmp_path):
    records = [run("dense", s, v) for s, v in enumerate((80.0, 81.0, 82.0))]  # the baseline
    records += [run("dense", s, 92.0, 4, RECIPE) for s in range(3)]  # the control: same recipe
    records += [run("dense", s, 50.0, 4, {**RECIPE, "lr": 0.002}) for s in range(3)]  # another recipe
    records += [run("evit", s, v, 4, RECIPE, keep_rate=0.7) for s, v in enumerate((93.0, 94.0, 95.0))]
    agg, main = aggregate(tmp_path, records)
    row = agg[agg["method"] == "evit"].iloc[0]
    # differences 1, 2, 3 against the control's 92 (not the baseline's 80-82): mean 2, s = 1,
    # half-width 4.302653 / sqrt(3) = 2.484138
    assert row["top1_delta"] == pytest.approx(2.0) and row["top1_delta_n"] == 3
    assert row["top1_delta_ci"] == pytest.approx(T2 / math.sqrt(3), rel=1e-6)
    assert row["delta_against"] == "dense, fine-tuned" and row["control_missing"] == ""
    evit = main.display[main.display["Method"] == "evit"].iloc[0]
    assert evit[tables.DELTA_COLUMN] == "+2.00 ± 2.48" and evit["Δ against"] == "dense, fine-tuned"
    # the fine-tuned reference itself is compared with its baseline: 92 - 80, 92 - 81, 92 - 82
    dense_ft = agg[(agg["method"] == "dense") & agg["top1_mean"].eq(92.0)].iloc[0]
    assert dense_ft["top1_delta"] == pytest.approx(11.0) and dense_ft["delta_against"] == "dense, baseline"
    baseline = agg[(agg["method"] == "dense") & agg["top1_mean"].eq(81.0)].iloc[0]
    assert math.isnan(baseline["top1_delta"]) and baseline["control_missing"] == ""


def test_a_fine_tuned_method_without_its_control_gets_a_dash_and_the_command(tmp_path):
    records = [run("dense", s, v) for s, v in enumerate((80.0, 81.0, 82.0))]
    records += [run("dense", s, 92.0, 4, RECIPE) for s in range(3)]
    other = {**RECIPE, "lr": 0.001}  # no dense record was fine-tuned with this recipe
    records += [run("evit", s, 93.0, 4, other, keep_rate=0.7) for s in range(3)]
    agg, main = aggregate(tmp_path, records)
    row = agg[agg["method"] == "evit"].iloc[0]
    assert math.isnan(row["top1_delta"]) and row["top1_delta_n"] == 0
    assert main.display.loc[main.display["Method"] == "evit", tables.DELTA_COLUMN].tolist() == ["— (1)"]
    assert len(main.notes) == 1
    note = main.notes[0]
    assert note.startswith("(1) Missing control: no dense control fine-tuned with this recipe")
    assert ("python experiments/run.py -m method=dense model=deit_digits data=digits seed=0,1,2 "
            "experiment.train=true train.batch_size=64 train.epochs=4 train.lr=0.001") in note
    assert "(1) Missing control" in main.to_markdown()  # printed under the table


def test_an_off_the_shelf_method_is_paired_with_the_baseline(tmp_path):
    records = [run("dense", s, v) for s, v in enumerate((80.0, 81.0, 82.0))]
    records += [run("dense", s, 92.0, 4, RECIPE) for s in range(3)]
    records += [run("topk", s, 79.0, keep_rate=0.7) for s in range(3)]
    records += [run("topk", s, 70.0, keep_rate=0.5) for s in (0, 1, 7)]  # seed 7 has no baseline: 2 pairs
    agg, main = aggregate(tmp_path, records)
    topk = agg[agg["method"] == "topk"].set_index("top1_mean")
    # 79 against 80, 81, 82: differences -1, -2, -3: mean -2, s = 1, half-width 2.484138
    assert topk.loc[79.0, "top1_delta"] == pytest.approx(-2.0)
    assert topk.loc[79.0, "top1_delta_ci"] == pytest.approx(T2 / math.sqrt(3), rel=1e-6)
    assert topk.loc[79.0, "delta_against"] == "dense, baseline"
    # 70 against 80, 81 (seeds 0 and 1): -10, -11, mean -10.5, s = sqrt(0.5), t_{0.975,1} = 12.706205
    assert topk.loc[70.0, "top1_delta_n"] == 2 and topk.loc[70.0, "top1_delta"] == pytest.approx(-10.5)
    assert topk.loc[70.0, "top1_delta_ci"] == pytest.approx(12.706205 * math.sqrt(0.5) / math.sqrt(2), rel=1e-6)
    cells = dict(zip(main.display["Setting"], main.display[tables.DELTA_COLUMN]))
    assert cells["keep_rate=0.5"] == "-10.50 ± 6.35 (n=2)"  # fewer pairs than seeds: said in the cell


def test_an_off_the_shelf_method_without_a_baseline_names_the_missing_one(tmp_path):
    records = [run("dense", s, 92.0, 4, RECIPE) for s in range(2)]  # only fine-tuned dense
    records += [run("topk", s, 79.0, keep_rate=0.7) for s in range(2)]
    _, main = aggregate(tmp_path, records)
    assert main.display.loc[main.display["Method"] == "topk", tables.DELTA_COLUMN].tolist() == ["— (1)"]
    assert "no dense baseline record (not fine-tuned) of deit_digits on digits, seed(s) 0,1" in main.notes[0]
    assert "`python experiments/run.py -m method=dense model=deit_digits data=digits seed=0,1`" in main.notes[0]
