"""MultiTaskModel: heads, forward, predict (one backbone pass for every task), and the one batched inference loop."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from mtl_utils.model import MultiTaskModel, eval_mode, length_order, make_head, map_batches


def test_heads_and_forward(model):
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
    with pytest.raises(ValueError, match="at least two distinct"):
        MultiTaskModel(model.backbone, {"t": ("a", "a")})


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


def test_predict_answers_only_the_tasks_asked_for(model):
    texts = ["what a movie", "good plot"]
    only = model.predict(texts, tasks=["mood"])
    assert "topic" not in only and not any(c.startswith("P(topic=") for c in only)
    pd.testing.assert_frame_equal(only, model.predict(texts)[only.columns])
    with pytest.raises(KeyError, match="unknown task 'size'"):
        model.predict(texts, tasks=["size"])
    for bad in (None, {"what a movie": 1}):
        with pytest.raises(TypeError, match="list of texts"):
            model.predict(bad)


def test_embed_matches_sentence_transformers_encode(model):
    texts = ["what a movie", "who was the actor in this long film about a story", "good"]
    ours = model.embed(texts, batch_size=2)
    theirs = model.backbone.encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_map_batches_runs_longest_first_in_eval_mode_and_puts_rows_back(model):
    lengths = [3, 9, 1, 7, 5]
    model.train()
    seen, modes = [], []

    def fn(idx):
        seen.append(idx.tolist())
        modes.append((model.training, torch.is_grad_enabled()))
        return torch.as_tensor(idx, dtype=torch.float32)[:, None] * torch.ones(1, 2), torch.as_tensor(idx)

    rows, same = map_batches(fn, lengths, batch_size=2, module=model)
    assert seen == [[1, 3], [4, 0], [2]] and length_order(lengths).tolist() == [1, 3, 4, 0, 2]
    assert set(modes) == {(False, False)} and model.training  # eval, no gradients inside; mode restored after
    assert same.tolist() == [0, 1, 2, 3, 4] and rows[:, 0].tolist() == [0, 1, 2, 3, 4]
    got = []
    assert map_batches(lambda idx: idx, lengths, batch_size=10, into=lambda idx, r: got.append(r.tolist())) is None
    assert got == [[1, 3, 4, 0, 2]]
    with pytest.raises(ValueError, match="batch_size must be an integer of at least 1"):
        map_batches(fn, lengths, batch_size=0)


def test_eval_mode_restores_each_submodule(model):
    model.train()
    model.heads["topic"].eval()
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert model.training and not model.heads["topic"].training and model.heads["mood"].training


@pytest.mark.parametrize("name, message", [("my.task", "contains '.'"), ("", "non-empty str"), (3, "non-empty str"),
                                           ("train", "taken by PyTorch"), ("keys", "taken by PyTorch")])
def test_task_names_that_cannot_name_a_head_are_refused_with_a_clear_error(tiny_backbone, name, message):
    with pytest.raises(ValueError, match=message):  # not torch's KeyError from deep inside nn.ModuleDict
        MultiTaskModel(tiny_backbone, {"fine": ("a", "b"), name: ("x", "y")})
    with pytest.raises(TypeError, match="must map each task name to its label names, got list"):
        MultiTaskModel(tiny_backbone, [("fine", ("a", "b")), ("fine", ("c", "d"))])
    assert MultiTaskModel(tiny_backbone, {"my task": ("a", "b"), "test": ("c", "d")}).tasks == ["my task", "test"]
