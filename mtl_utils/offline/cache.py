"""The cache folder: one place for materialised models and computed artefacts, written atomically.

Every temporary file or folder a writer makes is named `.NAME.HOST-PID.RANDOM.tmp` (and a folder moved aside
while it is replaced `.NAME.HOST-PID.RANDOM.old`), so a later writer can tell a dead process's leftovers from a
live one's and clean them (`clean_stale`). Finished files are 0644 and folders 0755, whatever the umask of
the library that wrote them: a shared cache or a checkpoint handed to a colleague stays readable.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import glob
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

CACHE_ENV = "MTL_UTILS_CACHE"
COMPLETE_MARKER = ".complete.json"
FILE_MODE, DIR_MODE = 0o644, 0o755
LEGACY_AFTER_S = 3600.0  # untagged leftovers of older versions in the cache folder: removed once this old

_TAGGED = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)\.[a-z0-9_]+\.(?P<kind>tmp|old)$")
# what versions before the writer tags left behind (tempfile names, the `.NAME.old` aside folder)
_LEGACY = re.compile(r"^\.(.+\.[a-z0-9_]{8}\.tmp|(mpnet-zip|l3-src)\.[a-z0-9_]{8}|.+\.old)$")


def cache_root() -> Path:
    """The cache folder (not created): `$MTL_UTILS_CACHE`, else `~/.cache/mtl_utils`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mtl_utils")


def cache_dir(*parts: str) -> Path:
    """Return (and create, 0755 whatever the umask) a folder in the cache; `$MTL_UTILS_CACHE` overrides
    `~/.cache/mtl_utils`."""
    path = cache_root().joinpath(*parts)
    if not path.is_dir():
        missing = [p for p in [path, *path.parents] if not p.exists()]
        path.mkdir(parents=True, exist_ok=True)
        for folder in missing:
            with contextlib.suppress(OSError):  # made meanwhile by another user: theirs to set
                folder.chmod(DIR_MODE)
    return path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# --- temporaries named after their writer, and cleaning the ones of dead writers --------------------------

@functools.cache
def _host() -> str:
    """This machine's name, plus on Linux its process-id namespace: containers sharing a host name and a cache
    folder each count their own process ids, so a process id only means something within one namespace."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40] or "host"
    try:
        return f"{name}_{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return name


def writer_tag() -> str:
    """This process's tag in temporary names: host and process id."""
    return f"{_host()}-{os.getpid()}"


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (a zombie counts as running until it is reaped)."""
    if os.name == "nt":
        return True  # os.kill would end the process there; never clean on Windows
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def _remove(path: Path) -> None:
    """Delete a file, link or folder tree; already gone (or not ours to delete) is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


def _within_cache(folder: Path) -> bool:
    try:
        return folder.resolve().is_relative_to(cache_root().resolve())
    except OSError:
        return False


def clean_stale(folder: str | os.PathLike) -> list[str]:
    """Remove the temporaries that dead writers (this host, process gone) left in `folder`; return their names.

    A live writer's temporaries are never touched. In the cache folder, untagged leftovers of older versions
    are removed once they are `LEGACY_AFTER_S` old. A writer killed between the two renames of a replacement
    (where the system cannot swap folders atomically) left the target missing: its finished new folder, or
    else the old one, is put back in place instead of being deleted.
    """
    folder = Path(folder)
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return []
    dead: dict[tuple[str, str], dict[str, list[Path]]] = {}  # (target name, tag) -> {"tmp"/"old": paths}
    legacy = []
    for entry in entries:
        match = _TAGGED.match(entry.name)
        if match:
            if match["host"] == _host() and not process_alive(int(match["pid"])):
                key = (match["name"], f"{match['host']}-{match['pid']}")
                dead.setdefault(key, {}).setdefault(match["kind"], []).append(Path(entry.path))
        elif _LEGACY.match(entry.name):
            legacy.append(Path(entry.path))
    removed = []
    for (name, _), kinds in dead.items():
        target = folder / name
        if "old" in kinds and not os.path.lexists(target):  # killed between its two renames: restore
            finished = [p for p in kinds.get("tmp", []) if p.is_dir() and is_complete(p)]
            with contextlib.suppress(OSError):
                os.rename((finished or kinds["old"])[0], target)
        for path in [*kinds.get("tmp", []), *kinds.get("old", [])]:
            if os.path.lexists(path):
                _remove(path)
                removed.append(path.name)
    if legacy and _within_cache(folder):
        now = time.time()
        for path in legacy:
            with contextlib.suppress(OSError):
                if now - path.lstat().st_mtime > LEGACY_AFTER_S:
                    _remove(path)
                    removed.append(path.name)
    return removed


