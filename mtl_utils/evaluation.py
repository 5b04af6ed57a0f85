"""Scores, predictions, and what a reader needs to trust a comparison: intervals, paired tests, the selection rule."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import accuracy_score, f1_score

from .data import Task
from .features import sentence_source
from .model import MultiTaskModel, map_batches

Z95 = 1.959963984540054  # the standard normal's 97.5th percentile: 95% two-sided


# --- predictions and scores ---------------------------------------------------------------------------------

def predict_proba(model: MultiTaskModel, task: str, source, batch_size: int = 128) -> np.ndarray:
    """Class probabilities of one task for every text of a sentence source (eval mode, length-sorted batches)."""
    probs = map_batches(lambda idx: torch.softmax(model(task, source(idx)), -1).float().cpu(), source.lengths,
                        batch_size, module=model)
    return probs.numpy()


def split_probabilities(model: MultiTaskModel, task: Task, split: str = "val", use_cache: bool = True,
                        progress: bool = False) -> np.ndarray:
    """Class probabilities of one task for every sentence of one split."""
    frame = task.split(split)
    return predict_proba(model, task.name, sentence_source(model, frame["text"].tolist(), use_cache, progress))


def predicted_labels(model: MultiTaskModel, task: Task, split: str = "test") -> np.ndarray:
    """Predicted label ids of one task on one split (the test split unless told otherwise)."""
    return split_probabilities(model, task, split).argmax(-1)


def scores(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Accuracy, macro-F1 and mean cross-entropy of predicted probabilities."""
    labels = np.asarray(labels)
    pred = probs.argmax(-1)
    loss = float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())
    return {"accuracy": float(accuracy_score(labels, pred)), "f1_macro": float(f1_score(labels, pred, average="macro")),
            "loss": loss}


def evaluate(model: MultiTaskModel, task: Task, split: str = "val", use_cache: bool = True,
             progress: bool = False) -> dict[str, float]:
    """Accuracy, macro-F1 and loss of one task on one split."""
    return scores(task.split(split)["label"].to_numpy(), split_probabilities(model, task, split, use_cache, progress))


# --- uncertainty --------------------------------------------------------------------------------------------

def accuracy_interval(correct: int | Sequence[bool] | np.ndarray, n: int | None = None,
                      z: float = Z95) -> tuple[float, float]:
    """Wilson score interval (95% by default) of an accuracy: `correct` of `n`, or an array of right/wrong."""
    if n is None:
        right = np.asarray(correct, dtype=bool)
        correct, n = int(right.sum()), len(right)
    if n < 1 or not 0 <= correct <= n:
        raise ValueError(f"need 0 <= correct <= n and n >= 1, got correct={correct}, n={n}")
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Paired:
    """Two models on the same sentences: how often each is right where the other is wrong."""

    n: int
    both_right: int
    only_first: int  # first right, second wrong
    only_second: int  # second right, first wrong
    difference: float  # accuracy of the first minus accuracy of the second
    low: float  # 95% interval of the difference (Newcombe's score method for paired proportions)
    high: float
    p_value: float  # exact McNemar test: the discordant sentences split as by a fair coin?

    def verdict(self, alpha: float = 0.05) -> str:
        """"better", "worse" or "cannot tell" (the first model against the second, at level `alpha`)."""
        return verdict(self.difference, self.p_value, alpha)

    def describe(self, first: str = "first", second: str = "second") -> str:
        """One line a notebook can print."""
        return (f"{first} vs {second}: {100 * self.difference:+.1f} points [{100 * self.low:+.1f}, {100 * self.high:+.1f}], "
                f"{self.only_first} vs {self.only_second} sentences only one got right, McNemar p = {self.p_value:.3g}"
                f" -> {self.verdict()}")


def verdict(change: float, p_value: float, alpha: float = 0.05) -> str:
    """The series' one reading of a paired test: "better" or "worse" (by the change's sign) if p < `alpha`, else
    "cannot tell"."""
    if not (math.isfinite(change) and 0.0 <= p_value <= 1.0):
        raise ValueError(f"a verdict needs a finite change and a p-value in [0, 1]; got change={change!r}, "
                         f"p={p_value!r}")
    if p_value >= alpha:
        return "cannot tell"
    return "better" if change > 0 else "worse"


def reading(change_points: float, p_value: float, alpha: float = 0.05) -> str:
    """A change in points with its verdict, as the notebooks print it: "+3.6 (better)"."""
    return f"{change_points:+.1f} ({verdict(change_points, p_value, alpha)})"


