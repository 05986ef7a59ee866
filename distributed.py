"""FSDP2 for train.py, kept apart from the training loop as torchtitan keeps its parallelize
function: the process group, the sharded model built from streamed weights, the memory plan,
and the checkpoints of a sharded model (a consolidated Hugging Face directory, and the sharded
resume state).

A plain `python train.py` is a group of one process, so the collectives are the same code
path; its model is wrapped in FSDP2 only where FSDP2 does something for one rank (see
`uses_fsdp`).
"""

import glob
import json
import os
import re
import shutil
import socket
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.checkpoint import checkpoint as activation_checkpoint
from safetensors import safe_open
from safetensors.torch import save_file

import checkpoint
import config
import files
from model import LOSS_CHUNK_LOGITS, Transformer


def setup_distributed(device):
    """torchrun sets RANK/WORLD_SIZE; plain `python train.py` becomes a group of one, so the
    collectives (loss sum, clip norm, "all done") are the same code path."""
    device = config.resolve_device(device)
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    # On GPUs, NCCL for CUDA tensors and gloo beside it for CPU ones: with --cpu_offload the
    # gradients are CPU DTensors and the clip's norm all-reduces them where they live (FSDP2
    # has no NCCL path for that; pytorch#148532, torchtune#1977)
    backend = "cuda:nccl,cpu:gloo" if device.startswith("cuda") else "gloo"
    if "RANK" in os.environ:  # torchrun
        dist.init_process_group(backend)
    else:  # a group of one on a free port; the environment is left as it was
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    return torch.device(device), dist.get_rank(), dist.get_world_size()


def uses_nccl():
    return "nccl" in str(dist.get_backend())


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()


def on_rank0(fn):
    """fn() on rank 0 while the other ranks wait; when it raises, rank 0 raises that error and
    the others exit quietly (rank 0 says why), instead of waiting forever."""
    error = None
    if dist.get_rank() == 0:
        try:
            fn()
        except Exception as e:
            error = e
    failed = torch.tensor([error is not None], dtype=torch.int32, device="cuda" if uses_nccl() else "cpu")
    dist.all_reduce(failed)
    if error is not None:
        raise error
    if failed.item():
        raise SystemExit(1)


def log(*args):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, file=sys.stderr, flush=True)


def uses_fsdp(cfg, device, world_size):
    """Whether build_model wraps the model in FSDP2. It shards over ranks, casts the weights to
    the compute dtype for each block (fp32 master weights, bf16 matmuls) and offloads to the
    host; a single process whose compute dtype is its weights' (fp32 on a CPU, the demo) needs
    none of that, and there FSDP2's all-gather and reduce-scatter copies through flat buffers
    cost 5-6% of a step (benchmarks/cpu.md). torchtitan, likewise, shards only over more than
    one rank. Either way the resume state and checkpoints are the same files."""
    return world_size > 1 or cfg.cpu_offload or compute_dtype(cfg, device) != param_dtype(cfg)


