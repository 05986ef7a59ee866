"""LIMA fine-tuning: 15 epochs of plain next-token loss on ~1,000 examples (LIMA §3).

    # the built-in demo: LIMA's recipe on the small pretrained base in demo/base, CPU, ~2 minutes
    python prepare_data.py --demo --out_dir data/demo && python train.py --preset demo

    # LIMA 65B (the paper's run): 8 GPUs, FSDP2
    torchrun --nproc_per_node=8 train.py --init_from /llama/65B --data_dir data/lima --out_dir out/lima-65b
    # LIMA's 7B ablation setting (batch 64, residual dropout 0.2)
    torchrun --nproc_per_node=8 train.py --preset small --init_from /llama/7B --data_dir data/lima --out_dir out/lima-7b
    # LIMA §6's dialogue model: the same recipe from the base model on the 1,030 rows (prepare_data.py --dialogues)
    torchrun --nproc_per_node=8 train.py --init_from /llama/65B --data_dir data/lima-dialogue --out_dir out/lima-dialogue-65b
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

out_dir belongs to one run. A second process on it is refused while the first runs (a lock the
kernel drops when its holder dies). Into an out_dir that holds a run, a new run starts only with
--overwrite; --resume continues it from the end of its last finished epoch, refusing settings
or data that would make it another run, and trims its logs back to that point. Nothing
non-finite is ever written: a step whose loss or gradient norm is NaN or inf is not taken and
the run stops, keeping the last good state. The resume state is safetensors and JSON (no
pickle: no code runs from a file in out_dir). Ctrl-C says what was kept and how to continue.
"""

import gc
import json
import math
import os
import sys
import time
from contextlib import ExitStack
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
import devices
import distributed
import files
import rundir
import optim
import report
from config import check_ranges, parse_config
from distributed import log
from generate import Decoding, encode_prompt, respond
from model import PRESETS as MODEL_PRESETS
from model import IGNORE_INDEX, Transformer, init_untrained_row, mean_rows, model_args
from tokenizer import load_tokenizer

SCRATCH = "scratch"  # --init_from scratch: random weights, only when asked for


