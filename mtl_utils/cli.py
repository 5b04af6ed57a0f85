"""The command line: train a multi-task model in one process or several (`accelerate launch`, `torchrun`).

    python -m mtl_utils.cli train --task trec --task movies --freeze backbone --output runs/heads

The first process writes the run, `checkpoint/`, `history.csv` and `metrics.json`, as one unit: into a temporary
folder beside `--output`, swapped in at the end, while it holds a lock on `--output`. Only argparse and the
torch-free recipes are imported up front, so `--help` answers at once; the library loads when a command runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path

from .recipes import (CLASS_WEIGHTS, DATASETS, DEFAULT_BACKBONE, FREEZE_SCENARIOS, HEAD_KINDS, METRICS, SAMPLINGS,
                      SCHEDULES, SELECTIONS, TASKS, TrainConfig, finetune_config)

PROG = "python -m mtl_utils.cli"
RUN_FILES = ("checkpoint", "history.csv", "metrics.json")  # what a run writes into --output
RUN_ENTRIES = {*RUN_FILES, ".complete.json"}  # and the checksums of them all (offline.cache.COMPLETE_MARKER)
RECIPE_FIELDS = ("epochs", "head_lr", "backbone_lr", "layer_lr_decay")  # where finetune_config differs from heads
EPILOG = f"""\
examples:
  {PROG} train --task trec --task movies --output runs/heads
  {PROG} train --task tickets=tickets.csv --unfreeze-last 2 --output runs/tickets
  {PROG} train --from runs/heads --unfreeze-last 2 --output runs/staged   (kept only if it beats runs/heads)
  {PROG} export runs/heads/checkpoint deploy/heads   (one ONNX graph for every task, and its int8 copy)
  torchrun --standalone --nproc_per_node 2 -m mtl_utils.cli train --cpu ... (several CPU processes)
  accelerate launch --multi_gpu --num_processes 4 -m mtl_utils.cli train --mixed-precision bf16 ... (4 GPUs)

