"""Which layers moved: linear CKA between layer-by-layer representations, on the tiny test backbone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtl_utils import freezing, training
from mtl_utils.similarity import layer_cka, layer_representations, linear_cka
from mtl_utils.recipes import TrainConfig

TASK_ROWS = 90  # the tasks fixture (conftest.py): smaller tasks, quicker training
TEXTS = ["what a movie", "who was the actor in this long film about a story", "good", "a rather quiet plot",
         "where is the scene", "bad story", "the film was quite good", "who is very bad"]


def test_linear_cka_invariances_and_errors():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 16))
    assert linear_cka(x, x) == 1.0
    rotation, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    assert linear_cka(x, 3.0 * x @ rotation + 5.0) == pytest.approx(1.0, abs=1e-10)  # rotation, scale, shift
    assert linear_cka(x, rng.normal(size=(200, 16))) < 0.2  # unrelated representations
    stretched = x * np.r_[np.ones(8), 10 * np.ones(8)]  # not an isotropic scaling: CKA drops
    assert linear_cka(x, stretched) < 0.99
    with pytest.raises(ValueError, match="same n"):
        linear_cka(x, x[:10])
    with pytest.raises(ValueError, match="constant"):
        linear_cka(np.ones((5, 3)), x[:5])


def test_layer_representations_end_in_the_sentence_embedding(model):
    reps = layer_representations(model.backbone, TEXTS, batch_size=3)
    assert len(reps) == freezing.num_layers(model) + 1  # embeddings output, then each layer
    assert all(r.shape == (len(TEXTS), 32) for r in reps)
    # the last layer, mean-pooled and normalised, is the backbone's own sentence embedding (in input order)
    torch.testing.assert_close(torch.nn.functional.normalize(reps[-1], dim=-1),
                               model.backbone.encode(TEXTS, convert_to_tensor=True), atol=1e-5, rtol=1e-5)


def test_frozen_layers_do_not_move_and_the_trained_one_does(model, tasks):
    before = layer_representations(model.backbone, TEXTS)
    freezing.unfreeze_last(freezing.freeze_backbone(model), 1)
    training.train(model, tasks, TrainConfig(epochs=2, backbone_lr=1e-2, head_lr=1e-2, progress=False,
                                             evaluate_first=False))
    cka = layer_cka(before, layer_representations(model.backbone, TEXTS))
    assert cka[:-1] == [1.0] * (len(cka) - 1)  # embeddings and the frozen layers: exactly unchanged
    assert cka[-1] < 1.0
    with pytest.raises(ValueError, match="stages"):
        layer_cka(before, before[:-1])
