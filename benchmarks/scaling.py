"""5. How cost grows with the work: one training epoch and the peak memory against the number of training sentences.

Three ways to get sentence embeddings during training (mtl_utils.features): the embedding cache (frozen backbone,
heads train), the 16-bit prefix cache with the top 2 layers training, and the full forward pass with the top 2
layers training. Each case runs in a fresh process with an empty cache folder, so its peak RSS is its own and
every cache is built from nothing (the build is timed apart from the epoch). The training sentences are both
tasks' real training sentences, repeated to reach the size (1k, 4k, 16k, 64k), with a fixed validation sample of
64 per task.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time

import pandas as pd

from .common import log

SIZES = (1_000, 4_000, 16_000, 64_000)
MODES = ("embedding cache", "prefix cache, k = 2", "full forward, k = 2")
# what each backbone affords on 2 cores (mpnet's 64k full pass alone would take over an hour): the largest size per
# mode; the README extrapolates the rest from the measured growth
LIMITS = {
    "all-MiniLM-L6-v2": {"embedding cache": 64_000, "prefix cache, k = 2": 64_000, "full forward, k = 2": 16_000},
    "all-mpnet-base-v2": {"embedding cache": 4_000, "prefix cache, k = 2": 4_000, "full forward, k = 2": 4_000},
}
QUICK_LIMITS = {"all-MiniLM-L6-v2": {mode: 1_000 for mode in MODES}}


def workload(n: int, val_n: int = 64, seed: int = 0):
    """Both tasks with `n` training sentences in all (in proportion to their sizes, real sentences repeated)."""
    import dataclasses

    from mtl_utils.series import series_tasks

    from .common import stratified_sample

    tasks = series_tasks()
    total = sum(len(t.train) for t in tasks)
    out = []
    for task in tasks:
        want = round(n * len(task.train) / total)
        repeats = math.ceil(want / len(task.train))
        train = pd.concat([task.train] * repeats, ignore_index=True).sample(want, random_state=seed)
        out.append(dataclasses.replace(task, train=train.reset_index(drop=True),
                                       val=stratified_sample(task.val, val_n, seed)))
    return out


def run_case(backbone: str, mode: str, n: int) -> dict:
    """In this process: build what the mode needs, then time one epoch of training."""
    from mtl_utils import freezing
    from mtl_utils.features import sentence_source
    from mtl_utils.recipes import TrainConfig, finetune_config
    from mtl_utils.series import build_model
    from mtl_utils.training import train

    tasks = workload(n)
    model = freezing.freeze_backbone(build_model(backbone, tasks))
    if mode != "embedding cache":
        freezing.unfreeze_last(model, 2)
    use_cache = mode != "full forward, k = 2"
    start = time.perf_counter()
    sources = [sentence_source(model, t.split(s)["text"].tolist(), use_cache, progress=False)
               for t in tasks for s in ("train", "val")]
    build = time.perf_counter() - start
    store = sum(getattr(getattr(src, "states", None), "nbytes", 0) for src in sources)
    del sources
    recipe = TrainConfig if mode == "embedding cache" else finetune_config
    history = train(model, tasks, recipe(epochs=1, evaluate_first=False, progress=False, use_cache=use_cache))
    return {"build s": build, "epoch s": float(history["seconds"].iloc[0]), "prefix store MB": store / 1e6}


def scaling(quick: bool = False) -> tuple[pd.DataFrame, None]:
    """Every (backbone, mode, size) case in its own process: epoch seconds, build seconds and peak RSS."""
    from .notebooks import REPO, measure

    rows = []
    for backbone, limits in (QUICK_LIMITS if quick else LIMITS).items():
        for mode in MODES:
            for n in SIZES:
                if n > limits[mode]:
                    continue
                log(f"{backbone}, {mode}, {n:,} sentences")
                with tempfile.TemporaryDirectory(prefix="bench-scaling-") as cache, \
                        tempfile.NamedTemporaryFile("r", suffix=".json") as result:
                    env = {**os.environ, "MTL_UTILS_CACHE": cache}
                    run = measure([sys.executable, "-m", "benchmarks.scaling", backbone, mode, str(n), result.name],
                                  cwd=REPO, env=env)
                    if run["returncode"] != 0:
                        raise RuntimeError(f"the case {backbone}, {mode}, {n} failed (exit {run['returncode']})")
                    case = json.loads(open(result.name).read())
                rows.append({"backbone": backbone, "mode": mode, "training sentences": n, **case,
                             "peak RSS MiB": round(run["peak_rss_largest_mib"]), "process seconds": run["seconds"]})
                log(f"    epoch {case['epoch s']:.1f} s, build {case['build s']:.1f} s, "
                    f"peak RSS {run['peak_rss_largest_mib']:.0f} MiB")
    return pd.DataFrame(rows), None


def plot(table: pd.DataFrame, path) -> None:
    """Epoch seconds and peak RSS against training sentences, log-log, a line per backbone and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, ((backbone, mode), part) in enumerate(table.groupby(["backbone", "mode"], sort=False)):
        style = "-" if backbone.startswith("all-MiniLM") else "--"
        for ax, column in zip(axes, ("epoch s", "peak RSS MiB")):
            ax.plot(part["training sentences"], part[column], style, marker="o", color=f"C{MODES.index(mode)}",
                    label=f"{backbone}, {mode}")
    for ax, label in zip(axes, ("seconds per epoch (this CPU)", "peak RSS of the process (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training sentences")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":  # one case, in a process of its own: python -m benchmarks.scaling BACKBONE MODE N OUT
    backbone, mode, n, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    with open(out, "w") as f:
        json.dump(run_case(backbone, mode, n), f)
