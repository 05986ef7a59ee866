"""Writing files so that a crash never leaves a half-written one where a good one was.

Two moves, each written once here: a file is written beside its final name and renamed over
it (`write_atomic`, `write_json`); a directory is built beside its final name and swapped in
(`swap_dir`), the old one moved aside first and deleted last. rename(2) is atomic, and a rename
is only as durable as the fsync of the directory holding it.

A killed process leaves at most what `remove_stale` cleans up: `.NAME.tmp-*` and `.NAME.old-*`
beside NAME. `lock(path)` keeps a second process off an output while the first writes it;
`read_json` reads a JSON file with one message for anything wrong in it; `explain` turns a
failed write (full disk, read-only disk, no permission) into one line saying what to do.
"""

import errno
import fcntl
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



# ---- one writer per output ---------------------------------------------------------------------

class LockedError(OSError):
    """Another process holds the lock on this output; the message says which and what to do."""


@contextmanager
def lock(path):
    """Hold an exclusive lock on `path` (a file or directory about to be written) while the
    block runs; a second process asking for it is refused at once with LockedError.

    The lock is flock(2) on path + ".lock": the kernel drops it when its holder exits, however it
    dies (kill -9, a crash, a lost node), so it is never left stuck. The lock file is removed
    on the way out, by its holder, while still holding it; a process that opened it just before
    finds it gone and tries again on a fresh one."""
    path = os.fspath(path)
    lock_path = path + ".lock"
    while True:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OSError(f"{path}: cannot create its lock file {lock_path} ({e.strerror}); the "
                          f"output must go to a writable directory") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise LockedError(f"{path} is being written by another process (pid {holder}); wait "
                              f"for it to finish or write elsewhere. The lock goes with that "
                              f"process, so nothing needs removing by hand.") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock_path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # locked a file its last holder had just removed: take the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # for the message another process shows
        yield
    finally:
        try:
            os.unlink(lock_path)
        except OSError:
            pass
        os.close(fd)


# ---- reading ---------------------------------------------------------------------------------

def read_json(path, fix):
    """A JSON file -> its value. Anything wrong with it (truncated, not JSON, not UTF-8, nested
    too deeply, unreadable) is a ValueError `path: what is wrong. fix`."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror}). {fix}") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        problem = f"not valid UTF-8 ({e.reason} at byte {e.start})"
    except json.JSONDecodeError as e:
        problem = (f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})" if raw.strip()
                   else "empty (a truncated write?)")
    except RecursionError:
        problem = "not valid JSON (nested too deeply)"
    raise ValueError(f"{path}: {problem}. {fix}")


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
