"""The engine on the tiny test backbone: model, freezing, caches, training loop and checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from mtl_utils import features, freezing, training
from mtl_utils.checkpoint import load_checkpoint, load_into, save_checkpoint
from mtl_utils.data import task_from_dataframe
from mtl_utils.model import MultiTaskModel, make_head

WORDS = "the a movie film plot actor story scene was is very quite rather".split()


def synthetic_task(name: str, cue_words: list[str], n: int = 240, seed: int = 0):
    """Sentences of filler words with one cue word that decides the label: learnable, but not trivially short."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = i % len(cue_words)
        words = list(rng.choice(WORDS, rng.integers(3, 12)))
        words.insert(int(rng.integers(0, len(words))), cue_words[label])
        rows.append({"text": " ".join(words), "label": cue_words[label]})
    return task_from_dataframe(name, pd.DataFrame(rows), val_size=0.2, test_size=0.2, seed=seed)


@pytest.fixture
def tasks():
    return [synthetic_task("topic", ["what", "who", "where"]), synthetic_task("mood", ["good", "bad"], seed=1)]


@pytest.fixture
def model(tiny_backbone, tasks):
    return MultiTaskModel(tiny_backbone, {t.name: t.label_names for t in tasks}, backbone_name="tiny")


def test_heads_and_forward(model, tasks):
    feats = model.features(["what a movie", "good plot"])
    assert model("topic", feats).shape == (2, 3)
    assert model("mood", feats).shape == (2, 2)
    assert isinstance(make_head(8, 2, "mlp", hidden=4), torch.nn.Sequential)
    with pytest.raises(ValueError, match="linear, mlp"):
        make_head(8, 2, "transformer")
    with pytest.raises(KeyError, match="topic, mood"):
        model("sentiment", feats)
    with pytest.raises(ValueError, match="positions \\[1\\]"):
        model.predict(["fine", "   "])


def test_predict_runs_the_backbone_once(model):
    calls = []
    model.backbone.register_forward_hook(lambda *a: calls.append(1))
    texts = ["what a movie", "who was the actor", "good plot", "bad scene"]
    table = model.predict(texts, batch_size=64)
    assert len(calls) == 1  # one backbone pass answered both tasks
    assert list(table["text"]) == texts
    assert set(table["topic"]) <= {"what", "who", "where"} and set(table["mood"]) <= {"good", "bad"}
    probs = table[[c for c in table if c.startswith("P(topic=")]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-6)


def test_embed_matches_sentence_transformers_encode(model):
    texts = ["what a movie", "who was the actor in this long film about a story", "good"]
    ours = model.embed(texts, batch_size=2)
    theirs = model.backbone.encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scenario, backbone_trains, topic_trains, mood_trains", [
    ("everything", False, False, False),
    ("backbone", False, True, True),
    ("nothing", True, True, True),
])
def test_freeze_scenarios(model, scenario, backbone_trains, topic_trains, mood_trains):
    freezing.freeze(model, scenario)
    layers = model.backbone[0].auto_model.encoder.layer
    assert all(p.requires_grad == backbone_trains for p in layers.parameters())
    assert all(p.requires_grad == topic_trains for p in model.heads["topic"].parameters())
    assert all(p.requires_grad == mood_trains for p in model.heads["mood"].parameters())
    model.train()
    # frozen means eval mode too: dropout is off in every frozen part
    assert all(not m.training for m in layers.modules()) != backbone_trains


def test_freeze_one_head(model):
    freezing.freeze(model, "head", head="topic")
    assert not any(p.requires_grad for p in model.heads["topic"].parameters())
    assert all(p.requires_grad for p in model.heads["mood"].parameters())
    assert all(p.requires_grad for p in model.backbone[0].auto_model.encoder.parameters())
    model.train()
    assert not model.heads["topic"].training and model.heads["mood"].training
    with pytest.raises(ValueError, match="heads are: topic, mood"):
        freezing.freeze(model, "head", head="sentiment")
    with pytest.raises(ValueError, match="'everything'.*'backbone'.*'head'.*'nothing'"):
        freezing.freeze(model, "heads")


