"""LIMA's findings in miniature, measured on a laptop CPU.

    python experiments/miniature.py              # ~12 minutes on 2 CPU cores (a process per core)
    python experiments/miniature.py --lr_sweep   # the learning-rate measurement behind train.py's demo preset

It starts from demo/base, a 1.3M-parameter LLaMA that demo/pretrain.py pretrained on the corpus
of an invented world (demo/world.py), fine-tunes it with train.py's demo preset (LIMA §3's
recipe for its smaller model) and measures:

1. Knowledge from pretraining, format from alignment (LIMA §1, §4). Questions about facts that
   only the pretraining corpus states (the held-out half of the world: no fine-tune example
   names those entities), answered by the base model, prompted three ways (the question as
   text; three questions and answers before it; the fact's own phrasing in the corpus, to be
   completed), and by the model fine-tuned on the 1,000 curated examples.
2. Quality over quantity (LIMA §5, its Figures 5 and 6). The same fine-tune on 1,000 curated
   examples, on 1,000 unfiltered ones (demo/world.py's UNFILTERED_MIX: forum-style answers,
   some wrong, some not answers) and on 2,000 to 16,000 unfiltered ones; every held-out prompt
   answered `samples` times.
3. Perplexity is not quality (LIMA §3, its Figure 9). The curated run's dev perplexity after
   each epoch against the quality of that epoch's answers.

Every answer is sampled with the paper's decoding (LIMA §5: temperature 0.7, top-p 0.9,
repetition penalty 1.2) and graded automatically (demo/world.py's `grade`): correct (the
content is right and nothing contradicts it) and on format (it stopped by itself and is what
a helpful assistant gives for the task: a complete sentence naming the subject, a note with a
greeting and a closing, nothing around it). Helpfulness = correct + on format, 0 to 2 per
answer, averaged over a prompt's samples and then over prompts; 95% CIs by bootstrap over
prompts (stats.bootstrap_ci), as the paper reports its 1-6 helpfulness means.

Writes experiments/results/miniature.md (the tables, with date, machine and command),
miniature.json (every number) and miniature.png where matplotlib is installed.

The six fine-tunes, then the 26 sets of answers, are shared out among one process per core
(--workers), each with one torch thread, the costliest first. Each job's output goes to
out/miniature/logs/; the console gets a line as each job ends and, every minute, the progress
with an ETA. A fine-tune that an earlier run finished, with the same config on the same data,
is reused: an interrupted experiment picks up where it stopped.
"""

import contextlib
import datetime
import functools
import json
import math
import multiprocessing
import os
import platform
import random
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import checkpoint  # noqa: E402
import data  # noqa: E402
import distributed  # noqa: E402
import files  # noqa: E402
import prepare_data  # noqa: E402
import rundir  # noqa: E402
import stats  # noqa: E402
import train  # noqa: E402
import config  # noqa: E402
from demo import world as W  # noqa: E402
from generate import Decoding, decode, encode_prompt, prompt_seed, stop_ids  # noqa: E402
from model import IGNORE_INDEX  # noqa: E402


@dataclass
class MiniatureConfig:
    """Measure three of LIMA's findings on the miniature (demo/base and demo/world.py)."""
    base: str = field(default=os.path.join(ROOT, "demo", "base"), metadata={"help": "the pretrained base"})
    out_dir: str = field(default=os.path.join(ROOT, "out", "miniature"), metadata={"help": "data and fine-tuned models"})
    results_dir: str = field(default=os.path.join(HERE, "results"), metadata={"help": "tables and picture"})
    curated: int = field(default=1000, metadata={"help": "curated examples (LIMA's 1,000)"})
    sizes: list[int] = field(default_factory=lambda: [1000, 2000, 4000, 8000, 16000], metadata={"help": "unfiltered set sizes"})
    samples: int = field(default=5, metadata={"help": "answers per held-out prompt and model (LIMA §5: 5)"})
    epoch_samples: int = field(default=2, metadata={"help": "answers per prompt for each epoch's checkpoint (finding 3)"})
    max_new_tokens: int = field(default=64, metadata={"help": "an answer not finished by then did not stop (the longest curated one is ~50)"})
    epochs: int = field(default=15, metadata={"help": "LIMA §3"})
    lr: Optional[float] = field(default=None, metadata={"help": "fine-tune learning rate; None: train.py's demo preset"})
    lr_sweep: bool = field(default=False, metadata={"help": "instead: fine-tune on the curated set at each of --sweep_lrs"})
    sweep_lrs: list[float] = field(default_factory=lambda: [1e-5, 1e-4, 3e-4, 1e-3, 3e-3], metadata={"help": "LIMA §3: 1e-5 first"})
    items: int = field(default=0, metadata={"help": "use only the first N held-out prompts of each task (0: all; tests)"})
    workers: int = field(default=0, metadata={"help": "processes at once, one torch thread each (0: one per core this process may use)"})
    train_only: bool = field(default=False, metadata={"help": "fine-tune, then stop (a finished fine-tune is reused: a later run evaluates them)"})
    seed: int = W.SEED


