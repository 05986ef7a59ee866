"""Evaluation as in the paper (LIMA §4-§6): pairwise preference between two systems' answers to
the same prompts, judged by a person, a judge model or GPT-4; agreement between two judges; the
1-6 helpfulness grade of the ablations; and the dialogue study, every response of a conversation
graded fail / pass / excellent. The questions and how a verdict is read are in judging.py, the
statistics in stats.py, the tables in report.py.

    # each system answers the 300 test prompts (LIMA §5 decoding)
    python sample.py --checkpoint out/lima-65b/epoch_07 --prompt_file data/lima/test_prompts.jsonl --out gen_lima.jsonl
    # a person judges, one pair at a time; stop any time (q), rerun the same command to go on
    # (several annotators: --judge_name alice --out alice.jsonl, and so on)
    python evaluate.py pairwise --a gen_lima.jsonl --b gen_base.jsonl --judge human --out human.jsonl
    # GPT-4, the paper's model judge, over the OpenAI chat-completions protocol (needs `pip install
    # openai`; OPENAI_API_KEY, and OPENAI_BASE_URL for another server: vLLM, llama.cpp)
    python evaluate.py pairwise --a gen_lima.jsonl --b gen_base.jsonl --judge openai:gpt-4 --out gpt4.jsonl
    # a local judge model (any checkpoint checkpoint.py reads), asked both A/B orders
    python evaluate.py pairwise --a gen_lima.jsonl --b gen_base.jsonl --judge out/judge \
        --both_orders --out judge.jsonl
    # several people at once, each in a browser on their own machine (annotate.py): share the
    # printed link; each annotator's labels go to study/<name>.jsonl (--gen FILE: dialogue grades)
    python evaluate.py serve --a gen_lima.jsonl --b gen_base.jsonl --out_dir study --host 0.0.0.0
    python evaluate.py agreement study/alice.jsonl study/bob.jsonl
    python evaluate.py report human.jsonl gpt4.jsonl --chart results.png
    python evaluate.py agreement human.jsonl gpt4.jsonl
    # LIMA §5 ablations: 5 samples per prompt (list each prompt 5 times in the prompt file),
    # each graded 1-6 by ChatGPT (or a judge model)
    python evaluate.py helpfulness --gen samples_7b.jsonl --judge openai:gpt-3.5-turbo --out grades.jsonl
    python evaluate.py report grades.jsonl
    # LIMA §6 dialogue: each model converses through the same dialogues (the user's messages,
    # answered one at a time in context), and a person grades every response
    python evaluate.py dialogue --dialogues dialogues.jsonl --checkpoint out/lima-65b/epoch_07 \
        --gen dialogue_lima.jsonl --judge human --out dialogue_lima_grades.jsonl
    python evaluate.py dialogue --dialogues dialogues.jsonl --checkpoint out/lima-dialogue-65b/epoch_07 \
        --gen dialogue_lima_chains.jsonl --judge human --out dialogue_lima_chains_grades.jsonl
    python evaluate.py report dialogue_lima_grades.jsonl dialogue_lima_chains_grades.jsonl

Inputs are generation files written by `sample.py --prompt_file ... --out` (JSON lines with at
least "prompt" and "response"; "context" for the earlier turns of a conversation; "id" and
"source" when the prompt file had them). A baseline's answers from elsewhere work too, written
in that shape. Prompts are matched by "id" when every row has one, else by their text.

Judgement labels name the generation FILES ("a", "b", "tie"), with the display order undone,
so nothing downstream depends on which answer was shown first. Every judgement, parsed or
not, is appended to --out the moment it is made: the raw judgements are the result.
"""

import os
import shlex
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial
from typing import Optional

import torch

import annotate
import checkpoint
import config
import data
import devices
import files
from data import Appender, describe, prompt_key
from generate import DECODING, Decoding, check_chat_model, encode_prompt, respond
import judging
from judging import (DIALOGUE_QUESTION, GRADE_KEYS, HELPFULNESS_PROMPT, HUMAN_KEYS, LABELS,
                     PAIRWISE_QUESTION, JudgeError, dialogue_meta, fit_question, grade_record,
                     human_grade_view, human_view, latest, pair_record, pairwise_items, pairwise_meta,
                     parse_grade, parse_preference, parse_score, render_context,
                     shown_answers, undo_order)
from report import (count_str, dialogue_title, format_dialogue, format_helpfulness, format_pairwise,
                    helpfulness_title, judges_of, pct, pairwise_title, png_chart, text_chart, usage_line)
from stats import agreement, dialogue_summary, helpfulness_summary, pairwise_summary
from tokenizer import file_sha256

class EvalError(Exception):
    """A problem with the user's files or flags: printed as one line, no traceback."""


DTYPE_CHOICES = ("auto",) + config.DTYPES


# ---- configuration: one dataclass per subcommand ----------------------------------------------

