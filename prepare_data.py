"""LIMA's conversations, tokenized in its chat format, as memory-mappable arrays for train.py.

    python prepare_data.py --train lima/train.jsonl --test lima/test.jsonl \\
        --tokenizer llama-7b/tokenizer.model --out_dir data/lima
    # Llama 3.x: its tokenizer.json (Hugging Face layout) or tokenizer.model (Meta's, tiktoken)
    python prepare_data.py --train lima/train.jsonl --test lima/test.jsonl \\
        --tokenizer Llama-3.2-1B/tokenizer.json --out_dir data/lima-llama3
    python prepare_data.py --demo --out_dir data/demo   # the built-in demo set, for demo/base

Input (LIMA §2): GAIR/lima's jsonl, one {"conversations": [user, assistant, ...], "source": ...}
per line (`"source": "multi_turn"` marks its 30 dialogues), or the common
{"messages": [{"role": "user" | "assistant", "content": ...}, ...]} of other SFT sets.

Output in out_dir, replaced only when the whole run succeeds: the prepared-data directory
(data.py describes its files).
"""

import os
import shutil
import sys
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

import numpy as np

import files
from config import check_ranges, parse_config
from data import (FORMAT, DataError, answered, asked, carve_dev, encode_examples, prompt_records,
                  read_conversations, token_dtype, write_jsonl, write_split)
from tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.abspath(__file__))
# the demo: 1,000 curated examples (+ 30 dialogues), its 50-example dev set and held-out prompts
# (demo/make_demo.py), tokenized for the small pretrained base model shipped in demo/base
DEMO_TRAIN = os.path.join(ROOT, "demo", "train.jsonl")
DEMO_DEV = os.path.join(ROOT, "demo", "dev.jsonl")
DEMO_TEST = os.path.join(ROOT, "demo", "test.jsonl")
DEMO_TOKENIZER = os.path.join(ROOT, "demo", "base", "tokenizer.model")


@dataclass
class PrepareConfig:
    """Tokenize LIMA-format conversations for train.py (LIMA §3)."""
    train: Optional[str] = field(default=None, metadata={
        "help": "training conversations, jsonl: GAIR/lima's train.jsonl or a 'messages' file"})
    test: Optional[str] = field(default=None, metadata={
        "help": "test prompts (GAIR/lima's test.jsonl), written to test_prompts.jsonl for sampling"})
    dev_file: Optional[str] = field(default=None, metadata={
        "help": "held-out dev conversations; without it, --dev_size examples are carved from --train"})
    dev_size: int = field(default=50, metadata={
        "help": "examples held out of --train as the dev set (LIMA §2: a dev set of 50); 0 for none", "min": 0})
    allow_dev_overlap: bool = field(default=False, metadata={
        "help": "keep dev examples whose prompt is also in train (reported either way)"})
    tokenizer: Optional[str] = field(default=None, metadata={
        "help": "the base model's tokenizer.model (SentencePiece, or Llama 3's tiktoken), tokenizer.json, "
                "or its directory; EOT is Llama 3's <|eot_id|>, else a new id (the vocabulary size)"})
    out_dir: Optional[str] = field(default=None, metadata={
        "help": "output directory; None: data/lima, or data/demo with --demo"})
    max_len: int = field(default=2048, metadata={
        "help": "examples longer than this many tokens are trimmed, keeping the start (LIMA §3); "
                "at least BOS and one token", "min": 2})
    train_on_prompt: bool = field(default=False, metadata={
        "help": "train on every token, not only the assistant's turns (our default: off)"})
    seed: int = field(default=1337, metadata={"help": "seed of the dev split", "min": 0})
    demo: bool = field(default=False, metadata={
        "help": "prepare the built-in demo set (demo/*.jsonl) with the tokenizer of demo/base"})


# ----------------------------------------------------------------------------------------------

def check_out_dir(out_dir):
    """Replacing out_dir deletes it: only ever replace an empty dir or an earlier output."""
    if not os.path.lexists(out_dir):
        return
    if not os.path.isdir(out_dir) or os.path.islink(out_dir):
        raise DataError(f"{out_dir}: exists and is not a directory; choose another --out_dir")
    if os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, "meta.json")):
        raise DataError(f"{out_dir}: exists, is not empty and holds no meta.json of an earlier "
                        f"prepare_data.py run; refusing to replace it. Choose another --out_dir.")