@dataclass
class TrainConfig:
    """Fine-tune a LLaMA on LIMA-format data prepared by prepare_data.py."""
    init_from: str = field(default="", metadata={
        "help": "the base model's directory (Meta or HF layout, or one of ours): LLaMA 1, Llama 2, "
                "Llama 3.x; 'scratch' trains a --model preset from random weights"})
    tokenizer: Optional[str] = field(default=None, metadata={
        "help": "the base model's tokenizer file (tokenizer.model or tokenizer.json) when it is not "
                "in --init_from or its parent (checked against the data's)"})
    model: str = field(default="debug", metadata={
        "help": "model preset for --init_from scratch", "choices": sorted(MODEL_PRESETS)})
    data_dir: str = field(default="data/lima", metadata={"help": "output of prepare_data.py"})
    out_dir: str = field(default="out/lima", metadata={
        "help": "checkpoints, resume state, metrics.jsonl, training_curves.png, dev generations"})
    # LIMA §3: "15 epochs using AdamW with β1 = 0.9, β2 = 0.95, and weight decay of 0.1.
    # Without warmup steps, we set the initial learning rate to 1e-5 and linearly decaying to
    # 1e-6 by the end of training. The batch size is set to 32 examples (64 for smaller
    # models), and texts longer than 2048 tokens are trimmed."
    epochs: int = field(default=15, metadata={"help": "LIMA §3", "min": 1})
    batch_size: int = field(default=32, metadata={
        "help": "examples per optimizer step, all ranks together (LIMA §3)", "min": 1})
    # max: Adam's step is up to 1e4 lr (lr / (1 - beta1^t)) and must stay a float32 (< 3e38)
    lr: float = field(default=1e-5, metadata={"help": "at step 0, no warmup (LIMA §3)", "min": 0, "max": 1e30})
    min_lr: float = field(default=1e-6, metadata={
        "help": "at the last step, linear decay (LIMA §3)", "min": 0, "max": "lr"})
    beta1: float = field(default=0.9, metadata={"min": 0, "max": 0.9999})  # 1: the moment never moves
    beta2: float = field(default=0.95, metadata={"min": 0, "max": 0.9999})
    weight_decay: float = field(default=0.1, metadata={"help": "on matrices, not on norms (LIMA §3)", "min": 0})
    grad_clip: float = field(default=1.0, metadata={
        "help": "max grad norm; the paper is silent (ours: LLaMA's pretraining value); 0 = off", "min": 0})
    # LIMA §3: "residual dropout ... linearly raise the rate across the layers, from p=0.0 at
    # the bottom layer to p=0.3 at the last layer (p=0.2 for smaller models)".
    resid_dropout: float = field(default=0.3, metadata={
        "help": "p_max of the depth-scaled residual dropout (LIMA §3)", "min": 0, "max": 1})
    # LIMA §3: checkpoints were picked by hand among epochs 5-10 on the dev set
    save_epochs: list[int] = field(default_factory=lambda: [5, 6, 7, 8, 9, 10], metadata={
        "help": "epochs (1-based) with a full checkpoint and dev generations; the last epoch always",
        "min": 1, "max": "epochs"})
    generate_every_epoch: bool = field(default=False, metadata={
        "help": "dev generations after every epoch, not only the saved ones"})
    dev_max_new_tokens: Optional[int] = field(default=None, metadata={
        "help": "cap on dev responses; None: up to the context (LIMA §5)", "min": 1})
    micro_batch_tokens: int = field(default=8192, metadata={
        "help": "token budget of one packed micro-batch per rank", "min": 1})
    seed: int = field(default=1337, metadata={"min": 0})
    resume: bool = field(default=False, metadata={
        "help": "continue the run in out_dir from the end of its last finished epoch"})
    overwrite: bool = field(default=False, metadata={"help": "delete the earlier run in out_dir and start again"})
    device: str = field(default="auto", metadata={
        "help": "auto: cuda if available, else cpu", "choices": ["auto", "cpu", "cuda"]})
    param_dtype: str = field(default="float32", metadata={
        "help": "sharded master weights and so optimizer state (65B on 8x80GB: bfloat16)",
        "choices": ["float32", "bfloat16"]})
    compute_dtype: str = field(default="auto", metadata={
        "help": "forward/backward dtype: auto is bfloat16 on cuda, else param_dtype",
        "choices": ["auto", "float32", "bfloat16"]})
    activation_checkpointing: bool = field(default=False, metadata={"help": "recompute each block in the backward"})
    cpu_offload: bool = field(default=False, metadata={
        "help": "keep sharded params, grads and optimizer state in host memory"})
    force: bool = field(default=False, metadata={"help": "start even if the memory plan says it does not fit"})
    max_steps: Optional[int] = field(default=None, metadata={
        "help": "stop after this many optimizer steps (benchmarks, tests)", "min": 1})
    # --plan_only: the plan of a run, before renting the GPUs (no weights needed, only their config)
    plan_only: bool = field(default=False, metadata={"help": "print the memory, disk and time plan for --gpus GPUs and every option set, then stop"})
    gpus: int = field(default=8, metadata={"help": "GPUs (ranks) to plan for with --plan_only", "min": 1})
    gpu_memory_gib: float = field(default=80.0, metadata={"help": "memory of each GPU, for --plan_only", "gt": 0})
    plan_mfu: float = field(default=0.4, metadata={"help": "model FLOPs utilisation the time estimate assumes", "gt": 0, "max": 1})


