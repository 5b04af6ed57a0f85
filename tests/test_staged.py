"""Gradual unfreezing and the seed runs, on the tiny test backbone."""

from __future__ import annotations

import pandas as pd

from mtl_utils import backbone as bb
from mtl_utils import freezing
from mtl_utils.model import MultiTaskModel
from mtl_utils.recipes import TrainConfig
from mtl_utils.series import seed_runs
from mtl_utils.staged import gradual_unfreezing

TASK_ROWS = 90  # the tasks fixture (conftest.py): smaller tasks, quicker training


def test_gradual_unfreezing_adds_one_layer_per_stage(tiny_backbone, tasks):
    model = freezing.freeze_backbone(MultiTaskModel(tiny_backbone, {t.name: t.label_names for t in tasks}))
    history = gradual_unfreezing(model, tasks, TrainConfig(head_lr=0.05, backbone_lr=3e-3, progress=False), stages=2)
    assert sorted(history.stage.unique()) == [1, 2] and history.epoch.max() == 2
    assert bb.frozen_depth(model.backbone) == 2  # embeddings and layer 0 still frozen after two stages
    assert set(history.attrs["kept_stages"]) <= {1, 2} and history.attrs["best_epoch"] == max(
        history.attrs["kept_stages"], default=0)


def test_seed_runs_train_one_model_per_seed(tiny_backbone_dir, tasks):
    from sentence_transformers import SentenceTransformer

    def make(seed):
        backbone = SentenceTransformer(str(tiny_backbone_dir), device="cpu")
        return freezing.freeze_backbone(MultiTaskModel(backbone, {t.name: t.label_names for t in tasks}, seed=seed))

    table = seed_runs(make, tasks, TrainConfig(epochs=2, head_lr=0.05), [0, 1])
    assert list(table.seed) == [0, 0, 1, 1] and set(table.task) == {"topic", "mood"}
    assert table.val.between(0, 1).all() and table.test.between(0, 1).all()
    assert table[table.seed == 0].test.tolist() != table[table.seed == 1].test.tolist() or \
        table[table.seed == 0].val.tolist() != table[table.seed == 1].val.tolist()  # another seed, another run
    # the same runs again are read from the cache: nothing trains
    import mtl_utils.series as series

    trained = []
    real_train = series.train
    series.train = lambda *a, **k: trained.append(1) or real_train(*a, **k)
    try:
        again = seed_runs(make, tasks, TrainConfig(epochs=2, head_lr=0.05), [0, 1])
        other = seed_runs(make, tasks, TrainConfig(epochs=3, head_lr=0.05), [0])  # another recipe: trains
        # the same weights and recipe with a top layer unfrozen is another run: trains
        unfrozen = seed_runs(lambda s: freezing.unfreeze_last(make(s), 1), tasks, TrainConfig(epochs=2, head_lr=0.05), [0])
    finally:
        series.train = real_train
    pd.testing.assert_frame_equal(again, table)
    assert trained == [1, 1] and len(other) == 2 and len(unfrozen) == 2
