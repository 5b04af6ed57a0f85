"""Drift: the domain classifier and the remedy (a frozen head retrained on today's labels), on the tiny backbone."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch

from mtl_utils import freezing
from mtl_utils.shift import domain_classifier_accuracy, retrain_head

TASK_ROWS = 120


def test_the_domain_classifier_tells_moved_data_apart_and_not_two_halves_of_one_source():
    rng = np.random.default_rng(0)
    last_year = rng.normal(size=(400, 8))
    assert domain_classifier_accuracy(last_year[:200], last_year[200:]) < 0.6
    assert domain_classifier_accuracy(last_year[:200], last_year[200:] + 1.5) > 0.9


def test_retraining_the_head_touches_only_that_head_and_never_the_test_sentences(model, tasks):
    topic, mood = tasks
    freezing.freeze_backbone(model)
    today = dataclasses.replace(mood, name="today")  # another source with the same labels
    backbone = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    other_head = {n: p.detach().clone() for n, p in model.head("topic").named_parameters()}
    made = []
    runs = retrain_head(lambda: made.append(copy.deepcopy(model)) or made[-1], "mood", today, sizes=[40, 80], seeds=[0, 1])
    assert len(runs) == 4 and set(runs["labelled"]) == {40, 80} and set(runs["data"]) == {"today"}
    assert runs["val"].between(0, 1).all() and runs["test"].between(0, 1).all() and runs["kept epoch"].ge(0).all()
    assert len(made) == 4  # a fresh start per run
    for trained in made:
        assert all(torch.equal(p, backbone[n]) for n, p in trained.backbone.named_parameters())
        assert all(torch.equal(p, other_head[n]) for n, p in trained.head("topic").named_parameters())
    assert any(not torch.equal(m.head("mood").weight, model.head("mood").weight) for m in made)  # the head trained