@dataclass
class JudgeConfig:
    """Who judges, and how a judge model or server is run: what pairwise, helpfulness and
    dialogue share."""
    judge: str = field(default="human", metadata={"help": "'human' (you, in this terminal); 'openai:MODEL', a "
                       "server speaking OpenAI's chat-completions protocol (GPT-4 as in the paper, or a local "
                       "vLLM or llama.cpp server), reached at OPENAI_BASE_URL with OPENAI_API_KEY; or a "
                       "checkpoint directory"})
    judge_name: Optional[str] = field(default=None, metadata={"help": "recorded as 'judge'; default: --judge"})
    max_new_tokens: int = field(default=256, metadata={"help": "judge's answer length in tokens (a checkpoint: greedy, stops at EOT)", "min": 1})
    # a checkpoint as the judge (and, in dialogue, the model that converses)
    tokenizer: Optional[str] = field(default=None, metadata={"help": "judge's tokenizer file (tokenizer.model or tokenizer.json) if not in its directory"})
    batch_size: int = field(default=8, metadata={"help": "questions per judge forward pass (dialogue: also dialogues decoded together)", "min": 1})
    device: str = field(default="auto", metadata={"help": "cuda, cpu, or auto"})
    dtype: str = field(default="auto", metadata={"help": "auto: bfloat16 on GPU", "choices": DTYPE_CHOICES})
    # openai:MODEL
    concurrency: int = field(default=8, metadata={"help": "openai: requests in flight at once", "min": 1})
    retries: int = field(default=5, metadata={"help": "openai: retries of a rate-limited (429), failed (5xx), timed-out or "
                         "dropped request, with exponential backoff (the openai client's)", "min": 0})
    timeout: float = field(default=600.0, metadata={"help": "openai: seconds to wait for one answer", "gt": 0})


@dataclass
class PairwiseConfig(JudgeConfig):
    """LIMA §4: which of two answers better satisfies the need, or neither."""
    a: str = field(default="", metadata={"help": "generations of the system under test (e.g. LIMA)"})
    b: str = field(default="", metadata={"help": "generations of the system it is compared with, same prompts"})
    out: str = field(default="", metadata={"help": "judgements (JSON lines), appended as they are made; rerun to resume"})
    both_orders: bool = field(default=False, metadata={"help": "ask every pair in both A/B orders: cancels position bias"})
    seed: int = field(default=0, metadata={"help": "seeds each prompt's A/B order (recorded)", "min": 0})
    bootstrap: int = field(default=2000, metadata={"help": "bootstrap resamples for the summary's 95% CIs", "min": 1})


@dataclass
class HelpfulnessConfig(JudgeConfig):
    """LIMA §5: each sampled response graded 1-6 by a judge model (the paper's: ChatGPT); mean
    with a 95% CI."""
    judge: str = field(default="", metadata={"help": "'openai:MODEL' (the paper: ChatGPT, openai:gpt-3.5-turbo) or a "
                       "checkpoint directory"})
    max_new_tokens: int = field(default=512, metadata={"help": "room for the step-by-step reasoning before the score", "min": 1})
    gen: str = field(default="", metadata={"help": "generations, several samples per prompt allowed"})
    out: str = field(default="", metadata={"help": "grades (JSON lines), appended as they are made; rerun to resume"})
    bootstrap: int = field(default=2000, metadata={"help": "bootstrap resamples for the summary's 95% CIs", "min": 1})
    seed: int = field(default=0, metadata={"help": "bootstrap seed", "min": 0})


@dataclass
class DialogueConfig(JudgeConfig):
    """LIMA §6: a model converses; each of its responses is graded Fail, Pass or Excellent."""
    max_new_tokens: int = field(default=512, metadata={"help": "judge's answer length: room for its reasoning before the grade", "min": 1})
    dialogues: Optional[str] = field(default=None, metadata={"help": "the dialogues, JSON lines: {\"user\": [message, ...]} "
                                     "(the user's side, answered one message at a time) and/or a conversation to continue "
                                     "({\"conversations\": [...]} or {\"messages\": [...]}); goes with --checkpoint"})
    checkpoint: Optional[str] = field(default=None, metadata={"help": "the model that converses (its tokenizer beside it), "
                                      "with the paper's decoding (LIMA §5); without it, --gen must hold the responses"})
    gen: str = field(default="", metadata={"help": "the responses, one line per assistant turn, appended as they are made; "
                     "rerun to resume"})
    out: str = field(default="", metadata={"help": "grades (JSON lines), appended as they are made; rerun to resume"})
    seed: Optional[int] = field(default=None, metadata={"help": "decoding seed; default: a fresh one, recorded", "min": 0, "max": 2**63 - 1})
    max_response_tokens: Optional[int] = field(default=None, metadata={"help": "cap on each response; default: up to the "
                                               "context (LIMA §5: 2,048 tokens, prompt included)", "min": 1})
    bootstrap: int = field(default=2000, metadata={"help": "bootstrap resamples (over dialogues) for the 95% CIs", "min": 1})