LR_DEMO = 3e-4  # a tenth of the base's pretraining peak; LIMA's 1e-5 barely moves it (lr_sweep.md)
PRESETS = {
    # LIMA §3: "64 for smaller models", "p=0.2 for smaller models" (the 7B ablations)
    "small": dict(batch_size=64, resid_dropout=0.2),
    # The built-in demo: LIMA's recipe for its smaller model ("small" above) on the 1.3M-parameter
    # base that demo/pretrain.py pretrained (demo/base). One change, measured: a learning rate
    # for this size (experiments/results/lr_sweep.md), still decaying linearly to a tenth.
    "demo": dict(init_from="demo/base", data_dir="data/demo", out_dir="out/demo", epochs=15,
                 batch_size=64, resid_dropout=0.2, lr=LR_DEMO, min_lr=LR_DEMO / 10,
                 save_epochs=[15], dev_max_new_tokens=64, device="cpu", micro_batch_tokens=4096),
}


# ---- batches -----------------------------------------------------------------------------------

def epoch_order(n, epoch, seed):
    """The examples of one epoch, shuffled with (seed, epoch) so a resumed run sees the same
    order. Every batch is an ordinary draw, the first included (the memory check is
    probe_memory's, and takes no step)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


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


def probe_plan(lengths, batch_size, world_size, budget):
    """The heaviest micro-batch of each rank this run can meet: those of a step made of the
    batch_size longest examples. -> plan[rank] = example indices."""
    longest = np.argsort(-lengths, kind="stable")[:batch_size].tolist()
    return [micro[0] for micro in plan_microbatches(longest, lengths, world_size, budget)]


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
    where the base has no end-of-turn token of its own (LLaMA 1 / 2; Llama 3 has <|eot_id|>).
    The data must have been tokenized with the base model's own tokenizer: the same number of
    pieces is not enough (other pieces would train the model on wrong ids), so its file is
    compared."""
    if cfg.init_from == SCRATCH:
        args = model_args(cfg.model, vocab_size=meta["vocab_size"])
        add_eot = False
    else:
        args = checkpoint.load_args(cfg.init_from)
        if args.vocab_size not in (tokenizer.n_base, tokenizer.vocab_size):
            raise ValueError(
                f"{cfg.init_from}: the model's vocabulary has {args.vocab_size} rows, but the data in "
                f"{cfg.data_dir} was tokenized with {meta['tokenizer']} ({tokenizer.n_base} ids"
                f"{' + EOT' if tokenizer.adds_eot else ', EOT included'}). Run prepare_data.py "
                f"with the tokenizer that came with this model.")
        add_eot = args.vocab_size < tokenizer.vocab_size
        tok = cfg.tokenizer or checkpoint.find_tokenizer(cfg.init_from)
        if tok is None:
            raise ValueError(
                f"{cfg.init_from}: no tokenizer.model or tokenizer.json in this directory or its parent, so the "
                f"data's tokenizer cannot be checked against the model's. Pass --tokenizer PATH, "
                f"the tokenizer that came with these weights.")
        base_tokenizer = load_tokenizer(tok)
        recorded = checkpoint.read_extra(cfg.init_from).get("tokenizer_sha256")
        if recorded is not None and recorded != base_tokenizer.sha256():  # a checkpoint of ours
            raise ValueError(
                f"{cfg.init_from}: was trained with a tokenizer of sha256 {recorded[:12]}..., but "
                f"{tok} has sha256 {base_tokenizer.sha256()[:12]}...; pass the tokenizer saved "
                f"with it.")
        data.check_tokenizer(meta, base_tokenizer)
        args.vocab_size = tokenizer.vocab_size
    args.max_seq_len = max(args.max_seq_len, meta["max_len"])
    args.resid_dropout = cfg.resid_dropout
    return args, add_eot


def source_weights(cfg, args, add_eot, eot_id):
    """(name, full tensor) one at a time: from the base checkpoint, with the EOT row appended
    (model.mean_rows, LIMA §3), or where the base has its own EOT but never trained it (Llama 3
    base models: a zero row), that row set the same way (model.init_untrained_row); or a random
    init made the same way on every rank."""
    if cfg.init_from == SCRATCH:
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


DEV_BATCH = 16  # dev prompts decoded together


