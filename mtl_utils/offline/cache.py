"""The cache folder: one place for materialised models and computed artefacts, written atomically."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

CACHE_ENV = "MTL_UTILS_CACHE"
COMPLETE_MARKER = ".complete.json"


def cache_dir(*parts: str) -> Path:
    """Return (and create) a folder in the cache; `$MTL_UTILS_CACHE` overrides `~/.cache/mtl_utils`."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mtl_utils")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `target`; it replaces `target` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        tmp_path.chmod(0o644)  # mkstemp makes private files; cache entries are ordinary files
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder that replaces the folder `target` only if the block succeeds.

    The finished folder gets a marker listing every file's checksum, so `is_complete` can tell a
    finished folder from a partial or corrupted one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {str(p.relative_to(tmp)): sha256_file(p) for p in files}
        (tmp / COMPLETE_MARKER).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_complete(folder: str | os.PathLike, verify: bool = True) -> bool:
    """True if `folder` was finished by `atomic_dir` and (with `verify`) every file still matches its checksum."""
    folder = Path(folder)
    marker = folder / COMPLETE_MARKER
    if not marker.is_file():
        return False
    try:
        manifest = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    for name, digest in manifest.items():
        path = folder / name
        if not path.is_file():
            return False
        if verify and sha256_file(path) != digest:
            return False
    return True


def fingerprint(named_tensors: Iterable[tuple[str, torch.Tensor]], *extra: object) -> str:
    """A short SHA-256 over tensors' names, shapes, dtypes and bytes (plus any extra values)."""
    digest = hashlib.sha256()
    for name, tensor in named_tensors:
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{tuple(tensor.shape)}|{t.dtype}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    for value in extra:
        digest.update(repr(value).encode())
    return digest.hexdigest()[:16]
