"""LIMA's conversations, tokenized in its chat format, as memory-mappable arrays for train.py.

    python prepare_data.py --train lima/train.jsonl --test lima/test.jsonl \\
        --tokenizer llama-7b/tokenizer.model --out_dir data/lima
    python prepare_data.py --demo --out_dir data/demo   # built-in demo set + a tokenizer for it

Input (LIMA.md §3): GAIR/lima's jsonl, one {"conversations": [user, assistant, ...], "source": ...}
per line (`"source": "multi_turn"` marks its 30 dialogues), or the common
{"messages": [{"role": "user" | "assistant", "content": ...}, ...]} of other SFT sets.

Output in out_dir (replaced only when the whole run succeeds):
    meta.json                   tokenizer path + sha256, BOS/EOS/EOT ids, settings, statistics
    {train,dev}.tokens.npy      every example of the split, concatenated (uint16, or int32 for
                                vocabularies past 65535)
    {train,dev}.mask.npy        bool, True where the loss trains (assistant tokens + their EOT)
    {train,dev}.offsets.npy     int64, n+1 boundaries: example i is tokens[offsets[i]:offsets[i+1]]
    dev_prompts.jsonl           {"id", "source", "turns": [user, ..., user], "reference"} per dev
                                example, for sampling; test_prompts.jsonl likewise from --test
    tokenizer.model             (--demo only) the SentencePiece model trained on the demo set
Readers for train.py / sample.py: load_meta, load_split, load_prompts, check_tokenizer.
"""

import array
import io
import json
import os
import random
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

import numpy as np
from tqdm import tqdm

from config import parse_config
from tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.abspath(__file__))
DEMO_TRAIN = os.path.join(ROOT, "demo", "train.jsonl")
DEMO_TEST = os.path.join(ROOT, "demo", "test.jsonl")
DEMO_VOCAB_SIZE = 1024  # small enough for a from-scratch CPU model, big enough for whole words
FORMAT = "lima-tokens-v1"  # bump when the layout changes, so old data dirs are refused clearly
MAX_REPORTED = 5  # bad lines quoted in an error message before "... and N more"
PROGRESS_BYTES = 8 << 20  # show progress bars for inputs past ~8 MB (LIMA itself is ~3 MB)
PROGRESS_EXAMPLES = 10_000


@dataclass
class PrepareConfig:
    """Tokenize LIMA-format conversations for train.py (LIMA.md §3)."""
    train: Optional[str] = field(default=None, metadata={
        "help": "training conversations, jsonl: GAIR/lima's train.jsonl or a 'messages' file"})
    test: Optional[str] = field(default=None, metadata={
        "help": "test prompts (GAIR/lima's test.jsonl), written to test_prompts.jsonl for sampling"})
    dev_file: Optional[str] = field(default=None, metadata={
        "help": "held-out dev conversations; without it, --dev_size examples are carved from --train"})
    dev_size: int = field(default=50, metadata={
        "help": "examples held out of --train as the dev set (LIMA §2: a dev set of 50); 0 for none"})
    tokenizer: Optional[str] = field(default=None, metadata={
        "help": "the base model's tokenizer.model (SentencePiece); EOT is added as id vocab_size"})
    out_dir: Optional[str] = field(default=None, metadata={
        "help": "output directory; None: data/lima, or data/demo with --demo"})
    max_len: int = field(default=2048, metadata={
        "help": "examples longer than this many tokens are trimmed, keeping the start (LIMA §3)"})
    train_on_prompt: bool = field(default=False, metadata={
        "help": "train on every token, not only the assistant's turns (LIMA.md §3 default: off)"})
    seed: int = field(default=1337, metadata={"help": "seed of the dev split"})
    demo: bool = field(default=False, metadata={
        "help": "prepare the built-in demo set (demo/*.jsonl) and train a small tokenizer for it"})


class DataError(ValueError):
    """Bad input; the message reads `file:line: what is wrong`."""


# ----------------------------------------------------------------------------------------------
# Reading and validating conversations

def _json_type(x):
    names = {dict: "an object", list: "a list", str: "a string", bool: "true/false",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(x), type(x).__name__)


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


def parse_line(raw):
    """One line of jsonl -> (turns, source), or None for a blank line. Raises DataError."""
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
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object per line, got {_json_type(row)}")
    if "conversations" in row:
        turns = _check_turns(row["conversations"], "conversations")
    elif "messages" in row:
        turns = _turns_from_messages(row["messages"])
    else:
        raise DataError(f"no 'conversations' (GAIR/lima format) or 'messages' list; keys: "
                        f"{sorted(row)[:8]}")
    return turns, str(row.get("source", "unknown"))


