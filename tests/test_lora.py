"""LoRA adapters on the backbone (peft), on the tiny test backbone."""

from __future__ import annotations

import pytest
import torch

from mtl_utils import features, freezing, training
from mtl_utils.model import MultiTaskModel
from mtl_utils.lora import add_lora, has_lora, lora_parameters
from mtl_utils.offline.cache import fingerprint
from mtl_utils.recipes import TrainConfig

from helpers import synthetic_task

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


def test_lora_trains_only_adapters_and_heads(model):
    freezing.freeze_backbone(model)
    before = model.embed(TEXTS)
    add_lora(model, r=4)
    assert has_lora(model)
    adapters = lora_parameters(model)
    assert len(adapters) == 3 * 2 * 2  # 3 layers x (query, value) x (A, B)
    trainable = {id(p) for p in freezing.trainable_parameters(model)}
    assert trainable == {id(p) for p in adapters.values()} | {id(p) for p in model.heads.parameters()}
    groups = training.optimizer_groups(model, TrainConfig())
    assert {id(p) for g in groups for p in g["params"]} == trainable
    torch.testing.assert_close(model.embed(TEXTS), before, rtol=0, atol=1e-6)  # B starts at zero: same outputs
    summary = freezing.trainable_summary(model)
    assert set(summary.loc[summary.part.str.startswith("layer"), "trains"]) == {"partly"}


def test_lora_model_runs_the_backbone_not_a_stale_cache(model, tasks):
    freezing.freeze_backbone(model)
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
        # the cache holds the embeddings block's output in fp16: 8e-5 apart at most (measured)
        torch.testing.assert_close(source(idx), full, atol=3e-4, rtol=0)
        assert not torch.allclose(source(idx), pretrained, atol=1e-3)  # not the pre-trained embeddings


def test_lora_gets_gradients_and_base_weights_stay(model, tasks):
    freezing.freeze_backbone(model)
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
    training.train(model, tasks, TrainConfig(epochs=2, backbone_lr=1e-2, head_lr=1e-2, progress=False,
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


def test_lora_on_the_top_layers_leaves_the_rest_frozen_and_cacheable(model):
    freezing.freeze_backbone(model)
    for bad in (0, 4, True):
        with pytest.raises(ValueError, match="from 1 to 3"):
            add_lora(model, top_layers=bad)
    add_lora(model, r=4, top_layers=1)
    adapters = lora_parameters(model)
    assert len(adapters) == 1 * 2 * 2 and all(".layer.2." in n for n in adapters)
    assert freezing.frozen_prefix_depth(model) == 3  # embeddings and layers 0, 1: the prefix cache covers them
    source = features.sentence_source(model, TEXTS, progress=False)
    assert isinstance(source, features.CachedPrefix) and source.frozen_layers == 2
