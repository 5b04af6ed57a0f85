"""Where the notebooks write their figures (PNG) and tables (CSV): the results folder."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from .offline.cache import atomic_path, atomic_write_text

RESULTS_ENV = "MTL_UTILS_RESULTS"


def results_dir(*parts: str) -> Path:
    """Return (and create) a folder under the results folder (`$MTL_UTILS_RESULTS`, else `results/` in the repo)."""
    root = os.environ.get(RESULTS_ENV)
    if not root:
        repo = Path(__file__).resolve().parents[1]
        root = repo / "results" if (repo / "pyproject.toml").is_file() else Path.cwd() / "results"
    path = Path(root).joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_figure(fig: Figure, name: str, notebook: str) -> None:
    """Save a figure as `results/<notebook>/<name>.png`."""
    with atomic_path(results_dir(notebook) / f"{name}.png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")


def save_table(table: pd.DataFrame, name: str, notebook: str) -> None:
    """Save a table as `results/<notebook>/<name>.csv`."""
    with atomic_path(results_dir(notebook) / f"{name}.csv") as tmp:
        table.to_csv(tmp, index=False)


# --- the scenario table: one row per way of training, written by each notebook, read by notebook 08 ---------

SCENARIO_COLUMNS = (
    "scenario", "family", "notebook", "backbone", "training data", "trainable parameters", "one-off seconds",
    "epoch seconds", "epochs", "sentences/s", "baseline",
    "trec", "trec low", "trec high", "trec change", "trec change low", "trec change high", "trec p",
    "movies", "movies low", "movies high", "movies change", "movies change low", "movies change high", "movies p",
    "risk",
)
SCENARIO_FILE = "scenarios"


def save_scenarios(rows: list[dict], notebook: str) -> pd.DataFrame:
    """Write a notebook's scenario rows as `results/<notebook>/scenarios.csv` (columns in SCENARIO_COLUMNS order)."""
    unknown = sorted({k for row in rows for k in row} - set(SCENARIO_COLUMNS))
    if unknown:
        raise ValueError(f"unknown scenario columns {unknown}; the columns are {', '.join(SCENARIO_COLUMNS)}")
    table = pd.DataFrame(rows, columns=list(SCENARIO_COLUMNS)).assign(notebook=notebook)
    save_table(table, SCENARIO_FILE, notebook)
    return table


def load_scenarios(notebooks: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """Every notebook's scenario rows in one table, and the notebooks whose table is missing (run them first)."""
    frames, missing = [], []
    for notebook in notebooks:
        path = results_dir(notebook) / f"{SCENARIO_FILE}.csv"
        if path.is_file():
            frames.append(pd.read_csv(path))
        else:
            missing.append(notebook)
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(SCENARIO_COLUMNS))
    return table, missing


README_START, README_END = "<!-- which-freezing:start -->", "<!-- which-freezing:end -->"


def readme_table(csv: Path | None = None) -> str:
    """Notebook 08's table (`results/08_which_freezing/which_freezing.csv`) as markdown for the README."""
    table = pd.read_csv(csv or results_dir("08_which_freezing") / "which_freezing.csv", dtype=str).fillna("–")
    columns = ["way of training", "notebook", "trainable parameters", "one-off s", "s per epoch", "sentences/s",
               "change on A (points)", "change on B (points)", "against", "risk to the other task", "when"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]).replace("|", "/") for c in columns) + " |"
              for _, row in table.apply(label_undone, axis=1).iterrows()]
    return "\n".join(lines)


UNDONE = "undone: kept the start"
_NO_CHANGE = re.compile(r"^\+0\.0 \[-(?P<low>[0-9.]+), \+(?P<high>[0-9.]+)\]$")


def label_undone(row: pd.Series) -> pd.Series:
    """A trained run that the selection rule undid is the start model, bit for bit: +0.0 on both tasks with no
    sentence answered differently (an interval symmetric about 0) and no prediction of the other task changed.
    Such a row says so instead of showing its +0.0 and its costs as a result."""
    changes = [_NO_CHANGE.match(str(row[c])) for c in ("change on A (points)", "change on B (points)")]
    trained = str(row["trainable parameters"]) not in ("0", "–")
    moved = re.search(r"[1-9][0-9.]*% of", str(row["risk to the other task"]))
    if not (trained and all(m and m["low"] == m["high"] for m in changes) and not moved):
        return row
    row = row.copy()
    row["way of training"] = f"{row['way of training']} ({UNDONE})"
    for column in ("change on A (points)", "change on B (points)", "s per epoch", "one-off s"):
        row[column] = UNDONE if column.startswith("change") else "–"
    return row


def mark_undone(table: pd.DataFrame, columns: Sequence[str], kept: str = "kept epoch") -> pd.DataFrame:
    """A copy of `table` for display in which every run that its selection undid (`kept` epoch 0: the run is its
    start, bit for bit) shows "undone: kept the start" instead of its `columns` (changes, p-values, costs)."""
    missing = [c for c in [kept, *columns] if c not in table.columns]
    if missing:
        raise KeyError(f"columns {missing} are not in the table; it has {', '.join(map(str, table.columns))}")
    out = table.astype({c: object for c in columns})
    out.loc[out[kept] == 0, list(columns)] = UNDONE
    return out


def splice_readme(readme: Path, block: str) -> bool:
    """Replace the text between the README's which-freezing markers with `block`; True if the file changed."""
    text = readme.read_text(encoding="utf-8")
    if README_START not in text or README_END not in text:
        raise ValueError(f"{readme.name} has no {README_START} ... {README_END} markers to put the table between")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    new = f"{head}{README_START}\n{block}\n{README_END}{tail}"
    if new != text:
        atomic_write_text(readme, new)
    return new != text


if __name__ == "__main__":  # python -m mtl_utils.results readme: notebook 08's table into README.md
    import sys

    if sys.argv[1:] != ["readme"]:
        sys.exit("usage: python -m mtl_utils.results readme")
    changed = splice_readme(Path(__file__).resolve().parents[1] / "README.md", readme_table())
    print("README.md: the which-freezing table " + ("updated" if changed else "already up to date"))
