"""evaluate.py serve (annotate.py): the paper's human studies in a browser. The server runs on
127.0.0.1 in a thread, spoken to over HTTP with urllib: labels land in the judgement files the
terminal writes (the same records) and report / agreement read; a changed label supersedes the
old one; several annotators at once lose nothing; a restart resumes; an answer's HTML is data,
never markup; a token, when required, is required. The browser test drives the distribution's
headless Chromium with selenium, and is skipped (with the reason) where either is missing."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest

import annotate
import evaluate as E
import files
import judging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVIL = ("BAD answer: <script>window.__pwned = 1</script> <img src=x onerror=\"window.__pwned = 2\"> "
        "[click me](javascript:window.__pwned=3) <b>bold?</b>")
MARKDOWN = "GOOD answer, **in bold** and `code`:\n\n- one\n- two\n\n```\n<i>kept as text</i>\n```"


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def read(path):
    return [json.loads(line) for line in open(path)]


def gen_files(tmp_path, n=6):
    """Two generation files on the same n prompts; a's answers are Markdown, b's hold HTML and a
    javascript: link."""
    base = [{"id": i, "prompt": f"question {i}?", "source": "alpaca" if i % 2 else "wikihow"} for i in range(n)]
    a = write_jsonl(tmp_path / "gen_a.jsonl", [{**r, "response": f"{MARKDOWN} ({r['id']})"} for r in base])
    b = write_jsonl(tmp_path / "gen_b.jsonl", [{**r, "response": f"{EVIL} ({r['id']})"} for r in base])
    return a, b


def pairwise(a, b, seed=0, both_orders=False):
    return annotate.pairwise_study(judging.pairwise_items(E.pair_generations(a, b), seed, both_orders), seed, a, b)


DIALOGUE_TURNS = [  # (dialogue, number of turns)
    ("d1", 3), ("d2", 1), ("d3", 2), ("d4", 2)]


def dialogue_gen(tmp_path):
    """Responses as evaluate.py dialogue writes them: in rounds (every dialogue's turn 1, then 2, ...)."""
    rows = []
    for k in range(1, max(n for _, n in DIALOGUE_TURNS) + 1):
        for d, n in DIALOGUE_TURNS:
            if k <= n:
                context = [x for r in rows if r["dialogue"] == d for x in (r["prompt"], r["response"])]
                rows.append({"dialogue": d, "turn": k, "source": "authors", "context": context,
                             "prompt": f"{d} message {k}", "response": f"{d} answer {k} <script>x()</script>"})
    return write_jsonl(tmp_path / "dialogue_gen.jsonl", rows)


@contextmanager
def running(study, out_dir, **kw):
    """The study served on 127.0.0.1 (a free port) in a thread; its log lines in server.lines."""
    server = annotate.StudyServer(study, str(out_dir), port=0, **kw)
    server.lines = []
    server.log = server.lines.append
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        thread.join()
        server.close()


NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 is reached directly


def call(server, path, body=None, headers=None, raw=None, host="127.0.0.1"):
    """-> (status, headers, decoded body: JSON when the server sent JSON)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    head = {"Content-Type": "application/json"} if data is not None else {}
    req = urllib.request.Request(f"http://{host}:{server.port}{path}", data=data, headers={**head, **(headers or {})})
    try:
        with NO_PROXY.open(req, timeout=30) as r:
            status, hdrs, content = r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        status, hdrs, content = e.code, e.headers, e.read()
    if (hdrs.get("Content-Type") or "").startswith("application/json"):
        return status, hdrs, json.loads(content)
    return status, hdrs, content.decode()


def item(server, name, n=None):
    status, _, view = call(server, f"/api/item?name={name}" + ("" if n is None else f"&n={n}"))
    assert status == 200, view
    return view


def label(server, name, n, key, ref=None):
    ref = ref or item(server, name, n)["ref"]
    return call(server, "/api/label", {"name": name, "n": n, "ref": ref, "key": key})


# ---- labels land in the terminal's judgement files ----------------------------------------------

def test_labels_are_the_terminal_records_and_report_reads_them(tmp_path, capsys):
    a, b = gen_files(tmp_path)
    with running(pairwise(a, b), tmp_path / "study") as server:
        first = item(server, "alice")
        assert (first["n"], first["done"], first["total"], first["label"]) == (0, 0, 6, None)
        for n in range(6):
            status, _, view = label(server, "alice", n, "a")
            assert status == 200 and view["done"] == n + 1
        assert view["n"] is None  # all labelled
        assert any(line.startswith("alice: 6 of 6 labelled") for line in server.lines)
    web = read(tmp_path / "study" / "alice.jsonl")
    # the terminal session of the same person, pressing a for every pair
    terminal = tmp_path / "terminal.jsonl"
    E.run_pairwise(E.PairwiseConfig(a=a, b=b, out=str(terminal), judge="human", judge_name="alice"),
                   ask=lambda prompt: "a", show=lambda *args: None)
    assert sorted(map(json.dumps, web)) == sorted(map(json.dumps, read(terminal)))
    # "a" pressed means the answer shown as A, whichever file it came from
    assert {(r["order"], r["label"]) for r in web} <= {("AB", "a"), ("BA", "b")}
    assert len({r["order"] for r in web}) == 2
    capsys.readouterr()
    assert E.main(["report", str(tmp_path / "study" / "alice.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "6 prompts, 6 judgements: 0 unparseable" in out and "alice" in out


def test_each_annotator_has_their_own_seeded_order_and_the_studys_ab_orders(tmp_path):
    a, b = gen_files(tmp_path, n=12)
    study = pairwise(a, b, seed=3)
    alice, bob = annotate.annotator_order(study, "alice"), annotate.annotator_order(study, "bob")
    assert sorted(alice) == sorted(bob) == list(range(12)) and alice != bob
    assert alice == annotate.annotator_order(study, "alice")  # the same every time
    assert alice != annotate.annotator_order(pairwise(a, b, seed=4), "alice")
    with running(study, tmp_path / "study") as server:
        views = [item(server, "bob", n) for n in range(12)]
    # bob's n-th item is the pair bob's order names, in the A/B order the terminal shows it
    items = judging.pairwise_items(E.pair_generations(a, b), 3, False)
    for view, i in zip(views, bob):
        pair, order = items[i]
        assert view["item"]["answers"] == list(judging.shown_answers(pair, order))
        assert view["item"]["prompt"] == pair.prompt


def test_dialogue_grades_are_the_terminal_records_and_turns_stay_in_order(tmp_path, capsys):
    gen = dialogue_gen(tmp_path)
    study = annotate.dialogue_study(E.data.read_dialogue_turns(gen), 0, gen)
    with running(study, tmp_path / "study") as server:
        views = [item(server, "bob", n)["item"] for n in range(8)]
        for n in range(8):
            assert label(server, "bob", n, "pfe"[n % 3])[0] == 200
        f = call(server, "/api/study")[2]["options"][0]
        assert f == {"key": "f", "shortcut": "1", "text": "Fail: the response does not meet the requirements of "
                                                         "the user's message."}
    seen = [(v["dialogue"], v["turn"]) for v in views]
    for d, n in DIALOGUE_TURNS:  # each dialogue's turns together, first to last
        start = seen.index((d, 1))
        assert seen[start:start + n] == [(d, k) for k in range(1, n + 1)]
    assert views[seen.index(("d1", 2))]["context"] == ["d1 message 1", "d1 answer 1 <script>x()</script>"]
    web = read(tmp_path / "study" / "bob.jsonl")
    assert [r["grade"] for r in web] == [{"p": "pass", "f": "fail", "e": "excellent"}["pfe"[n % 3]] for n in range(8)]
    # the terminal session of the same person giving each response the same grade
    answers, shown = {s: "pfe"[n % 3] for n, s in enumerate(seen)}, []

    def show(text):
        m = re.search(r"dialogue (\w+), turn (\d+)", text)
        if m:
            shown.append((m.group(1), int(m.group(2))))

    terminal = tmp_path / "terminal.jsonl"
    E.run_dialogue(E.DialogueConfig(gen=gen, out=str(terminal), judge="human", judge_name="bob"),
                   ask=lambda prompt: answers[shown[-1]], show=show)
    assert sorted(map(json.dumps, web)) == sorted(map(json.dumps, read(terminal)))
    capsys.readouterr()
    assert E.main(["report", str(tmp_path / "study" / "bob.jsonl")]) == 0
    assert "4 dialogues, 8 responses: 0 unparseable" in capsys.readouterr().out


def test_a_conversations_turns_come_in_order_whatever_the_file_order(tmp_path):
    gen = dialogue_gen(tmp_path)
    turns = E.data.read_dialogue_turns(gen)[::-1]  # last turns first
    study = annotate.dialogue_study(turns, 0, gen)
    for name in ("alice", "bob", "carol"):
        seen = [study.items[i].key for i in annotate.annotator_order(study, name)]
        for d, n in DIALOGUE_TURNS:
            start = seen.index((d, 1))
            assert seen[start:start + n] == [(d, k) for k in range(1, n + 1)]


# ---- back: a changed label supersedes the old one -----------------------------------------------

def test_a_changed_label_is_appended_and_supersedes_the_old_one(tmp_path, capsys):
    a, b = gen_files(tmp_path)
    with running(pairwise(a, b), tmp_path / "study") as server:
        for n in range(6):
            label(server, "alice", n, "a")
            label(server, "bob", n, "a")
        status, _, view = label(server, "alice", 2, "t")  # back to the third item: a tie after all
        assert status == 200 and view["n"] is None and view["done"] == 6
        again = item(server, "alice", 2)
        assert again["label"] == "t" and again["labelled"]
        assert any("changed item 3 (a -> t)" in line for line in server.lines)
    path = str(tmp_path / "study" / "alice.jsonl")
    lines = read(path)
    assert len(lines) == 7 and lines[-1]["label"] == "tie"  # the history stays in the file
    kind, records = E.read_results(path)
    assert len(records) == 6 and Counter(r["label"] for r in records)["tie"] == 1
    # the terminal resumes from the same file: nothing left to judge, the summary counts 6
    E.run_pairwise(E.PairwiseConfig(a=a, b=b, out=path, judge="human", judge_name="alice"),
                   ask=lambda prompt: pytest.fail("asked again"), show=lambda *args: None)
    capsys.readouterr()
    assert E.main(["agreement", path, str(tmp_path / "study" / "bob.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "prompts judged by both: 6" in out
    assert re.search(r"agreement:\s+91\.7%", out), out  # 5 matches and one a-vs-tie (0.5): 5.5 / 6


def test_latest_keeps_the_last_record_of_each_item_and_one_pass_files_whole():
    r = lambda judge, i, order, label: {"judge": judge, "a": "x", "b": "y", "id": i, "order": order, "label": label}
    records = [r("al", 0, "AB", "a"), r("al", 0, "BA", "b"), r("bo", 0, "AB", "tie"), r("al", 1, "AB", "a"),
               r("al", 0, "AB", "tie")]
    assert judging.latest(records) == [records[4], records[1], records[2], records[3]]
    by_text = [{"judge": "al", "id": None, "prompt": "same  prompt", "label": "a"},
               {"judge": "al", "id": None, "prompt": "same prompt", "label": "b"},
               {"judge": "al", "id": None, "prompt": "another", "label": "a"}]
    assert [x["label"] for x in judging.latest(by_text)] == ["b", "a"]
    grades = [{"judge": "al", "gen": "g", "dialogue": "d", "turn": k, "prompt": "hi", "grade": "pass"} for k in (1, 2)]
    assert judging.latest(grades) == grades


# ---- several annotators at once; a restart ----------------------------------------------------------

def test_concurrent_annotators_lose_nothing_and_never_interleave(tmp_path):
    a, b = gen_files(tmp_path, n=20)
    people, rounds = ("alice", "bob", "carol"), 3
    with running(pairwise(a, b), tmp_path / "study") as server:
        refs = {(p, n): item(server, p, n)["ref"] for p in people for n in range(20)}
        posts = [(p, n, "abt"[k]) for k in range(rounds) for p in people for n in range(20)]
        start = threading.Barrier(16)

        def post(job):
            p, n, key = job
            if job in posts[:16]:
                start.wait()  # the first 16 go at once
            return label(server, p, n, key, refs[p, n])[0]

        with ThreadPoolExecutor(16) as pool:
            statuses = list(pool.map(post, posts))
        assert statuses == [200] * len(posts)
        assert {p: item(server, p)["done"] for p in people} == {p: 20 for p in people}
    for p in people:
        raw = open(tmp_path / "study" / f"{p}.jsonl").read()
        lines = raw.splitlines()
        assert raw.endswith("\n") and len(lines) == 20 * rounds
        records = [json.loads(line) for line in lines]  # every line whole
        assert {r["judge"] for r in records} == {p}
        assert Counter(r["raw"] for r in records) == {k: 20 for k in "abt"[:rounds]}
        assert len(E.read_results(str(tmp_path / "study" / f"{p}.jsonl"))[1]) == 20


def test_a_restarted_server_resumes_everyone_where_they_stopped(tmp_path):
    a, b = gen_files(tmp_path)
    study = pairwise(a, b)
    with running(study, tmp_path / "study") as server:
        with pytest.raises(files.LockedError):  # one server per study, before anyone has labelled too
            annotate.StudyServer(study, str(tmp_path / "study"), port=0)
        for n in range(3):
            label(server, "alice", n, "b")
        label(server, "bob", 0, "t")
        label(server, "bob", 2, "t")  # bob jumped ahead past his second item
        # while it runs, a second server on the study and a terminal session on alice's file are refused
        with pytest.raises(files.LockedError):
            annotate.StudyServer(study, str(tmp_path / "study"), port=0)
        with pytest.raises(files.LockedError):
            E.run_pairwise(E.PairwiseConfig(a=a, b=b, out=str(tmp_path / "study" / "alice.jsonl"), judge="human",
                                            judge_name="alice"), ask=lambda p: "q", show=lambda *x: None)
    with running(study, tmp_path / "study") as server:
        assert server.summary() == "alice 3/6, bob 2/6"
        alice, bob = item(server, "alice"), item(server, "bob")
        assert (alice["n"], alice["done"]) == (3, 3)
        assert (bob["n"], bob["done"]) == (1, 2)
        assert item(server, "alice", 1)["label"] == "b"
        assert item(server, "carol")["n"] == 0
        assert label(server, "alice", 3, "a")[2]["done"] == 4
    assert len(read(tmp_path / "study" / "alice.jsonl")) == 4


def test_a_file_made_with_other_settings_is_refused_naming_it(tmp_path, capsys):
    a, b = gen_files(tmp_path)
    with running(pairwise(a, b, seed=1), tmp_path / "study") as server:
        label(server, "alice", 0, "a")
    with pytest.raises(judging.OtherSettingsError, match=r"alice\.jsonl:1: .*seed=1"):
        annotate.StudyServer(pairwise(a, b, seed=0), str(tmp_path / "study"), port=0)
    assert E.main(["serve", "--a", a, "--b", b, "--out_dir", str(tmp_path / "study"), "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert "alice.jsonl:1" in err and "seed=1" in err and "Traceback" not in err


# ---- nothing in an answer runs ------------------------------------------------------------------

def test_answers_are_data_and_the_page_locks_itself_down(tmp_path):
    a, b = gen_files(tmp_path)
    with running(pairwise(a, b), tmp_path / "study") as server:
        status, headers, page = call(server, "/")
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        csp = headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert "__pwned" not in page and "<script src=\"annotate.js\"" in page
        status, headers, view = call(server, "/api/item?name=alice&n=0")
        assert headers["Content-Type"].startswith("application/json") and headers["X-Content-Type-Options"] == "nosniff"
        assert "Content-Security-Policy" in headers
        shown = view["item"]["answers"]
        evil = next(x for x in shown if x.startswith("BAD"))
        assert evil.startswith(EVIL)  # the text, as the generation file has it
        status, headers, js = call(server, "/annotate.js")
        assert status == 200 and headers["Content-Type"].startswith("text/javascript")
        assert not re.search(r"\.(inner|outer)HTML\s*=|insertAdjacentHTML|document\.write|eval\(", js)
        assert call(server, "/../annotate.py")[0] == 404 and call(server, "/web/annotate.js")[0] == 404


# ---- who may label ------------------------------------------------------------------------------

def test_a_required_token_is_required(tmp_path):
    a, b = gen_files(tmp_path)
    with running(pairwise(a, b), tmp_path / "study", token="s3cret") as server:
        assert server.link().endswith("/?token=s3cret")
        for path in ("/", "/annotate.js", "/api/study", "/api/item?name=alice", "/?token=wrong"):
            status, _, body = call(server, path)
            assert status == 403 and "token" in str(body), path
        status, _, body = call(server, "/api/label", {"name": "alice", "n": 0, "ref": "x", "key": "a"})
        assert status == 403
        assert not os.path.exists(tmp_path / "study" / "alice.jsonl")
        status, headers, _ = call(server, "/?token=s3cret")
        assert status == 200
        cookie = headers["Set-Cookie"].split(";")[0]
        assert cookie == f"lima_study_{server.port}=s3cret" and "HttpOnly" in headers["Set-Cookie"]
        assert call(server, "/api/study", headers={"Cookie": cookie})[0] == 200
        assert call(server, "/annotate.js", headers={"Cookie": cookie})[0] == 200
        assert call(server, "/api/study", headers={"X-Lima-Token": "s3cret"})[0] == 200
        assert call(server, "/api/study", headers={"X-Lima-Token": "s3cre"})[0] == 403
        ref = call(server, "/api/item?name=alice&n=0&token=s3cret")[2]["ref"]
        status, _, view = call(server, "/api/label", {"name": "alice", "n": 0, "ref": ref, "key": "a"},
                               headers={"X-Lima-Token": "s3cret"})
        assert status == 200 and view["done"] == 1


def test_any_address_but_loopback_gets_a_token(tmp_path):
    a, b = gen_files(tmp_path)
    with running(pairwise(a, b), tmp_path / "study", host="0.0.0.0") as server:
        assert server.token and len(server.token) >= 20
        assert server.link().endswith(f":{server.port}/?token={server.token}")
        assert call(server, "/api/study")[0] == 403
        assert call(server, f"/api/study?token={server.token}")[0] == 200
    with running(pairwise(a, b), tmp_path / "study2") as server:
        assert server.token is None and server.link() == f"http://127.0.0.1:{server.port}/"
        assert call(server, "/api/study")[0] == 200
        # a page elsewhere reaching the study through a name that points here (DNS rebinding)
        assert call(server, "/api/study", headers={"Host": f"evil.example:{server.port}"})[0] == 403
        assert call(server, "/api/study", headers={"Host": f"localhost:{server.port}"})[0] == 200
        assert call(server, "/api/study", headers={"Host": f"[::1]:{server.port}"})[0] == 200
        assert call(server, "/api/study", headers={"Host": "[::1"})[0] == 403
    with running(pairwise(a, b), tmp_path / "study3", token="a&b c/d") as server:  # given, quoted in the link
        assert server.link().endswith("/?token=a%26b%20c%2Fd")
        assert call(server, server.link().split(f":{server.port}")[1])[0] == 200


def test_bad_requests_get_one_clear_message(tmp_path):
    a, b = gen_files(tmp_path)
    with running(pairwise(a, b), tmp_path / "study") as server:
        ref = item(server, "alice", 0)["ref"]
        for name in ("Alice", "../etc", "a b", "", "x" * 33, ".hidden"):
            status, _, body = call(server, "/api/label", {"name": name, "n": 0, "ref": ref, "key": "a"})
            assert status == 400 and "lowercase letters" in body["error"], name
        assert call(server, "/api/label", {"name": "alice", "n": 0, "ref": ref, "key": "x"})[2]["error"].startswith("key 'x'")
        assert call(server, "/api/label", {"name": "alice", "n": 6, "ref": ref, "key": "a"})[0] == 400
        status, _, body = call(server, "/api/label", {"name": "alice", "n": 1, "ref": ref, "key": "a"})
        assert status == 409 and "reload" in body["error"]
        assert call(server, "/api/label", raw=b"name=alice", headers={"Content-Type": "text/plain"})[0] == 415
        assert call(server, "/api/label", raw=b"[1, 2]")[0] == 400
        assert call(server, "/api/label", raw=b"{" * 5000)[0] == 400
        assert call(server, "/nothing")[0] == 404
        assert call(server, "/api/item?name=alice&n=-1")[0] == 400
    assert sorted(os.listdir(tmp_path / "study")) == []  # nothing written, not even a file


def test_serve_refuses_bad_flags_with_one_line(tmp_path, capsys):
    a, b = gen_files(tmp_path)
    gen = dialogue_gen(tmp_path)
    cases = [([], "--out_dir is required"),
             (["--out_dir", "s"], "give --a and --b"),
             (["--out_dir", "s", "--a", a], "give --a and --b"),
             (["--out_dir", "s", "--a", a, "--b", b, "--gen", gen], "give --a and --b"),
             (["--out_dir", str(tmp_path), "--a", a, "--b", b], "in --out_dir"),
             (["--out_dir", a, "--gen", gen], "is a file")]
    for flags, message in cases:
        assert E.main(["serve", *flags]) == 1, flags
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (flags, err)
    with running(pairwise(a, b), tmp_path / "busy") as server:
        assert E.main(["serve", "--a", a, "--b", b, "--out_dir", str(tmp_path / "other"), "--port", str(server.port)]) == 1
        assert f"port {server.port} on 127.0.0.1 is in use" in capsys.readouterr().err


def test_the_command_serves_until_ctrl_c_and_stops_with_one_line(tmp_path):
    from conftest import ctrl_c_reaches_the_child
    a, b = gen_files(tmp_path)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "evaluate.py"), "serve", "--a", a, "--b", b,
                             "--out_dir", str(tmp_path / "study"), "--port", "0"],
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path, preexec_fn=ctrl_c_reaches_the_child)
    try:
        lines = [proc.stderr.readline() for _ in range(3)]
        m = re.search(r"open http://127\.0\.0\.1:(\d+)/ in a browser", "".join(lines))
        assert m, lines
        server = type("S", (), {"port": int(m.group(1))})
        assert label(server, "alice", 0, "t")[0] == 200
        assert proc.stderr.readline().startswith("alice: 1 of 6 labelled")
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=30)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert [x for x in rest.splitlines() if x] == [f"stopped; every label is saved in {tmp_path / 'study'} (alice 1/6). "
                                                    f"Run the same command to go on."]
    assert read(tmp_path / "study" / "alice.jsonl")[0]["label"] == "tie"


# ---- in a real browser ---------------------------------------------------------------------------

def _browser():
    """A headless Chromium under selenium, or the reason there is none."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        return None, "selenium is not installed (pip install selenium)"
    binary = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        return None, ("no headless browser: install the distribution's Chromium and its driver (Debian: apt-get "
                      "install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(arg)
    try:  # the driver given by path: selenium downloads nothing
        return webdriver.Chrome(service=Service(driver), options=options), None
    except Exception as e:  # a browser that cannot start here
        return None, f"Chromium did not start: {str(e).splitlines()[0]}"


@pytest.fixture(scope="module")
def browser():
    driver, reason = _browser()
    if driver is None:
        pytest.skip(reason)
    yield driver
    driver.quit()


def test_in_a_browser_three_items_clicked_through_land_in_the_file(tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    a, b = gen_files(tmp_path)
    wait = WebDriverWait(browser, 15)
    progress = lambda: browser.find_element(By.ID, "progress").text
    with running(pairwise(a, b), tmp_path / "study", token="s3cret") as server:
        browser.get(server.link())
        browser.execute_script("localStorage.clear()")
        browser.get(server.link())
        wait.until(lambda d: d.find_element(By.ID, "name").is_displayed())
        browser.find_element(By.ID, "name").send_keys("Alice")  # typed lowercase as it goes
        browser.find_element(By.CSS_SELECTOR, "#name-form button").click()
        wait.until(lambda d: progress().startswith("1 of 6"))
        # the answer's HTML is text: no element came from it, nothing ran; the Markdown is laid out
        answers = browser.find_elements(By.CSS_SELECTOR, "article.answer")
        evil = next(x for x in answers if "BAD" in x.text)
        assert "<script>window.__pwned = 1</script>" in evil.text and "[click me](javascript:" in evil.text
        assert browser.find_elements(By.TAG_NAME, "img") == [] and browser.find_elements(By.TAG_NAME, "a") == []
        assert len(browser.find_elements(By.TAG_NAME, "script")) == 1
        assert browser.execute_script("return window.__pwned") is None
        good = next(x for x in answers if "GOOD" in x.text)
        assert good.find_element(By.TAG_NAME, "strong").text == "in bold"
        assert [li.text for li in good.find_elements(By.TAG_NAME, "li")] == ["one", "two"]
        assert good.find_element(By.TAG_NAME, "pre").text == "<i>kept as text</i>"
        # three items: two clicks and a key
        for n, (how, key) in enumerate([("click", "a"), ("click", "t"), ("key", "2")]):
            if how == "click":
                browser.find_element(By.CSS_SELECTOR, f"button.option[data-key='{key}']").click()
            else:
                browser.find_element(By.TAG_NAME, "body").send_keys(key)
            wait.until(lambda d: progress().startswith(f"{n + 2} of 6 · {n + 1} labelled"))
        # back, to change the second label
        browser.find_element(By.ID, "back").click()
        wait.until(lambda d: progress().startswith("3 of 6"))
        browser.find_element(By.ID, "back").click()
        wait.until(lambda d: progress().startswith("2 of 6"))
        assert browser.find_element(By.CSS_SELECTOR, "button.option.chosen").get_attribute("data-key") == "t"
        browser.find_element(By.TAG_NAME, "body").send_keys("b")
        wait.until(lambda d: progress().startswith("4 of 6 · 3 labelled"))
        # a reload resumes where alice stopped, her name remembered
        browser.refresh()
        wait.until(lambda d: progress().startswith("4 of 6 · 3 labelled"))
        assert browser.find_element(By.ID, "who-name").text == "alice"
    records = read(tmp_path / "study" / "alice.jsonl")
    assert [r["raw"] for r in records] == ["a", "t", "b", "b"] and {r["judge"] for r in records} == {"alice"}
    kind, latest = E.read_results(str(tmp_path / "study" / "alice.jsonl"))
    assert [r["raw"] for r in latest] == ["a", "b", "b"]
