"""evaluate.py with --judge openai:MODEL: the paper's judges (GPT-4, ChatGPT) or a local server,
reached over the OpenAI chat-completions protocol by the official client. The server here is a
real HTTP server on 127.0.0.1, started by the tests, speaking that protocol's JSON: nothing leaves
the machine."""

import json
import re
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import evaluate as E
import judging

pytest.importorskip("openai")

KEY, MODEL = "test-key", "judge-model"


class ChatServer:
    """POST /v1/chat/completions. Answers by what the question asks (a scripted judge that
    prefers GOOD answers, grades 5 and Excellent); checks the key and the model; can fail on
    purpose: `faults` is a list of (status, body) served first, one per request; after
    `refuse_after` answers every request gets a 401. Records every request and the most
    requests ever in flight at once."""

    def __init__(self, delay=0.0):
        self.requests, self.faults, self.refuse_after, self.delay = [], [], None, delay
        self.in_flight = self.max_in_flight = self.answered = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(dict(body, authorization=self.headers.get("Authorization")))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    status, reply = server.respond(self.path, self.headers.get("Authorization"), body)
                finally:
                    with server.lock:
                        server.in_flight -= 1
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status in (429, 500, 503):
                    self.send_header("retry-after-ms", "1")  # the client honours it: a fast test
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def respond(self, path, authorization, body):
        import time
        time.sleep(self.delay)
        with self.lock:
            if self.faults:
                return self.faults.pop(0)
            if self.refuse_after is not None and self.answered >= self.refuse_after:
                return 401, error("Incorrect API key provided.")
        if path != "/v1/chat/completions":
            return 404, error(f"no route {path}")
        if authorization != f"Bearer {KEY}":
            return 401, error("Incorrect API key provided.")
        if body.get("model") != MODEL:
            return 404, error(f"The model `{body.get('model')}` does not exist.")
        question = body["messages"][-1]["content"]
        if "TOO LONG" in question:
            return 400, error("This model's maximum context length is 4096 tokens.", "context_length_exceeded")
        if "Answer A:" in question:
            text = ("Answer A is significantly better." if "Answer A: GOOD" in question
                    else "Answer B is significantly better.")
        elif "[Criterion]: helpfulness" in question:
            text = "It is clear and complete.\n5"
        else:
            text = "It answers the message well.\nExcellent"
        with self.lock:
            self.answered += 1
        n = len(question.split())
        return 200, {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": MODEL + "-0613",
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": text}}],
                     "usage": {"prompt_tokens": n, "completion_tokens": 3, "total_tokens": n + 3}}

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def error(message, code=None):
    return {"error": {"message": message, "type": "invalid_request_error", "code": code}}


