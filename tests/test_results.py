"""Result files: the scenario table each notebook writes and notebook 08 reads."""

from __future__ import annotations

import pytest

from mtl_utils.results import SCENARIO_COLUMNS, load_scenarios, save_scenarios


def test_scenarios_round_trip_and_missing_notebooks_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("MTL_UTILS_RESULTS", str(tmp_path))
    save_scenarios([{"scenario": "s", "trec": 0.9, "movies": 0.8}], "02_x")
    table, missing = load_scenarios(["02_x", "05_y"])
    assert list(table.columns) == list(SCENARIO_COLUMNS) and table.loc[0, "notebook"] == "02_x"
    assert table.loc[0, "trec"] == 0.9 and missing == ["05_y"]
    with pytest.raises(ValueError, match="unknown scenario columns \\['speed'\\]"):
        save_scenarios([{"scenario": "s", "speed": 1}], "02_x")


def test_readme_table_is_spliced_between_markers(tmp_path):
    import pandas as pd

    from mtl_utils.results import README_END, README_START, readme_table, splice_readme

    csv = tmp_path / "which.csv"
    pd.DataFrame([{"way of training": "a", "notebook": "02", "trainable parameters": "3,080", "one-off s": "",
                   "s per epoch": 0.3, "sentences/s": 250,
                   "change on A (points)": "+1.0 [0.1, 2.0] *", "change on B (points)": "(the reference)",
                   "against": "x", "risk to the other task": "none", "when": "always"}]).to_csv(csv, index=False)
    block = readme_table(csv)
    assert block.splitlines()[2].startswith("| a | 02 | 3,080 | – | 0.3 | 250 | +1.0 [0.1, 2.0] * |")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_START}\nold\n{README_END}\nrest\n")
    assert splice_readme(readme, block) and not splice_readme(readme, block)
    assert readme.read_text() == f"intro\n{README_START}\n{block}\n{README_END}\nrest\n"
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        splice_readme(readme, block)


def test_a_run_the_rule_undid_is_labelled_undone_not_shown_as_a_result():
    import pandas as pd

    from mtl_utils.results import UNDONE, label_undone

    def row(trainable, a, b, risk="0.0% of Task A's validation predictions changed"):
        return pd.Series({"way of training": "run", "trainable parameters": trainable, "one-off s": "9.0",
                          "s per epoch": "13.0", "change on A (points)": a, "change on B (points)": b,
                          "risk to the other task": risk})

    undone = label_undone(row("3,549,698", "+0.0 [-0.6, +0.6]", "+0.0 [-0.2, +0.2]"))
    assert undone["change on A (points)"] == undone["change on B (points)"] == UNDONE
    assert undone["way of training"] == f"run ({UNDONE})" and undone["s per epoch"] == "–"
    for kept in (row("3,549,698", "+0.0 [-1.2, +1.4]", "+0.0 [-0.2, +0.2]"),  # some answers changed either way
                 row("3,549,698", "+0.0 [-0.6, +0.6]", "+0.0 [-0.2, +0.2]", "15.8% of Task A's ... changed"),
                 row("0", "+0.0 [-0.6, +0.6]", "+0.0 [-0.2, +0.2]"),  # nothing trains: nothing to undo
                 row("770", "+0.8 [-0.3, +2.0]", "+0.9 [-0.7, +2.6]")):
        assert label_undone(kept).equals(kept)


def test_mark_undone_hides_the_changes_and_costs_of_runs_that_kept_their_start():
    import pandas as pd
    import pytest

    from mtl_utils.results import UNDONE, mark_undone

    table = pd.DataFrame({"run": ["a", "b"], "kept epoch": [0, 2], "change": [0.0, 3.5], "minutes": [1.2, 1.3]})
    shown = mark_undone(table, ["change", "minutes"])
    assert shown.loc[0, "change"] == UNDONE and shown.loc[0, "minutes"] == UNDONE
    assert shown.loc[1, "change"] == 3.5 and table.loc[0, "change"] == 0.0  # the trained run as is; the table untouched
    with pytest.raises(KeyError, match=r"\['p'\] are not in the table"):
        mark_undone(table, ["p"])
