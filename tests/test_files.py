"""files.py: the lock that keeps a second process off an output (and that a crash never leaves
held), the clean-up after a killed write, and the one-line message for a failed write."""

import errno
import os
import signal
import subprocess
import sys

import pytest

import files
from tests.conftest import ROOT


def hold_lock(path):
    """A process that takes files.lock(path) and keeps it until killed."""
    code = f"import files, time\nwith files.lock({str(path)!r}):\n    print('held', flush=True)\n    time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_refuses_a_second_holder_and_a_killed_holder_never_leaves_it_stuck(tmp_path):
    out = tmp_path / "gen.jsonl"
    proc = hold_lock(out)
    try:
        with pytest.raises(files.Locked, match=f"in use by another process \\(pid {proc.pid}"):
            with files.lock(out):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with files.lock(out):  # the kernel dropped the dead holder's lock
        with pytest.raises(files.Locked):  # and the lock holds within one process too
            with files.lock(out):
                pass
    with files.lock(out):  # released on leaving the block
        pass


def test_remove_stale_deletes_temporaries_and_puts_back_a_moved_aside_original(tmp_path):
    (tmp_path / ".epoch_02.tmp-ab12_x").mkdir()  # a killed save_hf: a full model at 65B
    (tmp_path / ".epoch_02.tmp-ab12_x" / "model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / ".metrics.jsonl.tmp-q9").write_text("half")  # a killed write_atomic
    (tmp_path / ".epoch_01.old-zz").mkdir()  # swap_dir killed between its two renames:
    (tmp_path / ".epoch_01.old-zz" / "config.json").write_text("{}")  # the good one, aside
    (tmp_path / "epoch_03").mkdir()
    (tmp_path / ".epoch_03.old-yy").mkdir()  # swap finished, the old one not yet deleted
    for keep in ("metrics.jsonl", ".hidden", "resume.tmp", ".epoch_04.tmp"):
        (tmp_path / keep).write_text("mine")
    removed = files.remove_stale(tmp_path)
    assert sorted(removed) == [".epoch_02.tmp-ab12_x", ".epoch_03.old-yy", ".metrics.jsonl.tmp-q9"]
    assert sorted(os.listdir(tmp_path)) == [".epoch_04.tmp", ".hidden", "epoch_01", "epoch_03",
                                            "metrics.jsonl", "resume.tmp"]
    assert (tmp_path / "epoch_01" / "config.json").exists()


def test_explain_says_which_file_and_what_to_do():
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/out/metrics.jsonl")
    assert files.explain(full) == ("/data/out/metrics.jsonl: No space left on device; the disk is "
                                   "full: free space or choose another output directory")
    ro = OSError(errno.EROFS, os.strerror(errno.EROFS), "/mnt/ro/out")
    assert "/mnt/ro/out: Read-only file system; the file system is read-only" in files.explain(ro)
