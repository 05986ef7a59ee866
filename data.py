"""LIMA's data, every file format of it, read and written in one place (LIMA §2-§3).

- JSON lines: `read_jsonl` is the one reader (one message for a bad line, `path:line: what is
  wrong`; one policy for a torn last line of a file we append to), `Appender` the one writer of
  resumable outputs (each record fsync'd as it is made).
- Conversations: GAIR/lima's {"conversations": [user, assistant, ...], "source": ...} or the
  common {"messages": [{"role", "content"}, ...]} (`read_conversations`).
- The prepared-data directory prepare_data.py writes and train.py reads (`encode_examples`,
  `write_split`, `load_meta`, `load_split`):
      meta.json                tokenizer path + sha256, BOS/EOS/EOT ids, settings, statistics
      {train,dev}.tokens.npy   every example of the split, concatenated (uint16, or int32 for
                               vocabularies past 65535)
      {train,dev}.mask.npy     bool, True where the loss trains (assistant tokens + their EOT)
      {train,dev}.offsets.npy  int64, n+1 boundaries: example i is tokens[offsets[i]:offsets[i+1]]
      {dev,test}_prompts.jsonl {"id", "source", "line", "turns": [user, ..., user], "reference"}
- Prompt files for sampling (`read_prompts`) and the generation files sample.py writes and
  evaluate.py reads (`generation_record`, `read_generations`).
"""

import array
import errno
import json
import os
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import numpy as np
from tqdm import tqdm

import files

FORMAT = "lima-tokens-v1"  # bump when the layout changes, so old data dirs are refused clearly
MAX_REPORTED = 5  # bad lines quoted in an error message before "... and N more"
PROGRESS_BYTES = 8 << 20  # show progress bars for inputs past ~8 MB (LIMA itself is ~3 MB)
PROGRESS_EXAMPLES = 10_000


class DataError(ValueError):
    """Bad input; the message reads `file:line: what is wrong` and what to do."""


# ---- JSON lines ------------------------------------------------------------------------------

def _json_type(x):
    names = {dict: "an object", list: "a list", str: "a string", bool: "true/false",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(x), type(x).__name__)


def _parse_object(raw):
    """One line (bytes) -> a dict, or None for a blank line. Raises DataError(what)."""
    try:
        text = raw.decode("utf-8").lstrip("\ufeff").strip()
    except UnicodeDecodeError as e:
        raise DataError(f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not text:
        return None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise DataError("invalid JSON: nested too deeply") from None
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object per line, got {_json_type(row)}")
    if _SURROGATE_ESCAPE.search(raw):
        _check_surrogates(row)
    return row


# JSON may spell half of a UTF-16 pair alone ("\ud800"); json.loads accepts it, but it is not
# text: tokenizing or writing it fails later, far from the line. Valid UTF-8 cannot hold one, so
# only lines with such an escape need the (slower) full check.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _check_surrogates(row):
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"a lone surrogate \\u{ord(e.object[e.start]):04x} (half of a UTF-16 pair) "
                        f"in a string: not text; remove it or write the whole pair") from None


def repair_torn_tail(path):
    """A file we append to, killed mid-write, may end in a half-written line: cut it off (with a
    note), or, when it is a whole record that only lacks its newline, add the newline."""
    if not os.path.isfile(path):
        return
    with open(path, "rb") as f:
        data = f.read()
    if not data or data.endswith(b"\n"):
        return
    keep = data.rfind(b"\n") + 1
    tail = data[keep:]
    try:
        complete = _parse_object(tail) is not None
    except DataError:
        complete = False
    if complete:
        with open(path, "ab") as f:
            f.write(b"\n")
    else:
        print(f"{path}: dropping a half-written last line (the run was killed while saving "
              f"it): {tail[:60].decode('utf-8', 'replace')!r}", file=sys.stderr)
        with open(path, "r+b") as f:
            f.truncate(keep)