your own data: NAME=path.csv with a `text` and a `label` column (class names). An optional `split` column
(train, val or test on every row) fixes the splits; a split no row names is carved from the train rows,
stratified (10% each; with no split column: 80/10/10). Rows that repeat another row's text and label are
dropped, one copy kept (in test, else val, else train), unless --duplicates keep.
"""


def _integer(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer of at least {minimum}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


non_negative, positive = _integer(0), _integer(1)  # argparse types: the error names the option


def build_parser() -> argparse.ArgumentParser:
    """The command line: every command and option, its help and its default (the recipes' defaults)."""
    parser = argparse.ArgumentParser(prog=PROG, description="Multi-task sentence-transformer models from the command "
                                     "line.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train_parser(commands)
    add_export_parser(commands)
    return parser


def add_export_parser(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "export", help="export a checkpoint as one ONNX graph for both tasks (and its int8 copy)",
        description="Write OUT/model.onnx, OUT/model.int8.onnx, OUT/tokenizer/ and OUT/export.json from a checkpoint,\n"
                    "for onnxruntime: tokenised input -> backbone -> pooling -> every head's logits, checked\n"
                    "against PyTorch before the folder appears (mtl_utils.export).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint folder (MultiTaskModel.save, or train's OUTPUT/checkpoint)")
    parser.add_argument("out", help="the export folder to write (an existing export folder is replaced; any other "
                                    "existing folder is refused)")
    parser.add_argument("--no-int8", action="store_true", help="skip the int8 graph")
    parser.add_argument("--opset", type=positive, default=17, help="ONNX opset (default: %(default)s)")
    parser.set_defaults(run=run_export)
    return parser


def run_export(args: argparse.Namespace) -> dict:
    """Export as the command line says; one line per error, exit status 2."""
    from .export import export_checkpoint

    try:
        info = export_checkpoint(args.checkpoint, args.out, quantize=not args.no_int8, opset=args.opset)
    except (FileExistsError, FileNotFoundError, ValueError) as error:  # a CheckpointError is a ValueError
        print(f"{PROG} export: error: {error}", file=sys.stderr)
        sys.exit(2)
    sizes = ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in info["files"].items() if name.endswith(".onnx"))
    gaps = {k: max(v.values()) for k, v in info["largest_logit_difference"].items()}
    print(f"wrote {shown(Path(args.out))}/ ({sizes}); largest logit difference from PyTorch: "
          + ", ".join(f"{k} {v:.1e}" for k, v in gaps.items()))
    return info


def add_train_parser(commands) -> argparse.ArgumentParser:
    d, f = TrainConfig(), finetune_config()
    recipe = "; {} when layers train: finetune_config"
    parser = commands.add_parser(
        "train", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        help="train a model and write its checkpoint, history and metrics",
        description="Train a multi-task model (one shared sentence-transformer backbone, one head per task)\n"
                    "and write its checkpoint, its history and its metrics. Runs as is in one process, or\n"
                    "under `accelerate launch` / `torchrun` in several: --batch-size is then the global batch.\n"
                    "Defaults are mtl_utils.recipes': TrainConfig() when only heads train; finetune_config()\n"
                    "(fewer epochs, smaller rates) when backbone layers train (--unfreeze-last K with K > 0,\n"
                    "--unfreeze-embeddings or --freeze nothing). An option given always wins.")
    data = parser.add_argument_group("model and data")
    data.add_argument("--backbone", metavar="NAME_OR_PATH",
                      help="a known backbone name (see mtl_utils.backbone.BACKBONES), a hub id, or a local "
                           f"SentenceTransformer folder (default: {DEFAULT_BACKBONE}, or the one of --from)")
    data.add_argument("--task", action="append", dest="tasks", metavar="TASK",
                      help=f"a task, repeatable: a built-in dataset ({', '.join(DATASETS)}) or NAME=path.csv with "
                           "columns text,label and optionally split (train/val/test; see below); "
                           f"default: {' and '.join(TASKS)}")
    data.add_argument("--split-seed", type=non_negative, metavar="N",
                      help="seed of the data splits (default: 0, the splits of the notebooks; with --from and no "
                           "--task: the benchmark run's)")
    data.add_argument("--duplicates", choices=("drop", "keep"),
                      help="rows that repeat another row's text and label: drop the copies (one stays, in one split) "
                           "or keep them; either way a warning counts them (default: drop for your CSV files, keep "
                           "for the built-in datasets, whose published splits the notebooks use)")
    data.add_argument("--head", choices=HEAD_KINDS, default="linear",
                      help="classification head of each task: linear, or an MLP with one hidden layer "
                           "(default: %(default)s)")

    what = parser.add_argument_group("what trains")
    what.add_argument("--freeze", choices=list(FREEZE_SCENARIOS), default="backbone",
                      help="what is frozen: " + "; ".join(f"{k}: {v}" for k, v in FREEZE_SCENARIOS.items())
                           + " (default: %(default)s)")
    what.add_argument("--freeze-head", action="append", default=[], metavar="TASK",
                      help="after --freeze, this task's head stays frozen (repeatable)")
    what.add_argument("--unfreeze-last", type=non_negative, metavar="K",
                      help="after --freeze, the backbone's top K transformer layers train too")
    what.add_argument("--unfreeze-embeddings", action="store_true",
                      help="with --unfreeze-last: the token embeddings train too")
    what.add_argument("--from", dest="from_dir", metavar="DIR",
                      help="staged unfreezing: start from the checkpoint of an earlier run (its --output folder, or "
                           "a checkpoint folder), train (e.g. --unfreeze-last K), and keep the result only if "
                           "evaluation.select's rule says it beats that benchmark on validation; metrics.json "
                           "reports both, the verdict and the reason; the checkpoint written is the one kept")

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=positive, metavar="N",
                     help=f"epochs (default: {d.epochs}" + recipe.format(f.epochs) + ")")
    opt.add_argument("--batch-size", type=positive, default=d.batch_size, metavar="N",
                     help="examples per step, over all processes together (default: %(default)s)")
    opt.add_argument("--head-lr", type=float, metavar="LR",
                     help=f"AdamW learning rate of the heads (default: {d.head_lr}" + recipe.format(f.head_lr) + ")")
    opt.add_argument("--backbone-lr", type=float, metavar="LR",
                     help=f"learning rate of the backbone's top layer (default: {d.backbone_lr}"
                          + recipe.format(f.backbone_lr) + ")")
    opt.add_argument("--layer-lr-decay", type=float, metavar="F",
                     help="discriminative rates: each backbone layer further down multiplies the rate by F "
                          f"(default: {d.layer_lr_decay}, the same rate everywhere" + recipe.format(f.layer_lr_decay)
                          + ")")
    opt.add_argument("--weight-decay", type=float, default=d.weight_decay, metavar="W",
                     help="AdamW weight decay (default: %(default)s)")
    opt.add_argument("--warmup", type=float, default=d.warmup, metavar="FRACTION",
                     help="fraction of all steps spent warming the rates up (default: %(default)s)")
    opt.add_argument("--schedule", choices=SCHEDULES, default=d.schedule,
                     help="rate after the warm-up (default: %(default)s)")
    opt.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, metavar="NORM",
                     help="clip the gradient norm to NORM; 0 turns clipping off (default: %(default)s)")
    opt.add_argument("--sampling", choices=SAMPLINGS, default=d.sampling,
                     help="which task each step trains (default: %(default)s)")
    opt.add_argument("--temperature", type=float, default=d.temperature, metavar="T",
                     help="with --sampling temperature: task sizes are raised to 1/T (default: %(default)s)")
    opt.add_argument("--class-weights", choices=CLASS_WEIGHTS,
                     help="for imbalanced labels: weigh each class in the loss inversely to its training count "
                          "(sklearn's compute_class_weight; default: no weights)")
    opt.add_argument("--seed", type=non_negative, default=d.seed, metavar="N",
                     help="seed of the heads' initial weights, the task plan and the batches (default: %(default)s)")

    pick = parser.add_argument_group("which epoch is kept (on validation data)")
    pick.add_argument("--metric", choices=METRICS, default=d.metric,
                      help="validation metric that picks the best epoch (default: %(default)s)")
    pick.add_argument("--select-on", action="append", metavar="TASK",
                      help="pick the epoch on this task's validation score only (repeatable; default: the mean "
                           "over every task)")
    pick.add_argument("--selection", choices=list(SELECTIONS), default=d.selection,
                      help="; ".join(f"{k}: {v}" for k, v in SELECTIONS.items()) + " (default: %(default)s)")
    pick.add_argument("--patience", type=positive, default=d.patience, metavar="N",
                      help="stop after N epochs without a better validation score (default: never)")

    run = parser.add_argument_group("run")
    run.add_argument("--output", required=True, metavar="DIR",
                     help="folder for checkpoint/, history.csv and metrics.json (created if missing; checked "
                          "before any work; a folder that holds a run is refused unless --overwrite)")
    run.add_argument("--overwrite", action="store_true", help="replace the run in --output")
    run.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no",
                     help="autocast precision, entered once per training step: fp16 needs a GPU, bf16 runs on recent "
                          "GPUs and CPUs "
                          "(default: %(default)s)")
    run.add_argument("--cpu", action="store_true", help="train on the CPU even where a GPU is present")
    run.add_argument("--no-cache", action="store_true",
                     help="run the whole backbone on every batch instead of the embedding or frozen-prefix cache")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(run=run_train)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line; a bad combination exits with a message, like argparse does."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train":
        if args.unfreeze_embeddings and args.unfreeze_last is None:
            parser.error("--unfreeze-embeddings goes with --unfreeze-last K")
        if args.tasks is None and args.from_dir is None:
            args.tasks = list(TASKS)
        try:
            names = [task_name(spec) for spec in args.tasks or []]
            for task in (args.select_on or []) + args.freeze_head:
                if args.tasks is not None and task not in names:
                    raise ValueError(f"unknown task {task!r} in --select-on/--freeze-head; the tasks are: "
                                     f"{', '.join(names)}")
            train_config(args)
        except ValueError as error:
            parser.error(str(error))
    return args


