"""The command line (`python -m mtl_utils.cli`), and the same training in two CPU processes (torchrun, gloo)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer

from mtl_utils import cli, evaluation, features, freezing
from mtl_utils.cli import build_parser, load_tasks, main, parse_args, train_config
from mtl_utils.data import DataWarning
from mtl_utils.evaluation import evaluate
from mtl_utils.model import MultiTaskModel
from mtl_utils.recipes import TrainConfig, finetune_config

from helpers import synthetic_task

WORDS = "the a movie film plot actor story scene was is very quite rather".split()

# Two processes sum each batch in another order than one (each averages its half, then DDP averages the
# halves), so gradients differ in the last float32 bits. After the Adam steps below, weights, losses and
# scores stay within 1.5e-7 of the one-process run (measured); 1e-5 leaves room for other CPUs' kernels and
# still catches a wrong split (two processes training on different whole batches move the weights by far more).
TOLERANCE = 1e-5

# Counts this process's backbone forward passes, then runs the command line unchanged.
SPY = '''
import json, os, sys
from sentence_transformers import SentenceTransformer
from mtl_utils.cli import main

calls = []
forward = SentenceTransformer.forward
SentenceTransformer.forward = lambda self, *a, **k: calls.append(1) or forward(self, *a, **k)
main(sys.argv[1:])
with open(f"backbone_calls.{os.environ['RANK']}.json", "w") as f:
    json.dump(len(calls), f)
'''


def write_task_csv(path: Path, cues: list[str], n: int, seed: int) -> None:
    """Filler-word sentences with one cue word that decides the label, as a text,label CSV."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        words = list(rng.choice(WORDS, rng.integers(3, 12)))
        words.insert(int(rng.integers(0, len(words))), cues[i % len(cues)])
        rows.append({"text": " ".join(words), "label": cues[i % len(cues)]})
    pd.DataFrame(rows).to_csv(path, index=False)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_backbone_dir) -> Path:
    """The tiny backbone without dropout, and two CSV tasks: topic (150 rows) and mood (131 rows)."""
    folder = tmp_path_factory.mktemp("cli")
    # dropout draws other masks when a batch is split over processes: without it, runs can agree exactly
    shutil.copytree(tiny_backbone_dir, folder / "backbone")
    config_file = folder / "backbone" / "config.json"
    config = json.loads(config_file.read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config_file.write_text(json.dumps(config))
    write_task_csv(folder / "topic.csv", ["what", "who", "where"], 150, seed=0)
    write_task_csv(folder / "mood.csv", ["good", "bad"], 131, seed=1)
    return folder


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps one state per process (device, precision); reset it, as Accelerate's own tests do."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


WHAT_TRAINS = {"heads": [], "last layer": ["--unfreeze-last", "1"]}


def cli_args(workdir: Path, output: str, *extra: str) -> list[str]:
    # 120 topic and 105 mood training rows in global batches of 8: 4 examples on each of two processes; mood's
    # last batch of an epoch is topped up with examples from the start of that epoch, so it splits evenly too
    return ["train", "--backbone", str(workdir / "backbone"), "--task", f"topic={workdir / 'topic.csv'}",
            "--task", f"mood={workdir / 'mood.csv'}", "--epochs", "2", "--batch-size", "8", "--head-lr", "0.05",
            "--backbone-lr", "3e-3", "--cpu", "--no-progress", "--output", output, *extra]


@pytest.fixture(scope="module")
def one_process(workdir, tmp_path_factory):
    """Runs the command line in this process (once per setting, shared): its folder, metrics and printout."""
    runs = {}

    def run(what_trains: str) -> tuple[Path, dict, str]:
        if what_trains not in runs:
            folder = tmp_path_factory.mktemp("one")
            with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()) as printed:
                mp.chdir(folder)
                mp.setenv("MTL_UTILS_CACHE", str(folder / "cache"))
                metrics = main(cli_args(workdir, "run", *WHAT_TRAINS[what_trains]))
            runs[what_trains] = folder, metrics, printed.getvalue()
        return runs[what_trains]

    return run


