"""Writing files so that a crash never leaves a half-written one where a good one was.

Two moves, each written once here: a file is written beside its final name and renamed over
it (`write_atomic`, `write_json`); a directory is built beside its final name and swapped in
(`swap_dir`), the old one moved aside first and deleted last. rename(2) is atomic, and a rename
is only as durable as the fsync of the directory holding it. A killed process leaves at most
what `remove_stale` cleans up: `.NAME.tmp-*` and `.NAME.old-*` beside NAME.

`lock(path)` keeps a second process off an output while the first writes it, and `explain`
turns a failed write (full disk, read-only disk, no permission) into one line saying what to do.
"""

import errno
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager


def fsync(path):
    """Flush a file, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path, data):
    """Write bytes or text to path through a temporary file in the same directory."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; these are ordinary files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync(folder)


def write_json(path, obj, indent=2):
    """JSON, atomically; default=str so that a Path in a config is no crash."""
    write_atomic(path, json.dumps(obj, indent=indent, default=str, ensure_ascii=False) + "\n")


def make_temp_dir(final):
    """An empty directory beside `final` (same filesystem, so the swap is a rename)."""
    final = os.path.abspath(os.fspath(final))
    parent, base = os.path.split(final)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; outputs are usually shared
    return tmp


def swap_dir(tmp, final):
    """Put the finished directory tmp at final. An old final is renamed aside, the new one
    renamed in, then the old one deleted: a crash in between leaves both on disk, neither
    half-written, and a failed rename puts the old one back."""
    final = os.path.abspath(os.fspath(final))
    parent = os.path.dirname(final)
    fsync(tmp)
    if not os.path.lexists(final):
        os.rename(tmp, final)
    else:
        old = os.path.join(parent, os.path.basename(tmp).replace(".tmp-", ".old-"))
        os.rename(final, old)
        try:
            os.rename(tmp, final)
        except BaseException:
            os.rename(old, final)
            raise
        shutil.rmtree(old, ignore_errors=True)
    fsync(parent)


STALE = re.compile(r"\.(.+)\.(tmp|old)-[A-Za-z0-9_]+")  # what write_atomic, make_temp_dir, swap_dir name


def remove_stale(folder):
    """Clean up after a process killed while writing in `folder`: temporary files and
    directories are deleted; a directory swap_dir had moved aside is put back when its
    replacement never arrived, else deleted. Call it only while holding `folder`'s lock (no one
    else is writing there). Returns the names deleted."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in sorted(os.listdir(folder)):
        m = STALE.fullmatch(name)
        if not m:
            continue
        path, final = os.path.join(folder, name), os.path.join(folder, m.group(1))
        if m.group(2) == "old" and not os.path.lexists(final):
            os.rename(path, final)  # the good one, moved aside by a swap that never finished
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
        removed.append(name)
    if removed:
        fsync(folder)
    return removed


class Locked(RuntimeError):
    """Another process holds the lock on an output."""


@contextmanager
def lock(path):
    """Hold an exclusive lock on `path + ".lock"` while the block runs, or raise Locked at once
    when another process holds it. flock(2): the kernel drops the lock when its holder exits,
    however it exits (kill -9 too), so a crash never leaves it stuck. The file stays behind,
    harmless: deleting it would let a third process lock a new file while the second holds the
    old one."""
    import fcntl
    name = os.fspath(path) + ".lock"
    fd = os.open(name, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "?"
            raise Locked(f"{path} is in use by another process (pid {holder}, holding {name}). "
                         f"Wait for it to finish, or choose another output.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # for the message above
        yield
    finally:
        os.close(fd)  # releases the lock


def explain(error):
    """An OSError from writing an output -> one line: the file, what went wrong, what to do."""
    where = error.filename or "an output file"
    advice = {errno.ENOSPC: "the disk is full: free space or choose another output directory",
              errno.EDQUOT: "the disk quota is used up: free space or choose another output directory",
              errno.EROFS: "the file system is read-only: choose another output directory",
              errno.EACCES: "no permission to write there: choose another output directory",
              errno.EPERM: "no permission to write there: choose another output directory",
              errno.EEXIST: "it is in the way of a directory: choose another output directory",
              errno.ENOTDIR: "part of the path is a file, not a directory: choose another output directory"}
    return f"{where}: {error.strerror or error}; {advice.get(error.errno, 'check the path and the disk')}"