@dataclass
class ServeConfig:
    """LIMA §4 and §6 by people, in a browser: a page that shows each annotator one item at a
    time (the pairwise question, or a dialogue's responses to grade) and a server (annotate.py)
    that appends their labels to <out_dir>/<name>.jsonl, the judgement files of the terminal."""
    a: str = field(default="", metadata={"help": "pairwise: generations of the system under test (e.g. LIMA)"})
    b: str = field(default="", metadata={"help": "pairwise: generations of the system it is compared with"})
    gen: str = field(default="", metadata={"help": "dialogue: the responses to grade (evaluate.py dialogue --gen)"})
    out_dir: str = field(default="", metadata={"help": "one judgement file per annotator, <name>.jsonl; a restarted "
                         "server resumes everyone from them"})
    seed: int = field(default=0, metadata={"help": "seeds each prompt's A/B order (as pairwise --seed, recorded) "
                      "and, with an annotator's name, the order of their items", "min": 0})
    both_orders: bool = field(default=False, metadata={"help": "pairwise: ask every pair in both A/B orders"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on: 127.0.0.1 for this machine only; "
                      "0.0.0.0 for others too, which requires a token"})
    port: int = field(default=8000, metadata={"help": "0: any free port", "min": 0, "max": 65535})
    token: Optional[str] = field(default=None, metadata={"help": "the secret every request must carry (in the link); "
                                 "default: generated when --host is not loopback"})


@dataclass
class ReportConfig:
    """Tables (and a chart) of judgement or grade files."""
    chart: Optional[str] = field(default=None, metadata={"help": "PNG to write (needs matplotlib; else a text chart)"})
    bootstrap: int = field(default=2000, metadata={"help": "bootstrap resamples over prompts for 95% CIs", "min": 1})
    seed: int = field(default=0, metadata={"help": "bootstrap seed", "min": 0})


@dataclass
class AgreementConfig:
    """Agreement of two judges on their shared prompts, scored as LIMA §4 does."""
    bootstrap: int = field(default=2000, metadata={"help": "bootstrap resamples over prompts for the 95% CI", "min": 1})
    seed: int = field(default=0, metadata={"help": "bootstrap seed", "min": 0})


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
    exactly the same prompts once each: anything else is an error naming file:line. The same
    file (or two identical ones) on both sides would compare a system with itself: refused."""
    if same_file(path_a, path_b):
        raise EvalError(f"--a {path_a} and --b {path_b} are the same "
                        f"{'file' if _samefile(path_a, path_b) else 'generations (identical files)'}:"
                        f" pairwise compares two systems' answers; give the other system's file")
    gens = {path_a: data.read_generations(path_a), path_b: data.read_generations(path_b)}
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
        if by_id and not data.same_prompt(ga.prompt, gb.prompt):
            raise EvalError(f"{gb.where}: {describe(key)} has a different prompt than {ga.where}")
        pairs.append(Pair(key, ga.id if by_id else None, ga.source if ga.source is not None else gb.source,
                          ga.prompt, ga.response, gb.response))
    return pairs


def _samefile(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def same_file(a, b):
    """The same file, or two files with the same bytes."""
    if _samefile(a, b):
        return True
    if not (os.path.isfile(a) and os.path.isfile(b)) or os.path.getsize(a) != os.path.getsize(b):
        return False
    return file_sha256(a) == file_sha256(b)


# ---- judgement files: appended and fsynced one record at a time (data.Appender) --------------

def check_out(out, *inputs, flag="--out"):
    """An output we append to must be a file, and not one of the inputs."""
    if os.path.isdir(out):
        raise EvalError(f"{flag} {out} is a directory; give a file name, e.g. "
                        f"{os.path.join(out, 'judgements.jsonl')}")
    for path in inputs:
        if _samefile(out, path):
            raise EvalError(f"{flag} {out} is also an input ({path}); it needs a file of its own")


def read_previous(path, expect, what):
    """The judgements already in an --out file, to resume from (judging.read_previous); records
    made with other settings are an EvalError rather than silently mixed."""
    try:
        return judging.read_previous(path, expect, what)
    except judging.OtherSettingsError as e:
        raise EvalError(str(e)) from None


def load_judge(cfg):
    """The judge --judge names: a server (openai:MODEL) or a checkpoint."""
    try:
        judge = judging.load_judge(cfg.judge, tokenizer=cfg.tokenizer, device=cfg.device, dtype=cfg.dtype,
                                   max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                                   concurrency=cfg.concurrency, retries=cfg.retries, timeout=cfg.timeout)
    except (FileNotFoundError, ValueError) as e:  # checkpoint.py's user-facing messages
        raise EvalError(str(e)) from None
    if isinstance(judge, judging.ModelJudge):  # a checkpoint, not a server
        config.set_cpu_threads(judge.model.args.dim, judge.model.output.weight.device)
    return judge


def reply_fields(raw, trimmed):
    """What a judgement records besides the answer and the verdict: what an API judge's server
    reported about the answer (token usage, ...), and whether answers were trimmed to fit."""
    return {**getattr(raw, "meta", {}), **({"trimmed": True} if trimmed else {})}


def _basename(path):
    return os.path.basename(os.path.normpath(path)) if path else path


def judge_name(cfg):
    """Who judged, as recorded: --judge_name (e.g. one per annotator), else 'human' or the
    server's model (openai:MODEL) or the checkpoint path. A resumed run must name the same judge."""
    if cfg.judge_name:
        return cfg.judge_name
    if cfg.judge in ("human", "") or cfg.judge.startswith(judging.OPENAI):
        return cfg.judge
    return os.path.normpath(cfg.judge)


