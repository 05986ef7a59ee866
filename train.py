"""LIMA fine-tuning: 15 epochs of plain next-token loss on ~1,000 examples (LIMA §3).

    # the built-in demo: a tiny model from scratch on the demo data, CPU, a few minutes
    python prepare_data.py --demo --out_dir data/demo && python train.py --preset demo

    # LIMA 65B (the paper's run): 8 GPUs, FSDP2
    torchrun --nproc_per_node=8 train.py --init_from /llama/65B --data_dir data/lima --out_dir out/lima-65b
    # LIMA's 7B ablation setting (batch 64, residual dropout 0.2)
    torchrun --nproc_per_node=8 train.py --preset small --init_from /llama/7B --data_dir data/lima --out_dir out/lima-7b
    # Llama 3.x (data prepared with its tokenizer: prepare_data.py --tokenizer Llama-3.2-1B/tokenizer.json):
    # 3.2 1B on one GPU; 3.2 3B on one GPU with --activation_checkpointing; 3.1 8B on 8 GPUs
    python train.py --preset small --init_from /llama/Llama-3.2-1B --data_dir data/lima-llama3 --out_dir out/lima-llama3.2-1b
    python train.py --preset small --init_from /llama/Llama-3.2-3B --data_dir data/lima-llama3 --out_dir out/lima-llama3.2-3b --activation_checkpointing
    torchrun --nproc_per_node=8 train.py --preset small --init_from /llama/Llama-3.1-8B --data_dir data/lima-llama3 --out_dir out/lima-llama3.1-8b
    # Llama 3.3 70B: 8 GPUs of 80 GB with the state in host memory (~1.1 TB of it), or 2 nodes with bf16 state
    torchrun --nproc_per_node=8 train.py --init_from /llama/Llama-3.3-70B --data_dir data/lima-llama3 --out_dir out/lima-llama3.3-70b --cpu_offload --activation_checkpointing
    # several nodes: run on each node
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py ...

Every optimizer step takes `batch_size` examples, split over ranks and then into packed
micro-batches (one token stream per micro-batch, example boundaries in `cu_seqlens`, no padding).
The loss is the mean over all supervised tokens of the whole step, whatever the split.
"""

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from tqdm import tqdm

import checkpoint
import config
import data
import distributed
import files
import optim
from config import DTYPES, parse_config
from distributed import log
from generate import respond
from model import PRESETS as MODEL_PRESETS
from model import IGNORE_INDEX, Transformer, init_untrained_row, mean_rows, model_args
from tokenizer import Tokenizer, load_tokenizer


