"""The cache folder's atomic writes: readable files, refused targets, dead writers' leftovers cleaned (killed
processes), and readers that see the old or the new folder while a writer replaces it (a concurrent writer)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mtl_utils.offline import cache
from mtl_utils.offline.cache import (
    COMPLETE_MARKER,
    atomic_dir,
    atomic_path,
    atomic_write_text,
    cache_dir,
    clean_stale,
    is_complete,
    read_complete,
    temporary_dir,
    writer_tag,
)
from mtl_utils.offline.models import model_folder

ROOT = Path(cache.__file__).resolve().parents[2]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _child(code: str, *args: str) -> subprocess.Popen:
    """A Python process running `code` (mtl_utils.offline.cache imports without torch: it starts quickly)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env, stdout=subprocess.PIPE,
                            text=True)


def _dead_pid() -> int:
    """The id of a process that has ended (and been reaped)."""
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    return done.pid


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()  # reaped: a zombie would still count as a live writer


# --- permissions --------------------------------------------------------------------------------------------

def test_finished_files_are_0644_and_folders_0755_whatever_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "weights.bin").write_bytes(b"w")
            (tmp / "private.txt").write_text("p")
            (tmp / "private.txt").chmod(0o600)  # what safetensors' save_file does
        with atomic_path(tmp_path / "file.bin") as tmp:
            tmp.write_bytes(b"x")
        atomic_write_text(tmp_path / "note.txt", "hello")
    finally:
        os.umask(old)
    folder = tmp_path / "folder"
    assert is_complete(folder)
    assert _mode(folder) == _mode(folder / "sub") == 0o755
    for path in [folder / "sub" / "weights.bin", folder / "private.txt", folder / COMPLETE_MARKER,
                 tmp_path / "file.bin", tmp_path / "note.txt"]:
        assert _mode(path) == 0o644, path.name


# --- what may be replaced -----------------------------------------------------------------------------------

def test_atomic_dir_replaces_a_folder_but_refuses_a_file(tmp_path):
    target = tmp_path / "target"
    target.write_text("someone's notes")
    with pytest.raises(FileExistsError, match="not a folder"), atomic_dir(target) as tmp:
        (tmp / "a").write_text("a")
    assert target.read_text() == "someone's notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]  # no temporary, no hidden `.target.old`

    for version in ("1", "2"):
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "v").write_text(version)
    assert read_complete(tmp_path / "folder") == {"v": b"2"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "target"]


def test_a_failed_block_leaves_the_old_folder_and_no_temporary(tmp_path):
    with atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "v").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "v").write_text("new")
        raise RuntimeError("the writer failed")
    assert (tmp_path / "folder" / "v").read_text() == "old" and is_complete(tmp_path / "folder")
    assert [p.name for p in tmp_path.iterdir()] == ["folder"]


# --- malformed markers --------------------------------------------------------------------------------------

@pytest.mark.parametrize("marker", ["[]", '["v"]', "{not json", '{"v": 3}', '{"../v": "00"}', '"text"'])
def test_a_malformed_marker_means_not_complete(tmp_path, marker):
    with atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "v").write_text("v")
    (tmp_path / "folder" / COMPLETE_MARKER).write_text(marker)
    assert not is_complete(tmp_path / "folder")
    assert read_complete(tmp_path / "folder") is None


def test_read_complete_of_a_missing_partial_or_damaged_folder_is_none(tmp_path):
    assert read_complete(tmp_path / "missing") is None
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "v").write_text("v")
    assert read_complete(tmp_path / "partial") is None
    with atomic_dir(tmp_path / "damaged") as tmp:
        (tmp / "v").write_text("v")
    assert read_complete(tmp_path / "damaged")["v"] == b"v"
    (tmp_path / "damaged" / "v").write_text("w")
    assert read_complete(tmp_path / "damaged") is None


# --- dead writers' leftovers --------------------------------------------------------------------------------

