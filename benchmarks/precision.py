"""7. bf16 on this CPU: encoding and last-k training under bf16 autocast against fp32.

The same work in one process, interleaved (fp32, bf16, then bf16, fp32, ...), so the ratio of medians is
measured in one run; and what bf16 changes in the results: the cosine between fp32 and bf16 sentence
embeddings, and the validation accuracy after the same training in each precision. Encoding runs in one autocast
block per `encode` call; training asks for `TrainConfig(mixed_precision="bf16")`, whose loop enters autocast once
per step (one block around the whole of `train()` would train on the start's weights: tests/test_mixed_precision.py).
"""

from __future__ import annotations

import contextlib

import pandas as pd
import torch

from .common import comparison_row, interleaved, log, raw_rows, stratified_sample, subset_task

PRECISIONS = {"fp32": contextlib.nullcontext, "bf16 autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}
MIXED = {"fp32": "no", "bf16 autocast": "bf16"}  # the same two, as TrainConfig.mixed_precision


def cpu_bf16() -> str:
    """Which bf16 instructions /proc/cpuinfo reports (AMX, AVX-512 BF16), or "none"."""
    try:
        flags = next(line for line in open("/proc/cpuinfo", encoding="utf-8") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    found = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    return ", ".join(found) or "none"


def encoding_rows(repeats: int, backbones: tuple[str, ...], n: int) -> tuple[list[dict], list[dict]]:
    from mtl_utils.backbone import load_backbone
    from mtl_utils.series import series_tasks

    texts = [t for task in series_tasks() for t in stratified_sample(task.test, n // 2)["text"]]
    rows, raw = [], []
    for name in backbones:
        log(f"encoding, {name}, {len(texts)} sentences")
        backbone = load_backbone(name)
        out = {}

        def encode(precision: str) -> None:
            with torch.no_grad(), PRECISIONS[precision]():
                out[precision] = backbone.encode(texts, batch_size=64, convert_to_tensor=True, show_progress_bar=False)

        times = interleaved({p: (lambda p=p: encode(p)) for p in PRECISIONS}, repeats, warmup=1)
        cosine = torch.nn.functional.cosine_similarity(out["fp32"].float(), out["bf16 autocast"].float())
        row = comparison_row("encoding", f"{name}, {len(texts)} test sentences, batches of 64", "bf16 autocast", "fp32",
                             times, target=1.3)
        row["what bf16 changes"] = f"cosine with fp32: min {cosine.min():.4f}, mean {cosine.mean():.5f}"
        rows.append(row)
        raw += raw_rows(f"encoding, {name}", times)
    return rows, raw


def training_rows(repeats: int, train_n: int, val_n: int, epochs: int) -> tuple[list[dict], list[dict]]:
    from mtl_utils import freezing
    from mtl_utils.evaluation import accuracy_interval
    from mtl_utils.recipes import finetune_config
    from mtl_utils.series import build_model, multitask_checkpoint, series_tasks
    from mtl_utils.training import train

    tasks = [subset_task(t, train_n, val_n, seed=0) for t in series_tasks()]
    start = multitask_checkpoint("all-MiniLM-L6-v2", progress=False).state_dict()
    model = freezing.unfreeze_last(freezing.freeze_backbone(build_model("all-MiniLM-L6-v2", tasks)), 2)
    log(f"last 2 layers train, all-MiniLM-L6-v2, 2 tasks x ({train_n} train + {val_n} val)")
    scores = {}

    def epoch(precision: str, n_epochs: int = 1) -> float:
        model.load_state_dict(start)
        history = train(model, tasks, finetune_config(epochs=n_epochs, evaluate_first=False, progress=False,
                                                      mixed_precision=MIXED[precision]))
        scores[precision] = history[history.best].set_index("task")["val_accuracy"]
        return float(history["seconds"].iloc[0])

    times = interleaved({p: (lambda p=p: epoch(p)) for p in PRECISIONS}, repeats, warmup=1)
    row = comparison_row("one training epoch, last 2 layers (prefix cache), autocast per step",
                         f"all-MiniLM-L6-v2, 2 tasks x ({train_n} train + {val_n} val)", "bf16 autocast", "fp32",
                         times, target=1.3)
    for precision in PRECISIONS:  # the accuracy each precision reaches after the same full training
        epoch(precision, epochs)
    parts = []
    for task in scores["fp32"].index:
        a, b = scores["fp32"][task], scores["bf16 autocast"][task]
        low, high = accuracy_interval(round(a * val_n), val_n)
        parts.append(f"{task} val {a:.3f} (fp32, 95% [{low:.3f}, {high:.3f}]) vs {b:.3f} (bf16)")
    row["what bf16 changes"] = f"after {epochs} epochs: " + "; ".join(parts)
    return [row], raw_rows("training epoch", times)


def precision(repeats: int, quick: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """bf16 autocast against fp32 on this CPU: encoding (MiniLM, mpnet) and a last-2-layers training epoch."""
    log(f"bf16 instructions on this CPU: {cpu_bf16()}")
    backbones = ("all-MiniLM-L6-v2",) if quick else ("all-MiniLM-L6-v2", "all-mpnet-base-v2")
    rows, raw = encoding_rows(repeats, backbones, 32 if quick else 512)
    more, more_raw = training_rows(repeats, 32 if quick else 400, 16 if quick else 256, 1 if quick else 2)
    table = pd.DataFrame(rows + more)
    table["CPU bf16 instructions"] = cpu_bf16()
    return table, pd.DataFrame(raw + more_raw)