def dev_generations(model, tokenizer, prompts, path, epoch, cfg, seed, sharded=True):
    """Responses to every dev prompt with the paper's decoding (LIMA §5), for choosing the
    checkpoint by reading them (LIMA §3). sharded: the FSDP model, whose every forward is a
    collective, so every rank decodes the same batches in lockstep and rank 0 shows the progress
    and writes the file; else one process's plain model (`answer_saved_epochs`).

    Progress is in tokens. How many a response takes is known only when it ends, so the bar's
    total is what the responses may take at most (each prompt's budget), lowered to what they
    took as each batch finishes: the ETA is an upper bound that tightens."""
    generator = torch.Generator(device=model.output.weight.device).manual_seed(seed)
    writer = not sharded or dist.get_rank() == 0
    turns = [p["turns"] for p in prompts]
    context = min(Decoding.max_seq_len, model.args.max_seq_len)  # what respond() decodes within
    budgets = [max(0, context - len(encode_prompt(tokenizer, t))) for t in turns]
    if cfg.dev_max_new_tokens is not None:
        budgets = [min(b, cfg.dev_max_new_tokens) for b in budgets]
    with tqdm(total=sum(budgets), unit="tok", desc=f"epoch {epoch} dev answers", leave=False,
               disable=not writer, dynamic_ncols=True) as bar:
        made, t0 = 0, time.perf_counter()

        def progress(n):
            nonlocal made
            made += n
            bar.update(n)

        responses = []
        for s in range(0, len(turns), DEV_BATCH):
            responses += respond(model, tokenizer, turns[s:s + DEV_BATCH], generator=generator,
                                 batch_size=DEV_BATCH, max_new_tokens=cfg.dev_max_new_tokens,
                                 all_done=distributed.all_ranks_done if sharded else None, progress=progress)
            bar.total = made + sum(budgets[s + DEV_BATCH:])
            bar.refresh()
    if writer:
        data.write_jsonl(path, [{"id": p.get("id"), "source": p.get("source"), "prompt": p["turns"][-1],
                                 "response": r, "reference": p.get("reference"), "epoch": epoch}
                                for p, r in zip(prompts, responses)])
    return made, time.perf_counter() - t0


def answer_saved_epochs(cfg, tokenizer, prompts):
    """The dev answers of every saved epoch that has none yet, once training is over and its
    memory is free: each checkpoint is loaded in the compute dtype, its layers split over this
    node's GPUs when it does not fit one (devices.py), and decoded by this one process. At 65B
    that is 130 GB of bf16 weights over 8 GPUs, instead of every new token all-gathering the
    sharded model and a KV cache in the master weights' dtype; the answers are those the
    sharded model gives (a test checks it on CPU)."""
    folder = os.path.join(cfg.out_dir, "dev_generations")
    saved = sorted(name for name in rundir.earlier_run(cfg.out_dir) if name.startswith("epoch_"))
    todo = [name for name in saved if not os.path.exists(os.path.join(folder, f"{name}.jsonl"))]
    if not todo or not prompts:
        return
    os.makedirs(folder, exist_ok=True)
    cuda = config.resolve_device(cfg.device).startswith("cuda")
    for name in todo:
        path, epoch = os.path.join(cfg.out_dir, name), int(name.split("_")[1])
        args = checkpoint.load_args(path)
        dtype = torch.bfloat16 if cuda else torch.float32  # what the checkpoint was saved in
        placed = devices.choose_devices("auto" if cuda else "cpu", args, dtype, DEV_BATCH,
                                        min(Decoding.max_seq_len, args.max_seq_len))
        log(f"epoch {epoch}: dev answers from {path}, on {', '.join(placed)}")
        model = (checkpoint.load_model(path, dtype=dtype, device=placed[0]) if len(placed) == 1
                 else devices.load_placed(path, devices.placement_plan(args, placed), dtype))
        model.requires_grad_(False).eval()
        out = os.path.join(folder, f"{name}.jsonl")
        n, seconds = dev_generations(model, tokenizer, prompts, out, epoch, cfg, cfg.seed + epoch, sharded=False)
        log(f"epoch {epoch}: dev generations in {out} ({n:,} tokens in {seconds:.0f} s)")
        del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


