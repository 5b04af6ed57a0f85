"""Checkpoints: safetensors + JSON, written atomically, read back exactly, refused on the wrong backbone or tasks."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from sentence_transformers import SentenceTransformer

from mtl_utils import freezing, training
from mtl_utils.checkpoint import load_checkpoint, load_into, save_checkpoint
from mtl_utils.model import MultiTaskModel
from mtl_utils.recipes import TrainConfig

from helpers import synthetic_task


@pytest.fixture
def tasks():
    return [synthetic_task("topic", ["what", "who", "where"]), synthetic_task("mood", ["good", "bad"], seed=1)]


@pytest.fixture
def model(tiny_backbone, tasks):
    return MultiTaskModel(tiny_backbone, {t.name: t.label_names for t in tasks}, backbone_name="tiny")


def test_checkpoint_round_trip(model, tasks, tiny_backbone_dir, tmp_path):
    freezing.unfreeze_last(freezing.freeze_backbone(model), 1)
    training.train(model, tasks, TrainConfig(epochs=1, backbone_lr=1e-3, progress=False))
    texts = tasks[0].test["text"].tolist()
    expected = model.predict(texts)
    folder = save_checkpoint(model, tmp_path / "ckpt")
    assert json.loads((folder / "config.json").read_text())["tasks"]["mood"] == ["bad", "good"]
    fresh = load_checkpoint(folder, backbone=SentenceTransformer(str(tiny_backbone_dir), device="cpu"))
    pd.testing.assert_frame_equal(fresh.predict(texts), expected)

    # another backbone, other tasks, or a damaged folder are refused
    other = SentenceTransformer(str(tiny_backbone_dir), device="cpu")
    with torch.no_grad():
        other[0].auto_model.embeddings.word_embeddings.weight.mul_(1.01)
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        load_checkpoint(folder, backbone=other)
    single = MultiTaskModel(SentenceTransformer(str(tiny_backbone_dir)), {"mood": ("bad", "good")}, backbone_name="tiny")
    with pytest.raises(ValueError, match="checkpoint tasks"):
        load_into(single, folder)
    (folder / "weights.safetensors").write_bytes(b"partial")
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        load_checkpoint(folder, backbone=other)
