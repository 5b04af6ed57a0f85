"""Claims of the text: strict under make run / make test, a friendly line for a reader who experiments."""

from __future__ import annotations

import pytest

from mtl_utils.claims import STRICT_ENV, StaleClaim, claim


def test_a_claim_that_holds_is_silent_in_both_modes(monkeypatch, capsys):
    for value in ("1", ""):
        monkeypatch.setenv(STRICT_ENV, value)
        assert claim(True, "B gains on every seed")
    assert capsys.readouterr().out == ""


def test_a_stale_claim_fails_the_build_but_only_notes_it_for_a_reader(monkeypatch, capsys):
    monkeypatch.setenv(STRICT_ENV, "1")
    with pytest.raises(StaleClaim, match="B gains on every seed"):
        claim(False, "B gains on every seed")
    monkeypatch.delenv(STRICT_ENV)
    assert claim(False, "B gains on every seed") is False
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "B gains on every seed" in out and "does not hold" in out
