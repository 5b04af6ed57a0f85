"""LoRA adapters on the backbone (peft), on the tiny test backbone."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from sentence_transformers import SentenceTransformer

from mtl_utils import backbone as bb
from mtl_utils import features, freezing, training
from mtl_utils.checkpoint import CheckpointError, read_config
from mtl_utils.lora import add_lora, backbone_weights, has_lora, lora_parameters
from mtl_utils.model import MultiTaskModel
from mtl_utils.offline.cache import fingerprint
from mtl_utils.recipes import TrainConfig

TASK_ROWS = 90  # the tasks fixture (conftest.py): smaller tasks, quicker training
TEXTS = ["what a movie", "who was the actor in this long film about a story", "good", "a rather quiet plot",
         "where is the scene", "bad story", "the film was quite good", "who is very bad"]


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
    assert bb.frozen_depth(model.backbone) == 3  # embeddings and layers 0, 1: the prefix cache covers them
    source = features.sentence_source(model, TEXTS, progress=False)
    assert isinstance(source, features.CachedPrefix) and source.frozen_layers == 2


# --- LoRA checkpoints -------------------------------------------------------------------------------------

def _move_adapters(model, seed: int = 0) -> None:
    """Give the adapters values of their own (B starts at zero: untrained adapters change nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora_parameters(model).items():
            p.copy_(torch.randn(p.shape, generator=generator) * (0.5 if "lora_B" in name else 1.0))


def test_lora_checkpoint_loads_back_exactly_with_its_settings(model, tiny_backbone_dir, tmp_path):
    freezing.freeze_backbone(model)
    add_lora(model, r=4, alpha=8, dropout=0.05, top_layers=2)
    _move_adapters(model)
    query = bb.layers(model.backbone)[2].attention.self.query
    with torch.no_grad():
        query.base_layer.bias.add_(0.1)  # a pre-trained weight under an adapter, changed too
    model.tuned_backbone |= set(lora_parameters(model))  # as train() records them
    expected = model.predict(TEXTS)
    folder = model.save(tmp_path / "lora")
    config = read_config(folder)
    assert config["lora"] == {"r": 4, "alpha": 8, "dropout": 0.05, "target_modules": ["query", "value"],
                              "top_layers": 2}
    # stored under the name it has without adapters, so it loads onto any copy of the backbone
    (name,) = [n for n, p in backbone_weights(model.backbone).items() if p is query.base_layer.bias]
    assert config["tuned_backbone"] == [name] and name.endswith("layer.2.attention.self.query.bias")

    fresh = MultiTaskModel.load(folder, backbone=SentenceTransformer(str(tiny_backbone_dir), device="cpu"))
    pd.testing.assert_frame_equal(fresh.predict(TEXTS), expected)
    assert torch.equal(fresh.embed(TEXTS), model.embed(TEXTS))  # the same computation: bit for bit
    assert fresh.lora == config["lora"]
    assert set(lora_parameters(fresh)) == set(lora_parameters(model))
    assert {id(p) for p in freezing.trainable_parameters(fresh)} >= {id(p) for p in lora_parameters(fresh).values()}


def test_a_lora_checkpoint_refuses_adapters_of_another_rank_or_alpha(model, tasks, tiny_backbone_dir, tmp_path):
    add_lora(model, r=4, alpha=8)
    _move_adapters(model)
    folder = model.save(tmp_path / "lora")
    labels = {t.name: t.label_names for t in tasks}

    def fresh_model():
        return MultiTaskModel(SentenceTransformer(str(tiny_backbone_dir), device="cpu"), labels, backbone_name="tiny")

    for r, alpha in ((4, 16), (8, 8)):
        other = add_lora(fresh_model(), r=r, alpha=alpha)
        with pytest.raises(CheckpointError, match=f"LoRA adapters .*'r': {r}, 'alpha': {alpha}.* differ from the "
                                                  f"checkpoint's .*'r': 4, 'alpha': 8"):
            other.load_weights(folder)
    plain = fresh_model().load_weights(folder)  # a model without adapters gets the checkpoint's
    assert plain.lora["alpha"] == 8
    pd.testing.assert_frame_equal(plain.predict(TEXTS), model.predict(TEXTS))

    fresh_model().save(tmp_path / "plain")
    with pytest.raises(CheckpointError, match="LoRA adapters .* differ from the checkpoint's \\(None\\)"):
        add_lora(fresh_model()).load_weights(tmp_path / "plain")


def test_adapters_add_lora_cannot_make_again_are_not_saved(model, tmp_path):
    add_lora(model, r=4, alpha=8)
    first = next(m for m in model.backbone.modules() if hasattr(m, "lora_alpha"))
    first.lora_alpha["default"] = 32  # one layer changed by hand: no add_lora call makes this
    first.scaling["default"] = 32 / 4
    with pytest.raises(ValueError, match="not what add_lora made with .*cannot be saved"):
        model.save(tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


def test_the_model_keeps_the_settings_add_lora_was_given(model):
    assert model.lora is None
    add_lora(model, r=2, alpha=3, dropout=0.0, target_modules=("query", "key", "value"), top_layers=3)
    assert model.lora == {"r": 2, "alpha": 3, "dropout": 0.0, "target_modules": ["key", "query", "value"],
                                    "top_layers": 3}  # exactly what add_lora was given