# ---- data and fine-tunes ----------------------------------------------------------------------

def prepare_run(cfg, name, items, dev):
    """A fine-tune set -> a prepared-data directory (prepare_data.py, the same path a user takes)."""
    d = os.path.join(cfg.out_dir, "data", name)
    os.makedirs(d, exist_ok=True)
    data.write_jsonl(os.path.join(d, "train.jsonl"), [it.record() for it in items])
    data.write_jsonl(os.path.join(d, "dev.jsonl"), [it.record() for it in dev])
    prepare_data.prepare(prepare_data.PrepareConfig(
        train=os.path.join(d, "train.jsonl"), dev_file=os.path.join(d, "dev.jsonl"),
        tokenizer=os.path.join(cfg.base, "tokenizer.model"), out_dir=os.path.join(d, "prepared")))
    return os.path.join(d, "prepared")


def finetune(cfg, name, data_dir, save_epochs, lr=None):
    """train.py's demo preset (LIMA §3's recipe) from cfg.base on data_dir -> (the run directory,
    whether an earlier run had already finished it)."""
    preset = dict(train.PRESETS["demo"])
    lr = lr or cfg.lr or preset["lr"]
    tcfg = replace(train.TrainConfig(**preset), init_from=cfg.base, data_dir=data_dir,
                   out_dir=os.path.join(cfg.out_dir, name), epochs=cfg.epochs, lr=lr, min_lr=lr / 10,
                   save_epochs=save_epochs, seed=cfg.seed)
    if finished(tcfg):
        return tcfg.out_dir, True
    train.train(tcfg)
    return tcfg.out_dir, False


def finished(tcfg):
    """A run of exactly this config on exactly this data already finished (its config, every dev
    loss and its last checkpoint are there, and the data has not changed since it started): an
    interrupted experiment does not redo it."""
    try:
        with open(os.path.join(tcfg.out_dir, "train_config.json")) as f:
            same = json.load(f) == json.loads(json.dumps(asdict(tcfg)))
        state = distributed.read_state(os.path.join(tcfg.out_dir, "resume")) or {}
        same_data = state.get("run", {}).get("data_sha256") == rundir.data_sha256(tcfg.data_dir)
        return same and same_data and len(dev_losses(tcfg.out_dir)) == tcfg.epochs and os.path.isfile(
            os.path.join(tcfg.out_dir, f"epoch_{tcfg.epochs:02d}", "config.json"))
    except (OSError, ValueError):
        return False


def dev_losses(run_dir):
    with open(os.path.join(run_dir, "dev.jsonl")) as f:
        return {r["epoch"]: r["dev_loss"] for r in map(json.loads, f)}


# ---- answers and grades ------------------------------------------------------------------------

BATCH = 128  # rows decoded together


