"""Decoding against transformers' LlamaForCausalLM.generate: the same weights (saved by this
project, loaded by transformers), the same prompts and settings (LIMA §5: temperature 0.7,
top-p 0.9, repetition penalty 1.2 on prompt and response, transformers' way; top-k off), random
weights.

    python benchmarks/bench_decode.py --threads 1 --out benchmarks/decode_cpu.md   # every part, CPU
    python benchmarks/bench_decode.py --threads 1 --parts context --contexts 128 2000
    python benchmarks/bench_decode.py --preset 7B --device cuda --new_tokens 256 --compile --parts rate

Parts, each a table:
- rate: decode tokens/s at each of --batch_sizes, batch * (N - 1) / (time(N new tokens) -
  time(1 new token)): the prefill and the first token cancel out.
- context: batch 1 at each of --contexts prompt tokens: the time to the first token (the
  prefill and one sampling step) and the time of one decode step there (the median gap between
  consecutive tokens, each seen as it comes out: generate's on_token, transformers' streamer).
- stream: sample.TextStreamer over answers of 256 to 2048 tokens, against decoding the whole
  answer again for every token (what it did before): its time per token must stay flat.
- prompts: a prompt file of --prompts prompts whose answers vary in length like LIMA's test
  set (benchmarks/bench_kernels.lima_lengths: many short, a fifth near --max_answer), decoded
  three ways, the answers' lengths forced (forced_answers) so that every way makes the same
  tokens: generate.decode (continuous batching, --batch_size rows, as sample.py --prompt_file
  now runs); fixed batches of --batch_size, each decoded until its longest answer ends while
  finished rows idle (how sample.py ran before); transformers' generate on the same fixed
  batches, left-padded.
The implementations take turns, --repeats times; each table gives medians, and ratios as the
median of each round's ratio. On a CPU the process time (one thread: the work itself, whatever
else the machine runs) is given beside the wall time. On CUDA the rate part adds the share of
the bandwidth bound: every step reads all weights plus the live KV cache (4.25 TB/s measured
on an H200, benchmarks/gpu_h200.md).
"""

import contextlib
import datetime
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import checkpoint  # noqa: E402
import generate  # noqa: E402
from bench_kernels import lima_lengths  # noqa: E402
from config import parse_config  # noqa: E402
from model import PRESETS, ModelArgs, Transformer, model_args  # noqa: E402

SMALL = ModelArgs(dim=512, n_layers=8, n_heads=8, vocab_size=32001, multiple_of=256)
BANDWIDTH = 4.25e12  # B/s, device-to-device copy measured on an H200 (benchmarks/gpu_h200.md)
LIMA = dict(temperature=0.7, top_p=0.9, repetition_penalty=1.2)  # LIMA §5


def build(preset, device, dtype):
    args = SMALL if preset == "small" else model_args(preset, vocab_size=32001)
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(args)
    model.init_weights()
    return model.to(dtype).eval()


def to_hf(model, dtype, device):
    """Our weights -> LlamaForCausalLM, through the HF checkpoint layout (checkpoint.py)."""
    from transformers import LlamaForCausalLM
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint.save_model(model, f"{tmp}/hf")
        hf = LlamaForCausalLM.from_pretrained(f"{tmp}/hf", dtype=dtype)
    return hf.to(device).eval()


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def ours(model, prompts, n, compile=False, greedy=False):
    return generate.generate(model, prompts.tolist(), stop_ids=(), max_new_tokens=n,
                             **(dict(LIMA, temperature=0.0) if greedy else LIMA), penalize_prompt=True,
                             compile=compile, keep_cache=compile,
                             generator=torch.Generator(prompts.device).manual_seed(0))


@torch.inference_mode()
def theirs(hf, prompts, n, greedy=False):
    out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n,
                      min_new_tokens=n, do_sample=not greedy, temperature=None if greedy else 0.7,
                      top_p=None if greedy else 0.9, top_k=None if greedy else 0,
                      repetition_penalty=1.2, pad_token_id=0)
    return out[:, prompts.shape[1]:].tolist()


