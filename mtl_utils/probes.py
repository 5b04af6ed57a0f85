"""What a classic model gets, and quick probes of what frozen sentence embeddings already know."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score
from sklearn.neighbors import KNeighborsClassifier, NearestCentroid
from sklearn.pipeline import make_pipeline

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from .data import Task

C_GRID = (0.1, 1.0, 10.0)  # logistic regression's inverse regularisation strengths, chosen on validation

# (sentence, a paraphrase of it, a look-alike that shares most words but means something else)
PARAPHRASE_TRIPLES: tuple[tuple[str, str, str], ...] = (
    ("The dog chased the boy.", "The boy was chased by the dog.", "The boy chased the dog."),
    ("He bought a car from his neighbour.", "His neighbour sold him a car.", "He sold a car to his neighbour."),
    ("How old is the president?", "What is the president's age?", "How old is the president's house?"),
    ("Where was Mozart born?", "What is Mozart's birthplace?", "Where was Mozart buried?"),
    ("Who invented the telephone?", "Who was the inventor of the telephone?", "Who invented the television?"),
    ("She rarely eats meat.", "She hardly ever eats meat.", "She eats meat every day."),
    ("The movie was not good.", "The film was rather bad.", "The movie was good."),
    ("I cannot recommend this film enough.", "I highly recommend this film.", "I cannot recommend this film."),
    ("The acting saves an otherwise dull story.", "Strong performances rescue a boring plot.",
     "The dull acting ruins an otherwise good story."),
    ("It is raining heavily in London.", "London is having a downpour.", "It is raining lightly in London."),
    ("The meeting was moved to Friday.", "The meeting has been postponed until Friday.",
     "The meeting was cancelled on Friday."),
    ("The cat sat on the mat.", "A cat was sitting on the rug.", "The mat sat on the cat."),
)


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


def paraphrase_probe(backbone: SentenceTransformer,
                     triples: Sequence[tuple[str, str, str]] = PARAPHRASE_TRIPLES) -> dict[str, float]:
    """How often a sentence is closer (cosine) to its paraphrase than to a look-alike, and the mean cosine margin."""
    if not triples:
        raise ValueError("paraphrase_probe needs at least one (sentence, paraphrase, look-alike) triple")
    flat = [text for triple in triples for text in triple]
    emb = backbone.encode(flat, batch_size=64, show_progress_bar=False, convert_to_numpy=True).astype(np.float64)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    sentence, paraphrase, look_alike = emb[0::3], emb[1::3], emb[2::3]
    margin = (sentence * paraphrase).sum(1) - (sentence * look_alike).sum(1)
    return {"paraphrase closer": float((margin > 0).mean()), "mean margin": float(margin.mean())}


def _pick_on_validation(make, fit_x, fit_y, val_x, val_y) -> tuple[object, float]:
    """Fit `make(C)` for every C of C_GRID; keep the one with the best validation accuracy (ties: the first)."""
    best, best_c, best_acc = None, None, -1.0
    for c in C_GRID:
        model = make(c).fit(fit_x, fit_y)
        acc = accuracy_score(val_y, model.predict(val_x))
        if acc > best_acc:
            best, best_c, best_acc = model, c, acc
    return best, best_c


def tfidf_baseline(task: Task) -> dict[str, object]:
    """A classic model on the same splits: TF-IDF of words and word pairs, logistic regression, C chosen on
    validation; returns its validation and test predictions and the C it chose."""
    def make(c: float):
        return make_pipeline(TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
                             LogisticRegression(C=c, max_iter=2000))

    model, c = _pick_on_validation(make, task.train["text"], task.train["label"], task.val["text"], task.val["label"])
    return {"C": c, "val": model.predict(task.val["text"]), "test": model.predict(task.test["text"])}


def logistic_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                   test_x: np.ndarray) -> dict[str, object]:
    """Logistic regression on frozen sentence embeddings, C chosen on validation: validation and test predictions."""
    model, c = _pick_on_validation(lambda c: LogisticRegression(C=c, max_iter=2000), train_x, train_y, val_x, val_y)
    return {"C": c, "val": model.predict(val_x), "test": model.predict(test_x)}


def neighbour_agreement(x: np.ndarray, labels: np.ndarray, pool_x: np.ndarray, pool_labels: np.ndarray,
                        k: int = 15) -> np.ndarray:
    """For each point of `x`, the share of its k nearest points of the pool (cosine) that carry its label."""
    from sklearn.neighbors import NearestNeighbors

    index = NearestNeighbors(n_neighbors=k, metric="cosine").fit(pool_x).kneighbors(x, return_distance=False)
    return (np.asarray(pool_labels)[index] == np.asarray(labels)[:, None]).mean(1)