def read_jsonl(path, parse=None, repair_tail=False, desc=None):
    """-> [(line number, parse(row))] for every non-blank line; parse(row) may raise
    DataError(what) and return None to skip a row. Every line is checked; the first few bad
    ones are reported together, each as `path:line: what`. repair_tail: the file is one of our
    resumable outputs (repair_torn_tail first)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise DataError(f"{path} is a directory; a JSON-lines file is needed here")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    if repair_tail:
        repair_torn_tail(path)
    size = os.path.getsize(path)
    rows, errors, n_bad = [], [], 0
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror})") from None
    with f, tqdm(total=size, unit="B", unit_scale=True, file=sys.stderr,
                                     desc=desc or f"reading {os.path.basename(path)}",
                                     disable=size < PROGRESS_BYTES) as bar:
        for line_no, raw in enumerate(f, 1):
            bar.update(len(raw))
            try:
                row = _parse_object(raw)
                if row is not None and parse is not None:
                    row = parse(row)
            except DataError as e:
                n_bad += 1
                if len(errors) < MAX_REPORTED:
                    errors.append(f"{path}:{line_no}: {e}")
                continue
            if row is not None:
                rows.append((line_no, row))
    if n_bad == 1:
        raise DataError(errors[0])
    if n_bad:
        more = f"\n  ... and {n_bad - len(errors)} more" if n_bad > len(errors) else ""
        raise DataError(f"{path}: {n_bad} bad lines, the first {len(errors)}:\n  "
                        + "\n  ".join(errors) + more)
    return rows


def write_jsonl(path, records):
    """A whole JSON-lines file, atomically."""
    files.write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


class Appender:
    """Appends records to a resumable output, each one written whole and fsync'd before the next
    is made: a killed run keeps every record it finished. A write that fails (a full or
    read-only disk) is cut back off, so the file ends on the last whole record."""

    def __init__(self, path):
        self.path = os.fspath(path)
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise OSError(write_failure(self.path, e, "cannot be opened for writing")) from None

    def write(self, record):
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        end = os.lseek(self.fd, 0, os.SEEK_END)
        try:
            view = memoryview(line)
            while view:  # os.write may write less than asked
                view = view[os.write(self.fd, view):]
            os.fsync(self.fd)
        except BaseException as e:  # a full disk, or Ctrl-C mid-record: no half a record left
            try:
                os.ftruncate(self.fd, end)
            except OSError:
                pass  # the next run's repair_torn_tail cuts a torn line off instead
            if isinstance(e, OSError):
                raise OSError(write_failure(self.path, e, "a record could not be written")) from None
            raise

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_failure(path, e, what):
    """The message for an output that cannot be written: which file, why, what to do."""
    advice = {errno.ENOSPC: "the disk is full: free some space",
              errno.EDQUOT: "the disk quota is used up: free some space",
              errno.EROFS: "the file system is read-only: write somewhere else",
              errno.EACCES: "no permission to write there: write somewhere else",
              errno.EISDIR: "it is a directory: give a file name"}.get(e.errno, "check the disk")
    return f"{path}: {what} ({e.strerror or e}); {advice}"


# ---- conversations -----------------------------------------------------------------------------

def _check_turns(turns, key):
    if not isinstance(turns, list):
        raise DataError(f"'{key}' is {_json_type(turns)}, not a list")
    if not turns:
        raise DataError(f"'{key}' is empty")
    for i, turn in enumerate(turns, 1):
        if not isinstance(turn, str):
            raise DataError(f"turn {i} of '{key}' is {_json_type(turn)}, not a string")
        if not turn.strip():
            raise DataError(f"turn {i} of '{key}' is empty")
    return turns


def _turns_from_messages(messages):
    """[{"role", "content"}, ...] -> [user, assistant, ...]. A leading system message has no
    place in LIMA's format (no roles, no system prompt): our decision is to put it in front of
    the first user turn, separated by a blank line."""
    if not isinstance(messages, list):
        raise DataError(f"'messages' is {_json_type(messages)}, not a list")
    turns, system = [], None
    for i, msg in enumerate(messages, 1):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise DataError(f"message {i} is not an object with 'role' and 'content'")
        role, content = msg["role"], msg["content"]
        if i == 1 and role == "system":
            system = content
            continue
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            raise DataError(f"message {i} has role {role!r}, expected {expected!r} (turns "
                            f"alternate user/assistant, starting with the user)")
        turns.append(content)
    _check_turns(turns, "messages")
    if system is not None:
        if not isinstance(system, str):
            raise DataError(f"the system message is {_json_type(system)}, not a string")
        if system.strip():
            turns[0] = system + "\n\n" + turns[0]
    return turns


def conversation_turns(row):
    """A row's turns, from 'conversations' (GAIR/lima) or 'messages'. Raises DataError."""
    if "conversations" in row:
        return _check_turns(row["conversations"], "conversations")
    if "messages" in row:
        return _turns_from_messages(row["messages"])
    raise DataError(f"no 'conversations' (GAIR/lima format) or 'messages' list; keys: "
                    f"{sorted(row)[:8]}")


