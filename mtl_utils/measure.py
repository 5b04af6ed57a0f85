"""Small measurements the notebooks show: wall time, and the memory autograd keeps for a backward pass."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import pandas as pd
import torch


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of `fn()` over `repeats` runs, after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def saved_for_backward_bytes(fn: Callable[[], object], model: torch.nn.Module | None = None) -> tuple[object, int]:
    """Run `fn()` and count the activation bytes autograd keeps for a backward pass (0 when nothing can train).

    Each storage counts once, and the model's own weights (saved by reference, not copied) are left out.
    """
    weights = {p.data_ptr() for p in model.parameters()} if model is not None else set()
    seen: set[int] = set()
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in weights and ptr not in seen:
            seen.add(ptr)
            total += tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, total


def training_minutes(history: pd.DataFrame) -> float:
    """Minutes a training run spent in its epochs (the history repeats each epoch's time once per task)."""
    return float(history.drop_duplicates("epoch")["seconds"].sum() / 60)
