"""LoRA adapters on the backbone and linear CKA between layers, on the tiny test backbone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtl_utils import features, freezing, training
from mtl_utils.cache import fingerprint
from mtl_utils.lora import add_lora, has_lora, lora_parameters
from mtl_utils.model import MultiTaskModel
from mtl_utils.similarity import layer_cka, layer_representations, linear_cka

from test_core import synthetic_task

TEXTS = ["what a movie", "who was the actor in this long film about a story", "good", "a rather quiet plot",
         "where is the scene", "bad story", "the film was quite good", "who is very bad"]


@pytest.fixture
def tasks():
    return [synthetic_task("topic", ["what", "who", "where"], n=90), synthetic_task("mood", ["good", "bad"], n=90, seed=1)]


@pytest.fixture
def model(tiny_backbone, tasks):
    return MultiTaskModel(tiny_backbone, {t.name: t.label_names for t in tasks}, backbone_name="tiny")


def _base_weights(model):
    return fingerprint([(n, p) for n, p in model.backbone.named_parameters() if "lora_" not in n])


# --- linear CKA -------------------------------------------------------------------------------------------

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
    freezing.unfreeze_last_layers(freezing.freeze(model, "backbone"), 1)
    training.train(model, tasks, training.TrainConfig(epochs=2, backbone_lr=1e-2, head_lr=1e-2, progress=False,
                                                               evaluate_first=False))
    cka = layer_cka(before, layer_representations(model.backbone, TEXTS))
    assert cka[:-1] == [1.0] * (len(cka) - 1)  # embeddings and the frozen layers: exactly unchanged
    assert cka[-1] < 1.0
    with pytest.raises(ValueError, match="stages"):
        layer_cka(before, before[:-1])


# --- LoRA ---------------------------------------------------------------------------------------------------

def test_lora_trains_only_adapters_and_heads(model):
    freezing.freeze(model, "backbone")
    before = model.embed(TEXTS)
    add_lora(model, r=4)
    assert has_lora(model)
    adapters = lora_parameters(model)
    assert len(adapters) == 3 * 2 * 2  # 3 layers x (query, value) x (A, B)
    trainable = {id(p) for p in freezing.trainable_parameters(model)}
    assert trainable == {id(p) for p in adapters.values()} | {id(p) for p in model.heads.parameters()}
    groups = training.optimizer_groups(model, training.TrainConfig())
    assert {id(p) for g in groups for p in g["params"]} == trainable
    torch.testing.assert_close(model.embed(TEXTS), before, rtol=0, atol=1e-6)  # B starts at zero: same outputs
    summary = freezing.trainable_summary(model)
    assert set(summary.loc[summary.part.str.startswith("layer"), "trains"]) == {"partly"}


def test_lora_model_runs_the_backbone_not_a_stale_cache(model, tasks):
    freezing.freeze(model, "backbone")
    pretrained = model.embed(TEXTS)
    add_lora(model, r=4)
    assert not freezing.backbone_frozen(model)
    source = features.sentence_source(model, TEXTS, progress=False)
    assert not isinstance(source, features.CachedEmbeddings)
    with torch.no_grad():  # move the adapters: the source must see it, exactly as a full forward pass does
        for name, p in lora_parameters(model).items():
            if "lora_B" in name:
                p.normal_(0, 0.5)
        model.eval()
        idx = list(range(len(TEXTS)))
        full = features.FullForward(model, TEXTS)(idx)
        torch.testing.assert_close(source(idx), full, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(source(idx), pretrained, atol=1e-3)  # not the pre-trained embeddings


def test_lora_gets_gradients_and_base_weights_stay(model, tasks):
    freezing.freeze(model, "backbone")
    add_lora(model, r=4)
    base = _base_weights(model)
    before = model.embed(TEXTS)
    model.train()
    loss = model("topic", model.features(TEXTS[:4])).logsumexp(-1).mean()
    loss.backward()
    for name, p in lora_parameters(model).items():
        assert p.grad is not None, name
    assert all(p.grad.abs().sum() > 0 for n, p in lora_parameters(model).items() if "lora_B" in n)
    assert all(p.grad is None for n, p in model.backbone.named_parameters() if "lora_" not in n)
    model.zero_grad(set_to_none=True)
    training.train(model, tasks, training.TrainConfig(epochs=2, backbone_lr=1e-2, head_lr=1e-2, progress=False,
                                                               evaluate_first=False))
    assert _base_weights(model) == base  # the pre-trained weights are bit for bit the same
    assert any(p.abs().sum() > 0 for n, p in lora_parameters(model).items() if "lora_B" in n)
    assert not torch.allclose(model.embed(TEXTS), before, atol=1e-4)  # ... yet the sentence embeddings moved


def test_lora_bad_input(model):
    with pytest.raises(ValueError, match="positive integer"):
        add_lora(model, r=0)
    with pytest.raises(ValueError, match="not Linear layers"):
        add_lora(model, target_modules=("q_proj",))
    add_lora(model)
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model)
