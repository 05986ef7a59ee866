"""evaluate.py: A/B randomisation and its undoing, answer parsing, ties, agreement, bootstrap
coverage, resumable human sessions, file validation; judges are scripted callables, plus one
real tiny checkpoint through the model-judge path."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import checkpoint
import evaluate as E
import judging
import stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def gen_files(tmp_path, n=20, sources=("alpaca", "wikihow"), ids=True):
    """Two generation files on the same n prompts; a's answers say GOOD, b's say BAD."""
    rows_a, rows_b = [], []
    for i in range(n):
        base = {"prompt": f"question {i}?", "source": sources[i % len(sources)], "settings": {}}
        if ids:
            base["id"] = i
        rows_a.append({**base, "response": f"GOOD answer {i}"})
        rows_b.append({**base, "response": f"BAD answer {i}"})
    return write_jsonl(tmp_path / "gen_a.jsonl", rows_a), write_jsonl(tmp_path / "gen_b.jsonl", rows_b[::-1])


def cfg_for(a, b, out, **kw):
    return E.PairwiseConfig(a=a, b=b, out=str(out), **{"judge": "scripted", **kw})


def always(text):
    return lambda questions: [text] * len(questions)


def prefers_good(questions):  # judges by content: whichever displayed answer is file a's
    return ["Answer A is significantly better." if "Answer A: GOOD" in q else
            "Answer B is significantly better." for q in questions]


# ---- parsing ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, want", [
    ("Answer A is significantly better.", "A"),
    ("answer b is significantly better", "B"),
    ("Neither is significantly better.", "tie"),
    ("After weighing both: **Answer B** is significantly better.", "B"),
    # issue 12: a verdict is one of the three option sentences, as a sentence of its own; the
    # lenient readings below were guesses and are now unparseable (they were A, A, B, B, ...)
    ("Answer A is significantly better than answer B.", None),
    ("A", None), ("B.", None), ("(b)", None),
    ("I think Answer A.", None),
    ("Answer B is better because it is complete.", None),
    ("I prefer answer A here.", None),
    ("Verdict: B", None),
    ("A is clearly better", None),
    ("Neither.", None), ("Both answers are equally good.", None), ("It's a tie", None),
    ("Neither one is better.", None),
    ("Neither answer is perfect, but B is better.", None),
    ("The better answer is Answer B: it is complete.", None),
    ("Answer A: too short. Answer: B", None),
    # the option sentences, tolerantly read
    ('"Answer B is significantly better."', "B"), ("**Neither is significantly better**", "tie"),
    ("  answer a is SIGNIFICANTLY   better  ", "A"), ("Verdict: Answer A is significantly better.", "A"),
    ("- Answer B is significantly better.", "B"), ("1) Neither is significantly better.", "tie"),
    ("\u201cAnswer A is significantly better.\u201d", "A"), ("`Answer B is significantly better`", "B"),
    ("Both are decent.\nAnswer B is significantly better.\nIt is complete.", "B"),
    ("Answer A is significantly better. Answer A is significantly better.", "A"),  # repeated: agrees
    # an option sentence's words inside a longer sentence are not a verdict
    ("Neither answer A nor answer B is significantly better.", None),
    ("Answer B is significantly worse.", None),
    ("I think answer B is significantly better.", None),
    ("Answer B is significantly better, because it is complete.", None),
    ("It is not true that Answer A is significantly better.", None),
    # conflicts and garbage: unparseable, never guessed
    ("Answer A is significantly better. Answer B is significantly better.", None),
    ("- Answer A is significantly better.\n- Answer B is significantly better.\n"
     "- Neither is significantly better.", None),
    ("Answer A explains tea, answer B explains maps.", None),
    ("A good answer would mention a map.", None),
    ("Neither answer is perfect.", None),
    ("I prefer a shorter reply.", None),
    ("cat sat mat river", None), ("", None),
])
def test_parse_preference(text, want):
    assert E.parse_preference(text) == want


@pytest.mark.parametrize("text, want", [
    ("The answer is clear and complete.\nIt lacks detail.\n3\n3", 3),
    ("reasoning...\n\n**5**\n", 5), ("Score: 6", 6), ("4/6", 4), ("rating: 2 out of 6", 2),
    ("I would give it a 5 overall.", None), ("reasoning\n7", None), ("reasoning\n10", None),
    ("1", 1), ("", None), ("5 is my score\nreasons", None),
])
def test_parse_score(text, want):
    assert E.parse_score(text) == want


def test_undo_order():
    assert [E.undo_order(s, "AB") for s in ("A", "B", "tie", None)] == ["a", "b", "tie", None]
    assert [E.undo_order(s, "BA") for s in ("A", "B", "tie", "skip")] == ["b", "a", "tie", "skip"]


# ---- A/B randomisation ------------------------------------------------------------------------

def test_always_A_judge_wins_half_not_all(tmp_path):
    a, b = gen_files(tmp_path, n=300)
    records = E.run_pairwise(cfg_for(a, b, tmp_path / "j.jsonl"), judge=always("Answer A is significantly better."))
    assert len(records) == 300
    for r in records:  # "A" means file a exactly when a was shown first
        assert r["label"] == ("a" if r["order"] == "AB" else "b")
    s = E.pairwise_summary(records, n_boot=200)
    assert 0.4 < s["all"]["rate"]["a"] < 0.6
    assert s["shown_first"] == (1.0, 300)


def test_order_undone_for_a_content_judge(tmp_path):
    a, b = gen_files(tmp_path, n=100)
    records = E.run_pairwise(cfg_for(a, b, tmp_path / "j.jsonl"), judge=prefers_good)
    assert {r["order"] for r in records} == {"AB", "BA"}
    assert all(r["label"] == "a" for r in records)
    s = E.pairwise_summary(records, n_boot=200)
    assert s["all"]["rate"]["a"] == 1.0 and s["all"]["ci"]["a"] == (1.0, 1.0)


def test_both_orders_cancel_position_bias(tmp_path):
    a, b = gen_files(tmp_path, n=50)
    records = E.run_pairwise(cfg_for(a, b, tmp_path / "j.jsonl", both_orders=True),
                             judge=always("Answer A is significantly better."))
    assert len(records) == 100
    per_id = {}
    for r in records:
        per_id.setdefault(r["id"], set()).add(r["order"])
    assert all(orders == {"AB", "BA"} for orders in per_id.values())
    s = E.pairwise_summary(records, n_boot=200)
    assert s["all"]["rate"]["a"] == s["all"]["rate"]["b"] == 0.5  # exactly, every prompt
    assert s["all"]["counts"]["a"] == 25.0
    assert s["order_consistency"] == (0.0, 50)


def test_order_is_seeded_and_recorded(tmp_path):
    a, b = gen_files(tmp_path, n=60)
    orders = {}
    for name, seed in (("s0", 0), ("s0_again", 0), ("s1", 1)):
        recs = E.run_pairwise(cfg_for(a, b, tmp_path / f"{name}.jsonl", seed=seed), judge=always("A"))
        assert all(r["seed"] == seed for r in recs)
        orders[name] = {r["id"]: r["order"] for r in recs}
    assert orders["s0"] == orders["s0_again"]
    assert orders["s0"] != orders["s1"]


# ---- ties, unparseable ------------------------------------------------------------------------

def test_ties_and_equal_or_preferred(tmp_path):
    a, b = gen_files(tmp_path, n=30)
    records = E.run_pairwise(cfg_for(a, b, tmp_path / "j.jsonl"), judge=always("Neither is significantly better."))
    s = E.pairwise_summary(records, n_boot=200)
    assert s["all"]["rate"] == {"a": 0.0, "tie": 1.0, "b": 0.0, "a_equal_or_preferred": 1.0}

    # hand-made: 4 a, 3 tie, 2 b, 1 unparseable -> rates over the 9 parsed prompts
    labels = ["a"] * 4 + ["tie"] * 3 + ["b"] * 2 + [None]
    recs = [{"id": i, "prompt": f"q{i}", "order": "AB", "label": lab, "source": "x"} for i, lab in enumerate(labels)]
    s = E.pairwise_summary(recs, n_boot=200)
    assert s["unparseable"] == 1 and s["judged_prompts"] == 9
    assert s["all"]["counts"] == {"a": 4, "tie": 3, "b": 2}
    assert s["all"]["rate"]["a_equal_or_preferred"] == pytest.approx(7 / 9)
    assert s["all"]["rate"]["b"] == pytest.approx(2 / 9)


def test_unparseable_answers_are_kept_counted_and_reported(tmp_path, capsys):
    a, b = gen_files(tmp_path, n=20)
    replies = iter(["Answer A is significantly better.", "no idea, both are fine-ish", ""] * 10)
    judge = lambda qs: [next(replies) for _ in qs]  # noqa: E731
    out = tmp_path / "j.jsonl"
    records = E.run_pairwise(cfg_for(a, b, out, batch_size=3), judge=judge)
    assert len(records) == 20  # nothing dropped
    nulls = [r for r in records if r["label"] is None]
    assert len(nulls) == 13 and {r["raw"] for r in nulls} == {"no idea, both are fine-ish", ""}
    assert E.main(["report", str(out), "--bootstrap", "100"]) == 0
    assert "13 unparseable" in capsys.readouterr().out


# ---- agreement --------------------------------------------------------------------------------

def judgements(labels, a="x.jsonl", b="y.jsonl", orders=None):
    return [{"id": i, "prompt": f"q{i}", "order": (orders or ["AB"] * len(labels))[i], "label": lab,
             "a": a, "b": b} for i, lab in enumerate(labels)]


def test_agreement_hand_computed():
    assert [stats.agreement_score(*p) for p in (("a", "a"), ("tie", "tie"), ("a", "tie"), ("tie", "b"), ("a", "b"))] \
        == [1, 1, 0.5, 0.5, 0]
    j1 = judgements(["a", "b", "tie", "a", "tie", "b", None])
    j2 = judgements(["a", "a", "tie", "tie", "b", "b", "a"])
    res = E.agreement(j1, j2, n_boot=200)
    assert res["shared"] == 6  # the unparseable one is left out
    assert res["score"] == pytest.approx((1 + 0 + 1 + 0.5 + 0.5 + 1) / 6)
    assert res["confusion"][("b", "a")] == 1 and res["confusion"][("a", "a")] == 1

    # the same systems with a and b swapped: labels are flipped before comparing
    j3 = judgements(["b", "b", "tie", "tie", "a", "a", "b"], a="y.jsonl", b="x.jsonl")
    res3 = E.agreement(j1, j3, n_boot=200)
    assert res3["flipped"] and res3["score"] == pytest.approx(res["score"])


def test_agreement_with_both_orders_averages_cross_pairs():
    j1 = [{"id": 0, "prompt": "q", "order": "AB", "label": "a", "a": "x", "b": "y"},
          {"id": 0, "prompt": "q", "order": "BA", "label": "tie", "a": "x", "b": "y"}]
    j2 = [{"id": 0, "prompt": "q", "order": "BA", "label": "a", "a": "x", "b": "y"}]
    assert E.agreement(j1, j2, n_boot=50)["score"] == pytest.approx(0.75)


def test_agreement_cli(tmp_path, capsys):
    p1 = write_jsonl(tmp_path / "1.jsonl", judgements(["a", "b", "tie", "a"]))
    p2 = write_jsonl(tmp_path / "2.jsonl", judgements(["a", "a", "b", "a"]))
    assert E.main(["agreement", p1, p2, "--bootstrap", "100"]) == 0
    assert "agreement: 62.5%" in capsys.readouterr().out


# ---- confidence intervals ---------------------------------------------------------------------

def test_pairwise_ci_covers_the_truth():
    rng = np.random.default_rng(0)
    truth = {"a": 0.45, "tie": 0.15, "b": 0.40}
    covered = {"a": 0, "a_equal_or_preferred": 0}
    trials = 200
    for t in range(trials):
        labels = rng.choice(list(truth), size=80, p=list(truth.values()))
        recs = [{"id": i, "prompt": str(i), "order": "AB", "label": str(x)} for i, x in enumerate(labels)]
        ci = E.pairwise_summary(recs, n_boot=400, seed=t)["all"]["ci"]
        covered["a"] += ci["a"][0] <= 0.45 <= ci["a"][1]
        covered["a_equal_or_preferred"] += ci["a_equal_or_preferred"][0] <= 0.60 <= ci["a_equal_or_preferred"][1]
    for name, n in covered.items():
        assert n / trials >= 0.9, (name, n)


def test_helpfulness_ci_covers_the_truth():
    rng = np.random.default_rng(1)
    covered, trials = 0, 200
    for t in range(trials):
        # each prompt has its own level 2..5; its 5 samples scatter by -1..1 around it: mean 3.5
        recs = [{"id": i, "prompt": str(i), "sample": k, "score": int(level + rng.integers(-1, 2))}
                for i, level in enumerate(rng.integers(2, 6, size=60)) for k in range(5)]
        lo, hi = E.helpfulness_summary(recs, n_boot=400, seed=t)["all"]["ci"]
        covered += lo <= 3.5 <= hi
    assert covered / trials >= 0.9


# ---- the human judge --------------------------------------------------------------------------

def scripted_input(keys, stop=EOFError):
    """input() stand-in: answers from keys, then raises stop (the session ends mid-way)."""
    keys = iter(keys)

    def ask(prompt=""):
        try:
            return next(keys)
        except StopIteration:
            raise stop from None
    return ask


def test_human_session_stops_and_resumes(tmp_path):
    a, b = gen_files(tmp_path, n=12)
    cfg = cfg_for(a, b, tmp_path / "human.jsonl", judge="human", both_orders=True)  # 24 pairs
    shown = []
    first = E.run_pairwise(cfg, ask=scripted_input(["a", "x", "b", "t", "s", "a"]), show=shown.append)
    assert len(first) == 5  # "x" was refused and asked again
    assert any("1/24" in line for line in shown) and any("5/24" in line for line in shown)
    assert [r["raw"] for r in first] == ["a", "b", "t", "s", "a"]
    assert first[3]["label"] == "skip"
    second = E.run_pairwise(cfg, ask=scripted_input(["b"] * 7, stop=KeyboardInterrupt), show=shown.append)
    assert any("6/24" in line for line in shown)
    third = E.run_pairwise(cfg, ask=scripted_input(["q"]), show=lambda *_: None)
    assert len(second) == len(third) == 12
    last = E.run_pairwise(cfg, ask=scripted_input(["t"] * 100), show=lambda *_: None)
    keys = [(r["id"], r["order"]) for r in last]
    assert len(keys) == len(set(keys)) == 24  # every pair exactly once, skips not repeated
    for r in last:  # what was typed, with the display order undone
        assert r["label"] == {"t": "tie", "s": "skip"}.get(r["raw"]) or \
            r["label"] == E.undo_order(r["raw"].upper(), r["order"])


def test_human_session_killed_resumes_without_repeat_or_loss(tmp_path):
    a, b = gen_files(tmp_path, n=8)
    out = tmp_path / "human.jsonl"
    cmd = [sys.executable, os.path.join(ROOT, "evaluate.py"), "pairwise", "--a", a, "--b", b,
           "--judge", "human", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, text=True)
    proc.stdin.write("a\nb\nt\n")
    proc.stdin.flush()
    deadline = time.time() + 30
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: only what was fsynced survives
    proc.wait()
    assert out.read_text().count("\n") == 3
    with open(out, "a") as f:  # and as if it died half-way through writing the 4th
        f.write('{"id": 3, "prompt": "question 3?", "ord')
    done = subprocess.run(cmd, input="a\n" * 5 + "b\n" * 10, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "half-written" in done.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == list(range(8))
    assert [r["raw"] for r in records] == ["a", "b", "t"] + ["a"] * 5


def test_resume_refuses_other_settings(tmp_path):
    a, b = gen_files(tmp_path, n=5)
    out = tmp_path / "j.jsonl"
    E.run_pairwise(cfg_for(a, b, out, seed=0), judge=always("A"))
    with pytest.raises(E.EvalError, match="seed=0"):
        E.run_pairwise(cfg_for(a, b, out, seed=1), judge=always("A"))


# ---- file validation --------------------------------------------------------------------------

GOOD = {"id": 0, "prompt": "p0", "response": "r", "source": "s", "settings": {}}


@pytest.mark.parametrize("rows_b, message", [
    ([GOOD, {"id": 1, "prompt": "p1", "settings": {}}], "gen_b.jsonl:2: missing field 'response'"),
    ([GOOD, {"id": 1, "response": "r"}], "gen_b.jsonl:2: missing field 'prompt'"),
    ([GOOD, '{"id": 1, "prompt": "p1", "response": '], "gen_b.jsonl:2: invalid JSON"),
    ([GOOD, "[1, 2]"], "gen_b.jsonl:2: expected a JSON object"),
    ([GOOD, {"id": 1, "prompt": 7, "response": "r"}], "gen_b.jsonl:2: 'prompt' must be"),
    ([GOOD, {"id": 5, "prompt": "p1", "response": "r"}], "gen_a.jsonl:2: id 1 has no response in"),
    ([GOOD, {"id": 1, "prompt": "something else", "response": "r"}],
     "gen_b.jsonl:2: id 1 has a different prompt than"),
    ([GOOD, {"id": 1, "prompt": "p1", "response": "r"}, {"id": 1, "prompt": "p1", "response": "s"}],
     "gen_b.jsonl:3: id 1 appears again (first at"),
    ([GOOD], "gen_a.jsonl:2: id 1 has no response in"),
])
def test_malformed_generation_files_fail_with_file_and_line(tmp_path, capsys, rows_b, message):
    a = write_jsonl(tmp_path / "gen_a.jsonl", [GOOD, {"id": 1, "prompt": "p1", "response": "r"}])
    b = write_jsonl(tmp_path / "gen_b.jsonl", rows_b)
    assert E.main(["pairwise", "--a", a, "--b", b, "--judge", "human", "--out", str(tmp_path / "j.jsonl")]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "j.jsonl").exists()


def test_prompts_matched_by_text_without_ids(tmp_path):
    a, b = gen_files(tmp_path, n=10, ids=False)
    records = E.run_pairwise(cfg_for(a, b, tmp_path / "j.jsonl"), judge=prefers_good)
    assert len(records) == 10 and all(r["id"] is None and r["label"] == "a" for r in records)
    rows = [json.loads(x) for x in open(b)]
    rows[4]["prompt"] = "a question nobody asked"
    write_jsonl(tmp_path / "gen_b.jsonl", rows)
    with pytest.raises(E.EvalError, match=r"gen_a.jsonl:\d+: prompt .* has no response in"):
        E.pair_generations(a, b)


# ---- helpfulness ------------------------------------------------------------------------------

def test_helpfulness_scripted(tmp_path, capsys):
    rows = [{"id": i, "prompt": f"q{i}", "response": f"r{i}.{k}", "source": "s"} for i in range(6) for k in range(3)]
    gen = write_jsonl(tmp_path / "samples.jsonl", rows)
    replies = iter(["step by step...\n4", "fine\n\n**5**", "no score here"] * 6)
    cfg = E.HelpfulnessConfig(gen=gen, judge="scripted", out=str(tmp_path / "grades.jsonl"), bootstrap=100)
    grades = E.run_helpfulness(cfg, judge=lambda qs: [next(replies) for _ in qs])
    assert len(grades) == 18 and [g["sample"] for g in grades[:3]] == [0, 1, 2]
    assert all("[Submission]: r" in q for q in [E.HELPFULNESS_PROMPT.format(task="t", submission="r")])
    s = E.helpfulness_summary(grades, n_boot=100)
    assert s["unparseable"] == 6 and s["all"]["mean"] == 4.5 and s["histogram"][5] == 6
    assert E.run_helpfulness(cfg, judge=lambda qs: pytest.fail("nothing left to grade")) == grades
    assert E.main(["report", cfg.out, "--bootstrap", "100"]) == 0
    out = capsys.readouterr().out
    assert "4.50" in out and "6 unparseable" in out


# ---- report, chart, trimming ------------------------------------------------------------------

def test_report_table_and_text_chart(tmp_path, capsys):
    a, b = gen_files(tmp_path, n=40)
    out = tmp_path / "j.jsonl"
    E.run_pairwise(cfg_for(a, b, out), judge=prefers_good)
    png = tmp_path / "chart.png"
    assert E.main(["report", str(out), "--chart", str(png), "--bootstrap", "100"]) == 0
    captured = capsys.readouterr()
    assert "source alpaca" in captured.out and "source wikihow" in captured.out
    assert "|" + "#" * 40 + "|" in captured.out  # a wins everything
    try:
        import matplotlib  # noqa: F401
        assert png.exists()
    except ImportError:
        assert "matplotlib is not installed" in captured.err and not png.exists()


def test_long_answers_are_trimmed_to_the_judge_context(tmp_path):
    class WordJudge:  # a judge whose "tokens" are words and whose context holds 120 of them
        budget = 120
        n_tokens = staticmethod(lambda text: len(text.split()))
        trim = staticmethod(lambda text, n: text if len(text.split()) <= n else " ".join(text.split()[:n]) + " [...]")

    q, trimmed = E.fit_question(E.PAIRWISE_QUESTION.format, WordJudge(), prompt="short?",
                                answer_a="tiny answer", answer_b="word " * 500)
    assert trimmed and 100 < WordJudge.n_tokens(q) <= 120
    assert "Answer A: tiny answer\n" in q and "[...]" in q
    q, trimmed = E.fit_question(E.PAIRWISE_QUESTION.format, WordJudge(), prompt="p", answer_a="x", answer_b="y")
    assert not trimmed


# ---- a real (tiny, random) judge checkpoint ---------------------------------------------------

def test_tiny_judge_checkpoint_end_to_end(tmp_path, tiny_tokenizer_path, capsys):
    import torch
    from model import Transformer, model_args
    from tokenizer import load_tokenizer
    tok = load_tokenizer(tiny_tokenizer_path)
    torch.manual_seed(0)
    # the tiny tokenizer spells most of the paper's prompts byte by byte: the 1-6 rubric alone
    # is ~2150 tokens, so this judge's context is just long enough for it
    judge = Transformer(model_args("debug", vocab_size=tok.vocab_size, max_seq_len=2304))
    judge.init_weights()
    ckpt = str(tmp_path / "judge")
    checkpoint.save_model(judge, ckpt, tokenizer_path=tiny_tokenizer_path)

    a, b = gen_files(tmp_path, n=4)
    rows = [json.loads(x) for x in open(a)]
    rows[2]["response"] = "the cat sat on a mat " * 1000  # ~6k tokens: must be trimmed to fit
    write_jsonl(tmp_path / "gen_a.jsonl", rows)
    out = tmp_path / "judge.jsonl"
    flags = ["--judge", ckpt, "--max_new_tokens", "8", "--batch_size", "4", "--bootstrap", "100"]
    assert E.main(["pairwise", "--a", a, "--b", b, "--out", str(out), "--both_orders", *flags]) == 0
    records = [json.loads(x) for x in open(out)]
    assert len(records) == 8 and all(isinstance(r["raw"], str) for r in records)
    assert [r["id"] for r in records if r.get("trimmed")] == [2, 2]  # both orders of the long one
    assert all(r["raw"] != judging.TOO_LONG for r in records)
    # a random model's replies are garbage: counted as unparseable, none dropped
    n_null = sum(r["label"] is None for r in records)
    assert n_null >= 6
    assert f"{n_null} unparseable" in capsys.readouterr().out

    gen = write_jsonl(tmp_path / "samples.jsonl", [rows[0], rows[0]])  # one prompt, two samples
    grades = tmp_path / "grades.jsonl"
    assert E.main(["helpfulness", "--gen", gen, "--out", str(grades), *flags]) == 0
    graded = [json.loads(x) for x in open(grades)]
    assert [g["sample"] for g in graded] == [0, 1] and all(g["raw"] != judging.TOO_LONG for g in graded)
    n_null = sum(g["score"] is None for g in graded)
    assert f"{n_null} unparseable" in capsys.readouterr().out


def test_generation_files_written_by_sample_py(tmp_path, tiny_tokenizer_path):
    """The real producer: `sample.py --prompt_file ... --out`, LIMA-style prompts (one of them
    multi-turn), answered by two 'systems'; a prompt listed twice is two samples."""
    import torch
    import sample
    from model import Transformer, model_args
    from tokenizer import load_tokenizer
    tok = load_tokenizer(tiny_tokenizer_path)
    torch.manual_seed(0)
    chat = Transformer(model_args("debug", vocab_size=tok.vocab_size))
    chat.init_weights()
    ckpt = str(tmp_path / "chat")
    checkpoint.save_model(chat, ckpt, tokenizer_path=tiny_tokenizer_path)
    prompts = write_jsonl(tmp_path / "test.jsonl", [
        {"conversations": ["the cat sat"], "source": "alpaca"},
        {"conversations": ["seven happy robots", "hum quietly", "and then?"], "source": "multi_turn"},
        {"conversations": ["tea or maps?"], "source": "wikihow"}])
    gens = []
    for seed in (1, 2):
        gens.append(str(tmp_path / f"gen_{seed}.jsonl"))
        sample.main(["--checkpoint", ckpt, "--prompt_file", prompts, "--out", gens[-1],
                     "--max_new_tokens", "6", "--seed", str(seed), "--device", "cpu"])
    records = E.run_pairwise(cfg_for(*gens, tmp_path / "j.jsonl"), judge=always("Answer B is significantly better."))
    assert sorted(r["source"] for r in records) == ["alpaca", "multi_turn", "wikihow"]
    multi = next(r for r in records if r["source"] == "multi_turn")
    assert multi["prompt"] == "User: seven happy robots\n\nAssistant: hum quietly\n\nUser: and then?"

    twice = write_jsonl(tmp_path / "twice.jsonl", [json.loads(x) for x in open(prompts)] * 2)
    sample.main(["--checkpoint", ckpt, "--prompt_file", twice, "--out", str(tmp_path / "samples.jsonl"),
                 "--max_new_tokens", "6", "--seed", "3", "--device", "cpu"])
    cfg = E.HelpfulnessConfig(gen=str(tmp_path / "samples.jsonl"), judge="scripted", out=str(tmp_path / "g.jsonl"))
    grades = E.run_helpfulness(cfg, judge=always("fine\n3"))
    assert sorted((g["source"], g["sample"]) for g in grades) == sorted(
        (s, k) for s in ("alpaca", "multi_turn", "wikihow") for k in (0, 1))
    with pytest.raises(E.EvalError, match="appears again"):  # pairwise: one response per prompt
        E.pair_generations(str(tmp_path / "samples.jsonl"), gens[0])


# ---- issue 12: bad input, faults and interruptions ---------------------------------------------

def test_pairwise_refuses_a_system_compared_with_itself(tmp_path, capsys):
    a, b = gen_files(tmp_path, n=4)
    out = tmp_path / "j.jsonl"
    copy = tmp_path / "copy_of_a.jsonl"
    copy.write_bytes(open(a, "rb").read())
    for other, what in ((a, "the same file"), (copy, "the same generations (identical files)")):
        assert E.main(["pairwise", "--a", a, "--b", str(other), "--judge", "human", "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert f"--a {a} and --b {other} are {what}" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("case", ["dir", "input"])
def test_out_must_be_a_file_of_its_own(tmp_path, capsys, case):
    a, b = gen_files(tmp_path, n=4)
    before = open(b).read()
    out = tmp_path / "outdir" if case == "dir" else b
    if case == "dir":
        out.mkdir()
    assert E.main(["pairwise", "--a", a, "--b", b, "--judge", "human", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert ("is a directory" if case == "dir" else f"is also an input ({b})") in err
    assert open(b).read() == before


def test_a_second_session_on_the_same_out_is_refused(tmp_path, capsys):
    import files
    a, b = gen_files(tmp_path, n=4)
    out = tmp_path / "j.jsonl"
    argv = ["pairwise", "--a", a, "--b", b, "--judge", "human", "--out", str(out)]
    with files.lock(out):  # another annotator's session on this file, still open
        assert E.main(argv) == 1
    assert "is being written by another process" in capsys.readouterr().err and not out.exists()
    rows = [{"id": i, "prompt": f"q{i}", "response": "r"} for i in range(3)]
    gen = write_jsonl(tmp_path / "s.jsonl", rows)
    grades = tmp_path / "g.jsonl"
    with files.lock(grades):
        assert E.main(["helpfulness", "--gen", gen, "--judge", "x", "--out", str(grades)]) == 1
    assert "is being written by another process" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["report", "j.jsonl", "--bootstrap", "0"], ["agreement", "1.jsonl", "2.jsonl", "--bootstrap", "-3"],
    ["pairwise", "--a", "a", "--b", "b", "--out", "o", "--bootstrap", "0"],
    ["helpfulness", "--gen", "g", "--judge", "j", "--out", "o", "--bootstrap", "0"],
])
def test_bootstrap_zero_is_refused_by_name(capsys, argv):
    with pytest.raises(SystemExit) as e:
        E.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--bootstrap" in err and "must be at least 1" in err


@pytest.mark.parametrize("argv, message", [
    (["--batch_size", "0"], "--batch_size 0: must be at least 1"),
    (["--dtype", "fp16"], "--dtype 'fp16': must be one of auto, float32, bfloat16, float16"),
    (["--max_new_tokens", "-1"], "--max_new_tokens -1: must be at least 1"),
])
def test_judge_flags_are_range_checked(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        E.main(["pairwise", "--a", "a", "--b", "b", "--out", "o", "--judge", "ckpt", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_ctrl_c_says_what_was_kept_and_how_to_continue(tmp_path, capsys, monkeypatch):
    a, b = gen_files(tmp_path, n=10)
    out = tmp_path / "j.jsonl"
    asked = []

    def judge_interrupted_in_the_third_batch(questions):
        asked.append(1)
        if len(asked) == 3:
            raise KeyboardInterrupt
        return ["Answer A is significantly better."] * len(questions)

    judge_interrupted_in_the_third_batch.batch_size = 2
    monkeypatch.setattr(E, "load_judge", lambda cfg: judge_interrupted_in_the_third_batch)
    argv = ["pairwise", "--a", a, "--b", b, "--judge", "some/ckpt", "--out", str(out)]
    assert E.main(argv) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (f"evaluate.py pairwise: interrupted; 4 judgements are saved "
                                            f"in {out}. To continue: python evaluate.py {' '.join(argv)}")
    monkeypatch.setattr(E, "load_judge", lambda cfg: always("Neither is significantly better."))
    assert E.main(argv) == 0
    assert len([json.loads(x) for x in open(out)]) == 10

    gen = write_jsonl(tmp_path / "s.jsonl", [{"id": i, "prompt": f"q{i}", "response": "r"} for i in range(5)])
    asked.clear()
    monkeypatch.setattr(E, "load_judge", lambda cfg: judge_interrupted_in_the_third_batch)
    argv = ["helpfulness", "--gen", gen, "--judge", "j", "--out", str(tmp_path / "g.jsonl")]
    assert E.main(argv) == 130
    assert "interrupted; 4 grades are saved in" in capsys.readouterr().err

    monkeypatch.setattr(E, "run_report", lambda cfg, paths: (_ for _ in ()).throw(KeyboardInterrupt))
    assert E.main(["report", str(out)]) == 130
    assert "evaluate.py report: interrupted; nothing was written" in capsys.readouterr().err


def test_full_disk_keeps_every_judgement(tmp_path, capsys, monkeypatch):
    import errno
    a, b = gen_files(tmp_path, n=6)
    out = str(tmp_path / "j.jsonl")
    real_write, n = os.write, []

    def fills_up(fd, buf):
        if os.readlink(f"/proc/self/fd/{fd}") == out:
            n.append(1)
            if len(n) == 4:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, buf)

    monkeypatch.setattr(os, "write", fills_up)
    monkeypatch.setattr(E, "load_judge", lambda cfg: prefers_good)
    argv = ["pairwise", "--a", a, "--b", b, "--judge", "j", "--out", out, "--batch_size", "1"]
    assert E.main(argv) == 1
    err = capsys.readouterr().err
    assert "the disk is full" in err and f"kept in {out}" in err
    assert len(open(out).read().splitlines()) == 3
    monkeypatch.setattr(os, "write", real_write)
    assert E.main(argv) == 0 and len(open(out).read().splitlines()) == 6


def test_judge_with_another_tokenizer_of_the_same_size_is_refused(tmp_path, tiny_tokenizer_path, capsys):
    import torch
    from conftest import train_tiny_tokenizer
    from model import Transformer, model_args
    from tokenizer import load_tokenizer
    tok = load_tokenizer(tiny_tokenizer_path)
    ckpt = str(tmp_path / "judge")
    checkpoint.save_model(Transformer(model_args("debug", vocab_size=tok.vocab_size)), ckpt,
                          tokenizer_path=tiny_tokenizer_path)
    other = train_tiny_tokenizer(str(tmp_path), seed=1)
    a, b = gen_files(tmp_path, n=2)
    out = tmp_path / "j.jsonl"
    assert E.main(["pairwise", "--a", a, "--b", b, "--judge", ckpt, "--tokenizer", other,
                   "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{other} (sha256" in err and "is not the tokenizer" in err and "Traceback" not in err
    del torch


def test_bootstrap_without_resamples_is_a_clear_error():
    with pytest.raises(ValueError, match="at least one resample"):
        stats.bootstrap_ci([1.0, 0.0], n_boot=0)