@dataclass
class TrainConfig:
    """Fine-tune a LLaMA on LIMA-format data prepared by prepare_data.py."""
    init_from: str = field(default="", metadata={"help": "base model dir (Meta or HF layout, or one of ours): LLaMA 1, Llama 2, Llama 3.x; empty: from scratch"})
    model: str = field(default="debug", metadata={"help": f"model preset when training from scratch: {', '.join(MODEL_PRESETS)}"})
    data_dir: str = field(default="data/lima", metadata={"help": "output of prepare_data.py"})
    out_dir: str = field(default="out/lima", metadata={"help": "checkpoints, resume state, metrics.jsonl, dev generations"})
    # LIMA §3: "15 epochs using AdamW with β1 = 0.9, β2 = 0.95, and weight decay of 0.1.
    # Without warmup steps, we set the initial learning rate to 1e-5 and linearly decaying to
    # 1e-6 by the end of training. The batch size is set to 32 examples (64 for smaller
    # models), and texts longer than 2048 tokens are trimmed."
    epochs: int = field(default=15, metadata={"help": "LIMA §3"})
    batch_size: int = field(default=32, metadata={"help": "examples per optimizer step, all ranks together (LIMA §3)"})
    lr: float = field(default=1e-5, metadata={"help": "at step 0, no warmup (LIMA §3)"})
    min_lr: float = field(default=1e-6, metadata={"help": "at the last step, linear decay (LIMA §3)"})
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = field(default=0.1, metadata={"help": "on matrices, not on norms (LIMA §3)"})
    grad_clip: float = field(default=1.0, metadata={"help": "max grad norm; the paper is silent (ours: LLaMA's pretraining value); 0 = off"})
    # LIMA §3: "residual dropout ... linearly raise the rate across the layers, from p=0.0 at
    # the bottom layer to p=0.3 at the last layer (p=0.2 for smaller models)".
    resid_dropout: float = field(default=0.3, metadata={"help": "p_max of the depth-scaled residual dropout (LIMA §3)"})
    # LIMA §3: checkpoints were picked by hand among epochs 5-10 on the dev set
    save_epochs: list[int] = field(default_factory=lambda: [5, 6, 7, 8, 9, 10], metadata={"help": "epochs (1-based) with a full checkpoint and dev generations; the last epoch always"})
    generate_every_epoch: bool = field(default=False, metadata={"help": "dev generations after every epoch, not only the saved ones"})
    dev_max_new_tokens: Optional[int] = field(default=None, metadata={"help": "cap on dev responses; None: up to the context (LIMA §5)"})
    micro_batch_tokens: int = field(default=8192, metadata={"help": "token budget of one packed micro-batch per rank"})
    seed: int = 1337
    resume: bool = field(default=False, metadata={"help": "continue from out_dir/resume (the end of the last finished epoch)"})
    device: str = field(default="auto", metadata={"help": "auto: cuda if available, else cpu"})
    param_dtype: str = field(default="float32", metadata={"help": f"sharded master weights and so optimizer state: {' or '.join(DTYPES[:2])} (65B on 8x80GB)"})
    compute_dtype: str = field(default="auto", metadata={"help": f"forward/backward dtype: auto (bfloat16 on cuda, else param_dtype), {', '.join(DTYPES[:2])}"})
    activation_checkpointing: bool = field(default=False, metadata={"help": "recompute each block in the backward"})
    cpu_offload: bool = field(default=False, metadata={"help": "keep sharded params, grads and optimizer state in host memory"})
    force: bool = field(default=False, metadata={"help": "start even if the memory plan says it does not fit"})
    max_steps: Optional[int] = field(default=None, metadata={"help": "stop after this many optimizer steps (benchmarks, tests)"})


PRESETS = {
    # LIMA §3: "64 for smaller models", "p=0.2 for smaller models" (the 7B ablations)
    "small": dict(batch_size=64, resid_dropout=0.2),
    # The built-in demo: a tiny model learns the chat format from scratch on a CPU. Not the
    # paper's numbers: from random init it needs a far larger learning rate and no dropout.
    "demo": dict(model="demo", data_dir="data/demo", out_dir="out/demo", epochs=15,
                 lr=3e-3, min_lr=3e-4, resid_dropout=0.0, save_epochs=[15],
                 dev_max_new_tokens=64, device="cpu", micro_batch_tokens=4096),
}


# ---- batches -----------------------------------------------------------------------------------

