"""evaluate.py dialogue (LIMA §6): a model converses through a file of dialogues, each user message
answered in the context of the conversation so far (its own answers included), resumably; every
response is graded fail / pass / excellent by a person or a judge; report gives the rates with
confidence intervals over dialogues. A tiny random checkpoint converses; judges are scripted."""

import json
import re

import numpy as np
import pytest
import torch

import checkpoint
import data
import evaluate as E
import judging
import stats
from model import Transformer, model_args
from tokenizer import load_tokenizer

DIALOGUES = [
    {"id": "a", "source": "authors", "user": ["the cat sat", "and then?", "why the mat?"]},
    # a conversation to continue: it ends on the user's message, then one more
    {"conversations": ["hi cat", "hello there", "what mat?"], "user": ["green lamps?"], "source": "se"},
    {"messages": [{"role": "user", "content": "tea or maps?"}]},
]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def read(path):
    return [json.loads(line) for line in open(path)]


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory, tiny_tokenizer_path):
    tok = load_tokenizer(tiny_tokenizer_path)
    torch.manual_seed(0)
    # context long enough for the dialogue question spelled by the tiny tokenizer (a judge too)
    model = Transformer(model_args("debug", vocab_size=tok.vocab_size, max_seq_len=2304))
    model.init_weights()
    path = str(tmp_path_factory.mktemp("chat") / "chat")
    checkpoint.save_model(model, path, tokenizer_path=tiny_tokenizer_path)
    return path


def cfg_for(tmp_path, ckpt, **kw):
    dialogues = write_jsonl(tmp_path / "dialogues.jsonl", DIALOGUES)
    return E.DialogueConfig(**{"dialogues": dialogues, "checkpoint": ckpt, "gen": str(tmp_path / "gen.jsonl"),
                               "out": str(tmp_path / "grades.jsonl"), "judge": "scripted", "seed": 1,
                               "max_response_tokens": 4, "batch_size": 2, "device": "cpu", "bootstrap": 50, **kw})


def recording_respond(monkeypatch, fail_on_call=None):
    """E.respond, recording the conversations it is given; raises KeyboardInterrupt on one call."""
    calls, real = [], E.respond

    def respond(model, tokenizer, conversations, **kw):
        calls.append([list(c) for c in conversations])
        if len(calls) == fail_on_call:
            raise KeyboardInterrupt
        return real(model, tokenizer, conversations, **kw)
    monkeypatch.setattr(E, "respond", respond)
    return calls


def always(text):
    return lambda questions: [text] * len(questions)


def test_every_message_is_answered_in_context(tmp_path, chat_checkpoint, monkeypatch):
    calls = recording_respond(monkeypatch)
    cfg = cfg_for(tmp_path, chat_checkpoint)
    grades = E.run_dialogue(cfg, judge=always("It does what was asked.\nPass"))
    turns = {(t["dialogue"], t["turn"]): t for t in read(cfg.gen)}
    assert sorted(turns, key=str) == sorted([("a", 1), ("a", 2), ("a", 3), (1, 1), (1, 2), (2, 1)], key=str)
    a1, a2 = turns["a", 1]["response"], turns["a", 2]["response"]
    assert turns["a", 3]["context"] == ["the cat sat", a1, "and then?", a2]  # its own answers, in order
    assert turns[1, 1]["context"] == ["hi cat", "hello there"] and turns[1, 1]["prompt"] == "what mat?"
    assert turns[1, 2]["context"] == ["hi cat", "hello there", "what mat?", turns[1, 1]["response"]]
    assert turns[2, 1]["context"] == [] and turns[1, 2]["source"] == "se"
    # what the model was given is exactly the conversation so far and the user's message
    given = [c for batch in calls for c in batch]
    assert len(given) == 6 and all(t["context"] + [t["prompt"]] in given for t in turns.values())
    settings = turns["a", 1]["settings"]
    assert (settings["temperature"], settings["top_p"], settings["repetition_penalty"]) == (0.7, 0.9, 1.2)  # LIMA §5
    assert settings["seed"] == 1 and settings["max_new_tokens"] == 4
    assert len(grades) == 6 and {g["grade"] for g in grades} == {"pass"}
    assert all(g["judge"] == "scripted" and g["gen"] == "gen.jsonl" for g in grades)


