"""Mixed precision that really trains: why the loop enters autocast once per step, the guard against an enclosing
autocast block, and caches that never serve numbers computed in one precision to a run in another."""

from __future__ import annotations

import pytest
import torch

from mtl_utils import distributed, embedding_store, features, freezing, prefix_cache, training
from mtl_utils.evaluation import evaluate
from mtl_utils.model import MultiTaskModel
from mtl_utils.recipes import TrainConfig, finetune_config


@pytest.fixture(autouse=True)
def _forget_memory():
    features.clear_memory_cache()
    yield
    features.clear_memory_cache()


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def test_one_autocast_block_keeps_the_weights_of_its_first_forward():
    """The mechanism (torch 2.13, CPU): autocast caches the bf16 copy of each trainable weight until the outermost
    block exits, so an optimizer step inside the block is invisible to the next forward in it."""
    torch.manual_seed(0)
    layer, x = torch.nn.Linear(8, 4), torch.randn(16, 8)
    optimizer = torch.optim.SGD(layer.parameters(), lr=1.0)
    with bf16():
        before = layer(x)
        before.float().pow(2).mean().backward()
        optimizer.step()
        inside = layer(x)
    with bf16():
        after = layer(x)
    assert torch.equal(inside, before)  # the step happened, but this block still computes with the old copy
    assert not torch.equal(after, before)  # a new block casts the updated weights
    # without the cache (or in a block per step, as the training loop does) the step is seen at once
    with bf16(), torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        fresh = layer(x)
    assert torch.equal(fresh, after)


def test_train_refuses_to_run_inside_an_autocast_block(model, tasks):
    with bf16(), pytest.raises(RuntimeError, match=r"inside torch.autocast.*mixed_precision='bf16'"):
        training.train(model, tasks, TrainConfig(epochs=1, progress=False))


def test_the_accelerator_and_the_config_must_agree_on_the_precision(model, tasks):
    accelerator = distributed.make_accelerator()
    accelerator.state._mixed_precision = "bf16"  # as under `accelerate launch --mixed-precision bf16`
    try:
        with pytest.raises(ValueError, match="mixed precision 'bf16' but the config asks for 'no'"):
            training.train(model, tasks, TrainConfig(epochs=1, progress=False), distributed.Processes(accelerator))
    finally:
        accelerator.state._mixed_precision = "no"
    with pytest.raises(ValueError, match="fp16' needs a GPU and the accelerator's gradient scaler"):
        training.train(model, tasks, TrainConfig(epochs=1, mixed_precision="fp16", progress=False))
    with pytest.raises(ValueError, match="unknown mixed_precision 'bf8'"):
        TrainConfig(mixed_precision="bf8")


def val_losses(tiny_backbone_dir, tasks, mixed_precision: str = "no"):
    """A fresh tiny backbone's last layer and the heads trained for 3 epochs; the validation loss per epoch and
    task, and the model."""
    from sentence_transformers import SentenceTransformer

    backbone = SentenceTransformer(str(tiny_backbone_dir), device="cpu")
    model = MultiTaskModel(backbone, {t.name: t.label_names for t in tasks}, backbone_name="tiny")
    freezing.unfreeze_last(freezing.freeze_backbone(model), 1)
    config = finetune_config(epochs=3, head_lr=1e-2, backbone_lr=1e-3, mixed_precision=mixed_precision,
                             progress=False)
    history = training.train(model, tasks, config)
    return history, history.pivot(index="epoch", columns="task", values="val_loss"), model


def test_a_bf16_run_trains_like_the_fp32_run(tiny_backbone_dir, tasks):
    """bf16 autocast once per step: validation follows the fp32 run epoch by epoch, and the kept model scores in
    fp32 afterwards exactly what validation (which runs in fp32) said while training."""
    _, fp32, _ = val_losses(tiny_backbone_dir, tasks)
    history, low, model = val_losses(tiny_backbone_dir, tasks, "bf16")
    assert (fp32.loc[0] - fp32.loc[3] > 0.01).all()  # the fp32 run learns something to follow
    assert float((low - fp32).abs().max().max()) < 0.002
    best = history[history.best].set_index("task")["val_accuracy"]
    for task in tasks:
        assert evaluate(model, task, "val")["accuracy"] == pytest.approx(best[task.name], abs=1e-9)


def test_the_old_harness_pattern_does_not_train(tiny_backbone_dir, tasks, monkeypatch):
    """What the guard prevents, in the real loop: the whole run inside one autocast block. Every Linear reuses the
    bf16 copy of its weight made at the first forward, so validation hardly moves while the fp32 run's does."""
    _, fp32, _ = val_losses(tiny_backbone_dir, tasks)
    monkeypatch.setattr(training, "refuse_enclosing_autocast", lambda device: None)
    with bf16():
        _, stuck, _ = val_losses(tiny_backbone_dir, tasks)
    assert float((stuck - fp32).abs().max().max()) > 0.01
    assert ((stuck.loc[0] - stuck.loc[3]).abs() < 0.25 * (fp32.loc[0] - fp32.loc[3])).all()


def test_an_fp32_run_never_reads_embeddings_cached_under_bf16(model):
    texts = ["what a movie", "who was the actor in this long film about a story", "good", "a rather quiet plot"]
    with torch.no_grad(), bf16():
        low = features.cached_embeddings(model.backbone, texts, progress=False)
    exact = features.cached_embeddings(model.backbone, texts, progress=False)
    features.clear_memory_cache()
    with torch.no_grad():
        reference = model.backbone.encode(texts, convert_to_tensor=True)
    assert not torch.equal(low, exact)  # the two precisions really give other numbers here
    torch.testing.assert_close(exact, reference, rtol=0, atol=1e-6)
    stores = sorted(p.name for p in embedding_store.cache_dir("embeddings").iterdir())
    assert len(stores) == 2 and [s.rsplit("-", 1)[-1] for s in stores] == ["bfloat16", "fp32"]
    features.clear_memory_cache()  # from disk, too: the fp32 store holds fp32 numbers only
    torch.testing.assert_close(features.cached_embeddings(model.backbone, texts, progress=False), reference,
                               rtol=0, atol=1e-6)


def test_an_fp32_run_never_reads_prefix_states_cached_under_bf16(model):
    texts = ["what a movie", "who was the actor in this long film about a story", "good", "a rather quiet plot"]
    freezing.unfreeze_last(freezing.freeze_backbone(model), 1)
    with torch.no_grad(), bf16():
        low = features.CachedPrefix(model, texts, frozen_layers=2, progress=False)
    exact = features.CachedPrefix(model, texts, frozen_layers=2, progress=False)
    assert low.states is not exact.states and len(prefix_cache._PREFIXES) == 2
    assert not torch.equal(low.states.packed.data, exact.states.packed.data)
    model.eval()  # the trainable top layer's dropout off: the cache, not chance, is compared
    with torch.no_grad():
        full = model.sentence_embeddings(exact.batch_features(range(len(texts))))
        torch.testing.assert_close(exact(range(len(texts))), full, rtol=0, atol=2e-3)  # the fp16 store's tolerance
