"""A run is one unit: `train --output DIR` writes the whole folder or nothing, one writer at a time; and the rough
edges of the command line, the caches and the library's entry points, each with the fault it injects."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
from accelerate.state import AcceleratorState
from sentence_transformers import SentenceTransformer

from mtl_utils import cli, embedding_store, features, freezing, training
from mtl_utils.cli import main
from mtl_utils.data import task_from_dataframe
from mtl_utils.model import MultiTaskModel
from mtl_utils.offline.cache import cache_dir, is_complete, writer_tag
from mtl_utils.recipes import TrainConfig

from test_cli import cli_args, workdir  # noqa: F401  (the tiny backbone without dropout, two CSV tasks)
from test_offline import _dead_pid

# Runs the command line; KILL_AT names the write during which the process kills itself (SIGKILL, no clean-up).
KILLER = '''
import os, signal, sys, pathlib
import pandas as pd
import mtl_utils.checkpoint, mtl_utils.offline.cache
from mtl_utils.cli import main

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

where = os.environ.get("KILL_AT")
if where == "checkpoint":
    mtl_utils.checkpoint.save_file = die
elif where == "history":
    pd.DataFrame.to_csv = die
elif where == "metrics":
    write_text = pathlib.Path.write_text
    pathlib.Path.write_text = lambda self, *a, **k: die() if self.name == "metrics.json" else write_text(self, *a, **k)
elif where == "swap":  # everything written, the run's folder about to replace the old one
    put = mtl_utils.offline.cache._put_in_place
    mtl_utils.offline.cache._put_in_place = lambda tmp, target: die() if target.name == "run" else put(tmp, target)
main(sys.argv[1:])
'''


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def heads_args(workdir: Path, output: str, *extra: str) -> list[str]:  # noqa: F811
    return cli_args(workdir, output, "--epochs", "1", *extra)


def run_cli(tmp_path: Path, argv: list[str], kill_at: str | None = None, **popen) -> subprocess.Popen:
    (tmp_path / "killer.py").write_text(KILLER)
    env = {**os.environ, "MTL_UTILS_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if kill_at:
        env["KILL_AT"] = kill_at
    return subprocess.Popen([sys.executable, "killer.py", *argv], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


# --- one unit, one writer -----------------------------------------------------------------------------------

def test_two_runs_into_one_new_folder_one_writes_the_other_is_refused(workdir, tmp_path):  # noqa: F811
    runs = [run_cli(tmp_path, heads_args(workdir, "new/run", "--seed", str(seed))) for seed in (1, 2)]
    results = [(proc.wait(timeout=300), proc.stdout.read(), proc.stderr.read()) for proc in runs]
    codes = sorted(code for code, _, _ in results)
    assert codes[0] == 0 and codes[1] != 0, results
    (winner,) = [r for r in results if r[0] == 0]
    (loser,) = [r for r in results if r[0] != 0]
    assert "wrote new/run/checkpoint/" in winner[1] and "wrote" not in loser[1]
    assert "--output new/run" in loser[2] and ("being written by another run" in loser[2]
                                               or "already holds a run" in loser[2]), loser[2]
    run = tmp_path / "new" / "run"
    assert is_complete(run)  # every file of one run, checksummed together
    seed = json.loads((run / "metrics.json").read_text())["config"]["train"]["seed"]
    history = pd.read_csv(run / "history.csv")
    assert f"--seed\n{seed}" in "\n".join(runs[[1, 2].index(seed)].args)  # the folder is the winner's
    assert len(history) == 4 and not leftovers(run.parent, "run")


@pytest.fixture(scope="module")
def old_run(workdir, tmp_path_factory) -> Path:  # noqa: F811
    """A finished run (seed 1) that each kill case copies and then tries to replace."""
    folder = tmp_path_factory.mktemp("old")
    first = run_cli(folder, heads_args(workdir, "run", "--seed", "1"))
    assert first.wait(timeout=300) == 0, first.stderr.read()
    return folder / "run"


@pytest.mark.parametrize("kill_at", ["checkpoint", "history", "metrics", "swap"])
def test_a_run_killed_during_any_write_leaves_the_old_run_whole(workdir, old_run, tmp_path, kill_at):  # noqa: F811
    shutil.copytree(old_run, tmp_path / "run")
    old = folder_bytes(tmp_path / "run")
    killed = run_cli(tmp_path, heads_args(workdir, "run", "--seed", "2", "--overwrite"), kill_at=kill_at)
    assert killed.wait(timeout=300) == -9
    assert folder_bytes(tmp_path / "run") == old  # the old run, every byte, with its own metrics
    assert leftovers(tmp_path, "run")  # the killed writer's temporary folder (and lock file) beside it
    if kill_at == "swap":  # the next run cleans up after it (the same clean-up whatever the kill interrupted)
        again = run_cli(tmp_path, heads_args(workdir, "run", "--seed", "2", "--overwrite"))
        assert again.wait(timeout=300) == 0, again.stderr.read()
        assert json.loads((tmp_path / "run" / "metrics.json").read_text())["config"]["train"]["seed"] == 2
        assert not leftovers(tmp_path, "run")


def test_a_killed_first_run_leaves_no_folder(workdir, tmp_path):  # noqa: F811
    killed = run_cli(tmp_path, heads_args(workdir, "fresh/run"), kill_at="metrics")
    assert killed.wait(timeout=300) == -9
    assert not (tmp_path / "fresh" / "run").exists()
    again = run_cli(tmp_path, heads_args(workdir, "fresh/run"))  # not refused as "already holds a run"
    assert again.wait(timeout=300) == 0, again.stderr.read()


def test_a_full_disk_while_writing_keeps_the_old_run(workdir, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    with contextlib.redirect_stdout(io.StringIO()):
        main(heads_args(workdir, "run"))
    old = folder_bytes(tmp_path / "run")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", full)
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(SystemExit, match="No space left on device"):
        main(heads_args(workdir, "run", "--overwrite", "--seed", "3"))
    assert folder_bytes(tmp_path / "run") == old and not leftovers(tmp_path, "run")


def test_output_is_refused_before_any_work(workdir, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "load_tasks", lambda *a, **k: pytest.fail("work began before --output was checked"))
    Path("mixed").mkdir()
    Path("mixed/notes.txt").write_text("mine")
    Path("run/checkpoint").mkdir(parents=True)
    Path("run/metrics.json").write_text("{}")
    Path("run/checkpoint/mine.txt").write_text("mine")
    for output, message in (("", "--output needs a folder name"),
                            (".", "--output . is the current folder or one above it"),
                            ("..", "--output .. is the current folder or one above it"),
                            ("mixed", r"--output mixed holds files that are not part of a run \(notes.txt\)"),
                            ("run", r"--output run: its checkpoint/ holds files that are not part of a checkpoint")):
        with pytest.raises(SystemExit, match=f"^python -m mtl_utils.cli: error: {message}"):
            main(heads_args(workdir, output, "--overwrite"))
    assert Path("mixed/notes.txt").read_text() == "mine" and Path("run/checkpoint/mine.txt").read_text() == "mine"


# --- the command line's rough edges -------------------------------------------------------------------------

def test_csv_errors_name_the_file_and_count_rows_as_a_spreadsheet_does(workdir, tmp_path):  # noqa: F811
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\ncaf\xe9 au lait,good\nbad film,bad\n".encode("latin-1"))
    nolabel = tmp_path / "nolabel.csv"
    nolabel.write_text("text,class\nhello,a\n")
    blanks = tmp_path / "blanks.csv"
    frame = pd.read_csv(workdir / "mood.csv")
    frame.loc[[4, 9], "label"] = ""
    frame.to_csv(blanks, index=False)
    for spec, message in ((f"a={empty}", f"{empty} is empty: expected a CSV file whose header row names"),
                          (f"a={latin}", f"{latin} is not UTF-8 text \\(byte 0xe9 at offset 14, line 2\\)"),
                          (f"a={nolabel}", f"--task a: {nolabel} has no 'label' column"),
                          (f"a={blanks}", r"--task a: .*blanks.csv: missing label .* in 2 rows \(CSV row 6, 11\)")):
        with pytest.raises(ValueError, match=message):
            cli.load_tasks([f"t={workdir / 'topic.csv'}", spec])


def test_options_name_themselves_when_refused(capsys):
    for argv, message in ((["--seed", "-1"], "argument --seed: must be an integer of at least 0, got '-1'"),
                          (["--split-seed", "-1"], "argument --split-seed: must be an integer of at least 0, got '-1'"),
                          (["--batch-size", "0"], "argument --batch-size: must be an integer of at least 1"),
                          (["--unfreeze-last", "x"], "argument --unfreeze-last: must be an integer of at least 0")):
        with pytest.raises(SystemExit):
            cli.parse_args(["train", *argv, "--output", "out"])
        assert message in capsys.readouterr().err


def test_a_batch_larger_than_every_training_set_is_refused(model, tasks):
    with pytest.raises(ValueError, match=r"batch_size 100000 is larger than every task's training set \(the largest "
                                         r"has 144 rows\).*at most 144"):
        training.train(model, tasks, TrainConfig(batch_size=100_000, progress=False))


def test_a_backbone_given_by_a_relative_path_is_stored_absolute(workdir, tmp_path, monkeypatch):  # noqa: F811
    shutil.copytree(workdir / "backbone", tmp_path / "bb")
    monkeypatch.chdir(tmp_path)
    with contextlib.redirect_stdout(io.StringIO()):
        main(cli_args(workdir, "run", "--epochs", "1", "--backbone", "bb"))
    saved = json.loads(Path("run/checkpoint/config.json").read_text())["backbone"]
    assert saved == str(tmp_path / "bb")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    model = MultiTaskModel.load(tmp_path / "run" / "checkpoint")  # loads its backbone from any folder
    assert model.backbone_name == saved
    # --from with the same backbone written another way is the same backbone; the tasks come from the run
    AcceleratorState._reset_state(reset_partial_state=True)
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        metrics = main(["train", "--from", str(tmp_path / "run"), "--backbone", "../bb", "--unfreeze-last", "1",
                        "--epochs", "1", "--batch-size", "8", "--cpu", "--no-progress", "--output", "staged"])
    assert "kept the" in printed.getvalue() and set(metrics["tasks"]) == {"topic", "mood"}
    assert metrics["task_specs"] == [f"topic={workdir / 'topic.csv'}", f"mood={workdir / 'mood.csv'}"]
    for split in ("val", "test"):  # accuracies with their 95% intervals
        low, high = metrics[split]["mood"]["accuracy_95"]
        assert low <= metrics[split]["mood"]["accuracy"] <= high and 0 <= low < high <= 1


def test_from_a_run_whose_files_are_gone_says_what_to_pass(workdir, tmp_path, monkeypatch):  # noqa: F811
    shutil.copy(workdir / "mood.csv", tmp_path / "mood.csv")
    monkeypatch.chdir(tmp_path)
    with contextlib.redirect_stdout(io.StringIO()):
        main(cli_args(workdir, "run", "--epochs", "1")[:5] + ["--task", "mood=mood.csv"]
             + cli_args(workdir, "run", "--epochs", "1")[7:])
    Path("mood.csv").unlink()
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(SystemExit, match=r"--from run was trained on .*mood.csv, which is no longer there; give "
                                         r"its tasks again with --task NAME=path.csv"):
        main(["train", "--from", "run", "--unfreeze-last", "1", "--cpu", "--output", "staged"])


@pytest.mark.parametrize("umask", [0o077, 0o000])
def test_cache_folders_are_0755_whatever_the_umask(tmp_path, monkeypatch, umask):
    monkeypatch.setenv("MTL_UTILS_CACHE", str(tmp_path / "c" / "ache"))
    before = os.umask(umask)
    try:
        folder = cache_dir("embeddings", "key")
    finally:
        os.umask(before)
    for path in (folder, folder.parent, folder.parent.parent, tmp_path / "c"):
        assert path.stat().st_mode & 0o777 == 0o755, path


# --- the caches ---------------------------------------------------------------------------------------------

def test_spilled_prefix_states_of_dead_processes_are_removed(model):
    folder = cache_dir("prefix")
    dead = _dead_pid()
    host = writer_tag().rsplit("-", 1)[0]
    stale = [folder / f".states.{host}-{dead}.0123abcd.tmp", folder / f"states-{dead}-0123abcd.bin"]
    for path in stale:
        path.write_bytes(b"\0" * 1024)
    freezing.unfreeze_last(freezing.freeze_backbone(model), 1)
    source = features.CachedPrefix(model, ["what a movie", "a rather quiet plot"], frozen_layers=2, progress=False,
                                   memory_cap=0)  # spills to disk
    assert not any(p.exists() for p in stale)
    spilled = source.states.file
    assert spilled.exists() and spilled.name.startswith(f".states.{writer_tag()}.")
    features.clear_memory_cache()
    del source
    import gc

    gc.collect()
    assert not spilled.exists()


def test_a_shard_from_another_backbone_is_dropped_and_a_folder_named_like_one_ignored(model, tiny_backbone_dir):
    texts = ["what a movie", "who was the actor in this long film about a story", "good"]
    exact = features.cached_embeddings(model.backbone, texts, progress=False)
    other = SentenceTransformer(str(tiny_backbone_dir), device="cpu")
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    features.cached_embeddings(other, texts, progress=False)  # the same width, another store
    ours, theirs = sorted(embedding_store.cache_dir("embeddings").iterdir(), key=lambda p: p.name != Path(
        embedding_store.embedding_store(model.backbone).folder).name)
    for shard in ours.glob("shard-*"):
        shard.unlink()
    for shard in theirs.glob("shard-*"):
        shutil.copy(shard, ours / shard.name)  # copied into our store by hand
    (ours / "shard-folder.safetensors").mkdir()
    features.clear_memory_cache()
    with pytest.warns(UserWarning, match="belongs to another backbone"):
        again = features.cached_embeddings(model.backbone, texts, progress=False)
    torch.testing.assert_close(again, exact, rtol=0, atol=1e-6)  # encoded again, not the other backbone's
    assert (ours / "shard-folder.safetensors").is_dir()


# --- the library's entry points -----------------------------------------------------------------------------

def test_misuses_of_the_library_are_clear_errors(model, tasks, tiny_backbone):
    frame = pd.DataFrame({"text": ["a", "b\ud800c", "c", "d"], "label": ["x", "y", "x", "y"]})
    for call, error, message in (
            (lambda: MultiTaskModel.load(None), TypeError, "a checkpoint is a folder: give its path"),
            (lambda: task_from_dataframe("t", [{"text": "a", "label": "x"}]), TypeError,
             r"df must be a pandas DataFrame .* got list \(pd.DataFrame\(rows\) makes one"),
            (lambda: task_from_dataframe("t", None), TypeError, "df must be a pandas DataFrame"),
            (lambda: task_from_dataframe("t", frame), ValueError, r"not valid Unicode in 1 row \(index 1\)"),
            (lambda: training.train(model, []), TypeError, "tasks must be a non-empty list of Task"),
            (lambda: training.train(model, None), TypeError, "tasks must be a non-empty list of Task"),
            (lambda: model.predict(["a text"], tasks="topic"), TypeError, r"use tasks=\['topic'\]"),
            (lambda: model.predict(["a text"], tasks=[]), ValueError, "tasks=\\[\\] asks for no task"),
            (lambda: MultiTaskModel(tiny_backbone, {"t": "ab"}), TypeError,
             r"label names must be a list of str, got 'ab' \(a str is not a list")):
        with warnings.catch_warnings(), pytest.raises(error, match=message):
            warnings.simplefilter("ignore")
            call()
