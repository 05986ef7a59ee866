"""Evaluation as in the paper (LIMA §4-5), with no network: pairwise preference between two
systems' answers to the same prompts, judged by a person or a local judge model; agreement
between two judges; and the 1-6 helpfulness grade of the ablations. The questions and how a
verdict is read are in judging.py, the statistics in stats.py, the tables in report.py.

    # each system answers the 300 test prompts (LIMA §5 decoding)
    python sample.py --checkpoint out/lima-65b/epoch_07 --prompt_file data/lima/test_prompts.jsonl --out gen_lima.jsonl
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

import os
import shlex
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial
from typing import Optional

import config
import data
import files
from data import Appender, describe, prompt_key
from judging import (HELPFULNESS_PROMPT, HUMAN_KEYS, LABELS, PAIRWISE_QUESTION, fit_question,
                     human_view, load_model_judge, pairwise_items, parse_preference, parse_score,
                     shown_answers, undo_order)
from report import (count_str, format_helpfulness, format_pairwise, helpfulness_title,
                    judges_of, pct, pairwise_title, png_chart, text_chart)
from stats import agreement, helpfulness_summary, pairwise_summary
from tokenizer import file_sha256

class EvalError(Exception):
    """A problem with the user's files or flags: printed as one line, no traceback."""


DTYPE_CHOICES = ("auto",) + config.DTYPES


# ---- configuration: one dataclass per subcommand ----------------------------------------------

@dataclass
class PairwiseConfig:
    """LIMA §4: which of two answers better satisfies the need, or neither."""
    a: str = field(default="", metadata={"help": "generations of the system under test (e.g. LIMA)"})
    b: str = field(default="", metadata={"help": "generations of the system it is compared with, same prompts"})
    judge: str = field(default="human", metadata={"help": "'human' (you, in this terminal) or a checkpoint directory"})
    out: str = field(default="", metadata={"help": "judgements (JSON lines), appended as they are made; rerun to resume"})
    both_orders: bool = field(default=False, metadata={"help": "ask every pair in both A/B orders: cancels position bias"})
    seed: int = field(default=0, metadata={"help": "seeds each prompt's A/B order (recorded)", "min": 0})
    judge_name: Optional[str] = field(default=None, metadata={"help": "recorded as 'judge'; default: --judge"})
    # judge model only
    tokenizer: Optional[str] = field(default=None, metadata={"help": "judge's tokenizer file (tokenizer.model or tokenizer.json) if not in its directory"})
    max_new_tokens: int = field(default=256, metadata={"help": "judge's answer length (greedy, stops at EOT)", "min": 1})
    batch_size: int = field(default=8, metadata={"help": "questions per judge forward pass", "min": 1})
    device: str = field(default="auto", metadata={"help": "cuda, cpu, or auto"})
    dtype: str = field(default="auto", metadata={"help": "auto: bfloat16 on GPU", "choices": DTYPE_CHOICES})
    bootstrap: int = field(default=2000, metadata={"help": "bootstrap resamples for the summary's 95% CIs", "min": 1})


@dataclass
class HelpfulnessConfig:
    """LIMA §5: each sampled response graded 1-6 by a judge model; mean with a 95% CI."""
    gen: str = field(default="", metadata={"help": "generations, several samples per prompt allowed"})
    judge: str = field(default="", metadata={"help": "checkpoint directory of the judge model"})
    out: str = field(default="", metadata={"help": "grades (JSON lines), appended as they are made; rerun to resume"})
    judge_name: Optional[str] = field(default=None, metadata={"help": "recorded as 'judge'; default: --judge"})
    tokenizer: Optional[str] = field(default=None, metadata={"help": "judge's tokenizer file (tokenizer.model or tokenizer.json) if not in its directory"})
    max_new_tokens: int = field(default=512, metadata={"help": "room for the step-by-step reasoning before the score", "min": 1})
    batch_size: int = field(default=8, metadata={"help": "questions per judge forward pass", "min": 1})
    device: str = field(default="auto", metadata={"help": "cuda, cpu, or auto"})
    dtype: str = field(default="auto", metadata={"help": "auto: bfloat16 on GPU", "choices": DTYPE_CHOICES})
    bootstrap: int = field(default=2000, metadata={"help": "bootstrap resamples for the summary's 95% CIs", "min": 1})
    seed: int = field(default=0, metadata={"help": "bootstrap seed", "min": 0})


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

def check_out(out, *inputs):
    """--out is appended to: it must be a file, and not one of the inputs."""
    if os.path.isdir(out):
        raise EvalError(f"--out {out} is a directory; give a file name, e.g. "
                        f"{os.path.join(out, 'judgements.jsonl')}")
    for path in inputs:
        if _samefile(out, path):
            raise EvalError(f"--out {out} is also an input ({path}); judgements go to a file of "
                            f"their own")