def layers_train(args: argparse.Namespace) -> bool:
    """Whether backbone layers train: then finetune_config's epochs and rates are the defaults."""
    return bool(args.unfreeze_last) or args.unfreeze_embeddings or args.freeze == "nothing"


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the command line asks for: the recipe for what trains, with the options given."""
    recipe = finetune_config() if layers_train(args) else TrainConfig()
    given = {name: getattr(args, name) for name in RECIPE_FIELDS if getattr(args, name) is not None}
    return replace(
        recipe,
        **given, batch_size=args.batch_size, weight_decay=args.weight_decay, warmup=args.warmup,
        schedule=args.schedule, max_grad_norm=args.max_grad_norm or None, sampling=args.sampling,
        temperature=args.temperature, metric=args.metric, select_on=args.select_on, selection=args.selection,
        class_weights=args.class_weights, patience=args.patience, seed=args.seed, use_cache=not args.no_cache,
        mixed_precision=args.mixed_precision,
        progress=not args.no_progress)


def resolved_spec(spec: str) -> str:
    """A --task as it can be used from any folder: NAME=path.csv with the file's absolute path."""
    name, is_file, path = spec.partition("=")
    return f"{name}={Path(path).resolve()}" if is_file else spec


def backbone_spec(name: str) -> str:
    """A --backbone as stored in the checkpoint: a local folder by its absolute path (so the checkpoint loads from
    any folder, and one folder named two ways is one backbone); a known name or hub id as given."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def from_tasks(from_dir: str, names: list[str]) -> tuple[list[str], int | None]:
    """The --task specs and the split seed of the run in `from_dir` (its metrics.json), for --from without --task."""
    folder = Path(from_dir)
    run = folder.parent if folder.name == "checkpoint" and not (folder / "metrics.json").exists() else folder
    try:
        saved = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
        specs, split_seed = saved["task_specs"], saved["split_seed"]
    except (OSError, ValueError, KeyError, TypeError):
        if all(name in DATASETS for name in names):
            return list(names), None
        raise ValueError(f"--from {from_dir} does not say where its tasks' data came from (no metrics.json with "
                         "task_specs: a checkpoint folder, or a run of an older version); give them again: "
                         + " ".join(f"--task {n}=PATH.csv" if n not in DATASETS else f"--task {n}" for n in names)) \
            from None
    gone = [spec for spec in specs if "=" in spec and not Path(spec.partition("=")[2]).is_file()]
    if gone:
        raise ValueError(f"--from {from_dir} was trained on {', '.join(gone)}, which is no longer there; give its "
                         "tasks again with --task NAME=path.csv (the same rows, for a fair comparison)")
    return specs, split_seed


def task_name(spec: str) -> str:
    """The name of a --task: the dataset's, or NAME of NAME=path.csv (checked: it must be able to name a head)."""
    name, is_file, path = spec.partition("=")
    if not is_file:
        if spec not in DATASETS:
            raise ValueError(f"unknown task {spec!r}: use a built-in dataset ({', '.join(DATASETS)}) "
                             "or NAME=path.csv with columns text,label")
        return spec
    from .data import check_task_name

    if not path:
        raise ValueError(f"--task {spec!r} names no file: use NAME=path.csv")
    return check_task_name(name)


