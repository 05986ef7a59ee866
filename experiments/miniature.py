"""LIMA's findings in miniature, measured on a laptop CPU.

    python experiments/miniature.py              # ~25 minutes on 2 CPU cores
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
"""

import datetime
import json
import math
import os
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import checkpoint  # noqa: E402
import data  # noqa: E402
import files  # noqa: E402
import prepare_data  # noqa: E402
import stats  # noqa: E402
import train  # noqa: E402
from config import parse_config  # noqa: E402
from demo import world as W  # noqa: E402
from generate import Decoding, encode_prompt, generate, stop_ids  # noqa: E402
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
    train_only: bool = field(default=False, metadata={"help": "fine-tune, then stop: to share the fine-tunes out among processes (each with its own --sizes, --curated 0 for all but one); a finished fine-tune is reused, so a last plain run evaluates them all"})
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
    """train.py's demo preset (LIMA §3's recipe) from cfg.base on data_dir -> the run directory."""
    preset = dict(train.PRESETS["demo"])
    lr = lr or cfg.lr or preset["lr"]
    out = os.path.join(cfg.out_dir, name)
    tcfg = replace(train.TrainConfig(**preset), init_from=cfg.base, data_dir=data_dir, out_dir=out,
                   epochs=cfg.epochs, lr=lr, min_lr=lr / 10, save_epochs=save_epochs, seed=cfg.seed)
    if finished(tcfg):
        print(f"[{name}] already fine-tuned with this exact config: {out}", file=sys.stderr)
        REUSED.append(name)
        return out
    t0 = time.time()
    train.train(tcfg)
    print(f"[{name}] fine-tuned in {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    return out


REUSED = []  # fine-tunes this run found finished (see `finished`), named in the results' header


def finished(tcfg):
    """A run of exactly this config already finished (its config, every dev loss and its last
    checkpoint are there): an interrupted experiment does not redo it."""
    try:
        with open(os.path.join(tcfg.out_dir, "train_config.json")) as f:
            same = json.load(f) == json.loads(json.dumps(asdict(tcfg)))
        return same and len(dev_losses(tcfg.out_dir)) == tcfg.epochs and os.path.isfile(
            os.path.join(tcfg.out_dir, f"epoch_{tcfg.epochs:02d}", "config.json"))
    except (OSError, ValueError):
        return False


def dev_losses(run_dir):
    with open(os.path.join(run_dir, "dev.jsonl")) as f:
        return {r["epoch"]: r["dev_loss"] for r in map(json.loads, f)}


# ---- answers and grades ------------------------------------------------------------------------

BATCH = 128  # sequences decoded together


@torch.no_grad()
def sample(model, tokenizer, prompts, n, seed, max_new_tokens):
    """Each prompt (token ids) answered n times with the paper's decoding (LIMA §5) ->
    [[(text, stopped)] * n] per prompt; stopped: it ended with EOT or EOS, not at the cap."""
    flat = [(i, p) for i, p in enumerate(prompts) for _ in range(n)]
    flat.sort(key=lambda x: -len(x[1]))  # similar lengths together: less padding
    generator = torch.Generator().manual_seed(seed)
    d = Decoding()
    out = [[] for _ in prompts]
    for s in range(0, len(flat), BATCH):
        chunk = flat[s:s + BATCH]
        new = generate(model, [p for _, p in chunk], stop_ids=stop_ids(tokenizer),
                       max_new_tokens=max_new_tokens, temperature=d.temperature, top_p=d.top_p,
                       repetition_penalty=d.repetition_penalty, generator=generator,
                       vocab_size=min(tokenizer.vocab_size, model.args.vocab_size))
        for (i, _), ids in zip(chunk, new):
            out[i].append((tokenizer.decode(ids), len(ids) < max_new_tokens))
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


def evaluate_chat(cfg, world, run_dir, epoch, items, n, seed, with_loss=False):
    """A fine-tuned checkpoint's graded answers to items (and, with_loss, its loss on their
    reference answers)."""
    path = os.path.join(run_dir, f"epoch_{epoch:02d}")
    model, tokenizer = checkpoint.load_model_and_tokenizer(path)
    model.eval()
    prompts = [encode_prompt(tokenizer, [it.prompt]) for it in items]
    answers = sample(model, tokenizer, prompts, n, seed, cfg.max_new_tokens)
    graded = grade_all(world, items, answers)
    return (graded, answers, reference_loss(model, tokenizer, items)) if with_loss else (graded, answers)


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


# ---- the three findings --------------------------------------------------------------------------

def held_out(cfg, world):
    items = W.test_items(world, cfg.seed)
    if cfg.items:
        items = [it for task in W.TASK_MIX for it in [x for x in items if x.task == task][:cfg.items]]
    return items


def finding_knowledge(cfg, world, curated_run):
    """Finding 1: held-out facts, base (three prompts) against the fine-tuned model."""
    facts = [it for it in held_out(cfg, world) if it.task == "fact"]
    rows = {}
    base, tokenizer = checkpoint.load_model_and_tokenizer(cfg.base)
    base.eval()
    prefix = few_shot_prefix(world, cfg.seed)
    for k, style in enumerate(("question", "few_shot", "cloze")):
        prompts = base_prompts(world, facts, tokenizer, style, prefix)
        answers = sample(base, tokenizer, [p for p, _ in prompts], cfg.samples, cfg.seed + k, cfg.max_new_tokens)
        rows[f"base_{style}"] = summarize(grade_all(world, facts, answers, [c for _, c in prompts]))
        rows[f"base_{style}"]["example"] = [facts[0].prompt, answers[0][0][0]]
    graded, answers = evaluate_chat(cfg, world, curated_run, cfg.epochs, facts, cfg.samples, cfg.seed + 10)
    rows["finetuned"] = summarize(graded) | {"example": [facts[0].prompt, answers[0][0][0]]}
    r = random.Random(cfg.seed + 7)  # the same kind of questions about the train half, for contrast
    seen = [W.fact_item(r, e, a) for e in world.split(False) for a in e.facts][:len(facts)]
    graded, _ = evaluate_chat(cfg, world, curated_run, cfg.epochs, seen, cfg.samples, cfg.seed + 11)
    rows["finetuned_train_half"] = summarize(graded)
    return rows


def finding_quality(cfg, world, runs):
    """Finding 2: helpfulness on every held-out prompt, for each fine-tune set."""
    items = held_out(cfg, world)
    rows = {}
    for k, (name, run_dir) in enumerate(runs.items()):
        graded, answers = evaluate_chat(cfg, world, run_dir, cfg.epochs, items, cfg.samples, cfg.seed + 20 + k)
        rows[name] = summarize(graded) | {"dev_loss": dev_losses(run_dir)[cfg.epochs]}
        by_task = {}
        for task in W.TASK_MIX:
            idx = [i for i, it in enumerate(items) if it.task == task]
            if idx:
                by_task[task] = summarize([graded[i] for i in idx])["helpfulness"]["mean"]
        rows[name]["by_task"] = by_task
        rows[name]["examples"] = [[items[i].prompt, answers[i][0][0]] for i in range(0, len(items), max(1, len(items) // 6))]
    return rows


def finding_perplexity(cfg, world, curated_run):
    """Finding 3: each epoch's dev perplexity and answer quality."""
    items = held_out(cfg, world)
    losses = dev_losses(curated_run)
    rows = {}
    for epoch in range(1, cfg.epochs + 1):
        graded, _, held = evaluate_chat(cfg, world, curated_run, epoch, items, cfg.epoch_samples,
                                        cfg.seed + 100 + epoch, with_loss=True)
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


def header(cfg, title, command, seconds):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    reused = (f" It reused {len(REUSED)} fine-tunes that earlier runs of the same config had finished "
              f"({', '.join(REUSED)}); their time is not in that figure." if REUSED else "")
    return [f"# {title}", "",
            f"Measured {datetime.date.today().isoformat()} on {cpu} ({os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch threads), torch {torch.__version__}: `{command}` took "
            f"{seconds / 60:.1f} minutes.{reused}", ""]


def markdown(cfg, results, seconds, command):
    k, q, p = results["knowledge"], results["quality"], results["perplexity"]
    n_facts = k["finetuned"]["prompts"]
    lines = header(cfg, "LIMA's findings in miniature", command, seconds) + [
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

def lr_sweep(cfg, world, curated, dev, command):
    """The curated fine-tune at each learning rate: which one this model size needs."""
    t0 = time.time()
    data_dir = prepare_run(cfg, "curated", curated, dev)
    items = held_out(cfg, world)
    rows = {}
    for k, lr in enumerate(cfg.sweep_lrs):
        run = finetune(cfg, f"sweep_{lr:g}", data_dir, [cfg.epochs], lr)
        graded, _ = evaluate_chat(cfg, world, run, cfg.epochs, items, cfg.epoch_samples, cfg.seed + 200 + k)
        with open(os.path.join(run, "metrics.jsonl")) as f:
            last = [json.loads(line) for line in f][-1]
        rows[lr] = summarize(graded) | {"train_loss": last["loss"], "dev_loss": dev_losses(run)[cfg.epochs]}
    lines = header(cfg, "Fine-tune learning rate for the miniature", command, time.time() - t0) + [
        f"The curated fine-tune ({len(curated):,} examples, {cfg.epochs} epochs, batch 64, linear decay to a tenth, "
        f"residual dropout 0.2) from `demo/base` at each peak learning rate; {cfg.epoch_samples} answers to each of "
        f"the {len(items)} held-out prompts.", "",
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
    world = W.make_world(cfg.seed)
    curated = W.curated(world, cfg.curated, cfg.seed)
    dev = W.dev_set(world, seed=cfg.seed, exclude={it.prompt for it in curated})
    if cfg.lr_sweep:
        return lr_sweep(cfg, world, curated, dev, command + " --lr_sweep")
    runs = {}
    if cfg.curated:
        runs[f"curated_{cfg.curated}"] = finetune(cfg, "curated", prepare_run(cfg, "curated", curated, dev),
                                                  list(range(1, cfg.epochs + 1)))
    pool = W.unfiltered(world, max(cfg.sizes, default=0), cfg.seed, exclude={it.prompt for it in dev})
    for n in cfg.sizes:  # nested: the first n of the pool
        runs[f"unfiltered_{n}"] = finetune(cfg, f"unfiltered_{n}", prepare_run(cfg, f"unfiltered_{n}", pool[:n], dev),
                                           [cfg.epochs])
    t_train = time.time() - t0
    if cfg.train_only:
        return runs
    lr = cfg.lr or train.PRESETS["demo"]["lr"]
    results = {"lr": lr, "knowledge": finding_knowledge(cfg, world, runs[f"curated_{cfg.curated}"]),
               "quality": finding_quality(cfg, world, runs),
               "perplexity": finding_perplexity(cfg, world, runs[f"curated_{cfg.curated}"])}
    seconds = time.time() - t0
    results["seconds"] = {"fine_tuning": t_train, "all": seconds}
    os.makedirs(cfg.results_dir, exist_ok=True)
    md = markdown(cfg, results, seconds, command)
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
    cfg = parse_config(MiniatureConfig, argv)
    command = " ".join(["python experiments/miniature.py"] + (sys.argv[1:] if argv is None else argv))
    return run(cfg, command)


if __name__ == "__main__":
    main()
