"""files.py: one writer per output (lock), the clean-up after a killed write, one message for a
bad JSON file (read_json) and for a failed write (explain)."""

import errno
import os
import signal
import subprocess
import sys
import time

import pytest

import files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    out = tmp_path / "gens.jsonl"
    with files.lock(out):
        with pytest.raises(files.LockedError, match=rf"gens\.jsonl is being written by another "
                                                    rf"process \(pid {os.getpid()}\)"):
            with files.lock(out):
                pass
    assert not os.path.exists(f"{out}.lock")  # the holder tidies up
    with files.lock(out):  # and the next writer gets it
        pass


def test_a_killed_holder_leaves_no_stuck_lock(tmp_path):
    out = tmp_path / "gens.jsonl"
    code = (f"import sys, time; sys.path.insert(0, {ROOT!r}); import files\n"
            f"with files.lock({str(out)!r}):\n    print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(files.LockedError, match=f"pid {proc.pid}"):
            with files.lock(out):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert os.path.exists(f"{out}.lock")  # killed: no chance to remove its file...
    deadline = time.time() + 10
    with files.lock(out):  # ...but the kernel dropped the lock with the process
        assert time.time() < deadline


def test_lock_in_an_unwritable_place_says_so(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="cannot create its lock file.*writable directory"):
        with files.lock(tmp_path / "file" / "gens.jsonl"):  # a file where a directory should be
            pass


@pytest.mark.parametrize("content, problem", [
    (b'{"dim": 4096, "n_lay', "not valid JSON (Unterminated string"),
    (b"", "empty (a truncated write?)"),
    (b"[" * 200_000 + b"]" * 200_000, "not valid JSON (nested too deeply)"),
    (b'{"a": "\xff"}', "not valid UTF-8"),
], ids=["truncated", "empty", "deep", "utf8"])
def test_read_json_names_the_file_and_the_problem(tmp_path, content, problem):
    path = tmp_path / "config.json"
    path.write_bytes(content)
    with pytest.raises(ValueError) as e:
        files.read_json(path, "Re-download it.")
    assert str(e.value).startswith(f"{path}: {problem}") and str(e.value).endswith("Re-download it.")


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
