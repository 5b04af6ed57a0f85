"""What every benchmark shares: interleaved timing, fixed workloads, the machine, and markdown tables."""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import pandas as pd

MIN_REPEATS = 5


def log(message: str) -> None:
    """Progress on stderr, so the tables on stdout stay clean."""
    print(message, file=sys.stderr, flush=True)


def interleaved(cases: Mapping[str, Callable[[], float | None]], repeats: int, warmup: int = 0,
                progress: bool = True) -> dict[str, list[float]]:
    """Run the cases in turn, `repeats` times each after `warmup` untimed rounds: A, B, then B, A, then A, B, ...

    A case returns the seconds it measured itself (e.g. one epoch, leaving set-up out), or None to be
    timed from the outside. Interleaving spreads a slow spell of a shared machine over every case alike;
    rotating which case goes first cancels what running right after another case does to the next one.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    names = list(cases)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(warmup + repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            measured = cases[name]()
            seconds = time.perf_counter() - start if measured is None else float(measured)
            timed = round_ >= warmup
            if timed:
                times[name].append(seconds)
            if progress:
                what = f"{round_ - warmup + 1}/{repeats}" if timed else "warm-up"
                log(f"    {name} [{what}]: {seconds:.3f} s")
    return times


def raw_rows(group: str, times: Mapping[str, Sequence[float]]) -> list[dict]:
    """Every timed repeat as a row (for the CSV next to each table), so a strange median can be looked into."""
    return [{"comparison": group, "case": name, "repeat": i + 1, "seconds": t}
            for name, values in times.items() for i, t in enumerate(values)]


@dataclass(frozen=True)
class Summary:
    """Median, min and max of repeated timings."""

    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Summary:
        if not seconds:
            raise ValueError("no timings to summarise")
        return cls(statistics.median(seconds), min(seconds), max(seconds), len(seconds))

    @property
    def spread(self) -> float:
        """Slowest over fastest repeat: 1 on a quiet machine, large on a busy one."""
        return self.max / self.min if self.min > 0 else float("inf")

    def __str__(self) -> str:
        return f"{fmt_seconds(self.median)} [{fmt_seconds(self.min)}–{fmt_seconds(self.max)}]"


def fmt_seconds(seconds: float) -> str:
    """Seconds with about three significant digits."""
    if seconds >= 100:
        return f"{seconds:.0f}"
    if seconds >= 10:
        return f"{seconds:.1f}"
    if seconds >= 1:
        return f"{seconds:.2f}"
    return f"{seconds:.3f}"


def comparison_row(comparison: str, workload: str, fast: str, slow: str, times: Mapping[str, Sequence[float]],
                   target: float | None = None, one_time: float | None = None) -> dict:
    """One table row: the faster variant against the slower one, as medians [min-max] and the ratio of medians.

    `one_time` is a set-up cost the fast variant pays once (e.g. building a cache), reported with the number
    of epochs after which it has paid for itself.
    """
    a, b = Summary.of(times[fast]), Summary.of(times[slow])
    ratio = b.median / a.median
    row = {
        "comparison": comparison, "workload": workload,
        "this": fast, "this: s, median [min–max]": str(a),
        "against": slow, "against: s, median [min–max]": str(b),
        "result": f"{ratio:.2f}x faster",
        "target": f"≥ {target:g}x" if target is not None else "",
        "met": ("yes" if ratio >= target else "NO") if target is not None else "",
        "repeats": min(a.n, b.n), "ratio": ratio, "spread": _spread(a, b),
        "one-time set-up s": "", "pays off after": "",
    }
    if one_time is not None:
        saved = b.median - a.median
        row["one-time set-up s"] = fmt_seconds(one_time)
        row["pays off after"] = f"{one_time / saved:.1f} epochs" if saved > 0 else "never"
    return row


def overhead_row(comparison: str, workload: str, ours: str, bare: str, times: Mapping[str, Sequence[float]],
                 limit: float) -> dict:
    """One table row: how much slower `ours` is than `bare` (ratio of medians - 1), against an upper limit."""
    a, b = Summary.of(times[ours]), Summary.of(times[bare])
    overhead = a.median / b.median - 1
    return {
        "comparison": comparison, "workload": workload,
        "this": ours, "this: s, median [min–max]": str(a),
        "against": bare, "against: s, median [min–max]": str(b),
        "result": f"{overhead:+.1%} time", "target": f"≤ +{limit:.0%}", "met": "yes" if overhead <= limit else "NO",
        "repeats": min(a.n, b.n), "ratio": b.median / a.median, "spread": _spread(a, b),
    }


HIDDEN_COLUMNS = ("ratio", "spread", "seconds")
NOISY = 1.5  # a case whose slowest repeat took this many times its fastest ran on a busy machine...
JITTER = 0.1  # ...unless they differ by less than this many seconds (the jitter of very short cases)


def _spread(*summaries: Summary) -> float:
    """The largest slowest/fastest ratio among cases whose repeats differ by more than JITTER seconds."""
    return max([s.spread for s in summaries if s.max - s.min > JITTER], default=1.0)


def noise_note(table: pd.DataFrame) -> str:
    """A warning when some repeats varied a lot (max/min above NOISY): medians are then less trustworthy."""
    if "spread" not in table or not (table["spread"] > NOISY).any():
        return ""
    worst = table.loc[table["spread"].idxmax()]
    return (f"Note: repeats varied up to {worst['spread']:.1f}x (slowest/fastest, in {worst['comparison']!r}): "
            "the machine was probably busy with other work; the medians are less trustworthy.")


def markdown(table: pd.DataFrame, hide: Sequence[str] = HIDDEN_COLUMNS) -> str:
    """A DataFrame as a GitHub markdown table, without the machine-readable columns kept for the CSV and
    without columns that are empty in every row."""
    table = table[[c for c in table.columns if c not in hide and not (table[c].fillna("").astype(str) == "").all()]]
    cells = [[str(c) for c in table.columns]] + [["" if pd.isna(v) else str(v) for v in row]
                                                  for row in table.itertuples(index=False)]
    lines = ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("---" for _ in table.columns) + "|")
    return "\n".join(lines)


def stratified_sample(frame: pd.DataFrame, n: int, seed: int = 0) -> pd.DataFrame:
    """A fixed sample of `n` rows with the label proportions of `frame` (largest remainders), in the original order."""
    if not 0 < n <= len(frame):
        raise ValueError(f"n must be from 1 to {len(frame)}, got {n}")
    counts = frame["label"].value_counts()
    exact = counts * n / len(frame)
    take = exact.astype(int)
    remainder = (exact - take).sort_values(ascending=False, kind="stable")
    take[remainder.index[: n - int(take.sum())]] += 1
    picked = [frame[frame["label"] == label].sample(int(k), random_state=seed) for label, k in take.items() if k]
    return frame.loc[sorted(pd.concat(picked).index)].reset_index(drop=True)


def subset_task(task, train_n: int, val_n: int, seed: int = 0):
    """The task with fixed stratified samples of its training and validation splits (test unchanged)."""
    return dataclasses.replace(task, train=stratified_sample(task.train, min(train_n, len(task.train)), seed),
                               val=stratified_sample(task.val, min(val_n, len(task.val)), seed))


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_pressure() -> str:
    """How much of the last minute runnable tasks waited for a CPU (Linux PSI), a sign of a shared machine."""
    try:
        with open("/proc/pressure/cpu", encoding="utf-8") as f:
            fields = dict(kv.split("=") for kv in f.readline().split()[1:])
        return f"{float(fields['avg60']):.0f}%"
    except (OSError, KeyError, ValueError):
        return "n/a"


def machine() -> dict[str, str]:
    """Where the numbers come from: CPU, cores, memory, library versions, and how busy the machine was."""
    import sentence_transformers
    import torch
    import transformers

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        import psutil
        memory = f"{psutil.virtual_memory().total / 2**30:.0f} GiB"
    except ImportError:  # pragma: no cover
        memory = "?"
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"), "CPU": cpu_model(), "cores": str(cores), "memory": memory,
        "torch": f"{torch.__version__} ({torch.get_num_threads()} threads)",
        "transformers": transformers.__version__, "sentence-transformers": sentence_transformers.__version__,
        "python": platform.python_version(), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "load average (1 min)": f"{load[0]:.2f}", "CPU pressure (avg 60 s)": cpu_pressure(),
    }


def machine_line(info: Mapping[str, str]) -> str:
    return "; ".join(f"{k}: {v}" for k, v in info.items())