def paired_comparison(first_correct: Sequence[bool] | np.ndarray, second_correct: Sequence[bool] | np.ndarray,
                      z: float = Z95) -> Paired:
    """Compare two models on the same test sentences (exact McNemar test, interval of the accuracy difference)."""
    from scipy.stats import binomtest

    x, y = np.asarray(first_correct, dtype=bool), np.asarray(second_correct, dtype=bool)
    if x.shape != y.shape or x.ndim != 1 or len(x) == 0:
        raise ValueError(f"need two equally long, non-empty 1-d arrays of right/wrong, got shapes {x.shape}, {y.shape}")
    n = len(x)
    a, b, c = int((x & y).sum()), int((x & ~y).sum()), int((~x & y).sum())
    d = n - a - b - c
    p_value = 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5).pvalue)
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = accuracy_interval(a + b, n, z)
    l2, u2 = accuracy_interval(a + c, n, z)
    denominator = (a + b) * (c + d) * (a + c) * (b + d)
    phi = (a * d - b * c) / math.sqrt(denominator) if denominator else 0.0
    below = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    above = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    diff = p1 - p2
    return Paired(n, a, b, c, diff, max(-1.0, diff - below), min(1.0, diff + above), p_value)


def holm(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm's adjusted p-values for a family of tests (NaN: no test, left out): "adjusted p < 0.05" keeps the chance
    of any false "real" in the whole family under 5%. The smallest p is multiplied by the number of tests, the next
    by one less, and so on, never below the one before."""
    p = np.asarray(p_values, dtype=float)
    if ((p < 0) | (p > 1)).any():
        raise ValueError(f"p-values lie in [0, 1], got {p[(p < 0) | (p > 1)][:5].tolist()}")
    tested = np.flatnonzero(~np.isnan(p))
    order = tested[np.argsort(p[tested], kind="stable")]
    m = len(order)
    adjusted = np.full(p.shape, np.nan)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return adjusted


def seed_summary(values: Sequence[float], z: float | None = None) -> dict[str, float]:
    """Mean, standard deviation, range and a 95% t-interval of the mean of one measurement over seeds."""
    from scipy.stats import t as student_t

    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        raise ValueError(f"a spread needs at least 2 seeds, got {len(x)}")
    sd = float(x.std(ddof=1))
    half = float(student_t.ppf(0.975, len(x) - 1)) * sd / math.sqrt(len(x))
    return {"seeds": len(x), "mean": float(x.mean()), "sd": sd, "min": float(x.min()), "max": float(x.max()),
            "low": float(x.mean()) - half, "high": float(x.mean()) + half}


# --- the selection rule -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Selection:
    """What the selection rule kept, and a row per candidate saying why."""

    chosen: str
    table: pd.DataFrame
    reason: str


def select(candidates: Mapping[str, Mapping[str, float]], benchmark: str, val_sizes: Mapping[str, int],
           trainable: Mapping[str, int], margin: float = 0.005, goal: Sequence[str] | None = None) -> Selection:
    """The project's one rule for replacing a benchmark, decided on validation accuracy only.

    `candidates` maps a run's name to its validation accuracy per task (the benchmark among them). A run
    replaces the benchmark only if its mean over the `goal` tasks (default: all) beats the benchmark's by
    `margin`, and no task falls below the benchmark by more than that task's noise (one standard error of
    the benchmark's accuracy on that task's validation set). Among the runs that qualify, every one within
    `margin` of the best counts as a tie, and the one with the fewest trainable parameters wins.
    """
    if benchmark not in candidates:
        raise ValueError(f"the benchmark {benchmark!r} is not among the candidates {list(candidates)}")
    tasks = list(candidates[benchmark])
    goal = list(goal or tasks)
    # what is compared: the mean over every task, or over the goal's tasks only (then the table says which)
    column, on = ("mean val", "the mean validation accuracy") if set(goal) == set(tasks) else \
        (f"goal val ({', '.join(goal)})", f"the goal's validation accuracy ({', '.join(goal)})")
    base = candidates[benchmark]
    noise = {t: math.sqrt(base[t] * (1 - base[t]) / val_sizes[t]) for t in tasks}
    rows = []
    for name, accs in candidates.items():
        mean = float(np.mean([accs[t] for t in goal]))
        gain = mean - float(np.mean([base[t] for t in goal]))
        fallen = [t for t in tasks if accs[t] < base[t] - noise[t]]
        if name == benchmark:
            why = "the benchmark"
        elif gain < margin:
            why = f"gains {100 * gain:+.1f} points on {on}, under the {100 * margin:.1f}-point margin"
        elif fallen:
            why = "; ".join(f"{t} falls {100 * (base[t] - accs[t]):.1f} points, more than its noise "
                            f"({100 * noise[t]:.1f})" for t in fallen)
        else:
            why = "qualifies"
        rows.append({"run": name, **{f"{t} val": accs[t] for t in tasks}, column: mean, "gain (points)": 100 * gain,
                     "trainable parameters": trainable[name], "qualifies": why == "qualifies", "why": why})
    table = pd.DataFrame(rows)
    qualified = table[table.qualifies]
    if qualified.empty:
        return Selection(benchmark, table, "no run beats the benchmark by the margin without a task falling "
                                           "more than its noise: keep the benchmark")
    best = qualified[column].max()
    ties = qualified[qualified[column] >= best - margin]
    chosen = ties.sort_values(["trainable parameters", column], ascending=[True, False]).iloc[0]["run"]
    others = [r for r in ties["run"] if r != chosen]
    reason = (f"{chosen} replaces the benchmark: {table.set_index('run').loc[chosen, 'gain (points)']:+.1f} points on "
              f"{on}, no task below its noise"
              + (f"; it ties (within the margin) with {', '.join(others)} and trains the fewest parameters"
                 if others else ""))
    return Selection(chosen, table, reason)


# --- per-task noise and per-class reports -------------------------------------------------------------------

def task_noise(accuracy: float, n: int) -> float:
    """One standard error of an accuracy measured on `n` sentences: the noise `select` allows a task to fall."""
    if n < 1 or not 0 <= accuracy <= 1:
        raise ValueError(f"need an accuracy in [0, 1] and n >= 1, got accuracy={accuracy}, n={n}")
    return math.sqrt(accuracy * (1 - accuracy) / n)


def fallen_tasks(accuracies: Mapping[str, float], base: Mapping[str, float], val_sizes: Mapping[str, int]) -> list[str]:
    """The tasks whose validation accuracy falls below `base`'s by more than that task's noise (select's rule)."""
    return [t for t in base if accuracies[t] < base[t] - task_noise(base[t], val_sizes[t])]


def class_report(labels: np.ndarray, probs: np.ndarray, label_names: Sequence[str]) -> dict:
    """Per class: precision, recall, F1 and support (sklearn); and the confusion matrix (rows: true labels)."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    classes = list(range(len(label_names)))
    pred = np.asarray(probs).argmax(-1)
    precision, recall, f1, support = precision_recall_fscore_support(labels, pred, labels=classes, zero_division=0)
    return {
        "per_class": {name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                      for name, p, r, f, s in zip(label_names, precision, recall, f1, support)},
        "confusion_matrix": {"labels": list(label_names), "rows": "true label", "columns": "predicted label",
                             "counts": confusion_matrix(labels, pred, labels=classes).tolist()},
    }


# --- comparisons on test sets -------------------------------------------------------------------------------

def correct(model: MultiTaskModel, task: Task, split: str = "test") -> np.ndarray:
    """Right (True) or wrong for each sentence of one split, in the split's order."""
    return predicted_labels(model, task, split) == task.split(split)["label"].to_numpy()


def difference_interval(k1: int, n1: int, k2: int, n2: int, z: float = Z95) -> tuple[float, float]:
    """95% interval of p1 - p2 for two independent samples (Newcombe's hybrid score method, method 10)."""
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = accuracy_interval(k1, n1, z)
    l2, u2 = accuracy_interval(k2, n2, z)
    diff = p1 - p2
    return diff - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), diff + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def compare_on_test(right: Mapping[str, np.ndarray], baseline: Mapping[str, np.ndarray] | None = None
                    ) -> dict[str, float]:
    """Per task: the accuracy and its 95% interval; against a baseline on the same sentences, the change in points,
    its 95% interval and the exact McNemar p-value (keys "<task>", "<task> low", ..., "<task> p")."""
    out: dict[str, float] = {}
    for task, ok in right.items():
        ok = np.asarray(ok, dtype=bool)
        low, high = accuracy_interval(ok)
        out |= {task: float(ok.mean()), f"{task} low": low, f"{task} high": high}
        if baseline is not None:
            paired = paired_comparison(ok, baseline[task])
            out |= {f"{task} change": 100 * paired.difference, f"{task} change low": 100 * paired.low,
                    f"{task} change high": 100 * paired.high, f"{task} p": paired.p_value}
    return out
