"""Does training in bf16 cost accuracy, and what does it buy on this CPU? Two recipes on 1,000 training sentences per
task, each in fp32 and in bf16 (`TrainConfig(mixed_precision="bf16")`: the loop enters autocast once per step),
three seeds each, fp32 and bf16 interleaved so that their speed is compared in one run:

- heads only: fresh heads on the frozen all-MiniLM-L6-v2 (TrainConfig defaults, 20 epochs over cached embeddings);
- last 2 layers: from notebook 02's benchmark, the top 2 layers and the heads (finetune_config, 2 epochs).

Every model is evaluated in fp32 on the full test sets, and each bf16 model is compared with the fp32 model of the
same seed by the paired test. `python -m benchmarks.bf16_accuracy` (about 10 minutes on 2 cores); the tables go to
results/benchmarks/bf16_accuracy.csv and bf16_accuracy_summary.csv.

(Before 2026-12-05 this benchmark wrapped the whole `train()` call in one autocast block, which trains on the bf16
copies of the start's weights: see tests/test_mixed_precision.py. `train()` now refuses to run inside one.)
"""

from __future__ import annotations

import statistics

import pandas as pd

from mtl_utils import freezing
from mtl_utils.evaluation import correct, paired_comparison
from mtl_utils.model import MultiTaskModel
from mtl_utils.recipes import TrainConfig, finetune_config
from mtl_utils.results import save_table
from mtl_utils.series import build_model, checkpoint_folder, multitask_checkpoint, series_tasks
from mtl_utils.training import train

from .common import log, markdown

SEEDS = (0, 1, 2)
PRECISIONS = ("no", "bf16")  # TrainConfig.mixed_precision
NAMES = {"no": "fp32", "bf16": "bf16"}


def recipes(tasks):
    """Each recipe: a model for a seed (what trains set), and its TrainConfig for a seed and a precision."""
    return {
        "heads only": (lambda seed: freezing.freeze_backbone(build_model(tasks=tasks, seed=seed)),
                       lambda seed, precision: TrainConfig(seed=seed, mixed_precision=precision, progress=False)),
        "last 2 layers": (lambda seed: freezing.unfreeze_last(freezing.freeze_backbone(
                              MultiTaskModel.load(checkpoint_folder())), 2),
                          lambda seed, precision: finetune_config(seed=seed, mixed_precision=precision,
                                                                  progress=False)),
    }


def bf16_accuracy(seeds: tuple[int, ...] = SEEDS, sample: int = 1000) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per recipe, seed and task (fp32 and bf16-trained test accuracy, both read in fp32; the paired
    test), and a summary per recipe and task (mean change over the seeds, the pooled test, the speed ratio)."""
    tasks = series_tasks()
    multitask_checkpoint(progress=False)
    train_tasks = [t.with_train_sample(sample, seed=0) for t in tasks]
    rows, summary = [], []
    for recipe, (make_model, make_config) in recipes(train_tasks).items():
        right, seconds = {}, {}
        for seed in seeds:
            order = PRECISIONS if seed % 2 == 0 else PRECISIONS[::-1]  # alternate who goes first
            for precision in order:
                model = make_model(seed)
                history = train(model, train_tasks, make_config(seed, precision))
                seconds[precision, seed] = float(history.drop_duplicates("epoch")["seconds"].sum())
                right[precision, seed] = {t.name: correct(model, t) for t in tasks}  # evaluated in fp32
                log(f"{recipe}, seed {seed}, {NAMES[precision]}: {seconds[precision, seed]:.1f} s training, kept epoch "
                    f"{history.attrs['best_epoch']}, test " + ", ".join(
                        f"{k} {v.mean():.3f}" for k, v in right[precision, seed].items()))
        ratios = [seconds["no", s] / seconds["bf16", s] for s in seeds]
        for task in tasks:
            changes, p_values, zero_inside = [], [], []
            for seed in seeds:
                paired = paired_comparison(right["bf16", seed][task.name], right["no", seed][task.name])
                changes.append(paired.difference * 100)
                p_values.append(paired.p_value)
                zero_inside.append(paired.low <= 0 <= paired.high)
                rows.append({"recipe": recipe, "seed": seed, "task": task.name,
                             "fp32 test": round(float(right["no", seed][task.name].mean()), 3),
                             "bf16-trained test": round(float(right["bf16", seed][task.name].mean()), 3),
                             "change (points)": f"{paired.difference * 100:+.1f} [{paired.low * 100:+.1f}, "
                                                f"{paired.high * 100:+.1f}]",
                             "McNemar p": f"{paired.p_value:.2g}",
                             "answers changed": f"{(right['bf16', seed][task.name] != right['no', seed][task.name]).mean():.1%}",
                             "training s fp32 / bf16": f"{seconds['no', seed]:.1f} / {seconds['bf16', seed]:.1f}"})
            summary.append({"recipe": recipe, "task": task.name,
                            "mean change over seeds (points)": f"{statistics.mean(changes):+.2f}",
                            "per seed": ", ".join(f"{c:+.1f}" for c in changes),
                            "paired p per seed": ", ".join(f"{p:.2g}" for p in p_values),
                            "every seed's interval holds 0": all(zero_inside),
                            "bf16 speed-up, median over seeds": f"{statistics.median(ratios):.2f}x",
                            "speed-ups": ", ".join(f"{r:.2f}x" for r in ratios)})
    return pd.DataFrame(rows), pd.DataFrame(summary)


if __name__ == "__main__":
    from .precision import cpu_bf16

    log(f"bf16 instructions on this CPU: {cpu_bf16()}")
    table, summary = bf16_accuracy()
    save_table(table, "bf16_accuracy", "benchmarks")
    save_table(summary, "bf16_accuracy_summary", "benchmarks")
    print(markdown(table))
    print()
    print(markdown(summary))
