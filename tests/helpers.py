"""Small synthetic tasks the tests train on: learnable from one cue word, not trivially short."""

from __future__ import annotations

import numpy as np
import pandas as pd

from mtl_utils.data import task_from_dataframe

WORDS = "the a movie film plot actor story scene was is very quite rather".split()


def synthetic_task(name: str, cue_words: list[str], n: int = 240, seed: int = 0):
    """Sentences of filler words with one cue word that decides the label."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = i % len(cue_words)
        words = list(rng.choice(WORDS, rng.integers(3, 12)))
        words.insert(int(rng.integers(0, len(words))), cue_words[label])
        rows.append({"text": " ".join(words), "label": cue_words[label]})
    return task_from_dataframe(name, pd.DataFrame(rows), val_size=0.2, test_size=0.2, seed=seed)
