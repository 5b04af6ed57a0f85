"""Scores, intervals, the paired test and the selection rule, against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mtl_utils.evaluation import (accuracy_interval, class_report, fallen_tasks, paired_comparison, reading, scores,
                                  seed_summary, select, task_noise, verdict)


def test_scores():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    out = scores(np.array([0, 1, 1, 1]), probs)
    assert out["accuracy"] == 0.75
    assert out["loss"] == pytest.approx(-(math.log(0.9) + math.log(0.8) + math.log(0.4) + math.log(0.7)) / 4)


def test_wilson_interval_by_hand():
    # 455 of 500 right: p = 0.91, z^2 = 3.8415. centre = (0.91 + 3.8415/1000) / (1 + 3.8415/500) = 0.906874;
    # half = 1.96 * sqrt(0.91 * 0.09 / 500 + 3.8415 / 1e6) / 1.007683 = 0.025184 -> (0.88169, 0.93206)
    low, high = accuracy_interval(455, 500)
    assert low == pytest.approx(0.88169, abs=1e-5) and high == pytest.approx(0.93206, abs=1e-5)
    assert accuracy_interval([True] * 455 + [False] * 45) == (low, high)
    assert accuracy_interval(0, 10)[0] == pytest.approx(0, abs=1e-12) and accuracy_interval(10, 10)[1] == pytest.approx(1)
    with pytest.raises(ValueError, match="correct <= n"):
        accuracy_interval(11, 10)


def correct_pairs(a: int, b: int, c: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Right/wrong arrays with a both right, b only the first, c only the second, d neither."""
    first = np.array([1] * a + [1] * b + [0] * c + [0] * d, dtype=bool)
    second = np.array([1] * a + [0] * b + [1] * c + [0] * d, dtype=bool)
    return first, second


def test_mcnemar_exact_by_hand():
    # 10 discordant sentences split 8 to 2: two-sided exact p = 2 * P(X <= 2 | Bin(10, 1/2)) = 2 * 56/1024
    result = paired_comparison(*correct_pairs(80, 8, 2, 10))
    assert result.p_value == pytest.approx(2 * 56 / 1024)
    assert (result.n, result.both_right, result.only_first, result.only_second) == (100, 80, 8, 2)
    assert result.difference == pytest.approx(0.06) and result.verdict() == "cannot tell"
    assert paired_comparison(*correct_pairs(50, 0, 0, 50)).p_value == 1.0  # no discordant pair: nothing to tell


def test_verdict_and_reading_follow_the_p_value_and_the_sign():
    assert verdict(+3.6, 0.01) == "better" and verdict(-3.6, 0.01) == "worse"
    assert verdict(+9.9, 0.05) == "cannot tell" and verdict(-0.2, 0.9) == "cannot tell"  # p = alpha is not below it
    assert verdict(+3.6, 0.03, alpha=0.01) == "cannot tell"
    assert reading(3.64, 0.001) == "+3.6 (better)" and reading(-0.04, 0.8) == "-0.0 (cannot tell)"
    # the method a paired comparison prints agrees with the function the notebooks call on (change, p)
    result = paired_comparison(*correct_pairs(30, 12, 3, 55))
    assert result.verdict() == verdict(100 * result.difference, result.p_value)
    for change, p in ((float("nan"), 0.01), (1.0, float("nan")), (1.0, 1.5)):
        with pytest.raises(ValueError, match="finite change and a p-value"):
            verdict(change, p)


def test_interval_of_a_paired_difference_by_hand():
    # Newcombe (1998), method 10 (score intervals, no continuity correction), for a=30, b=12, c=3, d=55 (n=100):
    # p1 = 0.42 in Wilson (0.32798, 0.51794), p2 = 0.33 in (0.24563, 0.42695),
    # phi = (30*55 - 12*3) / sqrt(42*58*33*67) = 0.69546;
    # below = sqrt(0.09202^2 - 2 phi 0.09202 0.09695 + 0.09695^2) = 0.07388, above = 0.07223
    # -> 0.09 in (0.01612, 0.16223); McNemar: 3 of 15 discordant, p = 2 * 576/32768 = 0.03516
    result = paired_comparison(*correct_pairs(30, 12, 3, 55))
    assert result.difference == pytest.approx(0.09)
    assert result.low == pytest.approx(0.01612, abs=1e-5) and result.high == pytest.approx(0.16223, abs=1e-5)
    assert result.p_value == pytest.approx(0.03515625) and result.verdict() == "better"
    worse = paired_comparison(*correct_pairs(30, 3, 12, 55))
    assert worse.verdict() == "worse" and worse.low == pytest.approx(-result.high) and "-> worse" in worse.describe()
    with pytest.raises(ValueError, match="equally long"):
        paired_comparison([True], [True, False])


def test_seed_summary():
    out = seed_summary([0.80, 0.82, 0.81, 0.79, 0.83])
    assert out["mean"] == pytest.approx(0.81) and out["sd"] == pytest.approx(math.sqrt(0.00025))
    half = 2.776445105 * math.sqrt(0.00025) / math.sqrt(5)  # t(0.975, 4 degrees of freedom)
    assert out["low"] == pytest.approx(0.81 - half) and out["high"] == pytest.approx(0.81 + half)
    with pytest.raises(ValueError, match="at least 2"):
        seed_summary([0.8])


