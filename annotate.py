"""The paper's human studies in a browser (LIMA §4 and its Appendix C: which of two answers is
better, or neither; LIMA §6: every response of a conversation graded Fail, Pass or Excellent),
for several annotators at once, each on their own machine. `evaluate.py serve` starts it:

    python evaluate.py serve --a gen_lima.jsonl --b gen_base.jsonl --out_dir study   # pairwise
    python evaluate.py serve --gen dialogue_lima.jsonl --out_dir study_dialogue       # dialogue
    python evaluate.py serve ... --host 0.0.0.0    # for other machines: a link with a token

- One plain page (web/annotate.html, .js, .css; nothing fetched from elsewhere) served by the
  standard library's ThreadingHTTPServer, and a small JSON API: GET /api/study (the question and
  its options), GET /api/item?name=&n= (an annotator's n-th item; without n, where they stopped),
  POST /api/label {name, n, ref, key}.
- Each annotator names themself once; their labels go to <out_dir>/<name>.jsonl, the records
  evaluate.py's terminal sessions write (judging.pair_record / grade_record, judge = the name),
  appended and fsync'd one at a time (data.Appender) under a lock per annotator, so report and
  agreement read them unchanged and two annotators never interleave or lose a line. A changed
  label ("back") is appended and supersedes the earlier one (judging.latest). A restarted server
  reads every file in --out_dir and resumes each annotator where they stopped.
- Each annotator sees the items in their own order, seeded by the study's seed and their name
  (a dialogue's turns stay together, in order); each pair's A/B order is the study seed's, as in
  the terminal (judging.pairwise_items).
- Nothing in an answer runs: the API returns answers as JSON strings, the page puts text into the
  document only as text nodes (its Markdown subset builds elements, never parses HTML), and a
  Content-Security-Policy lets the page run only its own script.
- Binds 127.0.0.1 by default. On any other address every request must carry a token (generated
  unless --token is given, printed in the link), else 403.
"""

import errno
import hashlib
import hmac
import ipaddress
import json
import os
import random
import re
import secrets
import socket
import socketserver
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import parse_qs, quote, urlsplit

import files
from data import Appender, DataError, prompt_key
from judging import (GRADE_KEYS, HUMAN_KEYS, dialogue_meta, grade_parts, grade_record,
                     pair_record, pairwise_meta, pairwise_parts, read_previous, render_context,
                     shown_answers, undo_order)

WEB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web")
PAGES = {"/": ("annotate.html", "text/html"), "/annotate.js": ("annotate.js", "text/javascript"),
         "/annotate.css": ("annotate.css", "text/css")}
# The page may run its own script and style and talk to this server, nothing else: no inline
# script, no other origin, no frames, no forms posted anywhere, no images.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'none'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")  # names a file: <out_dir>/<name>.jsonl
NAME_RULE = "1-32 lowercase letters, digits, '-' or '_', starting with a letter or digit"
MAX_BODY = 4096  # a label is a few dozen bytes