def epoch_order(n, epoch, seed, lengths, batch_size):
    """The examples of one epoch, shuffled with (seed, epoch) so a resumed run sees the same
    order. In the first epoch the longest examples go first, so an out-of-memory shows at once."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    if epoch == 0:
        longest = np.argsort(-lengths, kind="stable")[:batch_size]
        order = np.concatenate([longest, order[~np.isin(order, longest)]])
    return order


def plan_microbatches(indices, lengths, world_size, budget):
    """Split one step's examples over ranks, then into packed micro-batches of at most `budget`
    tokens (an example longer than that gets one to itself). Longest first to the least loaded
    rank balances the work. Every rank gets the same number of micro-batches, because each
    FSDP forward is a collective: a rank with nothing left runs an empty one.
    Returns plan[rank][micro] = list of example indices."""
    ranks = [[] for _ in range(world_size)]
    load = [0] * world_size
    for i in sorted(indices, key=lambda i: -lengths[i]):
        r = load.index(min(load))
        ranks[r].append(i)
        load[r] += lengths[i]
    plan = []
    for examples in ranks:
        micro, used = [[]], 0
        for i in examples:
            if micro[-1] and used + lengths[i] > budget:
                micro.append([])
                used = 0
            micro[-1].append(i)
            used += lengths[i]
        plan.append(micro)
    n_micro = max(len(m) for m in plan)
    return [m + [[] for _ in range(n_micro - len(m))] for m in plan]


def pack(split, examples, device, bos_id):
    """Examples -> one packed sequence: inputs (1, T), targets (1, T), cu_seqlens (n + 1,).
    Each example of n tokens gives n - 1 (input, next-token target) pairs; targets where the
    mask is False (the user's turns) are IGNORE_INDEX. An empty micro-batch is a single BOS
    with nothing to learn."""
    if not examples:
        x = torch.tensor([[bos_id]], device=device)
        return x, torch.full_like(x, IGNORE_INDEX), torch.tensor([0, 1], dtype=torch.int32, device=device)
    xs, ys, cu = [], [], [0]
    for i in examples:
        tokens, mask = split.example(i)
        tokens = torch.from_numpy(tokens.astype(np.int64))
        target = tokens[1:].clone()
        target[~torch.tensor(mask[1:], dtype=torch.bool)] = IGNORE_INDEX
        xs.append(tokens[:-1])
        ys.append(target)
        cu.append(cu[-1] + len(tokens) - 1)
    x, y = torch.cat(xs)[None].to(device), torch.cat(ys)[None].to(device)
    return x, y, torch.tensor(cu, dtype=torch.int32, device=device)


def supervised_counts(split):
    """Trained targets per example: mask[1:] (a target is the next token), counted once."""
    c = np.concatenate([[0], np.cumsum(split.mask, dtype=np.int64)])
    return c[split.offsets[1:]] - c[split.offsets[:-1] + 1]


# ---- model -----------------------------------------------------------------------------------

def lr_at(step, total_steps, cfg):
    # LIMA §3: 1e-5 at the first step, linearly to 1e-6 at the last, no warmup
    return cfg.lr + (cfg.min_lr - cfg.lr) * step / max(total_steps - 1, 1)


def resolve_model_args(cfg, meta, tokenizer):
    """The architecture, and whether the EOT row must be added to the base vocabulary: only
    where the base has no end-of-turn token of its own (LLaMA 1 / 2; Llama 3 has <|eot_id|>)."""
    if cfg.init_from:
        args = checkpoint.load_args(cfg.init_from)
        if args.vocab_size not in (tokenizer.n_base, tokenizer.vocab_size):
            raise ValueError(
                f"{cfg.init_from}: the model's vocabulary has {args.vocab_size} rows, but the data in "
                f"{cfg.data_dir} was tokenized with {meta['tokenizer']} ({tokenizer.n_base} ids"
                f"{' + EOT' if tokenizer.adds_eot else ', EOT included'}). Run prepare_data.py "
                f"with the tokenizer that came with this model.")
        add_eot = args.vocab_size < tokenizer.vocab_size
        tok = checkpoint.find_tokenizer(cfg.init_from)
        if tok is not None:  # the data must have been tokenized with the model's own tokenizer
            data.check_tokenizer(meta, load_tokenizer(tok))
        args.vocab_size = tokenizer.vocab_size
    else:
        args = model_args(cfg.model, vocab_size=meta["vocab_size"])
        add_eot = False
    args.max_seq_len = max(args.max_seq_len, meta["max_len"])
    args.resid_dropout = cfg.resid_dropout
    return args, add_eot


def source_weights(cfg, args, add_eot, eot_id):
    """(name, full tensor) one at a time: from the base checkpoint, with the EOT row appended
    (model.mean_rows, LIMA §3), or where the base has its own EOT but never trained it (Llama 3
    base models: a zero row), that row set the same way (model.init_untrained_row); or a random
    init made the same way on every rank."""
    if not cfg.init_from:
        torch.manual_seed(cfg.seed)
        scratch = Transformer(args)
        scratch.init_weights()
        yield from ((name, p.detach()) for name, p in scratch.named_parameters())  # tied: once
        return
    for name, tensor in checkpoint.iter_weights(cfg.init_from):
        if name in ("tok_embeddings.weight", "output.weight"):  # one name only when tied
            if add_eot:
                tensor = mean_rows(tensor)
            else:
                tensor, untrained = init_untrained_row(tensor, eot_id)
                if untrained:
                    log(f"{name}: the base's EOT row ({eot_id}) was never trained (all zeros); it "
                        f"starts as the mean of the trained rows, as an added EOT would")
        yield name, tensor


def make_optimizer(model, cfg):
    # LIMA §3: AdamW (0.9, 0.95), weight decay 0.1 on the matrices; norms' gains are not decayed
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    groups = [dict(params=decay, weight_decay=cfg.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    hp = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    if distributed.param_dtype(cfg) == torch.bfloat16:
        # bf16 master weights: LIMA's updates are below bf16's resolution; optim.AdamW keeps
        # them by stochastic rounding
        return optim.AdamW(groups, seed=cfg.seed, **hp)
    # fused: one kernel for the whole update on GPUs (torchtitan's default); elsewhere foreach
    fused = all(p.device.type == "cuda" for p in decay + no_decay)
    return torch.optim.AdamW(groups, fused=fused or None, **hp)


# ---- evaluation --------------------------------------------------------------------------------

@torch.no_grad()
def dev_loss(model, split, world_size, rank, budget, device, bos_id):
    """Mean loss over the supervised tokens of the whole dev set (all ranks together)."""
    if split is None or len(split) == 0:
        return None
    model.eval()
    plan = plan_microbatches(list(range(len(split))), split.lengths, world_size, budget)
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for examples in plan[rank]:
        x, y, cu = pack(split, examples, device, bos_id)
        loss = model(x, y, cu_seqlens=cu, reduction="sum")
        total += torch.stack([loss.double(), (y != IGNORE_INDEX).sum().double()])
    dist.all_reduce(total)
    model.train()
    return (total[0] / total[1].clamp(min=1)).item()


def dev_generations(model, tokenizer, prompts, path, epoch, cfg, seed):
    """Responses to every dev prompt with the paper's decoding (LIMA §5), for choosing the
    checkpoint by reading them (LIMA §3). Every rank decodes the same batch in lockstep, since
    each FSDP forward is a collective; rank 0 writes the file."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    responses = respond(model, tokenizer, [p["turns"] for p in prompts], generator=generator,
                        max_new_tokens=cfg.dev_max_new_tokens, all_done=distributed.all_ranks_done)
    if dist.get_rank() == 0:
        data.write_jsonl(path, [{"id": p.get("id"), "source": p.get("source"), "prompt": p["turns"][-1],
                                 "response": r, "reference": p.get("reference"), "epoch": epoch}
                                for p, r in zip(prompts, responses)])


