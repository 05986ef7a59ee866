"""Evaluation as in the paper (LIMA §4-5, LIMA.md §6), with no network: pairwise preference
between two systems' answers to the same prompts, judged by a person or a local judge model;
agreement between two judges; and the 1-6 helpfulness grade of the ablations.

    # each system answers the 300 test prompts (LIMA §5 decoding)
    python sample.py --checkpoint out/lima --prompt_file data/test.jsonl --out gen_lima.jsonl
    # a person judges, one pair at a time; stop any time (q), rerun the same command to go on
    # (several annotators: --judge_name alice --out alice.jsonl, and so on)
    python evaluate.py pairwise --a gen_lima.jsonl --b gen_base.jsonl --judge human --out human.jsonl
    # a local judge model (any checkpoint checkpoint.py reads), asked both A/B orders
    python evaluate.py pairwise --a gen_lima.jsonl --b gen_base.jsonl --judge out/judge \
        --both_orders --out judge.jsonl
    python evaluate.py report human.jsonl judge.jsonl --chart results.png
    python evaluate.py agreement human.jsonl judge.jsonl
    # LIMA §5 ablations: 5 samples per prompt (list each prompt 5 times in the prompt file),
    # each graded 1-6 by a judge model
    python evaluate.py helpfulness --gen samples_7b.jsonl --judge out/judge --out grades.jsonl
    python evaluate.py report grades.jsonl

Inputs are generation files written by `sample.py --prompt_file ... --out` (JSON lines with at
least "prompt" and "response"; "context" for the earlier turns of a conversation; "id" and
"source" when the prompt file had them). A baseline's answers from elsewhere work too, written
in that shape. Prompts are matched by "id" when every row has one, else by their text.

Judgement labels name the generation FILES ("a", "b", "tie"), with the display order undone,
so nothing downstream depends on which answer was shown first. Every judgement, parsed or
not, is appended to --out the moment it is made: the raw judgements are the result.
"""

import json
import os
import random
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial
from typing import Optional

import numpy as np

import config

# ---- the paper's instruments -----------------------------------------------------------------

# LIMA Appendix C (LIMA.md §6), verbatim: what the annotators and GPT-4 were asked.
PAIRWISE_QUESTION = (
    "Imagine that you have a super-intelligent AI assistant, and that you require help with the "
    "following question. Which answer best satisfies your needs?\n"
    "Question: {prompt}\n"
    "Answer A: {answer_a}\n"
    "Answer B: {answer_b}\n"
    "Comparing these two answers, which answer is better?\n"
    "- Answer A is significantly better.\n"
    "- Answer B is significantly better.\n"
    "- Neither is significantly better.")

# LIMA Appendix D, the ChatGPT helpfulness prompt of the §5 ablations, verbatim (its typos
# included; typographic quotes as ASCII). The judge reasons, then ends on the score alone.
HELPFULNESS_PROMPT = """You are evaluating a response that has been submitted for a particular task, using a specific set of standards. Below is the data:
[BEGIN DATA]
***
[Task]: {task}
***
[Submission]: {submission}
***
[Criterion]: helpfulness:
"1": "Not helpful - The generated text is completely irrelevant, unclear, or incomplete. It does not provide any useful information to the user."
"2": "Somewhat helpful - The generated text has some relevance to the user's question, but it may be unclear or incomplete. It provides only partial information, or the information provided may not be useful for the user's needs."
"3": "Moderately helpful - The generated text is relevant to the user's question, and it provides a clear and complete answer. However, it may lack detail or explanation that would be helpful for the user."
"4": "Helpful - The generated text is quite relevant to the user's question, and it provides a clear, complete, and detailed answer. It offers additional information or explanations that are useful for the user. However, some of the points of the response are somewhat repetitive or could be combined for greater clarity and concision"
"5": "Very helpful - The generated text is highly relevant to the user's question, and it provides a clear, complete, and detailed answer. It offers additional information, explanations, or analogies that are not only useful but also insightful and valuable to the user. However, the structured of the response is not well-organized and there is no clear progression or logical sequence of different points in the response."
"6": "Highly helpful - The generated text provides a clear, complete, and detailed answer. It offers additional information or explanations that are not only useful but also insightful and valuable to the user. The response is also in a logical and easy-to-follow manner by explicitly using headings, bullet points, or numbered lists to break up the information and make it easier to read."
***
[END DATA]
Does the submission meet the criterion? First, write out in a step by step manner your reasoning about the criterion to be sure that your conclusion is correct. Avoid simply stating the correct answers at the outset. Then print the choice only from "1, 2, 3, 4, 5, 6" (without quotes or punctuation) on its own line corresponding to the correct answer. At the end, repeat just the selected choice again by itself on a new line."""

LABELS = ("a", "tie", "b")  # in terms of the files; "skip" (a person passed) and None (unparseable) are not outcomes


class EvalError(Exception):
    """A problem with the user's files or flags: printed as one line, no traceback."""


# ---- configuration: one dataclass per subcommand ----------------------------------------------

@dataclass
class PairwiseConfig:
    """LIMA §4: which of two answers better satisfies the need, or neither."""
    a: str = field(default="", metadata={"help": "generations of the system under test (e.g. LIMA)"})
    b: str = field(default="", metadata={"help": "generations of the system it is compared with, same prompts"})
    judge: str = field(default="human", metadata={"help": "'human' (you, in this terminal) or a checkpoint directory"})
    out: str = field(default="", metadata={"help": "judgements (JSON lines), appended as they are made; rerun to resume"})
    both_orders: bool = field(default=False, metadata={"help": "ask every pair in both A/B orders: cancels position bias"})
    seed: int = field(default=0, metadata={"help": "seeds each prompt's A/B order (recorded)"})
    judge_name: Optional[str] = field(default=None, metadata={"help": "recorded as 'judge'; default: --judge"})
    # judge model only
    tokenizer: Optional[str] = field(default=None, metadata={"help": "judge's tokenizer.model if not in its directory"})
    max_new_tokens: int = field(default=256, metadata={"help": "judge's answer length (greedy, stops at EOT)"})
    batch_size: int = field(default=8, metadata={"help": "questions per judge forward pass"})
    device: str = field(default="auto", metadata={"help": "cuda, cpu, or auto"})
    dtype: str = field(default="auto", metadata={"help": "bfloat16, float16, float32, or auto (bf16 on GPU)"})
    bootstrap: int = field(default=2000, metadata={"help": "bootstrap resamples for the summary's 95% CIs"})