def read_conversations(path):
    """A jsonl file -> [dict(turns=[user, assistant, ...], source=str, line=int)], as written
    (odd lengths included)."""
    rows = read_jsonl(path, lambda row: (conversation_turns(row), str(row.get("source", "unknown"))))
    if not rows:
        raise DataError(f"{path}: empty file, no conversations (expected one JSON object per line)")
    return [dict(turns=turns, source=source, line=n) for n, (turns, source) in rows]


def answered(conversations):
    """Training needs every user turn answered: a conversation of odd length loses its trailing
    user turn, flagged `dropped`; one that was a lone prompt disappears entirely.
    Returns (examples, number of lone prompts removed)."""
    examples, lone = [], 0
    for c in conversations:
        dropped = len(c["turns"]) % 2 == 1
        turns = c["turns"][:-1] if dropped else c["turns"]
        if not turns:
            lone += 1
            continue
        examples.append(dict(c, turns=turns, dropped=dropped))
    return examples, lone


def asked(example):
    """What an answered example asks: every turn before its last answer, whitespace aside. Two
    examples that ask the same are one prompt, for keeping dev prompts out of training."""
    return tuple(" ".join(t.split()) for t in example["turns"][:-1])


def carve_dev(examples, dev_size, seed):
    """The paper's 50-example dev set (LIMA §2) is not public: hold dev_size examples out of
    train, drawn by a seeded sample, so a seed always gives the same split. Drawn among the
    examples whose prompt appears once, so no dev prompt is also trained on (in a file without
    repeated prompts: all of them). Both halves keep file order."""
    counts = Counter(asked(ex) for ex in examples)
    once = [i for i, ex in enumerate(examples) if counts[asked(ex)] == 1]
    if dev_size < 0 or dev_size > len(once) or dev_size >= len(examples):
        raise DataError(f"--dev_size {dev_size} must be in [0, {min(len(once), len(examples) - 1)}]: "
                        f"the training file has {len(examples)} answered conversations, "
                        f"{len(once)} with a prompt that appears once (dev examples are drawn from "
                        f"those, and one example at least must stay for training)")
    held = {once[i] for i in random.Random(seed).sample(range(len(once)), dev_size)}
    train = [ex for i, ex in enumerate(examples) if i not in held]
    dev = [ex for i, ex in enumerate(examples) if i in held]
    return train, dev


# ---- tokenized splits --------------------------------------------------------------------------

def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 65535 else np.int32  # LLaMA's 32001 ids fit in 2 bytes


@dataclass
class Encoded:
    tokens: np.ndarray  # (N,) every kept example, concatenated
    mask: np.ndarray  # (N,) bool, True where the loss trains
    offsets: np.ndarray  # (n+1,) int64
    kept: list  # the examples encoded, in order (those with no trained token left are dropped)
    stats: dict


