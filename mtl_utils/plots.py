"""The few plot helpers the notebooks share; every figure has a fixed size."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay

from .evaluation import accuracy_interval


def heatmap(values: pd.DataFrame, title: str = "", label: str = "", vmin: float | None = None,
            vmax: float | None = None, fmt: str = "{:.2f}", dark_below: float | None = None) -> Figure:
    """A matrix of numbers as colours, each cell written out; rows and columns labelled from the frame."""
    data = values.to_numpy(dtype=float)
    vmin = float(np.nanmin(data)) if vmin is None else vmin
    vmax = float(np.nanmax(data)) if vmax is None else vmax
    dark_below = (vmin + vmax) / 2 if dark_below is None else dark_below
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * data.shape[1] + 3), max(3.0, 0.5 * data.shape[0] + 1.5)))
    image = ax.imshow(data, cmap="viridis", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(data.shape[1]), [str(c) for c in values.columns], rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(data.shape[0]), [str(i) for i in values.index], fontsize=8)
    for (i, j), value in np.ndenumerate(data):
        ax.text(j, i, fmt.format(value), ha="center", va="center", fontsize=7,
                color="white" if value < dark_below else "black")
    fig.colorbar(image, ax=ax, label=label)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def similarity_heatmap(similarity: np.ndarray, labels: Sequence[str], title: str = "") -> Figure:
    """A cosine-similarity matrix with its sentences as row and column labels."""
    frame = pd.DataFrame(similarity, index=list(labels), columns=list(labels))
    return heatmap(frame, title, "cosine similarity", vmin=min(0.0, float(similarity.min())), vmax=1.0, dark_below=0.5)


def projection(points: Mapping[str, tuple[np.ndarray, np.ndarray, Sequence[str]]], title: str = "") -> Figure:
    """Side-by-side 2-D scatter plots, one per task: name -> (xy points, integer labels, label names)."""
    fig, axes = plt.subplots(1, len(points), figsize=(6 * len(points), 5), squeeze=False)
    for ax, (name, (xy, labels, names)) in zip(axes[0], points.items()):
        for k, label in enumerate(names):
            mask = labels == k
            ax.scatter(xy[mask, 0], xy[mask, 1], s=6, alpha=0.6, label=f"{label} ({mask.sum()})")
        ax.set_title(name)
        ax.legend(markerscale=3, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def learning_curves(history: pd.DataFrame, metrics: Sequence[str] = ("val_accuracy", "train_loss", "val_loss"),
                    title: str = "") -> Figure:
    """One panel per metric, one line per task, the best epoch marked."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.8), squeeze=False)
    best = history.attrs.get("best_epoch")
    for ax, metric in zip(axes[0], metrics):
        for task, rows in history.groupby("task", sort=False):
            ax.plot(rows["epoch"], rows[metric], marker="o", ms=3, label=task)
        if best is not None:
            ax.axvline(best, color="grey", ls=":", lw=1, label=f"best epoch ({best})")
        ax.set_xlabel("epoch")
        ax.set_title(metric.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def compare_runs(histories: Mapping[str, pd.DataFrame], titles: Mapping[str, str], metric: str = "val_accuracy",
                 baseline: Mapping[str, float] | None = None, baseline_label: str = "start",
                 val_sizes: Mapping[str, int] | None = None) -> Figure:
    """One panel per task (`titles`: task -> title), one line per run, each run's kept epoch marked.

    With `val_sizes` (task -> validation sentences) each accuracy gets its 95% interval as a band, and the
    baseline too: a difference inside the bands is one this validation set cannot tell.
    """
    missing = [t for t in titles if not any((h.task == t).any() for h in histories.values())]
    if missing:
        raise ValueError(f"no run has a history for task(s) {missing}; the histories have "
                         f"{sorted({t for h in histories.values() for t in h.task.unique()})}")
    fig, axes = plt.subplots(1, len(titles), figsize=(6 * len(titles), 4), squeeze=False)
    for ax, (task, title) in zip(axes[0], titles.items()):
        for i, (name, history) in enumerate(histories.items()):
            rows = history[history.task == task]
            # a staged run (a `stage` column) restarts each stage from the epoch the previous one kept
            parts = [part for _, part in rows.groupby("stage")] if "stage" in rows else [rows]
            for j, part in enumerate(parts):
                ax.plot(part.epoch, part[metric], "o-", color=f"C{i % 10}", ms=4, label=None if j else name)
                if val_sizes is not None and task in val_sizes:
                    low, high = zip(*(accuracy_interval(round(a * val_sizes[task]), val_sizes[task])
                                      for a in part[metric]))
                    ax.fill_between(part.epoch, low, high, color=f"C{i % 10}", alpha=0.12, lw=0)
            if "best" in rows:
                kept = rows[rows.best]
                ax.plot(kept.epoch, kept[metric], "o", color=f"C{i % 10}", ms=10, alpha=0.4)
        if baseline is not None and task in baseline:
            ax.axhline(baseline[task], color="grey", ls=":", label=baseline_label)
            if val_sizes is not None and task in val_sizes:
                ax.axhspan(*accuracy_interval(round(baseline[task] * val_sizes[task]), val_sizes[task]),
                           color="grey", alpha=0.1, lw=0)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric.replace("_", " "))
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def interval_plot(table: pd.DataFrame, titles: Mapping[str, str], label: str = "run",
                  reference: str | None = None, xlabel: str = "test accuracy (95% interval)") -> Figure:
    """Each row of `table` a point with its interval, one panel per task (`titles`: task -> title).

    The table has a `label` column and per task the columns "<task>", "<task> low" and "<task> high";
    the `reference` row's interval is shaded across each panel, so overlaps are visible at a glance.
    """
    fig, axes = plt.subplots(1, len(titles), figsize=(5.5 * len(titles), 0.42 * len(table) + 1.4), squeeze=False,
                             sharey=True)
    names = list(table[label])
    y = np.arange(len(names))[::-1]
    for ax, (task, title) in zip(axes[0], titles.items()):
        values, low, high = (table[f"{task}{suffix}"].to_numpy(dtype=float) for suffix in ("", " low", " high"))
        ax.errorbar(values, y, xerr=[values - low, high - values], fmt="o", color="C0", ecolor="C0", capsize=3)
        if reference is not None:
            row = table[table[label] == reference].iloc[0]
            ax.axvspan(row[f"{task} low"], row[f"{task} high"], color="grey", alpha=0.15, lw=0)
            ax.axvline(row[task], color="grey", ls=":", lw=1)
        ax.set_yticks(y, names, fontsize=8)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return fig


