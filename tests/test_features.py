"""The sentence sources and their caches: per-sentence embeddings on disk, 16-bit frozen-prefix states, packed rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mtl_utils import backbone as bb
from mtl_utils import embedding_store, features, freezing, prefix_cache
from mtl_utils.model import MultiTaskModel

from helpers import synthetic_task

TEXTS = ["what a movie", "who was the actor in this long film about a story", "good", "a rather quiet plot"]


@pytest.fixture(autouse=True)
def _forget_memory():
    features.clear_memory_cache()
    yield
    features.clear_memory_cache()


@pytest.fixture
def model(tiny_backbone):
    return MultiTaskModel(tiny_backbone, {"topic": ("what", "who", "where"), "mood": ("bad", "good")},
                          backbone_name="tiny")


def shards(tmp_path):
    return sorted(tmp_path.glob("cache/embeddings/*/shard-*.safetensors"))


# --- packed rows and tokenisation ---------------------------------------------------------------------------

def test_packed_pads_like_a_loop_of_copies():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 9, 20)
    rows = [torch.randn(n, 3) for n in lengths]
    packed = prefix_cache.Packed(torch.cat(rows), lengths)
    idx = [7, 0, 19, 3, 3]
    padded, mask = packed.pad(idx, fill=-1.0)
    assert padded.shape == (5, lengths[idx].max(), 3)
    for row, i in enumerate(idx):
        torch.testing.assert_close(padded[row, : lengths[i]], rows[i], rtol=0, atol=0)
        assert (padded[row, lengths[i]:] == -1).all()
        assert mask[row].sum() == lengths[i]
    torch.testing.assert_close(packed.row(19), rows[19], rtol=0, atol=0)
    ids = prefix_cache.Packed(torch.arange(6), np.array([2, 1, 3]))
    assert ids.pad([2, 1], fill=9)[0].tolist() == [[3, 4, 5], [2, 9, 9]]


def test_batch_features_match_the_tokenizer(model):
    source = features.FullForward(model, TEXTS)
    expected = model.backbone.preprocess([TEXTS[i] for i in (1, 2, 0)])
    batch = source.batch_features([1, 2, 0])
    assert batch.keys() == {k for k, v in expected.items() if isinstance(v, torch.Tensor)}
    for key, value in batch.items():
        assert torch.equal(value, expected[key]), key
    assert source.lengths[[1, 2, 0]].tolist() == expected["attention_mask"].sum(1).tolist()


# --- the per-sentence embedding cache -----------------------------------------------------------------------

def test_embedding_cache_matches_encode_and_persists(model, tmp_path):
    first = features.cached_embeddings(model.backbone, TEXTS, progress=False)
    torch.testing.assert_close(first, model.embed(TEXTS), atol=1e-6, rtol=1e-6)
    assert len(shards(tmp_path)) == 1
    features.clear_memory_cache()
    torch.testing.assert_close(features.cached_embeddings(model.backbone, TEXTS, progress=False), first, rtol=0, atol=0)
    with torch.no_grad():
        bb.layers(model.backbone)[0].intermediate.dense.weight.mul_(1.5)
    changed = features.cached_embeddings(model.backbone, TEXTS, progress=False)
    assert not torch.allclose(changed, first)  # new weights, new key, new entries
    assert len({p.parent for p in shards(tmp_path)}) == 2


def test_sentences_already_seen_are_never_encoded_again(model, tmp_path):
    mixed = [TEXTS[2], TEXTS[3], TEXTS[0], TEXTS[0]]
    expected = model.embed(mixed)
    encoded = []
    model.backbone.register_forward_hook(lambda m, args, out: encoded.append(len(args[0]["input_ids"])))
    features.cached_embeddings(model.backbone, TEXTS[:3], progress=False)
    assert sum(encoded) == 3
    # another list, another order, a duplicate, one new sentence: only the new one is encoded
    again = features.cached_embeddings(model.backbone, mixed, progress=False)
    assert sum(encoded) == 4 and len(shards(tmp_path)) == 2
    torch.testing.assert_close(again, expected, atol=1e-6, rtol=1e-6)
    features.clear_memory_cache()  # a new process reads every shard from disk
    features.cached_embeddings(model.backbone, TEXTS, progress=False)
    assert sum(encoded) == 4


def test_many_shards_are_merged_into_one(model, tmp_path, monkeypatch):
    monkeypatch.setattr(embedding_store, "_MAX_SHARDS", 3)
    texts = [f"sentence number {i}" for i in range(6)]
    for i in range(len(texts)):
        features.cached_embeddings(model.backbone, texts[: i + 1], progress=False)
    assert len(shards(tmp_path)) <= 3
    features.clear_memory_cache()
    torch.testing.assert_close(features.cached_embeddings(model.backbone, texts, progress=False), model.embed(texts),
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("damage", ["zeroed block", "wrong shape", "wrong dtype", "not safetensors"])
def test_a_damaged_shard_is_dropped_and_its_sentences_encoded_again(model, tmp_path, damage):
    good = features.cached_embeddings(model.backbone, TEXTS, progress=False)
    (path,) = shards(tmp_path)
    tensors = load_file(path)
    with open(path, "rb") as f:
        meta = json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]
    if damage == "zeroed block":
        tensors["embeddings"][1:3] = 0
    elif damage == "wrong shape":
        tensors["embeddings"] = tensors["embeddings"][:, :16].contiguous()
    elif damage == "wrong dtype":
        tensors["embeddings"] = tensors["embeddings"].double()
    if damage == "not safetensors":
        path.write_bytes(b"partial write")
    else:
        save_file(tensors, str(path), metadata=meta)  # the metadata still claims the original content
    features.clear_memory_cache()
    with pytest.warns(UserWarning, match="damaged"):
        again = features.cached_embeddings(model.backbone, TEXTS, progress=False)
    torch.testing.assert_close(again, good, rtol=0, atol=1e-6)
    assert path.name not in [p.name for p in shards(tmp_path)] and len(shards(tmp_path)) == 1


def test_the_backbone_key_is_remembered_until_a_weight_changes(model):
    first = embedding_store.backbone_key(model.backbone)
    assert embedding_store.backbone_key(model.backbone) == first
    with torch.no_grad():
        bb.layers(model.backbone)[0].output.dense.bias.add_(1e-3)  # an in-place change: a new key
    changed = embedding_store.backbone_key(model.backbone)
    assert changed != first and changed == embedding_store._backbone_key(model.backbone)


def test_the_key_separates_pipelines_and_lists():
    assert embedding_store.texts_key(["a\0b"]) != embedding_store.texts_key(["a", "b"])  # no separator to collide on
    assert embedding_store.texts_key(["ab", "c"]) != embedding_store.texts_key(["a", "bc"])


def test_same_weights_other_pooling_is_another_key(tiny_backbone_dir):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize
    from sentence_transformers.sentence_transformer.modules import Pooling

    mean = SentenceTransformer(str(tiny_backbone_dir), device="cpu")
    cls = SentenceTransformer(modules=[mean[0], Pooling(32, "cls"), Normalize()], device="cpu")
    unnormalised = SentenceTransformer(modules=[mean[0], Pooling(32, "mean")], device="cpu")
    keys = {embedding_store.backbone_key(m) for m in (mean, cls, unnormalised)}
    assert len(keys) == 3
    out = [features.cached_embeddings(m, TEXTS, progress=False) for m in (mean, cls)]
    assert not torch.allclose(out[0], out[1])


# --- the frozen-prefix cache --------------------------------------------------------------------------------

def _loss_and_grads(model, source, task, idx):
    torch.manual_seed(123)
    model.train()
    model.zero_grad(set_to_none=True)
    labels = torch.as_tensor(task.train["label"].to_numpy()[idx])
    loss = F.cross_entropy(model(task.name, source(idx)), labels)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# fp16 hidden states carry a relative error of at most 2^-11 (4.9e-4); after the trainable layers, the pooling
# and a linear head, the loss moved by at most 7.9e-6 and any gradient entry by 1.7e-5 against the full 32-bit
# pass (measured over the cases below on this tiny backbone): the tolerances leave room and still catch a wrong
# layer or mask (each moves the loss by more than 1e-2)
LOSS_TOLERANCE, GRAD_ATOL, GRAD_RTOL = 5e-5, 2e-4, 2e-3


@pytest.mark.parametrize("k, boundary", [(1, None), (2, None), (3, None), (1, 0), (1, 1)])
def test_prefix_cache_gives_the_losses_and_gradients_of_the_full_pass(model, k, boundary):
    freezing.unfreeze_last(freezing.freeze_backbone(model), k)
    task = synthetic_task("topic", ["what", "who", "where"])
    texts = task.train["text"].tolist()
    cached = features.sentence_source(model, texts, progress=False, prefix_boundary=boundary)
    assert isinstance(cached, features.CachedPrefix) and cached.frozen_layers == 3 - k
    assert cached.boundary == (3 - k if boundary is None else min(boundary, 3 - k))
    assert cached.states.packed.data.dtype == torch.float16
    full = features.FullForward(model, texts)
    for idx in ([0, 5, 7, 11], list(range(20, 52))):
        loss_full, grads_full = _loss_and_grads(model, full, task, idx)
        loss_cached, grads_cached = _loss_and_grads(model, cached, task, idx)
        assert loss_cached == pytest.approx(loss_full, abs=LOSS_TOLERANCE)
        assert grads_cached.keys() == grads_full.keys()
        for name in grads_full:
            torch.testing.assert_close(grads_cached[name], grads_full[name], atol=GRAD_ATOL, rtol=GRAD_RTOL)


def test_one_cached_boundary_serves_every_k_above_it(model):
    freezing.unfreeze_last(freezing.freeze_backbone(model), 1)
    built = features.sentence_source(model, TEXTS, progress=False, prefix_boundary=1)
    freezing.unfreeze_last(model, 2)
    shared = features.sentence_source(model, TEXTS, progress=False, prefix_boundary=1)
    assert shared.states is built.states and shared.frozen_layers == 1 and built.frozen_layers == 2


def test_the_prefix_moves_to_disk_beyond_the_memory_cap(model, tmp_path):
    freezing.unfreeze_last(freezing.freeze_backbone(model), 1)
    in_memory = features.CachedPrefix(model, TEXTS, frozen_layers=2, progress=False)
    features.clear_memory_cache()
    on_disk = features.CachedPrefix(model, TEXTS, frozen_layers=2, progress=False, memory_cap=0)
    assert in_memory.states.file is None and on_disk.states.file is not None and on_disk.states.file.is_file()
    assert on_disk.states.file.parent == tmp_path / "cache" / "prefix"
    torch.testing.assert_close(on_disk.states.packed.data, in_memory.states.packed.data, rtol=0, atol=0)
    model.eval()
    torch.testing.assert_close(on_disk([0, 1, 2]), in_memory([0, 1, 2]), rtol=0, atol=0)
    file = on_disk.states.file
    features.clear_memory_cache()
    del on_disk
    import gc

    gc.collect()
    assert not file.exists()  # the memory-mapped store is deleted with its entry


def test_values_beyond_fp16_are_kept_in_bf16(model):
    freezing.unfreeze_last(freezing.freeze_backbone(model), 1)
    with torch.no_grad():
        bb.embeddings(model.backbone).LayerNorm.weight.mul_(1e6)  # hidden states far beyond fp16's 65504
    source = features.CachedPrefix(model, TEXTS, frozen_layers=0, progress=False)
    data = source.states.packed.data
    assert data.dtype == torch.bfloat16 and torch.isfinite(data).all()


def test_building_a_cache_keeps_frozen_parts_in_eval_mode(model):
    freezing.unfreeze_last(freezing.freeze_backbone(model), 1)
    model.train()
    modes = {name: m.training for name, m in model.named_modules()}
    layers = bb.layers(model.backbone)
    assert not layers[0].training and layers[-1].training  # frozen: eval mode (dropout off); training: train
    features.sentence_source(model, TEXTS, progress=False)  # computes in eval mode
    assert {name: m.training for name, m in model.named_modules()} == modes


def test_prefix_cache_runs_neither_the_embeddings_nor_the_frozen_layers(model):
    freezing.unfreeze_last(freezing.freeze_backbone(model), 1)
    source = features.sentence_source(model, TEXTS, progress=False)
    assert isinstance(source, features.CachedPrefix)
    calls = []
    bb.embeddings(model.backbone).register_forward_hook(lambda *a: calls.append("embeddings"))
    for i, layer in enumerate(bb.layers(model.backbone)):
        layer.register_forward_hook(lambda *a, i=i: calls.append(f"layer {i}"))
    source([0, 1])
    assert calls == ["layer 2"]
    model.sentence_embeddings(model.features(["good"]))  # a normal pass runs the whole backbone
    assert calls == ["layer 2", "embeddings", "layer 0", "layer 1", "layer 2"]


def test_sources_follow_the_freezing(model):
    freezing.freeze_backbone(model)
    assert isinstance(features.sentence_source(model, TEXTS, progress=False), features.CachedEmbeddings)
    freezing.unfreeze_last(model, 1)
    assert isinstance(features.sentence_source(model, TEXTS, progress=False), features.CachedPrefix)
    assert isinstance(features.sentence_source(model, TEXTS, use_cache=False), features.FullForward)
    freezing.unfreeze_all(model)
    assert type(features.sentence_source(model, TEXTS, progress=False)) is features.FullForward