def read_csv(path: str):
    """A task's CSV file, every cell as written (a text "NA" stays a text; a blank label is refused as a missing
    label), its rows numbered as a spreadsheet numbers them (the header is row 1); errors name the file."""
    import pandas as pd

    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path} is empty: expected a CSV file whose header row names a text and a label column") \
            from None
    except UnicodeDecodeError:
        data = Path(path).read_bytes()  # pandas counts within its read buffer: find the place in the file
        try:
            data.decode("utf-8")
            where = ""
        except UnicodeDecodeError as error:
            line = data.count(b"\n", 0, error.start) + 1
            where = f" (byte {data[error.start]:#04x} at offset {error.start}, line {line})"
        raise ValueError(f"{path} is not UTF-8 text{where}; save it as UTF-8 CSV") from None
    except pd.errors.ParserError as error:
        raise ValueError(f"{path} is not a CSV file that can be read: {str(error).strip()}") from None
    frame.index = pd.RangeIndex(2, len(frame) + 2, name="CSV row")
    return frame


def load_tasks(specs: list[str], split_seed: int = 0, duplicates: str | None = None):
    """Each spec is a built-in dataset name, or NAME=path.csv with columns text,label (and optionally split)."""
    from .data import check_task_names, load_task, task_from_dataframe

    names = check_task_names([task_name(spec) for spec in specs])  # every name checked before any file is read
    tasks = []
    for name, spec in zip(names, specs):
        path = spec.partition("=")[2]
        if path:
            frame = read_csv(path)
            try:
                tasks.append(task_from_dataframe(name, frame, seed=split_seed, description=f"from {Path(path).name}",
                                                 duplicates=duplicates or "drop", source=path))
            except ValueError as error:
                raise ValueError(f"--task {name}: {error}") from None
        else:
            tasks.append(load_task(spec, seed=split_seed, duplicates=duplicates or "keep"))
    return tasks