def build_model(cfg, args, weights, device, shard=None):
    """torchtitan's recipe: build on the meta device, fully_shard every block then the root,
    allocate only this rank's shards, and fill them parameter by parameter from `weights`
    ((name, full tensor) pairs, every rank the same), so no rank ever holds the whole model
    (65B is 130 GB in bf16). weights None: left unfilled, for load_resume. cfg: param_dtype,
    compute_dtype, activation_checkpointing, cpu_offload, init_from (for messages).
    One process that needs no FSDP2 (uses_fsdp) gets the plain model, filled the same way;
    shard True/False overrides that (tests of the sharded path in one process)."""
    with torch.device("meta"):
        model = Transformer(args).to(param_dtype(cfg))  # the sharded master weights' dtype
    if cfg.activation_checkpointing:
        for block in model.layers:  # recompute the block in the backward; names unchanged
            forward = block.forward
            block.forward = lambda *a, _f=forward: activation_checkpoint(_f, *a, use_reentrant=False)
    # Matmuls in the compute dtype, gradients always reduced in fp32 (torchtitan's policy; bf16
    # master weights too: a sum over ranks in bf16 loses what stochastic rounding keeps).
    # cast_forward_inputs=False: FSDP would cast every block's float inputs, the RoPE angles
    # among them, to bf16 (0.1% error on the rotated queries); the block input x is already in
    # the compute dtype, from the embedding.
    kw = dict(mp_policy=MixedPrecisionPolicy(param_dtype=compute_dtype(cfg, device), reduce_dtype=torch.float32,
                                             cast_forward_inputs=False))
    if cfg.cpu_offload:
        if device.type != "cuda":
            raise ValueError("--cpu_offload moves sharded state from the GPUs to host memory; "
                             "it needs CUDA devices. Leave it off on CPU.")
        kw["offload_policy"] = CPUOffloadPolicy()
    sharded = uses_fsdp(cfg, device, dist.get_world_size()) if shard is None else shard
    if sharded:
        for block in model.layers:
            fully_shard(block, **kw)
        # the root unit holds tok_embeddings, norm and output: a tied embedding / head (Llama
        # 3.2) is one parameter of it, sharded once, stepped once by the optimizer
        fully_shard(model, **kw)
    model.to_empty(device="cpu" if cfg.cpu_offload else device)
    if not sharded:
        model.tie_weights()  # to_empty gave the two names a tensor each
    if args.tie_embeddings and model.output.weight is not model.tok_embeddings.weight:
        raise RuntimeError("FSDP untied the output head from the embedding; this torch version "
                           "does not keep shared parameters shared")
    if weights is None:  # a resumed run: load_resume fills every shard
        return model
    expected = dict(model.named_parameters())  # a tied weight once, as tok_embeddings.weight
    seen = set()
    with torch.no_grad():
        for name, full in weights:
            if name not in expected:
                raise ValueError(f"{cfg.init_from or 'scratch'}: unexpected tensor {name}")
            p = expected[name]
            full = full.to(device=p.device, dtype=p.dtype)
            if isinstance(p, DTensor):
                # each rank keeps its own slice of the full tensor; no communication
                full = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
            _local(p).copy_(full)
            seen.add(name)
    missing = set(expected) - seen
    if missing:
        raise ValueError(f"{cfg.init_from}: no weights for {sorted(missing)[:5]}")
    return model


def param_dtype(cfg):
    return config.resolve_dtype(cfg.param_dtype, "cpu")  # "auto": float32, the master weights


def compute_dtype(cfg, device):
    """"auto": bfloat16 on GPUs, else the parameters' dtype."""
    if cfg.compute_dtype == "auto" and device.type != "cuda":
        return param_dtype(cfg)
    return config.resolve_dtype(cfg.compute_dtype, device.type)