# ---- answers of chosen lengths, from any weights ------------------------------------------------

COUNTDOWN = 3  # the lowest id of the countdown tokens (0, 1, 2 are unk, BOS, EOS)


def force_next(logits, last, eot):
    """logits (B, V) or (B, T, V), the inputs' last tokens (B,) -> the same logits with one
    token allowed next (its logit 0, the rest -inf): after COUNTDOWN + k comes COUNTDOWN + k - 1,
    after COUNTDOWN the end-of-turn token."""
    nxt = torch.where(last > COUNTDOWN, last - 1, eot).to(logits.device)
    out = torch.full_like(logits, float("-inf"))
    (out[:, -1] if out.dim() == 3 else out).scatter_(-1, nxt[:, None], 0.0)
    return out


@contextlib.contextmanager
def forced_answers(model, eot):
    """A prompt ending in token COUNTDOWN + L is answered COUNTDOWN + L - 1, ..., COUNTDOWN, then
    EOT: L tokens, whatever the weights, and the same whichever prompts share its batch. The
    model computes every forward as usual (the work is a real decode's); its logits are then
    replaced (force_next)."""
    real = model.forward

    def forward(tokens, *args, logits_at=None, **kwargs):
        logits = real(tokens, *args, logits_at=logits_at, **kwargs)
        last = tokens[:, -1] if logits_at is None else tokens.gather(1, logits_at[:, None])[:, 0]
        return force_next(logits, last, eot)
    model.forward = forward
    try:
        yield
    finally:
        del model.forward


def countdown_prompts(n, max_prompt, max_answer, vocab, gen):
    """n prompts of LIMA-like lengths, random tokens, each ending in the token that sets its
    answer's length (forced_answers), and those lengths."""
    answers = lima_lengths(n, max_answer, gen)
    lengths = [max(4, int(x)) for x in lima_lengths(n, max_prompt, gen)]
    prompts = [[1] + torch.randint(COUNTDOWN + max_answer + 1, vocab - 1, (p - 2,), generator=gen).tolist()
               + [COUNTDOWN + a] for p, a in zip(lengths, answers)]
    return prompts, answers


def continuous(model, prompts, eot, batch_size, seed=0):
    """generate.decode over all the prompts, as sample.py --prompt_file runs it."""
    with forced_answers(model, eot):
        out = dict(generate.decode(model, prompts, stop_ids=(eot,), batch_size=batch_size,
                                   seeds=[generate.prompt_seed(seed, i) for i in range(len(prompts))],
                                   penalize_prompt=True, **LIMA))
    return [out[i] for i in range(len(prompts))]


def fixed_batches(model, prompts, eot, batch_size, seed=0):
    """Batches of batch_size, each decoded until its last answer ends: generate() with an
    all_done, which keeps every row in its batch to the end (how sample.py decoded before)."""
    out = []
    with forced_answers(model, eot):
        for s in range(0, len(prompts), batch_size):
            batch = range(s, min(s + batch_size, len(prompts)))
            out += generate.generate(model, [prompts[i] for i in batch], stop_ids=(eot,),
                                     seeds=[generate.prompt_seed(seed, i) for i in batch], penalize_prompt=True,
                                     all_done=lambda done: bool(done.all()), **LIMA)
    return out