def apply_freezing(model, args: argparse.Namespace):
    """The freeze scenario, then (if asked) the top K layers unfrozen and some heads frozen."""
    from . import freezing

    freezing.freeze(model, args.freeze)
    if args.unfreeze_last is not None:
        freezing.unfreeze_last(model, args.unfreeze_last, embeddings=args.unfreeze_embeddings)
    for task in args.freeze_head:
        freezing.freeze_head(model, task)
    if not freezing.trainable_parameters(model):
        raise ValueError(f"nothing to train with --freeze {args.freeze}: every parameter is frozen")
    return model


def shown(path: Path) -> str:
    """`path` relative to the working folder when it lies inside it, so logs show no absolute paths."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def check_output(output: str, overwrite: bool = False) -> Path:
    """Check, before any work, that `--output` can take a run: a new folder, an empty one, or (with --overwrite) a
    run and nothing else, since the finished run replaces the whole folder in one step. Returns its path."""
    from .checkpoint import check_replaceable
    from .offline.cache import clean_stale

    if not output.strip():
        raise ValueError("--output needs a folder name (got an empty one)")
    folder = Path(output)
    if folder.resolve() in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
        raise ValueError(f"--output {output} is the current folder or one above it; a run replaces its whole folder: "
                         "name a new folder (e.g. runs/heads)")
    existing = next(p for p in [folder.parent, *folder.parent.parents] if p.exists())
    if not existing.is_dir():
        raise ValueError(f"--output {shown(folder)} lies under {shown(existing)}, which is a file")
    if not os.access(existing, os.W_OK | os.X_OK) or _read_only(existing):
        raise ValueError(f"--output {shown(folder)} is not writable: the run is written beside it, in "
                         f"{shown(existing)}, which this user cannot write")
    if os.path.lexists(folder) and (folder.is_symlink() or not folder.is_dir()):
        raise ValueError(f"--output {shown(folder)} is a file, not a folder")
    if folder.is_dir():
        clean_stale(folder)  # temporaries that an older version's killed run left inside
        names = sorted(os.listdir(folder))
        foreign = [n for n in names if n not in RUN_ENTRIES]
        if foreign:
            more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
            raise ValueError(f"--output {shown(folder)} holds files that are not part of a run "
                             f"({', '.join(foreign[:5])}{more}); a run replaces its whole folder: choose a new or "
                             "empty folder, or move them away first")
        held = [name for name in RUN_FILES if name in names]
        if held and not overwrite:
            raise ValueError(f"--output {shown(folder)} already holds a run ({', '.join(held)}); choose another "
                             "folder, or add --overwrite to replace it")
        try:
            check_replaceable(folder / "checkpoint")
        except FileExistsError:
            raise ValueError(f"--output {shown(folder)}: its checkpoint/ holds files that are not part of a "
                             "checkpoint; move them away first (the run would replace that folder)") from None
    return folder


def _read_only(folder: Path) -> bool:
    """Whether `folder` refuses new entries although its mode allows them (a read-only mount, /proc as root)."""
    try:
        with tempfile.TemporaryDirectory(dir=folder, prefix=".mtl-write-test-"):
            return False
    except OSError:
        return True


def parents_to_create(folder: Path) -> list[Path]:
    """The folders above `folder` that do not exist yet (deepest first): made for the run, removed if it fails."""
    return [p for p in [folder.parent, *folder.parent.parents] if not p.exists()]


def remove_created(created: list[Path]) -> None:
    """Remove the folders made for a run, where they are still empty (a failed run leaves nothing)."""
    for folder in created:
        try:
            folder.rmdir()
        except OSError:
            return


@contextlib.contextmanager
def output_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on `--output` for the whole run: a second run into the same folder is refused at
    once. The lock is `.NAME.lock` beside the folder (flock: the system releases it when a process dies)."""
    try:
        import fcntl
    except ImportError:  # not on Windows: no lock there
        yield
        return
    path = folder.parent / f".{folder.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ValueError(f"--output {shown(folder)} is being written by another run (process {holder}); wait "
                             "for it to finish, or choose another folder") from None
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break  # still the lock file at that path (not one a finishing run just removed)
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def write_run(folder: Path, model, history, metrics: dict) -> None:
    """The run's checkpoint, history and metrics into a temporary folder beside `folder`, which then replaces
    `folder` in one step: a kill or a full disk at any moment leaves the old run whole, or no folder."""
    from .offline.cache import atomic_dir

    with atomic_dir(folder) as tmp:
        model.save(tmp / "checkpoint")
        history.to_csv(tmp / "history.csv", index=False)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float), encoding="utf-8")