@dataclass
class HelpfulnessConfig:
    """LIMA §5: each sampled response graded 1-6 by a judge model; mean with a 95% CI."""
    gen: str = field(default="", metadata={"help": "generations, several samples per prompt allowed"})
    judge: str = field(default="", metadata={"help": "checkpoint directory of the judge model"})
    out: str = field(default="", metadata={"help": "grades (JSON lines), appended as they are made; rerun to resume"})
    judge_name: Optional[str] = field(default=None, metadata={"help": "recorded as 'judge'; default: --judge"})
    tokenizer: Optional[str] = field(default=None, metadata={"help": "judge's tokenizer.model if not in its directory"})
    max_new_tokens: int = field(default=512, metadata={"help": "room for the step-by-step reasoning before the score"})
    batch_size: int = field(default=8, metadata={"help": "questions per judge forward pass"})
    device: str = field(default="auto", metadata={"help": "cuda, cpu, or auto"})
    dtype: str = field(default="auto", metadata={"help": "bfloat16, float16, float32, or auto (bf16 on GPU)"})
    bootstrap: int = field(default=2000, metadata={"help": "bootstrap resamples for the summary's 95% CIs"})
    seed: int = field(default=0, metadata={"help": "bootstrap seed"})


@dataclass
class ReportConfig:
    """Tables (and a chart) of judgement or grade files."""
    chart: Optional[str] = field(default=None, metadata={"help": "PNG to write (needs matplotlib; else a text chart)"})
    bootstrap: int = field(default=2000, metadata={"help": "bootstrap resamples over prompts for 95% CIs"})
    seed: int = field(default=0, metadata={"help": "bootstrap seed"})


@dataclass
class AgreementConfig:
    """Agreement of two judges on their shared prompts, scored as LIMA §4 does."""
    bootstrap: int = field(default=2000, metadata={"help": "bootstrap resamples over prompts for the 95% CI"})
    seed: int = field(default=0, metadata={"help": "bootstrap seed"})


# ---- generation files -------------------------------------------------------------------------

@dataclass
class Generation:
    where: str  # "file:line", for error messages
    id: object
    source: Optional[str]
    prompt: str  # as the judge sees it
    response: str
    sample: Optional[int] = None