# ---- training ----------------------------------------------------------------------------------

def train_step(model, optimizer, micro_batches, n_supervised, grad_clip):
    """One optimizer step over this rank's packed micro-batches [(x, y, cu_seqlens), ...].

    The loss is the mean over the n_supervised trained tokens of the whole step, all ranks
    together, however the examples were split. Returns (that mean, the gradient norm before
    clipping). A non-finite loss returns before the optimizer step, which is then not taken."""
    world_size = dist.get_world_size()
    device = micro_batches[0][0].device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for x, y, cu in micro_batches:
        loss = model(x, y, cu_seqlens=cu, reduction="sum")  # no logits: the loss is sliced
        # each micro-batch's share of the step's mean; FSDP averages gradients over ranks,
        # so scale by world_size to get the sum over all ranks' tokens
        (loss * (world_size / max(n_supervised, 1))).backward()
        loss_sum += loss.detach().double()
    dist.all_reduce(loss_sum)
    step_loss = loss_sum.item() / max(n_supervised, 1)
    if not math.isfinite(step_loss):
        optimizer.zero_grad(set_to_none=True)
        return step_loss, float("nan")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    grad_norm = (grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm).item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss, grad_norm


@dataclass
class Run:
    """One training run's state, as the loop and the end-of-epoch work share it."""
    cfg: TrainConfig
    device: torch.device
    rank: int
    world_size: int
    meta: dict  # the prepared data's meta.json
    tokenizer: Tokenizer
    args: object  # model.ModelArgs
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    train_split: data.Split
    dev_split: Optional[data.Split]
    dev_prompts: list
    epoch: int = 0  # where the loop is (0-based epoch, optimizer steps taken)
    step: int = 0


