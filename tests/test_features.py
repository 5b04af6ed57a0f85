"""The feature sources' storage: packed rows, padding, modes restored, the embeddings module left unrun."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtl_utils import features, freezing
from mtl_utils.model import MultiTaskModel


@pytest.fixture
def model(tiny_backbone):
    return MultiTaskModel(tiny_backbone, {"topic": ("a", "b")}, backbone_name="tiny")


TEXTS = ["what a movie", "who was the actor in this long film about a story", "good", "a rather quiet plot"]


def test_packed_pads_like_a_loop_of_copies():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 9, 20)
    rows = [torch.randn(n, 3) for n in lengths]
    packed = features.Packed(torch.cat(rows), lengths)
    idx = [7, 0, 19, 3, 3]
    padded, mask = packed.pad(idx, fill=-1.0)
    assert padded.shape == (5, lengths[idx].max(), 3)
    for row, i in enumerate(idx):
        torch.testing.assert_close(padded[row, : lengths[i]], rows[i], rtol=0, atol=0)
        assert (padded[row, lengths[i]:] == -1).all()
        assert mask[row].sum() == lengths[i]
    torch.testing.assert_close(packed.row(19), rows[19], rtol=0, atol=0)
    ids = features.Packed(torch.arange(6), np.array([2, 1, 3]))
    assert ids.pad([2, 1], fill=9)[0].tolist() == [[3, 4, 5], [2, 9, 9]]


def test_batch_features_match_the_tokenizer(model):
    source = features.FullForward(model, TEXTS)
    expected = model.backbone.preprocess([TEXTS[i] for i in (1, 2, 0)])
    batch = source.batch_features([1, 2, 0])
    assert batch.keys() == {k for k, v in expected.items() if isinstance(v, torch.Tensor)}
    for key, value in batch.items():
        assert torch.equal(value, expected[key]), key
    assert source.lengths[[1, 2, 0]].tolist() == expected["attention_mask"].sum(1).tolist()


def test_building_a_cache_keeps_frozen_parts_in_eval_mode(model):
    freezing.freeze(model, "backbone")
    freezing.unfreeze_last_layers(model, 1)
    model.train()
    modes = {name: m.training for name, m in model.named_modules()}
    layers = model.backbone[0].auto_model.encoder.layer
    assert not layers[0].training and layers[-1].training  # frozen: eval mode (dropout off); training: train
    features.sentence_source(model, TEXTS, progress=False)  # computes in eval mode
    assert {name: m.training for name, m in model.named_modules()} == modes


def test_prefix_cache_skips_the_embeddings_and_restores_the_backbone(model):
    freezing.freeze(model, "backbone")
    freezing.unfreeze_last_layers(model, 1)
    source = features.sentence_source(model, TEXTS, progress=False)
    assert isinstance(source, features.CachedPrefix)
    auto = model.backbone[0].auto_model
    calls = []
    auto.embeddings.register_forward_pre_hook(lambda *a: calls.append("embeddings"))
    layers = auto.encoder.layer
    source([0, 1])
    assert calls == ["embeddings"]  # hooks still fire, but the module's own forward did not run
    assert auto.encoder.layer is layers and "forward" not in vars(auto.embeddings)
    model.sentence_embeddings(model.features(["good"]))  # a normal pass runs the whole backbone again
    assert calls == ["embeddings", "embeddings"]
