"""Does training in bf16 autocast cost accuracy? The last 2 layers fine-tuned from notebook 02's benchmark on 1,000
sentences per task (finetune_config, 2 epochs), in fp32 and in bf16 autocast, three seeds each; every model is then
evaluated in fp32 on the full test sets and each bf16 model is compared with the fp32 model of the same seed by the
paired test. `python -m benchmarks.bf16_accuracy` (about 5 minutes on 2 cores); the table goes to
results/benchmarks/bf16_accuracy.csv.
"""

from __future__ import annotations

import contextlib
import time

import pandas as pd
import torch

from mtl_utils import freezing
from mtl_utils.checkpoint import load_checkpoint
from mtl_utils.evaluation import correct, paired_comparison
from mtl_utils.recipes import finetune_config
from mtl_utils.results import save_table
from mtl_utils.series import checkpoint_folder, multitask_checkpoint, series_tasks
from mtl_utils.training import train

from .common import log, markdown

SEEDS = (0, 1, 2)


def bf16_accuracy(seeds: tuple[int, ...] = SEEDS, sample: int = 1000) -> pd.DataFrame:
    """One row per seed and task: fp32 and bf16-trained test accuracy (both evaluated in fp32), the paired test."""
    tasks = series_tasks()
    multitask_checkpoint(progress=False)
    train_tasks = [t.with_train_sample(sample, seed=0) for t in tasks]
    right, seconds = {}, {}
    for seed in seeds:
        for precision in ("fp32", "bf16"):
            model = freezing.unfreeze_last(freezing.freeze_backbone(load_checkpoint(checkpoint_folder())), 2)
            autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16"
                        else contextlib.nullcontext())
            start = time.perf_counter()
            with autocast:
                train(model, train_tasks, finetune_config(seed=seed, progress=False))
            seconds[precision, seed] = time.perf_counter() - start
            right[precision, seed] = {t.name: correct(model, t) for t in tasks}  # evaluated in fp32
            log(f"seed {seed}, {precision}: {seconds[precision, seed]:.0f} s, test "
                + ", ".join(f"{k} {v.mean():.3f}" for k, v in right[precision, seed].items()))
    rows = []
    for seed in seeds:
        for task in tasks:
            paired = paired_comparison(right["bf16", seed][task.name], right["fp32", seed][task.name])
            rows.append({"seed": seed, "task": task.name,
                         "fp32 test": round(float(right["fp32", seed][task.name].mean()), 3),
                         "bf16-trained test": round(float(right["bf16", seed][task.name].mean()), 3),
                         "change (points)": f"{paired.difference * 100:+.1f} [{paired.low * 100:+.1f}, "
                                            f"{paired.high * 100:+.1f}]",
                         "McNemar p": f"{paired.p_value:.2g}",
                         "training s fp32 / bf16": f"{seconds['fp32', seed]:.0f} / {seconds['bf16', seed]:.0f}"})
    return pd.DataFrame(rows)


if __name__ == "__main__":
    table = bf16_accuracy()
    save_table(table, "bf16_accuracy", "benchmarks")
    print(markdown(table))