def setup(cfg):
    device, rank, world_size = distributed.setup_distributed(cfg.device)
    meta = data.load_meta(cfg.data_dir)
    train_split = data.load_split(cfg.data_dir, "train")
    has_dev = meta.get("splits", {}).get("dev", {}).get("examples")
    dev_split = data.load_split(cfg.data_dir, "dev") if has_dev else None
    dev_prompts = data.read_prompts(cfg.data_dir, "dev") if has_dev else []
    tokenizer = load_tokenizer(meta["tokenizer"])
    args, add_eot = resolve_model_args(cfg, meta, tokenizer)
    if device.type == "cpu":
        threads = config.set_cpu_threads(args.dim, device)
        log(f"cpu: {threads} torch thread{'s' * (threads > 1)} per process (OMP_NUM_THREADS sets it)")
    distributed.memory_plan(cfg, args, world_size, device, meta["max_len"])
    model = distributed.build_model(cfg, args, source_weights(cfg, args, add_eot, tokenizer.eot_id),
                                    device)
    torch.manual_seed(cfg.seed + rank)  # dropout masks: repeatable, different on each rank
    optimizer = make_optimizer(model, cfg)
    os.makedirs(cfg.out_dir, exist_ok=True)
    return Run(cfg, device, rank, world_size, meta, tokenizer, args, model, optimizer,
               train_split, dev_split, dev_prompts)


PEAK_BF16 = 989e12  # H100 / H200 SXM dense bf16, the datasheet figure: MFU's denominator


def step_flops(args, n_params, lengths):
    """Training FLOPs of one step: 6 N per token for the matmuls (forward + backward), plus
    causal attention, 6 * layers * dim * len^2 per example; recomputation is not counted."""
    tokens = sum(int(n) - 1 for n in lengths)
    return 6 * n_params * tokens + sum(6 * args.n_layers * args.dim * int(n) ** 2 for n in lengths)


def start_logs(run):
    """metrics.jsonl: a fresh run starts it anew; a resumed one keeps the lines of the steps
    before its resume point (the killed run may have logged a few more)."""
    path = os.path.join(run.cfg.out_dir, "metrics.jsonl")
    if run.rank != 0:
        return path
    if run.cfg.resume and os.path.exists(path):
        kept = [r for _, r in data.read_jsonl(path, repair_tail=True) if r["step"] < run.step]
        data.write_jsonl(path, kept)
    elif os.path.exists(path):
        os.remove(path)
    files.write_json(os.path.join(run.cfg.out_dir, "train_config.json"), asdict(run.cfg))
    return path


