"""Models bigger than one GPU, for inference: consecutive layers on consecutive devices.

The layers are split into contiguous runs balanced by parameter count; hooks move each layer's
inputs to its device, so model.forward is unchanged (pipeline placement without pipelining:
one device works at a time, which is what decoding one batch needs).
"""

import torch
import torch.nn as nn

import checkpoint
import config
from model import Transformer
from tokenizer import load_tokenizer


def choose_devices(device, args, dtype, rows, context):
    """--device as given ("cpu", "cuda:1", "cuda:0,cuda:1"), or for "auto": the CPU without a
    GPU, one GPU when the weights and a full-context KV cache of `rows` rows fit it, else every
    visible GPU."""
    if device != "auto":
        devices = [d.strip() for d in device.split(",") if d.strip()]
        for d in devices:
            try:
                kind = torch.device(d)
            except RuntimeError:
                raise ValueError(f"--device {device}: {d!r} is not a device; use auto, cpu, cuda, "
                                 f"cuda:N or a list such as cuda:0,cuda:1") from None
            if kind.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"--device {device}: no CUDA device here; use --device cpu")
            if kind.type == "cuda" and (kind.index or 0) >= torch.cuda.device_count():
                raise ValueError(f"--device {device}: there is no {d} here ({torch.cuda.device_count()} "
                                 f"GPUs: cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
        if not devices:
            raise ValueError("--device is empty; use auto, cpu, cuda or cuda:N")
        return devices
    if not torch.cuda.is_available():
        return ["cpu"]
    with torch.device("meta"):
        weight_bytes = Transformer(args).num_params() * dtype.itemsize
    # the full-context KV cache of one batch: 30B's weights fit an 80 GB GPU, with it they don't
    cache_bytes = rows * context * args.n_layers * 2 * args.kv_heads * args.head_dim * dtype.itemsize
    free = torch.cuda.mem_get_info(0)[0]
    n = torch.cuda.device_count()
    if n > 1 and weight_bytes + cache_bytes > 0.9 * free:  # 10% for activations and logits
        return [f"cuda:{i}" for i in range(n)]
    return ["cuda"]


def placement_plan(args, devices):
    """{module name: device} for tok_embeddings, layers.0 .. layers.{L-1}, norm, output:
    contiguous runs balanced by parameter count (a module goes to the device whose share of the
    total holds its midpoint). The output head sits with the final norm on the last device; a
    tied embedding (Llama 3.2) is the head's weight, so it sits there too and tokens go in there."""
    with torch.device("meta"):
        model = Transformer(args)  # shapes only
    parts = [("tok_embeddings", model.tok_embeddings)]
    parts += [(f"layers.{i}", layer) for i, layer in enumerate(model.layers)]
    parts += [("norm", model.norm), ("output", model.output)]
    sizes = [sum(p.numel() for p in m.parameters()) for _, m in parts]
    if args.tie_embeddings:
        sizes[0] = 0  # one weight, counted with the output head
    total, n, cum, plan = sum(sizes), len(devices), 0, {}
    for (name, _), size in zip(parts, sizes):
        plan[name] = devices[min(n - 1, int(n * (cum + size / 2) / total))]
        cum += size
    plan["norm"] = plan["output"]
    if args.tie_embeddings:
        plan["tok_embeddings"] = plan["output"]
    return plan


def _inputs_to(device):
    def hook(module, args):
        return tuple(a.to(device, non_blocking=True) if torch.is_tensor(a) else a for a in args)
    return hook


def place_model(model, plan):
    """Move each part to its device and hook every layer (and the final norm) to bring its
    inputs along: activations, RoPE angles and cache positions hop device at the boundaries,
    model.forward is unchanged. Tokens go in on plan["tok_embeddings"]; logits come out on
    plan["output"]."""
    for name, device in plan.items():
        module = model.get_submodule(name)
        module.to(device)
        if name.startswith("layers.") or name == "norm":
            module.register_forward_pre_hook(_inputs_to(torch.device(device)))
    return model


def load_placed(path, plan, dtype):
    """Like checkpoint.load_model, but each tensor goes straight to its planned device, so a 65B
    model never sits whole in host memory."""
    args = checkpoint.load_args(path)
    with torch.device("meta"):
        model = Transformer(args)
    for name, tensor in checkpoint.iter_weights(path, args):
        module_name, _, leaf = name.rpartition(".")
        device = next(d for part, d in plan.items() if name == part or name.startswith(part + "."))
        setattr(model.get_submodule(module_name), leaf,
                nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False))
    model.tie_weights()
    return place_model(model, plan)


def load_for_inference(path, tokenizer_path, device="auto", dtype="auto", rows=1, context=2048):
    """A checkpoint ready to decode: on one device or split over several (choose_devices, for
    `rows` conversations of up to `context` tokens), in eval mode, with its tokenizer, which must
    fit its vocabulary and be the one it was trained with. -> (model, tokenizer, devices, dtype).
    ValueError / FileNotFoundError for what a user can get wrong."""
    args = checkpoint.load_args(path)
    probe = config.resolve_dtype(dtype, "cuda" if torch.cuda.is_available() else "cpu")
    placed = choose_devices(device, args, probe, rows, min(context, args.max_seq_len))
    dtype = config.resolve_dtype(dtype, placed[0])
    tokenizer = load_tokenizer(tokenizer_path)
    tokenizer.check_model_vocab(args.vocab_size, path)
    checkpoint.check_tokenizer(path, tokenizer)  # same size, other pieces: refused
    if len(placed) == 1:
        model = checkpoint.load_model(path, dtype=dtype, device=placed[0])
    else:
        model = load_placed(path, placement_plan(args, placed), dtype)
    model.requires_grad_(False).eval()
    return model, tokenizer, placed, dtype