def test_unfreeze_last_layers(model):
    freezing.freeze(model, "backbone")
    freezing.unfreeze_last_layers(model, 2)
    table = freezing.trainable_summary(model)
    assert list(table.loc[table.group == "backbone", "trains"])[:4] == ["no", "no", "yes", "yes"]
    assert freezing.frozen_prefix_depth(model) == 2  # embeddings + layer 0
    total = table[table.group == "total"].iloc[0]
    assert total["parameters"] == sum(p.numel() for p in model.parameters())
    assert total["trainable parameters"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.train()
    layers = model.backbone[0].auto_model.encoder.layer
    assert [layer.training for layer in layers] == [False, True, True]
    assert not model.backbone[0].auto_model.embeddings.training
    freezing.unfreeze_last_layers(model, 3, embeddings=True)
    assert freezing.frozen_prefix_depth(model) == 0
    with pytest.raises(ValueError, match="from 0 to 3 .*has 3 transformer layers.*got 4"):
        freezing.unfreeze_last_layers(model, 4)


def test_optimizer_sees_only_trainable_parameters(model):
    freezing.freeze(model, "backbone")
    freezing.unfreeze_last_layers(model, 1)
    config = training.TrainConfig(layer_lr_decay=2.6, backbone_lr=1e-4)
    groups = training.optimizer_groups(model, config)
    seen = {id(p) for g in groups for p in g["params"]}
    assert seen == {id(p) for p in model.parameters() if p.requires_grad}
    assert freezing.count_trainable(model) == sum(p.numel() for g in groups for p in g["params"])
    assert [g["name"] for g in groups] == ["head topic", "head mood", "layer 2"]
    freezing.unfreeze_last_layers(model, 3)
    lrs = {g["name"]: g["lr"] for g in training.optimizer_groups(model, config)}
    assert lrs["layer 2"] == pytest.approx(1e-4) and lrs["layer 1"] == pytest.approx(1e-4 / 2.6)
    assert lrs["layer 0"] == pytest.approx(1e-4 / 2.6 ** 2)
    freezing.freeze(model, "everything")
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


def test_length_grouping_cuts_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 60, 3200)
    padding = {}
    for group in (False, True):
        bs = training.batches(lengths, 32, np.random.default_rng(1), group)
        assert sorted(np.concatenate(bs).tolist()) == list(range(3200))  # every example once
        padding[group] = sum(len(b) * lengths[b].max() - lengths[b].sum() for b in bs)
    assert padding[True] < 0.2 * padding[False]


def test_embedding_cache_matches_and_persists(model, tmp_path):
    texts = ["what a movie", "who was the actor", "good plot"]
    first = features.cached_embeddings(model.backbone, texts, progress=False)
    torch.testing.assert_close(first, model.embed(texts), atol=1e-6, rtol=1e-6)
    files = list(tmp_path.glob("cache/embeddings/*.safetensors"))
    assert len(files) == 1
    features.clear_memory_cache()
    torch.testing.assert_close(features.cached_embeddings(model.backbone, texts, progress=False), first)
    files[0].write_bytes(b"corrupt")  # a corrupt entry is rebuilt, never used
    features.clear_memory_cache()
    torch.testing.assert_close(features.cached_embeddings(model.backbone, texts, progress=False), first)
    with torch.no_grad():
        model.backbone[0].auto_model.encoder.layer[0].intermediate.dense.weight.mul_(1.5)
    changed = features.cached_embeddings(model.backbone, texts, progress=False)
    assert not torch.allclose(changed, first)  # new weights, new cache entry


def _loss_and_grads(model, source, task, idx):
    torch.manual_seed(123)
    model.train()
    model.zero_grad(set_to_none=True)
    labels = torch.as_tensor(task.train["label"].to_numpy()[idx])
    loss = F.cross_entropy(model(task.name, source(idx)), labels)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("k, embeddings", [(1, False), (2, False), (3, False)])