def test_a_stopped_conversation_resumes_where_it_stopped(tmp_path, chat_checkpoint, monkeypatch, capsys):
    cfg = cfg_for(tmp_path, chat_checkpoint)
    argv = ["dialogue", "--dialogues", cfg.dialogues, "--checkpoint", chat_checkpoint, "--gen", cfg.gen,
            "--out", cfg.out, "--judge", "human", "--seed", "1", "--max_response_tokens", "4",
            "--batch_size", "2", "--device", "cpu"]
    recording_respond(monkeypatch, fail_on_call=2)  # Ctrl-C in the second batch of the first round
    assert E.main(argv) == 130
    err = capsys.readouterr().err
    assert f"0 grades are saved in {cfg.out} (2 responses are saved in {cfg.gen})" in err
    assert f"To continue: python evaluate.py {' '.join(argv)}" in err
    first = read(cfg.gen)
    assert len(first) == 2
    calls = recording_respond(monkeypatch)
    again = E.run_dialogue(cfg, judge=always("fine\nExcellent"))
    rows = read(cfg.gen)
    assert rows[:2] == first and len(rows) == 6 and len(again) == 6
    assert sum(len(batch) for batch in calls) == 4  # only what was left
    by_key = {(r["dialogue"], r["turn"]): r for r in rows}
    for (d, k), r in by_key.items():  # every context holds the responses before it
        if k > 1:
            prev = by_key[d, k - 1]
            assert r["context"] == prev["context"] + [prev["prompt"], prev["response"]]
    # another decoding, or another dialogue file, is refused rather than continued
    with pytest.raises(E.EvalError, match="made with other settings"):
        E.run_dialogue(cfg_for(tmp_path, chat_checkpoint, max_response_tokens=5, out=str(tmp_path / "o.jsonl")),
                       judge=always("Pass"))
    changed = [dict(DIALOGUES[0], user=["the dog sat", "and then?", "why the mat?"])] + DIALOGUES[1:]
    cfg2 = cfg_for(tmp_path, chat_checkpoint, out=str(tmp_path / "o2.jsonl"))
    write_jsonl(cfg2.dialogues, changed)
    with pytest.raises(E.EvalError, match="another dialogue file, or an edited one"):
        E.run_dialogue(cfg2, judge=always("Pass"))


def test_a_person_grades_each_response_and_the_session_resumes(tmp_path, chat_checkpoint, capsys):
    from tests.test_evaluate import scripted_input
    cfg = cfg_for(tmp_path, chat_checkpoint, judge="human")
    shown = []
    first = E.run_dialogue(cfg, ask=scripted_input(["e", "x", "p", "f"]), show=shown.append)
    assert [g["grade"] for g in first] == ["excellent", "pass", "fail"]  # "x" was refused, asked again
    # a conversation at a time, in its order, though the responses were made in rounds
    assert [g["turn"] for g in first] == [1, 2, 3] and {g["dialogue"] for g in first} == {"a"}
    view = next(v for v in shown if "dialogue a, turn 2" in v)
    assert "The conversation so far:\nUser: the cat sat\n\nAssistant: " in view and "User: and then?" in view
    assert "[f] Fail:" in view and "[e] Excellent:" in view
    rest = E.run_dialogue(cfg, ask=scripted_input(["s", "e", "e", "q"]), show=shown.append)
    assert len(rest) == 6 and [g["grade"] for g in rest][3:] == ["skip", "excellent", "excellent"]
    assert len({(g["dialogue"], g["turn"]) for g in rest}) == 6  # each response once
    assert E.main(["report", cfg.out, "--bootstrap", "50"]) == 0
    out = capsys.readouterr().out
    assert "6 responses: 0 unparseable" in out and "1 skipped" in out
    assert re.search(r"^excellent\s+3\s+60\.0%", out, re.M) and re.search(r"^fail\s+1\s+20\.0%", out, re.M)
    assert "'#' excellent" in out


def test_a_judge_checkpoint_grades_from_the_command_line(tmp_path, chat_checkpoint, capsys):
    cfg = cfg_for(tmp_path, chat_checkpoint)
    argv = ["dialogue", "--dialogues", cfg.dialogues, "--checkpoint", chat_checkpoint, "--gen", cfg.gen,
            "--out", cfg.out, "--judge", chat_checkpoint, "--max_new_tokens", "4", "--max_response_tokens", "4",
            "--device", "cpu", "--bootstrap", "50"]
    assert E.main(argv) == 0
    grades = read(cfg.out)
    assert len(grades) == 6 and all(isinstance(g["raw"], str) for g in grades)
    n_null = sum(g["grade"] is None for g in grades)  # a random model's replies: counted, not dropped
    assert f"{n_null} unparseable" in capsys.readouterr().out
    assert E.main(argv) == 0 and len(read(cfg.out)) == 6  # nothing left to do


