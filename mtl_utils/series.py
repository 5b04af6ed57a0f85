"""The series' shared starting points: the two tasks, a model on a backbone, and notebook 02's trained checkpoint."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from . import freezing
from .backbone import load_backbone
from .checkpoint import load_checkpoint, save_checkpoint
from .data import Task, load_task
from .evaluation import evaluate
from .model import MultiTaskModel
from .offline.cache import cache_dir
from .recipes import DEFAULT_BACKBONE, TASKS, TrainConfig, heads_config
from .training import train


def series_tasks(seed: int = 0) -> list[Task]:
    """Task A (TREC-6 question type) and Task B (movie-sentence sentiment), with their fixed splits."""
    return [load_task(name, seed=seed) for name in TASKS]


def build_model(backbone: str = DEFAULT_BACKBONE, tasks: list[Task] | None = None, head: str = "linear",
                seed: int = 0, device: str = "cpu") -> MultiTaskModel:
    """A MultiTaskModel with a fresh head per task on a pre-trained backbone."""
    tasks = tasks or series_tasks()
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must differ (one head per task), got {names}")
    return MultiTaskModel(load_backbone(backbone, device=device), {t.name: t.label_names for t in tasks},
                          head=head, seed=seed, backbone_name=backbone).to(device)


def checkpoint_folder(backbone: str = DEFAULT_BACKBONE) -> Path:
    """Where the jointly trained multi-task checkpoint of a backbone lives (in the cache folder)."""
    return cache_dir("checkpoints") / f"multitask-heads-{backbone}"


def train_multitask_heads(backbone: str = DEFAULT_BACKBONE, tasks: list[Task] | None = None, progress: bool = True):
    """Notebook 02's recipe: both heads trained jointly on the frozen backbone; returns (model, history)."""
    tasks = tasks or series_tasks()
    model = freezing.freeze_backbone(build_model(backbone, tasks))
    history = train(model, tasks, heads_config(progress=progress))
    return model, history


def multitask_checkpoint(backbone: str = DEFAULT_BACKBONE, progress: bool = True) -> MultiTaskModel:
    """The trained multi-task model of notebook 02: loaded if saved, else trained (cheaply) and saved first."""
    folder = checkpoint_folder(backbone)
    try:
        return load_checkpoint(folder)
    except ValueError:  # missing or incomplete: make it
        model, _ = train_multitask_heads(backbone, progress=progress)
        save_checkpoint(model, folder)
        return load_checkpoint(folder)


def seed_runs(make_model: Callable[[int], MultiTaskModel], tasks: Sequence[Task], config: TrainConfig,
              seeds: Sequence[int]) -> tuple[pd.DataFrame, dict[int, MultiTaskModel]]:
    """The same recipe once per seed (the heads' start and the batches drawn from it): per seed and task, the
    kept epoch's validation accuracy and the test accuracy (read once per model); and the trained models."""
    rows, models = [], {}
    for seed in seeds:
        model = make_model(seed)
        history = train(model, tasks, config.but(seed=seed, progress=False))
        best = history[history.best].set_index("task")["val_accuracy"]
        rows += [{"seed": seed, "task": t.name, "val": best[t.name], "test": evaluate(model, t, "test")["accuracy"],
                  "seconds": float(history.drop_duplicates("epoch")["seconds"].sum())} for t in tasks]
        models[seed] = model
    return pd.DataFrame(rows), models
