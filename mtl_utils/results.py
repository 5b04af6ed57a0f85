"""Where the notebooks write their figures (PNG) and tables (CSV): the results folder."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from .offline.cache import atomic_path

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
