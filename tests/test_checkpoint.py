"""Checkpoints: safetensors + JSON, written atomically, read back exactly, refused on the wrong backbone or tasks;
nothing lost (refused targets, killed saves, concurrent readers) and nothing silently wrong (changed weights, clear
errors)."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import stat
import time

import pandas as pd
import pytest
import torch
from sentence_transformers import SentenceTransformer

from mtl_utils import backbone as bb
from mtl_utils import checkpoint, freezing, training
from mtl_utils.checkpoint import CheckpointError, read_config
from mtl_utils.model import MultiTaskModel
from mtl_utils.offline import cache
from mtl_utils.offline.cache import sha256_file
from mtl_utils.recipes import TrainConfig


def test_checkpoint_round_trip(model, tasks, tiny_backbone_dir, tmp_path):
    freezing.unfreeze_last(freezing.freeze_backbone(model), 1)
    training.train(model, tasks, TrainConfig(epochs=1, backbone_lr=1e-3, progress=False))
    texts = tasks[0].test["text"].tolist()
    expected = model.predict(texts)
    folder = model.save(tmp_path / "ckpt")
    assert json.loads((folder / "config.json").read_text())["tasks"]["mood"] == ["bad", "good"]
    fresh = MultiTaskModel.load(folder, backbone=SentenceTransformer(str(tiny_backbone_dir), device="cpu"))
    pd.testing.assert_frame_equal(fresh.predict(texts), expected)

    # another backbone, other tasks, or a damaged folder are refused
    other = SentenceTransformer(str(tiny_backbone_dir), device="cpu")
    with torch.no_grad():
        other[0].auto_model.embeddings.word_embeddings.weight.mul_(1.01)
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        MultiTaskModel.load(folder, backbone=other)
    single = MultiTaskModel(SentenceTransformer(str(tiny_backbone_dir)), {"mood": ("bad", "good")}, backbone_name="tiny")
    with pytest.raises(ValueError, match="checkpoint tasks"):
        single.load_weights(folder)
    (folder / "weights.safetensors").write_bytes(b"partial")
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        MultiTaskModel.load(folder, backbone=other)


# --- what saving may replace (nothing lost) ---------------------------------------------------------------

def test_save_replaces_only_a_checkpoint_or_an_empty_folder(model, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="todo.txt.*replaces only a checkpoint or an empty folder"):
        model.save(notes)
    assert [p.name for p in notes.iterdir()] == ["todo.txt"] and (notes / "todo.txt").read_text() == "keep me"

    hf = tmp_path / "hf"  # a folder that holds only a config.json, but not ours
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(FileExistsError, match="not part of a checkpoint"):
        model.save(hf)
    assert (hf / "config.json").read_text() == '{"model_type": "bert"}'

    file = tmp_path / "file"
    file.write_text("a file")
    with pytest.raises(FileExistsError, match="not a folder"):
        model.save(file)
    assert file.read_text() == "a file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "hf", "notes"]  # no hidden `.file.old`

    empty = tmp_path / "empty"
    empty.mkdir()
    model.save(empty)
    with torch.no_grad():
        model.heads["mood"].bias.add_(1.0)
    model.save(empty)  # a checkpoint is replaced ...
    assert torch.equal(MultiTaskModel.load(empty, backbone=model.backbone).heads["mood"].bias, model.heads["mood"].bias)
    (empty / "weights.safetensors").write_bytes(b"damaged")
    model.save(empty)  # ... and so is a damaged one
    assert read_config(empty)["tasks"]["mood"] == ["bad", "good"]


def test_checkpoint_files_are_readable_by_everyone(model, tmp_path):
    folder = model.save(tmp_path / "ckpt")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert modes == {"weights.safetensors": 0o644, "config.json": 0o644, ".complete.json": 0o644}


# --- every changed backbone weight is saved ---------------------------------------------------------------

def _named(model, param) -> str:
    return next(n for n, p in model.backbone.named_parameters() if p is param)


def test_a_backbone_changed_before_the_model_was_built_is_refused_by_name(tasks, tiny_backbone_dir, tmp_path):
    backbone = SentenceTransformer(str(tiny_backbone_dir), device="cpu")
    with torch.no_grad():
        bb.embeddings(backbone).LayerNorm.bias.add_(0.1)  # before the model exists: part of the backbone it was given
    model = MultiTaskModel(backbone, {t.name: t.label_names for t in tasks}, backbone_name="tiny")
    folder = model.save(tmp_path / "ckpt")
    assert read_config(folder)["tuned_backbone"] == []
    pd.testing.assert_frame_equal(MultiTaskModel.load(folder, backbone=backbone).predict(["a question"]),
                                  model.predict(["a question"]))
    with pytest.raises(CheckpointError, match=r"1 of its weights \(.*embeddings.LayerNorm.bias; fingerprint mismatch"):
        MultiTaskModel.load(folder, backbone=SentenceTransformer(str(tiny_backbone_dir), device="cpu"))


def test_backbone_changes_made_outside_training_are_saved(model, tasks, tiny_backbone_dir, tmp_path):
    texts = tasks[0].test["text"].tolist()
    changed = bb.layers(model.backbone)[1].output.dense.weight
    with torch.no_grad():
        changed.add_(0.05)  # not through train(): tuned_backbone knows nothing of it
    assert not model.tuned_backbone
    expected = model.predict(texts)
    folder = model.save(tmp_path / "ckpt")
    assert read_config(folder)["tuned_backbone"] == [_named(model, changed)]  # that weight, and only that one
    fresh = MultiTaskModel.load(folder, backbone=SentenceTransformer(str(tiny_backbone_dir), device="cpu"))
    pd.testing.assert_frame_equal(fresh.predict(texts), expected)
    assert torch.equal(fresh.embed(texts), model.embed(texts))
    assert fresh.tuned_backbone == {_named(model, changed)}


# --- clear errors -----------------------------------------------------------------------------------------

def _rewrite(folder, name: str, text: str) -> None:
    """Replace one file of a checkpoint and re-sign the marker, as if the bad content had been saved."""
    (folder / name).write_text(text)
    files = [p for p in folder.iterdir() if p.name != ".complete.json"]
    (folder / ".complete.json").write_text(json.dumps({p.name: sha256_file(p) for p in files}))


def test_a_linear_head_checkpoint_in_an_mlp_model_names_both_kinds(model, tasks, tiny_backbone, tmp_path):
    folder = model.save(tmp_path / "ckpt")
    mlp = MultiTaskModel(tiny_backbone, {t.name: t.label_names for t in tasks}, head="mlp", backbone_name="tiny")
    before = {n: p.clone() for n, p in mlp.state_dict().items()}
    with pytest.raises(CheckpointError,
                       match="heads are 'linear', the model's are 'mlp' \\(hidden 256\\).*head='linear'"):
        mlp.load_weights(folder)
    assert all(torch.equal(p, before[n]) for n, p in mlp.state_dict().items())  # refused before changing anything
    wide = MultiTaskModel(tiny_backbone, {t.name: t.label_names for t in tasks}, head="mlp", hidden=8,
                          backbone_name="tiny")
    wide.save(tmp_path / "mlp8")
    with pytest.raises(CheckpointError, match="'mlp' \\(hidden 8\\).*'mlp' \\(hidden 256\\)"):
        mlp.load_weights(tmp_path / "mlp8")
    assert MultiTaskModel.load(tmp_path / "mlp8", backbone=tiny_backbone).head_config["hidden"] == 8


@pytest.mark.parametrize("name, text, why", [
    (".complete.json", "[]", "partly written or corrupted"),
    (".complete.json", '{"config.json": 1}', "partly written or corrupted"),
    ("config.json", "[1, 2]", "holds a JSON list, not an object"),
    ("config.json", '"text"', "holds a JSON str"),
    ("config.json", "{not json", "is not JSON"),
])
def test_a_malformed_marker_or_config_is_not_a_complete_checkpoint(model, tmp_path, name, text, why):
    folder = model.save(tmp_path / "ckpt")
    if name == ".complete.json":
        (folder / name).write_text(text)
    else:
        _rewrite(folder, name, text)
    with pytest.raises(CheckpointError, match=f"not a complete checkpoint.*{why}"):
        MultiTaskModel.load(folder, backbone=model.backbone)
    model.save(folder)  # still recognised as a (damaged) checkpoint: saving again repairs it
    MultiTaskModel.load(folder, backbone=model.backbone)


@pytest.mark.parametrize("change, field", [
    (lambda c: c.update(head="linear"), "head"),
    (lambda c: c["head"].update(kind="transformer"), "head"),
    (lambda c: c.update(tasks=["topic", "mood"]), "tasks"),
    (lambda c: c.pop("backbone_digests"), "backbone_digests"),
    (lambda c: c.update(lora={"r": "8"}), "lora"),
    (lambda c: c.update(format="mtl_utils.checkpoint/9"), "format"),
])
def test_a_config_with_a_malformed_field_is_refused_clearly(model, tmp_path, change, field):
    folder = model.save(tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    change(config)
    _rewrite(folder, "config.json", json.dumps(config))
    with pytest.raises(CheckpointError, match=f"not a complete checkpoint.*{field}"):
        read_config(folder)


def test_a_missing_checkpoint_says_so(tmp_path):
    with pytest.raises(CheckpointError, match="there is no checkpoint at") as info:
        MultiTaskModel.load(tmp_path / "nothing")
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
    model.save(folder)


def test_a_killed_save_keeps_the_old_checkpoint_and_its_leftovers_are_cleaned(model, tasks, tmp_path):
    folder = model.save(tmp_path / "ckpt")
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
    pd.testing.assert_frame_equal(MultiTaskModel.load(folder, backbone=model.backbone).predict(texts), expected)
    model.save(tmp_path / "other")  # the next save next to it cleans up
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
        model.save(folder)


@pytest.mark.parametrize("two_renames", [False, True], ids=["exchange", "two-renames"])
def test_readers_get_the_old_or_the_new_checkpoint_while_another_process_saves(model, tmp_path, two_renames):
    heads = [{n: p.clone() for n, p in model.heads.state_dict().items()}]
    heads.append({n: p + 1 for n, p in heads[0].items()})
    folder = model.save(tmp_path / "ckpt")
    fork = multiprocessing.get_context("fork")
    reads = fork.Value("i", 0)
    writer = fork.Process(target=_save_versions, args=(model, heads, folder, reads, two_renames))
    writer.start()
    seen = []
    try:
        while writer.is_alive():
            loaded = MultiTaskModel.load(folder, backbone=model.backbone)  # never missing, never a FileNotFoundError
            version = loaded.head_config["seed"]
            assert all(torch.equal(p, heads[version][n]) for n, p in loaded.heads.state_dict().items())
            seen.append(version)
            reads.value += 1
    finally:
        reads.value = 10_000
        writer.join(30)
    assert writer.exitcode == 0 and {0, 1} <= set(seen)  # both versions were read while the writer ran
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
