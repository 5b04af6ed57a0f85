"""The multi-task training loop, in plain PyTorch: one task per batch, AdamW, warm-up then decay, best epoch kept.

It runs through Hugging Face Accelerate, so the same loop trains in one CPU process (a notebook) or in
several processes under `accelerate launch` / `torchrun`: every process follows the same seeded plan of
tasks and batches, takes its share of each global batch, and DDP averages the gradients.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import broadcast_object_list
from sklearn.metrics import accuracy_score, f1_score
from tqdm.auto import tqdm

from . import freezing
from .features import sentence_source
from .model import MultiTaskModel

SAMPLINGS = ("round_robin", "proportional", "temperature")
SCHEDULES = ("linear", "cosine", "constant")
METRICS = ("accuracy", "f1_macro")


@dataclass
class TrainConfig:
    """Everything that shapes a training run; defaults suit heads on a frozen backbone."""

    epochs: int = 10
    batch_size: int = 32
    head_lr: float = 1e-3
    backbone_lr: float = 2e-5
    layer_lr_decay: float | None = None  # ULMFiT's 2.6: each layer down divides the rate by this
    weight_decay: float = 0.01
    warmup: float = 0.1  # fraction of all steps spent warming up
    schedule: str = "linear"
    max_grad_norm: float | None = 1.0
    sampling: str = "proportional"
    temperature: float = 2.0
    loss_weights: Mapping[str, float] = field(default_factory=dict)
    train_tasks: Sequence[str] | None = None  # tasks that get batches; default: all given
    select_on: Sequence[str] | None = None  # tasks whose mean validation score picks the best epoch
    metric: str = "accuracy"
    patience: int | None = None  # stop after this many epochs without a better validation score
    evaluate_first: bool = True  # evaluate once before training (epoch 0)
    group_by_length: bool = True
    use_cache: bool = True
    eval_batch_size: int = 128
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name, value, known in (("sampling", self.sampling, SAMPLINGS), ("schedule", self.schedule, SCHEDULES),
                                   ("metric", self.metric, METRICS)):
            if value not in known:
                raise ValueError(f"unknown {name} {value!r}; known: {', '.join(known)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be at least 1, got {self.epochs} and {self.batch_size}")


def batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator, group_by_length: bool,
            window: int = 50) -> list[np.ndarray]:
    """One epoch of shuffled index batches; with grouping, similar lengths share a batch (less padding)."""
    order = rng.permutation(len(lengths))
    if group_by_length:
        # sort within windows of `window` batches: batches stay random but hold similar lengths
        size = window * batch_size
        order = np.concatenate([
            chunk[np.argsort(-lengths[chunk], kind="stable")] for chunk in np.split(order, range(size, len(order), size))
        ])
    out = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [out[i] for i in rng.permutation(len(out))]


def _stream(lengths: np.ndarray, batch_size: int, rng: np.random.Generator, group: bool) -> Iterator[np.ndarray]:
    """Endless batches of one task: a new shuffled epoch each time the last one runs out."""
    while True:
        yield from batches(lengths, batch_size, rng, group)


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


def optimizer_groups(model: MultiTaskModel, config: TrainConfig) -> list[dict]:
    """AdamW parameter groups: heads at `head_lr`; backbone stages at `backbone_lr`, optionally discriminative."""
    groups = [{"name": f"head {n}", "params": [p for p in h.parameters() if p.requires_grad], "lr": config.head_lr}
              for n, h in model.heads.items()]
    stages = freezing.backbone_stages(model)
    top = len(stages) - 1
    for depth, (name, modules) in enumerate(stages):
        lr = config.backbone_lr
        if config.layer_lr_decay:
            lr /= config.layer_lr_decay ** (top - depth)
        groups.append({"name": name, "params": [p for m in modules for p in m.parameters() if p.requires_grad],
                       "lr": lr})
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("nothing to train: every parameter is frozen. Unfreeze a head or some backbone layers "
                         "(freeze(model, 'backbone') trains the heads).")
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
    """An Accelerator for `train`: DDP is told that each step uses one head, so the others get no gradient."""
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


def _check_accelerator(accelerator: Accelerator) -> Accelerator:
    if accelerator.num_processes > 1 and not getattr(accelerator.ddp_handler, "find_unused_parameters", False):
        raise ValueError("each training step uses one task's head, so DDP needs find_unused_parameters=True: "
                         "create the accelerator with mtl_utils.training.make_accelerator()")
    return accelerator


def _check_tasks(model: MultiTaskModel, tasks) -> dict:
    tasks = {t.name: t for t in tasks} if not isinstance(tasks, Mapping) else dict(tasks)
    for name, task in tasks.items():
        if name not in model.heads:
            raise ValueError(f"task {name!r} has no head; this model's heads are: {', '.join(model.heads)}")
        if tuple(task.label_names) != model.label_names[name]:
            raise ValueError(f"task {name!r} has labels {tuple(task.label_names)} but its head knows "
                             f"{model.label_names[name]}")
        for split in ("train", "val"):
            labels = getattr(task, split)["label"]
            bad = labels[(labels < 0) | (labels >= len(task.label_names))]
            if len(bad):
                raise ValueError(f"task {name!r} {split} has labels the head doesn't know at rows "
                                 f"{list(bad.index[:10])}; accepted: 0..{len(task.label_names) - 1}")
    return tasks


@torch.no_grad()
def predict_source(model: MultiTaskModel, task: str, source, n: int, batch_size: int = 128) -> np.ndarray:
    """Class probabilities of one task for every text of a sentence source (eval mode, length-sorted batches)."""
    was_training = model.training
    model.eval()
    order = np.argsort(-np.asarray(source.lengths), kind="stable")
    probs = torch.empty(n, len(model.label_names[task]))
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        probs[torch.as_tensor(idx)] = torch.softmax(model(task, source(idx)), -1).float().cpu()
    model.train(was_training)
    return probs.numpy()


def scores(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Accuracy, macro-F1 and mean cross-entropy of predicted probabilities."""
    pred = probs.argmax(-1)
    loss = float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())
    return {"accuracy": accuracy_score(labels, pred), "f1_macro": f1_score(labels, pred, average="macro"),
            "loss": loss}