# ---- pairwise ---------------------------------------------------------------------------------

def run_pairwise(cfg, judge=None, ask=input, show=print):
    """Judge every (prompt, order) not yet in cfg.out. judge: None loads cfg.judge (a person
    when it is 'human'), or any callable questions -> texts. Returns all records in cfg.out."""
    for name in ("a", "b", "out"):
        if not getattr(cfg, name):
            raise EvalError(f"--{name} is required")
    check_out(cfg.out, cfg.a, cfg.b)
    with files.lock(cfg.out):  # one session per --out; a second is refused while it runs
        return _run_pairwise(cfg, judge, ask, show)


def _run_pairwise(cfg, judge, ask, show):
    pairs = pair_generations(cfg.a, cfg.b)
    items = pairwise_items(pairs, cfg.seed, cfg.both_orders)
    meta = pairwise_meta(judge_name(cfg), cfg.seed, cfg.a, cfg.b)
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
            _model_session(todo, judge or load_judge(cfg), out, meta)
    finally:
        out.close()
    return read_previous(cfg.out, meta, "judgements")


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
            show(f"\nstopped at {done}/{total}; every answer is saved in {out.path}. "
                 f"Run the same command to go on from here.")
            return
        out.write(pair_record(pair, order, key, undo_order(HUMAN_KEYS[key], order), meta))
        done += 1
    show(f"\nall {total} pairs judged; saved in {out.path}")


def _progress(total, desc, unit="q"):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)


def _model_session(todo, judge, out, meta):
    bs = max(getattr(judge, "batch_size", 8), 1)
    bad = 0
    with _progress(len(todo), "judging") as bar:
        for i in range(0, len(todo), bs):
            batch = todo[i:i + bs]
            fitted = [fit_question(partial(PAIRWISE_QUESTION.format, prompt=p.prompt), judge,
                                   **dict(zip(("answer_a", "answer_b"), shown_answers(p, o))))
                      for p, o in batch]
            raws = judge([q for q, _ in fitted])
            for (pair, order), (_, trimmed), raw in zip(batch, fitted, raws):
                label = undo_order(parse_preference(raw), order)
                bad += label is None
                out.write(pair_record(pair, order, str(raw), label, meta, **reply_fields(raw, trimmed)))
            bar.update(len(batch))
            bar.set_postfix(unparseable=bad)


# ---- helpfulness ------------------------------------------------------------------------------

def sampled_generations(path):
    """Several samples per prompt: rows sharing a prompt are its samples, numbered by their
    'sample' field or by their order in the file."""
    gens = data.read_generations(path)
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
    if cfg.judge == "human":
        raise EvalError("helpfulness is graded by a judge model (LIMA §5: ChatGPT): --judge openai:MODEL "
                        "or a checkpoint directory")
    check_out(cfg.out, cfg.gen)
    with files.lock(cfg.out):  # one session per --out; a second is refused while it runs
        return _run_helpfulness(cfg, judge)


def _run_helpfulness(cfg, judge):
    items, by_id = sampled_generations(cfg.gen)
    meta = {"judge": judge_name(cfg), "gen": _basename(cfg.gen)}
    previous = read_previous(cfg.out, meta, "grades")
    done = {(prompt_key(r.get("id"), r.get("prompt", ""), by_id), r.get("sample")) for r in previous}
    todo = [(k, s, g) for k, s, g in items if (k, s) not in done]
    print(f"{len(items)} responses to grade; {len(items) - len(todo)} already in {cfg.out}, "
          f"{len(todo)} to go", file=sys.stderr)
    if not todo:
        return previous
    judge = judge or load_judge(cfg)
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
                           "sample": sample, "raw": str(raw), "score": score, **meta,
                           **reply_fields(raw, trimmed)})
            bar.update(len(batch))
            bar.set_postfix(unparseable=bad)
    finally:
        bar.close()
        out.close()
    return read_previous(cfg.out, meta, "grades")