def checkpoint_in(folder: str | Path) -> Path:
    """The checkpoint of `--from`: DIR/checkpoint (a run's --output folder) or DIR itself."""
    folder = Path(folder)
    return folder / "checkpoint" if (folder / "checkpoint").is_dir() else folder


def trained_parameters(model) -> int:
    """Parameters a model's training has set: every head and the backbone weights it tuned."""
    tuned = model.tuned_backbone
    return (sum(p.numel() for p in model.heads.parameters())
            + sum(p.numel() for n, p in model.backbone.named_parameters() if n in tuned))


def evaluate_run(model, tasks, use_cache: bool, progress: bool) -> dict:
    """Scores on validation and test of every task (accuracy with its 95% interval), and per-class reports."""
    from .evaluation import accuracy_interval, class_report, scores, split_probabilities
    from .model import progress_bar

    out: dict = {"val": {}, "test": {}, "per_class": {"val": {}, "test": {}}}
    with progress_bar(total=2 * len(tasks), desc="evaluating", enabled=progress) as bar:
        for split in ("val", "test"):
            for task in tasks:
                labels = task.split(split)["label"].to_numpy()
                probs = split_probabilities(model, task, split, use_cache, progress)
                found = scores(labels, probs)
                right = int((probs.argmax(-1) == labels).sum())
                found["accuracy_95"] = list(accuracy_interval(right, len(labels)))  # Wilson score interval
                out[split][task.name] = found
                out["per_class"][split][task.name] = class_report(labels, probs, task.label_names)
                bar.update()
    return out


def _print_data_warnings(original):
    """A showwarning that prints DataWarnings as one line each, like the command line's errors."""
    from .data import DataWarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DataWarning):
            print(f"{PROG}: warning: {message}", file=sys.stderr, flush=True)
        else:
            original(message, category, filename, lineno, file, line)

    return show