def test_prefix_cache_gives_the_same_losses_and_gradients(model, tasks, k, embeddings):
    freezing.freeze(model, "backbone")
    freezing.unfreeze_last_layers(model, k, embeddings)
    task = tasks[0]
    texts = task.train["text"].tolist()
    cached = features.sentence_source(model, texts, progress=False)
    assert isinstance(cached, features.CachedPrefix) and cached.frozen_layers == 3 - k
    full = features.FullForward(model, texts)
    for idx in ([0, 5, 7, 11], list(range(20, 52))):
        loss_full, grads_full = _loss_and_grads(model, full, task, idx)
        loss_cached, grads_cached = _loss_and_grads(model, cached, task, idx)
        assert loss_cached == pytest.approx(loss_full, abs=1e-6)
        assert grads_cached.keys() == grads_full.keys()
        for name in grads_full:
            torch.testing.assert_close(grads_cached[name], grads_full[name], atol=1e-6, rtol=1e-5)


def test_training_learns_and_is_reproducible(tiny_backbone_dir, tasks):
    from sentence_transformers import SentenceTransformer

    def run():
        backbone = SentenceTransformer(str(tiny_backbone_dir), device="cpu")
        m = MultiTaskModel(backbone, {t.name: t.label_names for t in tasks}, backbone_name="tiny")
        freezing.freeze(m, "backbone")
        freezing.unfreeze_last_layers(m, 1)
        config = training.TrainConfig(epochs=4, head_lr=0.05, backbone_lr=3e-3, progress=False)
        return m, training.train(m, tasks, config)

    model, history = run()
    _, again = run()
    pd.testing.assert_frame_equal(history.drop(columns="seconds"), again.drop(columns="seconds"))
    first = history[history.epoch == 0].set_index("task")["val_accuracy"]
    best = history[history.best].set_index("task")["val_accuracy"]
    assert (best > first + 0.2).all(), (first, best)  # well above where it started
    # the best epoch's weights were restored: evaluating now gives the best epoch's numbers
    for task in tasks:
        assert training.evaluate(model, task, "val")["accuracy"] == pytest.approx(best[task.name])
    assert model.tuned_backbone and all(n.startswith("0.model.encoder.layer.2.") for n in model.tuned_backbone)


def test_frozen_parts_do_not_move(model, tasks):
    freezing.freeze(model, "backbone")
    before = {n: p.clone() for n, p in model.backbone.named_parameters()}
    training.train(model, tasks, training.TrainConfig(epochs=1, progress=False))
    assert all(torch.equal(before[n], p) for n, p in model.backbone.named_parameters())
    freezing.freeze(model, "head", head="topic")
    head = {n: p.clone() for n, p in model.heads["topic"].named_parameters()}
    training.train(model, tasks, training.TrainConfig(epochs=1, train_tasks=["mood"], backbone_lr=1e-3,
                                                      evaluate_first=False, progress=False))
    assert all(torch.equal(head[n], p) for n, p in model.heads["topic"].named_parameters())


def test_early_stopping_and_errors(model, tasks):
    freezing.freeze(model, "backbone")
    history = training.train(model, tasks, training.TrainConfig(epochs=30, head_lr=0.0, patience=2, progress=False))
    assert history.epoch.max() == 2  # nothing can improve with a zero learning rate
    with pytest.raises(ValueError, match="unknown sampling"):
        training.TrainConfig(sampling="random")
    wrong = task_from_dataframe("mood", pd.DataFrame({"text": ["good", "bad", "fine"] * 10,
                                                      "label": ["good", "bad", "fine"] * 10}))
    with pytest.raises(ValueError, match="its head knows"):
        training.train(model, [wrong], training.TrainConfig(epochs=1, progress=False))
    freezing.freeze(model, "everything")
    with pytest.raises(ValueError, match="nothing to train"):
        training.train(model, tasks, training.TrainConfig(epochs=1, progress=False))


def test_checkpoint_round_trip(model, tasks, tiny_backbone_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    freezing.freeze(model, "backbone")
    freezing.unfreeze_last_layers(model, 1)
    training.train(model, tasks, training.TrainConfig(epochs=1, backbone_lr=1e-3, progress=False))
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