def encode_examples(examples, tokenizer, max_len, train_on_prompt=False, desc="tokenizing"):
    """Examples (even-length turns) -> one token stream, its loss mask and the boundaries.

    The layout is the tokenizer's encode_dialog, nothing else (LIMA §3):
        BOS user_1 EOT assistant_1 EOT user_2 EOT assistant_2 EOT ...
        0   0...   0   1...        1   0...   0   1...        1      <- mask
    Longer than max_len: keep the first max_len tokens (LIMA §3), counted. An example whose
    trained tokens all lie past max_len would teach nothing: it is dropped, counted.
    """
    dtype = token_dtype(tokenizer.vocab_size)
    tokens = array.array("H" if dtype == np.uint16 else "i")  # 2 or 4 bytes per token, not 28+
    mask = bytearray()
    offsets, kept, untrimmed = [0], [], []
    no_loss = 0
    for ex in tqdm(examples, desc=desc, unit="ex", file=sys.stderr,
                   disable=len(examples) < PROGRESS_EXAMPLES):
        t, m = tokenizer.encode_dialog(ex["turns"], train_on_prompt)
        full = len(t)
        t, m = t[:max_len], m[:max_len]
        if not any(m):
            no_loss += 1
            continue
        tokens.extend(t)
        mask.extend(m)
        offsets.append(len(tokens))
        kept.append(ex)
        untrimmed.append(full)
    tokens = np.frombuffer(tokens, dtype=dtype) if tokens else np.zeros(0, dtype)
    mask = np.frombuffer(bytes(mask), dtype=np.bool_)
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths, untrimmed = np.diff(offsets), np.asarray(untrimmed, dtype=np.int64)
    n = len(kept)
    stats = dict(
        examples=n,
        sources=dict(sorted(Counter(ex["source"] for ex in kept).items())),
        tokens=int(offsets[-1]),
        supervised_tokens=int(mask.sum()),
        len_mean=round(float(lengths.mean()), 1) if n else 0.0,
        len_median=float(np.median(lengths)) if n else 0.0,
        len_max=int(lengths.max()) if n else 0,
        len_max_untrimmed=int(untrimmed.max()) if n else 0,
        trimmed=int((untrimmed > max_len).sum()),
        multi_turn=sum(len(ex["turns"]) > 2 for ex in kept),
        dropped_turns=sum(ex["dropped"] for ex in kept),
        dropped_no_loss=no_loss,
    )
    return Encoded(tokens, mask, offsets, kept, stats)


def write_split(d, name, enc):
    np.save(os.path.join(d, f"{name}.tokens.npy"), enc.tokens)
    np.save(os.path.join(d, f"{name}.mask.npy"), enc.mask)
    np.save(os.path.join(d, f"{name}.offsets.npy"), enc.offsets)


@dataclass
class Split:
    tokens: np.ndarray  # (N,) memory-mapped, read-only
    mask: np.ndarray  # (N,) bool, memory-mapped
    offsets: np.ndarray  # (n+1,) int64, in memory

    def __len__(self):
        return len(self.offsets) - 1

    @property
    def lengths(self):
        return np.diff(self.offsets)

    def example(self, i):
        a, b = self.offsets[i], self.offsets[i + 1]
        return np.asarray(self.tokens[a:b]), np.asarray(self.mask[a:b])


def _missing(data_dir, what):
    return FileNotFoundError(
        f"{data_dir}: {what}. Run `python prepare_data.py --train ... --tokenizer ... "
        f"--out_dir {data_dir}` (or `python prepare_data.py --demo --out_dir {data_dir}`) first.")


META_FIELDS = {"tokenizer": str, "tokenizer_sha256": str, "eot_id": int, "vocab_size": int,
               "max_len": int}  # what the readers of meta.json rely on


def load_meta(data_dir):
    """meta.json of a prepared data dir. `tokenizer` falls back to a tokenizer.model inside the
    dir when the recorded path is gone (the dir was moved); train.py checks the sha256."""
    data_dir = os.fspath(data_dir)
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isdir(data_dir):
        raise _missing(data_dir, "no such directory")
    if not os.path.isfile(path):
        raise _missing(data_dir, "no meta.json, so this is not a prepared data directory")
    try:
        meta = files.read_json(path, "Run prepare_data.py again.")
    except ValueError as e:
        raise DataError(str(e)) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{path}: not written by this prepare_data.py (format "
                        f"{meta.get('format') if isinstance(meta, dict) else None!r}, expected "
                        f"{FORMAT!r}); run prepare_data.py again")
    wrong = [k for k, kind in META_FIELDS.items() if not isinstance(meta.get(k), kind)]
    if wrong:
        raise DataError(f"{path}: {', '.join(wrong)} missing or garbled; run prepare_data.py again")
    local = os.path.join(data_dir, "tokenizer.model")
    if not os.path.isfile(meta["tokenizer"]) and os.path.isfile(local):
        meta["tokenizer"] = os.path.abspath(local)
    meta["data_dir"] = data_dir
    return meta