@contextlib.contextmanager
def temporary_dir(parent: str | os.PathLike, label: str) -> Iterator[Path]:
    """A scratch folder in `parent` named after this process (so `clean_stale` can remove it if we die)."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{label}.{writer_tag()}.", suffix=".tmp", dir=parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- atomic writes ------------------------------------------------------------------------------------------

def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems cannot sync folders
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `target`; it replaces `target` (as a 0644 file) only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{writer_tag()}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _fsync(tmp_path)
        tmp_path.chmod(FILE_MODE)  # mkstemp makes private files; cache entries are ordinary files
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


@functools.cache
def _renameat2():
    """libc's renameat2, or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    except OSError:
        return None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # this file system (NFS, ...) or kernel cannot swap
    raise OSError(code, os.strerror(code), str(b))  # FileNotFoundError if `b` vanished meanwhile


def _put_in_place(tmp: Path, target: Path) -> Path | None:
    """Move the finished folder `tmp` to `target`; return where the folder it replaced now is, if any.

    A reader sees the old folder or the new one: the two are swapped in one step where the system can.
    Elsewhere it takes two renames, and a reader that looks in between finds no folder for a moment.
    """
    for _ in range(10):  # another writer may create or replace `target` meanwhile
        if os.path.lexists(target):
            try:
                if _exchange(tmp, target):
                    return tmp
            except FileNotFoundError:
                continue
            old = target.with_name(f".{target.name}.{writer_tag()}.{secrets.token_hex(4)}.old")
            try:
                os.rename(target, old)
            except FileNotFoundError:
                continue
            try:
                os.rename(tmp, target)
            except OSError:
                with contextlib.suppress(OSError):
                    os.rename(old, target)  # somebody else's folder got there first: give ours up
                raise
            return old
        try:
            os.rename(tmp, target)
            return None
        except OSError as exc:  # a folder appeared at `target` meanwhile
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise
    raise OSError(f"could not put {target.name!r} in place: other writers keep replacing it")


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder that replaces the folder `target` only if the block succeeds.

    The finished folder gets a marker listing every file's checksum, so `is_complete` can tell a
    finished folder from a partial or corrupted one. Only a folder (or nothing) at `target` is replaced.
    """
    target = Path(target)
    if os.path.lexists(target) and (target.is_symlink() or not target.is_dir()):
        raise FileExistsError(f"{target.name!r} exists and is not a folder; atomic_dir replaces only a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{writer_tag()}.", suffix=".tmp", dir=target.parent))
    replaced = None
    try:
        yield tmp
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in files}
        marker = tmp / COMPLETE_MARKER
        marker.write_text(json.dumps(manifest, indent=1, sort_keys=True))
        for path in [*files, marker]:
            path.chmod(FILE_MODE)
            _fsync(path)
        for path in [*(p for p in tmp.rglob("*") if p.is_dir()), tmp]:
            path.chmod(DIR_MODE)
            _fsync(path)
        replaced = _put_in_place(tmp, target)
        _fsync(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)


# --- reading finished folders -------------------------------------------------------------------------------

def _manifest(text: bytes | str) -> dict[str, str] | None:
    """The marker's {relative path: sha256}, or None if it is not that (damaged, hand-edited)."""
    try:
        manifest = json.loads(text)
    except ValueError:
        return None
    if not isinstance(manifest, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in manifest.items()):
        return None
    if any(k.startswith("/") or ".." in k.split("/") for k in manifest):
        return None
    return manifest


def is_complete(folder: str | os.PathLike, verify: bool = True) -> bool:
    """True if `folder` was finished by `atomic_dir` and (with `verify`) every file still matches its checksum."""
    folder = Path(folder)
    try:
        manifest = _manifest((folder / COMPLETE_MARKER).read_bytes())
    except OSError:
        return False
    if manifest is None:
        return False
    for name, digest in manifest.items():
        path = folder / name
        if not path.is_file():
            return False
        if verify and sha256_file(path) != digest:
            return False
    return True