@pytest.mark.parametrize("row, message", [
    ({"conversations": ["hi", "hello"]}, "nothing to answer"),
    ({"user": []}, "'user' is empty"),
    ({"user": ["hi", 3]}, "turn 2 of 'user' is a number"),
    ({"source": "x"}, "nothing to answer"),
])
def test_a_bad_dialogue_is_named_by_line(tmp_path, row, message):
    path = write_jsonl(tmp_path / "d.jsonl", [{"user": ["fine"]}, row])
    with pytest.raises(data.DataError, match=re.escape(f"{path}:2: {message}")):
        data.read_dialogues(path)


def test_flags_that_go_together(tmp_path, chat_checkpoint, capsys):
    cfg = cfg_for(tmp_path, chat_checkpoint)
    for flags, message in ((["--checkpoint", chat_checkpoint], "--checkpoint (the model that converses) and --dialogues"),
                           ([], "--gen " + str(tmp_path / "none.jsonl") + ": no such file"),
                           (["--checkpoint", chat_checkpoint, "--dialogues", cfg.dialogues, "--gen", cfg.dialogues],
                            "is also an input")):
        argv = ["dialogue", "--gen", str(tmp_path / "none.jsonl"), "--out", cfg.out, *flags]
        assert E.main(argv) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_a_conversation_longer_than_the_context_drops_its_oldest_exchanges(tiny_tokenizer_path):
    tok = load_tokenizer(tiny_tokenizer_path)
    turns = ["the cat sat on a mat " * 8, "river stones hum " * 8, "bright green lamps " * 8, "seven robots", "and?"]
    sizes = {n: len(E.encode_prompt(tok, turns[n:])) for n in (0, 2, 4)}
    seen, dropped = E.fit_context(tok, turns, sizes[0] + 1)
    assert (seen, dropped) == (turns, 0)
    seen, dropped = E.fit_context(tok, turns, sizes[0])  # no room to answer: the oldest exchange goes
    assert (seen, dropped) == (turns[2:], 2)
    assert E.fit_context(tok, turns, sizes[2]) == (turns[4:], 4)


def test_dialogue_rates_and_their_interval_over_dialogues():
    # the paper's zero-shot figures: 19 excellent of 42 responses is 45.2%
    grades = ["excellent"] * 19 + ["pass"] * 8 + ["fail"] * 15
    records = [{"dialogue": i // 5, "turn": i % 5, "grade": g} for i, g in enumerate(grades)]
    s = stats.dialogue_summary(records + [{"dialogue": 99, "turn": 1, "grade": None}], n_boot=200)
    assert s["all"]["counts"] == {"fail": 15, "pass": 8, "excellent": 19} and s["unparseable"] == 1
    assert s["all"]["rate"]["excellent"] == pytest.approx(19 / 42) and round(100 * 19 / 42, 1) == 45.2
    lo, hi = s["all"]["ci"]["excellent"]
    assert lo < 19 / 42 < hi
    # coverage: the interval holds the true rate in most draws, turns of a dialogue correlated
    rng, covered = np.random.default_rng(0), 0
    for t in range(200):
        recs = []
        for d in range(20):
            p = rng.choice([0.2, 0.5, 0.8])  # each dialogue has its own level: mean 0.5
            recs += [{"dialogue": d, "turn": k, "grade": "excellent" if rng.random() < p else "pass"} for k in range(4)]
        lo, hi = stats.dialogue_summary(recs, n_boot=300, seed=t)["all"]["ci"]["excellent"]
        covered += lo <= 0.5 <= hi
    assert covered / 200 >= 0.9


@pytest.mark.parametrize("text, want", [
    ("The response is on topic.\nExcellent", "excellent"), ("reasoning\n**Pass**", "pass"),
    ("reasoning\nGrade: Fail.", "fail"), ("Excellent", "excellent"),
    ("It is excellent, not a fail.\nIt passes.", None), ("Pass or Fail", None), ("", None),
    ("Excellent\nbecause it is complete", None),
])
def test_parse_grade(text, want):
    assert judging.parse_grade(text) == want
