"""Build the series as a static book: `python book/make_book.py OUT` (or `make book`).

The README is the landing page, the executed notebooks are the chapters in series order (their stored outputs
are the content: nothing is executed), `docs/` holds the manuals and the reruns are an appendix. The sources are
staged in a scratch folder first, so that the README stays a plain page on a code host: only the staged copy gets
the table of contents that Sphinx reads.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MANUALS = ("teaching", "your_own_data", "command_line", "deployment", "checkpoints_and_cache", "library", "performance")


def chapters() -> list[str]:
    """The notebooks in series order, as document names."""
    return [f"notebooks/{p.stem}" for p in sorted((ROOT / "notebooks").glob("[0-9][0-9]*_*.ipynb"))]


def appendix() -> list[str]:
    """The heavier experiments: a rerun of a chapter labelled by what it reruns (its own title is the chapter's),
    an experiment of its own by its title."""
    return [f"Notebook {p.stem[:2]} rerun: {p.stem.rsplit('_', 1)[-1]} <reruns/{p.stem}>" if p.stem[:2].isdigit()
            else f"{title(p)} <reruns/{p.stem}>" for p in sorted((ROOT / "reruns").glob("*.ipynb"))]


def title(notebook: Path) -> str:
    """The text of a notebook's first heading."""
    for cell in json.loads(notebook.read_text(encoding="utf-8"))["cells"]:
        for line in "".join(cell["source"]).splitlines():
            if cell["cell_type"] == "markdown" and line.startswith("# "):
                return line[2:].strip()
    return notebook.stem


def manuals() -> list[str]:
    found = {p.stem for p in (ROOT / "docs").glob("*.md")}
    return [f"docs/{name}" for name in MANUALS if name in found] + sorted(f"docs/{n}" for n in found - set(MANUALS))


def toctree(caption: str, documents: list[str]) -> str:
    return "\n".join(["", "```{toctree}", ":hidden:", f":caption: {caption}", ":maxdepth: 1", "", *documents, "```", ""])


def stage(folder: Path) -> Path:
    """The book's sources in `folder`: index.md (the README and the tables of contents), notebooks, reruns, docs."""
    for name in ("notebooks", "reruns", "docs"):
        shutil.copytree(ROOT / name, folder / name, ignore=shutil.ignore_patterns("*.py", ".ipynb_checkpoints"))
    index = (ROOT / "README.md").read_text(encoding="utf-8")
    index += toctree("Chapters", chapters()) + toctree("Manuals", manuals()) + toctree("Appendix: heavier experiments", appendix())
    (folder / "index.md").write_text(index, encoding="utf-8")
    for page in (folder / "docs").glob("*.md"):  # the README is the book's index page
        page.write_text(page.read_text(encoding="utf-8").replace("](../README.md", "](../index.md"), encoding="utf-8")
    return folder


def build(out: str | Path, quiet: bool = True) -> Path:
    """Write the HTML book into `out` (replaced); returns it. Raises if Sphinx fails."""
    from sphinx.cmd.build import build_main

    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="book-") as tmp:
        source = stage(Path(tmp) / "src")
        shutil.rmtree(out, ignore_errors=True)
        html = Path(tmp) / "build" / "html"  # myst-nb puts the notebooks' images beside it: in the scratch folder
        args = ["-b", "html", "-c", str(ROOT / "book"), "-d", str(Path(tmp) / "doctrees"), "--keep-going",
                *(["-q"] if quiet else []), str(source), str(html)]
        if build_main(args) != 0:
            raise RuntimeError(f"sphinx-build failed (arguments: {' '.join(args)})")
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(html, out)
    return out


if __name__ == "__main__":
    target = build(sys.argv[1] if len(sys.argv) > 1 else ROOT / "_build" / "book", quiet=False)
    print(f"the book: {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}/index.html")