# ---- dialogue (LIMA §6) -------------------------------------------------------------------------
# The paper's authors held live conversations with LIMA and graded every response Fail, Pass or
# Excellent. Here the user's side is scripted in a file, so the same dialogues can be put to every
# model: each user message is answered in the context of the conversation so far, the model's own
# earlier answers included (converse), then every response is graded (grade_dialogues).

DECODING_SKIP_IN_RESUME_CHECK = ("seed", "dialogues")  # a resumed run may draw anew, the file may move


def run_dialogue(cfg, judge=None, ask=input, show=print):
    """Converse (with --checkpoint) into cfg.gen, then grade every response not yet in cfg.out.
    judge: None loads cfg.judge (a person when it is 'human'), or a callable questions -> texts.
    Returns all grades in cfg.out."""
    for name in ("gen", "out"):
        if not getattr(cfg, name):
            raise EvalError(f"--{name} is required")
    if bool(cfg.checkpoint) != bool(cfg.dialogues):
        raise EvalError("--checkpoint (the model that converses) and --dialogues (what the user says) go "
                        "together; without them, --gen must hold the responses already")
    check_out(cfg.out, cfg.gen, *([cfg.dialogues] if cfg.dialogues else []))
    if cfg.checkpoint:
        check_out(cfg.gen, cfg.dialogues, flag="--gen")
        with files.lock(cfg.gen):  # one conversing run per --gen
            converse(cfg)
    elif not os.path.isfile(cfg.gen):
        raise EvalError(f"--gen {cfg.gen}: no such file; pass --checkpoint and --dialogues to make it")
    with files.lock(cfg.out):  # one grading session per --out
        return grade_dialogues(cfg, judge, ask, show)


def dialogue_settings(cfg, seed):
    return {**{k: getattr(Decoding, k) for k in DECODING}, "max_new_tokens": cfg.max_response_tokens,
            "seed": seed, "checkpoint": os.path.abspath(cfg.checkpoint), "dialogues": os.path.abspath(cfg.dialogues)}


def conversation(dialogue, answers):
    """The turns before the user's next message: the conversation given, then each user message
    with the model's answer to it."""
    turns = list(dialogue.context)
    for message, answer in zip(dialogue.user, answers):
        turns += [message, answer]
    return turns


def answered_turns(path, dialogues, settings):
    """The responses already in --gen, per dialogue, checked against the dialogues and settings of
    this run (a line made otherwise is refused, not continued). -> {dialogue id: [responses]}"""
    answers = {d.id: [] for d in dialogues}
    if not os.path.exists(path):
        return answers
    ours = {k: v for k, v in settings.items() if k not in DECODING_SKIP_IN_RESUME_CHECK}
    by_id, found = {d.id: d for d in dialogues}, defaultdict(dict)
    for row in data.read_dialogue_turns(path, repair_tail=True):
        recorded = row.get("settings") if isinstance(row.get("settings"), dict) else {}
        theirs = {k: v for k, v in recorded.items() if k not in DECODING_SKIP_IN_RESUME_CHECK}
        if theirs != ours:
            diff = {k: (theirs.get(k), ours.get(k)) for k in theirs.keys() | ours.keys()
                    if theirs.get(k) != ours.get(k)}
            raise EvalError(f"{row['where']}: made with other settings (theirs, ours): {diff}; write to another --gen")
        d = by_id.get(row["dialogue"])
        k = row["turn"]
        if d is None or not 1 <= k <= len(d.user) or row["prompt"] != d.user[k - 1]:
            raise EvalError(f"{row['where']}: dialogue {row['dialogue']!r} turn {k} is not in {settings['dialogues']} "
                            f"as it is now (another dialogue file, or an edited one); write to another --gen")
        found[d.id][k] = row
    for d in dialogues:
        rows = found.get(d.id, {})
        for k in range(1, len(rows) + 1):
            if k not in rows:
                raise EvalError(f"{path}: dialogue {d.id!r} has turn {max(rows)} but no turn {k}; write to "
                                f"another --gen")
            if rows[k]["context"] != conversation(d, answers[d.id]):
                raise EvalError(f"{rows[k]['where']}: its context is not the conversation of the lines before it; "
                                f"write to another --gen")
            answers[d.id].append(rows[k]["response"])
    return answers


def fit_context(tokenizer, turns, context):
    """Drop the oldest exchanges until the conversation leaves room to answer (as sample.py's
    chat does; the paper is silent). -> (turns the model sees, number of turns dropped)"""
    dropped = 0
    while len(turns) > 1 and len(encode_prompt(tokenizer, turns)) >= context:
        turns, dropped = turns[2:], dropped + 2
    return turns, dropped


