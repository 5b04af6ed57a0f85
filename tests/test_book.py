"""The book (`make book`): it builds from the committed notebooks without running them, every notebook has its page
in series order, and every internal link and image of every page resolves."""

from __future__ import annotations

import json
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "book"))

from make_book import build, chapters, manuals  # noqa: E402


class Page(HTMLParser):
    """The links, images and element ids of one HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.images: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if found.get("id"):
            self.ids.add(found["id"])
        if tag == "a" and found.get("href"):
            self.links.append(found["href"])
        if tag in ("img", "script") and found.get("src"):
            (self.images if tag == "img" else self.links).append(found["src"])
        if tag == "link" and found.get("href"):
            self.links.append(found["href"])


def read(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


@pytest.fixture(scope="module")
def book(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("book") / "html")


def internal(url: str) -> bool:
    parts = urlsplit(url)
    return not parts.scheme and not parts.netloc and not url.startswith(("mailto:", "data:", "javascript:"))


def test_every_internal_link_and_image_resolves(book):
    # the pages (not the theme's template macros that Sphinx copies into _static/ as they are)
    pages = {p: read(p) for p in book.rglob("*.html") if "_static" not in p.relative_to(book).parts}
    broken = []
    for path, page in pages.items():
        for url in page.links + page.images:
            if not internal(url):
                continue
            parts = urlsplit(url)
            target = (path.parent / unquote(parts.path)).resolve() if parts.path else path
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file():
                broken.append(f"{path.relative_to(book)}: {url} (no such file)")
            elif parts.fragment and target.suffix == ".html" and target in pages \
                    and unquote(parts.fragment) not in pages[target].ids:
                broken.append(f"{path.relative_to(book)}: {url} (no such anchor)")
    assert not broken, "\n".join(broken[:30])
    for notebook in [*(ROOT / "notebooks").glob("[0-9][0-9]*_*.ipynb"), *(ROOT / "reruns").glob("*.ipynb")]:
        figures = sum(1 for cell in json.loads(notebook.read_text(encoding="utf-8"))["cells"]
                      for output in cell.get("outputs", []) if "image/png" in output.get("data", {}))
        page = book / notebook.parent.name / f"{notebook.stem}.html"
        assert len(pages[page].images) == figures, notebook.name  # every stored figure is on its page


def test_every_notebook_has_its_page_and_the_landing_page_lists_them_in_order(book):
    for name in [*chapters(), *(f"reruns/{p.stem}" for p in (ROOT / "reruns").glob("*.ipynb")), *manuals()]:
        assert (book / f"{name}.html").is_file(), name
    landing = read(book / "index.html")
    order = []
    for url in landing.links:
        name = urlsplit(url).path.removesuffix(".html")
        if name in chapters() and name not in order:
            order.append(name)
    assert order == chapters() and len(order) == 9
    assert all(any(urlsplit(u).path == f"{m}.html" for u in landing.links) for m in manuals())
    assert (book / "search.html").is_file() and (book / "searchindex.js").is_file()
    chapter = (book / "notebooks" / "04_freeze_backbone.html").read_text(encoding="utf-8")
    assert 'rel="prev"' in chapter and 'rel="next"' in chapter  # previous / next links


def test_cells_tagged_hide_input_are_folded(tmp_path):
    """With the book's own configuration, a cell tagged hide-input shows its output and folds its code."""
    import nbformat
    from sphinx.cmd.build import build_main

    source = tmp_path / "src"
    source.mkdir()
    (source / "index.md").write_text("# A book\n\n```{toctree}\nchapter\n```\n", encoding="utf-8")
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# A chapter"),
        nbformat.v4.new_code_cell("print('shown code')", outputs=[
            nbformat.v4.new_output("stream", name="stdout", text="the visible result\n")]),
        nbformat.v4.new_code_cell("print('folded code')", metadata={"tags": ["hide-input"]}, outputs=[
            nbformat.v4.new_output("stream", name="stdout", text="the generated line\n")]),
    ])
    nbformat.write(notebook, source / "chapter.ipynb")
    assert build_main(["-b", "html", "-q", "-c", str(ROOT / "book"), str(source), str(tmp_path / "html")]) == 0
    page = (tmp_path / "html" / "chapter.html").read_text(encoding="utf-8")
    assert "the visible result" in page and "the generated line" in page
    details = page.split("<details")
    assert len(details) == 2 and "folded code" in details[1] and "shown code" not in details[1]
    assert "shown code" in details[0]