def train(cfg):
    run = setup(cfg)
    split, lengths = run.train_split, run.train_split.lengths
    supervised = supervised_counts(split)
    steps_per_epoch = math.ceil(len(split) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs  # the lr schedule's length
    stop_at = total_steps if cfg.max_steps is None else min(total_steps, cfg.max_steps)
    run.epoch, run.step = 0, 0
    if cfg.resume:
        state = distributed.load_resume(run.model, run.optimizer, cfg.out_dir)
        run.epoch, run.step = state["epoch"], state["step"]
        log(f"resumed at epoch {run.epoch + 1}, step {run.step}")
    metrics = start_logs(run)
    n_params = sum(p.numel() for p in run.model.parameters())
    bf16_gpu = run.device.type == "cuda" and distributed.compute_dtype(cfg, run.device) == torch.bfloat16
    bar = tqdm(total=stop_at, initial=run.step, disable=run.rank != 0, desc="train", dynamic_ncols=True)
    run.model.train()
    for epoch in range(run.epoch, cfg.epochs):
        order = epoch_order(len(split), epoch, cfg.seed, lengths, cfg.batch_size)
        for b in range(run.step - epoch * steps_per_epoch, steps_per_epoch):
            if run.step >= stop_at:
                break
            t0 = time.perf_counter()
            batch = order[b * cfg.batch_size:(b + 1) * cfg.batch_size].tolist()
            plan = plan_microbatches(batch, lengths, run.world_size, cfg.micro_batch_tokens)
            n_supervised = int(supervised[batch].sum())  # the same number on every rank
            lr = lr_at(run.step, total_steps, cfg)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            micro = [pack(split, examples, run.device, run.tokenizer.bos_id) for examples in plan[run.rank]]
            loss, grad_norm = train_step(run.model, run.optimizer, micro, n_supervised, cfg.grad_clip)
            if not math.isfinite(loss):
                raise SystemExit(
                    f"loss is {loss} at step {run.step} (epoch {epoch + 1}); no checkpoint was written "
                    f"for this step. Try a lower --lr, --param_dtype float32, or check the data in "
                    f"{cfg.data_dir}.")
            dt = time.perf_counter() - t0
            tokens = int(sum(lengths[i] - 1 for i in batch))
            record = dict(step=run.step, epoch=epoch + 1, loss=loss, lr=lr, grad_norm=grad_norm,
                          tokens=tokens, supervised_tokens=n_supervised, tokens_per_s=tokens / dt, time_s=dt)
            if bf16_gpu:
                flops = step_flops(run.args, n_params, [lengths[i] for i in batch])
                record["mfu"] = flops / dt / (PEAK_BF16 * run.world_size)
                record["peak_mem_gib"] = torch.cuda.max_memory_allocated(run.device) / 2**30
            if run.rank == 0:
                with open(metrics, "a") as f:
                    f.write(json.dumps(record) + "\n")
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.4f}", tok_s=f"{tokens / dt:,.0f}")
                bar.update(1)
            run.step += 1
        if run.step < (epoch + 1) * steps_per_epoch:
            break  # stopped early by --max_steps: no end-of-epoch work for a partial epoch
        end_of_epoch(run, epoch)
    bar.close()
    saved = sorted(d for d in os.listdir(cfg.out_dir) if d.startswith("epoch_"))
    log(f"done: {run.step} steps. In {cfg.out_dir}: metrics.jsonl (one line per step), dev.jsonl "
        f"(dev loss per epoch), dev_generations/ (responses to read when picking a checkpoint), "
        f"resume/ (for --resume), checkpoints {', '.join(saved) or 'none'}")
    dist.destroy_process_group()


def end_of_epoch(run, epoch):
    """Dev loss, dev answers and a checkpoint for the epochs to choose among (LIMA §3), then the
    resume state."""
    cfg, ep = run.cfg, epoch + 1  # 1-based, as the paper counts epochs
    loss = dev_loss(run.model, run.dev_split, run.world_size, run.rank, cfg.micro_batch_tokens,
                    run.device, run.tokenizer.bos_id)
    if loss is not None:
        log(f"epoch {ep}: dev loss {loss:.4f}")
        if run.rank == 0:
            with open(os.path.join(cfg.out_dir, "dev.jsonl"), "a") as f:
                f.write(json.dumps({"epoch": ep, "step": run.step, "dev_loss": loss}) + "\n")
    keep = ep in cfg.save_epochs or ep == cfg.epochs
    if run.dev_prompts and (keep or cfg.generate_every_epoch):
        os.makedirs(os.path.join(cfg.out_dir, "dev_generations"), exist_ok=True)
        path = os.path.join(cfg.out_dir, "dev_generations", f"epoch_{ep:02d}.jsonl")
        dev_generations(run.model, run.tokenizer, run.dev_prompts, path, ep, cfg, cfg.seed + ep)
        log(f"epoch {ep}: dev generations in {path}")
    if keep:
        path = os.path.join(cfg.out_dir, f"epoch_{ep:02d}")
        save_dtype = torch.bfloat16 if run.device.type == "cuda" else torch.float32
        extra = dict(eot_id=run.meta["eot_id"], epoch=ep, train_config=asdict(cfg))
        distributed.save_consolidated(run.model, run.args, path, save_dtype, run.meta["tokenizer"], extra)
        log(f"epoch {ep}: checkpoint in {path}")
    distributed.save_resume(run.model, run.optimizer, cfg.out_dir, run.step, ep)


def main(argv=None):
    cfg = parse_config(TrainConfig, argv, presets=PRESETS)
    try:
        train(cfg)
    except (FileNotFoundError, ValueError) as e:  # bad input: a clear message, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