def read_conversations(path):
    """A jsonl file -> [dict(turns=[user, assistant, ...], source=str, line=int)], as written
    (odd lengths included). Every line is checked; the first few bad ones are reported."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    size = os.path.getsize(path)
    rows, errors, n_bad = [], [], 0
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, file=sys.stderr,
                                     desc=f"reading {os.path.basename(path)}",
                                     disable=size < PROGRESS_BYTES) as bar:
        for line_no, raw in enumerate(f, 1):
            bar.update(len(raw))
            try:
                parsed = parse_line(raw)
            except DataError as e:
                n_bad += 1
                if len(errors) < MAX_REPORTED:
                    errors.append(f"{path}:{line_no}: {e}")
                continue
            if parsed is not None:
                rows.append(dict(turns=parsed[0], source=parsed[1], line=line_no))
    if n_bad == 1:
        raise DataError(errors[0])
    if n_bad:
        more = f"\n  ... and {n_bad - len(errors)} more" if n_bad > len(errors) else ""
        raise DataError(f"{path}: {n_bad} bad lines, the first {len(errors)}:\n  "
                        + "\n  ".join(errors) + more)
    if not rows:
        raise DataError(f"{path}: empty file, no conversations (expected one JSON object per line)")
    return rows


def answered(conversations):
    """Training needs every user turn answered: a conversation of odd length loses its trailing
    user turn (LIMA.md §3), flagged `dropped`; one that was a lone prompt disappears entirely.
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


def carve_dev(examples, dev_size, seed):
    """The paper's 50-example dev set (LIMA §2) is not public (LIMA.md §3): hold dev_size
    examples out of train, drawn by a seeded sample, so a seed always gives the same split.
    Both halves keep file order."""
    if dev_size < 0 or dev_size >= len(examples):
        raise DataError(f"--dev_size {dev_size} must be in [0, {len(examples)}): the training "
                        f"file has {len(examples)} answered conversations")
    held = set(random.Random(seed).sample(range(len(examples)), dev_size))
    train = [ex for i, ex in enumerate(examples) if i not in held]
    dev = [ex for i, ex in enumerate(examples) if i in held]
    return train, dev


# ----------------------------------------------------------------------------------------------
# Tokenizing

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

    The layout is the tokenizer's encode_dialog, nothing else (LIMA.md §3):
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


def prompt_record(i, conversation):
    """For sampling: the conversation up to and including its last user turn; a final
    assistant turn, when there is one, is the held-out reference answer."""
    turns = conversation["turns"]
    rec = dict(id=i, source=conversation["source"], line=conversation["line"])
    if len(turns) % 2 == 0:
        return dict(rec, turns=turns[:-1], reference=turns[-1])
    return dict(rec, turns=turns)


def train_demo_tokenizer(texts, path, vocab_size=DEMO_VOCAB_SIZE):
    """A small SentencePiece BPE for the demo, trained on the demo's own text, with LLaMA's
    settings: unk 0, BOS 1, EOS 2, no pad, digits split, byte fallback, no normalization.
    Trained from an iterator into memory, so the file (and its sha256) is the same every run."""
    import sentencepiece as spm
    model = io.BytesIO()
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(texts), model_writer=model, model_type="bpe",
        vocab_size=vocab_size, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
        split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, character_coverage=1.0, num_threads=1,
        minloglevel=2)
    with open(path, "wb") as f:
        f.write(model.getvalue())


# ----------------------------------------------------------------------------------------------
# Writing (atomically) and reading back

def write_split(d, name, enc):
    np.save(os.path.join(d, f"{name}.tokens.npy"), enc.tokens)
    np.save(os.path.join(d, f"{name}.mask.npy"), enc.mask)
    np.save(os.path.join(d, f"{name}.offsets.npy"), enc.offsets)


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def check_out_dir(out_dir):
    """Replacing out_dir deletes it: only ever replace an empty dir or an earlier output."""
    if not os.path.lexists(out_dir):
        return
    if not os.path.isdir(out_dir) or os.path.islink(out_dir):
        raise DataError(f"{out_dir}: exists and is not a directory; choose another --out_dir")
    if os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, "meta.json")):
        raise DataError(f"{out_dir}: exists, is not empty and holds no meta.json of an earlier "
                        f"prepare_data.py run; refusing to replace it. Choose another --out_dir.")


def replace_dir(tmp, out_dir):
    """Swap the finished tmp dir in: move the old out_dir aside, rename, delete the old one."""
    old = None
    if os.path.lexists(out_dir):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-",
                               dir=os.path.dirname(out_dir))
        old = os.path.join(old, "data")
        os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.rename(old, out_dir)
            shutil.rmtree(os.path.dirname(old))
        raise
    if old is not None:
        shutil.rmtree(os.path.dirname(old))


