"""Checkpoints: safetensors + JSON, written atomically, read back exactly, refused on the wrong backbone or tasks;
nothing lost (refused targets, killed saves, concurrent readers) and nothing silently wrong (changed weights, clear
errors)."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import stat
import time

import huggingface_hub
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from sentence_transformers import SentenceTransformer

from mtl_utils import backbone as bb
from mtl_utils import checkpoint, freezing, training
from mtl_utils.checkpoint import (
    FORMAT,
    CheckpointError,
    backbone_weights,
    load_checkpoint,
    load_into,
    read_config,
    save_checkpoint,
)
from mtl_utils.model import MultiTaskModel
from mtl_utils.offline import cache
from mtl_utils.offline.cache import atomic_dir, fingerprint, sha256_file
from mtl_utils.recipes import TrainConfig


def test_checkpoint_round_trip(model, tasks, tiny_backbone_dir, tmp_path):
    freezing.unfreeze_last(freezing.freeze_backbone(model), 1)
    training.train(model, tasks, TrainConfig(epochs=1, backbone_lr=1e-3, progress=False))
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


# --- what saving may replace (nothing lost) ---------------------------------------------------------------

def test_save_replaces_only_a_checkpoint_or_an_empty_folder(model, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="todo.txt.*replaces only a checkpoint or an empty folder"):
        save_checkpoint(model, notes)
    assert [p.name for p in notes.iterdir()] == ["todo.txt"] and (notes / "todo.txt").read_text() == "keep me"

    hf = tmp_path / "hf"  # a folder that holds only a config.json, but not ours
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(FileExistsError, match="not part of a checkpoint"):
        save_checkpoint(model, hf)
    assert (hf / "config.json").read_text() == '{"model_type": "bert"}'

    file = tmp_path / "file"
    file.write_text("a file")
    with pytest.raises(FileExistsError, match="not a folder"):
        save_checkpoint(model, file)
    assert file.read_text() == "a file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "hf", "notes"]  # no hidden `.file.old`

    empty = tmp_path / "empty"
    empty.mkdir()
    save_checkpoint(model, empty)
    with torch.no_grad():
        model.heads["mood"].bias.add_(1.0)
    save_checkpoint(model, empty)  # a checkpoint is replaced ...
    assert torch.equal(load_checkpoint(empty, backbone=model.backbone).heads["mood"].bias, model.heads["mood"].bias)
    (empty / "weights.safetensors").write_bytes(b"damaged")
    save_checkpoint(model, empty)  # ... and so is a damaged one
    assert read_config(empty)["tasks"]["mood"] == ["bad", "good"]


def test_checkpoint_files_are_readable_by_everyone(model, tmp_path):
    folder = save_checkpoint(model, tmp_path / "ckpt")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert modes == {"weights.safetensors": 0o644, "config.json": 0o644, ".complete.json": 0o644}


# --- every changed backbone weight is saved ---------------------------------------------------------------

def _named(model, param) -> str:
    return next(n for n, p in model.backbone.named_parameters() if p is param)


def test_backbone_changes_made_outside_training_are_saved(model, tasks, tiny_backbone_dir, tmp_path):
    texts = tasks[0].test["text"].tolist()
    changed = bb.layers(model.backbone)[1].output.dense.weight
    with torch.no_grad():
        changed.add_(0.05)  # not through train(): tuned_backbone knows nothing of it
    assert not model.tuned_backbone
    expected = model.predict(texts)
    folder = save_checkpoint(model, tmp_path / "ckpt")
    assert read_config(folder)["tuned_backbone"] == [_named(model, changed)]  # that weight, and only that one
    fresh = load_checkpoint(folder, backbone=SentenceTransformer(str(tiny_backbone_dir), device="cpu"))
    pd.testing.assert_frame_equal(fresh.predict(texts), expected)
    assert torch.equal(fresh.embed(texts), model.embed(texts))
    assert fresh.tuned_backbone == {_named(model, changed)}


def test_without_the_pretrained_weights_every_backbone_weight_is_saved(tasks, tiny_backbone_dir, tmp_path):
    copy = shutil.copytree(tiny_backbone_dir, tmp_path / "copy")
    backbone = SentenceTransformer(str(copy), device="cpu")
    shutil.rmtree(copy)  # the folder it was loaded from is gone: nothing to compare with
    model = MultiTaskModel(backbone, {t.name: t.label_names for t in tasks}, backbone_name="tiny")
    with torch.no_grad():
        bb.embeddings(backbone).LayerNorm.bias.add_(0.1)
    texts = tasks[1].test["text"].tolist()
    expected = model.predict(texts)
    folder = save_checkpoint(model, tmp_path / "ckpt")
    assert read_config(folder)["tuned_backbone"] == list(backbone_weights(backbone))
    fresh = load_checkpoint(folder, backbone=SentenceTransformer(str(tiny_backbone_dir), device="cpu"))
    pd.testing.assert_frame_equal(fresh.predict(texts), expected)


def test_format_1_checkpoints_still_load(model, tasks, tiny_backbone_dir, tmp_path):
    """What the previous version wrote (heads, trained weights, one fingerprint of the rest) loads as before."""
    layer = bb.layers(model.backbone)[2]
    with torch.no_grad():
        layer.output.dense.bias.add_(0.1)
    tuned = [_named(model, p) for p in layer.output.dense.parameters()]
    tensors = {f"heads.{n}": p for n, p in model.heads.state_dict().items()}
    tensors |= {f"backbone.{n}": p for n, p in model.backbone.named_parameters() if n in tuned}
    config = {"format": "mtl_utils.checkpoint/1", "backbone": "tiny", "embedding_dim": model.embedding_dim,
              "backbone_fingerprint": fingerprint((n, p) for n, p in model.backbone.named_parameters()
                                                  if n not in tuned),
              "tasks": {t: list(v) for t, v in model.label_names.items()}, "head": model.head_config,
              "tuned_backbone": tuned}
    with atomic_dir(tmp_path / "old") as tmp:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp / "weights.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config))
    texts = tasks[0].test["text"].tolist()
    fresh = load_checkpoint(tmp_path / "old", backbone=SentenceTransformer(str(tiny_backbone_dir), device="cpu"))
    pd.testing.assert_frame_equal(fresh.predict(texts), model.predict(texts))
    with torch.no_grad():
        bb.embeddings(model.backbone).LayerNorm.weight.mul_(1.01)
    with pytest.raises(CheckpointError, match="fingerprint mismatch"):
        load_checkpoint(tmp_path / "old", backbone=model.backbone)  # a weight it does not store differs ...
    save_checkpoint(model, tmp_path / "old")  # ... and a new save replaces the old format
    assert read_config(tmp_path / "old")["format"] == FORMAT


# --- clear errors -----------------------------------------------------------------------------------------

def _rewrite(folder, name: str, text: str) -> None:
    """Replace one file of a checkpoint and re-sign the marker, as if the bad content had been saved."""
    (folder / name).write_text(text)
    files = [p for p in folder.iterdir() if p.name != ".complete.json"]
    (folder / ".complete.json").write_text(json.dumps({p.name: sha256_file(p) for p in files}))


def test_a_linear_head_checkpoint_in_an_mlp_model_names_both_kinds(model, tasks, tiny_backbone, tmp_path):
    folder = save_checkpoint(model, tmp_path / "ckpt")
    mlp = MultiTaskModel(tiny_backbone, {t.name: t.label_names for t in tasks}, head="mlp", backbone_name="tiny")
    before = {n: p.clone() for n, p in mlp.state_dict().items()}
    with pytest.raises(CheckpointError,
                       match="heads are 'linear', the model's are 'mlp' \\(hidden 256\\).*head='linear'"):
        load_into(mlp, folder)
    assert all(torch.equal(p, before[n]) for n, p in mlp.state_dict().items())  # refused before changing anything
    wide = MultiTaskModel(tiny_backbone, {t.name: t.label_names for t in tasks}, head="mlp", hidden=8,
                          backbone_name="tiny")
    save_checkpoint(wide, tmp_path / "mlp8")
    with pytest.raises(CheckpointError, match="'mlp' \\(hidden 8\\).*'mlp' \\(hidden 256\\)"):
        load_into(mlp, tmp_path / "mlp8")
    assert load_checkpoint(tmp_path / "mlp8", backbone=tiny_backbone).head_config["hidden"] == 8


@pytest.mark.parametrize("name, text, why", [
    (".complete.json", "[]", "partly written or corrupted"),
    (".complete.json", '{"config.json": 1}', "partly written or corrupted"),
    ("config.json", "[1, 2]", "holds a JSON list, not an object"),
    ("config.json", '"text"', "holds a JSON str"),
    ("config.json", "{not json", "is not JSON"),
])
def test_a_malformed_marker_or_config_is_not_a_complete_checkpoint(model, tmp_path, name, text, why):
    folder = save_checkpoint(model, tmp_path / "ckpt")
    if name == ".complete.json":
        (folder / name).write_text(text)
    else:
        _rewrite(folder, name, text)
    with pytest.raises(CheckpointError, match=f"not a complete checkpoint.*{why}"):
        load_checkpoint(folder, backbone=model.backbone)
    save_checkpoint(model, folder)  # still recognised as a (damaged) checkpoint: saving again repairs it
    load_checkpoint(folder, backbone=model.backbone)


@pytest.mark.parametrize("change, field", [
    (lambda c: c.update(head="linear"), "head"),
    (lambda c: c["head"].update(kind="transformer"), "head"),
    (lambda c: c.update(tasks=["topic", "mood"]), "tasks"),
    (lambda c: c.pop("backbone_digests"), "backbone_digests"),
    (lambda c: c.update(lora={"r": "8"}), "lora"),
    (lambda c: c.update(format="mtl_utils.checkpoint/9"), "format"),
])
def test_a_config_with_a_malformed_field_is_refused_clearly(model, tmp_path, change, field):
    folder = save_checkpoint(model, tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    change(config)
    _rewrite(folder, "config.json", json.dumps(config))
    with pytest.raises(CheckpointError, match=f"not a complete checkpoint.*{field}"):
        read_config(folder)


def test_a_missing_checkpoint_says_so(tmp_path):
    with pytest.raises(CheckpointError, match="there is no checkpoint at") as info:
        load_checkpoint(tmp_path / "nothing")
    assert isinstance(info.value, ValueError)  # callers (series.multitask_checkpoint) catch ValueError


# --- interrupted and concurrent saves ---------------------------------------------------------------------

def _save_then_hang(model, folder, written) -> None:
    """A save that is killed after writing its weights (runs in a forked process)."""
    real = checkpoint.save_file

    def save_and_wait(*args, **kwargs):
        real(*args, **kwargs)
        written.set()
        time.sleep(60)

    checkpoint.save_file = save_and_wait
    save_checkpoint(model, folder)


def test_a_killed_save_keeps_the_old_checkpoint_and_its_leftovers_are_cleaned(model, tasks, tmp_path):
    folder = save_checkpoint(model, tmp_path / "ckpt")
    texts = tasks[0].test["text"].tolist()
    expected = model.predict(texts)
    with torch.no_grad():
        model.heads["topic"].weight.mul_(2)
    fork = multiprocessing.get_context("fork")
    written = fork.Event()
    saver = fork.Process(target=_save_then_hang, args=(model, folder, written))
    saver.start()
    try:
        assert written.wait(30)
    finally:
        os.kill(saver.pid, signal.SIGKILL)
        saver.join()
    left = [p.name for p in tmp_path.iterdir() if p.name != "ckpt"]
    assert len(left) == 1 and f"-{saver.pid}." in left[0]  # the killed writer's temporary, named after it
    pd.testing.assert_frame_equal(load_checkpoint(folder, backbone=model.backbone).predict(texts), expected)
    save_checkpoint(model, tmp_path / "other")  # the next save next to it cleans up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "other"]


def _save_versions(model, heads, folder, reads, two_renames: bool) -> None:
    """Save two versions in turn (runs in a forked process) until the reader has read 150 times; the head seed
    tells them apart."""
    if two_renames:
        cache._exchange = lambda a, b: False  # as on a file system that cannot swap folders
    for i in range(10_000):
        if reads.value >= 150:
            break
        model.heads.load_state_dict(heads[i % 2])
        model.head_config["seed"] = i % 2
        save_checkpoint(model, folder)


@pytest.mark.parametrize("two_renames", [False, True], ids=["exchange", "two-renames"])
def test_readers_get_the_old_or_the_new_checkpoint_while_another_process_saves(model, tmp_path, two_renames):
    heads = [{n: p.clone() for n, p in model.heads.state_dict().items()}]
    heads.append({n: p + 1 for n, p in heads[0].items()})
    folder = save_checkpoint(model, tmp_path / "ckpt")
    fork = multiprocessing.get_context("fork")
    reads = fork.Value("i", 0)
    writer = fork.Process(target=_save_versions, args=(model, heads, folder, reads, two_renames))
    writer.start()
    seen = []
    try:
        while writer.is_alive():
            loaded = load_checkpoint(folder, backbone=model.backbone)  # never missing, never a FileNotFoundError
            version = loaded.head_config["seed"]
            assert all(torch.equal(p, heads[version][n]) for n, p in loaded.heads.state_dict().items())
            seen.append(version)
            reads.value += 1
    finally:
        reads.value = 10_000
        writer.join(30)
    assert writer.exitcode == 0 and {0, 1} <= set(seen)  # both versions were read while the writer ran
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_backbone_from_the_hub_is_compared_with_its_download(model, tiny_backbone_dir, tmp_path, monkeypatch):
    """Online users load hub ids: the pre-trained weights are then in the local hub cache (no network needed)."""
    hub = tmp_path / "hub"
    snapshot = hub / "models--someone--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    shutil.copy(tiny_backbone_dir / "model.safetensors", snapshot)
    (hub / "models--someone--tiny" / "refs").mkdir()
    (hub / "models--someone--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    bb.transformer(model.backbone).config._name_or_path = "someone/tiny"  # as after loading by hub id
    assert read_config(save_checkpoint(model, tmp_path / "ckpt"))["tuned_backbone"] == []  # heads only
    bb.transformer(model.backbone).config._name_or_path = "someone/not-downloaded"
    assert len(read_config(save_checkpoint(model, tmp_path / "ckpt"))["tuned_backbone"]) == len(
        backbone_weights(model.backbone))  # nothing to compare with: every weight is kept
