"""The series' shared starting points: the two tasks, the model on a backbone, and the trained multi-task checkpoint."""

from __future__ import annotations

from pathlib import Path

from . import freezing
from .backbones import load_backbone
from .cache import cache_dir
from .checkpoint import load_checkpoint, save_checkpoint
from .data import Task, load_task
from .model import MultiTaskModel
from .training import TrainConfig, train

TASKS = ("trec", "movies")  # Task A: question type; Task B: sentiment


def series_tasks(seed: int = 0) -> list[Task]:
    """Task A (TREC-6 question type) and Task B (movie-sentence sentiment), with their fixed splits."""
    return [load_task(name, seed=seed) for name in TASKS]


def build_model(backbone: str = "all-MiniLM-L6-v2", tasks: list[Task] | None = None, head: str = "linear",
                seed: int = 0, device: str = "cpu") -> MultiTaskModel:
    """A MultiTaskModel with a fresh head per task on a pre-trained backbone."""
    tasks = tasks or series_tasks()
    return MultiTaskModel(load_backbone(backbone, device=device), {t.name: t.label_names for t in tasks},
                          head=head, seed=seed, backbone_name=backbone).to(device)


def heads_config(**overrides) -> TrainConfig:
    """How the series trains heads on a frozen backbone: 20 epochs, AdamW at 1e-2, batches of 32."""
    return TrainConfig(**{"epochs": 20, "head_lr": 1e-2, "batch_size": 32, **overrides})


def checkpoint_folder(backbone: str = "all-MiniLM-L6-v2") -> Path:
    """Where the jointly trained multi-task checkpoint of a backbone lives (in the cache folder)."""
    return cache_dir("checkpoints") / f"multitask-heads-{backbone}"


def train_multitask_heads(backbone: str = "all-MiniLM-L6-v2", tasks: list[Task] | None = None,
                          progress: bool = True):
    """Notebook 02's recipe: both heads trained jointly on the frozen backbone; returns (model, history)."""
    tasks = tasks or series_tasks()
    model = freezing.freeze(build_model(backbone, tasks), "backbone")
    history = train(model, tasks, heads_config(progress=progress))
    return model, history


def multitask_checkpoint(backbone: str = "all-MiniLM-L6-v2", progress: bool = True) -> MultiTaskModel:
    """The trained multi-task model of notebook 02: loaded if saved, else trained (cheaply) and saved first."""
    folder = checkpoint_folder(backbone)
    try:
        return load_checkpoint(folder)
    except ValueError:  # missing or incomplete: make it
        model, _ = train_multitask_heads(backbone, progress=progress)
        save_checkpoint(model, folder)
        return load_checkpoint(folder)
