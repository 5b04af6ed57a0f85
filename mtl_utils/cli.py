"""The command line: train a multi-task model in one process or several (`accelerate launch`, `torchrun`).

    python -m mtl_utils.cli train --task trec --task movies --freeze backbone --output runs/heads

The first process writes `checkpoint/`, `history.csv` and `metrics.json` into `--output`. Only argparse and the
torch-free recipes are imported up front, so `--help` answers at once; the library loads when a command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from .recipes import (DEFAULT_BACKBONE, FREEZE_SCENARIOS, HEAD_KINDS, METRICS, SAMPLINGS, SCHEDULES, TASKS,
                      TrainConfig)

PROG = "python -m mtl_utils.cli"
BUILT_IN = ("trec", "movies", "amazon", "nyt", "tweets")  # mtl_utils.data.DATASETS (a test keeps them equal)
EPILOG = f"""\
examples:
  {PROG} train --task trec --task movies --output runs/heads
  {PROG} train --task tickets=tickets.csv --unfreeze-last 2 --output runs/tickets
  torchrun --standalone --nproc_per_node 2 -m mtl_utils.cli train --cpu ... (several CPU processes)
  accelerate launch --multi_gpu --num_processes 4 -m mtl_utils.cli train --mixed-precision bf16 ... (4 GPUs)