def check_tokenizer(meta, tokenizer):
    """Data tokenized with one tokenizer must not train a model of another."""
    if tokenizer.sha256() != meta["tokenizer_sha256"] or tokenizer.eot_id != meta["eot_id"]:
        raise ValueError(
            f"{meta.get('data_dir', 'data')}: was tokenized with {meta['tokenizer']} (sha256 "
            f"{meta['tokenizer_sha256'][:12]}..., EOT id {meta['eot_id']}) but the model's "
            f"tokenizer is {tokenizer.path} (sha256 {tokenizer.sha256()[:12]}..., EOT id "
            f"{tokenizer.eot_id}). Run prepare_data.py again with --tokenizer {tokenizer.path}.")


def load_split(data_dir, split):
    """One split of a prepared dir ("train" or "dev"), memory-mapped: nothing is read until used."""
    data_dir = os.fspath(data_dir)
    load_meta(data_dir)  # a clear message for a missing or foreign dir
    arrays = {}
    for part in ("tokens", "mask", "offsets"):
        path = os.path.join(data_dir, f"{split}.{part}.npy")
        if not os.path.isfile(path):
            raise _missing(data_dir, f"no {split}.{part}.npy")
        try:  # allow_pickle stays False: an array file never runs code
            arrays[part] = np.load(path, mmap_mode="r" if part != "offsets" else None)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: unreadable ({e}); run prepare_data.py again") from None
    s = Split(**arrays)
    o = s.offsets
    if (s.tokens.shape != s.mask.shape or s.mask.dtype != np.bool_ or o.ndim != 1
            or len(o) == 0 or o[0] != 0 or o[-1] != len(s.tokens) or (np.diff(o) < 0).any()):
        raise DataError(f"{data_dir}: {split} arrays do not fit together (garbled or from "
                        f"different runs); run prepare_data.py again")
    return s


# ---- prompt files ------------------------------------------------------------------------------

def prompt_records(conversations):
    """For sampling: each conversation up to and including its last user turn; a final
    assistant turn, when there is one, is the held-out reference answer. A prompt's id is the
    index of its first occurrence, so a prompt listed k times is k samples of one prompt."""
    records, first = [], {}
    for i, c in enumerate(conversations):
        turns = c["turns"]
        rec = dict(source=c["source"], line=c["line"], turns=turns)
        if len(turns) % 2 == 0:
            rec.update(turns=turns[:-1], reference=turns[-1])
        records.append(dict(id=first.setdefault(tuple(rec["turns"]), i), **rec))
    return records


def _prompt_row(row):
    """One row of a prompt file -> {"turns", ...}: prepare_data.py's {"turns": [...]} as it is,
    {"prompt": "..."}, or a conversation (its last assistant turn becomes the reference)."""
    if "turns" in row:
        _check_turns(row["turns"], "turns")
        return row
    if "prompt" in row:
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise DataError("'prompt' is not a non-empty string")
        extra = {k: v for k, v in row.items() if k not in ("prompt", "response")}
        return dict(extra, turns=[row["prompt"]])
    turns = conversation_turns(row)
    extra = {k: v for k, v in row.items() if k not in ("conversations", "messages")}
    return dict(extra, turns=turns, source=str(row.get("source", "unknown")))