def split_probabilities(model: MultiTaskModel, task, split: str = "val", use_cache: bool = True,
                        progress: bool = False) -> np.ndarray:
    """Class probabilities of one task for every sentence of one split."""
    frame = task.split(split)
    source = sentence_source(model, frame["text"].tolist(), use_cache, progress)
    return predict_source(model, task.name, source, len(frame))


def predicted_labels(model: MultiTaskModel, task, split: str = "test") -> np.ndarray:
    """Predicted label ids of one task on one split (the test split unless told otherwise)."""
    return split_probabilities(model, task, split).argmax(-1)


def evaluate(model: MultiTaskModel, task, split: str = "val", use_cache: bool = True,
             progress: bool = False) -> dict[str, float]:
    """Accuracy, macro-F1 and loss of one task on one split."""
    return scores(task.split(split)["label"].to_numpy(), split_probabilities(model, task, split, use_cache, progress))


def train(model: MultiTaskModel, tasks, config: TrainConfig | None = None,
          accelerator: Accelerator | None = None) -> pd.DataFrame:
    """Train `model` on `tasks` (Task objects); returns the history; the best epoch's weights are restored.

    The model trains on its own device. Under `accelerate launch` or `torchrun`, put it on
    `accelerator.device` first: each process then trains on its share of every global batch.
    """
    config = config or TrainConfig()
    accelerator = _check_accelerator(accelerator or make_accelerator())
    tasks = _check_tasks(model, tasks)
    train_names = list(config.train_tasks or tasks)
    select_on = list(config.select_on or train_names)
    for name in [*train_names, *select_on, *config.loss_weights]:
        if name not in tasks:
            raise ValueError(f"task {name!r} is not among the tasks given: {', '.join(tasks)}")
    groups = optimizer_groups(model, config)
    trainable = {id(p) for g in groups for p in g["params"]}
    model.tuned_backbone |= {n for n, p in model.backbone.named_parameters() if id(p) in trainable}
    # the model trains on the device it is on; with several processes DDP wraps it (and averages gradients)
    ddp_model = accelerator.prepare_model(model, device_placement=False)
    world, rank = accelerator.num_processes, accelerator.process_index
    progress = config.progress and accelerator.is_main_process

    torch.manual_seed(config.seed + rank)  # dropout: each process draws its own masks for its own examples
    rng = np.random.default_rng(config.seed)  # the same on every process: same tasks, same global batches
    model.train()
    # the first process computes (and writes the embedding cache), then the others read it from disk;
    # the frozen-prefix cache lives in memory, so each process computes its own
    with accelerator.main_process_first():
        train_src = {n: sentence_source(model, tasks[n].train["text"].tolist(), config.use_cache, progress)
                     for n in train_names}
        val_src = {n: sentence_source(model, t.val["text"].tolist(), config.use_cache, progress)
                   for n, t in tasks.items()}
    labels = {n: torch.tensor(tasks[n].train["label"].to_numpy()) for n in train_names}
    streams = {n: _stream(np.asarray(train_src[n].lengths), config.batch_size, rng, config.group_by_length)
               for n in train_names}
    sizes = {n: len(tasks[n].train) for n in train_names}
    steps = sum(math.ceil(s / config.batch_size) for s in sizes.values())

    # the fused AdamW step is one kernel instead of a Python loop over tensors (18 ms -> 2 ms a step on 2 cores)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for g in groups for p in g["params"])
    optimizer = accelerator.prepare(torch.optim.AdamW(groups, weight_decay=config.weight_decay, fused=fused))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(config.epochs * steps, config.warmup, config.schedule))

    def validate(epoch: int, losses: dict[str, list[float]], seconds: float) -> float:
        for name, task in tasks.items():
            s = scores(task.val["label"].to_numpy(), predict_source(model, name, val_src[name], len(task.val),
                                                                   config.eval_batch_size))
            history.append({"epoch": epoch, "task": name,
                            "train_loss": float(np.mean(losses[name])) if losses.get(name) else float("nan"),
                            "val_loss": s["loss"], "val_accuracy": s["accuracy"], "val_f1_macro": s["f1_macro"],
                            "seconds": seconds})
        score = float(np.mean([r[f"val_{config.metric}"] for r in history[-len(tasks):] if r["task"] in select_on]))
        return broadcast_object_list([score])[0]  # every process keeps the first one's best epoch and stops with it

    def snapshot() -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in model.named_parameters() if id(p) in trainable}

    history: list[dict] = []
    best_score, best_epoch, best_state = -math.inf, 0, snapshot()
    if config.evaluate_first:
        best_score = validate(0, {}, 0.0)
    stale = 0
    bar = tqdm(total=config.epochs * steps, desc="training", disable=not progress)
    for epoch in range(1, config.epochs + 1):
        start = time.perf_counter()
        model.train()
        losses: dict[str, list[float]] = {n: [] for n in train_names}
        plan = task_schedule(sizes, steps, config.sampling, config.temperature, rng)
        bar.set_description(f"epoch {epoch}/{config.epochs}")
        for name in plan:
            idx = next(streams[name])  # the global batch; this process takes every world-th example of it
            part = idx[rank::world]
            share = len(part) / len(idx)
            if not len(part):  # fewer examples than processes: run one at zero weight, so DDP still syncs
                part = idx[:1]
            with accelerator.autocast():
                logits = ddp_model(name, train_src[name](part))
                loss = F.cross_entropy(logits, labels[name][torch.as_tensor(part)].to(logits.device))
            optimizer.zero_grad(set_to_none=True)
            # DDP averages the processes' gradients; weighting each by share * world makes that the global mean
            accelerator.backward(config.loss_weights.get(name, 1.0) * loss * (share * world))
            if config.max_grad_norm:
                accelerator.clip_grad_norm_([p for g in groups for p in g["params"]], config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            losses[name].append(accelerator.reduce(loss.detach() * share, "sum").item())  # the global batch's loss
            bar.update()
        score = validate(epoch, losses, time.perf_counter() - start)
        bar.set_postfix({f"val {config.metric}": f"{score:.3f}"})
        if score > best_score:
            best_score, best_epoch, best_state, stale = score, epoch, snapshot(), 0
        else:
            stale += 1
            if config.patience is not None and stale >= config.patience:
                break
    bar.close()
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in best_state.items():
            params[name].copy_(value)
    accelerator.unwrap_model(ddp_model, keep_fp32_wrapper=False)  # drops any mixed-precision wrapper on forward
    model.eval()
    table = pd.DataFrame(history)
    table["best"] = table["epoch"] == best_epoch
    table.attrs.update(best_epoch=best_epoch, best_score=best_score, config=asdict(config))
    return table
