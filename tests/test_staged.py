"""Gradual unfreezing and the seed runs, on the tiny test backbone."""

from __future__ import annotations

import pytest

from mtl_utils import freezing
from mtl_utils.model import MultiTaskModel
from mtl_utils.recipes import TrainConfig
from mtl_utils.series import seed_runs
from mtl_utils.staged import gradual_unfreezing

from helpers import synthetic_task


@pytest.fixture
def tasks():
    return [synthetic_task("topic", ["what", "who", "where"], n=90), synthetic_task("mood", ["good", "bad"], n=90, seed=1)]


def test_gradual_unfreezing_adds_one_layer_per_stage(tiny_backbone, tasks):
    model = freezing.freeze_backbone(MultiTaskModel(tiny_backbone, {t.name: t.label_names for t in tasks}))
    history = gradual_unfreezing(model, tasks, TrainConfig(head_lr=0.05, backbone_lr=3e-3, progress=False), stages=2)
    assert sorted(history.stage.unique()) == [1, 2] and history.epoch.max() == 2
    assert freezing.frozen_prefix_depth(model) == 2  # embeddings and layer 0 still frozen after two stages
    assert set(history.attrs["kept_stages"]) <= {1, 2} and history.attrs["best_epoch"] == max(
        history.attrs["kept_stages"], default=0)


def test_seed_runs_train_one_model_per_seed(tiny_backbone_dir, tasks):
    from sentence_transformers import SentenceTransformer

    def make(seed):
        backbone = SentenceTransformer(str(tiny_backbone_dir), device="cpu")
        return freezing.freeze_backbone(MultiTaskModel(backbone, {t.name: t.label_names for t in tasks}, seed=seed))

    table, models = seed_runs(make, tasks, TrainConfig(epochs=2, head_lr=0.05), [0, 1])
    assert list(table.seed) == [0, 0, 1, 1] and set(table.task) == {"topic", "mood"} and set(models) == {0, 1}
    assert table.val.between(0, 1).all() and table.test.between(0, 1).all()
    again, _ = seed_runs(make, tasks, TrainConfig(epochs=2, head_lr=0.05), [0])
    assert again.drop(columns="seconds").equals(table[table.seed == 0].drop(columns="seconds").reset_index(drop=True))
