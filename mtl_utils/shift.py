"""Has today's data moved away from last year's (measured on the frozen model's own sentence embeddings), and how
many of today's labels bring a frozen head back."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score
from sklearn.model_selection import StratifiedKFold, cross_val_score

from . import freezing
from .data import Task
from .features import cached_embeddings
from .model import MultiTaskModel
from .recipes import TrainConfig
from .series import seed_runs


def domain_classifier_accuracy(reference: np.ndarray, new: np.ndarray, seed: int = 0, folds: int = 5) -> float:
    """Cross-validated accuracy of a logistic regression telling `new` embeddings from `reference` ones.

    Both sides are subsampled to the same size, so 0.5 means "indistinguishable" and 1.0 "a different world".
    """
    rng = np.random.default_rng(seed)
    n = min(len(reference), len(new))
    x = np.concatenate([reference[rng.choice(len(reference), n, replace=False)],
                        new[rng.choice(len(new), n, replace=False)]])
    y = np.r_[np.zeros(n), np.ones(n)]
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    return float(cross_val_score(LogisticRegression(max_iter=2000), x, y, cv=cv).mean())


def head_report(model: MultiTaskModel, head: str, texts: Sequence[str], labels: np.ndarray) -> dict[str, float]:
    """One frozen head on any labelled sentences: accuracy, and its mean confidence (which needs no labels)."""
    embeddings = cached_embeddings(model.backbone, list(texts), progress=False)
    probs = model.predict_embeddings(embeddings)[head].cpu().numpy()
    return {"accuracy": accuracy_score(labels, probs.argmax(-1)), "mean confidence": float(probs.max(-1).mean())}


def embeddings_of(model: MultiTaskModel, texts: Sequence[str]) -> np.ndarray:
    """The frozen backbone's sentence embeddings of `texts`, from the cache."""
    return cached_embeddings(model.backbone, list(texts), progress=False).cpu().numpy()


def retrain_head(start: Callable[[], MultiTaskModel], head: str, today: Task, sizes: Sequence[int],
                 seeds: Sequence[int]) -> pd.DataFrame:
    """The drift remedy: head `head` trained on `n` of today's labelled training sentences (a sample per seed), on
    the frozen backbone with the series' heads recipe, starting from the frozen model's head and keeping its best
    epoch on today's validation sentences (its start if none beat it). Per size and seed: today's validation and
    test accuracy (the test sentences are never trained on), and the kept epoch."""
    rows = []
    for n in sizes:
        for seed in seeds:
            data = dataclasses.replace(today.with_train_sample(min(n, len(today.train)), seed=seed), name=head)

            def make(s: int) -> MultiTaskModel:
                model = freezing.freeze_backbone(start())
                for other in model.tasks:
                    if other != head:
                        freezing.freeze_head(model, other)
                return model

            found = seed_runs(make, [data], TrainConfig(seed=seed, progress=False), [seed])
            rows += found.assign(data=today.name, labelled=n).to_dict("records")
    return pd.DataFrame(rows)
