"""The shared plot helpers draw what they are given, and refuse what they cannot draw."""

import matplotlib

matplotlib.use("Agg")

import pandas as pd
import pytest

from mtl_utils.plots import compare_runs


def history(accuracies: dict[str, list[float]], best: int, **extra) -> pd.DataFrame:
    rows = [{"epoch": e, "task": t, "val_accuracy": a, "best": e == best, **extra}
            for t, values in accuracies.items() for e, a in enumerate(values)]
    return pd.DataFrame(rows)


def test_compare_runs_draws_each_run_stage_and_kept_epoch():
    plain = history({"a": [0.5, 0.7, 0.6], "b": [0.4, 0.5, 0.6]}, best=1)
    staged = pd.concat([history({"a": [0.5, 0.4], "b": [0.4, 0.3]}, best=0, stage=1),
                        history({"a": [0.5, 0.8], "b": [0.4, 0.6]}, best=1, stage=2).assign(epoch=lambda h: h.epoch + 1)])
    fig = compare_runs({"plain": plain, "staged": staged}, {"a": "task a", "b": "task b"},
                       baseline={"a": 0.5}, baseline_label="benchmark")
    ax_a, ax_b = fig.axes
    assert [ax_a.get_title(), ax_b.get_title()] == ["task a", "task b"]
    lines = [line for line in ax_a.get_lines() if line.get_linestyle() == "-"]
    # plain: one line; staged: one line per stage; then the kept-epoch markers and the baseline
    assert [list(line.get_ydata()) for line in lines] == [[0.5, 0.7, 0.6], [0.5, 0.4], [0.5, 0.8]]
    markers = [list(line.get_xdata()) for line in ax_a.get_lines() if line.get_linestyle() == "None"]
    assert markers == [[1], [0, 2]]
    assert [t.get_text() for t in ax_b.get_legend().get_texts()] == ["plain", "staged"]
    assert len(ax_a.get_lines()) == 6 and len(ax_b.get_lines()) == 5  # the baseline only where given


def test_compare_runs_refuses_an_unknown_task():
    with pytest.raises(ValueError, match=r"task\(s\) \['c'\].*\['a', 'b'\]"):
        compare_runs({"plain": history({"a": [0.5], "b": [0.4]}, best=0)}, {"c": "task c"})


def test_compare_runs_draws_interval_bands_when_given_validation_sizes():
    plain = history({"a": [0.5, 0.7, 0.6]}, best=1)
    fig = compare_runs({"plain": plain}, {"a": "task a"}, baseline={"a": 0.5}, val_sizes={"a": 100})
    (ax,) = fig.axes
    assert len(ax.collections) == 1 and len(ax.patches) == 1  # one band per run, one for the baseline


def test_interval_plot_and_heatmap():
    from mtl_utils.plots import heatmap, interval_plot

    table = pd.DataFrame({"run": ["x", "y"], "a": [0.8, 0.9], "a low": [0.75, 0.86], "a high": [0.84, 0.93]})
    fig = interval_plot(table, {"a": "task a"}, label="run", reference="x")
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == ["x", "y"] and ax.get_title() == "task a"
    assert len(ax.patches) == 1  # the reference row's interval, shaded
    values = pd.DataFrame([[1.0, 0.9], [0.95, 0.99]], index=["r1", "r2"], columns=["s1", "s2"])
    fig = heatmap(values, "t", "label", fmt="{:.2f}")
    assert sorted(t.get_text() for t in fig.axes[0].texts) == ["0.90", "0.95", "0.99", "1.00"]


def test_decision_chart_draws_every_question_and_advice():
    from mtl_utils.decisions import Advice, Question
    from mtl_utils.plots import decision_chart

    chart = Question("drifted?", (("no", Advice("keep", "because 1")), ("yes", Advice("retrain", "because 2"))))
    texts = [t.get_text() for t in decision_chart(chart).axes[0].texts]
    assert {"drifted?", "keep", "because 1", "retrain", "because 2", "no", "yes"} <= set(texts)
