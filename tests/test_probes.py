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


def test_classic_baselines_choose_c_on_validation():
    import numpy as np
    import pandas as pd

    from mtl_utils.data import task_from_dataframe
    from mtl_utils.probes import C_GRID, logistic_probe, neighbour_agreement, tfidf_baseline

    rows = [{"text": f"{word} movie number {i}", "label": word} for i in range(60) for word in ("good", "bad")]
    task = task_from_dataframe("toy", pd.DataFrame(rows))
    result = tfidf_baseline(task)
    assert result["C"] in C_GRID and (result["test"] == task.test["label"].to_numpy()).mean() == 1.0
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3)) + np.repeat([[3, 0, 0], [-3, 0, 0]], 20, axis=0)
    y = np.repeat([0, 1], 20)
    probe = logistic_probe(x, y, x, y, x)
    assert (probe["val"] == y).all() and probe["C"] in C_GRID
    agreement = neighbour_agreement(x, y, x, y, k=5)
    assert agreement.shape == (40,) and agreement.min() == 1.0  # two far-apart clusters: neighbours agree
    assert neighbour_agreement(x[:3], 1 - y[:3], x, y, k=5).max() == 0.0  # the other cluster's label: never