@torch.no_grad()
def sample(model, tokenizer, prompts, n, seed, max_new_tokens):
    """Each prompt (token ids) answered n times with the paper's decoding (LIMA §5) ->
    [[(text, stopped)] * n] per prompt; stopped: it ended with EOT or EOS, not at the cap.
    Continuous batching (generate.decode): a row whose answer ended takes the next prompt, and
    each answer draws from its own seed, so it is the same whichever process makes it."""
    flat = [p for p in prompts for _ in range(n)]
    seeds = [prompt_seed(seed, i) for i in range(len(flat))]
    d = Decoding()
    out = [[] for _ in prompts]
    done = dict(decode(model, flat, stop_ids=stop_ids(tokenizer), batch_size=BATCH, seeds=seeds,
                       max_new_tokens=max_new_tokens, temperature=d.temperature, top_p=d.top_p,
                       repetition_penalty=d.repetition_penalty,
                       vocab_size=min(tokenizer.vocab_size, model.args.vocab_size)))
    for i in range(len(flat)):
        out[i // n].append((tokenizer.decode(done[i]), len(done[i]) < max_new_tokens))
    return out


def few_shot_prefix(world, seed):
    """Three questions and their curated answers about the train half, as plain text: the best
    a base model can be told about the format without fine-tuning (in-context learning)."""
    shots, seen = [], set()
    for it in W.curated(world, seed=seed):
        if it.task == "fact" and it.attribute not in seen and len(shots) < 3:
            seen.add(it.attribute)
            shots.append(f"Question: {it.prompt}\nAnswer: {it.answer}\n\n")
    return "".join(shots)


def first_sentence(text):
    s = W.sentences(text)
    return s[0] if s else ""


def base_prompts(world, items, tokenizer, style, prefix):
    """The base model prompted one of three ways -> (token ids, how to cut its answer)."""
    out = []
    for it in items:
        if style == "question":
            text, cut = it.prompt, first_sentence
        elif style == "few_shot":
            text, cut = f"{prefix}Question: {it.prompt}\nAnswer:", lambda t: t.strip().split("\n")[0]
        else:
            text, cut = W.cloze(it.entity, it.attribute), first_sentence
        out.append((encode_prompt(tokenizer, [text], raw=True), cut))
    return out


def grade_all(world, items, answers, cuts=None):
    """-> per prompt (n_samples, 2) arrays of (correct, on format). With cuts (the base model),
    correctness is judged on the cut answer (its first sentence or line: the most favourable
    reading), the format on the whole of what it wrote."""
    graded = []
    for k, (it, samples) in enumerate(zip(items, answers)):
        rows = []
        for text, stopped in samples:
            correct, form = W.grade(world, it, text, stopped)
            if cuts is not None:
                correct = W.grade(world, it, cuts[k](text), True)[0]
            rows.append((correct, form))
        graded.append(np.array(rows, dtype=np.float64))
    return graded


def summarize(graded, seed=0):
    """Per prompt means over samples, then over prompts, with bootstrap CIs over prompts."""
    per_prompt = np.stack([g.mean(0) for g in graded])  # (prompts, 2)
    v = np.concatenate([per_prompt, per_prompt.sum(1, keepdims=True)], axis=1)  # + helpfulness
    lo, hi = stats.bootstrap_ci(v, seed=seed)
    names = ("correct", "format", "helpfulness")
    return {n: {"mean": float(v[:, i].mean()), "ci": [float(lo[i]), float(hi[i])]} for i, n in enumerate(names)} | {
        "prompts": len(graded), "answers": int(sum(len(g) for g in graded))}


@torch.no_grad()
def reference_loss(model, tokenizer, items):
    """Mean loss on the reference answers of items (answer tokens and their EOT, as train.py's
    dev loss counts them): the held-out data's perplexity, as LIMA §3 measures it."""
    total = count = 0.0
    for it in items:
        tokens, mask = tokenizer.encode_dialog([it.prompt, it.answer])
        x = torch.tensor(tokens)[None]
        y = torch.where(torch.tensor(mask[1:]), x[0, 1:], IGNORE_INDEX)[None]
        loss = model(x[:, :-1], y, reduction="sum")
        total, count = total + loss.item(), count + int(sum(mask[1:]))
    return total / count


@functools.lru_cache(maxsize=None)
def the_world(seed):
    return W.make_world(seed)


def item_set(cfg, which):
    """The prompts a set of answers is for: "held_out" (every held-out prompt), "facts" (the
    held-out facts) or "train_half" (as many facts of the train half, for contrast)."""
    world = the_world(cfg.seed)
    items = W.test_items(world, cfg.seed)
    if cfg.items:
        items = [it for task in W.TASK_MIX for it in [x for x in items if x.task == task][:cfg.items]]
    facts = [it for it in items if it.task == "fact"]
    if which == "held_out":
        return items
    if which == "facts":
        return facts
    r = random.Random(cfg.seed + 7)
    return [W.fact_item(r, e, a) for e in world.split(False) for a in e.facts][:len(facts)]


def answers_for(cfg, model_dir, which, n, seed, style=None, with_loss=False):
    """One set of graded answers (a job for a worker process): model_dir's answers to the
    `which` prompts, n each -> (per prompt (n, 2) grades, each prompt's first answer, and with
    with_loss the loss on their reference answers). style: the base model prompted that way
    (base_prompts); else the chat format of the fine-tuned models."""
    world, items = the_world(cfg.seed), item_set(cfg, which)
    model, tokenizer = checkpoint.load_model_and_tokenizer(model_dir)
    model.eval()
    if style:
        prompts = base_prompts(world, items, tokenizer, style, few_shot_prefix(world, cfg.seed))
        answers = sample(model, tokenizer, [p for p, _ in prompts], n, seed, cfg.max_new_tokens)
        graded = grade_all(world, items, answers, [c for _, c in prompts])
    else:
        prompts = [encode_prompt(tokenizer, [it.prompt]) for it in items]
        answers = sample(model, tokenizer, prompts, n, seed, cfg.max_new_tokens)
        graded = grade_all(world, items, answers)
    loss = reference_loss(model, tokenizer, items) if with_loss else None
    return graded, [a[0][0] for a in answers], loss


# ---- processes: the fine-tunes, then the answers, shared out --------------------------------------

def _in_worker():
    # one thread per process: this model's ops are microseconds long and a second thread per
    # process only spins (config.set_cpu_threads); the processes are the parallelism
    torch.set_num_threads(1)


def _logged(log, fn, *args):
    """fn(*args) with its output in the file `log` (two processes' progress bars interleaved
    would be unreadable); the parent prints a summary line."""
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        return fn(*args)


def run_jobs(jobs, workers, what, progress=None, every=60.0):
    """jobs: name -> (cost, log file, fn, args). Runs fn(*args) for each, `workers` processes
    at once (one torch thread each), the costliest first so the last ones to finish are short.
    Prints a line as each job ends and, every `every` seconds, the progress so far with an
    ETA (progress(name) -> the fraction of a running job done, when it can tell). Returns
    name -> result."""
    total = sum(cost for cost, *_ in jobs.values())
    order = sorted(jobs, key=lambda name: -jobs[name][0])
    t0 = time.time()
    results, done_cost = {}, 0.0

    def report(name=None):
        running = [n for n in order if n not in results]
        partial = sum(jobs[n][0] * min(1.0, progress(n)) for n in running) if progress else 0.0
        frac = (done_cost + partial) / max(total, 1e-9)
        elapsed = time.time() - t0
        eta = f", ETA {elapsed / frac * (1 - frac) / 60:.1f} min" if 0 < frac < 1 else ""
        head = f"{name} done; " if name else ""
        print(f"[{what}] {head}{len(results)}/{len(jobs)} done, {100 * frac:.0f}% of the work, "
              f"{elapsed / 60:.1f} min{eta}", file=sys.stderr, flush=True)

    if workers <= 1:
        for name in order:
            cost, log, fn, args = jobs[name]
            results[name] = _logged(log, fn, *args)
            done_cost += cost
            report(name)
        return {name: results[name] for name in jobs}
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_in_worker) as pool:
        futures = {pool.submit(_logged, jobs[n][1], jobs[n][2], *jobs[n][3]): n for n in order}
        pending = set(futures)
        while pending:
            finished_now, pending = wait(pending, timeout=every, return_when=FIRST_COMPLETED)
            if not finished_now:
                report()
            for fut in finished_now:
                name = futures[fut]
                results[name] = fut.result()  # a job's error stops the experiment, named
                done_cost += jobs[name][0]
                report(name)
    return {name: results[name] for name in jobs}  # in the order given