# ---- training ----------------------------------------------------------------------------------

def train_step(model, optimizer, micro_batches, n_supervised, grad_clip):
    """One optimizer step over this rank's packed micro-batches [(x, y, cu_seqlens), ...].

    The loss is the mean over the n_supervised trained tokens of the whole step, all ranks
    together, however the examples were split. Returns (that mean, the gradient norm before
    clipping). When either is NaN or inf the optimizer step is not taken: a finite loss can
    still have an overflowed gradient, and one such step makes every weight NaN."""
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
    if math.isfinite(grad_norm):
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
    tokenizer: object  # tokenizer.Tokenizer (any backend)
    args: object  # model.ModelArgs
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    train_split: data.Split
    dev_split: Optional[data.Split]
    dev_prompts: list
    identity: dict  # what a resume must match (run_identity)
    epoch: int = 0  # where the loop is (0-based epoch, optimizer steps taken)
    step: int = 0


# ---- setup -------------------------------------------------------------------------------------

def setup(cfg, device, rank, world_size):
    """Data, model and optimizer; on --resume, the state of the run's last finished epoch,
    after checking that it is the same run."""
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
    identity = rundir.run_identity(cfg, meta, args, device)
    resume_path = os.path.join(cfg.out_dir, distributed.RESUME)
    if cfg.resume:  # before minutes of loading, not after
        rundir.check_same_run(distributed.read_state(resume_path).get("run"), identity, resume_path)
    distributed.memory_plan(cfg, args, world_size, device, meta["max_len"])
    # resuming: the weights come from the resume state, so the base is not read at all
    weights = None if cfg.resume else source_weights(cfg, args, add_eot, tokenizer.eot_id)
    model = distributed.build_model(cfg, args, weights, device)
    torch.manual_seed(cfg.seed + rank)  # dropout masks: repeatable, different on each rank
    optimizer = make_optimizer(model, cfg)
    run = Run(cfg, device, rank, world_size, meta, tokenizer, args, model, optimizer,
              train_split, dev_split, dev_prompts, identity)
    if cfg.resume:
        state = distributed.load_resume(model, optimizer, cfg.out_dir)
        run.epoch, run.step = state["epoch"], state["step"]
        note = ("" if state["world_size"] == world_size else
                f"; saved by {state['world_size']} ranks, now {world_size}: dropout draws afresh")
        log(f"resumed at epoch {run.epoch + 1}, step {run.step}{note}")
    return run


PEAK_BF16 = 989e12  # H100 / H200 SXM dense bf16, the datasheet figure: MFU's denominator


def step_flops(args, n_params, lengths):
    """Training FLOPs of one step: 6 N per token for the matmuls (forward + backward), plus
    causal attention, 6 * layers * dim * len^2 per example; recomputation is not counted."""
    tokens = sum(int(n) - 1 for n in lengths)
    return 6 * n_params * tokens + sum(6 * args.n_layers * args.dim * int(n) ** 2 for n in lengths)


LIMA_EXAMPLES, LIMA_MEAN_TOKENS = 1000, 750  # LIMA §2: 1,000 examples, ~750K tokens


def plan(cfg):
    """--plan_only: the base's configuration (or a --model preset), the data's example lengths
    (or LIMA's 1,000 examples at their mean length) -> the plan, printed."""
    if cfg.init_from == SCRATCH or not cfg.init_from:
        args = model_args(cfg.model)
    else:
        args = checkpoint.load_args(cfg.init_from, weights=False)
    try:
        split = data.load_split(cfg.data_dir, "train")
        lengths, max_len, source = split.lengths, data.load_meta(cfg.data_dir)["max_len"], cfg.data_dir
    except (FileNotFoundError, ValueError):
        lengths, max_len = [LIMA_MEAN_TOKENS] * LIMA_EXAMPLES, 2048
        source = f"no data in {cfg.data_dir}: LIMA's {LIMA_EXAMPLES:,} examples of {LIMA_MEAN_TOKENS} tokens"
    print("\n".join([f"data: {source}"] + distributed.plan_report(
        cfg, args, cfg.gpus, cfg.gpu_memory_gib, lengths, cfg.plan_mfu, max_len)))


