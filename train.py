"""LIMA fine-tuning: 15 epochs of plain next-token loss on ~1,000 examples (LIMA §3).

    # the built-in demo: a tiny model from scratch on the demo data, CPU, a few minutes
    python prepare_data.py --demo --out_dir data/demo && python train.py --preset demo

    # LIMA 65B (the paper's run): 8 GPUs, FSDP2
    torchrun --nproc_per_node=8 train.py --init_from /llama/65B --data_dir data/lima --out_dir out/lima-65b
    # LIMA's 7B ablation setting (batch 64, residual dropout 0.2)
    torchrun --nproc_per_node=8 train.py --preset small --init_from /llama/7B --data_dir data/lima --out_dir out/lima-7b
    # several nodes: run on each node
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py ...

Every optimizer step takes `batch_size` examples, split over ranks and then into packed
micro-batches (one token stream per micro-batch, example boundaries in `cu_seqlens`, no padding).
The loss is the mean over all supervised tokens of the whole step, whatever the split.
"""

import json
import math
import os
import shutil
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.checkpoint import checkpoint as activation_checkpoint
from tqdm import tqdm

import checkpoint
import prepare_data
from config import parse_config
from model import IGNORE_INDEX, Transformer, model_args
from tokenizer import Tokenizer


@dataclass
class TrainConfig:
    """Fine-tune a LLaMA on LIMA-format data prepared by prepare_data.py."""
    init_from: str = field(default="", metadata={"help": "base model dir (Meta or HF layout, or one of ours); empty: from scratch"})
    model: str = field(default="debug", metadata={"help": "model.PRESETS entry when training from scratch"})
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
    param_dtype: str = field(default="fp32", metadata={"help": "sharded master weights and so optimizer state: fp32 or bf16 (65B on 8x80GB)"})
    compute_dtype: str = field(default="auto", metadata={"help": "forward/backward dtype: auto (bf16 on cuda, fp32 on cpu), bf16, fp32"})
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


# ---- distributed -----------------------------------------------------------------------------