def memory_plan(cfg, args, world_size, device, max_len, capacity=None, quiet=False):
    """Bytes per GPU for the chosen options; printed at start, and a plan that cannot fit is
    refused (capacity: bytes per GPU; read from the device on CUDA). Adam keeps two moments in
    the parameters' dtype; FSDP holds the shards plus about two unsharded blocks (the current one
    and the prefetched next) and the root (embedding, output head) in the compute dtype, and a
    block's gradient unsharded in fp32 before it is reduced. The loss makes the logits one slice
    of tokens at a time (model.chunked_cross_entropy), so they cost the same with LLaMA's
    32,000-row vocabulary as with Llama 3's 128,256. Estimates: on an H200 the plain plan came
    within 2% of the measured peak (benchmarks/gpu_h200.md); the others are unconfirmed."""
    with torch.device("meta"):
        model = Transformer(args)
    n = model.num_params()  # a tied embedding / head counted once
    block = sum(p.numel() for p in model.layers[0].parameters())  # GQA and head width included
    root = n - block * args.n_layers  # embedding, final norm, output head
    pb = param_dtype(cfg).itemsize
    cb = compute_dtype(cfg, device).itemsize
    tokens = max(cfg.micro_batch_tokens, max_len)
    loss_slice = min(tokens, max(1, LOSS_CHUNK_LOGITS // args.vocab_size))  # tokens per slice
    # saved activations per token and layer, bytes: the inputs of the 7 matmuls, norms,
    # attention output and dropout masks; with checkpointing only each block's input is kept
    per_layer = cb * (10 * args.dim + 4 * args.ffn_hidden)
    kept = cb * args.dim * args.n_layers + per_layer if cfg.activation_checkpointing else per_layer * args.n_layers
    on_gpu = 0 if cfg.cpu_offload else 1
    plan = {
        "parameters (sharded)": on_gpu * n * pb / world_size,
        "gradients (sharded)": on_gpu * n * pb / world_size,
        "optimizer state (sharded)": on_gpu * 2 * n * pb / world_size,
        "unsharded blocks (2) and root": 2 * block * cb + root * cb,
        "a block's gradient (fp32, unsharded)": 4 * block,
        "activations (est.)": tokens * kept,
        # one slice's logits in the compute dtype and fp32, and their gradient in fp32
        "logits (one loss slice)": loss_slice * args.vocab_size * (cb + 4 + 4),
    }
    if cfg.cpu_offload:  # shards brought over for the all-gather, gradients on their way out
        plan["offloaded shards in flight"] = (pb + 4) * (2 * block + root) / world_size
    plan["total"] = sum(plan.values())
    plan["host per rank"] = (4 * n * pb / world_size) if cfg.cpu_offload else 0.0
    if not quiet:
        lines = [f"memory plan per {'GPU' if device.type == 'cuda' else 'process'}: {n / 1e9:.2f}B "
                 f"params, {world_size} ranks, params {str(param_dtype(cfg)).replace('torch.', '')}, "
                 f"compute {str(compute_dtype(cfg, device)).replace('torch.', '')}, checkpointing "
                 f"{cfg.activation_checkpointing}, cpu offload {cfg.cpu_offload}"]
        lines += [f"  {k:<38}{v / 2**30:8.2f} GiB" for k, v in plan.items() if k != "host per rank"]
        if cfg.cpu_offload:
            lines.append(f"  host memory per rank for offloaded state: {plan['host per rank'] / 2**30:.1f} GiB")
        if param_dtype(cfg) == torch.bfloat16:
            lines.append("  note: bf16 master weights and Adam state; LIMA's updates (1e-5 on weights of ~1e-2, "
                         "below bf16's 8-bit mantissa) are kept by stochastic rounding (optim.AdamW)")
        log("\n".join(lines))
    if quiet:  # a plan to compare, not a run to refuse
        return plan
    if capacity is None and device.type == "cuda":
        capacity = torch.cuda.get_device_properties(device).total_memory
    if capacity is not None:
        if plan["total"] > 0.95 * capacity and not cfg.force:
            raise SystemExit(
                f"the memory plan needs {plan['total'] / 2**30:.1f} GiB per GPU but the GPU has "
                f"{capacity / 2**30:.1f} GiB. Options: {MEMORY_OPTIONS}; or --force to try anyway.")
    return plan


# what to change when a run does not fit, as the plan and train.py's memory probe both say it
MEMORY_OPTIONS = ("--activation_checkpointing, --param_dtype bfloat16, --cpu_offload, a smaller "
                  "--micro_batch_tokens, more GPUs (train.py --plan_only lists what fits)")


DEV_ROWS = 16  # dev prompts decoded together (train.DEV_BATCH)


def _duration(seconds):
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def plan_report(cfg, args, world_size, gpu_gib, lengths, mfu, max_len):
    """train.py --plan_only: what a run needs, before any GPU is rented. lengths: the tokens of
    each training example (one epoch). -> lines of text."""
    from dataclasses import replace
    gpu = torch.device("cuda")
    capacity = gpu_gib * 2**30
    with torch.device("meta"):
        n = Transformer(args).num_params()
    lines = [f"plan for {n / 1e9:.2f}B parameters on {world_size} GPUs of {gpu_gib:g} GiB "
             f"(estimates, not measurements):", "",
             "| param dtype | checkpointing | cpu offload | GiB per GPU | fits | host GiB per rank |",
             "|---|---|---|---|---|---|"]
    fitting = []
    for dtype in ("float32", "bfloat16"):
        for ckpt in (False, True):
            for offload in (False, True):
                option = replace(cfg, param_dtype=dtype, activation_checkpointing=ckpt, cpu_offload=offload)
                p = memory_plan(option, args, world_size, gpu, max_len, quiet=True)
                fits = p["total"] <= 0.95 * capacity
                chosen = (dtype, ckpt, offload) == (cfg.param_dtype, cfg.activation_checkpointing, cfg.cpu_offload)
                lines.append(f"| {dtype}{' (given)' if chosen else ''} | {ckpt} | {offload} | "
                             f"{p['total'] / 2**30:.1f} | {'yes' if fits else 'no'} | "
                             f"{p['host per rank'] / 2**30:.0f} |")
                if fits:
                    fitting.append(" ".join(f for f, on in (("--param_dtype bfloat16", dtype == "bfloat16"),
                                                            ("--activation_checkpointing", ckpt),
                                                            ("--cpu_offload", offload)) if on) or "(the defaults)")
    per_node = min(world_size, 8)
    cache = DEV_ROWS * 2048 * args.n_layers * 2 * args.kv_heads * args.head_dim * 2
    tokens = sum(int(x) - 1 for x in lengths)
    flops = 6 * n * tokens + sum(6 * args.n_layers * args.dim * int(x) ** 2 for x in lengths)
    seconds = flops / (mfu * 989e12 * world_size)
    pb = config.resolve_dtype(cfg.param_dtype, "cpu").itemsize
    lines += ["", f"options that fit (with --micro_batch_tokens {cfg.micro_batch_tokens}): "
                  + ("; ".join(fitting) if fitting else "none: more GPUs, or a smaller --micro_batch_tokens"),
              f"dev answers of each saved epoch: the checkpoint in bf16 over {per_node} GPUs of one node, "
              f"{(2 * n + cache) / per_node / 2**30:.1f} GiB per GPU ({DEV_ROWS} prompts x 2,048 tokens of KV cache)",
              f"a saved epoch (bf16): {2 * n / 1e9:.0f} GB; the resume state ({cfg.param_dtype} weights and "
              f"Adam's two moments): {3 * pb * n / 1e9:.0f} GB",
              f"one epoch: {len(lengths):,} examples, {tokens:,} tokens, {flops / 1e15:.0f} PFLOP: about "
              f"{_duration(seconds)} at {mfu:.0%} MFU, {cfg.epochs} epochs {_duration(cfg.epochs * seconds)}, "
              f"more with --cpu_offload (Adam steps on the host); measured on one H200: 24-36% MFU at "
              f"1.2B (benchmarks/gpu_h200.md)"]
    return lines


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


def save_consolidated(model, args, path, dtype, tokenizer_path, extra):
    """The Hugging Face layout (checkpoint.save_hf), written by rank 0 as the parameters are
    gathered one by one; atomic (temp dir, then rename)."""
    tensors = full_tensors(model, dtype)
    error = None
    if dist.get_rank() == 0:
        try:
            checkpoint.save_hf(path, args, tensors, tokenizer_path=tokenizer_path, extra=extra)
        except Exception as e:  # keep gathering so the other ranks are not left waiting
            error = e
    for _ in tensors:
        pass
    check_all_ok(error, f"writing the checkpoint {path}")


class Failed(RuntimeError):
    """Writing a checkpoint or the resume state failed on this rank (the others exit quietly)."""


def check_all_ok(error, what):
    """Stop every rank if any rank failed (a rank that raises alone would hang the others): the
    failing rank raises Failed with the message, the others exit quietly."""
    device = "cuda" if uses_nccl() else "cpu"
    failed = torch.tensor([error is not None], dtype=torch.int32, device=device)
    dist.all_reduce(failed)
    if error is not None:
        text = files.explain(error) if isinstance(error, OSError) and error.filename else str(error)
        raise Failed(f"{what} failed: {text.rstrip('.')}")
    if failed.item():
        raise SystemExit(1)


# ---- the resume state: safetensors and JSON, nothing pickled -----------------------------------
#
#   resume/state.json                  where the run is (step, epoch), what it must resume with
#                                      (train.py's run identity), ranks and files; written last
#   resume/rank00000-000.safetensors   rank 0's shards: "model/NAME", "optim/NAME/exp_avg", ...,
#   resume/rank00000-001.safetensors   "rng/cpu"; at most MAX_FILE_BYTES a file
#
# Reading it runs no code from any file: safetensors and JSON are data (the pickled metadata of
# torch.distributed.checkpoint is not). FSDP2 shards every parameter and optimizer moment along
# dim 0 the way torch.chunk does (rank r of W holds rows [r*c, (r+1)*c), c = ceil(rows / W)),
# so a state saved by any number of ranks resumes on any other: each rank reads the rows it now
# holds from the files of the ranks that held them.

RESUME = "resume"
MAX_FILE_BYTES = 1 << 30  # host memory a rank needs while saving: one file's tensors at a time


def _rows(n, world_size, rank):
    c = -(-n // world_size)
    return min(rank * c, n), min((rank + 1) * c, n)


def _local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def _sharded_state(model, optimizer):
    """(key, parameter or optimizer state tensor) for all a resume needs, the same keys in the
    same order on every rank."""
    for module in model.modules():  # after a forward without backward (dev loss, generation)
        if isinstance(module, FSDPModule):  # the root's parameters are left unsharded
            module.reshard()
    names = {p: name for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        yield f"model/{name}", p
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                yield f"optim/{names[p]}/{key}", value


def nonfinite(model, optimizer):
    """The keys of the parameters and optimizer moments that hold a NaN or an inf on any rank (a
    collective). train.py checks this before anything of an epoch is written."""
    device = "cuda" if uses_nccl() else "cpu"
    entries = [(k, _local(t)) for k, t in _sharded_state(model, optimizer) if t.is_floating_point()]
    flags = torch.stack([(~torch.isfinite(t)).any().to(device) for _, t in entries]).int()
    dist.all_reduce(flags)
    return [k for (k, _), bad in zip(entries, flags.tolist()) if bad]


def _write_files(folder, rank, tensors):
    """(key, tensor) pairs -> rank{rank}-{i}.safetensors files of at most MAX_FILE_BYTES each (a
    larger tensor gets a file of its own), each fsync'd. Returns the number of files."""
    group, size, count = {}, 0, 0

    def flush():
        nonlocal group, size, count
        path = os.path.join(folder, f"rank{rank:05d}-{count:03d}.safetensors")
        try:
            save_file({k: t.detach().to("cpu").contiguous() for k, t in group.items()}, path)
        except Exception as e:  # safetensors reports a failed write with the OS's error number
            code = re.search(r"os error (\d+)", str(e))
            if code is None:
                raise
            raise OSError(int(code[1]), os.strerror(int(code[1])), path) from None
        files.fsync(path)
        group, size, count = {}, 0, count + 1

    for key, t in tensors:
        nbytes = t.numel() * t.element_size()
        if group and size + nbytes > MAX_FILE_BYTES:
            flush()
        group[key] = t
        size += nbytes
    flush()
    return count


def save_resume(model, optimizer, out_dir, state):
    """The resume state at the end of an epoch, written beside the good one and swapped in
    (resume.tmp -> resume, the old one moved to resume.old first and deleted last), so a crash at
    any moment leaves a complete state where find_resume looks. state: JSON, train.py's (step,
    epoch, the run's identity). Call it only when nonfinite() is empty."""
    final = os.path.join(out_dir, RESUME)
    tmp, old = final + ".tmp", final + ".old"
    rank, world_size = dist.get_rank(), dist.get_world_size()
    error, n_files = None, 0
    try:
        if rank == 0:
            if os.path.lexists(tmp):
                shutil.rmtree(tmp)
            os.makedirs(tmp)
    except OSError as e:
        error = e
    check_all_ok(error, f"writing the resume state {tmp}")
    try:
        tensors = [(k, _local(t)) for k, t in _sharded_state(model, optimizer)]
        tensors.append(("rng/cpu", torch.get_rng_state()))
        if torch.cuda.is_available():
            tensors.append(("rng/cuda", torch.cuda.get_rng_state()))
        n_files = _write_files(tmp, rank, tensors)
    except Exception as e:
        error = e
    check_all_ok(error, f"writing the resume state {tmp}")
    counts = torch.zeros(world_size, dtype=torch.int64, device="cuda" if uses_nccl() else "cpu")
    counts[rank] = n_files
    dist.all_reduce(counts)
    if rank == 0:
        try:
            files.write_json(os.path.join(tmp, "state.json"),
                             dict(state, world_size=world_size, files=counts.tolist()))
            files.fsync(tmp)
            if os.path.lexists(final):
                os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
            files.fsync(out_dir)
        except OSError as e:
            error = e
    check_all_ok(error, f"swapping in the resume state {final}")


def read_state(path):
    """A resume directory's state.json -> dict, or None when there is none (the state was not
    finished). A damaged one is an error, not a reason to pick another."""
    file = os.path.join(path, "state.json")
    if not os.path.isfile(file):
        return None
    try:
        with open(file, encoding="utf-8") as f:
            state = json.load(f)
        ok = (isinstance(state, dict) and all(isinstance(state.get(k), int) and state[k] >= 0
                                              for k in ("step", "epoch", "world_size"))
              and isinstance(state.get("files"), list) and len(state["files"]) == state["world_size"]
              and all(isinstance(n, int) for n in state["files"]))
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"{file}: unreadable ({e}). The resume state is damaged: restore it, or "
                         f"start the run again with --overwrite.") from None
    if not ok:
        raise ValueError(f"{file}: not a resume state written by train.py (needs step, epoch, "
                         f"world_size, files). Restore it, or start the run again with --overwrite.")
    return state


def find_resume(out_dir):
    """The newest complete resume state in out_dir -> (path, state), or None. Complete means
    state.json is there (save_resume writes it last); a crash between the renames of the swap
    leaves one in resume.tmp (new) or resume.old (the one before)."""
    found = []
    for i, name in enumerate((RESUME, RESUME + ".tmp", RESUME + ".old")):
        path = os.path.join(out_dir, name)
        state = read_state(path)
        if state is not None:
            found.append((-state["step"], i, path, state))
    return min(found)[2:] if found else None


def recover_resume(out_dir):
    """Finish a swap a crash interrupted: the newest complete state becomes resume/, the rest
    goes. Rank 0, holding out_dir's lock. Returns its state, or None."""
    found = find_resume(out_dir)
    final = os.path.join(out_dir, RESUME)
    if found is not None and found[0] != final:
        if os.path.lexists(final):
            shutil.rmtree(final)  # older than the one found, or never finished
        os.rename(found[0], final)
    for name in (final + ".tmp", final + ".old"):
        if os.path.lexists(name):
            shutil.rmtree(name)
    files.fsync(out_dir)
    return None if found is None else found[1]


def load_resume(model, optimizer, out_dir):
    """Fill the model's shards, the optimizer's state and (with as many ranks as saved it) the
    random state from out_dir/resume. Returns its state.json."""
    path = os.path.join(out_dir, RESUME)
    state = read_state(path)
    if state is None:
        raise FileNotFoundError(f"{path}: no resume state (it is written at the end of each epoch)")
    saved, rank, world_size = state["world_size"], dist.get_rank(), dist.get_world_size()
    index = _index(path, state)  # key -> {saved rank: file}

    def read(key, shape, dtype, lo=0, hi=0):
        """Rows [lo, hi) of the full tensor `key`, from the saved ranks that held them."""
        if not shape:  # a scalar (Adam's step count), the same on every rank
            with _open(index, key, 0, (), dtype, path) as f:
                return f.get_tensor(key)
        parts = []
        for s in range(saved):
            a, b = _rows(shape[0], saved, s)
            if a < b and a < hi and lo < b:
                with _open(index, key, s, (b - a, *shape[1:]), dtype, path) as f:
                    parts.append(f.get_slice(key)[max(lo, a) - a:min(hi, b) - a])
        return torch.cat(parts) if parts else torch.empty((0, *shape[1:]), dtype=dtype)

    with torch.no_grad():
        for name, p in model.named_parameters():
            local = _local(p)
            lo, hi = _rows(p.shape[0], world_size, rank)
            if hi - lo != local.shape[0]:
                raise RuntimeError(f"{name}: FSDP holds {local.shape[0]} rows on rank {rank}, "
                                   f"not {hi - lo} as torch.chunk would")
            local.copy_(read(f"model/{name}", tuple(p.shape), p.dtype, lo, hi))
    # the optimizer's own state_dict format, filled with this rank's shards
    saved_keys = {}  # parameter name -> its state's keys ("step", "exp_avg", ...)
    for key in index:
        if key.startswith("optim/"):
            name, _, what = key[len("optim/"):].rpartition("/")
            saved_keys.setdefault(name, []).append(what)
    names = {p: name for name, p in model.named_parameters()}
    opt_state = {}  # parameter index (its place in the param groups) -> its state
    for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"]):
        lo, hi = _rows(p.shape[0], world_size, rank)
        for what in saved_keys.get(names[p], []):
            key = f"optim/{names[p]}/{what}"
            if what == "step":
                value = read(key, (), torch.float32)
            else:  # a moment, sharded as its parameter
                value = read(key, tuple(p.shape), p.dtype, lo, hi).to(p.device)
                if isinstance(p, DTensor):
                    value = DTensor.from_local(value, p.device_mesh, p.placements, shape=p.shape,
                                               stride=p.stride(), run_check=False)
            opt_state.setdefault(i, {})[what] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": optimizer.state_dict()["param_groups"]})
    if saved == world_size:  # the dropout masks go on as if never interrupted
        with _open(index, "rng/cpu", rank, None, torch.uint8, path) as f:
            torch.set_rng_state(f.get_tensor("rng/cpu"))
        if torch.cuda.is_available() and rank in index.get("rng/cuda", {}):
            with _open(index, "rng/cuda", rank, None, torch.uint8, path) as f:
                torch.cuda.set_rng_state(f.get_tensor("rng/cuda"))
    return state


DAMAGED = "The resume state is damaged: restore it, or start the run again with --overwrite."


def _index(path, state):
    """key -> {saved rank: its file}, every file's header read (and so checked) once."""
    index = {}
    for s in range(state["world_size"]):
        names = sorted(glob.glob(os.path.join(path, f"rank{s:05d}-*.safetensors")))
        if len(names) != state["files"][s]:
            raise ValueError(f"{path}: rank {s} wrote {state['files'][s]} files, {len(names)} are "
                             f"here. {DAMAGED}")
        for name in names:
            try:
                with safe_open(name, "pt", device="cpu") as f:
                    keys = list(f.keys())
            except Exception as e:  # SafetensorError: truncated, or not safetensors at all
                raise ValueError(f"{name}: unreadable ({e}). {DAMAGED}") from None
            for key in keys:
                index.setdefault(key, {})[s] = name
    return index


def _open(index, key, rank, shape, dtype, path):
    """The file that holds saved rank `rank`'s `key`, opened, once its shape and dtype are
    checked (shape None: any)."""
    file = index.get(key, {}).get(rank)
    if file is None:
        raise ValueError(f"{path}: no {key} from rank {rank}. {DAMAGED}")
    f = safe_open(file, "pt", device="cpu")
    sl = f.get_slice(key)
    got_shape, got_dtype = tuple(sl.get_shape()), sl.get_dtype()
    want_dtype = {torch.float32: "F32", torch.bfloat16: "BF16", torch.uint8: "U8"}.get(dtype)
    if (shape is not None and got_shape != tuple(shape)) or got_dtype != want_dtype:
        raise ValueError(f"{file}: {key} is {got_dtype} {list(got_shape)}, expected {want_dtype} "
                         f"{list(shape or got_shape)}. {DAMAGED}")
    return f


def all_ranks_done(done):
    """generate()'s stopping rule when every forward is a collective (an FSDP model decodes in
    lockstep on every rank): stop only when every rank's rows are all finished."""
    flag = done.all().to(torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)