def converse(cfg):
    """Every user message of every dialogue answered in context with the paper's decoding (LIMA
    §5), into cfg.gen, one line per assistant turn as it is made. Dialogues advance together: a
    round answers the next message of each unfinished one, in batches."""
    dialogues = data.read_dialogues(cfg.dialogues)
    seed = cfg.seed if cfg.seed is not None else int.from_bytes(os.urandom(4), "little")
    settings = dialogue_settings(cfg, seed)
    answers = answered_turns(cfg.gen, dialogues, settings)
    total, done = sum(len(d.user) for d in dialogues), sum(map(len, answers.values()))
    print(f"{len(dialogues)} dialogues, {total} user messages; {done} already answered in {cfg.gen}, "
          f"{total - done} to go", file=sys.stderr)
    if done == total:
        return
    tokenizer_path = checkpoint.find_tokenizer(cfg.checkpoint)
    if tokenizer_path is None:
        raise EvalError(f"--checkpoint {cfg.checkpoint}: no tokenizer.model or tokenizer.json in it or its parent")
    try:
        model, tokenizer, placed, _ = devices.load_for_inference(cfg.checkpoint, tokenizer_path, cfg.device,
                                                                 cfg.dtype, cfg.batch_size, Decoding.max_seq_len)
        check_chat_model(model, tokenizer)
        config.set_cpu_threads(model.args.dim, placed[0])
    except (FileNotFoundError, ValueError) as e:
        raise EvalError(str(e)) from None
    context = min(Decoding.max_seq_len, model.args.max_seq_len)
    for d in dialogues:  # a message that alone fills the context is refused before any work
        for k, message in enumerate(d.user, 1):
            if len(encode_prompt(tokenizer, [message])) >= context:
                raise EvalError(f"{cfg.dialogues}:{d.line}: message {k} alone fills the {context}-token context")
    print(f"seed {seed}", file=sys.stderr)
    generator = torch.Generator(model.output.weight.device).manual_seed(seed)
    decoding = {k: settings[k] for k in DECODING}
    with Appender(cfg.gen) as out, _progress(total, "conversing", unit="turn") as bar:
        bar.update(done)
        while True:
            pending = [d for d in dialogues if len(answers[d.id]) < len(d.user)]
            if not pending:
                break
            for i in range(0, len(pending), cfg.batch_size):
                batch = pending[i:i + cfg.batch_size]
                shown = [fit_context(tokenizer, conversation(d, answers[d.id]) + [d.user[len(answers[d.id])]], context)
                         for d in batch]
                responses = respond(model, tokenizer, [turns for turns, _ in shown], batch_size=cfg.batch_size,
                                    generator=generator, **decoding)
                for d, (_, dropped), response in zip(batch, shown, responses):
                    k = len(answers[d.id])
                    out.write({"dialogue": d.id, "turn": k + 1, "source": d.source, "line": d.line,
                               "context": conversation(d, answers[d.id]), "prompt": d.user[k],
                               "response": response, "settings": settings,
                               **({"dropped_turns": dropped} if dropped else {})})
                    answers[d.id].append(response)
                bar.update(len(batch))
    model.clear_cache()


def grade_dialogues(cfg, judge, ask, show):
    turns = data.read_dialogue_turns(cfg.gen)
    if not turns:
        raise EvalError(f"{cfg.gen}: no responses to grade")
    meta = dialogue_meta(judge_name(cfg), cfg.gen)
    previous = read_previous(cfg.out, meta, "grades")
    done = {(r.get("dialogue"), r.get("turn")) for r in previous}
    # one conversation at a time, turn by turn, as its user read it (the file is in rounds)
    first = {}
    for t in turns:
        first.setdefault(t["dialogue"], len(first))
    todo = sorted((t for t in turns if (t["dialogue"], t["turn"]) not in done),
                  key=lambda t: (first[t["dialogue"]], t["turn"]))
    print(f"{len(turns)} responses to grade; {len(turns) - len(todo)} already in {cfg.out}, "
          f"{len(todo)} to go", file=sys.stderr)
    out = Appender(cfg.out)
    try:
        if judge is None and cfg.judge == "human":
            _human_grading(todo, len(turns), out, meta, ask, show)
        elif todo:
            _model_grading(todo, judge or load_judge(cfg), out, meta)
    finally:
        out.close()
    return read_previous(cfg.out, meta, "grades")


def _human_grading(todo, total, out, meta, ask, show):
    done = total - len(todo)
    for turn in todo:
        show(human_grade_view(turn, f"{done + 1}/{total}"))
        while True:
            try:
                key = ask("grade (f/p/e/s/q) > ").strip().lower()
            except (EOFError, KeyboardInterrupt):
                key = "q"
            if key in GRADE_KEYS or key == "q":
                break
            show("please type f, p, e, s or q, then Enter")
        if key == "q":
            show(f"\nstopped at {done}/{total}; every grade is saved in {out.path}. "
                 f"Run the same command to go on from here.")
            return
        out.write(grade_record(turn, key, GRADE_KEYS[key], meta))
        done += 1
    show(f"\nall {total} responses graded; saved in {out.path}")


