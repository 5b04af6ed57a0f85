"""3. Inference for both tasks: one MultiTaskModel pass against two single-task models, and against a bare
`SentenceTransformer.encode` of the same sentences (what the heads and the table around them cost)."""

from __future__ import annotations

import pandas as pd
import torch

from mtl_utils import freezing
from mtl_utils.series import build_model, series_tasks

from .common import comparison_row, interleaved, log, overhead_row, raw_rows, stratified_sample

BACKBONE = "all-MiniLM-L6-v2"
PER_TASK = 400
BATCH = 64  # MultiTaskModel.predict's default; encode is given the same


def sentences(per_task: int = PER_TASK, seed: int = 0) -> list[str]:
    """A fixed stratified sample of each task's test split, questions then reviews."""
    return [text for task in series_tasks() for text in stratified_sample(task.test, per_task, seed)["text"]]


def inference(repeats: int, per_task: int = PER_TASK) -> tuple[pd.DataFrame, pd.DataFrame]:
    texts = sentences(per_task)
    workload = f"2 tasks × {per_task} test sentences, batch {BATCH}"
    log(f"inference, {workload}")
    tasks = series_tasks()
    multi = freezing.freeze_all(build_model(BACKBONE, tasks))
    singles = [freezing.freeze_all(build_model(BACKBONE, [t])) for t in tasks]  # a backbone each
    bare = multi.backbone

    def one_model() -> None:
        multi.predict(texts, batch_size=BATCH)

    def two_models() -> None:
        for model in singles:
            model.predict(texts, batch_size=BATCH)

    def encode() -> None:
        with torch.no_grad():
            bare.encode(texts, batch_size=BATCH, convert_to_tensor=True, show_progress_bar=False)

    times = interleaved({"one multi-task model": one_model, "two single-task models": two_models,
                         "SentenceTransformer.encode": encode}, repeats, warmup=1)
    table = pd.DataFrame([
        comparison_row("inference, both tasks", workload, "one multi-task model", "two single-task models", times,
                       target=1.8),
        overhead_row("inference, both tasks: MultiTaskModel.predict vs bare encode", workload,
                     "one multi-task model", "SentenceTransformer.encode", times, limit=0.05),
    ])
    return table, pd.DataFrame(raw_rows("inference", times))
