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
    assert any("other task" in q for q in questions) and any("compute" in q for q in questions)
    assert any("data" in q for q in questions)
    assert all(isinstance(leaf, Advice) and leaf.why for leaf in leaves(CHART))


def test_fill_puts_in_every_number_or_says_which_are_missing():
    needed = fields(CHART)
    assert {"control_domain", "heads_epoch"} <= needed
    facts = {name: 1.0 for name in needed} | {"best_k": 2}
    filled = fill(CHART, facts)
    assert all("{" not in leaf.why for leaf in leaves(filled))
    with pytest.raises(KeyError, match="heads_epoch"):
        fill(CHART, {k: v for k, v in facts.items() if k != "heads_epoch"})