def steps_done(run_dir):
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def finetune_all(cfg, sets, workers):
    """sets: name -> (data_dir, its number of examples, the epochs to save, lr or None). Every fine-tune, in
    worker processes -> name -> run directory, and the names an earlier run had finished."""
    steps = {name: cfg.epochs * math.ceil(n / train.PRESETS["demo"]["batch_size"]) for name, (_, n, _, _) in sets.items()}
    logs = os.path.join(cfg.out_dir, "logs")
    jobs = {name: (n, os.path.join(logs, f"{name}.log"), finetune, (cfg, name, data_dir, save, lr))
            for name, (data_dir, n, save, lr) in sets.items()}
    print(f"fine-tuning {len(jobs)} models, {workers} at a time; their logs: {logs}", file=sys.stderr)
    done = run_jobs(jobs, workers, "fine-tunes",
                    progress=lambda name: steps_done(os.path.join(cfg.out_dir, name)) / steps[name])
    return {name: out for name, (out, _) in done.items()}, [name for name, (_, reused) in done.items() if reused]


# ---- the three findings --------------------------------------------------------------------------

STYLES = ("question", "few_shot", "cloze")


def answer_all(cfg, runs, workers):
    """Every set of answers the three findings grade, in worker processes -> name -> result."""
    curated = runs[f"curated_{cfg.curated}"]
    last = lambda run: os.path.join(run, f"epoch_{cfg.epochs:02d}")
    n_facts, n_all = len(item_set(cfg, "facts")), len(item_set(cfg, "held_out"))
    specs = {}  # name -> (cost: answers to make, args of answers_for)
    for k, style in enumerate(STYLES):  # finding 1: the base model never stops: a full cost
        specs[f"base_{style}"] = (2 * n_facts * cfg.samples, (cfg, cfg.base, "facts", cfg.samples, cfg.seed + k, style))
    specs["finetuned"] = (n_facts * cfg.samples, (cfg, last(curated), "facts", cfg.samples, cfg.seed + 10))
    specs["finetuned_train_half"] = (n_facts * cfg.samples, (cfg, last(curated), "train_half", cfg.samples, cfg.seed + 11))
    for k, (name, run) in enumerate(runs.items()):  # finding 2
        specs[f"quality/{name}"] = (n_all * cfg.samples, (cfg, last(run), "held_out", cfg.samples, cfg.seed + 20 + k))
    for epoch in range(1, cfg.epochs + 1):  # finding 3
        specs[f"epoch/{epoch}"] = (n_all * cfg.epoch_samples + n_all, (
            cfg, os.path.join(curated, f"epoch_{epoch:02d}"), "held_out", cfg.epoch_samples, cfg.seed + 100 + epoch,
            None, True))
    logs = os.path.join(cfg.out_dir, "logs")
    jobs = {name: (cost, os.path.join(logs, f"answers_{name.replace('/', '_')}.log"), answers_for, args)
            for name, (cost, args) in specs.items()}
    return run_jobs(jobs, workers, "answers")


