"""Quick, training-free probes of what frozen sentence embeddings already know."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score
from sklearn.neighbors import KNeighborsClassifier, NearestCentroid


def probe_accuracies(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                     k: int = 15) -> dict[str, float]:
    """Test accuracy of a nearest-centroid and a k-NN (cosine) classifier, and of always guessing the majority class."""
    majority = np.bincount(train_y).argmax()
    centroid = NearestCentroid().fit(train_x, train_y)
    knn = KNeighborsClassifier(n_neighbors=k, metric="cosine").fit(train_x, train_y)
    return {
        "majority class": accuracy_score(test_y, np.full_like(test_y, majority)),
        "nearest centroid": accuracy_score(test_y, centroid.predict(test_x)),
        f"{k}-NN (cosine)": accuracy_score(test_y, knn.predict(test_x)),
    }


def probe_table(results: dict[str, dict[str, float]]) -> pd.DataFrame:
    """Probe accuracies of several tasks as one table: a row per task, a column per probe."""
    return pd.DataFrame(results).T.rename_axis("task").reset_index()
