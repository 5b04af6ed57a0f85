"""Has today's data moved away from last year's? Measured on the frozen model's own sentence embeddings."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score
from sklearn.model_selection import StratifiedKFold, cross_val_score

from .features import cached_embeddings
from .model import MultiTaskModel


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