def setup_distributed(device):
    """torchrun sets RANK/WORLD_SIZE; plain `python train.py` becomes a group of one, so there
    is a single code path (FSDP2 with one rank shards nothing)."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    # On GPUs, NCCL for CUDA tensors and gloo beside it for CPU ones: with --cpu_offload the
    # gradients are CPU DTensors and the clip's norm all-reduces them where they live (FSDP2
    # has no NCCL path for that; pytorch#148532, torchtune#1977)
    dist.init_process_group("cuda:nccl,cpu:gloo" if device.startswith("cuda") else "gloo")
    return torch.device(device), dist.get_rank(), dist.get_world_size()


def uses_nccl():
    return "nccl" in str(dist.get_backend())


def log(*args):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, file=sys.stderr, flush=True)


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


def resolve_model_args(cfg, meta):
    """The architecture, and whether the EOT row must be added to the base vocabulary."""
    if cfg.init_from:
        args = checkpoint.load_args(cfg.init_from)
        base_vocab = meta["eot_id"]
        if args.vocab_size not in (base_vocab, base_vocab + 1):
            raise ValueError(
                f"{cfg.init_from}: the model's vocabulary has {args.vocab_size} rows, but the data in "
                f"{cfg.data_dir} was tokenized with {meta['tokenizer']} ({base_vocab} pieces + EOT). "
                f"Run prepare_data.py with the tokenizer.model that came with this model.")
        add_eot = args.vocab_size == base_vocab
        tok = checkpoint.find_tokenizer(cfg.init_from)
        if tok is not None:  # the data must have been tokenized with the model's own tokenizer
            prepare_data.check_tokenizer(meta, Tokenizer(tok))
        args.vocab_size = meta["vocab_size"]
    else:
        args = model_args(cfg.model, vocab_size=meta["vocab_size"])
        add_eot = False
    args.max_seq_len = max(args.max_seq_len, meta["max_len"])
    args.resid_dropout = cfg.resid_dropout
    return args, add_eot


def source_weights(cfg, args, add_eot):
    """(name, full tensor) one at a time: from the base checkpoint, with the EOT row appended as
    the mean of the others (LIMA.md §3); or a random init made the same way on every rank."""
    if not cfg.init_from:
        torch.manual_seed(cfg.seed)
        scratch = Transformer(args)
        scratch.init_weights()
        yield from scratch.state_dict().items()
        return
    for name, tensor in checkpoint.iter_weights(cfg.init_from):
        if add_eot and name in ("tok_embeddings.weight", "output.weight"):
            tensor = torch.cat([tensor, tensor.float().mean(0, keepdim=True).to(tensor.dtype)])
        yield name, tensor


def build_model(cfg, args, add_eot, device):
    """torchtitan's recipe: build on the meta device, fully_shard every block then the root,
    allocate only this rank's shards, and fill them parameter by parameter from the source, so
    no rank ever holds the whole model (65B is 130 GB in bf16)."""
    with torch.device("meta"):
        model = Transformer(args).to(param_dtype(cfg))  # the sharded master weights' dtype
    if cfg.activation_checkpointing:
        for block in model.layers:  # recompute the block in the backward; names unchanged
            forward = block.forward
            block.forward = lambda *a, _f=forward: activation_checkpoint(_f, *a, use_reentrant=False)
    mp = None
    if compute_dtype(cfg, device) != param_dtype(cfg):
        # bf16 matmuls, gradients reduced in fp32 (torchtitan's policy)
        mp = MixedPrecisionPolicy(param_dtype=compute_dtype(cfg, device), reduce_dtype=torch.float32)
    kw = dict(mp_policy=mp) if mp else {}
    if cfg.cpu_offload:
        if device.type != "cuda":
            raise ValueError("--cpu_offload moves sharded state from the GPUs to host memory; "
                             "it needs CUDA devices. Leave it off on CPU.")
        kw["offload_policy"] = CPUOffloadPolicy()
    for block in model.layers:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    model.to_empty(device="cpu" if cfg.cpu_offload else device)
    expected = dict(model.named_parameters())
    seen = set()
    with torch.no_grad():
        for name, full in source_weights(cfg, args, add_eot):
            if name not in expected:
                raise ValueError(f"{cfg.init_from or 'scratch'}: unexpected tensor {name}")
            p = expected[name]
            full = full.to(device=p.device, dtype=p.dtype)
            # each rank keeps its own slice of the full tensor; no communication
            local = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
            p.to_local().copy_(local)
            seen.add(name)
    missing = set(expected) - seen
    if missing:
        raise ValueError(f"{cfg.init_from}: no weights for {sorted(missing)[:5]}")
    return model


def param_dtype(cfg):
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.param_dtype]


def compute_dtype(cfg, device):
    if cfg.compute_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else param_dtype(cfg)
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.compute_dtype]


def make_optimizer(model, cfg):
    # LIMA §3: weight decay 0.1 on the matrices; norms' gains are not decayed
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    groups = [dict(params=decay, weight_decay=cfg.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    # fused: one kernel for the whole update on GPUs (torchtitan's default); elsewhere foreach
    fused = all(p.device.type == "cuda" for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused or None)


def memory_plan(cfg, args, world_size, device, max_len, capacity=None):
    """Bytes per GPU for the chosen options; printed at start, and a plan that cannot fit is
    refused (capacity: bytes per GPU; read from the device on CUDA). Adam keeps two moments in the parameters' dtype; FSDP holds the shards plus about
    two unsharded blocks (the current one and the prefetched next) in the compute dtype."""
    with torch.device("meta"):
        n = Transformer(args).num_params()
    pb = param_dtype(cfg).itemsize
    cb = compute_dtype(cfg, device).itemsize
    block = 4 * args.dim * args.dim + 3 * args.dim * args.ffn_hidden  # a block's matrices
    tokens = max(cfg.micro_batch_tokens, max_len)
    # saved activations per token and layer, bytes: the inputs of the 7 matmuls, norms,
    # attention output and dropout masks; with checkpointing only each block's input is kept
    per_layer = cb * (10 * args.dim + 4 * args.ffn_hidden)
    kept = cb * args.dim * args.n_layers + per_layer if cfg.activation_checkpointing else per_layer * args.n_layers
    on_gpu = 0 if cfg.cpu_offload else 1
    plan = {
        "parameters (sharded)": on_gpu * n * pb / world_size,
        "gradients (sharded)": on_gpu * n * pb / world_size,
        "optimizer state (sharded)": on_gpu * 2 * n * pb / world_size,
        "unsharded blocks (2)": 2 * block * cb + 2 * args.vocab_size * args.dim * cb,
        "activations (est.)": tokens * kept + 3 * tokens * args.vocab_size * 4,  # + fp32 logits
    }
    plan["total"] = sum(plan.values())
    lines = [f"memory plan per {'GPU' if device.type == 'cuda' else 'process'}: {n / 1e9:.2f}B "
             f"params, {world_size} ranks, params {cfg.param_dtype}, compute "
             f"{str(compute_dtype(cfg, device)).replace('torch.', '')}, checkpointing "
             f"{cfg.activation_checkpointing}, cpu offload {cfg.cpu_offload}"]
    lines += [f"  {k:<28}{v / 2**30:8.2f} GiB" for k, v in plan.items()]
    if cfg.cpu_offload:
        lines.append(f"  host memory per rank for offloaded state: {4 * n * pb / world_size / 2**30:.1f} GiB")
    if cfg.param_dtype == "bf16":
        lines.append("  note: bf16 master weights round away most updates at LIMA's lr (1e-5 on weights "
                     "of ~1e-2 is below bf16's 8-bit mantissa); prefer fp32 with --cpu_offload or more GPUs")
    log("\n".join(lines))
    if capacity is None and device.type == "cuda":
        capacity = torch.cuda.get_device_properties(device).total_memory
    if capacity is not None:
        if plan["total"] > 0.95 * capacity and not cfg.force:
            raise SystemExit(
                f"the memory plan needs {plan['total'] / 2**30:.1f} GiB per GPU but the GPU has "
                f"{capacity / 2**30:.1f} GiB. Options: --activation_checkpointing, --param_dtype bf16, "
                f"--cpu_offload, a smaller --micro_batch_tokens, more GPUs; or --force to try anyway.")
    return plan


# ---- checkpoints -------------------------------------------------------------------------------

def full_tensors(model, dtype):
    """Every parameter gathered whole, one at a time, on every rank (a collective each)."""
    nccl = uses_nccl()
    for name, p in model.state_dict().items():
        if isinstance(p, DTensor):
            if nccl and p.device.type == "cpu":  # --cpu_offload: NCCL gathers only GPU tensors
                p = p.to(torch.cuda.current_device())
            p = p.full_tensor()
        if dist.get_rank() == 0:
            yield name, p.detach().to("cpu", dtype)


def save_consolidated(model, args, path, cfg, meta, epoch, dtype):
    """The Hugging Face layout (checkpoint.save_hf), written by rank 0 as the parameters are
    gathered one by one; atomic (temp dir, then rename)."""
    tensors = full_tensors(model, dtype)
    error = None
    if dist.get_rank() == 0:
        try:
            extra = dict(eot_id=meta["eot_id"], epoch=epoch, train_config=asdict(cfg))
            checkpoint.save_hf(path, args, tensors, tokenizer_path=meta["tokenizer"], extra=extra)
        except Exception as e:  # keep gathering so the other ranks are not left waiting
            error = e
    for _ in tensors:
        pass
    check_all_ok(error, f"writing the checkpoint {path}")


def check_all_ok(error, what):
    """Stop every rank if any rank failed (a rank that raises alone would hang the others)."""
    device = "cuda" if uses_nccl() else "cpu"
    failed = torch.tensor([error is not None], dtype=torch.int32, device=device)
    dist.all_reduce(failed)
    if failed.item():
        msg = f"{what} failed: {error}" if error else f"{what} failed on another rank"
        raise SystemExit(msg + ". The previous good checkpoint is kept.")


def save_resume(model, optimizer, out_dir, step, epoch):
    """Sharded resume state at the end of an epoch: model and optimizer shards through
    torch.distributed.checkpoint, RNG per rank, written beside the good one, then swapped in."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    final, tmp = os.path.join(out_dir, "resume"), os.path.join(out_dir, "resume.tmp")
    error = None
    try:
        if dist.get_rank() == 0 and os.path.exists(tmp):
            shutil.rmtree(tmp)
        dist.barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        # one process needs no coordination; measured on CPU (torch 2.13, gloo): a coordinated
        # save left every later training step ~1.6x slower, a no_dist one did not
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp,
                 no_dist=dist.get_world_size() == 1)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, os.path.join(tmp, f"rng_rank{dist.get_rank()}.pt"))
    except Exception as e:
        error = e
    check_all_ok(error, f"writing the resume state {tmp}")
    if dist.get_rank() == 0:
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({"step": step, "epoch": epoch, "world_size": dist.get_world_size()}, f)
        old = final + ".old"
        if os.path.exists(final):
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load_resume(model, optimizer, out_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    path = os.path.join(out_dir, "resume")
    state_file = os.path.join(path, "state.json")
    if not os.path.isfile(state_file):
        raise SystemExit(f"--resume: no resume state at {path}. It is written at the end of each "
                         f"epoch; start without --resume.")
    with open(state_file) as f:
        state = json.load(f)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    sd = {"model": model_sd, "optim": optim_sd}
    dcp.load(sd, checkpoint_id=path, no_dist=dist.get_world_size() == 1)
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    rng_file = os.path.join(path, f"rng_rank{dist.get_rank()}.pt")
    if state["world_size"] == dist.get_world_size() and os.path.exists(rng_file):
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return state


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
        _, loss = model(x, y, cu_seqlens=cu, reduction="sum")
        total += torch.stack([loss.double(), (y != IGNORE_INDEX).sum().double()])
    dist.all_reduce(total)
    model.train()
    return (total[0] / total[1].clamp(min=1)).item()


def dev_generations(model, tokenizer, prompts, path, epoch, cfg, seed):
    """Responses to every dev prompt with the paper's decoding (LIMA §5), for choosing the
    checkpoint by reading them (LIMA §3). Every rank decodes the same batch in lockstep, since
    each FSDP forward is a collective; rank 0 writes the file."""
    import sample
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    responses = sample.respond(model, tokenizer, [p["turns"] for p in prompts],
                               max_new_tokens=cfg.dev_max_new_tokens, generator=generator)
    if dist.get_rank() == 0:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            for p, r in zip(prompts, responses):
                f.write(json.dumps({"id": p.get("id"), "source": p.get("source"), "prompt": p["turns"][-1],
                                    "response": r, "reference": p.get("reference"), "epoch": epoch}) + "\n")
        os.replace(tmp, path)


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
        _, loss = model(x, y, cu_seqlens=cu, reduction="sum")
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


def train(cfg):
    device, rank, world_size = setup_distributed(cfg.device)
    meta = prepare_data.load_meta(cfg.data_dir)
    train_split = prepare_data.load_split(cfg.data_dir, "train")
    dev_split = prepare_data.load_split(cfg.data_dir, "dev") if meta.get("splits", {}).get("dev", {}).get("examples") else None
    dev_prompts = prepare_data.load_prompts(cfg.data_dir, "dev") if dev_split is not None else []
    tokenizer = Tokenizer(meta["tokenizer"])
    args, add_eot = resolve_model_args(cfg, meta)
    memory_plan(cfg, args, world_size, device, meta["max_len"])
    model = build_model(cfg, args, add_eot, device)
    torch.manual_seed(cfg.seed + rank)  # dropout masks: repeatable, different on each rank
    optimizer = make_optimizer(model, cfg)
    os.makedirs(cfg.out_dir, exist_ok=True)

    lengths = train_split.lengths
    supervised = supervised_counts(train_split)
    steps_per_epoch = math.ceil(len(train_split) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs  # the lr schedule's length
    stop_at = total_steps if cfg.max_steps is None else min(total_steps, cfg.max_steps)
    start_epoch, step = 0, 0
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if cfg.resume:
        state = load_resume(model, optimizer, cfg.out_dir)
        start_epoch, step = state["epoch"], state["step"]
        log(f"resumed at epoch {start_epoch + 1}, step {step}")
        if rank == 0 and os.path.exists(metrics_path):  # drop what the killed run logged after it
            with open(metrics_path) as f:
                kept = [line for line in f if json.loads(line)["step"] < step]
            with open(metrics_path, "w") as f:
                f.writelines(kept)
    elif rank == 0 and os.path.exists(metrics_path):
        os.remove(metrics_path)
    if rank == 0:
        with open(os.path.join(cfg.out_dir, "train_config.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=2)

    peak = 989e12  # H100 SXM dense bf16 (PERF.md): MFU is reported for bf16 on GPU
    n_params = sum(p.numel() for p in model.parameters())
    save_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bar = tqdm(total=stop_at, initial=step, disable=rank != 0, desc="train", dynamic_ncols=True)
    model.train()
    for epoch in range(start_epoch, cfg.epochs):
        if step >= stop_at:
            break
        order = epoch_order(len(train_split), epoch, cfg.seed, lengths, cfg.batch_size)
        for b in range(step - epoch * steps_per_epoch, steps_per_epoch):
            if step >= stop_at:
                break
            t0 = time.perf_counter()
            batch = order[b * cfg.batch_size:(b + 1) * cfg.batch_size].tolist()
            plan = plan_microbatches(batch, lengths, world_size, cfg.micro_batch_tokens)
            n_supervised = int(supervised[batch].sum())  # the same number on every rank
            lr = lr_at(step, total_steps, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro_batches = [pack(train_split, examples, device, tokenizer.bos_id) for examples in plan[rank]]
            step_loss, grad_norm = train_step(model, optimizer, micro_batches, n_supervised, cfg.grad_clip)
            if not math.isfinite(step_loss):
                raise SystemExit(
                    f"loss is {step_loss} at step {step} (epoch {epoch + 1}); no checkpoint was written "
                    f"for this step. Try a lower --lr, --param_dtype fp32, or check the data in {cfg.data_dir}.")
            dt = time.perf_counter() - t0
            tokens = int(sum(lengths[i] - 1 for i in batch))
            record = dict(step=step, epoch=epoch + 1, loss=step_loss, lr=lr, grad_norm=grad_norm,
                          tokens=tokens, supervised_tokens=n_supervised, tokens_per_s=tokens / dt, time_s=dt)
            if device.type == "cuda" and compute_dtype(cfg, device) == torch.bfloat16:
                # 6 N per token for the matmuls, plus causal attention: 6 * L * dim * len^2 per example
                attn = sum(6 * args.n_layers * args.dim * int(lengths[i]) ** 2 for i in batch)
                record["mfu"] = (6 * n_params * tokens + attn) / dt / (peak * world_size)
                record["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            if rank == 0:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                bar.set_postfix(epoch=epoch + 1, loss=f"{step_loss:.4f}", tok_s=f"{tokens / dt:,.0f}")
                bar.update(1)
            step += 1
        if step < (epoch + 1) * steps_per_epoch:
            break  # stopped early by --max_steps: no end-of-epoch work for a partial epoch
        end_of_epoch(model, optimizer, args, tokenizer, cfg, meta, epoch, step, dev_split, dev_prompts,
                     device, save_dtype)
    bar.close()
    saved = sorted(d for d in os.listdir(cfg.out_dir) if d.startswith("epoch_"))
    log(f"done: {step} steps. In {cfg.out_dir}: metrics.jsonl (one line per step), dev.jsonl "
        f"(dev loss per epoch), dev_generations/ (responses to read when picking a checkpoint), "
        f"resume/ (for --resume), checkpoints {', '.join(saved) or 'none'}")
    dist.destroy_process_group()


def end_of_epoch(model, optimizer, args, tokenizer, cfg, meta, epoch, step, dev_split, dev_prompts,
                 device, save_dtype):
    rank, world_size = dist.get_rank(), dist.get_world_size()
    ep = epoch + 1  # 1-based, as the paper counts epochs
    loss = dev_loss(model, dev_split, world_size, rank, cfg.micro_batch_tokens, device, tokenizer.bos_id)
    if loss is not None:
        log(f"epoch {ep}: dev loss {loss:.4f}")
        if rank == 0:
            with open(os.path.join(cfg.out_dir, "dev.jsonl"), "a") as f:
                f.write(json.dumps({"epoch": ep, "step": step, "dev_loss": loss}) + "\n")
    keep = ep in cfg.save_epochs or ep == cfg.epochs
    if dev_prompts and (keep or cfg.generate_every_epoch):
        os.makedirs(os.path.join(cfg.out_dir, "dev_generations"), exist_ok=True)
        path = os.path.join(cfg.out_dir, "dev_generations", f"epoch_{ep:02d}.jsonl")
        dev_generations(model, tokenizer, dev_prompts, path, ep, cfg, cfg.seed + ep)
        log(f"epoch {ep}: dev generations in {path}")
    if keep:
        path = os.path.join(cfg.out_dir, f"epoch_{ep:02d}")
        save_consolidated(model, args, path, cfg, meta, ep, save_dtype)
        log(f"epoch {ep}: checkpoint in {path}")
    save_resume(model, optimizer, cfg.out_dir, step, ep)


def main(argv=None):
    cfg = parse_config(TrainConfig, argv, presets=PRESETS)
    try:
        train(cfg)
    except (FileNotFoundError, ValueError) as e:  # bad input: a clear message, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