HANG_IN_WRITES = """
    import sys, time
    from pathlib import Path
    from mtl_utils.offline.cache import atomic_dir, atomic_path, temporary_dir
    folder = Path(sys.argv[1])
    with atomic_dir(folder / "ckpt") as tmp, atomic_path(folder / "file.bin") as tmp_file, \\
            temporary_dir(folder, "scratch") as scratch:
        (tmp / "weights").write_bytes(b"x" * 1000)
        tmp_file.write_bytes(b"y")
        (scratch / "big.zip").write_bytes(b"z" * 1000)
        print("ready", flush=True)
        time.sleep(60)
"""


def test_leftovers_of_a_killed_writer_are_cleaned_and_a_live_writers_are_kept(tmp_path):
    killed, alive = _child(HANG_IN_WRITES, str(tmp_path)), _child(HANG_IN_WRITES, str(tmp_path))
    try:
        assert killed.stdout.readline() == "ready\n" and alive.stdout.readline() == "ready\n"
        _kill(killed)
        tags = {f"-{killed.pid}.": [], f"-{alive.pid}.": []}
        for path in tmp_path.iterdir():
            for tag in tags:
                if tag in path.name:
                    tags[tag].append(path.name)
        assert all(len(names) == 3 for names in tags.values())  # atomic_dir, atomic_path, temporary_dir each
        with atomic_dir(tmp_path / "other") as tmp:  # the next writer in this folder cleans up
            (tmp / "v").write_text("v")
        left = sorted(p.name for p in tmp_path.iterdir())
        assert not any(f"-{killed.pid}." in name for name in left)
        assert sorted(n for n in left if f"-{alive.pid}." in n) == sorted(tags[f"-{alive.pid}."])
        assert not (tmp_path / "ckpt").exists()  # a killed writer's folder never appears
    finally:
        for proc in (killed, alive):
            if proc.poll() is None:
                _kill(proc)
    assert clean_stale(tmp_path) and sorted(p.name for p in tmp_path.iterdir()) == ["other"]


def test_materialisation_cleans_the_cache_folder(monkeypatch):
    models = cache_dir("models")
    with atomic_dir(models / "paraphrase-MiniLM-L3-v2") as tmp:  # a finished copy, so nothing is built
        (tmp / "model.safetensors").write_bytes(b"w")
    dead = f"{writer_tag().rsplit('-', 1)[0]}-{_dead_pid()}"
    leftovers = [models / f".all-mpnet-base-v2.{dead}.abc12345.tmp", models / f".mpnet-zip.{dead}.zz9.tmp"]
    for path in leftovers:
        path.mkdir()
        (path / "part").write_bytes(b"p" * 100)
    legacy_old, legacy_new = models / ".all-mpnet-base-v2.k2j4h5g6.tmp", models / ".mpnet-zip.q1w2e3r4"
    for path in (legacy_old, legacy_new):
        path.mkdir()
    long_ago = time.time() - cache.LEGACY_AFTER_S - 60
    os.utime(legacy_old, (long_ago, long_ago))
    assert model_folder("paraphrase-MiniLM-L3-v2") == models / "paraphrase-MiniLM-L3-v2"
    assert sorted(p.name for p in models.iterdir()) == sorted([legacy_new.name, "paraphrase-MiniLM-L3-v2"])


def test_untagged_old_leftovers_are_cleaned_only_inside_the_cache(tmp_path):
    outside = tmp_path / "runs"
    outside.mkdir()
    long_ago = time.time() - cache.LEGACY_AFTER_S - 60
    for folder in (outside, cache_dir("checkpoints")):
        for name in (".ckpt.abcd1234.tmp", ".notes.old"):
            (folder / name).mkdir()
            os.utime(folder / name, (long_ago, long_ago))
    assert clean_stale(outside) == []  # might be anyone's: never touched
    assert sorted(clean_stale(cache_dir("checkpoints"))) == [".ckpt.abcd1234.tmp", ".notes.old"]