def finding_knowledge(cfg, answers):
    """Finding 1: held-out facts, base (three prompts) against the fine-tuned model."""
    facts = item_set(cfg, "facts")
    rows = {}
    for name in [f"base_{style}" for style in STYLES] + ["finetuned"]:
        graded, first, _ = answers[name]
        rows[name] = summarize(graded) | {"example": [facts[0].prompt, first[0]]}
    rows["finetuned_train_half"] = summarize(answers["finetuned_train_half"][0])
    return rows


def finding_quality(cfg, runs, answers):
    """Finding 2: helpfulness on every held-out prompt, for each fine-tune set."""
    items = item_set(cfg, "held_out")
    rows = {}
    for name, run_dir in runs.items():
        graded, first, _ = answers[f"quality/{name}"]
        rows[name] = summarize(graded) | {"dev_loss": dev_losses(run_dir)[cfg.epochs]}
        by_task = {}
        for task in W.TASK_MIX:
            idx = [i for i, it in enumerate(items) if it.task == task]
            if idx:
                by_task[task] = summarize([graded[i] for i in idx])["helpfulness"]["mean"]
        rows[name]["by_task"] = by_task
        rows[name]["examples"] = [[items[i].prompt, first[i]] for i in range(0, len(items), max(1, len(items) // 6))]
    return rows


def finding_perplexity(cfg, curated_run, answers):
    """Finding 3: each epoch's dev perplexity and answer quality."""
    losses = dev_losses(curated_run)
    rows = {}
    for epoch in range(1, cfg.epochs + 1):
        graded, _, held = answers[f"epoch/{epoch}"]
        rows[epoch] = summarize(graded) | {"dev_loss": losses[epoch], "dev_perplexity": math.exp(losses[epoch]),
                                           "held_out_perplexity": math.exp(held)}
    return rows


# ---- tables and the picture ------------------------------------------------------------------------

def ci(block, scale=100, digits=0):
    m, (lo, hi) = block["mean"] * scale, [x * scale for x in block["ci"]]
    return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


KNOWLEDGE_ROWS = {
    "base_question": "base model, the question as text",
    "base_few_shot": "base model, three questions and answers before it",
    "base_cloze": "base model, the corpus's own sentence to complete",
    "finetuned": "fine-tuned on the 1,000 curated examples",
    "finetuned_train_half": "the same, on facts of the train half (in the fine-tune set)",
}


def header(cfg, title, command, seconds, workers, reused):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    reused = (f" It reused {len(reused)} fine-tunes that earlier runs of the same config had finished "
              f"({', '.join(reused)}); their time is not in that figure." if reused else "")
    return [f"# {title}", "",
            f"Measured {datetime.date.today().isoformat()} on {cpu} ({os.cpu_count()} cores; {workers} "
            f"processes at a time, one torch thread each), torch {torch.__version__}: `{command}` took "
            f"{seconds / 60:.1f} minutes.{reused}", ""]


def markdown(cfg, results, command):
    k, q, p = results["knowledge"], results["quality"], results["perplexity"]
    n_facts = k["finetuned"]["prompts"]
    lines = header(cfg, "LIMA's findings in miniature", command, results["seconds"]["all"],
                   results["workers"], results["reused"]) + [
        f"Base: `demo/base` (pretrained by `demo/pretrain.py`). Fine-tunes: `train.py --preset demo`'s "
        f"recipe (LIMA §3 for smaller models: {cfg.epochs} epochs, batch 64, AdamW 0.9/0.95, wd 0.1, "
        f"lr {results['lr']:g} decaying linearly to a tenth, no warmup, residual dropout 0 to 0.2 over the layers). "
        f"Answers: the paper's decoding (temperature 0.7, top-p 0.9, repetition penalty 1.2), at most "
        f"{cfg.max_new_tokens} tokens. Grades: `demo/world.py` `grade`. 95% CIs: bootstrap over prompts.", "",
        "## 1. Knowledge from pretraining, format from alignment (LIMA §1, §4)", "",
        f"{n_facts} questions about facts only the pretraining corpus states, {cfg.samples} answers each. "
        "The base model's answer is cut at its first sentence (or line) before it is checked, the "
        "most favourable reading; its format is judged on what it wrote.", "",
        "| model, prompt | correct, % | on format, % |", "|---|---|---|"]
    for key, label in KNOWLEDGE_ROWS.items():
        lines.append(f"| {label} | {ci(k[key]['correct'])} | {'n/a' if key == 'base_cloze' else ci(k[key]['format'])} |")
    lines += ["", "## 2. Quality over quantity (LIMA §5, Figures 5 and 6)", "",
              f"All {q[next(iter(q))]['prompts']} held-out prompts (facts, descriptions, notes, sums), "
              f"{cfg.samples} answers each. Helpfulness: correct + on format, 0-2.", "",
              "| fine-tune data | examples | helpfulness, 0-2 | correct, % | on format, % | dev loss |",
              "|---|---|---|---|---|---|"]
    for name, r in q.items():
        kind, n = name.split("_")
        lines.append(f"| {kind} | {int(n):,} | {ci(r['helpfulness'], 1, 2)} | {ci(r['correct'])} | "
                     f"{ci(r['format'])} | {r['dev_loss']:.3f} |")
    lines += ["", "Helpfulness by task:", "", "| fine-tune data | " + " | ".join(W.TASK_MIX) + " |",
              "|---|" + "---|" * len(W.TASK_MIX)]
    for name, r in q.items():
        lines.append(f"| {name.replace('_', ' ')} | " + " | ".join(f"{r['by_task'].get(t, float('nan')):.2f}" for t in W.TASK_MIX) + " |")
    lines += ["", "## 3. Perplexity is not quality (LIMA §3, Figure 9)", "",
              f"The curated run after each epoch: perplexity (of the answer tokens and their EOT) on the "
              f"dev set (50 more curated examples about the train half) and on the reference answers of "
              f"the held-out prompts (the held-out half: LIMA §3 measured held-out Stack Exchange data), "
              f"and the helpfulness of {cfg.epoch_samples} answers to each held-out prompt.", "",
              "| epoch | dev perplexity | held-out perplexity | helpfulness, 0-2 | correct, % | on format, % |",
              "|---|---|---|---|---|---|"]
    for epoch, r in p.items():
        lines.append(f"| {epoch} | {r['dev_perplexity']:.3f} | {r['held_out_perplexity']:.3f} | "
                     f"{ci(r['helpfulness'], 1, 2)} | {ci(r['correct'])} | {ci(r['format'])} |")
    lines += ["", "Examples (first sample):", ""]
    for name, r in q.items():
        for prompt, answer in r["examples"][:3]:
            lines.append(f"- {name.replace('_', ' ')}: *{prompt}* → `{answer!r}`")
    return "\n".join(lines) + "\n"


def picture(path, results):
    """The three findings side by side; False when matplotlib is not installed (optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    k, q, p = results["knowledge"], results["quality"], results["perplexity"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    keys = [key for key in KNOWLEDGE_ROWS if key != "finetuned_train_half"]
    labels = ["base:\nquestion", "base:\n3-shot", "base:\ncloze", "fine-tuned"]
    x = np.arange(len(keys))
    for off, metric, color in ((-0.2, "correct", "#4c72b0"), (0.2, "format", "#dd8452")):
        means = np.array([100 * k[key][metric]["mean"] for key in keys])
        err = np.abs(np.array([[100 * c for c in k[key][metric]["ci"]] for key in keys]).T - means)
        ax.bar(x + off, means, 0.4, yerr=err, capsize=3, color=color, label=metric.replace("format", "on format"))
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("% of answers")
    ax.set_title("1. held-out facts: knowledge vs format", fontsize=10)
    ax.legend(fontsize=8)
    ax = axes[1]
    unf = [(int(n.split("_")[1]), r) for n, r in q.items() if n.startswith("unfiltered")]
    cur = [(int(n.split("_")[1]), r) for n, r in q.items() if n.startswith("curated")]
    for rows, color, label in ((unf, "#dd8452", "unfiltered"), (cur, "#4c72b0", "curated")):
        xs = [n for n, _ in rows]
        ms = np.array([r["helpfulness"]["mean"] for _, r in rows])
        err = np.abs(np.array([r["helpfulness"]["ci"] for _, r in rows]).T - ms)
        ax.errorbar(xs, ms, yerr=err, marker="o", capsize=3, color=color, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("fine-tune examples")
    ax.set_ylabel("helpfulness (0-2), 95% CI")
    ax.set_ylim(0, 2)
    ax.set_title("2. quality over quantity", fontsize=10)
    ax.legend(fontsize=8)
    ax = axes[2]
    epochs = sorted(p)
    ax.plot(epochs, [p[e]["dev_perplexity"] for e in epochs], "o-", color="#dd8452", label="dev (train half)")
    ax.plot(epochs, [p[e]["held_out_perplexity"] for e in epochs], "^--", color="#c44e52", label="held-out answers")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("perplexity (log scale)", color="#dd8452")
    ax.legend(fontsize=8, loc="upper center")
    ax2 = ax.twinx()
    ms = np.array([p[e]["helpfulness"]["mean"] for e in epochs])
    err = np.abs(np.array([p[e]["helpfulness"]["ci"] for e in epochs]).T - ms)
    ax2.errorbar(epochs, ms, yerr=err, marker="s", capsize=2, color="#4c72b0")
    ax2.set_ylabel("helpfulness (0-2)", color="#4c72b0")
    ax.set_title("3. perplexity vs quality, per epoch", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---- main ----------------------------------------------------------------------------------------

def lr_sweep(cfg, curated, dev, command, workers):
    """The curated fine-tune at each learning rate: which one this model size needs."""
    t0 = time.time()
    data_dir = prepare_run(cfg, "curated", curated, dev)
    sets = {f"sweep_{lr:g}": (data_dir, len(curated), [cfg.epochs], lr) for lr in cfg.sweep_lrs}
    runs, reused = finetune_all(cfg, sets, workers)
    jobs = {name: (1, os.path.join(cfg.out_dir, "logs", f"answers_{name}.log"), answers_for,
                   (cfg, os.path.join(runs[name], f"epoch_{cfg.epochs:02d}"), "held_out", cfg.epoch_samples,
                    cfg.seed + 200 + k)) for k, name in enumerate(sets)}
    answers = run_jobs(jobs, workers, "answers")
    rows = {}
    for lr, name in zip(cfg.sweep_lrs, sets):
        with open(os.path.join(runs[name], "metrics.jsonl")) as f:
            last = [json.loads(line) for line in f][-1]
        rows[lr] = summarize(answers[name][0]) | {"train_loss": last["loss"], "dev_loss": dev_losses(runs[name])[cfg.epochs]}
    lines = header(cfg, "Fine-tune learning rate for the miniature", command, time.time() - t0, workers, reused) + [
        f"The curated fine-tune ({len(curated):,} examples, {cfg.epochs} epochs, batch 64, linear decay to a tenth, "
        f"residual dropout 0.2) from `demo/base` at each peak learning rate; {cfg.epoch_samples} answers to each of "
        f"the {len(item_set(cfg, 'held_out'))} held-out prompts.", "",
        "| lr | last train loss | dev loss | helpfulness, 0-2 | correct, % | on format, % |", "|---|---|---|---|---|---|"]
    for lr, r in rows.items():
        lines.append(f"| {lr:g} | {r['train_loss']:.3f} | {r['dev_loss']:.3f} | {ci(r['helpfulness'], 1, 2)} | "
                     f"{ci(r['correct'])} | {ci(r['format'])} |")
    os.makedirs(cfg.results_dir, exist_ok=True)
    files.write_atomic(os.path.join(cfg.results_dir, "lr_sweep.md"), "\n".join(lines) + "\n")
    files.write_json(os.path.join(cfg.results_dir, "lr_sweep.json"), {str(k): v for k, v in rows.items()})
    print("\n".join(lines))
    return rows


def run(cfg, command="python experiments/miniature.py"):
    t0 = time.time()
    if not os.path.isfile(os.path.join(cfg.base, "tokenizer.model")):
        raise SystemExit(f"{cfg.base}: no base model here; run `python demo/pretrain.py` first")
    workers = cfg.workers or config.usable_cores()
    world = the_world(cfg.seed)
    curated = W.curated(world, cfg.curated, cfg.seed)
    dev = W.dev_set(world, seed=cfg.seed, exclude={it.prompt for it in curated})
    if cfg.lr_sweep:
        return lr_sweep(cfg, curated, dev, command, workers)
    sets = {}  # name -> (prepared data, examples, epochs to save, lr)
    if cfg.curated:
        sets[f"curated_{cfg.curated}"] = (prepare_run(cfg, "curated", curated, dev), cfg.curated,
                                          list(range(1, cfg.epochs + 1)), None)
    pool = W.unfiltered(world, max(cfg.sizes, default=0), cfg.seed, exclude={it.prompt for it in dev})
    for n in cfg.sizes:  # nested: the first n of the pool
        sets[f"unfiltered_{n}"] = (prepare_run(cfg, f"unfiltered_{n}", pool[:n], dev), n, [cfg.epochs], None)
    runs, reused = finetune_all(cfg, sets, workers)
    t_train = time.time() - t0
    if cfg.train_only:
        return runs
    answers = answer_all(cfg, runs, workers)
    curated_run = runs[f"curated_{cfg.curated}"]
    results = {"lr": cfg.lr or train.PRESETS["demo"]["lr"], "workers": workers, "reused": reused,
               "knowledge": finding_knowledge(cfg, answers),
               "quality": finding_quality(cfg, runs, answers),
               "perplexity": finding_perplexity(cfg, curated_run, answers)}
    results["seconds"] = {"fine_tuning": t_train, "all": time.time() - t0}
    os.makedirs(cfg.results_dir, exist_ok=True)
    md = markdown(cfg, results, command)
    files.write_atomic(os.path.join(cfg.results_dir, "miniature.md"), md)
    files.write_json(os.path.join(cfg.results_dir, "miniature.json"), results)
    png = os.path.join(cfg.results_dir, "miniature.png")
    if picture(png, results):
        print(f"wrote {png}", file=sys.stderr)
    else:
        print("matplotlib is not installed: no picture (pip install matplotlib for "
              "experiments/results/miniature.png); the tables are complete without it", file=sys.stderr)
    print(md)
    return results


def main(argv=None):
    cfg = config.parse_config(MiniatureConfig, argv)
    command = " ".join(["python experiments/miniature.py"] + (sys.argv[1:] if argv is None else argv))
    return run(cfg, command)


if __name__ == "__main__":
    main()
