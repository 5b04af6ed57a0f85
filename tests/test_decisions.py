"""The decision chart: its structure, the numbers it needs, and filling them in."""

from __future__ import annotations

import pytest

from mtl_utils.decisions import CHART, Advice, Question, fields, fill, leaves


def test_the_chart_asks_the_series_questions_and_ends_in_advice():
    questions = []

    def walk(node):
        if isinstance(node, Question):
            questions.append(node.ask)
            for _, child in node.answers:
                walk(child)

    walk(CHART)
    assert any("drifted" in q for q in questions) and any("labels" in q for q in questions)
    assert any("other task" in q for q in questions) and any("learning curve" in q for q in questions)
    assert any("slower encoding" in q for q in questions)  # the backbone is a branch too
    assert all(isinstance(leaf, Advice) and leaf.why for leaf in leaves(CHART))


def test_fill_puts_in_every_number_or_says_which_are_missing():
    needed = fields(CHART)
    assert {"control_domain", "heads_epoch"} <= needed
    facts = {name: 1 for name in needed} | {"a_note": ""}
    filled = fill(CHART, facts)
    assert all("{" not in leaf.why for leaf in leaves(filled))
    with pytest.raises(KeyError, match="heads_epoch"):
        fill(CHART, {k: v for k, v in facts.items() if k != "heads_epoch"})


def test_thresholds_in_questions_are_filled_and_the_chart_reads_as_a_list():
    from mtl_utils.decisions import as_markdown

    facts = {name: 1000 for name in fields(CHART)} | {"a_note": ", the smallest size tried"}
    filled = fill(CHART, facts)
    text = as_markdown(filled)
    assert "{" not in text and "at least 1,000 (question type, the smallest size tried) or 1,000 (sentiment)" in text
    assert text.count("\n- *") == 2 and text.count("→ **") == len(leaves(CHART))  # two answers at the top, every advice once
