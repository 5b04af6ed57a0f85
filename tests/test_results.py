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
