"""Deployment: notebook 02's model served by PyTorch (`MultiTaskModel.predict`), by onnxruntime from the
exported fp32 graph and from its int8 twin (`mtl_utils.export.OnnxModel.predict`), all on the same threads.

Throughput: sentences per second at batch 64 on a fixed stratified sample of both test sets. Latency: one
request of one sentence at a time (batch 1), p50 and p95 of each repeat. Size: the weights on disk. Accuracy:
both FULL test sets, each graph against PyTorch with the paired test (deterministic, so no repeats).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from mtl_utils.evaluation import accuracy_interval, paired_comparison
from mtl_utils.export import FP32, INT8, OnnxModel, export_checkpoint
from mtl_utils.offline.cache import cache_dir
from mtl_utils.series import checkpoint_folder, multitask_checkpoint, series_tasks

from .common import Summary, comparison_row, interleaved, log, raw_rows, stratified_sample
from .inference import sentences

BACKBONE = "all-MiniLM-L6-v2"
BATCH = 64
PYTORCH, FP32_CASE, INT8_CASE = "PyTorch predict", "ONNX fp32", "ONNX int8"
THROUGHPUT_TARGET, SIZE_TARGET, ACCURACY_POINTS = 2.0, 3.0, 0.5  # int8 against PyTorch (issue 17)
COLUMNS = ("comparison", "workload", "this", "this: median [range]", "against", "against: median [range]", "result",
           "target", "met", "repeats", "ratio", "spread")


@dataclass(frozen=True)
class Workload:
    """`per_task` test sentences per task for throughput, `requests` single-sentence requests for latency, and
    accuracy on `accuracy_per_task` test sentences per task (None: the full test sets)."""

    per_task: int
    requests: int
    accuracy_per_task: int | None = None


FULL = Workload(per_task=400, requests=100)
QUICK = Workload(per_task=16, requests=8, accuracy_per_task=64)


def requests(texts: Sequence[str], n: int) -> list[str]:
    """`n` texts spread evenly over `texts` (questions and reviews alike), in that order."""
    if not 0 < n <= len(texts):
        raise ValueError(f"n must be from 1 to {len(texts)}, got {n}")
    return [texts[i] for i in np.linspace(0, len(texts) - 1, n).round().astype(int)]


def percentiles_ms(seconds: Sequence[float]) -> tuple[float, float]:
    """p50 and p95 of request latencies, in milliseconds."""
    p50, p95 = np.percentile(np.asarray(seconds, dtype=float) * 1000, [50, 95])
    return float(p50), float(p95)


def _range(summary: Summary, fmt: Callable[[float], str], unit: str) -> str:
    return f"{fmt(summary.median)} [{fmt(summary.min)}–{fmt(summary.max)}] {unit}"


def throughput_row(this: str, against: str, times: Mapping[str, Sequence[float]], n: int, workload: str,
                   target: float | None = None) -> dict:
    """Sentences per second at batch 64: median [slowest–fastest repeat], and this over that."""
    row = comparison_row("throughput, batch 64", workload, this, against, times, target=target)
    for key, name in (("this", this), ("against", against)):
        rates = Summary.of([n / s for s in times[name]])
        row.pop(f"{key}: s, median [min–max]")
        row[f"{key}: median [range]"] = _range(rates, lambda r: f"{r:.0f}", "sentences/s")
    return row


def latency_row(which: str, this: str, against: str, per_repeat: Mapping[str, Sequence[float]],
                totals: Mapping[str, Sequence[float]], workload: str) -> dict:
    """One latency percentile (ms, one value per repeat): median [range] over repeats; spread from whole repeats."""
    row = comparison_row(f"latency {which}, batch 1", workload, this, against, per_repeat)
    row["spread"] = comparison_row("", "", this, against, totals)["spread"]
    for key, name in (("this", this), ("against", against)):
        row.pop(f"{key}: s, median [min–max]")
        row[f"{key}: median [range]"] = _range(Summary.of(per_repeat[name]), lambda v: f"{v:.1f}", "ms")
    return row


def size_row(this: str, against: str, sizes: Mapping[str, int], target: float | None = None) -> dict:
    """Bytes on disk, and how many times smaller `this` is."""
    ratio = sizes[against] / sizes[this]
    return {"comparison": "size on disk", "workload": "weights (tokenizer files alike for all, left out)",
            "this": this, "this: median [range]": f"{sizes[this] / 1e6:.1f} MB",
            "against": against, "against: median [range]": f"{sizes[against] / 1e6:.1f} MB",
            "result": f"{ratio:.2f}x smaller", "target": f"≥ {target:g}x" if target else "",
            "met": ("yes" if ratio >= target else "NO") if target else "", "ratio": ratio, "spread": 1.0}


def accuracy_row(task: str, this: str, against: str, correct: Mapping[str, np.ndarray], workload: str,
                 points: float = ACCURACY_POINTS) -> dict:
    """Accuracy of `this` beside `against` on the same sentences, with the paired test; met if within `points`."""
    paired = paired_comparison(correct[this], correct[against])

    def shown(name: str) -> str:
        low, high = accuracy_interval(correct[name])
        return f"{correct[name].mean():.3f} [{low:.3f}–{high:.3f}]"

    return {"comparison": f"accuracy, {task}", "workload": workload,
            "this": this, "this: median [range]": shown(this), "against": against,
            "against: median [range]": shown(against),
            "result": (f"{100 * paired.difference:+.1f} points [{100 * paired.low:+.1f}, {100 * paired.high:+.1f}], "
                       f"{paired.only_first} vs {paired.only_second} differ, McNemar p = {paired.p_value:.2g} "
                       f"({paired.verdict()})"),
            "target": f"within ±{points:g} points", "met": "yes" if abs(100 * paired.difference) <= points else "NO",
            "ratio": float("nan"), "spread": 1.0}


def deploy(repeats: int, workload: Workload = FULL) -> tuple[pd.DataFrame, pd.DataFrame]:
    threads = torch.get_num_threads()
    tasks = series_tasks()
    model = multitask_checkpoint(BACKBONE, progress=False)  # notebook 02's model (trained first if missing)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    start = time.perf_counter()
    info = export_checkpoint(checkpoint_folder(BACKBONE), cache_dir("exports") / f"multitask-heads-{BACKBONE}")
    log(f"    export (fp32 + int8): {time.perf_counter() - start:.1f} s")
    servers = {PYTORCH: model, FP32_CASE: OnnxModel.load(info["folder"], quantized=False, threads=threads),
               INT8_CASE: OnnxModel.load(info["folder"], quantized=True, threads=threads)}

    texts = sentences(workload.per_task)
    batch_load = f"2 tasks × {workload.per_task} test sentences, batch {BATCH}, {threads} threads"
    log(f"throughput, {batch_load}")
    def batched(name: str) -> None:
        servers[name].predict(texts, batch_size=BATCH)

    times = interleaved({name: lambda n=name: batched(n) for name in servers}, repeats, warmup=1)

    singles = requests(texts, workload.requests)
    one_load = f"{len(singles)} requests of 1 sentence, one at a time, {threads} threads"
    log(f"latency, {one_load}")
    latencies: dict[str, list[list[float]]] = {name: [] for name in servers}

    def one_at_a_time(name: str) -> float:
        spent = []
        for text in singles:
            begin = time.perf_counter()
            servers[name].predict([text], batch_size=1)
            spent.append(time.perf_counter() - begin)
        latencies[name].append(spent)
        return sum(spent)

    totals = interleaved({name: lambda n=name: one_at_a_time(n) for name in servers}, repeats, warmup=1)
    timed = {name: runs[-repeats:] for name, runs in latencies.items()}  # the warm-up round left out
    p50 = {name: [percentiles_ms(r)[0] for r in runs] for name, runs in timed.items()}
    p95 = {name: [percentiles_ms(r)[1] for r in runs] for name, runs in timed.items()}

    correct: dict[str, dict[str, np.ndarray]] = {}
    for task in tasks:
        frame = task.test if workload.accuracy_per_task is None else stratified_sample(task.test,
                                                                                        workload.accuracy_per_task)
        gold = np.array([task.label_names[i] for i in frame["label"]])
        correct[task.name] = {name: s.predict(frame["text"].tolist(), batch_size=BATCH, tasks=[task.name])[task.name]
                              .to_numpy() == gold for name, s in servers.items()}
    sizes = {PYTORCH: info["pytorch_bytes"], FP32_CASE: info["files"][FP32], INT8_CASE: info["files"][INT8]}

    rows = []
    for this, target in ((INT8_CASE, THROUGHPUT_TARGET), (FP32_CASE, None)):
        rows.append(throughput_row(this, PYTORCH, times, len(texts), batch_load, target))
    for this in (INT8_CASE, FP32_CASE):
        rows.append(latency_row("p50", this, PYTORCH, p50, totals, one_load))
        rows.append(latency_row("p95", this, PYTORCH, p95, totals, one_load))
    rows.append(size_row(INT8_CASE, PYTORCH, sizes, SIZE_TARGET))
    rows.append(size_row(FP32_CASE, PYTORCH, sizes))
    for task in tasks:
        n = len(correct[task.name][PYTORCH])
        what = f"{'full' if workload.accuracy_per_task is None else 'sampled'} test set, {n} sentences"
        for this in (INT8_CASE, FP32_CASE):
            rows.append(accuracy_row(task.name, this, PYTORCH, correct[task.name], what))

    raw = raw_rows("throughput, batch 64", times) + raw_rows("latency, batch 1: a repeat's requests", totals)
    for which, values in (("latency p50, batch 1", p50), ("latency p95, batch 1", p95)):
        raw += raw_rows(which, {name: [v / 1000 for v in vs] for name, vs in values.items()})
    return table(rows), pd.DataFrame(raw)


def table(rows: Sequence[dict]) -> pd.DataFrame:
    """The suite's rows in a fixed column order; sizes and accuracies have no repeats (blank, not NaN)."""
    frame = pd.DataFrame(rows)
    frame["repeats"] = [int(v) if pd.notna(v) else "" for v in frame.get("repeats", [None] * len(frame))]
    return frame[[c for c in COLUMNS if c in frame]]
