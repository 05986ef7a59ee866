"""Writing files so that a crash never leaves a half-written one where a good one was.

Two moves, each written once here: a file is written beside its final name and renamed over
it (`write_atomic`, `write_json`); a directory is built beside its final name and swapped in
(`swap_dir`), the old one moved aside first and deleted last. rename(2) is atomic, and a rename
is only as durable as the fsync of the directory holding it.
"""

import json
import os
import shutil
import tempfile


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
