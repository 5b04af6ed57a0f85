"""What the caches buy per training epoch, on real data with the real all-MiniLM-L6-v2.

1. Heads only (frozen backbone): the embedding cache against encoding every sentence every epoch; and a second,
   differently split run over sentences already cached against their first encode.
2. The last k layers train (k = 1, 2, 3): the frozen-prefix cache against the full forward pass; and
   length-grouped batches against random ones.

An epoch is what `mtl_utils.training.train` reports as its `seconds` (training steps plus validation, on
a fixed stratified subset of each task); building the caches is timed separately, once.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np

import pandas as pd

from mtl_utils import features, freezing
from mtl_utils.offline.cache import CACHE_ENV
from mtl_utils.series import build_model, series_tasks
from mtl_utils.recipes import TrainConfig
from mtl_utils.training import train

from .common import comparison_row, interleaved, log, raw_rows, subset_task

BACKBONE = "all-MiniLM-L6-v2"


@dataclass(frozen=True)
class Workload:
    """A fixed stratified subset: `train_n` training and `val_n` validation sentences per task."""

    train_n: int
    val_n: int

    def tasks(self):
        return [subset_task(t, self.train_n, self.val_n, seed=0) for t in series_tasks()]

    def __str__(self) -> str:
        return f"2 tasks × ({self.train_n} train + {self.val_n} val), batch 32"


HEADS = Workload(train_n=500, val_n=64)
LAYERS = Workload(train_n=200, val_n=64)
QUICK = Workload(train_n=32, val_n=16)


class Trainer:
    """One model on one workload; each call trains one epoch from the same starting weights and returns its seconds."""

    def __init__(self, tasks, k: int | None) -> None:
        self.tasks = tasks
        self.model = freezing.freeze_backbone(build_model(BACKBONE, tasks))
        if k:
            freezing.unfreeze_last(self.model, k)
        self.start = {n: t.detach().clone() for n, t in self.model.state_dict().items()}

    def epoch(self, **config) -> float:
        self.model.load_state_dict(self.start)
        history = train(self.model, self.tasks,
                        TrainConfig(epochs=1, evaluate_first=False, progress=False, seed=0, **config))
        return float(history["seconds"].iloc[0])

    def build_caches(self) -> float:
        """Seconds to build every cache an epoch reads (train and val of each task), from nothing."""
        features.clear_memory_cache()
        start = time.perf_counter()
        for task in self.tasks:
            for frame in (task.train, task.val):
                features.sentence_source(self.model, frame["text"].tolist(), progress=False)
        return time.perf_counter() - start


def heads(repeats: int, workload: Workload = HEADS) -> tuple[pd.DataFrame, pd.DataFrame]:
    """1. Heads-only epoch: the embedding cache against encoding every epoch (FullForward, frozen backbone)."""
    log(f"heads-only epoch, {workload}")
    trainer = Trainer(workload.tasks(), k=None)
    one_time = trainer.build_caches()
    log(f"    building the embedding cache: {one_time:.2f} s")
    times = interleaved({
        "embedding cache": lambda: trainer.epoch(head_lr=1e-2, use_cache=True),
        "encode every epoch": lambda: trainer.epoch(head_lr=1e-2, use_cache=False),
    }, repeats, warmup=1)
    rows = [comparison_row("heads-only epoch (frozen backbone)", str(workload), "embedding cache",
                           "encode every epoch", times, target=50, one_time=one_time)]
    log("another split of the same sentences, against their first encode")
    resplit = interleaved(resplit_cases(trainer), repeats, warmup=1)
    rows.append(comparison_row("embedding the same sentences, split another way", f"{workload}, re-split 80/20",
                               "another split (cache on disk)", "first encode (empty cache)", resplit, target=20))
    return pd.DataFrame(rows), pd.DataFrame(raw_rows("heads-only epoch", times) + raw_rows("re-split", resplit))


def resplit_cases(trainer: Trainer) -> dict:
    """Embedding a workload's sentences from an empty cache, and the same sentences shuffled into other splits
    from the cache the first run left on disk (the in-memory cache cleared: a new process would start so)."""
    texts = [t for task in trainer.tasks for frame in (task.train, task.val) for t in frame["text"]]
    other = [str(t) for t in np.random.default_rng(1).permutation(texts)]
    cut = int(0.8 * len(other))

    def embed(parts) -> float:
        features.clear_memory_cache()
        start = time.perf_counter()
        for part in parts:
            features.sentence_source(trainer.model, part, progress=False)
        return time.perf_counter() - start

    def first() -> float:
        before = os.environ.get(CACHE_ENV)
        with tempfile.TemporaryDirectory(prefix="bench-first-") as empty:
            os.environ[CACHE_ENV] = empty
            try:
                return embed([texts])
            finally:
                if before is None:
                    os.environ.pop(CACHE_ENV)
                else:
                    os.environ[CACHE_ENV] = before
                features.clear_memory_cache()

    return {"first encode (empty cache)": first,
            "another split (cache on disk)": lambda: embed([other[:cut], other[cut:]])}


def layers(repeats: int, workload: Workload = LAYERS, ks: tuple[int, ...] = (1, 2, 3),
           grouping_k: int = 2) -> tuple[pd.DataFrame, pd.DataFrame]:
    """2. Last k layers train: the frozen-prefix cache against the full forward pass; length grouping at one k."""
    rows, raw = [], []
    tasks = workload.tasks()
    targets = {2: 1.5}
    for k in ks:
        log(f"last {k} layer(s) train, {workload}")
        trainer = Trainer(tasks, k)
        one_time = trainer.build_caches()
        log(f"    building the {6 - k}-layer prefix cache: {one_time:.2f} s")
        cases = {
            "prefix cache": lambda: trainer.epoch(use_cache=True),
            "full forward": lambda: trainer.epoch(use_cache=False),
        }
        if k == grouping_k:
            cases["prefix cache, random batches"] = lambda: trainer.epoch(use_cache=True, group_by_length=False)
        times = interleaved(cases, repeats, warmup=1)
        raw += raw_rows(f"last {k} layer(s) train", times)
        rows.append(comparison_row(f"epoch, last {k} layer(s) train", str(workload), "prefix cache",
                                   "full forward", times, target=targets.get(k), one_time=one_time))
        if k == grouping_k:
            rows.append(comparison_row(f"epoch, last {k} layers train (prefix cache)", str(workload),
                                       "prefix cache", "prefix cache, random batches", times, target=1.3))
            rows[-1]["this"], rows[-1]["against"] = "length-grouped batches", "random batches"
    return pd.DataFrame(rows), pd.DataFrame(raw)
