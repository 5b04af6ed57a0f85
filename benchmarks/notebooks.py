"""4. Every notebook's wall time and peak memory, and the whole `make test`, each in its own process tree.

Each notebook is executed with nbconvert into a temporary folder (the notebooks in the repository are left
as they are) with the environment `make` gives (so the cache folder is warm or cold as it is now).
Peak memory is the resident set size (RSS) sampled every 0.1 s: of the largest process (the kernel) and of
the whole process tree.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import psutil

from .common import fmt_seconds, log

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20


def measure(cmd: list[str], cwd: Path | None = None, env: dict | None = None, interval: float = 0.1,
            output: Path | None = None) -> dict:
    """Run `cmd`; its wall time and the peak RSS of its largest process and of its whole process tree."""
    start = time.perf_counter()
    with open(output or os.devnull, "wb") as sink:
        proc = psutil.Popen(cmd, cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT)
        largest = tree = 0
        while proc.poll() is None:
            rss = []
            try:
                members = [proc, *proc.children(recursive=True)]
            except psutil.NoSuchProcess:
                members = []
            for member in members:
                try:
                    rss.append(member.memory_info().rss)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            if rss:
                largest, tree = max(largest, max(rss)), max(tree, sum(rss))
            time.sleep(interval)
    return {"seconds": time.perf_counter() - start, "peak_rss_largest_mib": largest / MIB,
            "peak_rss_tree_mib": tree / MIB, "returncode": proc.returncode}


def notebook_paths() -> list[Path]:
    return sorted((REPO / "notebooks").glob("[0-9][0-9]*_*.ipynb"))


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def notebooks(run_tests: bool = True, env: dict[str, str] | None = None) -> tuple[pd.DataFrame, None]:
    jupyter = str(Path(sys.executable).with_name("jupyter"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-notebooks-") as tmp:
        log_file = Path(tmp) / "output.log"
        runs = [(f"notebook {nb.name}", [jupyter, "nbconvert", "--to", "notebook", "--execute", "--output-dir", tmp,
                                         "--ExecutePreprocessor.timeout=-1",
                                         "--ExecutePreprocessor.kernel_name=python3", str(nb)])
                for nb in notebook_paths()]
        if run_tests:
            runs.append(("make test", ["make", "--no-print-directory", "test"]))
        for name, cmd in runs:
            log(f"{name} ...")
            result = measure(cmd, cwd=REPO, env=env, output=log_file)
            log(f"    {fmt_seconds(result['seconds'])} s, peak RSS {result['peak_rss_largest_mib']:.0f} MiB"
                + ("" if result["returncode"] == 0 else f", FAILED (exit {result['returncode']}):\n"
                   + _tail(log_file)))
            rows.append({
                "run": name, "wall s": fmt_seconds(result["seconds"]),
                "peak RSS, largest process (MiB)": f"{result['peak_rss_largest_mib']:.0f}",
                "peak RSS, process tree (MiB)": f"{result['peak_rss_tree_mib']:.0f}",
                "ok": "yes" if result["returncode"] == 0 else f"NO (exit {result['returncode']})",
                "seconds": result["seconds"],
            })
    return pd.DataFrame(rows), None
