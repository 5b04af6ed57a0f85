"""The learning curve of unfreezing (mtl_utils.learning_curve): its runs on the tiny backbone, its arithmetic by hand."""

from __future__ import annotations

import pandas as pd
import pytest

from mtl_utils import learning_curve as lc

TASK_ROWS = 90


def test_every_method_starts_from_the_same_benchmark_and_the_control_is_its_own_reference(tiny_backbone_dir, tasks):
    recipes = lc.methods(k=1, epochs=1)
    runs = lc.curve_runs(tasks, [40], [0, 1], recipes, backbone=str(tiny_backbone_dir))
    assert len(runs) == 2 * len(recipes) * len(tasks)
    assert set(runs.method) == set(recipes) and lc.CONTROL in recipes
    assert (runs["training sentences"] == 40).all()
    # an undone run is its start: the benchmark, as is the undone control, so their scores are equal
    undone = runs[runs["kept epoch"] == 0]
    for _, group in undone.groupby(["size", "seed"]):
        assert group.groupby("task")["val"].nunique().max() == 1
    gains = lc.gains(runs)
    assert set(gains.method) == set(recipes) - {lc.CONTROL} and len(gains) == 2 * 2 * len(tasks)
    again = lc.curve_runs(tasks, [40], [0], recipes, backbone=str(tiny_backbone_dir))  # read from the cache
    pd.testing.assert_frame_equal(again.drop(columns="seconds"),
                                  runs.query("seed == 0").drop(columns="seconds").reset_index(drop=True),
                                  check_like=True)


def _runs(control, method):
    rows = []
    for size, seeds in control.items():
        for seed, value in enumerate(seeds):
            rows.append({"size": size, "seed": seed, "task": "a", "method": lc.CONTROL, "val": value, "kept epoch": 1})
            rows.append({"size": size, "seed": seed, "task": "a", "method": "m", "val": method[size][seed],
                         "kept epoch": 0 if method[size][seed] == value else 2})
    return pd.DataFrame(rows)


def test_gains_summary_and_where_the_curve_pays():
    runs = _runs({100: [0.5, 0.6, 0.7], 400: [0.5, 0.5, 0.5], 1600: [0.8, 0.8, 0.8]},
                 {100: [0.52, 0.55, 0.7], 400: [0.51, 0.52, 0.53], 1600: [0.81, 0.85, 0.82]})
    gains = lc.gains(runs)
    assert gains["gain"].round(6).tolist() == [2.0, -5.0, 0.0, 1.0, 2.0, 3.0, 1.0, 5.0, 2.0]
    assert gains["undone"].tolist() == [False, False, True] + [False] * 6
    table = lc.summary(gains)
    row = table[table["size"] == 400].iloc[0]
    assert row["mean gain"] == pytest.approx(2.0) and row["min"] == pytest.approx(1.0) and row["seeds"] == 3
    assert table[table["size"] == 100].iloc[0]["undone"] == 1
    assert lc.pays_from(table, "m", "a") == 400  # every seed gains at 400 and at 1,600; not at 100
    worse = table.copy()
    worse.loc[worse["size"] == 1600, "min"] = -1.0
    assert lc.pays_from(worse, "m", "a") is None  # a larger size that does not pay: no crossing


def test_the_committed_table_is_read_back_exactly(tmp_path):
    runs = _runs({100: [0.5, 0.6]}, {100: [0.52, 0.55]})
    lc.save_runs(runs, tmp_path / "runs.csv")
    pd.testing.assert_frame_equal(lc.committed_runs(tmp_path / "runs.csv"), runs)
    with pytest.raises(FileNotFoundError, match="make learning-curve"):
        lc.committed_runs(tmp_path / "missing.csv")
