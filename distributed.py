"""FSDP2 for train.py, kept apart from the training loop as torchtitan keeps its parallelize
function: the process group, the sharded model built from streamed weights, the memory plan,
and the checkpoints of a sharded model (a consolidated Hugging Face directory, and the sharded
resume state).

A plain `python train.py` is a group of one process: there is a single code path, and FSDP2
with one rank shards nothing.
"""

import json
import os
import shutil
import socket
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.checkpoint import checkpoint as activation_checkpoint

import checkpoint
import config
from model import Transformer


def setup_distributed(device):
    """torchrun sets RANK/WORLD_SIZE; plain `python train.py` becomes a group of one, so there
    is a single code path (FSDP2 with one rank shards nothing)."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = config.resolve_device(device)
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


def build_model(cfg, args, weights, device):
    """torchtitan's recipe: build on the meta device, fully_shard every block then the root,
    allocate only this rank's shards, and fill them parameter by parameter from `weights`
    ((name, full tensor) pairs, every rank the same), so no rank ever holds the whole model
    (65B is 130 GB in bf16). cfg: param_dtype, compute_dtype, activation_checkpointing,
    cpu_offload, init_from (for messages)."""
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
    for block in model.layers:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    model.to_empty(device="cpu" if cfg.cpu_offload else device)
    expected = dict(model.named_parameters())
    seen = set()
    with torch.no_grad():
        for name, full in weights:
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
    return config.resolve_dtype(cfg.param_dtype, "cpu")  # "auto": float32, the master weights


def compute_dtype(cfg, device):
    """"auto": bfloat16 on GPUs, else the parameters' dtype."""
    if cfg.compute_dtype == "auto" and device.type != "cuda":
        return param_dtype(cfg)
    return config.resolve_dtype(cfg.compute_dtype, device.type)


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
             f"params, {world_size} ranks, params {str(param_dtype(cfg)).replace('torch.', '')}, compute "
             f"{str(compute_dtype(cfg, device)).replace('torch.', '')}, checkpointing "
             f"{cfg.activation_checkpointing}, cpu offload {cfg.cpu_offload}"]
    lines += [f"  {k:<28}{v / 2**30:8.2f} GiB" for k, v in plan.items()]
    if cfg.cpu_offload:
        lines.append(f"  host memory per rank for offloaded state: {4 * n * pb / world_size / 2**30:.1f} GiB")
    if param_dtype(cfg) == torch.bfloat16:
        lines.append("  note: bf16 master weights and Adam state; LIMA's updates (1e-5 on weights of ~1e-2, "
                     "below bf16's 8-bit mantissa) are kept by stochastic rounding (optim.AdamW)")
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


def all_ranks_done(done):
    """generate()'s stopping rule when every forward is a collective (an FSDP model decodes in
    lockstep on every rank): stop only when every rank's rows are all finished."""
    flag = done.all().to(torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)
