"""Small measurements: wall time and encoding throughput."""

from __future__ import annotations

import pytest

from mtl_utils import measure

pytestmark = pytest.mark.filterwarnings("error::DeprecationWarning", "error::FutureWarning")


def test_timed_returns_the_result_and_seconds():
    result, seconds = measure.timed(sum, [1, 2, 3])
    assert result == 6 and 0 <= seconds < 1


def test_encoding_throughput_is_sentences_per_median_second(tiny_backbone, monkeypatch):
    calls = []
    monkeypatch.setattr(measure, "median_seconds", lambda fn, repeats, warmup: (calls.append((repeats, warmup)),
                                                                                 fn(), 0.5)[-1])
    texts = ["a short one.", "a slightly longer sentence here.", "three."]
    assert measure.encoding_throughput(tiny_backbone, texts, batch_size=2, repeats=4) == pytest.approx(6.0)
    assert calls == [(4, 0)]
    assert measure.encoding_throughput(tiny_backbone, texts) > 0  # real timing
    with pytest.raises(ValueError, match="at least one"):
        measure.encoding_throughput(tiny_backbone, [])