def dev_in_train(train, dev):
    """Dev examples whose prompt (data.asked) is also a training example's: the model would have
    been trained on the answer the dev set asks for. -> [(dev example, train example)]."""
    seen = {}
    for ex in train:
        seen.setdefault(asked(ex), ex)
    return [(ex, seen[asked(ex)]) for ex in dev if asked(ex) in seen]


def describe_overlap(pairs, train_path, dev_path):
    shown = "; ".join(f"{dev_path}:{d['line']} = {train_path}:{t['line']} ({d['turns'][0][:40]!r})"
                      for d, t in pairs[:MAX_SHOWN])
    more = f"; and {len(pairs) - MAX_SHOWN} more" if len(pairs) > MAX_SHOWN else ""
    return f"{len(pairs)} dev examples have a prompt that is also in train: {shown}{more}"


MAX_SHOWN = 3


# ----------------------------------------------------------------------------------------------

def prepare(cfg):
    """Validate everything, then write into a temp dir beside out_dir and swap it in."""
    if cfg.demo:
        cfg = replace(cfg, train=cfg.train or DEMO_TRAIN, test=cfg.test or DEMO_TEST,
                      dev_file=cfg.dev_file or DEMO_DEV, tokenizer=cfg.tokenizer or DEMO_TOKENIZER)
    if cfg.train is None:
        raise DataError("pass --train PATH/train.jsonl (GAIR/lima format), or --demo")
    if cfg.tokenizer is None:
        raise DataError("pass --tokenizer PATH/tokenizer.model or tokenizer.json (the base "
                        "model's), or --demo")
    check_ranges(cfg)  # parse_config did, unless cfg was built in code
    out_dir = os.path.abspath(cfg.out_dir or ("data/demo" if cfg.demo else "data/lima"))

    # read and check every input before anything is written
    tokenizer = load_tokenizer(cfg.tokenizer)
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
    overlap = dev_in_train(train, dev)
    if overlap:
        what = describe_overlap(overlap, cfg.train, cfg.dev_file or cfg.train)
        if not cfg.allow_dev_overlap:
            raise DataError(f"{what}. A dev set that was trained on measures nothing: remove "
                            f"them from one of the files, or pass --allow_dev_overlap to keep them.")
        print(f"prepare_data.py: warning: {what} (kept: --allow_dev_overlap)", file=sys.stderr)
    if test_conv is not None:
        inputs["test"] = dict(path=os.path.abspath(cfg.test), rows=len(test_conv))
    check_out_dir(out_dir)

    tmp = files.make_temp_dir(out_dir)
    try:
        tokenizer_path = os.path.abspath(tokenizer.path)  # the file, if a folder was given
        enc = {name: encode_examples(exs, tokenizer, cfg.max_len, cfg.train_on_prompt,
                                     desc=f"tokenizing {name}")
               for name, exs in (("train", train), ("dev", dev))}
        if not enc["train"].kept:
            raise DataError(f"{cfg.train}: no example keeps a trained token within "
                            f"--max_len {cfg.max_len}")
        for name, e in enc.items():
            write_split(tmp, name, e)
        write_jsonl(os.path.join(tmp, "dev_prompts.jsonl"), prompt_records(enc["dev"].kept))
        if test_conv is not None:
            write_jsonl(os.path.join(tmp, "test_prompts.jsonl"), prompt_records(test_conv))
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
            dev_in_train=len(overlap),
            test_prompts=len(test_conv) if test_conv is not None else 0,
            inputs=inputs,
            splits={name: e.stats for name, e in enc.items()},
            config=asdict(cfg),
        )
        files.write_json(os.path.join(tmp, "meta.json"), meta)
        files.swap_dir(tmp, out_dir)
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
    if meta["dev_in_train"]:
        lines.append(f"dev   {meta['dev_in_train']:,} examples with a prompt also in train (--allow_dev_overlap)")
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
    except OSError as e:  # a full or read-only disk, a missing file: one line, no traceback
        print(f"prepare_data.py: error: {files.explain(e) if e.filename else e}", file=sys.stderr)
        sys.exit(1)
    except ValueError as e:  # bad input (DataError): the message, no traceback
        print(f"prepare_data.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    print(summary(meta))
    return meta


if __name__ == "__main__":
    main()