def train(cfg):
    check_ranges(cfg)
    if cfg.plan_only:
        return plan(cfg)
    if not cfg.init_from:
        raise ValueError("--init_from: pass the base model's directory (LIMA fine-tunes a "
                         "pretrained LLaMA), or --init_from scratch to train a --model preset from "
                         "random weights")
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume continues the run in out_dir and --overwrite deletes it: pass one")
    device, rank, world_size = distributed.setup_distributed(cfg.device)
    try:
        with ExitStack() as held:
            def claim():  # rank 0 holds the lock on out_dir until the run ends
                os.makedirs(cfg.out_dir, exist_ok=True)
                held.enter_context(files.lock(os.path.join(cfg.out_dir, "train")))
                rundir.claim_out_dir(cfg)
            distributed.on_rank0(claim)
            run = setup(cfg, device, rank, world_size)
            probe_memory(run)
            loop(run)
            tokenizer, prompts = run.tokenizer, run.dev_prompts
            del run  # the sharded model and optimizer: their memory is the dev answers' now
            distributed.teardown()  # the other ranks are done
            gc.collect()
            if rank == 0:  # still holding out_dir's lock
                answer_saved_epochs(cfg, tokenizer, prompts)
    finally:
        distributed.teardown()


def allocate_optimizer_state(optimizer):
    """Adam's moments are made by its first step; make them now, with a step that moves nothing
    (zero gradients, learning rate 0), then set the step count back to 0: the state is exactly
    what the first real step would have made, and the memory it takes is in use from here on."""
    if optimizer.state:  # resumed: loaded already
        return
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    for state in optimizer.state.values():
        state["step"].zero_()
    optimizer.zero_grad(set_to_none=True)


def probe_memory(run):
    """Before the first step, each rank's heaviest micro-batch (probe_plan) goes forward and
    backward once with the optimizer state in memory, so a run that cannot fit fails now, with
    the memory plan's options, not in the middle of an epoch. Nothing of it is kept: the
    gradients are dropped, no optimizer step is taken and the random state (dropout masks) is
    put back, so the run goes on exactly as it would have without it."""
    cfg, split, device = run.cfg, run.train_split, run.device
    allocate_optimizer_state(run.optimizer)
    examples = probe_plan(split.lengths, cfg.batch_size, run.world_size, cfg.micro_batch_tokens)[run.rank]
    tokens = int(sum(split.lengths[i] for i in examples))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            x, y, cu = pack(split, examples, device, run.tokenizer.bos_id)
            run.model(x, y, cu_seqlens=cu, reduction="sum").backward()
    except torch.OutOfMemoryError:
        raise SystemExit(
            f"error: out of memory on rank {run.rank} before the first step, in the forward and backward "
            f"of the heaviest micro-batch this run can meet ({tokens:,} tokens: its longest examples, "
            f"packed up to --micro_batch_tokens {cfg.micro_batch_tokens:,}). Nothing was trained or "
            f"written. Options: {distributed.MEMORY_OPTIONS}.") from None
    finally:
        run.optimizer.zero_grad(set_to_none=True)
    peak = ""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        peak = (f": peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB of "
                f"{total / 2**30:.1f} GiB on rank {run.rank}")
    log(f"memory check: the heaviest micro-batch ({tokens:,} tokens) went forward and backward with "
        f"the optimizer state in memory{peak}")