def _model_grading(todo, judge, out, meta):
    bs = max(getattr(judge, "batch_size", 8), 1)
    bad = 0
    with _progress(len(todo), "grading") as bar:
        for i in range(0, len(todo), bs):
            batch = todo[i:i + bs]
            fitted = [fit_question(partial(DIALOGUE_QUESTION.format, context=render_context(t["context"]),
                                           prompt=t["prompt"]), judge, response=t["response"]) for t in batch]
            raws = judge([q for q, _ in fitted])
            for turn, (_, trimmed), raw in zip(batch, fitted, raws):
                grade = parse_grade(raw)
                bad += grade is None
                out.write(grade_record(turn, str(raw), grade, meta, **reply_fields(raw, trimmed)))
            bar.update(len(batch))
            bar.set_postfix(unparseable=bad)


# ---- the human study in a browser (annotate.py) ---------------------------------------------------

def run_serve(cfg):
    """Pairwise (--a, --b) or dialogue (--gen) labelling by several people at once, until Ctrl-C."""
    if not cfg.out_dir:
        raise EvalError("--out_dir is required (one judgement file per annotator goes in it)")
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise EvalError(f"--out_dir {cfg.out_dir} is a file; give a directory (one judgement file per annotator "
                        f"goes in it)")
    if bool(cfg.a) != bool(cfg.b) or bool(cfg.a) == bool(cfg.gen):
        raise EvalError("give --a and --b (pairwise, LIMA §4) or --gen (dialogue grades, LIMA §6)")
    inputs = [p for p in (cfg.a, cfg.b, cfg.gen) if p]
    for path in inputs:  # a restarted server reads every .jsonl in --out_dir as an annotator's file
        if os.path.abspath(os.path.dirname(path)) == os.path.abspath(cfg.out_dir):
            raise EvalError(f"{path} is in --out_dir {cfg.out_dir}, which holds only the annotators' files; "
                            f"give another --out_dir")
    if cfg.gen:
        turns = data.read_dialogue_turns(cfg.gen)
        if not turns:
            raise EvalError(f"{cfg.gen}: no responses to grade")
        study = annotate.dialogue_study(turns, cfg.seed, cfg.gen)
    else:
        items = pairwise_items(pair_generations(cfg.a, cfg.b), cfg.seed, cfg.both_orders)
        if not items:
            raise EvalError(f"{cfg.a}: no prompts to judge")
        study = annotate.pairwise_study(items, cfg.seed, cfg.a, cfg.b)
    annotate.serve(study, cfg.out_dir, cfg.host, cfg.port, cfg.token)
    return 0


# ---- report -----------------------------------------------------------------------------------

RESULT_KINDS = {"label": "pairwise", "score": "helpfulness", "grade": "dialogue"}  # the field that tells


def read_results(path):
    """A judgement or grade file -> (kind, records), the last record of each item (a label
    changed in the browser study supersedes the one before it)."""
    rows = data.read_jsonl(path)
    if not rows:
        raise EvalError(f"{path}: empty")
    kinds = set()
    for n, row in rows:
        kind = next((k for field_, k in RESULT_KINDS.items() if field_ in row), None)
        if kind is None:
            raise EvalError(f"{path}:{n}: neither a judgement ('label') nor a grade ('score', 'grade'); "
                            f"report reads the --out files of pairwise, helpfulness and dialogue")
        kinds.add(kind)
    if len(kinds) > 1:
        raise EvalError(f"{path}: mixes {' and '.join(sorted(kinds))} results")
    return kinds.pop(), latest(row for _, row in rows)


def run_report(cfg, paths):
    rows, blocks = {"pairwise": [], "helpfulness": [], "dialogue": []}, []
    for path in paths:
        kind, records = read_results(path)
        if kind == "pairwise":
            s = pairwise_summary(records, cfg.bootstrap, cfg.seed)
            block = format_pairwise(s, pairwise_title(records, path))
            name = f"{records[0].get('a')} vs {records[0].get('b')} ({judges_of(records)})"
        elif kind == "helpfulness":
            s = helpfulness_summary(records, cfg.bootstrap, cfg.seed)
            block = format_helpfulness(s, helpfulness_title(records, path))
            name = f"{records[0].get('gen')} ({judges_of(records)})"
        else:
            s = dialogue_summary(records, cfg.bootstrap, cfg.seed)
            block = format_dialogue(s, dialogue_title(records, path))
            name = f"{records[0].get('gen')} ({judges_of(records)})"
        blocks.append("\n".join(x for x in (block, usage_line(records)) if x))
        if s["all"]:
            rows[kind].append((name, s))
    print("\n\n".join(blocks))
    if any(rows.values()):
        print("\n" + text_chart(rows["pairwise"], rows["helpfulness"], rows["dialogue"]))
    if cfg.chart:
        if png_chart(cfg.chart, rows["pairwise"], rows["helpfulness"], rows["dialogue"]):
            print(f"\nchart: {cfg.chart}")
        else:
            print(f"\nno PNG written to {cfg.chart}: matplotlib is not installed (optional); "
                  f"the text chart above is the chart", file=sys.stderr)
    return 0