# --- readers while a writer replaces the folder -------------------------------------------------------------

WRITE_VERSIONS = """
    import sys
    from pathlib import Path
    from mtl_utils.offline import cache
    if sys.argv[2] == "two-renames":
        cache._exchange = lambda a, b: False  # as on a file system that cannot swap folders
    print("ready", flush=True)
    stop = Path(sys.argv[1] + ".stop")
    for i in range(10_000):  # until the reader has seen enough
        if stop.exists():
            break
        with cache.atomic_dir(Path(sys.argv[1])) as tmp:
            (tmp / "a").write_text(str(i))
            (tmp / "sub").mkdir()
            (tmp / "sub" / "b").write_text(str(i) * 1000)
"""


def _can_swap(folder: Path) -> bool:
    (folder / "x").mkdir()
    (folder / "y").mkdir()
    try:
        return cache._exchange(folder / "x", folder / "y")
    finally:
        (folder / "x").rmdir()
        (folder / "y").rmdir()


@pytest.mark.parametrize("mode", ["exchange", "two-renames"])
def test_readers_get_the_old_or_the_new_folder_while_a_writer_replaces_it(tmp_path, mode):
    if mode == "exchange" and not _can_swap(tmp_path):
        pytest.skip("this file system cannot swap folders in one step")
    target = tmp_path / "folder"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("start")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b").write_text("start" * 1000)
    writer = _child(WRITE_VERSIONS, str(target), mode)
    assert writer.stdout.readline() == "ready\n"
    versions, reads, deadline = set(), 0, time.monotonic() + 60
    try:
        while (len(versions) < 10 or reads < 2000) and writer.poll() is None and time.monotonic() < deadline:
            files = read_complete(target)
            assert files is not None  # never "missing", never a raw FileNotFoundError
            a = files["a"].decode()
            assert files["sub/b"].decode() == a * 1000  # both files from the same version
            versions.add(a)
            reads += 1
    finally:
        (tmp_path / "folder.stop").touch()
        writer.wait(30)
    assert writer.returncode == 0 and len(versions) >= 10 and reads >= 2000  # reads overlapped many replacements
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "folder.stop"]


KILL_BETWEEN_RENAMES = """
    import os, sys, time
    from pathlib import Path
    from mtl_utils.offline import cache
    cache._exchange = lambda a, b: False
    real_rename = os.rename
    def rename(src, dst):
        if str(src).endswith(".tmp"):  # the finished folder's move into place: die just before it
            print("between", flush=True)
            time.sleep(60)
        real_rename(src, dst)
    os.rename = rename
    with cache.atomic_dir(Path(sys.argv[1])) as tmp:
        (tmp / "v").write_text("new")
"""


def test_a_writer_killed_between_its_two_renames_loses_nothing(tmp_path):
    target = tmp_path / "folder"
    with atomic_dir(target) as tmp:
        (tmp / "v").write_text("old")
    writer = _child(KILL_BETWEEN_RENAMES, str(target))
    try:
        assert writer.stdout.readline() == "between\n"
        assert not target.exists()  # the old folder moved aside, the new one not yet in place
    finally:
        _kill(writer)
    files = read_complete(target)  # the reader finds the dead writer's finished folder and puts it in place
    assert files is not None and files["v"] == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]


def test_temporary_dir_is_named_after_its_writer_and_removed(tmp_path):
    with temporary_dir(tmp_path, "scratch") as tmp:
        assert tmp.name.startswith(f".scratch.{writer_tag()}.") and tmp.name.endswith(".tmp")
        (tmp / "x").write_text("x")
        assert clean_stale(tmp_path) == []  # ours, and we are alive
    assert not tmp.exists()


def test_marker_lists_every_file(tmp_path):
    with atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b").write_text("b")
        (tmp / "a").write_text("a")
    assert sorted(json.loads((tmp_path / "folder" / COMPLETE_MARKER).read_text())) == ["a", "sub/b"]
