"""When does unfreezing start to pay? A learning curve: at each training size, each method against the same-data control.

At every size and seed the tasks get a fresh sample of that many training sentences, and heads trained on that
sample (frozen backbone) are the start of every run: the control (the heads alone, trained on), the top layers
unfrozen, LoRA adapters. Each run uses the same sample, epochs and rates; only what trains differs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pandas as pd
import torch

from . import freezing
from .data import Task
from .evaluation import seed_summary
from .lora import add_lora
from .model import MultiTaskModel
from .offline.cache import atomic_write_text
from .recipes import DEFAULT_BACKBONE, TrainConfig, finetune_config
from .series import build_model, seed_runs
from .training import train

CONTROL = "heads only (control)"
RUNS = Path(__file__).resolve().parents[1] / "reruns" / "learning_curve_runs.csv"  # `make learning-curve` writes it
Method = tuple[Callable[[MultiTaskModel, int], MultiTaskModel], TrainConfig]


def sample(tasks: Sequence[Task], size: int, seed: int) -> list[Task]:
    """Each task with a stratified sample of `size` training sentences drawn with `seed` (all, if it has fewer)."""
    return [t.with_train_sample(min(size, len(t.train)), seed=seed) for t in tasks]


def methods(k: int = 2, lora_r: int = 8, epochs: int = 2, lora_lr: float = 1e-3) -> dict[str, Method]:
    """The control and the two ways to adapt the top `k` layers, each with its recipe (same epochs, head rate)."""
    layers = finetune_config(epochs=epochs, progress=False)
    return {
        CONTROL: (lambda model, seed: model, layers),
        f"last {k} layers": (lambda model, seed: freezing.unfreeze_last(model, k), layers),
        f"LoRA r={lora_r}, top {k} layers": (lambda model, seed: _lora(model, seed, lora_r, k),
                                             finetune_config(epochs=epochs, backbone_lr=lora_lr, layer_lr_decay=1.0,
                                                             progress=False)),
    }


def _lora(model: MultiTaskModel, seed: int, r: int, k: int) -> MultiTaskModel:
    torch.manual_seed(seed)  # the adapters' random A matrices, the same for the same seed
    return add_lora(model, r=r, top_layers=k)


def benchmark(tasks: Sequence[Task], seed: int, backbone: str = DEFAULT_BACKBONE) -> MultiTaskModel:
    """Heads trained on the frozen backbone with these tasks' training sentences (the series' heads recipe)."""
    model = freezing.freeze_backbone(build_model(backbone, list(tasks), seed=seed))
    train(model, tasks, TrainConfig(seed=seed, progress=False))
    return model


def curve_runs(tasks: Sequence[Task], sizes: Sequence[int], seeds: Sequence[int], recipes: Mapping[str, Method],
               backbone: str = DEFAULT_BACKBONE) -> pd.DataFrame:
    """Every method at every size and seed, from that size and seed's benchmark: a row per run and task with the
    kept epoch (0: undone, the run is its start), validation and test accuracy and training seconds."""
    rows = []
    for size in sizes:
        for seed in seeds:
            data = sample(tasks, size, seed)
            heads = benchmark(data, seed, backbone).heads.state_dict()
            for name, (prepare, config) in recipes.items():
                def start(s: int, prepare=prepare) -> MultiTaskModel:
                    model = freezing.freeze_backbone(build_model(backbone, data, seed=s))
                    model.heads.load_state_dict(heads)
                    return prepare(model, s)

                found = seed_runs(start, data, config, [seed])
                found["training sentences"] = found.task.map({t.name: len(t.train) for t in data})
                rows += found.assign(size=size, method=name).to_dict("records")
    return pd.DataFrame(rows)


def gains(runs: pd.DataFrame, split: str = "val") -> pd.DataFrame:
    """Each run's gain over its control (same size, seed and task), in points of `split` accuracy; `undone` marks
    a run whose selection kept its start (its gain is then exactly the control's shortfall, if any)."""
    control = runs[runs.method == CONTROL].set_index(["size", "seed", "task"])[split]
    others = runs[runs.method != CONTROL].copy()
    others["gain"] = 100 * (others[split].to_numpy() - control.loc[list(zip(others["size"], others.seed,
                                                                            others.task))].to_numpy())
    others["undone"] = others["kept epoch"] == 0
    return others[["size", "method", "task", "seed", "kept epoch", "undone", "gain"]].reset_index(drop=True)


def summary(gains_table: pd.DataFrame) -> pd.DataFrame:
    """Per size, method and task: the mean gain over the seeds, its spread (sd, min, max), the 95% t-interval of
    the mean (low, high) and how many runs were undone."""
    rows = []
    for (size, method, task), g in gains_table.groupby(["size", "method", "task"], sort=False):
        s = seed_summary(g["gain"])
        rows.append({"size": size, "method": method, "task": task, "seeds": len(g), "mean gain": s["mean"],
                     "sd": s["sd"], "min": s["min"], "max": s["max"], "low": s["low"], "high": s["high"],
                     "undone": int(g["undone"].sum())})
    return pd.DataFrame(rows)


def pays_from(table: pd.DataFrame, method: str, task: str) -> int | None:
    """The smallest size from which every seed's gain is above 0 (at that size and every larger one), or None."""
    rows = table[(table.method == method) & (table.task == task)].sort_values("size")
    sizes = rows["size"].tolist()
    above = (rows["min"] > 0).tolist()
    for i, size in enumerate(sizes):
        if all(above[i:]):
            return int(size)
    return None


def save_runs(runs: pd.DataFrame, path: Path = RUNS) -> None:
    """Write the runs table whole (or not at all), for the notebooks that read the curve."""
    atomic_write_text(path, runs.to_csv(index=False))


def committed_runs(path: Path = RUNS) -> pd.DataFrame:
    """The runs of the last `make learning-curve`, as committed beside its notebook."""
    if not path.is_file():
        raise FileNotFoundError(f"no learning-curve table at {path.name}: `make learning-curve` writes it")
    return pd.read_csv(path)