def test_selection_rule_margin_noise_and_fewest_parameters():
    val_sizes = {"a": 500, "b": 1000}
    runs = {"benchmark": {"a": 0.85, "b": 0.76}, "big": {"a": 0.91, "b": 0.77}, "small": {"a": 0.905, "b": 0.772},
            "hurts b": {"a": 0.95, "b": 0.74}, "tiny gain": {"a": 0.853, "b": 0.76}}
    params = {"benchmark": 10, "big": 10_000, "small": 100, "hurts b": 5_000, "tiny gain": 20}
    result = select(runs, "benchmark", val_sizes, params)
    why = result.table.set_index("run")["why"]
    assert "under the 0.5-point margin" in why["tiny gain"]
    assert "b falls 2.0 points, more than its noise (1.4)" in why["hurts b"]  # sqrt(.76*.24/1000) = 0.01351
    assert result.chosen == "small" and "ties (within the margin) with big" in result.reason  # 0.8385 vs 0.84
    nothing = select({k: runs[k] for k in ("benchmark", "tiny gain", "hurts b")}, "benchmark", val_sizes, params)
    assert nothing.chosen == "benchmark" and "keep the benchmark" in nothing.reason
    only_b = select(runs, "benchmark", val_sizes, params, goal=["b"])
    assert only_b.chosen == "small"  # b: +1.2 for small, +1.0 for big (within the margin), fewer parameters
    with pytest.raises(ValueError, match="benchmark 'x'"):
        select(runs, "x", val_sizes, params)


def test_fallen_tasks_follow_the_selection_rule_s_noise():
    val_sizes = {"a": 500, "b": 1000}
    base = {"a": 0.85, "b": 0.76}
    assert task_noise(0.76, 1000) == pytest.approx(math.sqrt(0.76 * 0.24 / 1000))  # 0.01351
    assert fallen_tasks({"a": 0.95, "b": 0.74}, base, val_sizes) == ["b"]  # 2.0 points down, noise 1.35
    assert fallen_tasks({"a": 0.84, "b": 0.75}, base, val_sizes) == []  # a: 1.0 down, noise 1.60; b: 1.0 < 1.35
    # where the mean gains (select names the fallen tasks only then), select and fallen_tasks agree
    for accs in ({"a": 0.95, "b": 0.74}, {"a": 0.80, "b": 0.85}, {"a": 0.84, "b": 0.78}, {"a": 0.90, "b": 0.745}):
        table = select({"base": base, "run": accs}, "base", val_sizes, {"base": 1, "run": 1}, margin=0.0).table
        why = table.set_index("run").loc["run", "why"]
        assert [t for t in base if f"{t} falls" in why] == fallen_tasks(accs, base, val_sizes), (accs, why)
    with pytest.raises(ValueError, match="n >= 1"):
        task_noise(0.5, 0)


def test_class_report_by_hand():
    labels = np.array([0, 0, 0, 1, 1, 2])
    probs = np.eye(3)[[0, 0, 1, 1, 2, 2]]  # predicted 0, 0, 1, 1, 2, 2
    report = class_report(labels, probs, ("x", "y", "z"))
    assert report["confusion_matrix"]["counts"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert report["confusion_matrix"]["labels"] == ["x", "y", "z"]
    assert report["per_class"]["x"] == {"precision": 1.0, "recall": pytest.approx(2 / 3), "f1": pytest.approx(0.8),
                                        "support": 3}
    assert report["per_class"]["y"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert report["per_class"]["z"]["precision"] == 0.5 and report["per_class"]["z"]["recall"] == 1.0
    absent = class_report(np.array([0, 0]), np.eye(3)[[0, 0]], ("x", "y", "z"))  # a class never seen: zeros
    assert absent["per_class"]["z"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_holm_adjusts_a_family_of_p_values_step_down():
    from mtl_utils.evaluation import holm

    # by hand: sorted 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> never below 0.06
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    out = holm([0.2, np.nan, 0.6])  # a row without a test is not counted in the family
    assert np.isnan(out[1]) and np.allclose(out[[0, 2]], [0.4, 0.6])
    np.testing.assert_allclose(holm([0.9, 0.8]), [1.0, 1.0])  # capped at 1, never below the smaller one's
    with pytest.raises(ValueError, match=r"p-values lie in \[0, 1\]"):
        holm([0.5, 1.5])


def test_a_goal_of_some_tasks_is_named_as_such_not_as_the_mean():
    from mtl_utils.evaluation import select

    candidates = {"start": {"a": 0.85, "b": 0.76}, "run": {"a": 0.85, "b": 0.80}}
    choice = select(candidates, "start", {"a": 500, "b": 1000}, {"start": 0, "run": 10}, goal=["b"])
    assert "goal val (b)" in choice.table.columns and "mean val" not in choice.table.columns
    assert choice.chosen == "run" and "the goal's validation accuracy (b)" in choice.reason
    everything = select(candidates, "start", {"a": 500, "b": 1000}, {"start": 0, "run": 10})
    assert "mean val" in everything.table.columns and "the mean validation accuracy" in everything.reason