class _Changed(Exception):
    """The folder was replaced while we read it."""


def _snapshot(folder: Path) -> dict[str, bytes] | None:
    """Every file of a finished folder, all read from the same folder even if a writer replaces it meanwhile.

    None if the folder is unfinished or a file does not match its checksum; FileNotFoundError if there is no
    folder; _Changed if the folder was replaced (and the old one deleted) while we opened its files.
    """
    if os.open not in os.supports_dir_fd:  # no reading relative to an open folder here: plain paths
        if not is_complete(folder):
            return None
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in _listed(folder)}
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)  # FileNotFoundError if there is no folder
    handles: dict[str, int] = {}
    try:
        try:
            manifest = _manifest(_read_at(dir_fd, COMPLETE_MARKER))
            if manifest is None:
                return None
            # open every file before reading any: once open, deleting the replaced folder cannot take them away
            for name in manifest:
                handles[name] = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
        except (FileNotFoundError, NotADirectoryError):
            for fd in handles.values():
                os.close(fd)
            if _same_folder(dir_fd, folder):
                return None  # still the folder at this path, and unfinished
            raise _Changed from None
    finally:
        os.close(dir_fd)
    files = {}
    for name, fd in handles.items():
        with os.fdopen(fd, "rb") as f:
            files[name] = f.read()
    if any(hashlib.sha256(data).hexdigest() != manifest[name] for name, data in files.items()):
        return None
    return files


def _read_at(dir_fd: int, name: str) -> bytes:
    with os.fdopen(os.open(name, os.O_RDONLY, dir_fd=dir_fd), "rb") as f:
        return f.read()


def _same_folder(dir_fd: int, folder: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(dir_fd), os.stat(folder))
    except OSError:
        return False


def _listed(folder: Path) -> list[Path]:
    manifest = _manifest((folder / COMPLETE_MARKER).read_bytes()) or {}
    return [folder / name for name in manifest]


def read_complete(folder: str | os.PathLike, wait_s: float = 2.0) -> dict[str, bytes] | None:
    """The files of a folder finished by `atomic_dir`, {relative path: bytes}, all from the same version.

    If a writer replaces the folder while we read, we read again (for up to `wait_s` seconds). Returns None
    if the folder is missing, unfinished, or a file does not match its checksum.
    """
    folder = Path(folder)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return _snapshot(folder)
        except _Changed:
            pass
        except (FileNotFoundError, NotADirectoryError):
            if _being_replaced(folder):
                clean_stale(folder.parent)  # if that writer died between its two renames, this puts a folder back
            elif not os.path.isdir(folder):  # checked after: a writer puts the new folder in place, then deletes
                return None                  # the old one, so one of the two checks sees the replacement
        if time.monotonic() > deadline:
            return None
        time.sleep(0.002)


def _being_replaced(folder: Path) -> bool:
    """True while a writer that cannot swap folders in one step has moved the old folder aside."""
    if os.path.lexists(folder):
        return False
    matches = (_TAGGED.match(p.name) for p in folder.parent.glob(f".{glob.escape(folder.name)}.*.old"))
    return any(m and m["name"] == folder.name for m in matches)


def fingerprint(named_tensors: Iterable[tuple[str, torch.Tensor]], *extra: object) -> str:
    """A short SHA-256 over tensors' names, shapes, dtypes and bytes (plus any extra values)."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in named_tensors:
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{tuple(tensor.shape)}|{t.dtype}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    for value in extra:
        digest.update(repr(value).encode())
    return digest.hexdigest()[:16]


def tensor_digest(tensor: torch.Tensor) -> str:
    """A short SHA-256 of one tensor's shape, dtype and bytes (equal digests: equal tensors)."""
    import torch

    t = tensor.detach().to("cpu").contiguous().reshape(-1)
    digest = hashlib.sha256(f"{tuple(tensor.shape)}|{t.dtype}|".encode())
    if t.numel():
        digest.update(t.view(torch.uint8).numpy())
    return digest.hexdigest()[:16]