def confusion_matrices(results: Mapping[str, tuple[np.ndarray, np.ndarray, Sequence[str]]], title: str = "") -> Figure:
    """Row-normalised confusion matrices, one per task: name -> (true labels, predicted labels, label names)."""
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.8), squeeze=False)
    for ax, (name, (true, pred, names)) in zip(axes[0], results.items()):
        ConfusionMatrixDisplay.from_predictions(true, pred, labels=range(len(names)), display_labels=names,
                                                normalize="true", values_format=".2f", ax=ax, colorbar=False)
        ax.set_title(name)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def decision_chart(chart, title: str = "") -> Figure:
    """A decision tree (`mtl_utils.decisions`) drawn top down: questions in boxes, answers on the arrows, advice
    in green boxes with the measured reason under it."""
    import textwrap

    from .decisions import Advice

    boxes: list[tuple[object, float, float]] = []
    arrows: list[tuple[tuple[float, float], tuple[float, float], str]] = []
    counter = [0]

    def place(node, depth: int) -> tuple[float, float]:
        if isinstance(node, Advice):
            x = float(counter[0])
            counter[0] += 1
        else:
            children = [place(child, depth + 1) for _, child in node.answers]
            x = sum(c[0] for c in children) / len(children)
            for (answer, _), child in zip(node.answers, children):
                arrows.append(((x, -depth), child, answer))
        boxes.append((node, x, -depth))
        return x, -depth

    place(chart, 0)
    width, depth = counter[0], 1 + max(-y for _, _, y in boxes)
    fig, ax = plt.subplots(figsize=(2.5 * width, 1.8 * depth))
    for (x0, y0), (x1, y1), answer in arrows:
        ax.annotate("", (x1, y1 + 0.28), (x0, y0 - 0.28), arrowprops={"arrowstyle": "->", "color": "grey"})
        ax.text((x0 + x1) / 2, (y0 + y1) / 2, answer, ha="center", va="center", fontsize=8,
                bbox={"boxstyle": "round", "fc": "white", "ec": "none"})
    for node, x, y in boxes:
        if isinstance(node, Advice):
            ax.text(x, y + 0.1, textwrap.fill(node.choose, 26), ha="center", va="center", fontsize=8.5, weight="bold",
                    bbox={"boxstyle": "round", "fc": "#d9f2d9", "ec": "green"})
            ax.text(x, y - 0.22, textwrap.fill(node.why, 32), ha="center", va="top", fontsize=7)
        else:
            ax.text(x, y, textwrap.fill(node.ask, 34), ha="center", va="center", fontsize=8.5,
                    bbox={"boxstyle": "round", "fc": "#e8eef8", "ec": "steelblue"})
    ax.set_xlim(-0.7, width - 0.3)
    ax.set_ylim(-depth + 0.1, 0.6)
    ax.axis("off")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def gain_curve(gains: pd.DataFrame, titles: Mapping[str, str], ylabel: str = "gain over the same-data control "
               "(validation points)") -> Figure:
    """One panel per task: for each method, its gain at each training size, one small dot per seed (hollow: the
    run was undone), a line through the seeds' mean and a band from the lowest seed to the highest.

    `gains` has columns size, method, task, seed, gain and undone (learning_curve.gains makes it).
    """
    fig, axes = plt.subplots(1, len(titles), figsize=(6 * len(titles), 4.2), squeeze=False, sharey=True)
    methods = list(dict.fromkeys(gains["method"]))
    for ax, (task, title) in zip(axes[0], titles.items()):
        for i, method in enumerate(methods):
            rows = gains[(gains.task == task) & (gains.method == method)]
            by_size = rows.groupby("size")["gain"]
            sizes = np.array(sorted(rows["size"].unique()))
            # each method a little to the side, so that dots at one size do not cover each other
            shift = 1.06 ** (i - (len(methods) - 1) / 2)
            ax.fill_between(sizes * shift, by_size.min().loc[sizes], by_size.max().loc[sizes], color=f"C{i}",
                            alpha=0.15, lw=0)
            ax.plot(sizes * shift, by_size.mean().loc[sizes], "-", color=f"C{i}", lw=2, label=f"{method} (mean)")
            done, undone = rows[~rows.undone], rows[rows.undone]
            ax.plot(done["size"] * shift, done["gain"], "o", color=f"C{i}", ms=4)
            ax.plot(undone["size"] * shift, undone["gain"], "o", mfc="none", color=f"C{i}", ms=6)
        ax.axhline(0, color="grey", lw=1, ls=":")
        ax.set_xscale("log")
        ticks = sorted(gains["size"].unique())
        ax.set_xticks(ticks, [f"{s:,}" for s in ticks])
        ax.minorticks_off()
        ax.set_xlabel("training sentences per task")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][0].plot([], [], "o", color="grey", ms=4, label="one seed")
    if gains["undone"].any():
        axes[0][0].plot([], [], "o", mfc="none", color="grey", ms=6, label="one seed, undone (kept its start)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return fig