def loop(run):
    """Epochs of steps from where the run is, each epoch ended by end_of_epoch; --max_steps stops
    early (a partial epoch gets no end-of-epoch work)."""
    cfg, split = run.cfg, run.train_split
    steps_per_epoch = math.ceil(len(split) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs  # the lr schedule's length
    stop_at = total_steps if cfg.max_steps is None else min(total_steps, cfg.max_steps)
    supervised = supervised_counts(split)
    metrics = rundir.start_logs(cfg, run.rank, run.step, run.epoch)
    run.model.train()
    with tqdm(total=stop_at, initial=run.step, disable=run.rank != 0, desc="train", dynamic_ncols=True) as bar:
        for epoch in range(run.epoch, cfg.epochs):
            order = epoch_order(len(split), epoch, cfg.seed)
            while run.step < min((epoch + 1) * steps_per_epoch, stop_at):
                b = run.step - epoch * steps_per_epoch
                batch = order[b * cfg.batch_size:(b + 1) * cfg.batch_size].tolist()
                record = one_step(run, epoch, batch, total_steps, supervised)
                if run.rank == 0:
                    with open(metrics, "a") as f:
                        f.write(json.dumps(record) + "\n")
                    bar.set_postfix(epoch=epoch + 1, loss=f"{record['loss']:.4f}",
                                    tok_s=f"{record['tokens_per_s']:,.0f}")
                    bar.update(1)
            if run.step < (epoch + 1) * steps_per_epoch:
                break  # stopped by --max_steps
            end_of_epoch(run, epoch)
    saved = [name for name in rundir.earlier_run(cfg.out_dir) if name.startswith("epoch_")]
    curves = "".join(f"{name} (the curves as a picture), " for name in (report.TRAINING_CURVES, report.TRAINING_CURVES_SVG)
                     if os.path.exists(os.path.join(cfg.out_dir, name)))
    log(f"done: {run.step} steps. In {cfg.out_dir}: metrics.jsonl (one line per step), dev.jsonl "
        f"(dev loss per epoch), {curves}dev_generations/ (responses to read when picking a "
        f"checkpoint), resume/ (for --resume), checkpoints {', '.join(saved) or 'none'}")


def one_step(run, epoch, batch, total_steps, supervised):
    """One optimizer step on the examples `batch` -> its metrics record. A step whose loss or
    gradient norm is not finite is not taken, and the run stops."""
    cfg, lengths = run.cfg, run.train_split.lengths
    t0 = time.perf_counter()
    plan = plan_microbatches(batch, lengths, run.world_size, cfg.micro_batch_tokens)
    n_supervised = int(supervised[batch].sum())  # the same number on every rank
    lr = lr_at(run.step, total_steps, cfg)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    micro = [pack(run.train_split, examples, run.device, run.tokenizer.bos_id) for examples in plan[run.rank]]
    loss, grad_norm = train_step(run.model, run.optimizer, micro, n_supervised, cfg.grad_clip)
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm} (loss {loss:.4f})"
        raise SystemExit(
            f"error: the {what} at step {run.step} (epoch {epoch + 1}): the step was not taken "
            f"and nothing of it was written; kept: {rundir.kept(cfg.out_dir)}. Try a lower --lr, "
            f"--param_dtype float32, or check the data in {cfg.data_dir}.")
    dt = time.perf_counter() - t0
    tokens = int(sum(lengths[i] - 1 for i in batch))
    record = dict(step=run.step, epoch=epoch + 1, loss=loss, lr=lr, grad_norm=grad_norm, tokens=tokens,
                  supervised_tokens=n_supervised, tokens_per_s=tokens / dt, time_s=dt)
    if run.device.type == "cuda" and distributed.compute_dtype(cfg, run.device) == torch.bfloat16:
        flops = step_flops(run.args, sum(p.numel() for p in run.model.parameters()), [lengths[i] for i in batch])
        record["mfu"] = flops / dt / (PEAK_BF16 * run.world_size)
        record["peak_mem_gib"] = torch.cuda.max_memory_allocated(run.device) / 2**30
    run.step += 1
    return record


