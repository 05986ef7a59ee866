"""A training step on a CPU against transformers' LlamaForCausalLM: the same weights (saved by
this project, loaded by transformers), the same examples, fp32, one thread (issue 16).

    python benchmarks/bench_train_cpu.py --out benchmarks/train_cpu.md

One step, for every implementation: forward with the loss over the trained tokens, backward,
gradient clip at 1.0, AdamW, zero_grad.
- `train.train_step`: what train.py runs on a CPU (FSDP2 over one process, a packed batch, the
  loss in slices); the model built by distributed.build_model.
- transformers padded: the examples right-padded to the longest, attention_mask, labels.
- transformers packed: one row, position_ids restarting at every example: transformers reads
  the boundaries from them and masks attention block-diagonally (SDPA over the whole row).
Batches: LIMA-like (lengths drawn as benchmarks/bench_kernels.lima_lengths draws them: many
short answers, a fifth near the maximum) and one that needs no padding (every example the same
length). The implementations take turns, one step each, `--repeats` times; the ratio of each
round (their seconds / ours) is kept and the table gives medians, of the wall time and of the
process time (one thread: the work itself, whatever else the machine runs). Correctness first:
from the same weights, the loss and gradient norm must agree with transformers'.
"""

import datetime
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import checkpoint  # noqa: E402
import distributed  # noqa: E402
import train  # noqa: E402
from bench_decode import cpu_name  # noqa: E402
from bench_kernels import lima_lengths  # noqa: E402
from config import parse_config  # noqa: E402
from data import Split  # noqa: E402
from model import IGNORE_INDEX, ModelArgs, Transformer  # noqa: E402

BATCHES = ("LIMA-like", "no padding")


def synthetic_split(lengths, vocab_size, seed, user_share=1 / 3):
    """A prepared-data split of random tokens: the first user_share of each example (BOS at
    least) is the user's turn (not trained), the rest the answer."""
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = rng.integers(3, vocab_size, offsets[-1]).astype(np.int32)
    tokens[offsets[:-1]] = 1  # BOS
    mask = np.ones(offsets[-1], dtype=bool)
    for a, n in zip(offsets[:-1], lengths):
        mask[a:a + max(1, int(n * user_share))] = False
    return Split(tokens=tokens, mask=mask, offsets=offsets)


def examples(split):
    """[(inputs (n - 1,), targets (n - 1,))] as train.pack makes them, one per example."""
    x, y, cu = train.pack(split, list(range(len(split))), "cpu", 1)
    return [(x[0, a:b], y[0, a:b]) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]


def hf_padded_batch(exs):
    T = max(len(x) for x, _ in exs)
    ids = torch.zeros(len(exs), T, dtype=torch.long)
    mask = torch.zeros(len(exs), T, dtype=torch.long)
    labels = torch.full((len(exs), T), IGNORE_INDEX)
    for b, (x, y) in enumerate(exs):
        ids[b, :len(x)], mask[b, :len(x)], labels[b, :len(x)] = x, 1, y
    # labels are already the next tokens: shift_labels skips transformers' own shift
    return dict(input_ids=ids, attention_mask=mask, labels=labels, shift_labels=labels)


def hf_packed_batch(exs):
    ids = torch.cat([x for x, _ in exs])[None]
    labels = torch.cat([y for _, y in exs])[None]
    positions = torch.cat([torch.arange(len(x)) for x, _ in exs])[None]
    return dict(input_ids=ids, position_ids=positions, labels=labels, shift_labels=labels)


def hf_loss(hf, batch, n_supervised):
    # the sum over trained tokens / their number: the same mean as train_step's.
    # use_cache=False: with a cache transformers would not read the packed boundaries
    return hf(**batch, num_items_in_batch=torch.tensor(n_supervised), use_cache=False).loss


def hf_step(hf, optimizer, batch, n_supervised):
    hf_loss(hf, batch, n_supervised).backward()
    torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def loss_and_norm(model, loss):
    """The loss and gradient norm of one batch, no step taken."""
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    model.zero_grad(set_to_none=True)
    return loss.item(), norm.item()


def adamw(params):
    # LIMA §3's optimizer, as train.make_optimizer sets it (foreach on a CPU)
    return torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)


@dataclass
class TrainBenchConfig:
    dim: int = field(default=512, metadata={"min": 1})
    n_layers: int = field(default=4, metadata={"min": 1})
    n_heads: int = field(default=4, metadata={"min": 1})
    vocab_size: int = field(default=32001, metadata={"min": 16})
    examples: int = field(default=8, metadata={"help": "examples per LIMA-like batch", "min": 1})
    max_len: int = field(default=1024, metadata={"help": "longest example of the LIMA-like batch", "min": 8})
    even: list[int] = field(default_factory=lambda: [4, 512],
                            metadata={"help": "the batch that needs no padding: N examples of LEN tokens",
                                      "min": 2})
    user_share: float = field(default=1 / 3, metadata={
        "help": "the share of each example that is the user's turn (no loss); 0: all trained", "min": 0, "max": 0.9})
    batches: list[str] = field(default_factory=lambda: list(BATCHES), metadata={"choices": BATCHES})
    repeats: int = field(default=5, metadata={"min": 1})
    threads: int = field(default=1, metadata={"min": 1})
    seed: int = 0
    out: str = field(default="", metadata={"help": "also append the table (markdown) here"})


