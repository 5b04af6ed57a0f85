"""Small measurements the notebooks show: wall time, and the memory autograd keeps for a backward pass."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

import pandas as pd
import torch

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

T = TypeVar("T")


def timed(fn: Callable[..., T], *args, **kwargs) -> tuple[T, float]:
    """`fn(*args, **kwargs)` and the wall-clock seconds it took."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


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


def encoding_throughput(backbone: SentenceTransformer, texts: Sequence[str], batch_size: int = 32,
                        repeats: int = 3) -> float:
    """Sentences per second of `backbone.encode(texts)`: median of `repeats` timed runs after a one-batch warm-up."""
    texts = list(texts)
    if not texts:
        raise ValueError("encoding_throughput needs at least one text")

    def encode(batch: list[str]) -> object:
        return backbone.encode(batch, batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True)

    encode(texts[:batch_size])  # warm-up: first-call allocations and thread start-up stay out of the timing
    return len(texts) / median_seconds(lambda: encode(texts), repeats=repeats, warmup=0)


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