def test_help_documents_every_option(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(["train", "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    train_parser = parser._subparsers._group_actions[0].choices["train"]
    flags = {flag for action in train_parser._actions for flag in action.option_strings}
    assert {"--backbone", "--task", "--freeze", "--freeze-head", "--unfreeze-last", "--unfreeze-embeddings", "--head",
            "--epochs", "--batch-size", "--head-lr", "--backbone-lr", "--layer-lr-decay", "--sampling", "--seed",
            "--mixed-precision", "--output", "--no-progress"} <= flags
    for action in train_parser._actions:
        assert action.help, f"{action.option_strings} has no help"
        assert all(flag in text for flag in action.option_strings)
    assert "torchrun" in text and "accelerate launch" in text


def test_parse_args_defaults_and_errors(capsys):
    args = parse_args(["train", "--output", "out"])
    assert args.tasks == ["trec", "movies"] and args.freeze == "backbone" and args.mixed_precision == "no"
    assert train_config(args) == TrainConfig(progress=True)  # the command line's defaults are the library's
    config = train_config(parse_args(["train", "--output", "out", "--max-grad-norm", "0", "--no-cache",
                                      "--layer-lr-decay", "0.95", "--sampling", "temperature", "--no-progress"]))
    assert config.max_grad_norm is None and not config.use_cache and config.layer_lr_decay == 0.95
    assert config.sampling == "temperature" and not config.progress
    for argv, message in ((["--unfreeze-embeddings"], "--unfreeze-last"), (["--freeze", "all"], "invalid choice"),
                          (["--epochs", "0"], "argument --epochs: must be an integer of at least 1, got '0'"),
                          (["--head-lr", "nan"], "head_lr must be a finite number"),
                          (["--temperature", "0"], "temperature must be a finite number above 0")):
        with pytest.raises(SystemExit) as stop:
            parse_args(["train", *argv, "--output", "out"])
        assert stop.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["train"])
    assert "--output" in capsys.readouterr().err


def test_the_command_line_knows_the_library_s_names():
    from mtl_utils import cli, freezing, model, training

    assert model.HEAD_KINDS == cli.HEAD_KINDS and set(freezing._SCENARIOS) == set(cli.FREEZE_SCENARIOS)
    assert training.TrainConfig is cli.TrainConfig


def test_help_answers_without_loading_torch():
    code = "import sys; from mtl_utils.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.stdout.strip() == "False", run.stderr


def test_load_tasks_from_csv(workdir, tmp_path):
    topic, mood = load_tasks([f"topic={workdir / 'topic.csv'}", f"mood={workdir / 'mood.csv'}"])
    assert topic.label_names == ("what", "where", "who") and mood.label_names == ("bad", "good")
    assert (len(topic.train), len(topic.val), len(topic.test)) == (120, 15, 15)
    bad = tmp_path / "bad.csv"
    bad.write_text("text,category\nhello,a\n")
    with pytest.raises(ValueError, match="no 'label' column"):
        load_tasks([f"bad={bad}"])
    with pytest.raises(ValueError, match="unknown task 'imdb'.*trec, movies"):
        load_tasks(["imdb"])
    with pytest.raises(ValueError, match="two tasks are named 't'"):
        load_tasks([f"t={workdir / 'mood.csv'}", f"t={workdir / 'mood.csv'}"])


def test_single_process_run_writes_checkpoint_history_and_metrics(workdir, one_process, monkeypatch):
    folder, metrics, printed = one_process("last layer")
    monkeypatch.chdir(folder)
    assert "wrote run/checkpoint/, run/history.csv and run/metrics.json" in printed
    assert str(folder) not in printed  # paths are shown relative to the working folder

    saved = json.loads(Path("run/metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert saved["world_size"] == 1 and saved["device"] == "cpu" and saved["mixed_precision"] == "no"
    assert saved["tasks"]["topic"] == {"labels": ["what", "where", "who"], "train": 120, "val": 15, "test": 15}
    assert saved["config"]["train"]["batch_size"] == 8 and saved["config"]["command_line"]["unfreeze_last"] == 1
    assert saved["elapsed_seconds"] > 0 and saved["trainable_parameters"] > 0
    history = pd.read_csv("run/history.csv")
    assert list(history.columns) == ["epoch", "task", "train_loss", "val_loss", "val_accuracy", "val_f1_macro",
                                     "seconds", "best"]
    best = history[history.best].set_index("task")
    assert (best.epoch == saved["best_epoch"]).all()
    for task in ("topic", "mood"):  # the best epoch's weights were kept: its validation scores are the final ones
        assert saved["val"][task]["accuracy"] == pytest.approx(best.loc[task, "val_accuracy"])
        assert set(saved["test"][task]) == {"accuracy", "accuracy_95", "f1_macro", "loss"}

    # the checkpoint loads onto the backbone and scores the test set as the run reported
    model = MultiTaskModel.load("run/checkpoint", backbone=SentenceTransformer(str(workdir / "backbone"), device="cpu"))
    assert model.tuned_backbone and all(n.startswith("0.model.encoder.layer.2.") for n in model.tuned_backbone)
    for task in load_tasks([f"topic={workdir / 'topic.csv'}", f"mood={workdir / 'mood.csv'}"]):
        assert evaluate(model, task, "test")["accuracy"] == pytest.approx(saved["test"][task.name]["accuracy"])


def test_command_line_errors_are_one_line(workdir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="nothing to train with --freeze everything"):
        main(cli_args(workdir, "run", "--freeze", "everything"))
    with pytest.raises(SystemExit):  # caught when the command line is read, before any work
        main(cli_args(workdir, "run", "--freeze-head", "topics"))
    assert "unknown task 'topics' in --select-on/--freeze-head; the tasks are: topic, mood" in capsys.readouterr().err
    AcceleratorState._reset_state(reset_partial_state=True)  # a process has one precision: start a new one
    with pytest.raises(SystemExit, match="fp16 needs a GPU"):
        main(cli_args(workdir, "run", "--mixed-precision", "fp16"))
    assert not Path("run").exists()


def test_mixed_precision_bf16_trains_like_fp32(workdir, one_process, tmp_path, monkeypatch):
    """--mixed-precision bf16 (Accelerate's wrapper and the loop's autocast per step) follows the fp32 run."""
    one_folder, fp32, _ = one_process("last layer")
    AcceleratorState._reset_state(reset_partial_state=True)  # a process has one precision: start a new one
    monkeypatch.chdir(tmp_path)
    with contextlib.redirect_stdout(io.StringIO()):
        bf16 = main(cli_args(workdir, "bf16", *WHAT_TRAINS["last layer"], "--mixed-precision", "bf16"))
    assert bf16["mixed_precision"] == "bf16" and bf16["config"]["train"]["mixed_precision"] == "bf16"
    history = {name: pd.read_csv(folder / "history.csv").set_index(["epoch", "task"])
               for name, folder in (("fp32", one_folder / "run"), ("bf16", tmp_path / "bf16"))}
    assert (history["fp32"].val_loss.loc[0] - history["fp32"].val_loss.loc[2]).min() > 0.01  # fp32 learns
    assert (history["bf16"].val_loss - history["fp32"].val_loss).abs().max() < 0.01
    for task in ("topic", "mood"):  # the saved model, read in fp32, scores what the fp32 run's does
        assert bf16["test"][task]["loss"] == pytest.approx(fp32["test"][task]["loss"], abs=0.01)


@pytest.mark.parametrize("what_trains", list(WHAT_TRAINS))
def test_two_processes_match_one(workdir, one_process, tmp_path, monkeypatch, what_trains):
    """torchrun, 2 CPU processes on gloo: same numbers as one process with the same global batch."""
    one_folder, _, _ = one_process(what_trains)
    monkeypatch.chdir(tmp_path)

    # "heads": the backbone is frozen, its embeddings come from the disk cache; a spy counts each process's
    # backbone passes. "last layer": DDP syncs backbone gradients; the plain command runs.
    program = ["-m", "mtl_utils.cli"]
    if what_trains == "heads":
        (tmp_path / "spy.py").write_text(SPY)
        program = ["spy.py"]
    env = {**os.environ, "MTL_UTILS_CACHE": str(tmp_path / "cache2"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               *program, *cli_args(workdir, "two", *WHAT_TRAINS[what_trains])]
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "on 2 process(es)" in run.stdout and run.stdout.count("wrote") == 1  # only the first process writes

    runs = {"one": one_folder / "run", "two": tmp_path / "two"}
    one, two = (json.loads((runs[name] / "metrics.json").read_text()) for name in ("one", "two"))
    assert (one["world_size"], two["world_size"]) == (1, 2) and one["best_epoch"] == two["best_epoch"]
    for split in ("val", "test"):
        for task in ("topic", "mood"):
            assert two[split][task]["accuracy"] == one[split][task]["accuracy"]
            assert two[split][task]["loss"] == pytest.approx(one[split][task]["loss"], abs=TOLERANCE)
    weights = {name: load_file(runs[name] / "checkpoint" / "weights.safetensors") for name in runs}
    assert weights["one"].keys() == weights["two"].keys()
    assert any(k.startswith("backbone.") for k in weights["one"]) == (what_trains == "last layer")
    for key, value in weights["one"].items():
        if key.endswith("attention.self.key.bias"):
            # it shifts all attention scores of a query alike, which softmax ignores: its gradient is rounding
            # noise, which Adam turns into steps of +-lr (measured 1.5e-4 apart); it changes no output
            continue
        torch.testing.assert_close(weights["two"][key], value, atol=TOLERANCE, rtol=0, msg=key)
    history = {name: pd.read_csv(runs[name] / "history.csv").drop(columns="seconds") for name in runs}
    pd.testing.assert_frame_equal(history["two"], history["one"], check_exact=False, atol=TOLERANCE, rtol=0)

    if what_trains == "heads":
        # the first process computed and wrote every embedding; the second read them and never ran the backbone
        calls = [json.loads(Path(f"backbone_calls.{rank}.json").read_text()) for rank in (0, 1)]
        assert calls[0] > 0 and calls[1] == 0, calls
        (store,) = (tmp_path / "cache2" / "embeddings").iterdir()  # one backbone
        entries = sorted(store.iterdir())  # a shard per split computed: train, val (training), test (metrics)
        assert len(entries) == 6 and all(p.name.startswith("shard-") and p.suffix == ".safetensors" for p in entries)
        stamps = {p.name: p.stat().st_mtime_ns for p in entries}
        monkeypatch.setenv("MTL_UTILS_CACHE", str(tmp_path / "cache2"))
        features.clear_memory_cache()
        backbone = SentenceTransformer(str(workdir / "backbone"), device="cpu")
        for task in load_tasks([f"topic={workdir / 'topic.csv'}", f"mood={workdir / 'mood.csv'}"]):
            for split in ("train", "val", "test"):
                texts = task.split(split)["text"].tolist()
                torch.testing.assert_close(features.cached_embeddings(backbone, texts, progress=False),
                                           backbone.encode(texts, convert_to_tensor=True), atol=1e-5, rtol=0)
        # every entry was read as written, none rebuilt: each is complete and holds the right embeddings
        assert {p.name: p.stat().st_mtime_ns for p in entries} == stamps



# ---------- issue 13: nothing lost, nothing silently wrong ----------

def test_help_answers_in_under_a_second_without_torch():
    code = ("import runpy, sys, time; start = time.perf_counter(); sys.argv = ['mtl_utils.cli', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('mtl_utils.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, file=sys.stderr)")
    for argv in (["--help"], ["train", "--help"]):
        check = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60)
        assert check.stderr.strip() == "False" and "usage:" in check.stdout, check.stderr
        seconds = []
        for _ in range(3):  # the fastest of three: the machine may be busy with other work
            start = time.perf_counter()
            run = subprocess.run([sys.executable, "-m", "mtl_utils.cli", *argv], capture_output=True, text=True,
                                 timeout=60)
            seconds.append(time.perf_counter() - start)
            assert run.returncode == 0 and "usage:" in run.stdout
        assert min(seconds) < 1.0, (argv, seconds)


def unwritable_folder(tmp_path: Path) -> Path:
    """An existing folder nobody can write into (as root, a read-only system folder)."""
    if os.geteuid() != 0:
        folder = tmp_path / "locked"
        folder.mkdir()
        folder.chmod(0o500)
        return folder
    for folder in (Path("/proc/self"), Path("/sys")):
        try:
            with open(folder / ".mtl-write-test", "w"):
                pass
        except OSError:
            return folder
    pytest.skip("no folder here refuses writes")


def test_output_is_checked_before_any_work(workdir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "load_tasks", lambda *a, **k: pytest.fail("work began before --output was checked"))
    Path("afile").write_text("not a folder")
    Path("old").mkdir()
    Path("old/metrics.json").write_text("{}")
    locked = unwritable_folder(tmp_path)
    for output, message in (("afile", r"--output afile is a file, not a folder"),
                            ("afile/run", r"--output afile/run lies under afile, which is a file"),
                            ("old", r"--output old already holds a run \(metrics\.json\); choose another folder, or "
                                    r"add --overwrite to replace it"),
                            (str(locked), f"--output {locked} is not writable"),
                            (str(locked / "run"), f"--output {locked / 'run'} is not writable")):
        with pytest.raises(SystemExit, match=f"^python -m mtl_utils.cli: error: {message}"):
            main(cli_args(workdir, output))
    assert Path("afile").read_text() == "not a folder" and Path("old/metrics.json").read_text() == "{}"
    assert not (locked / "run").exists() and sorted(os.listdir("old")) == ["metrics.json"]


def test_a_diverged_run_exits_with_one_line_and_saves_nothing(workdir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # a real divergence: AdamW at 1e38 sends the head weights to infinity within a few steps
    with pytest.raises(SystemExit) as stop:
        main(cli_args(workdir, "new/run", "--head-lr", "1e38"))
    message = stop.value.code
    assert isinstance(message, str) and "\n" not in message  # exit status 1, one line
    assert message.startswith("python -m mtl_utils.cli: error: the loss became ")
    assert " at epoch 1, step " in message and "nothing was kept" in message
    assert not Path("new").exists()  # not even the folder the run created


def write_csv(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_csv_problems_are_caught_as_the_library_catches_them(workdir, tmp_path):
    clean = pd.read_csv(workdir / "mood.csv")
    blank = clean.copy()
    blank.loc[[4, 9], "label"] = ["", "   "]  # an empty cell is read as "" (keep_default_na=False): not a class
    with pytest.raises(ValueError, match=r"--task mood: .*blank.csv: missing label \(None, NaN or blank\) in 2 rows \(CSV row 6, 11\)"):
        load_tasks([f"mood={write_csv(tmp_path / 'blank.csv', blank.to_dict('records'))}"])
    path = workdir / "mood.csv"
    for spec, message in ((f"my.task={path}", "contains '.'"), (f"={path}", "non-empty str"),
                          (f"train={path}", "taken by PyTorch"), ("mood=", "names no file")):
        with pytest.raises(ValueError, match=message):
            load_tasks([spec])
    with pytest.raises(SystemExit):
        parse_args(["train", "--task", f"my.task={path}", "--output", "out"])  # before any work

    # duplicates: dropped (one copy stays) unless --duplicates keep; a warning counts them either way
    twice = pd.concat([clean, clean.iloc[:7]])
    twice_path = write_csv(tmp_path / "twice.csv", twice.to_dict("records"))
    with pytest.warns(DataWarning, match="task 'mood': dropped 7 rows that repeat another row's text and label"):
        (dropped,) = load_tasks([f"mood={twice_path}"])
    with pytest.warns(DataWarning, match="7 rows repeat another row's text and label"):
        (kept,) = load_tasks([f"mood={twice_path}"], duplicates="keep")
    sizes = [sum(len(t.split(s)) for s in ("train", "val", "test")) for t in (dropped, kept)]
    assert sizes == [len(clean), len(clean) + 7]


def test_a_split_column_gives_your_own_test_set(workdir, tmp_path):
    frame = pd.read_csv(workdir / "topic.csv")
    frame["split"] = ["test" if i % 5 == 0 else "train" for i in range(len(frame))]
    (task,) = load_tasks([f"topic={write_csv(tmp_path / 'own.csv', frame.to_dict('records'))}"])
    assert task.test["text"].tolist() == frame.loc[frame["split"] == "test", "text"].tolist()
    assert (len(task.train), len(task.val), len(task.test)) == (108, 12, 30)  # val: 10% of the 120 train rows
    assert set(task.val["text"]) <= set(frame.loc[frame["split"] == "train", "text"])
    frame.loc[3, "split"] = "dev"
    with pytest.raises(ValueError, match=r"bad.csv: split values 'dev' in 1 row \(CSV row 5\).*accepts train, val, test"):
        load_tasks([f"topic={write_csv(tmp_path / 'bad.csv', frame.to_dict('records'))}"])


def test_layers_training_takes_the_finetune_recipe_unless_told(capsys):
    def config(*extra: str) -> TrainConfig:
        return train_config(parse_args(["train", "--output", "out", *extra]))

    assert config() == TrainConfig()  # heads only: the heads recipe
    assert config("--unfreeze-last", "2") == finetune_config()
    assert config("--freeze", "nothing") == finetune_config()
    assert config("--unfreeze-last", "2", "--epochs", "5", "--head-lr", "0.003") == finetune_config(epochs=5,
                                                                                                   head_lr=0.003)
    assert config("--unfreeze-last", "0") == TrainConfig()  # no layer trains
    chosen = config("--select-on", "movies", "--selection", "no_task_worse", "--class-weights", "balanced")
    assert (chosen.select_on, chosen.selection, chosen.class_weights) == (["movies"], "no_task_worse", "balanced")
    with pytest.raises(SystemExit):
        config("--select-on", "imdb")
    assert "unknown task 'imdb' in --select-on" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "finetune_config() (fewer epochs, smaller rates) when backbone layers train" in text
    assert "epochs (default: 20; 2 when layers train: finetune_config)" in text


def test_selection_class_weights_per_class_report_and_overwrite(workdir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("run").mkdir()
    Path("run/metrics.json").write_text('{"old": true}')
    Path("run/history.csv").write_text("old\n")
    metrics = main(cli_args(workdir, "run", "--overwrite", "--select-on", "mood", "--selection", "no_task_worse",
                            "--class-weights", "balanced"))
    saved = json.loads(Path("run/metrics.json").read_text())
    assert "old" not in saved and saved == json.loads(json.dumps(metrics))
    assert pd.read_csv("run/history.csv").columns[0] == "epoch"
    train = saved["config"]["train"]
    assert (train["select_on"], train["selection"], train["class_weights"]) == (["mood"], "no_task_worse", "balanced")
    for split in ("val", "test"):
        for task, size in (("topic", 15), ("mood", 13)):
            report = saved["per_class"][split][task]
            counts = np.array(report["confusion_matrix"]["counts"])
            assert counts.sum() == size == sum(c["support"] for c in report["per_class"].values())
            assert np.trace(counts) / size == pytest.approx(saved[split][task]["accuracy"])
            assert list(report["per_class"]) == report["confusion_matrix"]["labels"] == saved["tasks"][task]["labels"]


def test_the_final_evaluation_shows_progress(tiny_backbone, monkeypatch, capsys):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    tasks = [synthetic_task("topic", ["what", "who", "where"], n=30)]
    model = freezing.freeze_backbone(MultiTaskModel(tiny_backbone, {"topic": tasks[0].label_names}))
    capsys.readouterr()
    out = cli.evaluate_run(model, tasks, use_cache=True, progress=True)
    assert "evaluating" in capsys.readouterr().err
    assert set(out) == {"val", "test", "per_class"}
    cli.evaluate_run(model, tasks, use_cache=True, progress=False)
    assert "evaluating" not in capsys.readouterr().err


def test_staged_unfreezing_keeps_what_the_selection_rule_keeps(workdir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # the benchmark: untrained heads (a zero learning rate keeps epoch 0), so a trained candidate can beat it
    main(cli_args(workdir, "bench", "--epochs", "1", "--head-lr", "0"))
    bench = load_file("bench/checkpoint/weights.safetensors")
    with pytest.raises(SystemExit, match=r"--from bench/checkpoint has the tasks topic, mood; give exactly those"):
        main(["train", "--task", f"topic={workdir / 'topic.csv'}", "--from", "bench", "--cpu", "--output", "x"])
    assert not Path("x").exists()

    metrics = main(cli_args(workdir, "staged", "--from", "bench", "--unfreeze-last", "1", "--epochs", "1"))
    staged = metrics["staged"]
    accuracy = {name: {t: staged[name]["val"][t]["accuracy"] for t in ("topic", "mood")}
                for name in ("benchmark", "candidate")}
    verdict = evaluation.select(accuracy, "benchmark", {"topic": 15, "mood": 13}, {"benchmark": 0, "candidate": 1})
    assert staged["kept"] == verdict.chosen == "candidate" and staged["reason"] == verdict.reason
    assert metrics["val"] == staged["candidate"]["val"] and metrics["test"] == staged["candidate"]["test"]
    bench_val = json.loads(Path("bench/metrics.json").read_text())["val"]
    for task, scores in staged["benchmark"]["val"].items():  # scored again here, through the 16-bit prefix cache
        assert scores["accuracy"] == bench_val[task]["accuracy"]
        assert scores["loss"] == pytest.approx(bench_val[task]["loss"], abs=1e-4)
    written = load_file("staged/checkpoint/weights.safetensors")
    assert any(k.startswith("backbone.") for k in written)  # the candidate's last layer was kept
    assert not torch.equal(written["heads.topic.weight"], bench["heads.topic.weight"])

    real = evaluation.select  # a run whose heads train, but the rule keeps the benchmark: its weights are written
    monkeypatch.setattr(evaluation, "select", lambda *a, **k: dataclasses.replace(real(*a, **k), chosen="benchmark",
                                                                                  reason="kept by the test"))
    metrics = main(cli_args(workdir, "kept", "--from", "bench", "--epochs", "1"))
    assert metrics["staged"]["kept"] == "benchmark" and metrics["staged"]["reason"] == "kept by the test"
    assert metrics["val"] == metrics["staged"]["benchmark"]["val"] != metrics["staged"]["candidate"]["val"]
    written = load_file("kept/checkpoint/weights.safetensors")
    assert written.keys() == bench.keys() and all(torch.equal(written[k], bench[k]) for k in bench)
    assert json.loads(Path("kept/checkpoint/config.json").read_text())["tuned_backbone"] == []


def test_export_command_writes_an_export_folder_or_one_line_errors(workdir, one_process, tmp_path, capsys):
    from mtl_utils.export import OnnxModel

    folder, _, _ = one_process("heads")
    out = tmp_path / "deploy"
    info = main(["export", str(folder / "run" / "checkpoint"), str(out), "--no-int8"])
    assert "wrote" in capsys.readouterr().out and max(info["largest_logit_difference"]["fp32"].values()) <= 1e-4
    served = OnnxModel.load(out, quantized=False)
    assert served.predict(["good plot", "who was the actor"]).shape[0] == 2
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    with pytest.raises(SystemExit) as stop:
        main(["export", str(folder / "run" / "checkpoint"), str(tmp_path / "notes")])
    assert stop.value.code == 2 and "not an mtl_utils export folder" in capsys.readouterr().err
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"
