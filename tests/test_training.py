"""The training loop: batches and task plans, what the optimizer sees, learning, reproducibility, stopping."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch

from mtl_utils import freezing, training
from mtl_utils.data import DataWarning, task_from_dataframe
from mtl_utils.evaluation import evaluate
from mtl_utils.model import MultiTaskModel
from mtl_utils.recipes import TrainConfig, finetune_config

from helpers import synthetic_task


def test_optimizer_sees_only_trainable_parameters_with_rates_by_depth(model):
    freezing.unfreeze_last(freezing.freeze_backbone(model), 1)
    config = TrainConfig(layer_lr_decay=0.5, backbone_lr=1e-4)
    groups = training.optimizer_groups(model, config)
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in model.parameters() if p.requires_grad}
    assert freezing.count_trainable(model) == sum(p.numel() for g in groups for p in g["params"])
    assert [g["name"] for g in groups] == ["head topic", "head mood", "layer 2"]
    freezing.unfreeze_last(model, 3, embeddings=True)
    lrs = {g["name"]: g["lr"] for g in training.optimizer_groups(model, config)}
    assert lrs["layer 2"] == pytest.approx(1e-4) and lrs["layer 1"] == pytest.approx(5e-5)
    assert lrs["layer 0"] == pytest.approx(2.5e-5) and lrs["embeddings"] == pytest.approx(1.25e-5)
    freezing.freeze_all(model)
    with pytest.raises(ValueError, match="nothing to train"):
        training.optimizer_groups(model, config)


def test_schedule_warms_up_then_decays():
    factor = training.lr_lambda(100, 0.1, "linear")
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(55) == pytest.approx(0.5, abs=0.01) and factor(99) < 0.02
    cosine = training.lr_lambda(100, 0.0, "cosine")
    assert cosine(0) == pytest.approx(1.0) and cosine(50) == pytest.approx(0.5)


def test_task_sampling():
    rng = np.random.default_rng(0)
    sizes = {"a": 900, "b": 100}
    assert training.task_schedule(sizes, 4, "round_robin", 1, rng) == ["a", "b", "a", "b"]
    prop = training.task_schedule(sizes, 4000, "proportional", 1, rng)
    assert prop.count("b") / 4000 == pytest.approx(0.1, abs=0.02)
    temp = training.task_schedule(sizes, 4000, "temperature", 2.0, rng)
    assert temp.count("b") / 4000 == pytest.approx(1 / 4, abs=0.02)  # sqrt(100) / (sqrt(900) + sqrt(100))


def test_batches_are_full_cover_every_example_and_group_lengths():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 60, 3210)
    padding = {}
    for group in (False, True):
        bs = training.batches(lengths, 32, np.random.default_rng(1), group)
        assert {len(b) for b in bs} == {32} and len(bs) == 101  # 3210 = 100 batches + 10, topped up to a full one
        flat = np.concatenate(bs)
        assert set(flat.tolist()) == set(range(3210)) and len(flat) - len(set(flat.tolist())) == 22
        padding[group] = sum(len(b) * lengths[b].max() - lengths[b].sum() for b in bs)
    assert padding[True] < 0.2 * padding[False]
    tiny = training.batches(np.ones(5), 8, np.random.default_rng(0), True)
    assert len(tiny) == 1 and sorted(set(tiny[0].tolist())) == [0, 1, 2, 3, 4]


def test_the_batch_plan_follows_the_seed(tasks):
    config = TrainConfig(batch_size=16, seed=3)
    lengths = {t.name: np.array([len(x) for x in t.train.text]) for t in tasks}
    first = [(name, idx.tolist()) for name, idx in training.BatchPlan(lengths, config).epoch()]
    again = [(name, idx.tolist()) for name, idx in training.BatchPlan(lengths, config).epoch()]
    assert first == again and len(first) == sum(-(-len(t.train) // 16) for t in tasks)
    assert all(len(idx) == 16 and max(idx) < len(lengths[name]) for name, idx in first)
    assert {name for name, _ in first} == {"topic", "mood"}


def test_training_learns_and_is_reproducible(tiny_backbone_dir, tasks):
    from sentence_transformers import SentenceTransformer

    def run():
        backbone = SentenceTransformer(str(tiny_backbone_dir), device="cpu")
        m = MultiTaskModel(backbone, {t.name: t.label_names for t in tasks}, backbone_name="tiny")
        freezing.unfreeze_last(freezing.freeze_backbone(m), 1)
        return m, training.train(m, tasks, TrainConfig(epochs=4, head_lr=0.05, backbone_lr=3e-3, progress=False))

    model, history = run()
    _, again = run()
    pd.testing.assert_frame_equal(history.drop(columns="seconds"), again.drop(columns="seconds"))
    first = history[history.epoch == 0].set_index("task")["val_accuracy"]
    best = history[history.best].set_index("task")["val_accuracy"]
    assert (best > first + 0.2).all(), (first, best)  # well above where it started
    # the best epoch's weights were restored: evaluating now gives the best epoch's numbers
    for task in tasks:
        assert evaluate(model, task, "val")["accuracy"] == pytest.approx(best[task.name])
    assert model.tuned_backbone and all(n.startswith("0.auto_model.encoder.layer.2.") or
                                        n.startswith("0.model.encoder.layer.2.") for n in model.tuned_backbone)


def test_frozen_parts_do_not_move(model, tasks):
    freezing.freeze_backbone(model)
    before = {n: p.clone() for n, p in model.backbone.named_parameters()}
    training.train(model, tasks, TrainConfig(epochs=1, progress=False))
    assert all(torch.equal(before[n], p) for n, p in model.backbone.named_parameters())
    freezing.freeze_head(freezing.unfreeze_all(model), "topic")
    head = {n: p.clone() for n, p in model.heads["topic"].named_parameters()}
    training.train(model, tasks, TrainConfig(epochs=1, train_tasks=["mood"], backbone_lr=1e-3, evaluate_first=False,
                                             progress=False))
    assert all(torch.equal(head[n], p) for n, p in model.heads["topic"].named_parameters())


def test_early_stopping_and_errors(model, tasks):
    freezing.freeze_backbone(model)
    history = training.train(model, tasks, TrainConfig(epochs=30, head_lr=0.0, patience=2, progress=False))
    assert history.epoch.max() == 2  # nothing can improve with a zero learning rate
    with pytest.warns(DataWarning, match="27 rows repeat"):
        wrong = task_from_dataframe("mood", pd.DataFrame({"text": ["good", "bad", "fine"] * 10,
                                                          "label": ["good", "bad", "fine"] * 10}), duplicates="keep")
    with pytest.raises(ValueError, match="its head knows"):
        training.train(model, [wrong], TrainConfig(epochs=1, progress=False))
    with pytest.raises(ValueError, match="'size' is not among the tasks"):
        training.train(model, tasks, TrainConfig(epochs=1, select_on=["size"], progress=False))
    freezing.freeze_all(model)
    with pytest.raises(ValueError, match="nothing to train"):
        training.train(model, tasks, TrainConfig(epochs=1, progress=False))


def test_a_diverging_run_stops_with_an_error_naming_the_epoch_and_step(model, tasks):
    freezing.freeze_backbone(model)
    with torch.no_grad():
        model.heads["topic"].weight.fill_(float("nan"))  # as a NaN learning rate leaves it after one step
    with pytest.raises(training.DivergedError, match=r"epoch 1, step \d+ \(task 'topic'\).*nothing was kept"):
        training.train(model, tasks, TrainConfig(epochs=2, progress=False))


@pytest.mark.parametrize("changes, message", [
    ({"head_lr": float("nan")}, "head_lr must be a finite number"), ({"backbone_lr": -1e-3}, "at least 0"),
    ({"epochs": 0}, "epochs must be an integer"), ({"batch_size": 2.5}, "batch_size must be an integer"),
    ({"temperature": 0}, "temperature must be a finite number above 0"), ({"layer_lr_decay": 0}, "above 0"),
    ({"warmup": 1.0}, "warmup is a fraction"), ({"max_grad_norm": float("inf")}, "max_grad_norm"),
    ({"sampling": "random"}, "unknown sampling"), ({"patience": 0}, "patience"), ({"prefix_layers": -1}, "prefix"),
])
def test_config_refuses_what_cannot_train(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes)


def test_recipes_are_configs():
    assert TrainConfig().epochs == 20 and TrainConfig().head_lr == 1e-2
    tuned = finetune_config(epochs=3)
    assert (tuned.epochs, tuned.head_lr, tuned.backbone_lr, tuned.layer_lr_decay) == (3, 1e-3, 2e-4, 0.95)
    assert dataclasses.replace(tuned, seed=1).seed == 1 and tuned.seed == 0


def test_two_tasks_with_one_name_are_refused(model, tasks):
    freezing.freeze_backbone(model)
    twin = synthetic_task("topic", ["what", "who", "where"], seed=5)
    with pytest.raises(ValueError, match=r"two tasks are named 'topic'.*\['topic', 'mood', 'topic'\]"):
        training.train(model, [*tasks, twin], TrainConfig(epochs=1, progress=False))


def rows(**accuracy: float) -> list[dict]:
    return [{"task": t, "val_accuracy": a, "val_f1_macro": a / 2} for t, a in accuracy.items()]


def test_epoch_score_mean_select_on_and_no_task_worse():
    start, sizes = {"a": 0.80, "b": 0.60}, {"a": 100, "b": 100}  # noise: a 4.0 points, b 4.9 points
    mean, strict = TrainConfig(), TrainConfig(selection="no_task_worse")
    epoch = rows(a=0.95, b=0.50)  # a up 15 points, b down 10 (beyond its noise)
    assert training.epoch_score(epoch, mean, ["a", "b"], start, sizes) == pytest.approx(0.725)
    assert training.epoch_score(epoch, mean, ["a"], start, sizes) == pytest.approx(0.95)
    assert training.epoch_score(epoch, strict, ["a", "b"], start, sizes) == -math.inf
    assert training.epoch_score(epoch, strict, ["a"], start, sizes) == -math.inf  # every task counts, not only select_on
    within = rows(a=0.95, b=0.56)  # b down 4 points: within its noise
    assert training.epoch_score(within, strict, ["a", "b"], start, sizes) == pytest.approx(0.755)
    assert training.epoch_score(within, TrainConfig(metric="f1_macro"), ["a", "b"], start, sizes) == pytest.approx(0.3775)


def test_no_task_worse_is_wired_into_the_epoch_kept(tiny_backbone_dir, tasks, monkeypatch):
    from sentence_transformers import SentenceTransformer

    def run(selection: str) -> pd.DataFrame:
        m = MultiTaskModel(SentenceTransformer(str(tiny_backbone_dir), device="cpu"),
                           {t.name: t.label_names for t in tasks}, backbone_name="tiny")
        freezing.freeze_backbone(m)
        return training.train(m, tasks, TrainConfig(epochs=2, head_lr=0.05, selection=selection, progress=False))

    assert run("mean").attrs["best_epoch"] > 0  # training helps...
    monkeypatch.setattr(training, "fallen_tasks", lambda *args: ["topic"])  # ...but say a task fell every epoch
    assert run("no_task_worse").attrs["best_epoch"] == 0


def test_balanced_class_weights_reach_the_loss(model, monkeypatch):
    df = pd.DataFrame({"text": [f"sentence number {i} is {'rare' if i < 10 else 'common'}" for i in range(100)],
                       "label": ["rare"] * 10 + ["common"] * 90})
    task = task_from_dataframe("skew", df, seed=0)
    counts = np.bincount(task.train["label"], minlength=2)
    expected = len(task.train) / (2 * counts)  # sklearn's "balanced": n / (classes * count)
    np.testing.assert_allclose(training.class_weights(task, "balanced").numpy(), expected, rtol=1e-6)
    assert training.class_weights(task, None) is None
    seen = []
    cross_entropy = training.F.cross_entropy
    monkeypatch.setattr(training.F, "cross_entropy", lambda *a, **k: seen.append(k.get("weight")) or cross_entropy(*a, **k))
    skew = MultiTaskModel(model.backbone, {"skew": task.label_names}, backbone_name="tiny")
    freezing.freeze_backbone(skew)
    training.train(skew, [task], TrainConfig(epochs=1, class_weights="balanced", progress=False))
    assert seen and all(w is not None and np.allclose(w.numpy(), expected) for w in seen)


def test_training_warns_when_the_backbone_cuts_texts(model):
    long = synthetic_task("mood", ["good", "bad"], seed=1)
    long = dataclasses.replace(long, train=long.train.assign(
        text=[t + " very" * (80 if i % 4 == 0 else 0) for i, t in enumerate(long.train["text"])]))
    cut = (long.train.index % 4 == 0).sum()
    freezing.freeze_backbone(model)
    with pytest.warns(DataWarning, match=rf"task 'mood' train: {cut} of {len(long.train)} texts .* longer than the 64 "
                                         r"tokens the backbone reads"):
        training.train(model, [long], TrainConfig(epochs=1, progress=False))