def run_agreement(cfg, paths):
    (kind_1, r1), (kind_2, r2) = read_results(paths[0]), read_results(paths[1])
    if kind_1 != "pairwise" or kind_2 != "pairwise":
        raise EvalError("agreement compares two pairwise judgement files")
    res = agreement(r1, r2, cfg.bootstrap, cfg.seed)
    f1, f2 = res["files"]
    print("== agreement (LIMA §4: 1 same label, 0.5 when exactly one said tie, 0 otherwise)")
    print(f"1: {paths[0]} ({f1[0]} vs {f1[1]})\n2: {paths[1]} ({f2[0]} vs {f2[1]})")
    if res["flipped"]:
        print("the two files compare the same systems with a and b swapped: labels of 2 are flipped")
    elif f1 != f2:
        print("warning: the files name different systems; comparing labels as they are", file=sys.stderr)
    print(f"prompts judged by both: {res['shared']} (only by 1: {res['only_1']}, only by 2: {res['only_2']}; "
          f"unparseable and skipped judgements left out)")
    if not res["shared"]:
        raise EvalError("no prompt has a parsed label in both files")
    lo, hi = res["ci"]
    print(f"agreement: {pct(res['score']).strip()}  95% CI [{100 * lo:.1f}, {100 * hi:.1f}]")
    print("1 \\ 2".rjust(8) + "".join(f"{x:>8}" for x in LABELS))
    for x in LABELS:
        print(f"{x:>8}" + "".join(f"{count_str(res['confusion'].get((x, y), 0.0)):>8}" for y in LABELS))
    return 0


# ---- command line -----------------------------------------------------------------------------

COMMANDS = {  # name: (config class, positional files (nargs), what it does)
    "pairwise": (PairwiseConfig, None, "judge two generation files pairwise (LIMA §4)"),
    "helpfulness": (HelpfulnessConfig, None, "grade responses 1-6 with a judge model (LIMA §5)"),
    "dialogue": (DialogueConfig, None, "converse, and grade every response fail / pass / excellent (LIMA §6)"),
    "serve": (ServeConfig, None, "pairwise or dialogue labelling by several people in a browser (LIMA §4, §6)"),
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
                            help="judgement / grade files (the --out of pairwise, helpfulness, dialogue)")
    ns = vars(parser.parse_args(rest))
    inputs = ns.pop("files", None)
    cfg = cls(**ns)
    try:
        config.check_ranges(cfg)
    except ValueError as e:
        parser.error(str(e))  # exit status 2, as for any other bad flag
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
        elif command == "dialogue":
            records = run_dialogue(cfg)
            if records:
                s = dialogue_summary(records, cfg.bootstrap)
                print(format_dialogue(s, dialogue_title(records, cfg.out)))
        elif command == "serve":
            run_serve(cfg)
        elif command == "report":
            run_report(cfg, inputs)
        else:
            run_agreement(cfg, inputs)
    except (EvalError, JudgeError, data.DataError, OSError) as e:
        # bad files or flags, a judge server that cannot be reached or refuses, a full or
        # read-only disk, another session on the same --out
        midway = isinstance(e, JudgeError) or (isinstance(e, OSError) and not isinstance(
            e, (files.LockedError, FileNotFoundError)))
        print(f"evaluate.py {command}: error: {e}" + (kept_note(command, cfg) if midway else ""),
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\n" + interrupted(command, cfg, argv), file=sys.stderr)
        return 130
    return 0


def _count(path):
    try:
        return len(data.read_jsonl(path)) if os.path.isfile(path) else 0
    except (data.DataError, OSError):
        return "every finished"


def kept_note(command, cfg):
    """For an error mid-session: where what was made is kept ("" when nothing was)."""
    outputs = ([cfg.gen] if command == "dialogue" and cfg.checkpoint else []) + [getattr(cfg, "out", None)]
    outputs = [p for p in outputs if p and os.path.isfile(p)]
    if not outputs:
        return ""
    what = "response and grade" if len(outputs) > 1 else "judgement"
    return (f". Every {what} made before is kept in {' and '.join(outputs)}; rerun the same command to "
            f"continue.")


def interrupted(command, cfg, argv):
    """One line for Ctrl-C: what was kept, and the command that continues."""
    out = getattr(cfg, "out", None)
    if not out:  # report, agreement: they only read
        return f"evaluate.py {command}: interrupted; nothing was written"
    what = "judgements" if command == "pairwise" else "grades"
    also = (f" ({_count(cfg.gen)} responses are saved in {cfg.gen})"
            if command == "dialogue" and cfg.checkpoint else "")
    return (f"evaluate.py {command}: interrupted; {_count(out)} {what} are saved in {out}{also}. To "
            f"continue: python evaluate.py {shlex.join(argv)}")


if __name__ == "__main__":
    sys.exit(main())