def run_train(args: argparse.Namespace) -> dict | None:
    """Train as the command line says; returns the metrics (None on every process but the first)."""
    from .backbone import BackboneUnavailableError
    from .checkpoint import read_config
    from .series import build_model
    from .distributed import make_accelerator
    from .training import DivergedError

    start = time.perf_counter()
    try:
        out = check_output(args.output, args.overwrite)
    except ValueError as error:
        sys.exit(f"{PROG}: error: {error}")
    accelerator = make_accelerator(args.mixed_precision, cpu=args.cpu)
    if args.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        sys.exit(f"{PROG}: error: --mixed-precision fp16 needs a GPU; on a CPU use bf16 or no")
    config = train_config(args)
    created = parents_to_create(out)
    with contextlib.ExitStack() as stack, warnings.catch_warnings():
        if accelerator.is_main_process:
            warnings.showwarning = _print_data_warnings(warnings.showwarning)
        else:
            warnings.simplefilter("ignore", UserWarning)  # the first process says it once
        try:
            if accelerator.is_main_process:  # the one writer: holds --output from here until the run is written
                out.parent.mkdir(parents=True, exist_ok=True)
                stack.enter_context(output_lock(out))
                check_output(args.output, args.overwrite)  # again, under the lock: a run may have finished meanwhile
            benchmark = None
            if args.from_dir:
                benchmark = checkpoint_in(args.from_dir)
                saved = read_config(benchmark)
                args.backbone = args.backbone or saved["backbone"]
                if args.tasks is None:  # the benchmark's own data and splits
                    args.tasks, split_seed = from_tasks(args.from_dir, list(saved["tasks"]))
                    args.split_seed = split_seed if args.split_seed is None else args.split_seed
                missing = sorted(set(saved["tasks"]) ^ {task_name(spec) for spec in args.tasks})
                if missing:
                    raise ValueError(f"--from {shown(benchmark)} has the tasks {', '.join(saved['tasks'])}; give "
                                     f"exactly those with --task (they differ in {', '.join(missing)})")
            args.split_seed = 0 if args.split_seed is None else args.split_seed
            args.backbone = backbone_spec(args.backbone or DEFAULT_BACKBONE)
            with accelerator.main_process_first():  # the first process materialises the backbone into the cache
                tasks = load_tasks(args.tasks, args.split_seed, args.duplicates)
                model = build_model(args.backbone, tasks, head=args.head, seed=args.seed, device=accelerator.device)
            if benchmark is not None:
                model.load_weights(benchmark)
            apply_freezing(model, args)
            metrics = _train_and_report(model, tasks, config, accelerator, args, benchmark, start)
        except (DivergedError, ValueError, OSError, BackboneUnavailableError) as error:
            stack.close()
            remove_created(created)
            sys.exit(f"{PROG}: error: {error}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def _train_and_report(model, tasks, config: TrainConfig, accelerator, args: argparse.Namespace,
                      benchmark: Path | None, start: float) -> dict | None:
    """Train; on the first process, evaluate, apply --from's selection rule, and write the run."""
    import torch

    from . import freezing
    from .distributed import Processes
    from .evaluation import select
    from .training import train

    main = accelerator.is_main_process
    progress = main and config.progress
    before = None
    if benchmark is not None and main:
        before = {"scores": evaluate_run(model, tasks, config.use_cache, progress),
                  "trained_parameters": trained_parameters(model), "tuned_backbone": set(model.tuned_backbone),
                  "weights": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}}

    history = train(model, tasks, config, Processes(accelerator))
    if not main:
        return None

    results = evaluate_run(model, tasks, config.use_cache, progress)
    staged = None
    if before is not None:
        accuracy = {name: {t.name: r["val"][t.name]["accuracy"] for t in tasks}
                    for name, r in (("benchmark", before["scores"]), ("candidate", results))}
        verdict = select(accuracy, "benchmark", {t.name: len(t.val) for t in tasks},
                         {"benchmark": before["trained_parameters"], "candidate": trained_parameters(model)},
                         goal=config.select_on)
        staged = {"from": shown(benchmark), "kept": verdict.chosen, "reason": verdict.reason,
                  "rule": "evaluation.select on validation accuracy (margin 0.5 points, no task below its noise)",
                  "table": json.loads(verdict.table.to_json(orient="records")),
                  "benchmark": {k: before["scores"][k] for k in ("val", "test")},
                  "candidate": {k: results[k] for k in ("val", "test")} | {"best_epoch": int(history.attrs["best_epoch"])}}
        if verdict.chosen == "benchmark":  # the run did not earn its place: the benchmark's weights go back
            with torch.no_grad():
                params = dict(model.named_parameters())
                for name, value in before["weights"].items():
                    params[name].copy_(value)
            model.tuned_backbone = before["tuned_backbone"]
            results = before["scores"]

    metrics = {
        "val": results["val"], "test": results["test"], "per_class": results["per_class"],
        "best_epoch": int(history.attrs["best_epoch"]),
        "world_size": accelerator.num_processes,
        "device": accelerator.device.type,
        "mixed_precision": accelerator.mixed_precision,
        "elapsed_seconds": round(time.perf_counter() - start, 2),
        "tasks": {t.name: {"labels": list(t.label_names), "train": len(t.train), "val": len(t.val),
                           "test": len(t.test)} for t in tasks},
        "task_specs": [resolved_spec(spec) for spec in args.tasks],  # what --from without --task reads again
        "split_seed": args.split_seed,
        "trainable_parameters": freezing.count_trainable(model),
        "config": {"command_line": {k: v for k, v in vars(args).items() if k != "run"}, "train": asdict(config)},
    }
    if staged is not None:
        metrics["staged"] = staged
    out = Path(args.output)
    write_run(out, model, history, metrics)
    for split in ("val", "test"):
        shown_scores = ", ".join(f"{name} {m['accuracy']:.3f}" for name, m in metrics[split].items())
        print(f"{split} accuracy: {shown_scores}")
    if staged is not None:
        print(f"kept the {staged['kept']}: {staged['reason']}")
    print(f"wrote {shown(out / 'checkpoint')}/, {shown(out / 'history.csv')} and {shown(out / 'metrics.json')} "
          f"in {metrics['elapsed_seconds']:.0f} s on {accelerator.num_processes} process(es)")
    return metrics


def main(argv: list[str] | None = None):
    """Run the command the command line names."""
    args = parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    main()