def _missing(data_dir, what):
    return FileNotFoundError(
        f"{data_dir}: {what}. Run `python prepare_data.py --train ... --tokenizer ... "
        f"--out_dir {data_dir}` (or `python prepare_data.py --demo --out_dir {data_dir}`) first.")


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
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable ({e}); run prepare_data.py again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{path}: not written by this prepare_data.py (format "
                        f"{meta.get('format') if isinstance(meta, dict) else None!r}, expected "
                        f"{FORMAT!r}); run prepare_data.py again")
    local = os.path.join(data_dir, "tokenizer.model")
    if not os.path.isfile(meta["tokenizer"]) and os.path.isfile(local):
        meta["tokenizer"] = os.path.abspath(local)
    meta["data_dir"] = data_dir
    return meta


def check_tokenizer(meta, tokenizer):
    """For train.py: data tokenized with one tokenizer must not train a model of another."""
    if tokenizer.sha256() != meta["tokenizer_sha256"] or tokenizer.eot_id != meta["eot_id"]:
        raise ValueError(
            f"{meta.get('data_dir', 'data')}: was tokenized with {meta['tokenizer']} (sha256 "
            f"{meta['tokenizer_sha256'][:12]}..., EOT id {meta['eot_id']}) but the model's "
            f"tokenizer is {tokenizer.path} (sha256 {tokenizer.sha256()[:12]}..., EOT id "
            f"{tokenizer.eot_id}). Run prepare_data.py again with --tokenizer {tokenizer.path}.")


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


def load_split(data_dir, split):
    """One split of a prepared dir ("train" or "dev"), memory-mapped: nothing is read until used."""
    data_dir = os.fspath(data_dir)
    load_meta(data_dir)  # a clear message for a missing or foreign dir
    arrays = {}
    for part in ("tokens", "mask", "offsets"):
        path = os.path.join(data_dir, f"{split}.{part}.npy")
        if not os.path.isfile(path):
            raise _missing(data_dir, f"no {split}.{part}.npy")
        try:
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


