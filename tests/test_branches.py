"""A task's own top layers on a shared frozen backbone (mtl_utils.branches), on the tiny test backbone."""

from __future__ import annotations

import pytest
import torch
from sentence_transformers import SentenceTransformer

from mtl_utils import backbone as bb
from mtl_utils import freezing
from mtl_utils.branches import Branched, own_top_layers
from mtl_utils.model import MultiTaskModel
from mtl_utils.recipes import TrainConfig
from mtl_utils.training import train

TASK_ROWS = 90


def _copy(tiny_backbone_dir, shared):
    model = MultiTaskModel(SentenceTransformer(str(tiny_backbone_dir), device="cpu"), shared.label_names,
                           backbone_name=shared.backbone_name)
    model.heads.load_state_dict(shared.heads.state_dict())
    return model


def test_the_adapted_task_learns_and_every_other_task_answers_exactly_as_before(tiny_backbone_dir, model, tasks):
    topic, mood = tasks
    freezing.freeze_backbone(model)
    texts = mood.test.text.tolist() + topic.test.text.tolist()
    before = model.predict(texts)
    own = own_top_layers(_copy(tiny_backbone_dir, model), "mood", 1)
    trains = {id(p) for p in own.parameters() if p.requires_grad}
    assert trains == {id(p) for m in (bb.layers(own.backbone)[-1], own.head("mood")) for p in m.parameters()}
    train(own, [mood], TrainConfig(epochs=2, head_lr=0.05, backbone_lr=1e-2, evaluate_first=False, progress=False))
    assert not torch.equal(bb.layers(own.backbone)[-1].output.dense.weight, bb.layers(model.backbone)[-1].output.dense.weight)
    served = Branched(model, {"mood": own}, split=2).predict(texts)
    assert (served["topic"] == before["topic"].to_numpy()).all()  # the shared task: exactly its answers
    assert (served["mood"] == own.predict(texts)["mood"].to_numpy()).all()  # the adapted task: its own model's
    assert (served["mood"] != before["mood"].to_numpy()).any()  # which did change


def test_a_model_that_changed_the_shared_layers_is_refused(tiny_backbone_dir, model):
    other = _copy(tiny_backbone_dir, model)
    with torch.no_grad():
        bb.layers(other.backbone)[0].output.dense.weight.add_(1.0)
    with pytest.raises(ValueError, match="changed layers below 2"):
        Branched(model, {"mood": other}, split=2)
    Branched(model, {"mood": other}, split=0)  # nothing shared but the embeddings: accepted
    with pytest.raises(ValueError, match="split must be an integer from 0 to 2"):
        Branched(model, {"mood": other}, split=3)
    with pytest.raises(KeyError):
        own_top_layers(other, "no such task", 1)
