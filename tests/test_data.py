"""data.py's readers and the Appender: every bad line named by file:line, whatever is wrong with
it; a write that fails leaves the file ending on its last whole record."""

import errno
import json
import os

import pytest

import data


def write_lines(path, lines):
    with open(path, "wb") as f:
        f.write(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return str(path)


GOOD = '{"conversations": ["a", "b"]}'


@pytest.mark.parametrize("line, what", [
    (b'{"conversations": ["x", ' + b"[" * 200_000 + b"]" * 200_000 + b"]}", "nested too deeply"),
    (b'{"conversations": ["\\ud800 tea", "b"]}', r"a lone surrogate \ud800"),
    (b'{"conversations": ["tea", "b\\udfff"]}', r"a lone surrogate \udfff"),
    (b'{"conversations": ["caf\xe9", "b"]}', "not valid UTF-8"),
    (b'{"conversations": ["a", "b"]', "invalid JSON"),
], ids=["deep", "high-surrogate", "low-surrogate", "latin1", "truncated"])
def test_every_reader_names_the_bad_line(tmp_path, line, what):
    path = write_lines(tmp_path / "train.jsonl", [GOOD, line, GOOD])
    for read in (data.read_conversations, data.read_prompts, data.read_generations,
                 lambda p: data.read_jsonl(p, repair_tail=True)):
        with pytest.raises(data.DataError) as e:
            read(path)
        assert f"{path}:2: " in str(e.value) and what in str(e.value)


def test_a_surrogate_pair_is_text(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", [b'{"conversations": ["\\ud83d\\ude00 tea", "\\\\ud800"]}'])
    [conv] = data.read_conversations(path)
    assert conv["turns"] == ["\U0001F600 tea", "\\ud800"]  # an emoji, and an escaped backslash


def test_a_directory_or_an_unreadable_file(tmp_path):
    with pytest.raises(data.DataError, match="is a directory"):
        data.read_jsonl(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        data.read_jsonl(tmp_path / "nope.jsonl")


def test_meta_json_damaged(tmp_path):
    (tmp_path / "meta.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(data.DataError, match=r"meta\.json: not valid JSON \(nested too deeply\)\. Run prepare_data"):
        data.load_meta(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"format": data.FORMAT, "tokenizer": "t.model"}))
    with pytest.raises(data.DataError, match=r"meta\.json: tokenizer_sha256, eot_id, vocab_size, max_len missing"):
        data.load_meta(tmp_path)


@pytest.mark.parametrize("err, advice", [(errno.ENOSPC, "the disk is full"),
                                         (errno.EROFS, "read-only: write somewhere else")])
def test_a_failed_append_keeps_every_whole_record(tmp_path, monkeypatch, err, advice):
    path = tmp_path / "gens.jsonl"
    out = data.Appender(path)
    out.write({"index": 0, "response": "kept"})
    real_write = os.write

    def half_then_fail(fd, buf):  # the disk fills up in the middle of a record
        if fd == out.fd and len(buf) > 10:
            real_write(fd, bytes(buf[:10]))
            raise OSError(err, os.strerror(err))
        return real_write(fd, buf)

    monkeypatch.setattr(os, "write", half_then_fail)
    with pytest.raises(OSError) as e:
        out.write({"index": 1, "response": "lost"})
    assert str(e.value).startswith(f"{path}: a record could not be written") and advice in str(e.value)
    monkeypatch.undo()
    out.write({"index": 2, "response": "after"})  # room again: appending goes on
    out.close()
    assert [r["index"] for _, r in data.read_jsonl(path)] == [0, 2]


def test_an_output_that_is_a_directory(tmp_path):
    with pytest.raises(OSError, match=f"{tmp_path}: cannot be opened for writing .*a directory"):
        data.Appender(tmp_path)
