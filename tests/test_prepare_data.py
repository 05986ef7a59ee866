"""prepare_data.py: the token layout and mask of LIMA's chat format (LIMA §3), trimming, the
dev split, both input formats, the readers, and every bad input (message + nothing
written). Expected tokens are built by hand from tokenizer.encode, not from encode_dialog."""

import json
import os
import random
import time

import numpy as np
import pytest

import data
import prepare_data as pd
from conftest import train_tiny_tokenizer
from tokenizer import file_sha256, load_tokenizer

WORDS = "the cat sat on a mat while river stones hum quietly under bright green lamps".split()


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def sentence(rng, lo=2, hi=8):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def make_rows(n, seed=0, multi_every=5):
    """n distinct conversations; every multi_every-th one has four turns (source multi_turn)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = 4 if i % multi_every == 0 else 2
        turns = [f"{i} " + sentence(rng)] + [sentence(rng) for _ in range(k - 1)]
        rows.append({"conversations": turns, "source": "multi_turn" if k == 4 else "qa"})
    return rows


def prepare(tmp_path, tok_path, rows, *args, name="data"):
    train = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    out = tmp_path / name
    meta = pd.main(["--train", train, "--tokenizer", tok_path, "--out_dir", str(out), *args])
    return out, meta


def expected(tok, turns, train_on_prompt=False):
    tokens, mask = [tok.bos_id], [False]
    for i, text in enumerate(turns):
        ids = tok.encode(text)
        tokens += ids + [tok.eot_id]
        mask += [train_on_prompt or i % 2 == 1] * (len(ids) + 1)
    return tokens, mask


def test_single_turn_layout(tmp_path, tiny_tokenizer_path):
    tok = load_tokenizer(tiny_tokenizer_path)
    u, a = "the cat sat on a mat", "river stones hum"
    out, _ = prepare(tmp_path, tiny_tokenizer_path, [{"conversations": [u, a], "source": "x"}],
                     "--dev_size", "0")
    tokens, mask = data.load_split(out, "train").example(0)
    eu, ea = tok.encode(u), tok.encode(a)
    # BOS u EOT a EOT; the loss trains on a and its EOT only
    assert tokens.tolist() == [tok.bos_id] + eu + [tok.eot_id] + ea + [tok.eot_id]
    assert mask.tolist() == [False] * (len(eu) + 2) + [True] * (len(ea) + 1)
    assert tokens.dtype == np.uint16 and mask.dtype == np.bool_


def test_multi_turn_layout_and_train_on_prompt(tmp_path, tiny_tokenizer_path):
    tok = load_tokenizer(tiny_tokenizer_path)
    turns = ["hello cat", "the cat sat", "and the mat", "green lamps"]
    rows = [{"conversations": turns, "source": "multi_turn"}]
    out, meta = prepare(tmp_path, tiny_tokenizer_path, rows, "--dev_size", "0")
    tokens, mask = data.load_split(out, "train").example(0)
    ids = [tok.encode(t) for t in turns]
    assert tokens.tolist() == ([tok.bos_id] + ids[0] + [tok.eot_id] + ids[1] + [tok.eot_id]
                               + ids[2] + [tok.eot_id] + ids[3] + [tok.eot_id])
    assert mask.tolist() == ([False] * (len(ids[0]) + 2) + [True] * (len(ids[1]) + 1)
                             + [False] * (len(ids[2]) + 1) + [True] * (len(ids[3]) + 1))
    assert meta["splits"]["train"]["multi_turn"] == 1
    out2, _ = prepare(tmp_path, tiny_tokenizer_path, rows, "--dev_size", "0", "--train_on_prompt",
                      name="all")
    tokens2, mask2 = data.load_split(out2, "train").example(0)
    assert tokens2.tolist() == tokens.tolist()
    assert mask2.tolist() == [False] + [True] * (len(tokens) - 1)  # all but BOS


def test_trimming_keeps_the_start(tmp_path, tiny_tokenizer_path):
    tok = load_tokenizer(tiny_tokenizer_path)
    long_answer = " ".join(WORDS * 4)
    rows = [{"conversations": ["the cat", long_answer], "source": "x"},
            {"conversations": ["hum", "lamps"], "source": "x"},
            {"conversations": [" ".join(WORDS * 4), "lamps"], "source": "x"}]  # prompt fills max_len
    out, meta = prepare(tmp_path, tiny_tokenizer_path, rows, "--dev_size", "0", "--max_len", "20")
    split = data.load_split(out, "train")
    full, full_mask = expected(tok, rows[0]["conversations"])
    assert len(full) > 20
    tokens, mask = split.example(0)
    assert tokens.tolist() == full[:20] and mask.tolist() == full_mask[:20]
    assert split.example(1)[0].tolist() == expected(tok, rows[1]["conversations"])[0]
    s = meta["splits"]["train"]
    assert s["trimmed"] == 1 and s["len_max"] == 20 and s["len_max_untrimmed"] == len(full)
    assert s["dropped_no_loss"] == 1 and len(split) == 2  # nothing left to learn from the third


def test_odd_length_drops_trailing_user_turn(tmp_path, tiny_tokenizer_path):
    tok = load_tokenizer(tiny_tokenizer_path)
    rows = [{"conversations": ["the cat", "sat on a mat", "and then?"], "source": "x"},
            {"conversations": ["hum", "lamps"], "source": "x"},
            {"conversations": ["a lone prompt"], "source": "x"}]
    out, meta = prepare(tmp_path, tiny_tokenizer_path, rows, "--dev_size", "0")
    split = data.load_split(out, "train")
    assert len(split) == 2
    assert split.example(0)[0].tolist() == expected(tok, ["the cat", "sat on a mat"])[0]
    assert meta["splits"]["train"]["dropped_turns"] == 1
    assert meta["inputs"]["train"]["lone_prompts"] == 1


def test_dev_split_deterministic_and_disjoint(tmp_path, tiny_tokenizer_path):
    rows = make_rows(60)
    def split_sets(out):
        sets = {}
        for s in ("train", "dev"):
            sp = data.load_split(out, s)
            sets[s] = [tuple(sp.example(i)[0].tolist()) for i in range(len(sp))]
        return sets
    a, meta = prepare(tmp_path, tiny_tokenizer_path, rows, "--dev_size", "10", "--seed", "1", name="a")
    b, _ = prepare(tmp_path, tiny_tokenizer_path, rows, "--dev_size", "10", "--seed", "1", name="b")
    c, _ = prepare(tmp_path, tiny_tokenizer_path, rows, "--dev_size", "10", "--seed", "2", name="c")
    sa, sb, sc = split_sets(a), split_sets(b), split_sets(c)
    assert sa == sb  # same seed, same split
    assert sa["dev"] != sc["dev"]
    assert len(sa["dev"]) == 10 and len(sa["train"]) == 50
    assert not set(sa["dev"]) & set(sa["train"])
    tok = load_tokenizer(tiny_tokenizer_path)
    everything = {tuple(expected(tok, r["conversations"])[0]) for r in rows}
    assert set(sa["dev"]) | set(sa["train"]) == everything
    # dev prompts line up with the dev split: the turns up to the last user turn + the reference
    prompts = data.read_prompts(a, "dev")
    assert [p["id"] for p in prompts] == list(range(10)) and meta["dev_size"] == 10
    for p, toks in zip(prompts, sa["dev"]):
        assert tuple(expected(tok, p["turns"] + [p["reference"]])[0]) == toks
        assert len(p["turns"]) % 2 == 1
        assert rows[p["line"] - 1]["conversations"] == p["turns"] + [p["reference"]]


def test_dev_file(tmp_path, tiny_tokenizer_path):
    rows, dev_rows = make_rows(20, seed=0), make_rows(5, seed=1)
    dev = write_jsonl(tmp_path / "dev.jsonl", dev_rows)
    out, meta = prepare(tmp_path, tiny_tokenizer_path, rows, "--dev_file", dev)
    assert len(data.load_split(out, "train")) == 20 and len(data.load_split(out, "dev")) == 5
    assert meta["dev_size"] == 5 and meta["dev_lines"] == [1, 2, 3, 4, 5]
    assert [p["reference"] for p in data.read_prompts(out, "dev")] == [
        r["conversations"][-1] for r in dev_rows]


def test_messages_format_equals_conversations(tmp_path, tiny_tokenizer_path):
    rows = make_rows(30)
    msgs = [{"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": t}
                          for i, t in enumerate(r["conversations"])], "source": r["source"]}
            for r in rows]
    a, ma = prepare(tmp_path, tiny_tokenizer_path, rows, "--dev_size", "5", name="conv")
    b, mb = prepare(tmp_path, tiny_tokenizer_path, msgs, "--dev_size", "5", name="msgs")
    for s in ("train", "dev"):
        for part in ("tokens", "mask", "offsets"):
            assert np.array_equal(np.load(a / f"{s}.{part}.npy"), np.load(b / f"{s}.{part}.npy"))
    assert ma["splits"] == mb["splits"]
    assert data.read_prompts(a, "dev") == data.read_prompts(b, "dev")


def test_messages_system_and_roles(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        {"messages": [{"role": "assistant", "content": "Hi"}]}])
    with pytest.raises(pd.DataError, match=r"m\.jsonl:2: message 1 has role 'assistant'"):
        data.read_conversations(path)
    write_jsonl(path, [{"messages": [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "Hi"},
                                     {"role": "assistant", "content": "Hello"}]}])
    [row] = data.read_conversations(path)
    assert row["turns"] == ["Be brief.\n\nHi", "Hello"] and row["source"] == "unknown"


def test_reader_round_trip_and_meta(tmp_path, tiny_tokenizer_path):
    tok = load_tokenizer(tiny_tokenizer_path)
    rows = make_rows(40)
    test = write_jsonl(tmp_path / "test.jsonl", [{"conversations": ["what is a cat"], "source": "t"},
                                                 {"conversations": ["hi", "yo", "and?"], "source": "t"}])
    out, _ = prepare(tmp_path, tiny_tokenizer_path, rows, "--dev_size", "0", "--test", test)
    split = data.load_split(out, "train")
    assert len(split) == 40 and isinstance(split.tokens, np.memmap)
    for i, r in enumerate(rows):
        t, m = tok.encode_dialog(r["conversations"])
        assert split.example(i)[0].tolist() == t and split.example(i)[1].tolist() == m
    assert split.lengths.tolist() == [len(tok.encode_dialog(r["conversations"])[0]) for r in rows]
    meta = data.load_meta(out)
    assert meta["tokenizer"] == os.path.abspath(tiny_tokenizer_path)
    assert meta["tokenizer_sha256"] == file_sha256(tiny_tokenizer_path)
    assert meta["eot_id"] == tok.eot_id and meta["vocab_size"] == tok.eot_id + 1
    assert (meta["bos_id"], meta["eos_id"]) == (1, 2)
    assert meta["max_len"] == 2048 and meta["train_on_prompt"] is False and meta["dev_size"] == 0
    assert meta["splits"]["train"]["multi_turn"] == 8 and meta["splits"]["train"]["sources"] == {
        "multi_turn": 8, "qa": 32}
    assert len(data.load_split(out, "dev")) == 0 and data.read_prompts(out, "dev") == []
    assert data.read_prompts(out, "test") == [
        {"id": 0, "source": "t", "line": 1, "turns": ["what is a cat"]},
        {"id": 1, "source": "t", "line": 2, "turns": ["hi", "yo", "and?"]}]
    assert data.read_prompts(test) == data.read_prompts(out, "test")  # a raw GAIR-format file works too
    data.check_tokenizer(meta, tok)
    (tmp_path / "other").mkdir()
    other = load_tokenizer(train_tiny_tokenizer(str(tmp_path / "other"), vocab_size=320))
    with pytest.raises(ValueError, match="Run prepare_data.py again with --tokenizer"):
        data.check_tokenizer(meta, other)


def test_missing_or_garbled_data_dir(tmp_path, tiny_tokenizer_path):
    with pytest.raises(FileNotFoundError, match="prepare_data.py"):
        data.load_split(tmp_path / "nope", "train")
    out, _ = prepare(tmp_path, tiny_tokenizer_path, make_rows(5), "--dev_size", "0")
    np.save(out / "train.offsets.npy", np.array([0, 3], dtype=np.int64))
    with pytest.raises(pd.DataError, match="prepare_data.py again"):
        data.load_split(out, "train")
    os.remove(out / "train.mask.npy")
    with pytest.raises(FileNotFoundError, match="prepare_data.py"):
        data.load_split(out, "train")


def _tree(path):
    return sorted(os.path.relpath(os.path.join(d, f), path)
                  for d, _, files in os.walk(path) for f in files)


BAD = {  # name: (lines of the train file, the line number the message must name, what it says)
    "invalid_json": (['{"conversations": ["a", "b"]}', '{"conversations": ["a", '], 2, "invalid JSON"),
    "missing_conversations": (['{"source": "x"}'], 1, "no 'conversations'"),
    "non_list_conversations": (['{"conversations": "a b"}'], 1, "not a list"),
    "non_string_turn": (['{"conversations": ["a", 3]}'], 1, "turn 2 of 'conversations' is a number"),
    "empty_turn": (['{"conversations": ["a", "b"]}', '{"conversations": ["a", "  "]}'], 2,
                   "turn 2 of 'conversations' is empty"),
    "empty_file": ([], None, "empty file"),
}


@pytest.mark.parametrize("case", sorted(BAD) + ["missing_file", "not_sentencepiece"])
def test_bad_input_writes_nothing(case, tmp_path, tiny_tokenizer_path, capsys):
    out, _ = prepare(tmp_path, tiny_tokenizer_path, make_rows(5), "--dev_size", "1")
    (out / "sentinel.txt").write_text("keep me")
    before = {p: (out / p).read_bytes() for p in _tree(out)}
    train, tok = str(tmp_path / "bad.jsonl"), tiny_tokenizer_path
    if case in BAD:
        lines, line_no, what = BAD[case]
        write_jsonl(train, lines)
        where = f"{train}:{line_no}:" if line_no else f"{train}:"
    elif case == "missing_file":
        train, where, what = str(tmp_path / "missing.jsonl"), str(tmp_path / "missing.jsonl"), "no such file"
    else:
        write_jsonl(train, ['{"conversations": ["a", "b"]}'])
        tok = write_jsonl(tmp_path / "tokenizer.model", ["this is not a model"])
        where, what = tok, "not a SentencePiece model"
    before_tmp = sorted(os.listdir(tmp_path))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        pd.main(["--train", train, "--tokenizer", tok, "--out_dir", str(out)])
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert where in err and what in err and "Traceback" not in err
    assert {p: (out / p).read_bytes() for p in _tree(out)} == before  # untouched
    assert sorted(os.listdir(tmp_path)) == before_tmp  # no temp dir left beside it


def test_many_bad_lines_reports_the_first_few(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", ['{"conversations": ["a", "b"]}'] + ["not json"] * 12)
    with pytest.raises(pd.DataError) as e:
        data.read_conversations(path)
    msg = str(e.value)
    assert "12 bad lines" in msg and f"{path}:2: invalid JSON" in msg and f"{path}:6:" in msg
    assert f"{path}:7:" not in msg and "and 7 more" in msg


def test_refuses_to_replace_a_foreign_dir(tmp_path, tiny_tokenizer_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "precious.txt").write_text("not prepared data")
    with pytest.raises(SystemExit):
        prepare(tmp_path, tiny_tokenizer_path, make_rows(5), "--dev_size", "0")
    assert (out / "precious.txt").read_text() == "not prepared data"
    assert sorted(os.listdir(tmp_path)) == ["data", "data.jsonl"]


def test_rerun_replaces_output(tmp_path, tiny_tokenizer_path):
    out, _ = prepare(tmp_path, tiny_tokenizer_path, make_rows(10), "--dev_size", "2")
    out, _ = prepare(tmp_path, tiny_tokenizer_path, make_rows(20), "--dev_size", "3")
    assert len(data.load_split(out, "train")) == 17 and len(data.load_split(out, "dev")) == 3
    assert sorted(os.listdir(tmp_path)) == ["data", "data.jsonl"]


def test_large_file_is_fast(tmp_path, tiny_tokenizer_path):
    rng = random.Random(0)
    rows = [json.dumps({"conversations": [sentence(rng, 3, 12), sentence(rng, 3, 20)], "source": "s"})
            for _ in range(20_000)]
    t0 = time.time()
    out, meta = prepare(tmp_path, tiny_tokenizer_path, rows)
    assert time.time() - t0 < 10
    assert meta["splits"]["train"]["examples"] == 19_950 and meta["splits"]["dev"]["examples"] == 50
    assert data.load_split(out, "train").offsets[-1] == meta["splits"]["train"]["tokens"]


def test_dev_examples_also_in_train_are_reported_and_refused(tmp_path, tiny_tokenizer_path, capsys):
    rows, dev_rows = make_rows(20, seed=0), make_rows(5, seed=1)
    dev_rows[1] = dict(rows[7], conversations=["  " + rows[7]["conversations"][0]] + rows[7]["conversations"][1:])
    dev_rows[3] = rows[12]  # the same prompt (whitespace aside): the model trains on its answer
    dev = write_jsonl(tmp_path / "dev.jsonl", dev_rows)
    with pytest.raises(SystemExit):
        prepare(tmp_path, tiny_tokenizer_path, rows, "--dev_file", dev)
    err = capsys.readouterr().err
    train = tmp_path / "data.jsonl"
    assert "2 dev examples have a prompt that is also in train" in err
    assert f"{dev}:2 = {train}:8" in err and f"{dev}:4 = {train}:13" in err and "--allow_dev_overlap" in err
    assert not (tmp_path / "data").exists()
    out, meta = prepare(tmp_path, tiny_tokenizer_path, rows, "--dev_file", dev, "--allow_dev_overlap")
    assert meta["dev_in_train"] == 2 and "prompt also in train" in capsys.readouterr().out


def test_carved_dev_never_takes_a_prompt_that_train_repeats(tmp_path, tiny_tokenizer_path):
    rows = make_rows(12)
    repeated = [dict(r, conversations=r["conversations"][:-1] + ["another answer"]) for r in rows[:6]]
    out, meta = prepare(tmp_path, tiny_tokenizer_path, rows + repeated, "--dev_size", "5", "--seed", "0")
    assert meta["dev_in_train"] == 0 and all(6 < line <= 12 for line in meta["dev_lines"])
    with pytest.raises(SystemExit):  # six prompts appear once: at most six can be held out
        prepare(tmp_path, tiny_tokenizer_path, rows + repeated, "--dev_size", "7", name="seven")


def test_flags_are_range_checked_when_read(tmp_path, capsys):
    for argv, message in ((["--dev_size", "-1"], "--dev_size -1: must be at least 0"),
                          (["--max_len", "1"], "--max_len 1: must be at least 2")):
        with pytest.raises(SystemExit) as e:
            pd.main(["--demo", "--out_dir", str(tmp_path / "x"), *argv])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_an_unwritable_out_dir_is_one_message(tmp_path, tiny_tokenizer_path, capsys):
    (tmp_path / "a_file").write_text("")
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(5))
    with pytest.raises(SystemExit) as e:
        pd.main(["--train", train, "--tokenizer", tiny_tokenizer_path, "--out_dir", str(tmp_path / "a_file" / "data"), "--dev_size", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and f"{tmp_path / 'a_file'}: " in err and "choose another output directory" in err
    assert "Traceback" not in err