class StudyError(ValueError):
    """A request the study refuses; the message is shown to the annotator."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


# ---- what is labelled -------------------------------------------------------------------------

@dataclass
class Item:
    key: tuple        # what a record of it is matched by when an annotator resumes
    group: object     # the items of one group are shown together and in order (a dialogue's turns)
    view: dict        # what the page shows, as data
    record: Callable  # (key pressed, meta) -> the record appended for it
    ref: str = ""     # a short hash of key: a label posted for an item the server no longer has is refused


@dataclass
class Study:
    kind: str          # "pairwise" or "dialogue"
    items: list
    seed: int          # with an annotator's name, seeds the order they see the items in
    meta: Callable     # annotator name -> what each of their records carries (judging.pairwise_meta, ...)
    key_of: Callable   # a record -> the key of the item it labels
    keys: dict         # key pressed -> the label as shown (judging.HUMAN_KEYS, GRADE_KEYS)
    what: str          # "judgements" or "grades", for messages

    def __post_init__(self):
        for item in self.items:
            item.ref = hashlib.sha256(json.dumps(item.key, default=str).encode()).hexdigest()[:16]

    def describe(self):
        """The question and its options, for the page (the paper's words, from judging.py)."""
        if self.kind == "pairwise":
            intro, ask, options = pairwise_parts()
        else:
            intro, (ask, options) = "", grade_parts()
        return {"kind": self.kind, "total": len(self.items), "intro": intro, "ask": ask,
                "options": [{"key": k, "shortcut": str(i), "text": text} for i, (k, text) in enumerate(options, 1)],
                "skip": "s"}


def pairwise_study(items, seed, a, b):
    """items: [(pair, order)] as judging.pairwise_items makes them; a, b: the generation files."""
    by_id = items[0][0].id is not None

    def item(index, pair, order):
        answer_a, answer_b = shown_answers(pair, order)
        view = {"prompt": pair.prompt, "answers": [answer_a, answer_b], "source": pair.source, "id": pair.id}
        return Item((pair.key, order), index, view,
                    lambda key, meta: pair_record(pair, order, key, undo_order(HUMAN_KEYS[key], order), meta))

    return Study("pairwise", [item(i, p, o) for i, (p, o) in enumerate(items)], seed,
                 lambda name: pairwise_meta(name, seed, a, b),
                 lambda r: (prompt_key(r.get("id"), r.get("prompt", ""), by_id), r.get("order")),
                 HUMAN_KEYS, "judgements")


def dialogue_study(turns, seed, gen):
    """turns: the responses of data.read_dialogue_turns; gen: their file. Each annotator grades one
    conversation at a time, turn by turn, as its user read it."""
    def item(turn):
        view = {"context": turn["context"], "prompt": turn["prompt"], "response": turn["response"],
                "source": turn.get("source"), "dialogue": turn["dialogue"], "turn": turn["turn"],
                "no_context": render_context([])}
        return Item((turn["dialogue"], turn["turn"]), turn["dialogue"], view,
                    lambda key, meta: grade_record(turn, key, GRADE_KEYS[key], meta))

    # a conversation's turns in order (the file is written in rounds: every dialogue's turn 1, then 2, ...)
    turns = sorted(turns, key=lambda t: t["turn"])
    return Study("dialogue", [item(t) for t in turns], seed, lambda name: dialogue_meta(name, gen),
                 lambda r: (r.get("dialogue"), r.get("turn")), GRADE_KEYS, "grades")


def annotator_order(study, name):
    """-> item indices in the order `name` sees them: the groups shuffled by (seed, name), each
    group's items in their own order. Resuming, restarting or reloading shows the same order."""
    groups = {}
    for i, item in enumerate(study.items):
        groups.setdefault(item.group, []).append(i)
    order = list(groups.values())
    random.Random(f"{study.seed}:{name}").shuffle(order)
    return [i for group in order for i in group]


# ---- one annotator: their order, their labels, their file ---------------------------------------

class Annotator:
    """One person's labels, resumed from <out_dir>/<name>.jsonl and appended to it."""

    def __init__(self, study, name, path):
        self.study, self.name, self.path = study, name, path
        self.meta = study.meta(name)
        self.order = annotator_order(study, name)
        self.lock = threading.Lock()  # one label at a time: a whole line, then the next
        self.out = None  # opened at the first label, so a name typed by mistake leaves no file
        self.labels = {}  # item index -> the key pressed last (None: a record without a key, e.g. a model's)
        index = {item.key: i for i, item in enumerate(study.items)}
        previous = read_previous(path, self.meta, study.what,
                                 fix="serve the files this study was started with, or another --out_dir")
        for r in previous:  # the last record of each item (judging.latest); others' items are ignored
            i = index.get(study.key_of(r))
            if i is not None:
                self.labels[i] = r.get("raw") if r.get("raw") in study.keys else None
        self.made, self.started = 0, None  # labels this session, for the rate in the log

    @property
    def done(self):
        return len(self.labels)

    def next_open(self, after=-1):
        """The first position after `after` (wrapping round) whose item has no label; None when
        every item has one."""
        n = len(self.order)
        for step in range(1, n + 1):
            pos = (after + step) % n
            if self.order[pos] not in self.labels:
                return pos
        return None

    def view(self, pos):
        """What the page needs to show the item at position pos; pos None: all done."""
        state = {"name": self.name, "total": len(self.order), "done": self.done, "file": os.path.basename(self.path)}
        if pos is None:
            return {**state, "n": None}
        i = self.order[pos]
        item = self.study.items[i]
        return {**state, "n": pos, "ref": item.ref, "label": self.labels.get(i), "labelled": i in self.labels,
                "item": item.view}

    def label(self, pos, ref, key):
        """Append the record of `key` for the item at pos; -> (whether it changed an earlier label,
        the label before)."""
        i = self.order[pos]
        item = self.study.items[i]
        if ref != item.ref:
            raise StudyError(HTTPStatus.CONFLICT, "this item is not the one the page showed (the server was "
                                                  "restarted with other files?): reload the page")
        if self.out is None:
            self.out = Appender(self.path)
        self.out.write(item.record(key, self.meta))  # whole and fsync'd, or not at all (OSError)
        changed, before = i in self.labels, self.labels.get(i)
        self.labels[i] = key
        self.made += 1
        self.started = self.started or time.monotonic()
        return changed, before

    def progress(self):
        """'alice: 12 of 300 labelled (3.1 a minute; about 1h32m to go)'"""
        line = f"{self.name}: {self.done} of {len(self.order)} labelled"
        minutes = (time.monotonic() - self.started) / 60 if self.started else 0
        if self.made > 1 and minutes > 0:
            rate = (self.made - 1) / minutes  # the first label starts the clock
            left = (len(self.order) - self.done) / rate if rate else 0
            line += f" ({rate:.1f} a minute; about {int(left // 60)}h{int(left % 60):02d}m to go)"
        return line

    def close(self):
        with self.lock:  # a label being written is finished first
            if self.out is not None:
                self.out.close()
                self.out = None


# ---- the server ---------------------------------------------------------------------------------

def is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class StudyServer(ThreadingHTTPServer):
    """The study on host:port (port 0: a free one). Holds the lock of --out_dir and of every
    annotator's file while it runs, so a second server or a terminal session on them is refused.
    A token is required on any address but loopback (generated when none is given)."""

    daemon_threads = True
    request_queue_size = 128  # connections waiting to be accepted (socketserver's 5 resets a busy moment)
    log = staticmethod(lambda line: print(line, file=sys.stderr, flush=True))

    def __init__(self, study, out_dir, host="127.0.0.1", port=0, token=None):
        if not study.items:
            raise ValueError("nothing to label")
        self.study, self.out_dir = study, os.fspath(out_dir)
        self.token = token or (None if is_loopback(host) else secrets.token_urlsafe(18))
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.annotators, self.registry = {}, threading.Lock()
        self.locks = ExitStack()
        try:
            if os.path.exists(self.out_dir) and not os.path.isdir(self.out_dir):
                raise ValueError(f"--out_dir {self.out_dir} is a file; give a directory (one judgement file per "
                                 f"annotator goes in it)")
            os.makedirs(self.out_dir, exist_ok=True)
            self.locks.enter_context(files.lock(self.out_dir))  # one server per study directory
            for entry in sorted(os.listdir(self.out_dir)):
                name, ext = os.path.splitext(entry)
                if ext != ".jsonl":
                    continue
                if not NAME.fullmatch(name):
                    self.log(f"{os.path.join(self.out_dir, entry)}: not an annotator's file ({NAME_RULE}); left alone")
                    continue
                self.annotator(name)
            super().__init__((host, port), StudyHandler)
        except BaseException:
            self.close()
            raise
        self.port = self.server_address[1]

    def server_bind(self):
        # HTTPServer.server_bind would look the host's name up (getfqdn): a DNS wait for nothing
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def annotator(self, name):
        """The annotator `name`, resumed from their file the first time they are asked for."""
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise StudyError(HTTPStatus.BAD_REQUEST, f"a name is {NAME_RULE}; it names your file of labels")
        with self.registry:
            if name not in self.annotators:
                path = os.path.join(self.out_dir, name + ".jsonl")
                with ExitStack() as held:
                    held.enter_context(files.lock(path))  # no terminal session on it meanwhile
                    self.annotators[name] = Annotator(self.study, name, path)
                    self.locks.enter_context(held.pop_all())  # held until the server closes
            return self.annotators[name]

    def link(self):
        host = self.server_address[0]
        if host in ("0.0.0.0", "::"):
            host = socket.gethostname()  # what the other machines may call this one
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/" + (f"?token={quote(self.token, safe='')}" if self.token else "")

    def allows(self, headers, query):
        """A request may go on: it carries the token (query, header or the cookie the page set),
        or, when none is required, it is addressed to this machine by a loopback name (a page
        elsewhere cannot reach the study through DNS rebinding)."""
        if self.token is None:
            try:
                host = urlsplit("//" + (headers.get("Host") or "")).hostname or ""
            except ValueError:  # a malformed Host
                return False
            return is_loopback(host) or host == self.server_address[0]
        given = (query.get("token") or [None])[0] or headers.get("X-Lima-Token")
        if given is None:
            try:
                morsel = SimpleCookie(headers.get("Cookie") or "").get(self.cookie)
            except CookieError:
                morsel = None
            given = morsel.value if morsel else None
        return given is not None and hmac.compare_digest(given.encode(), self.token.encode())

    @property
    def cookie(self):
        return f"lima_study_{self.port}"  # cookies are not kept apart by port: the name is

    def summary(self):
        people = ", ".join(f"{a.name} {a.done}/{len(a.order)}" for a in self.annotators.values())
        return people or "no one yet"

    def close(self):
        self.server_close()
        for a in list(self.annotators.values()):
            a.close()
        self.locks.close()

    def server_close(self):
        if hasattr(self, "socket"):
            super().server_close()


class StudyHandler(BaseHTTPRequestHandler):
    server_version = "lima-study"
    sys_version = ""
    timeout = 60  # a client that stops mid-request frees its thread

    def log_message(self, format, *args):
        pass  # the terminal shows labels (StudyServer.log), not every request

    def do_GET(self):
        self.handle_request("GET")

    def do_POST(self):
        self.handle_request("POST")

    def handle_request(self, method):
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        server = self.server
        if not server.allows(self.headers, query):
            return self.send(HTTPStatus.FORBIDDEN, "text/plain", b"403: this study needs the link with its token; "
                             b"ask whoever runs it for the link\n")
        try:
            if method == "GET" and url.path in PAGES:
                name, kind = PAGES[url.path]
                with open(os.path.join(WEB, name), "rb") as f:
                    body = f.read()
                cookie = None
                if server.token and url.path == "/":  # the page's script and style, and its API calls
                    cookie = f"{server.cookie}={server.token}; Path=/; HttpOnly; SameSite=Strict"
                return self.send(HTTPStatus.OK, kind, body, cookie)
            if method == "GET" and url.path == "/api/study":
                return self.send_json(server.study.describe())
            if method == "GET" and url.path == "/api/item":
                annotator = server.annotator((query.get("name") or [None])[0])
                n = (query.get("n") or [None])[0]
                with annotator.lock:
                    pos = annotator.next_open() if n is None else self.position(annotator, n)
                    return self.send_json(annotator.view(pos))
            if method == "POST" and url.path == "/api/label":
                return self.post_label()
            raise StudyError(HTTPStatus.NOT_FOUND if method == "GET" else HTTPStatus.METHOD_NOT_ALLOWED,
                             f"{method} {url.path}: no such page")
        except StudyError as e:
            return self.send_json({"error": str(e)}, e.status)
        except (OSError, DataError) as e:  # a full disk; a file the server cannot resume from
            server.log(f"error: {e}")
            return self.send_json({"error": str(e)}, HTTPStatus.INTERNAL_SERVER_ERROR)

    def post_label(self):
        if (self.headers.get("Content-Type") or "").split(";")[0].strip() != "application/json":
            # a page elsewhere can post a form here, not JSON (that needs a CORS preflight we never answer)
            raise StudyError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "labels are posted as JSON")
        try:
            size = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            size = -1
        if not 0 < size <= MAX_BODY:
            raise StudyError(HTTPStatus.BAD_REQUEST, f"a label is a JSON object of at most {MAX_BODY} bytes")
        try:
            body = json.loads(self.rfile.read(size))
        except (ValueError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict):
            raise StudyError(HTTPStatus.BAD_REQUEST, "a label is a JSON object {name, n, ref, key}")
        server = self.server
        annotator = server.annotator(body.get("name"))
        key = body.get("key")
        if key not in server.study.keys:
            raise StudyError(HTTPStatus.BAD_REQUEST, f"key {key!r} is none of {', '.join(server.study.keys)}")
        with annotator.lock:
            pos = self.position(annotator, body.get("n"))
            changed, before = annotator.label(pos, body.get("ref"), key)
            view = annotator.view(annotator.next_open(pos))
            line = annotator.progress() + (f"; changed item {pos + 1} ({before} -> {key})" if changed else "")
        server.log(line)
        return self.send_json(view)

    @staticmethod
    def position(annotator, n):
        try:
            pos = int(n)
        except (TypeError, ValueError):
            pos = -1
        if not 0 <= pos < len(annotator.order):
            raise StudyError(HTTPStatus.BAD_REQUEST, f"item {n!r}: positions run from 0 to {len(annotator.order) - 1}")
        return pos

    def send_json(self, value, status=HTTPStatus.OK):
        self.send(status, "application/json", json.dumps(value, ensure_ascii=False).encode("utf-8"))

    def send(self, status, kind, body, cookie=None):
        self.send_response(status)
        self.send_header("Content-Type", f"{kind}; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")  # the token stays out of any Referer
        self.send_header("Cache-Control", "no-store")
        if cookie:
            self.send_header("Set-Cookie", cookie)
        self.end_headers()
        self.wfile.write(body)


def serve(study, out_dir, host="127.0.0.1", port=8000, token=None):
    """Run the study until Ctrl-C: the link to share, then a line per label."""
    try:
        server = StudyServer(study, out_dir, host, port, token)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise OSError(f"port {port} on {host} is in use: pass --port with another (0: any free one)") from None
        if e.errno == errno.EADDRNOTAVAIL or isinstance(e, socket.gaierror):
            raise OSError(f"--host {host}: not an address of this machine ({e.strerror})") from None
        raise
    items = f"{len(study.items)} {'pairs' if study.kind == 'pairwise' else 'responses'}"
    server.log(f"{study.kind} study: {items} for each annotator; labels in {out_dir}/<name>.jsonl "
               f"({server.summary()})")
    if server.token:
        server.log(f"share this link with the annotators (it holds the token; a request without it is "
                   f"refused):\n  {server.link()}")
    else:
        server.log(f"open {server.link()} in a browser on this machine (--host 0.0.0.0 to let others in)")
    server.log("Ctrl-C stops; every label is saved the moment it is made")
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    server.log(f"\nstopped; every label is saved in {out_dir} ({server.summary()}). Run the same command to go on.")
