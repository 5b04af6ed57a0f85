"""The multi-task training loop, in plain PyTorch: one task per batch, AdamW, warm-up then decay, best epoch kept.

In one process (a notebook) `train` is a textbook loop. Under `accelerate launch` or `torchrun` the same loop
runs in every process: Accelerate's prepared data loader gives each process its slice of every global batch
(`split_batches`), and DDP averages the gradients, so N processes take the steps one process takes.
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
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.utils import broadcast_object_list
from torch.utils.data import DataLoader, Sampler

from . import backbone as bb
from . import long_text
from .data import Task
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


class TaskBatches(Sampler):
    """The global batches of training, each from one task, in a plan drawn from `seed`: every process draws
    the same plan, and Accelerate gives each its slice of every batch."""

    def __init__(self, lengths: Mapping[str, np.ndarray], config: TrainConfig) -> None:
        self.batch_size, self.drop_last = config.batch_size, False  # what Accelerate reads
        self.config = config
        self.sizes = {name: len(values) for name, values in lengths.items()}
        self.steps = sum(math.ceil(size / config.batch_size) for size in self.sizes.values())
        self.offsets = dict(zip(self.sizes, np.cumsum([0, *self.sizes.values()])))
        self.rng = np.random.default_rng(config.seed)
        self.streams = {name: self._stream(np.asarray(values)) for name, values in lengths.items()}

    def _stream(self, lengths: np.ndarray) -> Iterator[np.ndarray]:
        while True:  # a new shuffled epoch of this task whenever the last one runs out
            yield from batches(lengths, self.batch_size, self.rng, self.config.group_by_length)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        plan = task_schedule(self.sizes, self.steps, self.config.sampling, self.config.temperature, self.rng)
        for name in plan:
            yield (self.offsets[name] + next(self.streams[name])).tolist()


def task_loader(lengths: Mapping[str, np.ndarray], config: TrainConfig) -> DataLoader:
    """A DataLoader of (task, indices) batches: the examples are (task, index) pairs, batched by `TaskBatches`."""
    examples = [(name, i) for name, values in lengths.items() for i in range(len(values))]
    # a generator of its own: iterating must not draw from torch's global RNG (the dropout masks)
    return DataLoader(examples, batch_sampler=TaskBatches(lengths, config), generator=torch.Generator().manual_seed(0),
                      collate_fn=lambda items: (items[0][0], np.array([i for _, i in items])))


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


def make_accelerator(mixed_precision: str | None = None, cpu: bool = False) -> Accelerator:
    """An Accelerator for `train`: each process gets a slice of every global batch, and DDP is told that each
    step uses one head, so the others get no gradient."""
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu,
                       dataloader_config=DataLoaderConfiguration(split_batches=True),
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


def _check_accelerator(accelerator: Accelerator) -> Accelerator:
    if accelerator.num_processes > 1 and not (accelerator.split_batches and getattr(
            accelerator.ddp_handler, "find_unused_parameters", False)):
        raise ValueError("several processes need split batches and DDP's find_unused_parameters (each step uses one "
                         "task's head): create the accelerator with mtl_utils.training.make_accelerator()")
    return accelerator


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


def _check_precision(accelerator: Accelerator, config: TrainConfig) -> Accelerator:
    """The loop autocasts each step as the config says; an accelerator may only agree (fp16 needs its scaler)."""
    if accelerator.mixed_precision not in ("no", config.mixed_precision):
        raise ValueError(f"the accelerator trains in mixed precision {accelerator.mixed_precision!r} but the config "
                         f"asks for {config.mixed_precision!r}: make both say the same")
    if config.mixed_precision == "fp16" and accelerator.mixed_precision != "fp16":
        raise ValueError("mixed_precision='fp16' needs a GPU and the accelerator's gradient scaler: pass "
                         "accelerator=make_accelerator('fp16'), or use 'bf16'")
    return accelerator


def step_autocast(config: TrainConfig, device: torch.device):
    """A new autocast block for one step's forward (none in fp32): the block's weight copies die with the step."""
    if config.mixed_precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if config.mixed_precision == "bf16" else torch.float16)


def check_tasks(model: MultiTaskModel, tasks: Sequence[Task] | Mapping[str, Task]) -> dict[str, Task]:
    """Tasks by name, each with a head that knows its labels."""
    values = list(tasks.values()) if isinstance(tasks, Mapping) else tasks
    if isinstance(tasks, str | Task) or not isinstance(values, Sequence) or not values \
            or not all(isinstance(t, Task) for t in values):
        raise TypeError(f"tasks must be a non-empty list of Task (or a dict of them by name), got {tasks!r:.80}; "
                        "data.load_task or data.task_from_dataframe makes a Task")
    if not isinstance(tasks, Mapping):
        names = [t.name for t in tasks]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"two tasks are named {', '.join(map(repr, twice))}: each task needs a name of its own "
                             f"(got {names})")
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


# --- the loop -----------------------------------------------------------------------------------------------

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


def class_weights(task: Task, kind: str | None) -> torch.Tensor | None:
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
    return torch.tensor(weights, dtype=torch.float32)


def warn_long_texts(model: MultiTaskModel, tasks: Mapping[str, Task]) -> None:
    """A DataWarning for each training or validation split whose texts the backbone cuts (only long texts are
    tokenised to count: short ones cost nothing)."""
    for name in tasks:
        for split in ("train", "val"):
            long_text.warn_if_truncated(model.backbone, tasks[name].split(split)["text"].tolist(),
                                        f"task {name!r} {split}")


def train(model: MultiTaskModel, tasks: Sequence[Task] | Mapping[str, Task], config: TrainConfig | None = None,
          accelerator: Accelerator | None = None) -> pd.DataFrame:
    """Train `model` on `tasks`; returns the history (a row per epoch and task); the best epoch's weights are
    restored at the end (epoch 0, the start, if no epoch beat it on validation).

    The model trains on its own device; under `accelerate launch` or `torchrun`, put it on `accelerator.device`.
    """
    config = config or TrainConfig()
    refuse_enclosing_autocast(model.device)
    accelerator = _check_precision(_check_accelerator(accelerator or make_accelerator()), config)
    tasks = check_tasks(model, tasks)
    names = list(config.train_tasks or tasks)
    select_on = list(config.select_on or names)
    for name in {*names, *select_on} - set(tasks):
        raise ValueError(f"task {name!r} is not among the tasks given: {', '.join(tasks)}")
    largest = max(len(tasks[n].train) for n in names)
    if config.batch_size > largest:
        raise ValueError(f"batch_size {config.batch_size} is larger than every task's training set (the largest has "
                         f"{largest} rows): each row would repeat about {config.batch_size // largest} times in one "
                         f"step; use a batch_size of at most {largest}")
    groups = optimizer_groups(model, config)
    trainable = [p for g in groups for p in g["params"]]
    model.tuned_backbone |= {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    progress = config.progress and accelerator.is_main_process
    if accelerator.is_main_process:
        warn_long_texts(model, tasks)

    # the first process computes the caches (and writes the embedding cache); the others then read it from disk
    with accelerator.main_process_first():
        train_src = {n: sentence_source(model, tasks[n].train["text"].tolist(), config.use_cache, progress,
                                        config.prefix_layers) for n in names}
        val_src = {n: sentence_source(model, t.val["text"].tolist(), config.use_cache, progress, config.prefix_layers)
                   for n, t in tasks.items()}
    labels = {n: torch.tensor(tasks[n].train["label"].to_numpy()) for n in names}
    weights = {n: class_weights(tasks[n], config.class_weights) for n in names}
    loader = accelerator.prepare_data_loader(task_loader({n: train_src[n].lengths for n in names}, config),
                                             device_placement=False)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in trainable)  # one kernel a step
    optimizer = accelerator.prepare_optimizer(torch.optim.AdamW(groups, weight_decay=config.weight_decay, fused=fused))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(config.epochs * len(loader), config.warmup, config.schedule))
    ddp_model = accelerator.prepare_model(model, device_placement=False)  # the same model in one process
    torch.manual_seed(config.seed + accelerator.process_index)  # dropout masks: each process, its own examples

    history: list[dict] = []

    val_sizes = {n: len(t.val) for n, t in tasks.items()}
    start_accuracy: dict[str, float] = {}

    def validate(epoch: int, losses: Mapping[str, list[float]], seconds: float) -> float:
        for name, task in tasks.items():
            s = scores(task.val["label"].to_numpy(), predict_proba(model, name, val_src[name], config.eval_batch_size))
            history.append({"epoch": epoch, "task": name, "train_loss": float(np.mean(losses[name])) if losses.get(
                name) else float("nan"), "val_loss": s["loss"], "val_accuracy": s["accuracy"],
                "val_f1_macro": s["f1_macro"], "seconds": seconds})
        rows = history[-len(tasks):]
        if epoch == 0:
            start_accuracy.update({r["task"]: r["val_accuracy"] for r in rows})
        score = epoch_score(rows, config, select_on, start_accuracy, val_sizes)
        return broadcast_object_list([score])[0]  # every process keeps the first one's best epoch

    def snapshot() -> list[torch.Tensor]:
        return [p.detach().clone() for p in trainable]

    best_score, best_epoch, best_state = (validate(0, {}, 0.0) if config.evaluate_first else -math.inf), 0, snapshot()
    stale = 0
    bar = progress_bar(total=config.epochs * len(loader), desc="training", enabled=progress)
    for epoch in range(1, config.epochs + 1):
        start = time.perf_counter()
        model.train()
        losses: dict[str, list[float]] = {n: [] for n in names}
        for step, (name, idx) in enumerate(loader, 1):
            with step_autocast(config, model.device):
                logits = ddp_model(name, train_src[name](idx))
                weight = None if weights[name] is None else weights[name].to(logits.device)
                loss = F.cross_entropy(logits, labels[name][torch.as_tensor(idx)].to(logits.device), weight=weight)
            global_loss = accelerator.reduce(loss.detach(), "mean").item()  # the whole batch's, the same everywhere
            if not math.isfinite(global_loss):
                raise DivergedError(f"the loss became {global_loss} at epoch {epoch}, step {step} (task {name!r}): "
                                    "training stopped and nothing was kept; lower the learning rates or check the data")
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if config.max_grad_norm:
                accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            losses[name].append(global_loss)
            bar.update()
        score = validate(epoch, losses, time.perf_counter() - start)
        bar.set_postfix({f"val {config.metric}": f"{score:.3f}"})
        if score > best_score:
            best_score, best_epoch, best_state, stale = score, epoch, snapshot(), 0
        elif config.patience is not None and (stale := stale + 1) >= config.patience:
            break
    bar.close()
    with torch.no_grad():
        for param, value in zip(trainable, best_state):
            param.copy_(value)
    accelerator.unwrap_model(ddp_model, keep_fp32_wrapper=False)  # drops any mixed-precision wrapper on forward
    model.eval()
    table = pd.DataFrame(history)
    table["best"] = table["epoch"] == best_epoch
    table.attrs.update(best_epoch=best_epoch, best_score=best_score, config=asdict(config))
    return table