def read_prompts(path, split="dev"):
    """Prompts for sampling -> [{"turns": [user, ..., user], "id", ...}]:
    - a prepared data dir: its {split}_prompts.jsonl;
    - .jsonl / .json: prepare_data.py's prompt rows, {"prompt": "..."} rows, or conversations
      (GAIR/lima's test.jsonl; a final assistant turn is kept as "reference");
    - any other file: one prompt per non-empty line."""
    path = os.fspath(path)
    if os.path.isdir(path):
        folder, path = path, os.path.join(path, f"{split}_prompts.jsonl")
        if not os.path.isfile(path):
            raise _missing(folder, f"no {split}_prompts.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    if not path.endswith((".jsonl", ".json")):
        with open(path, encoding="utf-8", errors="strict") as f:
            try:
                lines = f.read().splitlines()
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        return [dict(id=i, line=n, turns=[line]) for i, (n, line) in
                enumerate((n, line) for n, line in enumerate(lines, 1) if line.strip())]
    rows = read_jsonl(path, _prompt_row)
    if all("id" in row and "line" in row for _, row in rows):
        return [row for _, row in rows]  # written by prepare_data.py
    convs = [dict(row, line=n, source=row.get("source")) for n, row in rows]
    records = []
    for conv, rec in zip(convs, prompt_records(convs)):
        extra = {k: v for k, v in conv.items() if k not in rec}
        records.append(dict(extra, **rec) if "id" not in conv else dict(extra, **dict(rec, id=conv["id"])))
    return records


# ---- generation files: sample.py writes them, evaluate.py reads them ---------------------------

def generation_record(index, turns, response, settings, extra):
    """One line of a generation file: {"index", "prompt", ["context",] "response", "settings",
    ...the prompt record's other fields}."""
    return {"index": index, "prompt": turns[-1], **({"context": turns[:-1]} if len(turns) > 1 else {}),
            "response": response, "settings": settings, **extra}


@dataclass
class Generation:
    where: str  # "file:line", for error messages
    id: object
    source: Optional[str]
    prompt: str  # as the judge sees it
    response: str
    sample: Optional[int] = None


def render_prompt(prompt):
    """A prompt is one user turn, or a conversation ending on one (LIMA §3). The paper's
    question has one 'Question:' slot; earlier turns are shown in it with their roles."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1:
        return prompt[0]
    return "\n\n".join(f"{'User' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(prompt))


def _generation(row):
    for name in ("prompt", "response"):
        if name not in row:
            raise DataError(f"missing field '{name}' (sample.py --out writes prompt, response, "
                            f"settings; id and source when known)")
    prompt = row["prompt"]
    ok = isinstance(prompt, str) or (isinstance(prompt, list) and prompt
                                     and all(isinstance(t, str) for t in prompt))
    if not ok:
        raise DataError("'prompt' must be a string or a list of turns (strings)")
    context = row.get("context", [])  # sample.py: the turns before the last user turn
    if not (isinstance(context, list) and all(isinstance(t, str) for t in context)):
        raise DataError("'context' must be a list of turns (strings)")
    if not isinstance(row["response"], str):
        raise DataError(f"'response' must be a string, got {_json_type(row['response'])}")
    gid = row.get("id")
    if gid is not None and not isinstance(gid, (str, int)):
        raise DataError("'id' must be a string or an integer")
    sample = row.get("sample")
    if sample is not None and not isinstance(sample, int):
        raise DataError("'sample' must be an integer")
    if context:
        prompt = context + ([prompt] if isinstance(prompt, str) else prompt)
    return gid, row.get("source"), render_prompt(prompt), row["response"], sample


def read_generations(path):
    """A generation file -> [Generation], every row checked."""
    rows = read_jsonl(path, _generation)
    if not rows:
        raise DataError(f"{path}: no generations in this file")
    return [Generation(f"{path}:{n}", *fields) for n, fields in rows]


def _squash(text):
    return " ".join(text.split())


def same_prompt(a, b):
    """Two renderings of a prompt are the same prompt, whitespace aside."""
    return _squash(a) == _squash(b)


def prompt_key(gid, prompt, by_id):
    """Prompts are matched by id when every row has one, else by their text (whitespace aside)."""
    return ("id", gid) if by_id else ("prompt", _squash(prompt))


def describe(key):
    kind, value = key
    return f"id {value!r}" if kind == "id" else f"prompt {value[:60]!r}"
