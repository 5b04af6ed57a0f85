"""The series' recipes: every training default and every accepted option name, in one place.

Nothing here imports torch, so `python -m mtl_utils.cli --help` answers at once; the library, the notebooks
and the command line all take their defaults from this module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

_HUTTO = "label = sign of the mean human rating (Hutto & Gilbert 2014), rows rated exactly 0 dropped; stratified 80/10/10"
DATASETS: dict[str, str] = {
    "trec": "Task A: TREC-6 coarse question type (Li & Roth 2002); official train/test, val = stratified 10% of train",
    "movies": f"Task B: Rotten Tomatoes movie-review sentences, {_HUTTO}",
    "amazon": f"Amazon product-review snippets (domain shift for Task B), {_HUTTO}",
    "nyt": f"New York Times editorial snippets (domain shift for Task B), {_HUTTO}",
    "tweets": f"Tweets (domain shift for Task B), {_HUTTO}",
}
TASKS = ("trec", "movies")  # Task A: question type; Task B: sentiment
DEFAULT_BACKBONE = "all-MiniLM-L6-v2"
HEAD_KINDS = ("linear", "mlp")
FREEZE_SCENARIOS = {
    "everything": "the whole network is frozen: backbone and every head (inference only)",
    "backbone": "only the backbone is frozen: every head trains on fixed sentence embeddings",
    "nothing": "nothing is frozen: backbone and heads all train",
}
SAMPLINGS = ("round_robin", "proportional", "temperature")
SCHEDULES = ("linear", "cosine", "constant")
METRICS = ("accuracy", "f1_macro")
SELECTIONS = {
    "mean": "the epoch with the best mean validation score (over select_on) is kept",
    "no_task_worse": "as mean, but an epoch in which any task's validation accuracy falls below epoch 0's by more "
                     "than that task's noise (evaluation.select's rule) is never kept",
}
MIXED_PRECISIONS = ("no", "bf16", "fp16")  # autocast per training step; fp16 needs a GPU
CLASS_WEIGHTS = ("balanced",)  # sklearn's compute_class_weight: n_samples / (n_classes * count of each class)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that shapes a training run. The defaults are the heads recipe: a frozen backbone, trained heads."""

    epochs: int = 20
    batch_size: int = 32  # examples per step, over all processes together
    head_lr: float = 1e-2
    backbone_lr: float = 2e-4  # the rate of the top transformer layer, when layers train
    layer_lr_decay: float = 1.0  # each layer further down multiplies the rate by this (BERT studies: about 0.95)
    weight_decay: float = 0.01
    warmup: float = 0.1  # fraction of all steps spent warming the rates up
    schedule: str = "linear"
    max_grad_norm: float | None = 1.0
    sampling: str = "proportional"  # which task each step trains
    temperature: float = 2.0  # with sampling="temperature": task sizes are raised to 1/temperature
    train_tasks: Sequence[str] | None = None  # tasks that get batches; default: all given
    select_on: Sequence[str] | None = None  # tasks whose mean validation score picks the best epoch
    metric: str = "accuracy"
    selection: str = "mean"  # which epoch is kept: see SELECTIONS
    class_weights: str | None = None  # "balanced": the loss weighs each class inversely to its training count
    patience: int | None = None  # stop after this many epochs without a better validation score
    evaluate_first: bool = True  # evaluate once before training (epoch 0), so an epoch that hurts is undone
    group_by_length: bool = True  # batches of similar lengths: less padding
    use_cache: bool = True  # the embedding or frozen-prefix cache instead of the whole backbone on every batch
    prefix_layers: int | None = None  # frozen layers the prefix cache stores (default all): fewer lets runs
    #                                   that unfreeze different numbers of top layers share one cache
    eval_batch_size: int = 128
    mixed_precision: str = "no"  # "bf16": each step's forward in bf16 autocast (weights and optimizer stay fp32)
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name, value, known in (("sampling", self.sampling, SAMPLINGS), ("schedule", self.schedule, SCHEDULES),
                                   ("metric", self.metric, METRICS), ("selection", self.selection, SELECTIONS),
                                   ("mixed_precision", self.mixed_precision, MIXED_PRECISIONS)):
            if value not in known:
                raise ValueError(f"unknown {name} {value!r}; known: {', '.join(known)}")
        if self.class_weights is not None and self.class_weights not in CLASS_WEIGHTS:
            raise ValueError(f"unknown class_weights {self.class_weights!r}; known: None, {', '.join(CLASS_WEIGHTS)}")
        if self.selection == "no_task_worse" and not self.evaluate_first:
            raise ValueError("selection='no_task_worse' compares every epoch with epoch 0: it needs evaluate_first=True")
        for name in ("train_tasks", "select_on"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, str) or not isinstance(value, Sequence) or not value
                                      or not all(isinstance(t, str) for t in value)):
                raise ValueError(f"{name} must be None or a non-empty list of task names, got {value!r}"
                                 + (f"; use [{value!r}]" if isinstance(value, str) else ""))
        for name in ("epochs", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer of at least 1, got {value!r}")
        for name in ("head_lr", "backbone_lr", "weight_decay"):
            _check_number(name, getattr(self, name), minimum=0.0)
        _check_number("layer_lr_decay", self.layer_lr_decay, minimum=0.0, strict=True)
        _check_number("temperature", self.temperature, minimum=0.0, strict=True)
        _check_number("warmup", self.warmup, minimum=0.0)
        if self.warmup >= 1:
            raise ValueError(f"warmup is a fraction of all steps, from 0 up to (not including) 1; got {self.warmup}")
        if self.max_grad_norm is not None:
            _check_number("max_grad_norm", self.max_grad_norm, minimum=0.0, strict=True)
        if self.prefix_layers is not None and (not isinstance(self.prefix_layers, int) or self.prefix_layers < 0):
            raise ValueError(f"prefix_layers must be None or an integer of at least 0, got {self.prefix_layers!r}")
        if self.patience is not None and (not isinstance(self.patience, int) or self.patience < 1):
            raise ValueError(f"patience must be None or an integer of at least 1, got {self.patience!r}")


def _check_number(name: str, value: float, minimum: float, strict: bool = False) -> None:
    """A finite number at or above `minimum` (strictly above it with `strict`)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < minimum or (strict and value == minimum):
        bound = f"{'above' if strict else 'at least'} {minimum:g}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def finetune_config(**changes) -> TrainConfig:
    """The top layers of the backbone train too, from trained heads: 2 epochs; heads at 1e-3, the top layer at
    2e-4 and each layer below at 0.95 times the rate of the layer above it."""
    return TrainConfig(**{"epochs": 2, "head_lr": 1e-3, "backbone_lr": 2e-4, "layer_lr_decay": 0.95, **changes})

