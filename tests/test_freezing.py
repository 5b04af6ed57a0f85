"""Freezing: what trains after each call, and frozen parts in eval mode by construction."""

from __future__ import annotations

import pytest
import torch

from mtl_utils import backbone as bb
from mtl_utils import freezing
from mtl_utils.model import MultiTaskModel


@pytest.fixture
def model(tiny_backbone):
    return MultiTaskModel(tiny_backbone, {"topic": ("what", "who", "where"), "mood": ("bad", "good")},
                          backbone_name="tiny")


def trains(modules) -> set[bool]:
    return {p.requires_grad for m in modules for p in m.parameters()}


@pytest.mark.parametrize("apply, backbone_trains, heads_train", [
    (freezing.freeze_all, False, False),
    (freezing.freeze_backbone, False, True),
    (freezing.unfreeze_all, True, True),
])
def test_scenarios(model, apply, backbone_trains, heads_train):
    apply(model)
    layers = bb.layers(model.backbone)
    assert trains([layers]) == {backbone_trains} and trains([model.heads]) == {heads_train}
    assert trains(bb.unused_modules(model.backbone)) == {False}  # the pooler never trains
    model.train()
    # frozen means eval mode too: dropout is off in every frozen part, and on where something trains
    assert all(not m.training for m in layers.modules()) != backbone_trains
    assert all(m.training for m in model.heads.modules()) == heads_train


def test_freeze_by_name_is_the_same_and_refuses_unknown_names(model):
    freezing.freeze(model, "backbone")
    assert freezing.backbone_frozen(model) and trains([model.heads]) == {True}
    with pytest.raises(ValueError, match="'everything'.*'backbone'.*'nothing'"):
        freezing.freeze(model, "heads")


def test_unfreeze_last_sets_how_many_top_layers_train(model):
    freezing.unfreeze_last(freezing.freeze_backbone(model), 1)
    table = freezing.trainable_summary(model)
    assert list(table.loc[table.group == "backbone", "trains"])[:4] == ["no", "no", "no", "yes"]
    freezing.unfreeze_last(model, 3)
    freezing.unfreeze_last(model, 2)  # sets the boundary (like fastai's freeze_to): two layers, not three
    table = freezing.trainable_summary(model)
    assert list(table.loc[table.group == "backbone", "trains"])[:4] == ["no", "no", "yes", "yes"]
    assert bb.frozen_depth(model.backbone) == 2  # embeddings + layer 0
    total = table[table.group == "total"].iloc[0]
    assert total["parameters"] == sum(p.numel() for p in model.parameters())
    assert total["trainable parameters"] == freezing.count_trainable(model)
    model.train()
    layers = bb.layers(model.backbone)
    assert [layer.training for layer in layers] == [False, True, True]
    assert not bb.embeddings(model.backbone).training
    freezing.unfreeze_last(model, 0, embeddings=True)
    assert bb.frozen_depth(model.backbone) == 0 and bb.embeddings(model.backbone).training
    assert trains(bb.layers(model.backbone)) == {False} and trains([model.heads]) == {True}  # heads as they were
    freezing.unfreeze_all(model)
    freezing.unfreeze_last(model, 1)  # from everything training: the rest of the backbone is frozen
    assert trains(bb.layers(model.backbone)[:2]) == {False} and trains(bb.layers(model.backbone)[2:]) == {True}
    assert not bb.embeddings(model.backbone).training or not model.training
    with pytest.raises(ValueError, match="from 0 to 3 .*has 3 transformer layers.*got 4"):
        freezing.unfreeze_last(model, 4)


def test_freeze_one_head(model):
    freezing.unfreeze_last(freezing.freeze_backbone(model), 2)
    freezing.freeze_head(model, "topic")
    assert trains([model.heads["topic"]]) == {False} and trains([model.heads["mood"]]) == {True}
    assert trains(bb.layers(model.backbone)[1:]) == {True} and trains([bb.embeddings(model.backbone)]) == {False}
    assert not model.heads["topic"].training or not model.training
    model.train()
    assert not model.heads["topic"].training and model.heads["mood"].training
    with pytest.raises(ValueError, match="heads are: topic, mood"):
        freezing.freeze_head(model, "sentiment")


def test_modes_follow_flags_set_by_hand_at_the_next_train(model):
    freezing.unfreeze_all(model).train()
    bb.layers(model.backbone)[0].requires_grad_(False)  # outside the API: the next train() still catches it
    model.train()
    assert not bb.layers(model.backbone)[0].training and bb.layers(model.backbone)[1].training


def test_count_and_parameters_are_what_an_optimizer_sees(model):
    freezing.freeze_backbone(model)
    assert freezing.count_trainable(model) == sum(p.numel() for p in model.heads.parameters())
    assert {id(p) for p in freezing.trainable_parameters(model)} == {id(p) for p in model.heads.parameters()}
    freezing.freeze_all(model)
    assert freezing.trainable_parameters(model) == [] and freezing.count_trainable(model) == 0
    with pytest.raises(ValueError, match="empty parameter list"):
        torch.optim.AdamW(freezing.trainable_parameters(model))