def local_only(monkeypatch):
    """No proxy from the environment may carry a request off the machine (httpx reads them)."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.setenv("NO_PROXY", "*")


@pytest.fixture
def server(monkeypatch):
    local_only(monkeypatch)
    s = ChatServer()
    monkeypatch.setenv("OPENAI_BASE_URL", s.url)  # as the official client reads them
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    yield s
    s.close()


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def gen_files(tmp_path, n=12):
    rows_a = [{"id": i, "prompt": f"question {i}?", "response": f"GOOD answer {i}", "source": "s"} for i in range(n)]
    rows_b = [dict(r, response=f"BAD answer {r['id']}") for r in rows_a]
    return write_jsonl(tmp_path / "a.jsonl", rows_a), write_jsonl(tmp_path / "b.jsonl", rows_b)


def read(path):
    return [json.loads(line) for line in open(path)]


def pairwise(a, b, out, *flags):
    return E.main(["pairwise", "--a", a, "--b", b, "--judge", f"openai:{MODEL}", "--out", str(out),
                   "--bootstrap", "50", *flags])


def test_pairwise_by_a_server_with_concurrency_usage_and_resume(tmp_path, server, capsys):
    server.delay = 0.2  # requests overlap: the limit is what bounds them
    a, b = gen_files(tmp_path)
    out = tmp_path / "gpt4.jsonl"
    assert pairwise(a, b, out, "--both_orders", "--concurrency", "3") == 0
    records = read(out)
    assert len(records) == 24 and all(r["label"] == "a" for r in records)  # the order undone
    assert all(r["judge"] == f"openai:{MODEL}" and r["served_by"] == MODEL + "-0613" for r in records)
    assert all(r["usage"]["completion_tokens"] == 3 and r["usage"]["prompt_tokens"] > 20 for r in records)
    assert len(server.requests) == 24 and 1 < server.max_in_flight <= 3
    asked = server.requests[0]
    assert asked["authorization"] == f"Bearer {KEY}" and asked["temperature"] == 0 and asked["max_tokens"] == 256
    assert asked["messages"][0]["content"].startswith("Imagine that you have a super-intelligent AI assistant")
    assert pairwise(a, b, out, "--both_orders") == 0 and len(server.requests) == 24  # resumed: nothing asked again
    assert E.main(["report", str(out), "--bootstrap", "50"]) == 0
    assert "judge tokens: " in capsys.readouterr().out


def test_rate_limits_and_server_errors_are_retried_with_backoff(tmp_path, server):
    server.faults = [(429, error("Rate limit reached")), (429, error("Rate limit reached")),
                     (503, error("overloaded"))]
    a, b = gen_files(tmp_path, n=4)
    out = tmp_path / "j.jsonl"
    assert pairwise(a, b, out, "--concurrency", "1") == 0
    assert [r["label"] for r in read(out)] == ["a"] * 4
    assert len(server.requests) == 4 + 3  # each fault was answered by a retry of the same question
    assert server.requests[0]["messages"] == server.requests[3]["messages"]


def test_a_server_that_keeps_failing_stops_the_run_keeping_every_judgement(tmp_path, server, capsys):
    a, b = gen_files(tmp_path, n=8)
    out = tmp_path / "j.jsonl"
    server.refuse_after = 4  # the key is revoked mid-run
    argv_flags = ("--concurrency", "2", "--retries", "1")
    assert pairwise(a, b, out, *argv_flags) == 1
    err = capsys.readouterr().err
    assert f"{server.url} refused the key (HTTP 401: Incorrect API key provided.)" in err
    assert "set OPENAI_API_KEY" in err and f"kept in {out}" in err and "Traceback" not in err
    assert len(read(out)) == 4
    server.refuse_after = None
    assert pairwise(a, b, out, *argv_flags) == 0 and len(read(out)) == 8


def test_an_unreachable_server_is_one_message(tmp_path, monkeypatch, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    local_only(monkeypatch)
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{port}/v1")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    a, b = gen_files(tmp_path, n=2)
    out = tmp_path / "j.jsonl"
    assert pairwise(a, b, out, "--retries", "1") == 1
    err = capsys.readouterr().err
    assert f"cannot reach the judge server at http://127.0.0.1:{port}/v1" in err
    assert "tried 2 times" in err and "OPENAI_BASE_URL" in err and "Traceback" not in err
    assert not out.exists() or read(out) == []


@pytest.mark.parametrize("case", ["wrong key", "no key", "wrong model", "no package"])
def test_a_refused_key_a_missing_key_model_or_package_is_one_message(tmp_path, server, monkeypatch, capsys, case):
    a, b = gen_files(tmp_path, n=2)
    model = MODEL
    if case == "wrong key":
        monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
        expect = "refused the key (HTTP 401"
    elif case == "no key":
        monkeypatch.delenv("OPENAI_API_KEY")
        expect = "OPENAI_API_KEY=EMPTY"
    elif case == "wrong model":
        model = "gpt-9"
        expect = f"{server.url}: no model 'gpt-9' there (HTTP 404"
    else:
        monkeypatch.setitem(sys.modules, "openai", None)  # as if it were not installed
        expect = "needs the openai package"
    rc = E.main(["pairwise", "--a", a, "--b", b, "--judge", f"openai:{model}", "--out", str(tmp_path / "j.jsonl")])
    err = capsys.readouterr().err
    assert rc == 1 and expect in err and "Traceback" not in err
    if case == "no package":
        assert "pip install openai" in err


def test_a_question_too_long_for_the_server_is_counted_not_fatal(tmp_path, server):
    a, b = gen_files(tmp_path, n=3)
    rows = read(a)
    rows[1]["response"] = "TOO LONG " * 10
    write_jsonl(tmp_path / "a.jsonl", rows)
    out = tmp_path / "j.jsonl"
    assert pairwise(a, b, out) == 0
    records = {r["id"]: r for r in read(out)}
    assert records[1]["label"] is None and records[1]["raw"] == judging.TOO_LONG
    assert "maximum context length" in records[1]["refused"]
    assert records[0]["label"] == records[2]["label"] == "a"


def test_a_server_that_wants_max_completion_tokens_gets_it(tmp_path, server):
    server.faults = [(400, error("Unsupported parameter: 'max_tokens' is not supported with this model. "
                                 "Use 'max_completion_tokens' instead."))]
    a, b = gen_files(tmp_path, n=2)
    assert pairwise(a, b, tmp_path / "j.jsonl", "--concurrency", "1") == 0
    assert "max_tokens" in server.requests[0] and server.requests[1]["max_completion_tokens"] == 256
    assert all("max_tokens" not in r for r in server.requests[1:])


def test_helpfulness_and_dialogue_grades_by_a_server(tmp_path, server, capsys):
    samples = write_jsonl(tmp_path / "samples.jsonl", [{"id": i, "prompt": f"q{i}", "response": f"r{i}.{k}"}
                                                       for i in range(3) for k in range(2)])
    grades = tmp_path / "grades.jsonl"
    assert E.main(["helpfulness", "--gen", samples, "--judge", f"openai:{MODEL}", "--out", str(grades),
                   "--bootstrap", "50"]) == 0
    assert [g["score"] for g in read(grades)] == [5] * 6 and all(g["usage"] for g in read(grades))
    assert server.requests[0]["max_tokens"] == 512
    turns = write_jsonl(tmp_path / "dialogue.jsonl", [
        {"dialogue": d, "turn": t, "context": ["hi", "hello"] if t == 2 else [], "prompt": "how?" if t == 2 else "hi",
         "response": "like so" if t == 2 else "hello", "source": "x"} for d in range(2) for t in (1, 2)])
    out = tmp_path / "dialogue_grades.jsonl"
    assert E.main(["dialogue", "--gen", turns, "--judge", f"openai:{MODEL}", "--out", str(out),
                   "--bootstrap", "50"]) == 0
    assert [g["grade"] for g in read(out)] == ["excellent"] * 4
    questions = [r["messages"][0]["content"] for r in server.requests[6:]]
    second = [q for q in questions if "[User]: how?" in q]
    assert len(second) == 2 and all("[Conversation so far]:\nUser: hi\n\nAssistant: hello" in q
                                    and "[Response]: like so" in q for q in second)
    assert all(judging.NO_CONTEXT in q for q in questions if q not in second)
    assert re.search(r"^excellent\s+4\s+100\.0%", capsys.readouterr().out, re.M)


def test_helpfulness_is_graded_by_a_judge_not_a_person(tmp_path, capsys):
    samples = write_jsonl(tmp_path / "s.jsonl", [{"id": 0, "prompt": "q", "response": "r"}])
    assert E.main(["helpfulness", "--gen", samples, "--judge", "human", "--out", str(tmp_path / "g.jsonl")]) == 1
    assert "graded by a judge model (LIMA §5: ChatGPT): --judge openai:MODEL" in capsys.readouterr().err