def read_previous(path, expect, what):
    """Records already in an --out file, for resuming (a torn last line is cut off); records
    made with other settings are an error rather than silently mixed."""
    if not os.path.exists(path):
        return []
    rows = data.read_jsonl(path, repair_tail=True)
    for n, row in rows:
        for name, value in expect.items():
            if row.get(name) != value:
                raise EvalError(f"{path}:{n}: this file holds {what} made with {name}={row.get(name)!r}, "
                                f"not {value!r} as now; rerun with the same settings, or another --out")
    return [row for _, row in rows]


def load_judge(cfg):
    try:
        judge = load_model_judge(cfg.judge, cfg.tokenizer, cfg.device, cfg.dtype,
                                 cfg.max_new_tokens, cfg.batch_size)
    except (FileNotFoundError, ValueError) as e:  # checkpoint.py's user-facing messages
        raise EvalError(str(e)) from None
    config.set_cpu_threads(judge.model.args.dim, judge.model.output.weight.device)
    return judge


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
    check_out(cfg.out, cfg.a, cfg.b)
    with files.lock(cfg.out):  # one session per --out; a second is refused while it runs
        return _run_pairwise(cfg, judge, ask, show)


def _run_pairwise(cfg, judge, ask, show):
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
            _model_session(todo, judge or load_judge(cfg), out, meta)
    finally:
        out.close()
    return read_previous(cfg.out, meta, "judgements")


def _pair_record(pair, order, raw, label, meta, **extra):
    return {"id": pair.id, "source": pair.source, "prompt": pair.prompt, "order": order,
            "raw": raw, "label": label, **meta, **extra}


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
        out.write(_pair_record(pair, order, key, undo_order(HUMAN_KEYS[key], order), meta))
        done += 1
    show(f"\nall {total} pairs judged; saved in {out.path}")


def _progress(total, desc):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="q", file=sys.stderr, dynamic_ncols=True)


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
                extra = {"trimmed": True} if trimmed else {}
                out.write(_pair_record(pair, order, raw, label, meta, **extra))
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
                           "sample": sample, "raw": raw, "score": score, **meta,
                           **({"trimmed": True} if trimmed else {})})
            bar.update(len(batch))
            bar.set_postfix(unparseable=bad)
    finally:
        bar.close()
        out.close()
    return read_previous(cfg.out, meta, "grades")


# ---- report -----------------------------------------------------------------------------------

def read_results(path):
    """A judgement or grade file -> (kind, records)."""
    rows = data.read_jsonl(path)
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


def run_report(cfg, paths):
    pairwise_rows, helpful_rows, blocks = [], [], []
    for path in paths:
        kind, records = read_results(path)
        if kind == "pairwise":
            s = pairwise_summary(records, cfg.bootstrap, cfg.seed)
            blocks.append(format_pairwise(s, pairwise_title(records, path)))
            if s["all"]:
                name = f"{records[0].get('a')} vs {records[0].get('b')} ({judges_of(records)})"
                pairwise_rows.append((name, s))
        else:
            s = helpfulness_summary(records, cfg.bootstrap, cfg.seed)
            blocks.append(format_helpfulness(s, helpfulness_title(records, path)))
            if s["all"]:
                helpful_rows.append((f"{records[0].get('gen')} ({judges_of(records)})", s))
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
        elif command == "report":
            run_report(cfg, inputs)
        else:
            run_agreement(cfg, inputs)
    except (EvalError, data.DataError, OSError) as e:
        # bad files or flags, a full or read-only disk, another session on the same --out
        out = getattr(cfg, "out", None)
        kept = (isinstance(e, OSError) and not isinstance(e, (files.LockedError, FileNotFoundError))
                and out and os.path.isfile(out))
        print(f"evaluate.py {command}: error: {e}" + (f". Every judgement made before is kept in "
              f"{out}; rerun the same command to continue." if kept else ""), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\n" + interrupted(command, cfg, argv), file=sys.stderr)
        return 130
    return 0


def interrupted(command, cfg, argv):
    """One line for Ctrl-C: what was kept, and the command that continues."""
    out = getattr(cfg, "out", None)
    if not out:  # report, agreement: they only read
        return f"evaluate.py {command}: interrupted; nothing was written"
    try:
        kept = len(data.read_jsonl(out)) if os.path.isfile(out) else 0
    except (data.DataError, OSError):
        kept = "every finished"
    what = "judgements" if command == "pairwise" else "grades"
    return (f"evaluate.py {command}: interrupted; {kept} {what} are saved in {out}. To continue: "
            f"python evaluate.py {shlex.join(argv)}")


if __name__ == "__main__":
    sys.exit(main())