def main(argv=None):
    a = parse_config(TrainBenchConfig, argv, description=__doc__.split("\n\n")[0])
    if len(a.even) != 2:
        raise SystemExit("--even takes two numbers: N examples of LEN tokens")
    torch.set_num_threads(a.threads)
    load_before = os.getloadavg()

    from transformers import LlamaForCausalLM
    args = ModelArgs(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, vocab_size=a.vocab_size,
                     multiple_of=256, max_seq_len=max(a.max_len, a.even[1]), resid_dropout=0.0)
    torch.manual_seed(a.seed)
    model = Transformer(args)
    model.init_weights()
    cfg = train.TrainConfig(lr=1e-5, resid_dropout=0.0, micro_batch_tokens=1 << 20, device="cpu")
    distributed.setup_distributed("cpu")  # train.py's path: a group of one, the plain model (uses_fsdp)
    tmp = tempfile.TemporaryDirectory()
    checkpoint.save_model(model, f"{tmp.name}/hf")

    def fresh():
        """Both models from the same weights, each with its optimizer."""
        ours = distributed.build_model(cfg, args, model.named_parameters(), torch.device("cpu"))
        hf = LlamaForCausalLM.from_pretrained(f"{tmp.name}/hf", dtype=torch.float32,
                                              attn_implementation="sdpa").train()
        return ours, train.make_optimizer(ours, cfg), hf, adamw(hf.parameters())

    g = torch.Generator().manual_seed(a.seed)
    batches = {"LIMA-like": lima_lengths(a.examples, a.max_len, g), "no padding": [a.even[1]] * a.even[0]}
    batches = {k: v for k, v in batches.items() if k in a.batches}
    print(f"# {model.num_params() / 1e6:.1f}M parameters, fp32, "
          f"{torch.get_num_threads()} thread(s), torch {torch.__version__}", file=sys.stderr)
    rows = []
    for name, lengths in batches.items():
        ours, ours_opt, hf, hf_opt = fresh()
        split = synthetic_split(lengths, a.vocab_size, a.seed, a.user_share)
        exs = examples(split)
        n_sup = int(sum((y != IGNORE_INDEX).sum() for _, y in exs))
        micro = [train.pack(split, list(range(len(split))), torch.device("cpu"), 1)]
        padded, packed = hf_padded_batch(exs), hf_packed_batch(exs)
        impls = {"train.train_step (packed)": lambda: train.train_step(ours, ours_opt, micro, n_sup, 1.0),
                 "transformers padded": lambda: hf_step(hf, hf_opt, padded, n_sup),
                 "transformers packed": lambda: hf_step(hf, hf_opt, packed, n_sup)}
        # correctness first, before any step: the same loss and gradient norm from the same weights
        x, y, cu = micro[0]
        first = {"train.train_step (packed)": loss_and_norm(ours, ours(x, y, cu_seqlens=cu, reduction="sum")
                                                           / n_sup),
                 "transformers padded": loss_and_norm(hf, hf_loss(hf, padded, n_sup)),
                 "transformers packed": loss_and_norm(hf, hf_loss(hf, packed, n_sup))}
        ref = first["train.train_step (packed)"]
        for k, (loss, norm) in first.items():
            ok = abs(loss - ref[0]) < 1e-4 * abs(ref[0]) and abs(norm - ref[1]) < 1e-3 * abs(ref[1])
            print(f"  {name}, {k}: loss {loss:.6f}, grad norm {norm:.6f}{'' if ok else '  MISMATCH'}",
                  file=sys.stderr)
            if not ok:
                raise SystemExit(f"{k} disagrees with train.train_step on the first step")
        for fn in impls.values():  # warm up: the optimizer's state, allocator, first-call costs
            fn()
        times = {k: [] for k in impls}  # (wall, process) seconds per round
        for r in range(a.repeats):
            for k, fn in impls.items():
                t, c = time.perf_counter(), time.process_time()
                fn()
                times[k].append((time.perf_counter() - t, time.process_time() - c))
            print(f"  {name}, round {r + 1}: " + ", ".join(f"{k} {v[-1][0]:.2f}s" for k, v in times.items()),
                  file=sys.stderr)
        mine = times["train.train_step (packed)"]
        tokens = sum(lengths) - len(lengths)
        for k, v in times.items():
            wall, cpu = (statistics.median(x[i] for x in v) for i in (0, 1))
            speed = [statistics.median(x[i] / m[i] for x, m in zip(v, mine)) for i in (0, 1)]
            note = f" ({max(lengths) * len(lengths) / tokens:.2f}x the tokens)" if k.endswith("padded") else ""
            rows.append(f"| {name} | {len(lengths)} x {min(lengths)}-{max(lengths)} | {k}{note} | {wall:.2f} | "
                        f"{cpu:.2f} | {tokens / wall:.0f} | {speed[0]:.2f}x; {speed[1]:.2f}x |")
    load_after = os.getloadavg()
    tmp.cleanup()

    table = ["| batch | examples x tokens | implementation | step s (wall) | step s (process) | tokens/s (wall) "
             "| train_step's speed vs this (wall; process) |", "|---|---|---|---|---|---|---|"] + rows
    header = [f"- Date: {datetime.date.today()}; device: {cpu_name()}, {os.cpu_count()} cores, "
              f"{torch.get_num_threads()} torch thread(s); torch {torch.__version__}, "
              f"transformers {__import__('transformers').__version__}",
              f"- Command: `python benchmarks/bench_train_cpu.py {' '.join(sys.argv[1:])}`",
              f"- Model: dim {a.dim}, {a.n_layers} layers, {a.n_heads} heads, vocabulary {a.vocab_size} "
              f"({model.num_params() / 1e6:.1f}M parameters), fp32, no dropout; the first "
              f"{a.user_share:.0%} of each example is the user's turn (no loss); {a.repeats} rounds, the "
              f"implementations in turn; medians",
              f"- Load average (1 min) before / after: {load_before[0]:.1f} / {load_after[0]:.1f}"]
    text = "\n".join(header + [""] + table)
    print(text)
    if a.out:
        with open(a.out, "a") as f:
            f.write(text + "\n\n")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