"""


def build_parser() -> argparse.ArgumentParser:
    """The command line: every command and option, its help and its default (the recipes' defaults)."""
    parser = argparse.ArgumentParser(prog=PROG, description="Multi-task sentence-transformer models from the command "
                                     "line.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train_parser(commands)
    return parser


def add_train_parser(commands) -> argparse.ArgumentParser:
    d = TrainConfig()
    parser = commands.add_parser(
        "train", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        help="train a model and write its checkpoint, history and metrics",
        description="Train a multi-task model (one shared sentence-transformer backbone, one head per task)\n"
                    "and write its checkpoint, its history and its metrics. Runs as is in one process, or\n"
                    "under `accelerate launch` / `torchrun` in several: --batch-size is then the global batch.")
    data = parser.add_argument_group("model and data")
    data.add_argument("--backbone", default=DEFAULT_BACKBONE, metavar="NAME_OR_PATH",
                      help="a known backbone name (see mtl_utils.backbone.BACKBONES), a hub id, or a local "
                           "SentenceTransformer folder (default: %(default)s)")
    data.add_argument("--task", action="append", dest="tasks", metavar="TASK",
                      help=f"a task, repeatable: a built-in dataset ({', '.join(BUILT_IN)}) or NAME=path.csv with "
                           "columns text,label (split train/val/test 80/10/10, stratified by label); "
                           f"default: {' and '.join(TASKS)}")
    data.add_argument("--split-seed", type=int, default=0, metavar="N",
                      help="seed of the data splits (default: %(default)s, the splits of the notebooks)")
    data.add_argument("--head", choices=HEAD_KINDS, default="linear",
                      help="classification head of each task: linear, or an MLP with one hidden layer "
                           "(default: %(default)s)")

    what = parser.add_argument_group("what trains")
    what.add_argument("--freeze", choices=list(FREEZE_SCENARIOS), default="backbone",
                      help="what is frozen: " + "; ".join(f"{k}: {v}" for k, v in FREEZE_SCENARIOS.items())
                           + " (default: %(default)s)")
    what.add_argument("--freeze-head", action="append", default=[], metavar="TASK",
                      help="after --freeze, this task's head stays frozen (repeatable)")
    what.add_argument("--unfreeze-last", type=int, metavar="K",
                      help="after --freeze, the backbone's top K transformer layers train too")
    what.add_argument("--unfreeze-embeddings", action="store_true",
                      help="with --unfreeze-last: the token embeddings train too")

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=d.epochs, metavar="N", help="epochs (default: %(default)s)")
    opt.add_argument("--batch-size", type=int, default=d.batch_size, metavar="N",
                     help="examples per step, over all processes together (default: %(default)s)")
    opt.add_argument("--head-lr", type=float, default=d.head_lr, metavar="LR",
                     help="AdamW learning rate of the heads (default: %(default)s)")
    opt.add_argument("--backbone-lr", type=float, default=d.backbone_lr, metavar="LR",
                     help="learning rate of the backbone's top layer (default: %(default)s)")
    opt.add_argument("--layer-lr-decay", type=float, default=d.layer_lr_decay, metavar="F",
                     help="discriminative rates: each backbone layer further down multiplies the rate by F "
                          "(BERT fine-tuning studies use about 0.95; default: %(default)s, the same rate everywhere)")
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
    opt.add_argument("--metric", choices=METRICS, default=d.metric,
                     help="validation metric that picks the best epoch (default: %(default)s)")
    opt.add_argument("--patience", type=int, default=d.patience, metavar="N",
                     help="stop after N epochs without a better validation score (default: never)")
    opt.add_argument("--seed", type=int, default=d.seed, metavar="N",
                     help="seed of the heads' initial weights, the task plan and the batches (default: %(default)s)")

    run = parser.add_argument_group("run")
    run.add_argument("--output", required=True, metavar="DIR",
                     help="folder for checkpoint/, history.csv and metrics.json (created if missing)")
    run.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no",
                     help="autocast precision: fp16 needs a GPU, bf16 runs on recent GPUs and CPUs "
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
        try:
            train_config(args)
        except ValueError as error:
            parser.error(str(error))
        args.tasks = args.tasks or list(TASKS)
    return args


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the command line asks for."""
    return TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, head_lr=args.head_lr, backbone_lr=args.backbone_lr,
        layer_lr_decay=args.layer_lr_decay, weight_decay=args.weight_decay, warmup=args.warmup,
        schedule=args.schedule, max_grad_norm=args.max_grad_norm or None, sampling=args.sampling,
        temperature=args.temperature, metric=args.metric, patience=args.patience, seed=args.seed,
        use_cache=not args.no_cache, progress=not args.no_progress)


def load_tasks(specs: list[str], split_seed: int = 0):
    """Each spec is a built-in dataset name, or NAME=path.csv with columns text,label."""
    import pandas as pd

    from .data import DATASETS, load_task, task_from_dataframe

    tasks = []
    for spec in specs:
        name, is_file, path = spec.partition("=")
        if is_file:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)  # labels are class names, "" stays ""
            tasks.append(task_from_dataframe(name, frame, seed=split_seed, description=f"from {Path(path).name}"))
        elif spec in DATASETS:
            tasks.append(load_task(spec, seed=split_seed))
        else:
            raise ValueError(f"unknown task {spec!r}: use a built-in dataset ({', '.join(DATASETS)}) "
                             "or NAME=path.csv with columns text,label")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must differ, got {names}")
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


def run_train(args: argparse.Namespace) -> dict | None:
    """Train as the command line says; returns the metrics (None on every process but the first)."""
    from . import freezing
    from .backbone import BackboneUnavailableError
    from .checkpoint import save_checkpoint
    from .evaluation import evaluate
    from .offline.cache import atomic_path, atomic_write_text
    from .series import build_model
    from .training import make_accelerator, train

    start = time.perf_counter()
    accelerator = make_accelerator(args.mixed_precision, cpu=args.cpu)
    if args.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        sys.exit(f"{PROG}: error: --mixed-precision fp16 needs a GPU; on a CPU use bf16 or no")
    config = train_config(args)
    try:
        with accelerator.main_process_first():  # the first process materialises the backbone into the cache
            tasks = load_tasks(args.tasks, args.split_seed)
            model = build_model(args.backbone, tasks, head=args.head, seed=args.seed, device=accelerator.device)
        apply_freezing(model, args)
    except (ValueError, OSError, BackboneUnavailableError) as error:
        sys.exit(f"{PROG}: error: {error}")

    history = train(model, tasks, config, accelerator)

    metrics = None
    if accelerator.is_main_process:
        out = Path(args.output)
        metrics = {
            "val": {t.name: evaluate(model, t, "val", config.use_cache) for t in tasks},
            "test": {t.name: evaluate(model, t, "test", config.use_cache) for t in tasks},
            "best_epoch": int(history.attrs["best_epoch"]),
            "world_size": accelerator.num_processes,
            "device": accelerator.device.type,
            "mixed_precision": accelerator.mixed_precision,
            "elapsed_seconds": round(time.perf_counter() - start, 2),
            "tasks": {t.name: {"labels": list(t.label_names), "train": len(t.train), "val": len(t.val),
                               "test": len(t.test)} for t in tasks},
            "trainable_parameters": freezing.count_trainable(model),
            "config": {"command_line": {k: v for k, v in vars(args).items() if k != "run"}, "train": asdict(config)},
        }
        save_checkpoint(model, out / "checkpoint")
        with atomic_path(out / "history.csv") as tmp:
            history.to_csv(tmp, index=False)
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, default=float))
        for split in ("val", "test"):
            scores = ", ".join(f"{name} {m['accuracy']:.3f}" for name, m in metrics[split].items())
            print(f"{split} accuracy: {scores}")
        print(f"wrote {shown(out / 'checkpoint')}/, {shown(out / 'history.csv')} and {shown(out / 'metrics.json')} "
              f"in {metrics['elapsed_seconds']:.0f} s on {accelerator.num_processes} process(es)")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def main(argv: list[str] | None = None):
    """Run the command the command line names."""
    args = parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    main()
