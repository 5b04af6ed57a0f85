"""The series' shared starting points: the two tasks, a model on a backbone, and notebook 02's trained checkpoint."""

from __future__ import annotations

import functools
import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd

from . import freezing
from .backbone import load_backbone
from .data import SPLITS, DataWarning, Task, check_task_names, load_task
from .evaluation import evaluate
from .model import MultiTaskModel
from .embedding_store import backbone_key, texts_key
from .offline.cache import atomic_write_text, cache_dir, fingerprint
from .recipes import DEFAULT_BACKBONE, TASKS, TrainConfig
from .training import train


LAB_ENV = "MTL_UTILS_LAB"


def lab_mode() -> bool:
    """True when `$MTL_UTILS_LAB` is 1: notebooks 05 and 07 run a short workload (a 90-minute lab), 0 or unset: the
    full one, which the saved notebooks and their text describe."""
    value = os.environ.get(LAB_ENV, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"${LAB_ENV} is {value!r}; accepted: 1 (lab mode: short runs), 0 or unset (the full runs)")
    return value == "1"


def series_task(name: str, seed: int = 0) -> Task:
    """A built-in dataset as the series uses it: each repeated text kept once, in test if it is there (the official
    TREC test set stays whole), so no sentence is both trained on and tested on; `repeats_dropped` counts them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)  # counted by repeats_dropped, shown in notebook 01
        return load_task(name, seed=seed, duplicates="drop")


def series_tasks(seed: int = 0) -> list[Task]:
    """Task A (TREC-6 question type) and Task B (movie-sentence sentiment), with their fixed splits."""
    return [series_task(name, seed=seed) for name in TASKS]


def repeats_dropped(names: Sequence[str] = TASKS, seed: int = 0) -> pd.DataFrame:
    """Per dataset: the rows of each split as published and as the series uses them (`series_task`)."""
    rows = []
    for name in names:
        published, used = load_task(name, seed=seed), series_task(name, seed=seed)
        rows.append({"dataset": name} | {f"{s} published": len(published.split(s)) for s in SPLITS}
                    | {f"{s} used": len(used.split(s)) for s in SPLITS})
    table = pd.DataFrame(rows).set_index("dataset")
    table["rows dropped"] = sum(table[f"{s} published"] - table[f"{s} used"] for s in SPLITS)
    return table


def build_model(backbone: str = DEFAULT_BACKBONE, tasks: list[Task] | None = None, head: str = "linear",
                seed: int = 0, device: str = "cpu") -> MultiTaskModel:
    """A MultiTaskModel with a fresh head per task on a pre-trained backbone."""
    tasks = tasks or series_tasks()
    check_task_names([t.name for t in tasks])
    return MultiTaskModel(load_backbone(backbone, device=device), {t.name: t.label_names for t in tasks},
                          head=head, seed=seed, backbone_name=backbone).to(device)


@functools.cache
def series_data_key() -> str:
    """A short fingerprint of the series' training and validation data (computed once per process)."""
    return fingerprint([], [(t.name, texts_key([*t.train.text, *t.val.text]), t.train.label.tolist(),
                             t.val.label.tolist()) for t in series_tasks()])[:12]


def checkpoint_folder(backbone: str = DEFAULT_BACKBONE) -> Path:
    """Where the jointly trained multi-task checkpoint of a backbone lives (in the cache folder), named by the
    data it is trained on too: another version of the series' data never reads a stale checkpoint."""
    return cache_dir("checkpoints") / f"multitask-heads-{backbone}-{series_data_key()}"


def train_multitask_heads(backbone: str = DEFAULT_BACKBONE, tasks: list[Task] | None = None, progress: bool = True):
    """Notebook 02's recipe: both heads trained jointly on the frozen backbone; returns (model, history)."""
    tasks = tasks or series_tasks()
    model = freezing.freeze_backbone(build_model(backbone, tasks))
    history = train(model, tasks, TrainConfig(progress=progress))
    return model, history


def multitask_checkpoint(backbone: str = DEFAULT_BACKBONE, progress: bool = True) -> MultiTaskModel:
    """The trained multi-task model of notebook 02: loaded if saved, else trained (cheaply) and saved first."""
    folder = checkpoint_folder(backbone)
    try:
        return MultiTaskModel.load(folder)
    except ValueError:  # missing or incomplete: make it
        model, _ = train_multitask_heads(backbone, progress=progress)
        model.save(folder)
        return MultiTaskModel.load(folder)


def seed_runs(make_model: Callable[[int], MultiTaskModel], tasks: Sequence[Task], config: TrainConfig,
              seeds: Sequence[int]) -> pd.DataFrame:
    """The same recipe once per seed (the heads' start and the batches drawn from it): per seed and task, the
    kept epoch (0: the run was undone), its validation accuracy and the test accuracy (read once per model).

    A run is deterministic, so its scores are kept in the cache folder, keyed by everything that decides them
    (the model before training and which of its parameters train, the data, the recipe): a notebook that repeats
    another's runs reads them.
    """
    rows = []
    for seed in seeds:
        model = make_model(seed)
        config_seed = replace(config, seed=seed, progress=False)
        key = fingerprint(((n, t) for n, t in model.state_dict().items() if not n.startswith("backbone.")),
                          backbone_key(model.backbone), model.head_config,
                          [n for n, p in model.named_parameters() if p.requires_grad],
                          [(t.name, texts_key([*t.train.text, *t.val.text, *t.test.text]),
                            t.train.label.tolist(), t.val.label.tolist(), t.test.label.tolist()) for t in tasks],
                          sorted(asdict(config_seed).items()))
        path = cache_dir("runs") / f"{key}.json"
        if path.is_file():
            rows += json.loads(path.read_text())
            continue
        history = train(model, tasks, config_seed)
        best = history[history.best].set_index("task")["val_accuracy"]
        found = [{"seed": seed, "task": t.name, "kept epoch": int(history.attrs["best_epoch"]), "val": float(best[t.name]),
                  "test": evaluate(model, t, "test")["accuracy"],
                  "seconds": float(history.drop_duplicates("epoch")["seconds"].sum())} for t in tasks]
        atomic_write_text(path, json.dumps(found))
        rows += found
    return pd.DataFrame(rows)
