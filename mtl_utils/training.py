"""The multi-task training loop, in plain PyTorch: one task per batch, AdamW, warm-up then decay, best epoch kept.

`train` reads top to bottom: the batches of an epoch, forward, loss, backward, step, schedule, validate, keep
the best. What several processes need (`accelerate launch`, `torchrun`) comes in through a few hooks that do
nothing in one process (`OneProcess`); `mtl_utils.distributed` fills them in.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from . import backbone as bb
from . import long_text
from .data import Task, check_task_names
from .evaluation import fallen_tasks, predict_proba, scores
from .features import sentence_source
from .model import MultiTaskModel, progress_bar
from .recipes import TrainConfig


class DivergedError(RuntimeError):
    """The loss became NaN or infinite: the run stopped instead of saving a broken model."""


# --- which examples each step trains on ---------------------------------------------------------------------

def batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator, group_by_length: bool,
            window: int = 50) -> list[np.ndarray]:
    """One epoch of shuffled, full index batches; with grouping, similar lengths share a batch (less padding).

    Every batch holds `batch_size` examples (so it splits evenly over processes): when the examples do not
    fill the last batch, it is topped up with examples from the start of the same shuffled epoch.
    """
    order = rng.permutation(len(lengths))
    order = np.resize(order, math.ceil(len(order) / batch_size) * batch_size)
    if group_by_length:
        # sort within windows of `window` batches: batches stay random but hold similar lengths
        size = window * batch_size
        order = np.concatenate([
            chunk[np.argsort(-lengths[chunk], kind="stable")] for chunk in np.split(order, range(size, len(order), size))
        ])
    out = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [out[i] for i in rng.permutation(len(out))]


def task_schedule(sizes: Mapping[str, int], steps: int, sampling: str, temperature: float,
                  rng: np.random.Generator) -> list[str]:
    """Which task each step of an epoch trains: round-robin, proportional to size, or temperature-scaled."""
    names = list(sizes)
    if sampling == "round_robin":
        return [names[i % len(names)] for i in range(steps)]
    weights = np.array([sizes[n] for n in names], dtype=float)
    if sampling == "temperature":
        weights = weights ** (1.0 / temperature)
    return list(rng.choice(names, size=steps, p=weights / weights.sum()))


class BatchPlan:
    """Every epoch's batches, each from one task, in a plan drawn from `config.seed`: (task, indices) pairs.

    Each task has an endless stream of shuffled epochs of its own; an epoch of training takes as many batches
    as all tasks' examples fill, and the schedule says which task each one comes from.
    """

    def __init__(self, lengths: Mapping[str, np.ndarray], config: TrainConfig) -> None:
        self.config = config
        self.sizes = {name: len(values) for name, values in lengths.items()}
        self.steps = sum(math.ceil(size / config.batch_size) for size in self.sizes.values())
        self.rng = np.random.default_rng(config.seed)
        self.streams = {name: self._stream(np.asarray(values)) for name, values in lengths.items()}

    def _stream(self, lengths: np.ndarray) -> Iterator[np.ndarray]:
        while True:  # a new shuffled epoch of this task whenever the last one runs out
            yield from batches(lengths, self.config.batch_size, self.rng, self.config.group_by_length)

    def epoch(self) -> Iterator[tuple[str, np.ndarray]]:
        """One epoch of (task name, indices into that task's training rows)."""
        plan = task_schedule(self.sizes, self.steps, self.config.sampling, self.config.temperature, self.rng)
        for name in plan:
            yield str(name), next(self.streams[name])


# --- what the optimizer sees --------------------------------------------------------------------------------

def optimizer_groups(model: MultiTaskModel, config: TrainConfig) -> list[dict]:
    """AdamW parameter groups of the trainable parameters only: heads at `head_lr`; backbone stages at
    `backbone_lr` for the top layer, times `layer_lr_decay` for each stage further down."""
    groups = [{"name": f"head {n}", "params": [p for p in h.parameters() if p.requires_grad], "lr": config.head_lr}
              for n, h in model.heads.items()]
    stages = bb.stages(model.backbone)
    top = len(stages) - 1
    for depth, (name, modules) in enumerate(stages):
        groups.append({"name": name, "params": [p for m in modules for p in m.parameters() if p.requires_grad],
                       "lr": config.backbone_lr * config.layer_lr_decay ** (top - depth)})
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("nothing to train: every parameter is frozen. Unfreeze a head or some backbone layers "
                         "(freezing.freeze_backbone(model) trains the heads).")
    return groups


def lr_lambda(total_steps: int, warmup: float, schedule: str):
    """Multiplier of the base rate at each step: linear warm-up, then linear or cosine decay (or constant)."""
    warm = int(round(warmup * total_steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if schedule == "constant":
            return 1.0
        progress = (step - warm) / max(1, total_steps - warm)
        return max(0.0, 1 - progress) if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def refuse_enclosing_autocast(device: torch.device) -> None:
    """Raise when `train` is called inside a `torch.autocast` block: the block would freeze what the model sees.

    Autocast keeps its low-precision copy of every trainable weight until the outermost block exits, so under a
    block around the whole run every step would use the copies made at its first forward while the optimizer
    changes the real weights (tests/test_training.py shows it). The loop enters autocast itself, once per step.
    """
    for kind in {"cpu", device.type}:
        if torch.is_autocast_enabled(kind):
            raise RuntimeError(
                f"train() was called inside torch.autocast({kind!r}): autocast caches its low-precision copies of "
                "the trainable weights until the outermost block exits, so every step would reuse the weights of "
                "the first step. Call train() outside the block and ask for the precision instead: "
                "TrainConfig(mixed_precision='bf16') (or --mixed-precision bf16 on the command line)")


def check_tasks(model: MultiTaskModel, tasks: Sequence[Task] | Mapping[str, Task]) -> dict[str, Task]:
    """Tasks by name, each with a head that knows its labels."""
    values = list(tasks.values()) if isinstance(tasks, Mapping) else tasks
    if isinstance(tasks, str | Task) or not isinstance(values, Sequence) or not values \
            or not all(isinstance(t, Task) for t in values):
        raise TypeError(f"tasks must be a non-empty list of Task (or a dict of them by name), got {tasks!r:.80}; "
                        "data.load_task or data.task_from_dataframe makes a Task")
    if not isinstance(tasks, Mapping):
        check_task_names([t.name for t in tasks])
    tasks = dict(tasks) if isinstance(tasks, Mapping) else {t.name: t for t in tasks}
    for name, task in tasks.items():
        if name not in model.heads:
            raise ValueError(f"task {name!r} has no head; this model's heads are: {', '.join(model.heads)}")
        if tuple(task.label_names) != model.label_names[name]:
            raise ValueError(f"task {name!r} has labels {tuple(task.label_names)} but its head knows "
                             f"{model.label_names[name]}")
        for split in ("train", "val"):
            labels = task.split(split)["label"]
            bad = labels[(labels < 0) | (labels >= len(task.label_names))]
            if len(bad):
                raise ValueError(f"task {name!r} {split} has labels the head doesn't know at rows "
                                 f"{list(bad.index[:10])}; accepted: 0..{len(task.label_names) - 1}")
    return tasks


# --- one process ------------------------------------------------------------------------------------------

class OneProcess:
    """`train` in this process alone: the hooks several processes need (mtl_utils.distributed) do nothing here."""

    is_main = True

    def check(self, config: TrainConfig) -> None:
        if config.mixed_precision == "fp16":
            raise ValueError("mixed_precision='fp16' needs a GPU and the accelerator's gradient scaler: pass "
                             "processes=distributed.Processes(make_accelerator('fp16')), or use 'bf16'")

    def first(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def share(self, idx: np.ndarray) -> np.ndarray:
        return idx

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        return model, optimizer

    def seed(self, seed: int) -> None:
        torch.manual_seed(seed)  # the dropout masks

    def mean(self, loss: torch.Tensor) -> float:
        return loss.item()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip(self, parameters: list[nn.Parameter], max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def agree(self, score: float) -> float:
        return score

    def unwrap(self, model: nn.Module) -> None:
        pass


# --- checks before a run, scores after each epoch --------------------------------------------------------

def epoch_score(rows: Sequence[Mapping], config: TrainConfig, select_on: Sequence[str],
                start_accuracy: Mapping[str, float], val_sizes: Mapping[str, int]) -> float:
    """An epoch's selection score from its validation rows (one per task): the mean of `config.metric` over
    `select_on`; with selection "no_task_worse", -inf (never kept) when any task's accuracy fell below its
    epoch-0 accuracy by more than its noise (evaluation.fallen_tasks: select's rule)."""
    score = float(np.mean([r[f"val_{config.metric}"] for r in rows if r["task"] in select_on]))
    if config.selection == "no_task_worse" and start_accuracy:
        if fallen_tasks({r["task"]: r["val_accuracy"] for r in rows}, start_accuracy, val_sizes):
            return -math.inf
    return score


def class_weights(task: Task, kind: str | None, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """Loss weights of a task's classes from its training labels (sklearn's "balanced"); None for no weights.

    A class absent from the training rows gets weight 1 (it never occurs in the loss anyway).
    """
    if kind is None:
        return None
    from sklearn.utils.class_weight import compute_class_weight

    labels = task.train["label"].to_numpy()
    present = np.unique(labels)
    weights = np.ones(task.num_labels)
    weights[present] = compute_class_weight(kind, classes=present, y=labels)
    return torch.tensor(weights, dtype=torch.float32, device=device)


def warn_long_texts(model: MultiTaskModel, tasks: Mapping[str, Task]) -> None:
    """A DataWarning for each training or validation split whose texts the backbone cuts (only long texts are
    tokenised to count: short ones cost nothing)."""
    for name in tasks:
        for split in ("train", "val"):
            long_text.warn_if_truncated(model.backbone, tasks[name].split(split)["text"].tolist(),
                                        f"task {name!r} {split}")


def check_run(model: MultiTaskModel, tasks: Sequence[Task] | Mapping[str, Task], config: TrainConfig,
              processes: OneProcess) -> tuple[dict[str, Task], list[str]]:
    """Every reason the run cannot start, before any work: the tasks by name and the ones that get batches."""
    refuse_enclosing_autocast(model.device)
    processes.check(config)
    tasks = check_tasks(model, tasks)
    names = list(config.train_tasks or tasks)
    for name in {*names, *(config.select_on or ())} - set(tasks):
        raise ValueError(f"task {name!r} is not among the tasks given: {', '.join(tasks)}")
    largest = max(len(tasks[n].train) for n in names)
    if config.batch_size > largest:
        raise ValueError(f"batch_size {config.batch_size} is larger than every task's training set (the largest has "
                         f"{largest} rows): each row would repeat about {config.batch_size // largest} times in one "
                         f"step; use a batch_size of at most {largest}")
    if processes.is_main:
        warn_long_texts(model, tasks)
    return tasks, names


# --- the loop -----------------------------------------------------------------------------------------------

def step_autocast(config: TrainConfig, device: torch.device):
    """A new autocast block for one step's forward (none in fp32): the block's weight copies die with the step."""
    if config.mixed_precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if config.mixed_precision == "bf16" else torch.float16)


def sources(model: MultiTaskModel, tasks: Mapping[str, Task], names: Sequence[str], config: TrainConfig,
            processes: OneProcess) -> tuple[dict, dict]:
    """The sentence-embedding sources of the training and validation texts (the first process builds the caches)."""
    progress = config.progress and processes.is_main
    with processes.first():
        train = {n: sentence_source(model, tasks[n].train["text"].tolist(), config.use_cache, progress,
                                    config.prefix_layers) for n in names}
        val = {n: sentence_source(model, t.val["text"].tolist(), config.use_cache, progress, config.prefix_layers)
               for n, t in tasks.items()}
    return train, val


class Validation:
    """Scores every task on validation after each epoch; the rows become `train`'s history."""

    def __init__(self, model: MultiTaskModel, tasks: Mapping[str, Task], val_src: Mapping, config: TrainConfig,
                 processes: OneProcess) -> None:
        self.model, self.tasks, self.val_src, self.config, self.processes = model, tasks, val_src, config, processes
        self.rows: list[dict] = []
        self.start: dict[str, float] = {}  # epoch 0's accuracy per task

    def __call__(self, epoch: int, losses: Mapping[str, list[float]], seconds: float) -> float:
        """Validate after `epoch`; the selection score (every process gets the first one's)."""
        config = self.config
        for name, task in self.tasks.items():
            s = scores(task.val["label"].to_numpy(), predict_proba(self.model, name, self.val_src[name],
                                                                   config.eval_batch_size))
            self.rows.append({"epoch": epoch, "task": name, "train_loss": float(np.mean(losses[name])) if losses.get(
                name) else float("nan"), "val_loss": s["loss"], "val_accuracy": s["accuracy"],
                "val_f1_macro": s["f1_macro"], "seconds": seconds})
        rows = self.rows[-len(self.tasks):]
        if epoch == 0:
            self.start = {r["task"]: r["val_accuracy"] for r in rows}
        select_on = list(config.select_on or config.train_tasks or self.tasks)
        score = epoch_score(rows, config, select_on, self.start, {n: len(t.val) for n, t in self.tasks.items()})
        return self.processes.agree(score)

    def history(self, best_epoch: int, best_score: float) -> pd.DataFrame:
        table = pd.DataFrame(self.rows)
        table["best"] = table["epoch"] == best_epoch
        table.attrs.update(best_epoch=best_epoch, best_score=best_score, config=asdict(self.config))
        return table


def check_loss(loss: float, epoch: int, step: int, task: str) -> float:
    """The loss, or DivergedError when it is NaN or infinite."""
    if not math.isfinite(loss):
        raise DivergedError(f"the loss became {loss} at epoch {epoch}, step {step} (task {task!r}): training stopped "
                            "and nothing was kept; lower the learning rates or check the data")
    return loss


def restore(parameters: Sequence[nn.Parameter], values: Sequence[torch.Tensor]) -> None:
    """Copy the kept values back into the parameters."""
    with torch.no_grad():
        for param, value in zip(parameters, values):
            param.copy_(value)


def train(model: MultiTaskModel, tasks: Sequence[Task] | Mapping[str, Task], config: TrainConfig | None = None,
          processes: OneProcess | None = None) -> pd.DataFrame:
    """Train `model` on `tasks`; returns the history (a row per epoch and task). The best epoch's weights are
    restored at the end (epoch 0, the start, if no epoch beat it on validation). `processes`: several processes
    (`distributed.Processes`); alone, leave it out."""
    config, processes = config or TrainConfig(), processes or OneProcess()
    tasks, names = check_run(model, tasks, config, processes)
    groups = optimizer_groups(model, config)
    trainable = [p for g in groups for p in g["params"]]
    model.tuned_backbone |= {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    train_src, val_src = sources(model, tasks, names, config, processes)
    labels = {n: torch.tensor(tasks[n].train["label"].to_numpy()) for n in names}
    weights = {n: class_weights(tasks[n], config.class_weights, model.device) for n in names}
    plan = BatchPlan({n: train_src[n].lengths for n in names}, config)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in trainable)  # one kernel a step
    forward, optimizer = processes.wrap(model, torch.optim.AdamW(groups, weight_decay=config.weight_decay, fused=fused))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config.epochs * plan.steps, config.warmup,
                                                                       config.schedule))
    processes.seed(config.seed)
    validate = Validation(model, tasks, val_src, config, processes)
    best_score = validate(0, {}, 0.0) if config.evaluate_first else -math.inf
    best_epoch, best_state, stale = 0, [p.detach().clone() for p in trainable], 0
    bar = progress_bar(total=config.epochs * plan.steps, desc="training", enabled=config.progress and processes.is_main)
    for epoch in range(1, config.epochs + 1):
        start, losses = time.perf_counter(), {n: [] for n in names}
        model.train()
        for step, (name, idx) in enumerate(plan.epoch(), 1):
            idx = processes.share(idx)
            with step_autocast(config, model.device):
                logits = forward(name, train_src[name](idx))
                loss = F.cross_entropy(logits, labels[name][idx].to(logits.device), weight=weights[name])
            losses[name].append(check_loss(processes.mean(loss.detach()), epoch, step, name))
            optimizer.zero_grad(set_to_none=True)
            processes.backward(loss)
            if config.max_grad_norm:
                processes.clip(trainable, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            bar.update()
        score = validate(epoch, losses, time.perf_counter() - start)
        bar.set_postfix({f"val {config.metric}": f"{score:.3f}"})
        if score > best_score:
            best_score, best_epoch, best_state, stale = score, epoch, [p.detach().clone() for p in trainable], 0
        elif config.patience is not None and (stale := stale + 1) >= config.patience:
            break
    bar.close()
    restore(trainable, best_state)
    processes.unwrap(forward)
    model.eval()
    return validate.history(best_epoch, best_score)