def load_prompts(path_or_dir, split="dev"):
    """Prompts for sampling: `{split}_prompts.jsonl` of a prepared dir, a file of such records,
    or a raw GAIR/lima / messages jsonl (e.g. GAIR/lima's test.jsonl) read the same way."""
    path = os.fspath(path_or_dir)
    ours = os.path.isdir(path)
    if ours:
        path = os.path.join(path, f"{split}_prompts.jsonl")
        if not os.path.isfile(path):
            raise _missing(os.fspath(path_or_dir), f"no {split}_prompts.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    try:
        records = [json.loads(line) for line in lines]
    except ValueError:
        records = None  # not ours: read_conversations names the bad line
    if records is not None and (ours or records) and all(
            isinstance(r, dict) and isinstance(r.get("turns"), list) for r in records):
        return records
    if ours:
        raise DataError(f"{path}: garbled (not one {{'turns': [...]}} per line); run "
                        f"prepare_data.py again")
    return [prompt_record(i, c) for i, c in enumerate(read_conversations(path))]


# ----------------------------------------------------------------------------------------------

def prepare(cfg):
    """Validate everything, then write into a temp dir beside out_dir and swap it in."""
    if cfg.demo:
        cfg = replace(cfg, train=cfg.train or DEMO_TRAIN, test=cfg.test or DEMO_TEST)
    if cfg.train is None:
        raise DataError("pass --train PATH/train.jsonl (GAIR/lima format), or --demo")
    if cfg.tokenizer is None and not cfg.demo:
        raise DataError("pass --tokenizer PATH/tokenizer.model (the base model's), or --demo")
    if cfg.max_len < 2:
        raise DataError(f"--max_len {cfg.max_len}: need room for BOS and at least one token")
    out_dir = os.path.abspath(cfg.out_dir or ("data/demo" if cfg.demo else "data/lima"))

    # read and check every input before anything is written
    tokenizer = Tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    train_conv = read_conversations(cfg.train)
    dev_conv = read_conversations(cfg.dev_file) if cfg.dev_file else None
    test_conv = read_conversations(cfg.test) if cfg.test else None
    train, lone = answered(train_conv)
    if not train:
        raise DataError(f"{cfg.train}: no answered conversation to train on (every row is a "
                        f"lone user prompt: is this a test file?)")
    inputs = {"train": dict(path=os.path.abspath(cfg.train), rows=len(train_conv),
                            lone_prompts=lone)}
    if dev_conv is not None:
        dev, dev_lone = answered(dev_conv)
        if not dev:
            raise DataError(f"{cfg.dev_file}: no answered conversation (every row is a lone "
                            f"user prompt); a dev example needs a reference answer")
        inputs["dev"] = dict(path=os.path.abspath(cfg.dev_file), rows=len(dev_conv),
                             lone_prompts=dev_lone)
    else:
        train, dev = carve_dev(train, cfg.dev_size, cfg.seed)
    if test_conv is not None:
        inputs["test"] = dict(path=os.path.abspath(cfg.test), rows=len(test_conv))
    check_out_dir(out_dir)

    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-",
                           dir=os.path.dirname(out_dir))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the data dir is an ordinary one
        if tokenizer is None:  # --demo: a tokenizer made for the demo text, shipped with the data
            texts = [t for ex in train_conv for t in ex["turns"]]
            train_demo_tokenizer(texts, os.path.join(tmp, "tokenizer.model"))
            tokenizer = Tokenizer(os.path.join(tmp, "tokenizer.model"))
            tokenizer_path = os.path.join(out_dir, "tokenizer.model")
        else:
            tokenizer_path = os.path.abspath(cfg.tokenizer)
        enc = {name: encode_examples(exs, tokenizer, cfg.max_len, cfg.train_on_prompt,
                                     desc=f"tokenizing {name}")
               for name, exs in (("train", train), ("dev", dev))}
        if not enc["train"].kept:
            raise DataError(f"{cfg.train}: no example keeps a trained token within "
                            f"--max_len {cfg.max_len}")
        for name, e in enc.items():
            write_split(tmp, name, e)
        write_jsonl(os.path.join(tmp, "dev_prompts.jsonl"),
                    [prompt_record(i, ex) for i, ex in enumerate(enc["dev"].kept)])
        if test_conv is not None:
            write_jsonl(os.path.join(tmp, "test_prompts.jsonl"),
                        [prompt_record(i, c) for i, c in enumerate(test_conv)])
        meta = dict(
            format=FORMAT,
            tokenizer=tokenizer_path,
            tokenizer_sha256=tokenizer.sha256(),
            bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, eot_id=tokenizer.eot_id,
            vocab_size=tokenizer.vocab_size,
            token_dtype=np.dtype(token_dtype(tokenizer.vocab_size)).name,
            max_len=cfg.max_len, train_on_prompt=cfg.train_on_prompt, seed=cfg.seed,
            dev_size=len(enc["dev"].kept),
            dev_lines=[ex["line"] for ex in enc["dev"].kept],  # lines of --dev_file or --train
            test_prompts=len(test_conv) if test_conv is not None else 0,
            inputs=inputs,
            splits={name: e.stats for name, e in enc.items()},
            config=asdict(cfg),
        )
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, ensure_ascii=False)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    meta["data_dir"] = out_dir
    return meta


def summary(meta):
    lines = []
    for name, s in meta["splits"].items():
        share = s["supervised_tokens"] / max(s["tokens"], 1)
        sources = ", ".join(f"{k} {v:,}" for k, v in s["sources"].items())
        lines += [
            f"{name:5s} {s['examples']:,} examples ({sources})",
            f"      tokens {s['tokens']:,}, supervised {s['supervised_tokens']:,} ({share:.0%})",
            f"      length mean {s['len_mean']:,.1f}, median {s['len_median']:,.0f}, max "
            f"{s['len_max']:,} (before trimming {s['len_max_untrimmed']:,}); trimmed at "
            f"{meta['max_len']:,}: {s['trimmed']:,}",
            f"      multi-turn {s['multi_turn']:,}; trailing user turns dropped "
            f"{s['dropped_turns']:,}; dropped with no trained token left {s['dropped_no_loss']:,}",
        ]
    for name, inp in meta["inputs"].items():
        if inp.get("lone_prompts"):
            lines.append(f"{name}: {inp['lone_prompts']:,} rows were a lone user prompt, skipped")
    if meta["test_prompts"]:
        lines.append(f"test  {meta['test_prompts']:,} prompts")
    lines.append(f"wrote {meta['data_dir']} (tokenizer {meta['tokenizer']}, sha256 "
                 f"{meta['tokenizer_sha256'][:12]}..., EOT id {meta['eot_id']}, vocab "
                 f"{meta['vocab_size']:,})")
    return "\n".join(lines)


def main(argv=None):
    cfg = parse_config(PrepareConfig, argv)
    try:
        meta = prepare(cfg)
    except (DataError, FileNotFoundError, ValueError) as e:  # bad input: the message, no traceback
        print(f"prepare_data.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    print(summary(meta))
    return meta


if __name__ == "__main__":
    main()