@torch.inference_mode()
def transformers_batches(hf, prompts, eot, batch_size, device):
    """transformers' generate on the same batches, left-padded, the same answers forced through
    a logits processor; its penalty covers the prompt (penalize_prompt above)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Force(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return force_next(scores, input_ids[:, -1], eot)
    out = []
    for s in range(0, len(prompts), batch_size):
        batch = prompts[s:s + batch_size]
        T = max(len(p) for p in batch)
        ids = torch.tensor([[0] * (T - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in batch], device=device)
        most = max(p[-1] - COUNTDOWN for p in batch)
        rows = hf.generate(ids, attention_mask=mask, max_new_tokens=most + 1, do_sample=True,
                           temperature=0.7, top_p=0.9, top_k=0, repetition_penalty=1.2,
                           eos_token_id=eot, pad_token_id=0, logits_processor=LogitsProcessorList([Force()]))
        for row in rows[:, T:].tolist():
            out.append(row[:row.index(eot)])
    return out


# ---- timing ---------------------------------------------------------------------------------------

def timed(fn, device):
    """(wall seconds, process seconds, result)."""
    sync(device)
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    sync(device)
    return time.perf_counter() - t, time.process_time() - c, out


def rounds(impls, repeats, device, label):
    """Each implementation in turn, `repeats` times: {name: [(wall, process), ...]}."""
    times = {k: [] for k in impls}
    for r in range(repeats):
        for k, fn in impls.items():
            wall, cpu, _ = timed(fn, device)
            times[k].append((wall, cpu))
        print(f"  {label}, round {r + 1}: " + ", ".join(f"{k} {v[-1][0]:.3f}s" for k, v in times.items()),
              file=sys.stderr)
    return times


def med(pairs, which):
    return statistics.median(p[which] for p in pairs)


def ratio(a, b, which):
    """Median over rounds of a's time / b's."""
    return statistics.median(x[which] / y[which] for x, y in zip(a, b))


# ---- the parts ------------------------------------------------------------------------------------

def part_rate(a, model, hf, dtype, g):
    args = model.args
    weight_bytes = model.num_params() * dtype.itemsize
    cuda = torch.device(a.device).type == "cuda"
    lines = ["| implementation | batch | decode tok/s (wall) | (process) | vs transformers (wall; process) |"
             + (" % of bandwidth bound |" if cuda else ""), "|---|---|---|---|---|" + ("---|" if cuda else "")]
    for batch in a.batch_sizes:
        prompts = torch.randint(3, 32000, (batch, a.prompt_len), generator=g).to(a.device)
        prompts[:, 0] = 1
        impls = {"transformers generate": lambda k: theirs(hf, prompts, k),
                 "generate.generate": lambda k: ours(model, prompts, k)}
        if a.compile:
            impls["generate.generate --compile"] = lambda k: ours(model, prompts, k, compile=True)
        for fn in impls.values():
            fn(2)  # warm up (and compile)
        rates = {k: [] for k in impls}  # (wall, process) tokens/s per round
        for r in range(a.repeats):
            for k, fn in impls.items():
                one, n = timed(lambda: fn(1), a.device), timed(lambda: fn(a.new_tokens), a.device)
                rates[k].append(tuple(batch * (a.new_tokens - 1) / (n[i] - one[i]) for i in (0, 1)))
            print(f"  rate, batch {batch}, round {r + 1}: " + ", ".join(
                f"{k} {v[-1][0]:.1f} tok/s" for k, v in rates.items()), file=sys.stderr)
        # floor: each step reads the weights and every row's live keys and values
        mean_len = a.prompt_len + a.new_tokens / 2
        kv_bytes = batch * mean_len * args.n_layers * 2 * args.kv_heads * args.head_dim * dtype.itemsize
        bound = batch * BANDWIDTH / (weight_bytes + kv_bytes)
        base = rates["transformers generate"]
        for k, v in rates.items():
            # a rate, not a time: this one's over transformers' is the speed-up
            rel = [statistics.median(x[i] / y[i] for x, y in zip(v, base)) for i in (0, 1)]
            lines.append(f"| {k} | {batch} | {med(v, 0):.1f} | {med(v, 1):.1f} | {rel[0]:.2f}x; {rel[1]:.2f}x |"
                         + (f" {med(v, 0) / bound:.0%} |" if cuda else ""))
    return "Decode tokens/s (N = {} new tokens, prompts of {} tokens)".format(a.new_tokens, a.prompt_len), lines


def stamped(fn):
    """Run fn(stamp), where stamp() is called as each new token comes out: (time to the first
    token, the median time between two tokens), each as (wall, process) seconds."""
    now = lambda: (time.perf_counter(), time.process_time())
    stamps, start = [], now()
    fn(lambda: stamps.append(now()))
    first = tuple(x - y for x, y in zip(stamps[0], start))
    steps = tuple(statistics.median(b[i] - a[i] for a, b in zip(stamps, stamps[1:])) for i in (0, 1))
    return first, steps


def ours_stamped(model, prompt, n, stamp):
    generate.generate(model, prompt.tolist(), stop_ids=(), max_new_tokens=n, penalize_prompt=True,
                      on_token=lambda i, t: stamp(), generator=torch.Generator(prompt.device).manual_seed(0),
                      **LIMA)


@torch.inference_mode()
def theirs_stamped(hf, prompt, n, stamp):
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):  # generate hands a streamer the prompt first, then each token
        prompt_seen = False

        def put(self, value):
            if self.prompt_seen:
                stamp()
            self.prompt_seen = True

        def end(self):
            pass
    hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                do_sample=True, temperature=0.7, top_p=0.9, top_k=0, repetition_penalty=1.2,
                pad_token_id=0, streamer=Stamps())


def part_context(a, model, hf, dtype, g):
    n = a.step_tokens
    lines = ["| context (prompt tokens) | time to first token: ours | transformers | ours / transformers "
             "(wall; process) | one decode step: ours | transformers | ours / transformers (wall; process) |",
             "|---|---|---|---|---|---|---|"]
    for c in a.contexts:
        if c + n > model.args.max_seq_len:
            raise SystemExit(f"--contexts {c} + --step_tokens {n} does not fit the {model.args.max_seq_len}-token context")
        prompt = torch.randint(3, 32000, (1, c), generator=g).to(a.device)
        prompt[:, 0] = 1
        impls = {"ours": lambda stamp: ours_stamped(model, prompt, n, stamp),
                 "transformers": lambda stamp: theirs_stamped(hf, prompt, n, stamp)}
        for fn in impls.values():
            fn(lambda: None)  # warm up
        first, step = {k: [] for k in impls}, {k: [] for k in impls}
        for r in range(a.repeats):
            for k, fn in impls.items():
                f, st = stamped(fn)
                first[k].append(f)
                step[k].append(st)
            print(f"  context {c}, round {r + 1}: " + ", ".join(
                f"{k} first {first[k][-1][0] * 1e3:.1f} ms, step {step[k][-1][0] * 1e3:.2f} ms" for k in impls),
                file=sys.stderr)
        o, t = "ours", "transformers"
        lines.append(
            f"| {c} | {med(first[o], 0) * 1e3:.1f} ms | {med(first[t], 0) * 1e3:.1f} ms | "
            f"{ratio(first[o], first[t], 0):.2f}x; {ratio(first[o], first[t], 1):.2f}x | "
            f"{med(step[o], 0) * 1e3:.2f} ms | {med(step[t], 0) * 1e3:.2f} ms | "
            f"{ratio(step[o], step[t], 0):.2f}x; {ratio(step[o], step[t], 1):.2f}x |")
    return (f"Batch 1 at each context: time to the first token (prefill and one sampling step), and "
            f"one decode step (the median gap between consecutive tokens of {n})"), lines


class RedecodeStreamer:
    """What sample.TextStreamer did before: decode the whole answer for every new token."""

    def __init__(self, tokenizer, file):
        self.tokenizer, self.file, self.ids, self.printed = tokenizer, file, [], ""

    def put(self, token_id):
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd") and text.startswith(self.printed):
            self.file.write(text[len(self.printed):])
            self.printed = text

    def end(self):
        self.file.write("\n")


def stream_tokenizer():
    """The demo's SentencePiece tokenizer (demo/base), and this repository's prose as its ids."""
    from tokenizer import load_tokenizer
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = "\n".join(open(os.path.join(root, f), encoding="utf-8").read()
                     for f in ("README.md", "docs/method.md"))
    tok = load_tokenizer(os.path.join(root, "demo", "base", "tokenizer.model"))
    return tok, tok.encode(text)


def part_stream(a, *_):
    import sample
    lines = ["| answer tokens | sample.TextStreamer: ms | µs per token | decoding it all again per token: ms | µs per token |",
             "|---|---|---|---|---|"]
    tok, ids = stream_tokenizer()
    while len(ids) < max(a.stream_lengths):
        ids = ids + ids
    for n in a.stream_lengths:
        def run(kind, n=n):
            s = kind(tok, io.StringIO())
            for t in ids[:n]:
                s.put(t)
            s.end()
            return s.file.getvalue()
        assert run(sample.TextStreamer) == tok.decode(ids[:n]) + "\n"
        times = rounds({"ours": lambda: run(sample.TextStreamer), "before": lambda: run(RedecodeStreamer)},
                       a.repeats, "cpu", f"stream {n}")
        o, b = med(times["ours"], 0), med(times["before"], 0)
        lines.append(f"| {n} | {o * 1e3:.1f} | {o / n * 1e6:.1f} | {b * 1e3:.1f} | {b / n * 1e6:.1f} |")
    return "Streaming an answer (the text printed is checked against decoding it whole)", lines


def part_prompts(a, model, hf, dtype, g):
    eot = model.args.vocab_size - 1
    prompts, answers = countdown_prompts(a.prompts, a.max_prompt, a.max_answer, model.args.vocab_size, g)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # longest first, as sample.py
    prompts, answers = [prompts[i] for i in order], [answers[i] for i in order]
    B = a.batch_size
    impls = {"generate.decode (continuous batching)": lambda: continuous(model, prompts, eot, B),
             "fixed batches (sample.py before)": lambda: fixed_batches(model, prompts, eot, B),
             "transformers generate, fixed batches": lambda: transformers_batches(hf, prompts, eot, B, a.device)}
    small = ([p[:-1] + [COUNTDOWN + 2] for p in prompts[:3]], [2] * 3)
    for k, fn in impls.items():  # warm up, and check that every way makes exactly the forced answers
        warm = {"generate.decode (continuous batching)": lambda: continuous(model, small[0], eot, 2),
                "fixed batches (sample.py before)": lambda: fixed_batches(model, small[0], eot, 2),
                "transformers generate, fixed batches": lambda: transformers_batches(hf, small[0], eot, 2, a.device)}[k]
        assert [len(x) for x in warm()] == small[1], k
    times = {k: [] for k in impls}
    for r in range(a.prompt_repeats):
        for k, fn in impls.items():
            wall, cpu, out = timed(fn, a.device)
            got = [len(x) for x in out]
            if got != answers:
                raise SystemExit(f"{k}: answer lengths {got[:8]}... are not the forced {answers[:8]}...")
            times[k].append((wall, cpu))
            print(f"  prompts, round {r + 1}: {k} {wall:.1f}s", file=sys.stderr)
    total = sum(answers)
    base = times["generate.decode (continuous batching)"]
    lines = ["| implementation | wall s | tokens/s (wall) | process s | continuous batching's speed vs this (wall; process) |",
             "|---|---|---|---|---|"]
    for k, v in times.items():
        lines.append(f"| {k} | {med(v, 0):.1f} | {total / med(v, 0):.1f} | {med(v, 1):.1f} | "
                     f"{ratio(v, base, 0):.2f}x; {ratio(v, base, 1):.2f}x |")
    return (f"{a.prompts} prompts ({min(map(len, prompts))}-{max(map(len, prompts))} tokens), answers of "
            f"{min(answers)}-{max(answers)} tokens (mean {total / len(answers):.0f}, {total} in all), "
            f"{B} rows", lines)


PARTS = {"rate": part_rate, "context": part_context, "stream": part_stream, "prompts": part_prompts}


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


@dataclass
class DecodeBenchConfig:
    parts: list[str] = field(default_factory=lambda: list(PARTS), metadata={"choices": list(PARTS)})
    preset: str = field(default="small", metadata={"help": "small, or a model.PRESETS name",
                                                   "choices": ["small"] + sorted(PRESETS)})
    device: str = field(default="cuda" if torch.cuda.is_available() else "cpu",
                        metadata={"choices": ["cpu", "cuda"]})
    dtype: Optional[str] = field(default=None, metadata={"help": "None: bfloat16 on cuda, float32 on cpu",
                                                         "choices": ["float32", "bfloat16", "float16"]})
    batch_sizes: list[int] = field(default_factory=lambda: [1, 16], metadata={"help": "rate", "min": 1})
    prompt_len: int = field(default=64, metadata={"help": "rate", "min": 1})
    new_tokens: int = field(default=64, metadata={"help": "rate: at least 2", "min": 2})
    contexts: list[int] = field(default_factory=lambda: [64, 512, 1024, 2000],
                                metadata={"help": "context: prompt tokens", "min": 1})
    step_tokens: int = field(default=33, metadata={"help": "context: new tokens for the per-step time",
                                                   "min": 2})
    stream_lengths: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048],
                                      metadata={"help": "stream: answer tokens", "min": 1})
    prompts: int = field(default=300, metadata={"help": "prompts: how many (LIMA's test set: 300)", "min": 1})
    max_prompt: int = field(default=128, metadata={"help": "prompts: the longest prompt", "min": 4})
    max_answer: int = field(default=256, metadata={"help": "prompts: the longest answer", "min": 1})
    batch_size: int = field(default=16, metadata={"help": "prompts: rows (sample.py's default)", "min": 1})
    prompt_repeats: int = field(default=1, metadata={"help": "prompts: rounds", "min": 1})
    repeats: int = field(default=3, metadata={"min": 1})
    compile: bool = field(default=False, metadata={"help": "rate: also time sample.py --compile"})
    threads: Optional[int] = field(default=None, metadata={"help": "torch CPU threads", "min": 1})
    out: str = field(default="", metadata={"help": "also append the tables (markdown) here"})


def main(argv=None):
    a = parse_config(DecodeBenchConfig, argv, description=__doc__.split("\n\n")[0])
    if a.threads:
        torch.set_num_threads(a.threads)
    load_before = os.getloadavg()
    dtype = getattr(torch, a.dtype) if a.dtype else (
        torch.bfloat16 if torch.device(a.device).type == "cuda" else torch.float32)
    model = build(a.preset, a.device, dtype)
    hf = to_hf(model, dtype, a.device)
    print(f"# {a.preset}: {model.num_params() / 1e6:.0f}M parameters, {dtype}, {a.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads", file=sys.stderr)

    # correctness first: greedy (with the penalty) token for token against transformers
    g = torch.Generator().manual_seed(1)
    check = torch.randint(3, 32000, (2, 16), generator=g).to(a.device)
    check[:, 0] = 1
    mine, hers = ours(model, check, 16, greedy=True), theirs(hf, check, 16, greedy=True)
    same = sum(x == y for r, s in zip(mine, hers) for x, y in zip(r, s)) / (2 * 16)
    print(f"greedy agreement with transformers: {same:.0%} of 32 tokens", file=sys.stderr)

    sections = []
    for name in a.parts:
        title, lines = PARTS[name](a, model, hf, dtype, g)
        sections.append(f"### {title}\n\n" + "\n".join(lines))
        print(sections[-1] + "\n", flush=True)
    load_after = os.getloadavg()
    import transformers
    header = [f"- Date: {datetime.date.today()}; device: {a.device} ({cpu_name()}, {os.cpu_count()} cores), "
              f"{torch.get_num_threads()} torch thread(s); torch {torch.__version__}, transformers {transformers.__version__}",
              f"- Command: `python benchmarks/bench_decode.py {' '.join(sys.argv[1:])}`",
              f"- Model: {a.preset} ({model.num_params() / 1e6:.0f}M parameters: dim {model.args.dim}, "
              f"{model.args.n_layers} layers, vocabulary {model.args.vocab_size}), {str(dtype).replace('torch.', '')}, "
              f"random weights; greedy agreement with transformers {same:.0%} of 32 tokens",
              f"- Load average (1 min) before / after: {load_before[0]:.1f} / {load_after[0]:.1f}"]
    text = "\n".join(header) + "\n\n" + "\n\n".join(sections) + "\n"
    print(text)
    if a.out:
        with open(a.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
