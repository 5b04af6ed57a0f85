"""Staged unfreezing: gradual unfreezing (ULMFiT), one more top layer each stage, each stage undone if it hurts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import pandas as pd

from . import freezing
from .data import Task
from .model import MultiTaskModel
from .recipes import TrainConfig
from .training import train


def gradual_unfreezing(model: MultiTaskModel, tasks: Sequence[Task], config: TrainConfig, stages: int) -> pd.DataFrame:
    """Stage j (1..`stages`) trains the heads and the top j layers for one epoch, with its own warm-up and decay.

    Each stage starts from the epoch the stage before kept and keeps its own best epoch on validation (its
    start if it did not beat it). The history has a `stage` column, epochs numbered across stages, and in
    `attrs["kept_stages"]` the stages whose epoch was kept.
    """
    histories, kept = [], []
    for stage in range(1, stages + 1):
        freezing.unfreeze_last(model, stage)
        history = train(model, tasks, replace(config, epochs=1))
        if history.attrs["best_epoch"] > 0:
            kept.append(stage)
        histories.append(history.assign(stage=stage, epoch=history.epoch + stage - 1))
    table = pd.concat(histories, ignore_index=True)
    table.attrs.update(kept_stages=kept, best_epoch=max(kept, default=0))
    return table
