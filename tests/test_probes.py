"""Training-free probes of frozen sentence embeddings."""

from __future__ import annotations

import pytest

from mtl_utils.probes import PARAPHRASE_TRIPLES, paraphrase_probe

pytestmark = pytest.mark.filterwarnings("error::DeprecationWarning", "error::FutureWarning")


def test_paraphrase_probe(tiny_backbone):
    assert len(PARAPHRASE_TRIPLES) == 12 and all(len(set(t)) == 3 for t in PARAPHRASE_TRIPLES)
    result = paraphrase_probe(tiny_backbone)
    assert set(result) == {"paraphrase closer", "mean margin"}
    assert 0 <= result["paraphrase closer"] <= 1 and -2 <= result["mean margin"] <= 2
    # a sentence is its own perfect paraphrase: always closer, margin 1 - cosine to the look-alike
    same = [(s, s, d) for s, _, d in PARAPHRASE_TRIPLES[:4]]
    assert paraphrase_probe(tiny_backbone, same)["paraphrase closer"] == 1.0
    with pytest.raises(ValueError, match="at least one"):
        paraphrase_probe(tiny_backbone, [])