def read_jsonl(path):
    """-> [(line number, dict)]; blank lines are skipped, anything else must be a JSON object."""
    if not os.path.isfile(path):
        raise EvalError(f"{path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalError(f"{path}:{n}: not valid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(row, dict):
                raise EvalError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            rows.append((n, row))
    return rows


def render_prompt(prompt):
    """A prompt is one user turn, or a conversation ending on one (LIMA.md §3). The paper's
    question has one 'Question:' slot; earlier turns are shown in it with their roles."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1:
        return prompt[0]
    return "\n\n".join(f"{'User' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(prompt))


def read_generations(path):
    rows = read_jsonl(path)
    if not rows:
        raise EvalError(f"{path}: no generations in this file")
    gens = []
    for n, row in rows:
        where = f"{path}:{n}"
        for name in ("prompt", "response"):
            if name not in row:
                raise EvalError(f"{where}: missing field '{name}' (sample.py --out writes "
                                f"prompt, response, settings; id and source when known)")
        prompt = row["prompt"]
        ok = isinstance(prompt, str) or (isinstance(prompt, list) and prompt
                                         and all(isinstance(t, str) for t in prompt))
        if not ok:
            raise EvalError(f"{where}: 'prompt' must be a string or a list of turns (strings)")
        context = row.get("context", [])  # sample.py: the turns before the last user turn
        if not (isinstance(context, list) and all(isinstance(t, str) for t in context)):
            raise EvalError(f"{where}: 'context' must be a list of turns (strings)")
        if context:
            prompt = context + ([prompt] if isinstance(prompt, str) else prompt)
        if not isinstance(row["response"], str):
            raise EvalError(f"{where}: 'response' must be a string, got {type(row['response']).__name__}")
        gid = row.get("id")
        if gid is not None and not isinstance(gid, (str, int)):
            raise EvalError(f"{where}: 'id' must be a string or an integer")
        sample = row.get("sample")
        if sample is not None and not isinstance(sample, int):
            raise EvalError(f"{where}: 'sample' must be an integer")
        gens.append(Generation(where, gid, row.get("source"), render_prompt(prompt),
                               row["response"], sample))
    return gens


def _squash(text):
    return " ".join(text.split())


def prompt_key(gid, prompt, by_id):
    """Prompts are matched by id when every row has one, else by their text (whitespace aside)."""
    return ("id", gid) if by_id else ("prompt", _squash(prompt))


def describe(key):
    kind, value = key
    return f"id {value!r}" if kind == "id" else f"prompt {value[:60]!r}"


@dataclass
class Pair:
    key: tuple
    id: object  # None when prompts are matched by text
    source: Optional[str]
    prompt: str
    answer_a: str
    answer_b: str


def pair_generations(path_a, path_b):
    """Two generation files -> one Pair per prompt, in file a's order. Both files must hold
    exactly the same prompts once each: anything else is an error naming file:line."""
    gens = {path_a: read_generations(path_a), path_b: read_generations(path_b)}
    by_id = all(g.id is not None for gs in gens.values() for g in gs)
    index = {}
    for path, gs in gens.items():
        index[path] = {}
        for g in gs:
            key = prompt_key(g.id, g.prompt, by_id)
            if key in index[path]:
                raise EvalError(f"{g.where}: {describe(key)} appears again (first at "
                                f"{index[path][key].where}); pairwise compares one response per "
                                f"prompt, as the paper does: keep one sample of each")
            index[path][key] = g
    for this, other in ((path_a, path_b), (path_b, path_a)):
        missing = [g for k, g in index[this].items() if k not in index[other]]
        if missing:
            more = f" ({len(missing) - 1} more like it)" if len(missing) > 1 else ""
            key = prompt_key(missing[0].id, missing[0].prompt, by_id)
            raise EvalError(f"{missing[0].where}: {describe(key)} has no response in {other}{more}; "
                            f"both files must answer the same prompts")
    pairs = []
    for key, ga in index[path_a].items():
        gb = index[path_b][key]
        if by_id and _squash(ga.prompt) != _squash(gb.prompt):
            raise EvalError(f"{gb.where}: {describe(key)} has a different prompt than {ga.where}")
        pairs.append(Pair(key, ga.id if by_id else None, ga.source if ga.source is not None else gb.source,
                          ga.prompt, ga.response, gb.response))
    return pairs


# ---- reading the judge's answer ---------------------------------------------------------------

_ADV = r"(?:significantly |much |clearly |slightly |somewhat |far |a bit |a lot |definitely )?"
_CANONICAL = {"A": r"answer a is significantly better", "B": r"answer b is significantly better",
              "tie": r"neither(?: answer| one| of them)? is significantly better"}
_VERDICTS = [  # (pattern, label or None for "the captured letter"), on lower-cased text
    (rf"\b(?:answer|option|response) \(?([ab])\)? is {_ADV}better\b", None),
    (r"\b(?:choose|prefer|pick|select|go with|vote for) (?:answer|option|response) \(?([ab])\)?(?!\w)", None),
    (rf"\bneither(?: answer| one| of them| option| response)? is {_ADV}better\b", "tie"),
    (r"\b(?:it's|it is) a tie\b|\bequally (?:good|helpful|useful|bad|poor)\b", "tie"),
]
# a bare capital letter as the verdict, case kept so that the article "a" never counts
_BARE_VERDICTS = [
    rf"(?<![\w])\(?([AB])\)? (?i:is {_ADV}better)\b",  # "B is better"
    r"(?i:\b(?:answer|choice|verdict|winner))\s*[:=]\s*(?i:answer\s+)?\(?([AB])\)?(?![\w'])",  # "Verdict: B"
    r"(?i:\bbetter (?:answer|one|response) is)\s+(?i:answer\s+)?\(?([AB])\)?(?![\w'])",  # "the better one is A"
]
_WHOLE = {"a": "A", "b": "B", "neither": "tie", "tie": "tie"}  # the entire reply is one word


def _found(patterns, text):
    labels = set()
    for pattern, label in patterns:
        for m in re.finditer(pattern, text):
            labels.add(label or m.group(1).upper())
    return labels


def parse_preference(text):
    """The judge's text -> "A", "B", "tie" (as displayed) or None when unparseable.

    Tiers, most to least explicit: the paper's three option sentences; verdict phrases ("answer
    B is better", "neither is better", "I prefer answer A", "A is better", "Verdict: B"); then a
    one-word reply ("A", "(b)", "Neither.") or a lone mention of one answer ("Answer A."). The
    first tier that finds anything decides; two different labels in it (e.g. two option
    sentences) is a conflict: None, never a guess.
    """
    plain = re.sub(r"[*_`#>\"]", " ", text or "")  # markdown emphasis is not part of the verdict
    low = re.sub(r"\s+", " ", plain.lower()).strip()
    tiers = [
        lambda: {lab for lab, p in _CANONICAL.items() if re.search(p, low)},
        lambda: _found(_VERDICTS, low) | {m.group(1) for p in _BARE_VERDICTS for m in re.finditer(p, plain)},
        lambda: ({_WHOLE[m.group(1)]} if (m := re.fullmatch(r"\W*\(?(a|b|neither|tie)\)?\W*", low)) else
                 {x.upper() for x in re.findall(r"\banswer \(?([ab])\)?(?!\w)", low)}),
    ]
    for tier in tiers:
        labels = tier()
        if len(labels) == 1:
            return labels.pop()
        if labels:
            return None
    return None


def parse_score(text):
    """LIMA Appendix D: reasoning, then the score alone on the last line. -> 1..6 or None."""
    lines = [line for line in (text or "").splitlines() if line.strip()]
    if not lines:
        return None
    m = re.fullmatch(r"[\W_]*(?:(?:score|rating|choice|answer|helpfulness)\s*[:=]?\s*)?([1-6])"
                     r"(?:\s*(?:/|out of)\s*6)?[\W_]*", lines[-1].strip(), re.IGNORECASE)
    return int(m.group(1)) if m else None


def undo_order(shown, order):
    """A label as displayed ("A"/"B") -> the file it came from ("a"/"b"). order "AB" means
    file a's answer was shown as Answer A; "BA" means it was shown as Answer B."""
    if shown not in ("A", "B"):
        return shown  # "tie", "skip", None
    return "a" if (shown == "A") == (order == "AB") else "b"


def shown_answers(pair, order):
    return (pair.answer_a, pair.answer_b) if order == "AB" else (pair.answer_b, pair.answer_a)


def pairwise_items(pairs, seed, both_orders):
    """-> [(pair, order)]. Each prompt's order is drawn from (seed, prompt key) alone, so a
    resumed or repeated run shows every pair exactly as before (LIMA §4: order randomised)."""
    items = []
    for p in pairs:
        first = "AB" if random.Random(f"{seed}:{p.key}").random() < 0.5 else "BA"
        items.append((p, first))
        if both_orders:
            items.append((p, "BA" if first == "AB" else "AB"))
    return items


# ---- judges -----------------------------------------------------------------------------------
# A judge is any callable: list of question texts -> list of answer texts. Tests script one;
# ModelJudge runs a checkpoint. A judge may also offer `budget`, `n_tokens` and `trim`, so
# answers too long for its context are cut (keeping their start) instead of failing.

TOO_LONG = "[not asked: the question does not fit the judge's context]"


class ModelJudge:
    """A local checkpoint as the judge: the question is one user turn in LIMA's chat format
    (BOS question EOT, sample.respond), the reply is decoded greedily until EOT."""

    def __init__(self, model, tokenizer, max_new_tokens=256, batch_size=8):
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.max_seq_len = model.args.max_seq_len
        self.budget = self.max_seq_len - max_new_tokens - 2  # question tokens left besides BOS, EOT

    def n_tokens(self, text):
        return len(self.tokenizer.encode(text))

    def trim(self, text, n):
        ids = self.tokenizer.encode(text)
        return text if len(ids) <= n else self.tokenizer.decode(ids[:n]) + " [...]"

    def __call__(self, questions):
        from sample import respond
        # fit_question trims answers; only a prompt that alone overflows the context is left.
        # It gets a reply that parses as nothing, so it is counted, not silently dropped.
        asked = [i for i, q in enumerate(questions) if self.n_tokens(q) <= self.budget]
        replies = [TOO_LONG] * len(questions)
        # greedy, no repetition penalty: a judge should be deterministic, not creative
        answers = respond(self.model, self.tokenizer, [[questions[i]] for i in asked],
                          batch_size=self.batch_size, max_new_tokens=self.max_new_tokens,
                          max_seq_len=self.max_seq_len, temperature=0.0, repetition_penalty=1.0)
        for i, answer in zip(asked, answers):
            replies[i] = answer
        return replies


def load_model_judge(cfg):
    import torch
    import checkpoint
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    if not os.path.exists(cfg.judge):
        raise EvalError(f"--judge {cfg.judge}: not 'human' and no checkpoint there")
    try:
        model, tokenizer = checkpoint.load_model_and_tokenizer(
            cfg.judge, tokenizer_path=cfg.tokenizer, dtype=getattr(torch, dtype), device=device)
    except (FileNotFoundError, ValueError) as e:  # checkpoint.py's user-facing messages
        raise EvalError(str(e)) from None
    if model.args.vocab_size <= tokenizer.eot_id:
        raise EvalError(f"--judge {cfg.judge}: a base model (no end-of-turn token); the judge "
                        f"answers in LIMA's chat format, so it must be a fine-tuned checkpoint")
    model.requires_grad_(False).eval()
    return ModelJudge(model, tokenizer, cfg.max_new_tokens, cfg.batch_size)


def fit_question(make, judge, **answers):
    """make(**answers) -> the question. If it does not fit the judge's context, the longest
    answers are trimmed first, each keeping its start (as LIMA.md §3 trims long texts), so a
    long answer is judged on its beginning rather than crashing the run. -> (question, trimmed?)"""
    text = make(**answers)
    budget = getattr(judge, "budget", None)
    if budget is None or judge.n_tokens(text) <= budget:
        return text, False
    room = budget - judge.n_tokens(make(**{k: "" for k in answers})) - 4 * len(answers)  # 4: " [...]"
    sizes = sorted(judge.n_tokens(v) for v in answers.values())
    used, cap = 0, room // len(sizes)
    for i, size in enumerate(sizes):  # water-filling: short answers stay whole, their room goes to the rest
        cap = (room - used) // (len(sizes) - i)
        if size > cap:
            break
        used += size
    cap = max(cap, 1)
    return make(**{k: judge.trim(v, cap) for k, v in answers.items()}), True


# ---- judgement files: appended and fsynced one record at a time, so nothing is lost -----------

class Appender:
    def __init__(self, path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.f = open(path, "a", encoding="utf-8")

    def write(self, record):
        self.f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())  # a killed session keeps every answer already given

    def close(self):
        self.f.close()


def read_previous(path, expect, what):
    """Records already in an --out file, for resuming. A torn last line (killed mid-write) is
    cut off; records made with other settings are an error rather than silently mixed."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        torn = data[keep:].decode("utf-8", "replace")
        try:
            json.loads(torn)
            with open(path, "ab") as f:  # a complete record that only lacks its newline
                f.write(b"\n")
        except json.JSONDecodeError:
            print(f"{path}: dropping a half-written last line (the session was killed while saving "
                  f"it): {torn[:60]!r}", file=sys.stderr)
            with open(path, "r+b") as f:
                f.truncate(keep)
    rows = read_jsonl(path)
    for n, row in rows:
        for name, value in expect.items():
            if row.get(name) != value:
                raise EvalError(f"{path}:{n}: this file holds {what} made with {name}={row.get(name)!r}, "
                                f"not {value!r} as now; rerun with the same settings, or another --out")
    return [row for _, row in rows]


def _basename(path):
    return os.path.basename(os.path.normpath(path)) if path else path


def judge_name(cfg):
    """Who judged, as recorded: --judge_name (e.g. one per annotator), else 'human' or the
    checkpoint path. A resumed run must name the same judge."""
    if cfg.judge_name:
        return cfg.judge_name
    return cfg.judge if cfg.judge in ("human", "") else os.path.normpath(cfg.judge)


# ---- pairwise ---------------------------------------------------------------------------------

def run_pairwise(cfg, judge=None, ask=input, show=print):
    """Judge every (prompt, order) not yet in cfg.out. judge: None loads cfg.judge (a person
    when it is 'human'), or any callable questions -> texts. Returns all records in cfg.out."""
    for name in ("a", "b", "out"):
        if not getattr(cfg, name):
            raise EvalError(f"--{name} is required")
    pairs = pair_generations(cfg.a, cfg.b)
    items = pairwise_items(pairs, cfg.seed, cfg.both_orders)
    meta = {"judge": judge_name(cfg), "seed": cfg.seed, "a": _basename(cfg.a), "b": _basename(cfg.b)}
    previous = read_previous(cfg.out, meta, "judgements")
    by_id = pairs[0].id is not None
    done = {(prompt_key(r.get("id"), r.get("prompt", ""), by_id), r.get("order")) for r in previous}
    todo = [(p, o) for p, o in items if (p.key, o) not in done]
    print(f"{len(pairs)} prompts, {len(items)} pairs to judge; {len(items) - len(todo)} already in "
          f"{cfg.out}, {len(todo)} to go", file=sys.stderr)
    out = Appender(cfg.out)
    try:
        if judge is None and cfg.judge == "human":
            _human_session(todo, len(items), out, meta, ask, show)
        elif todo:
            _model_session(todo, judge or load_model_judge(cfg), out, meta)
    finally:
        out.close()
    return read_previous(cfg.out, meta, "judgements")


def _pair_record(pair, order, raw, label, meta, **extra):
    return {"id": pair.id, "source": pair.source, "prompt": pair.prompt, "order": order,
            "raw": raw, "label": label, **meta, **extra}


HUMAN_KEYS = {"a": "A", "b": "B", "t": "tie", "s": "skip"}


def human_view(pair, order, progress):
    """The paper's question, word for word, laid out for reading: each answer in its own block
    and the three options keyed a / b / t."""
    answer_a, answer_b = shown_answers(pair, order)
    intro, rest = PAIRWISE_QUESTION.split("\nQuestion:")
    options = rest.split("\n")[-4:]  # "Comparing ...?" and the three options
    where = " | ".join(x for x in (pair.source and f"source {pair.source}",
                                   pair.id is not None and f"id {pair.id}") if x)
    rule = "-" * 30
    return "\n".join([f"\n{'=' * 30} {progress} {where} {'=' * 30}", intro, "", "Question:", pair.prompt, "",
                      f"{rule} Answer A {rule}", answer_a, "", f"{rule} Answer B {rule}", answer_b, "",
                      options[0]] + [f"  [{k}] {o[2:]}" for k, o in zip("abt", options[1:])] +
                     ["  [s] skip this pair   [q] save and quit (rerun the same command to go on)"])


def _human_session(todo, total, out, meta, ask, show):
    done = total - len(todo)
    for pair, order in todo:
        show(human_view(pair, order, f"{done + 1}/{total}"))
        while True:
            try:
                key = ask("choice (a/b/t/s/q) > ").strip().lower()
            except (EOFError, KeyboardInterrupt):
                key = "q"
            if key in HUMAN_KEYS or key == "q":
                break
            show("please type a, b, t, s or q, then Enter")
        if key == "q":
            show(f"\nstopped at {done}/{total}; every answer is saved in {out.f.name}. "
                 f"Run the same command to go on from here.")
            return
        out.write(_pair_record(pair, order, key, undo_order(HUMAN_KEYS[key], order), meta))
        done += 1
    show(f"\nall {total} pairs judged; saved in {out.f.name}")


def _progress(total, desc):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="q", file=sys.stderr, dynamic_ncols=True)


def _model_session(todo, judge, out, meta):
    bs = max(getattr(judge, "batch_size", 8), 1)
    bar = _progress(len(todo), "judging")
    bad = 0
    for i in range(0, len(todo), bs):
        batch = todo[i:i + bs]
        fitted = [fit_question(partial(PAIRWISE_QUESTION.format, prompt=p.prompt), judge,
                               **dict(zip(("answer_a", "answer_b"), shown_answers(p, o))))
                  for p, o in batch]
        raws = judge([q for q, _ in fitted])
        for (pair, order), (_, trimmed), raw in zip(batch, fitted, raws):
            label = undo_order(parse_preference(raw), order)
            bad += label is None
            extra = {"trimmed": True} if trimmed else {}
            out.write(_pair_record(pair, order, raw, label, meta, **extra))
        bar.update(len(batch))
        bar.set_postfix(unparseable=bad)
    bar.close()


# ---- helpfulness ------------------------------------------------------------------------------

def sampled_generations(path):
    """Several samples per prompt: rows sharing a prompt are its samples, numbered by their
    'sample' field or by their order in the file."""
    gens = read_generations(path)
    by_id = all(g.id is not None for g in gens)
    seen, taken, items = defaultdict(int), {}, []
    for g in gens:
        key = prompt_key(g.id, g.prompt, by_id)
        sample = g.sample if g.sample is not None else seen[key]
        seen[key] += 1
        if (key, sample) in taken:
            raise EvalError(f"{g.where}: {describe(key)} sample {sample} appears again "
                            f"(first at {taken[key, sample]})")
        taken[key, sample] = g.where
        items.append((key, sample, g))
    return items, by_id


def run_helpfulness(cfg, judge=None):
    for name in ("gen", "judge", "out"):
        if not getattr(cfg, name):
            raise EvalError(f"--{name} is required")
    items, by_id = sampled_generations(cfg.gen)
    meta = {"judge": judge_name(cfg), "gen": _basename(cfg.gen)}
    previous = read_previous(cfg.out, meta, "grades")
    done = {(prompt_key(r.get("id"), r.get("prompt", ""), by_id), r.get("sample")) for r in previous}
    todo = [(k, s, g) for k, s, g in items if (k, s) not in done]
    print(f"{len(items)} responses to grade; {len(items) - len(todo)} already in {cfg.out}, "
          f"{len(todo)} to go", file=sys.stderr)
    if not todo:
        return previous
    judge = judge or load_model_judge(cfg)
    bs = max(getattr(judge, "batch_size", 8), 1)
    out, bar, bad = Appender(cfg.out), _progress(len(todo), "grading"), 0
    try:
        for i in range(0, len(todo), bs):
            batch = todo[i:i + bs]
            fitted = [fit_question(partial(HELPFULNESS_PROMPT.format, task=g.prompt), judge,
                                   submission=g.response) for _, _, g in batch]
            raws = judge([q for q, _ in fitted])
            for (key, sample, g), (_, trimmed), raw in zip(batch, fitted, raws):
                score = parse_score(raw)
                bad += score is None
                out.write({"id": g.id if by_id else None, "source": g.source, "prompt": g.prompt,
                           "sample": sample, "raw": raw, "score": score, **meta,
                           **({"trimmed": True} if trimmed else {})})
            bar.update(len(batch))
            bar.set_postfix(unparseable=bad)
    finally:
        bar.close()
        out.close()
    return read_previous(cfg.out, meta, "grades")


# ---- statistics -------------------------------------------------------------------------------

def bootstrap_ci(values, n_boot=2000, seed=0, level=0.95):
    """Percentile bootstrap over rows (prompts): values (n,) or (n, k) -> (lo, hi) of the mean of
    each column. Resampling whole prompts keeps whatever is nested in a prompt (both A/B orders,
    several samples) together, so their correlation is in the interval."""
    v = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = []
    for start in range(0, n_boot, 256):  # chunks: (256, n, k) at a time
        idx = rng.integers(0, len(v), size=(min(256, n_boot - start), len(v)))
        means.append(v[idx].mean(axis=1))
    means = np.concatenate(means)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(means, [tail, 100 - tail], axis=0)
    return lo, hi


def _by_prompt(records):
    by_id = all(r.get("id") is not None for r in records)
    groups = defaultdict(list)
    for r in records:
        groups[prompt_key(r.get("id"), r.get("prompt", ""), by_id)].append(r)
    return groups


def _outcome_block(rows, n_boot, seed):
    """rows: (n, 3) per-prompt fractions of a / tie / b -> counts, rates and 95% CIs."""
    v = np.asarray(rows, dtype=np.float64).reshape(-1, 3)
    v = np.concatenate([v, v[:, :1] + v[:, 1:2]], axis=1)  # + "a equal or preferred"
    names = ("a", "tie", "b", "a_equal_or_preferred")
    mean = v.mean(0)
    lo, hi = bootstrap_ci(v, n_boot, seed)
    return {"prompts": len(v), "counts": dict(zip(names[:3], v[:, :3].sum(0).tolist())),
            "rate": dict(zip(names, mean.tolist())),
            "ci": {k: (float(l), float(h)) for k, l, h in zip(names, lo, hi)}}


def agreement_score(x, y):
    """LIMA §4: 1 for the same label, 0.5 when exactly one of the two said tie, else 0."""
    if x == y:
        return 1.0
    return 0.5 if (x == "tie") != (y == "tie") else 0.0


def pairwise_summary(records, n_boot=2000, seed=0):
    """Per prompt, the fractions of a / tie / b over its parsed judgements (both A/B orders
    average, cancelling position bias); rates are means over prompts, CIs by bootstrap."""
    groups = _by_prompt(records)
    rows, sources, consistency = [], [], []
    for rs in groups.values():
        labels = [r["label"] for r in rs if r.get("label") in LABELS]
        if labels:
            rows.append([labels.count(x) / len(labels) for x in LABELS])
            sources.append(rs[0].get("source"))
        orders = {r.get("order"): r["label"] for r in rs if r.get("label") in LABELS}
        if set(orders) == {"AB", "BA"}:
            consistency.append(agreement_score(orders["AB"], orders["BA"]))
    decisive = [r for r in records if r.get("label") in ("a", "b")]
    first = [undo_order("A", r.get("order")) == r["label"] for r in decisive]  # picked Answer A
    summary = {
        "judgements": len(records),
        "unparseable": sum(r.get("label") is None for r in records),
        "skipped": sum(r.get("label") == "skip" for r in records),
        "trimmed": sum(bool(r.get("trimmed")) for r in records),
        "prompts": len(groups), "judged_prompts": len(rows),
        "shown_first": (float(np.mean(first)), len(first)) if first else None,
        "order_consistency": (float(np.mean(consistency)), len(consistency)) if consistency else None,
        "all": _outcome_block(rows, n_boot, seed) if rows else None,
        "by_source": {},
    }
    if len({s for s in sources}) > 1:
        for src in sorted({s for s in sources}, key=str):
            sub = [row for row, s in zip(rows, sources) if s == src]
            summary["by_source"][src] = _outcome_block(sub, n_boot, seed)
    return summary


def agreement(records_1, records_2, n_boot=2000, seed=0):
    """Agreement of two judges over the prompts both judged (parsed labels only). A prompt
    judged several times (both orders) scores the mean over all cross pairs of its labels;
    with one judgement each this is exactly the paper's score."""
    files_1 = (records_1[0].get("a"), records_1[0].get("b")) if records_1 else None
    files_2 = (records_2[0].get("a"), records_2[0].get("b")) if records_2 else None
    flip = bool(files_1 and files_2) and files_1 != files_2 and files_1 == files_2[::-1]  # a, b swapped
    swap = {"a": "b", "b": "a"}
    by_id = all(r.get("id") is not None for r in records_1 + records_2)

    def labels(records, flip):
        out = defaultdict(list)
        for r in records:
            if r.get("label") in LABELS:
                lab = swap.get(r["label"], r["label"]) if flip else r["label"]
                out[prompt_key(r.get("id"), r.get("prompt", ""), by_id)].append(lab)
        return out

    l1, l2 = labels(records_1, False), labels(records_2, flip)
    shared = [k for k in l1 if k in l2]
    scores, confusion = [], defaultdict(float)
    for k in shared:
        pairs = [(x, y) for x in l1[k] for y in l2[k]]
        scores.append(np.mean([agreement_score(x, y) for x, y in pairs]))
        for x, y in pairs:
            confusion[x, y] += 1 / len(pairs)
    result = {"shared": len(shared), "only_1": len(l1) - len(shared), "only_2": len(l2) - len(shared),
              "flipped": flip, "files": (files_1, files_2), "confusion": dict(confusion)}
    if scores:
        lo, hi = bootstrap_ci(scores, n_boot, seed)
        result.update(score=float(np.mean(scores)), ci=(float(lo), float(hi)))
    return result


def helpfulness_summary(records, n_boot=2000, seed=0):
    """Each prompt's mean grade over its parsed samples, then the mean over prompts with a
    bootstrap CI over prompts (the samples stay nested in their prompt)."""
    groups = _by_prompt(records)
    means, sources = [], []
    for rs in groups.values():
        scores = [r["score"] for r in rs if isinstance(r.get("score"), int)]
        if scores:
            means.append(float(np.mean(scores)))
            sources.append(rs[0].get("source"))
    parsed = [r["score"] for r in records if isinstance(r.get("score"), int)]

    def block(values):
        lo, hi = bootstrap_ci(values, n_boot, seed)
        return {"prompts": len(values), "mean": float(np.mean(values)), "ci": (float(lo), float(hi))}

    summary = {"responses": len(records), "unparseable": len(records) - len(parsed),
               "trimmed": sum(bool(r.get("trimmed")) for r in records),
               "prompts": len(groups), "histogram": {s: parsed.count(s) for s in range(1, 7)},
               "all": block(means) if means else None, "by_source": {}}
    if len(set(sources)) > 1:
        for src in sorted(set(sources), key=str):
            summary["by_source"][src] = block([m for m, s in zip(means, sources) if s == src])
    return summary


# ---- report -----------------------------------------------------------------------------------

def read_results(path):
    """A judgement or grade file -> (kind, records)."""
    rows = read_jsonl(path)
    if not rows:
        raise EvalError(f"{path}: empty")
    for n, row in rows:
        if "label" not in row and "score" not in row:
            raise EvalError(f"{path}:{n}: neither a judgement ('label') nor a grade ('score'); "
                            f"report reads the --out files of pairwise and helpfulness")
    kinds = {"pairwise" if "label" in row else "helpfulness" for _, row in rows}
    if len(kinds) > 1:
        raise EvalError(f"{path}: mixes pairwise judgements and helpfulness grades")
    return kinds.pop(), [row for _, row in rows]


def _pct(x):
    return f"{100 * x:5.1f}%"


def _rate_ci(block, name):
    lo, hi = block["ci"][name]
    return f"{_pct(block['rate'][name])} [{100 * lo:4.1f}, {100 * hi:4.1f}]"


def _count(x):
    return f"{x:g}" if x == int(x) else f"{x:.1f}"


def _judges(records):
    return ", ".join(sorted({_basename(str(r.get("judge"))) for r in records}))


def pairwise_title(records, path):
    return f"{records[0].get('a')} (a) vs {records[0].get('b')} (b), judged by {_judges(records)}  [{path}]"


def helpfulness_title(records, path):
    return f"{records[0].get('gen')}, judged by {_judges(records)}  [{path}]"


def format_pairwise(summary, title):
    s = summary
    lines = [f"== {title}",
             f"{s['prompts']} prompts, {s['judgements']} judgements: {s['unparseable']} unparseable "
             f"(label null, kept in the file, not in the rates), {s['skipped']} skipped"]
    if s["trimmed"]:
        lines.append(f"{s['trimmed']} questions had answers trimmed (start kept) to fit the judge's context")
    if s["all"] is None:
        return "\n".join(lines + ["no parsed judgements: nothing to rate"])
    rows = [("all", s["all"])] + [(f"source {k}", b) for k, b in s["by_source"].items()]
    w = max(len(name) for name, _ in rows)
    cols = ("a", "tie", "b", "a_equal_or_preferred")
    lines.append(f"{'':{w}}  prompts  " + "  ".join(f"{h:<22}" for h in
                 ("a wins", "tie", "b wins", "a equal or preferred")).rstrip())
    for name, b in rows:
        cells = "  ".join(f"{_rate_ci(b, c):<22}" for c in cols)
        lines.append(f"{name:{w}}  {b['prompts']:7d}  {cells}".rstrip())
    c = s["all"]["counts"]
    split = (" (a prompt judged in both orders counts half for each)"
             if s["judgements"] > s["prompts"] else "")
    lines.append(f"counts{split}: a {_count(c['a'])}, tie {_count(c['tie'])}, b {_count(c['b'])}; "
                 f"95% CIs: bootstrap over prompts")
    if s["shown_first"]:
        share, n = s["shown_first"]
        lines.append(f"position: Answer A chosen in {_pct(share).strip()} of {n} decisive judgements "
                     f"(no position bias: ~50%)")
    if s["order_consistency"]:
        score, n = s["order_consistency"]
        lines.append(f"both orders agree (LIMA agreement score) on {_pct(score).strip()} of {n} prompts")
    return "\n".join(lines)


def format_helpfulness(summary, title):
    s = summary
    lines = [f"== helpfulness 1-6 (LIMA §5): {title}",
             f"{s['prompts']} prompts, {s['responses']} responses: {s['unparseable']} unparseable "
             f"(score null, kept in the file, not in the mean)"]
    if s["trimmed"]:
        lines.append(f"{s['trimmed']} responses were trimmed (start kept) to fit the judge's context")
    if s["all"] is None:
        return "\n".join(lines + ["no parsed grades: nothing to average"])
    rows = [("all", s["all"])] + [(f"source {k}", b) for k, b in s["by_source"].items()]
    w = max(len(name) for name, _ in rows)
    lines.append(f"{'':{w}}  prompts  mean  95% CI (bootstrap over prompts)")
    for name, b in rows:
        lines.append(f"{name:{w}}  {b['prompts']:7d}  {b['mean']:.2f}  [{b['ci'][0]:.2f}, {b['ci'][1]:.2f}]")
    total = max(sum(s["histogram"].values()), 1)
    lines.append("grades: " + "  ".join(f"{k}: {_pct(v / total).strip()}" for k, v in s["histogram"].items()))
    return "\n".join(lines)


def text_chart(pairwise_rows, helpful_rows, width=40):
    """The paper's Figure 1 as text: one stacked bar per comparison (a wins / tie / b wins),
    and one bar per helpfulness file (mean out of 6)."""
    lines = []
    names = [n for n, _ in pairwise_rows] + [n for n, _ in helpful_rows]
    w = min(max((len(n) for n in names), default=0), 48)
    if pairwise_rows:
        lines.append(f"{'':{w}}  '#' a wins, '=' tie, '.' b wins")
        for name, s in pairwise_rows:
            r = s["all"]["rate"]
            na, nt = round(width * r["a"]), round(width * (r["a"] + r["tie"])) - round(width * r["a"])
            bar = "#" * na + "=" * nt + "." * (width - na - nt)
            lines.append(f"{name[:w]:{w}}  |{bar}|  a {_pct(r['a']).strip()}, tie {_pct(r['tie']).strip()}, "
                         f"b {_pct(r['b']).strip()}")
    if helpful_rows:
        lines.append(f"{'':{w}}  helpfulness, mean of 1-6")
        for name, s in helpful_rows:
            m, (lo, hi) = s["all"]["mean"], s["all"]["ci"]
            n = round(width * m / 6)
            lines.append(f"{name[:w]:{w}}  |{'#' * n}{' ' * (width - n)}|  {m:.2f} [{lo:.2f}, {hi:.2f}]")
    return "\n".join(lines)


def png_chart(path, pairwise_rows, helpful_rows):
    """The same chart as a PNG; False when matplotlib is not installed (it is optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = [p for p in (pairwise_rows, helpful_rows) if p]
    heights = [1 + 0.45 * len(p) for p in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, sum(heights) + 0.6), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    axes = list(axes[:, 0])
    if pairwise_rows:
        ax = axes.pop(0)
        for i, (name, s) in enumerate(pairwise_rows):
            left = 0.0
            for part, color, label in (("a", "#4c72b0", "a wins"), ("tie", "#bbbbbb", "tie"),
                                       ("b", "#dd8452", "b wins")):
                width = s["all"]["rate"][part]
                ax.barh(i, width, left=left, color=color, label=label if i == 0 else None)
                if width >= 0.05:
                    ax.text(left + width / 2, i, f"{100 * width:.0f}%", ha="center", va="center", fontsize=8)
                left += width
        ax.set_yticks(range(len(pairwise_rows)), [n for n, _ in pairwise_rows], fontsize=8)
        ax.set_xlim(0, 1)
        ax.invert_yaxis()
        ax.legend(ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False, fontsize=8)
    if helpful_rows:
        ax = axes.pop(0)
        means = np.array([s["all"]["mean"] for _, s in helpful_rows])
        ci = np.array([s["all"]["ci"] for _, s in helpful_rows]).T
        ax.barh(range(len(means)), means, xerr=np.abs(ci - means), color="#4c72b0", capsize=3)
        ax.set_yticks(range(len(means)), [n for n, _ in helpful_rows], fontsize=8)
        ax.set_xlim(0, 6)
        ax.set_xlabel("helpfulness (1-6), mean with 95% CI")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return True


def run_report(cfg, files):
    pairwise_rows, helpful_rows, blocks = [], [], []
    for path in files:
        kind, records = read_results(path)
        if kind == "pairwise":
            s = pairwise_summary(records, cfg.bootstrap, cfg.seed)
            blocks.append(format_pairwise(s, pairwise_title(records, path)))
            if s["all"]:
                name = f"{records[0].get('a')} vs {records[0].get('b')} ({_judges(records)})"
                pairwise_rows.append((name, s))
        else:
            s = helpfulness_summary(records, cfg.bootstrap, cfg.seed)
            blocks.append(format_helpfulness(s, helpfulness_title(records, path)))
            if s["all"]:
                helpful_rows.append((f"{records[0].get('gen')} ({_judges(records)})", s))
    print("\n\n".join(blocks))
    if pairwise_rows or helpful_rows:
        print("\n" + text_chart(pairwise_rows, helpful_rows))
    if cfg.chart:
        if png_chart(cfg.chart, pairwise_rows, helpful_rows):
            print(f"\nchart: {cfg.chart}")
        else:
            print(f"\nno PNG written to {cfg.chart}: matplotlib is not installed (optional); "
                  f"the text chart above is the chart", file=sys.stderr)
    return 0


def run_agreement(cfg, files):
    (kind_1, r1), (kind_2, r2) = read_results(files[0]), read_results(files[1])
    if kind_1 != "pairwise" or kind_2 != "pairwise":
        raise EvalError("agreement compares two pairwise judgement files")
    res = agreement(r1, r2, cfg.bootstrap, cfg.seed)
    f1, f2 = res["files"]
    print("== agreement (LIMA §4: 1 same label, 0.5 when exactly one said tie, 0 otherwise)")
    print(f"1: {files[0]} ({f1[0]} vs {f1[1]})\n2: {files[1]} ({f2[0]} vs {f2[1]})")
    if res["flipped"]:
        print("the two files compare the same systems with a and b swapped: labels of 2 are flipped")
    elif f1 != f2:
        print("warning: the files name different systems; comparing labels as they are", file=sys.stderr)
    print(f"prompts judged by both: {res['shared']} (only by 1: {res['only_1']}, only by 2: {res['only_2']}; "
          f"unparseable and skipped judgements left out)")
    if not res["shared"]:
        raise EvalError("no prompt has a parsed label in both files")
    lo, hi = res["ci"]
    print(f"agreement: {_pct(res['score']).strip()}  95% CI [{100 * lo:.1f}, {100 * hi:.1f}]")
    print("1 \\ 2".rjust(8) + "".join(f"{x:>8}" for x in LABELS))
    for x in LABELS:
        print(f"{x:>8}" + "".join(f"{_count(res['confusion'].get((x, y), 0.0)):>8}" for y in LABELS))
    return 0


# ---- command line -----------------------------------------------------------------------------

COMMANDS = {  # name: (config class, positional files (nargs), what it does)
    "pairwise": (PairwiseConfig, None, "judge two generation files pairwise (LIMA §4)"),
    "helpfulness": (HelpfulnessConfig, None, "grade responses 1-6 with a judge model (LIMA §5)"),
    "report": (ReportConfig, "+", "tables and a chart of judgement / grade files"),
    "agreement": (AgreementConfig, 2, "agreement of two judgement files (LIMA §4)"),
}


def usage():
    return ("usage: python evaluate.py {" + ",".join(COMMANDS) + "} ... (-h for each)\n\n" +
            "\n".join(f"  {name:12s} {what}" for name, (_, _, what) in COMMANDS.items()))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        wants_help = bool(argv) and argv[0] in ("-h", "--help")
        print(usage(), file=sys.stdout if wants_help else sys.stderr)
        return 0 if wants_help else 2
    command, rest = argv[0], argv[1:]
    cls, nargs, what = COMMANDS[command]
    parser = config.build_parser(cls, description=what)
    parser.prog = f"evaluate.py {command}"
    if nargs:
        parser.add_argument("files", nargs=nargs,
                            help="judgement / grade files (the --out of pairwise, helpfulness)")
    ns = vars(parser.parse_args(rest))
    files = ns.pop("files", None)
    cfg = cls(**ns)
    try:
        if command == "pairwise":
            records = run_pairwise(cfg)
            s = pairwise_summary(records, cfg.bootstrap, cfg.seed) if records else None
            if s:
                print(format_pairwise(s, pairwise_title(records, cfg.out)))
        elif command == "helpfulness":
            records = run_helpfulness(cfg)
            if records:
                s = helpfulness_summary(records, cfg.bootstrap, cfg.seed)
                print(format_helpfulness(s, helpfulness_title(records, cfg.out)))
        elif command == "report":
            run_report(cfg, files)
        else:
            run_agreement(cfg, files)
    except EvalError as e:
        print(f"evaluate.py {command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # every judgement made so far is already on disk
        print(f"\nevaluate.py {command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