def end_of_epoch(run, epoch):
    """Dev loss, dev answers and a checkpoint for the epochs to choose among (LIMA §3), then the
    resume state; nothing at all when a weight or optimizer moment is NaN or inf."""
    cfg, ep = run.cfg, epoch + 1  # 1-based, as the paper counts epochs
    bad = distributed.nonfinite(run.model, run.optimizer)
    if bad:
        raise SystemExit(
            f"error: after epoch {ep} (step {run.step}), {len(bad)} tensors hold NaN or inf: "
            f"{', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}. Nothing of epoch {ep} was "
            f"written; kept: {rundir.kept(cfg.out_dir)}. Try a lower --lr or --param_dtype float32.")
    loss = dev_loss(run.model, run.dev_split, run.world_size, run.rank, cfg.micro_batch_tokens,
                    run.device, run.tokenizer.bos_id)
    if loss is not None:
        log(f"epoch {ep}: dev loss {loss:.4f}")
        if run.rank == 0:
            with open(os.path.join(cfg.out_dir, "dev.jsonl"), "a") as f:
                f.write(json.dumps({"epoch": ep, "step": run.step, "dev_loss": loss}) + "\n")
    if run.rank == 0:  # the curves so far as a picture (needs matplotlib, which is optional)
        report.training_curves(cfg.out_dir)
    keep = ep in cfg.save_epochs or ep == cfg.epochs
    # a saved epoch's dev answers come from its checkpoint once training is over
    # (answer_saved_epochs); --generate_every_epoch answers the others here, through the
    # sharded model (for small models: every token is a collective)
    if run.dev_prompts and cfg.generate_every_epoch and not keep:
        os.makedirs(os.path.join(cfg.out_dir, "dev_generations"), exist_ok=True)
        path = os.path.join(cfg.out_dir, "dev_generations", f"epoch_{ep:02d}.jsonl")
        n, seconds = dev_generations(run.model, run.tokenizer, run.dev_prompts, path, ep, cfg, cfg.seed + ep)
        log(f"epoch {ep}: dev generations in {path} ({n:,} tokens in {seconds:.0f} s)")
    if keep:
        path = os.path.join(cfg.out_dir, f"epoch_{ep:02d}")
        save_dtype = torch.bfloat16 if run.device.type == "cuda" else torch.float32
        extra = dict(eot_id=run.meta["eot_id"], epoch=ep, tokenizer_sha256=run.meta["tokenizer_sha256"],
                     train_config=asdict(cfg))
        distributed.save_consolidated(run.model, run.args, path, save_dtype, run.meta["tokenizer"], extra)
        log(f"epoch {ep}: checkpoint in {path}")
    distributed.save_resume(run.model, run.optimizer, cfg.out_dir,
                            dict(step=run.step, epoch=ep, run=run.identity))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_config(TrainConfig, argv, presets=PRESETS)
    rank0 = os.environ.get("RANK", "0") == "0"
    try:
        train(cfg)
    except KeyboardInterrupt:
        if rank0:
            resumable = rundir.last_state(cfg.out_dir) is not None
            print(f"\ninterrupted. Kept in {cfg.out_dir}: {rundir.kept(cfg.out_dir)}. "
                  f"{'Continue' if resumable else 'Start again'} with: {rundir.continue_command(argv, resumable)}",
                  file=sys.stderr)
        sys.exit(130)
    except files.LockedError as e:  # another run holds out_dir
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except (OSError, distributed.Failed) as e:  # a full or read-only disk: one line, no traceback
        text = files.explain(e) if isinstance(e, OSError) and e.filename else str(e)
        if rundir.last_state(cfg.out_dir) is not None:
            text += (f". Kept in {cfg.out_dir}: {rundir.kept(cfg.out_dir)}; once that is fixed, continue "
                     f"with: {rundir.continue_command(argv, True)}")
        print(f"error: {text}", file=sys.stderr)
        sys.exit(1)
    except ValueError as e:  # bad input: a clear message, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
