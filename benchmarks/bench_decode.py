"""Decode speed of generate.generate against transformers' LlamaForCausalLM.generate, same
weights and settings (LIMA §5: temperature 0.7, top-p 0.9, repetition penalty 1.2 on prompt and
response, transformers' way; top-k off), on random weights.

    python benchmarks/bench_decode.py                        # CPU: a small model, fp32
    python benchmarks/bench_decode.py --preset 7B --device cuda --new_tokens 256 --compile

Decode tokens/s = batch * (N - 1) / (time(N new tokens) - time(1 new token)): the prefill
and the first token cancel out. Median over --repeats runs. On CUDA the floor is memory
bandwidth (4.25 TB/s measured on an H200, benchmarks/gpu_h200.md): every step reads all
weights plus the live KV cache.
"""

import os
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
from config import parse_config  # noqa: E402
from model import PRESETS, ModelArgs, Transformer, model_args  # noqa: E402

SMALL = ModelArgs(dim=512, n_layers=8, n_heads=8, vocab_size=32001, multiple_of=256)
BANDWIDTH = 4.25e12  # B/s, device-to-device copy measured on an H200 (benchmarks/gpu_h200.md)


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


def ours(model, prompts, n, compile, greedy=False):
    return generate.generate(model, prompts.tolist(), stop_ids=(), max_new_tokens=n,
                           temperature=0.0 if greedy else 0.7, top_p=0.9,
                           repetition_penalty=1.2, penalize_prompt=True, compile=compile,
                           keep_cache=compile, generator=torch.Generator(prompts.device).manual_seed(0))


@torch.inference_mode()
def theirs(hf, prompts, n, greedy=False):
    out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n,
                      min_new_tokens=n, do_sample=not greedy, temperature=0.7 if not greedy else None,
                      top_p=0.9 if not greedy else None, top_k=0 if not greedy else None,
                      repetition_penalty=1.2, pad_token_id=0)
    return out[:, prompts.shape[1]:].tolist()


def decode_rate(fn, batch, n, device, repeats):
    fn(2)  # warm up (and compile)
    rates = []
    for _ in range(repeats):
        times = []
        for k in (1, n):
            sync(device)
            t = time.perf_counter()
            fn(k)
            sync(device)
            times.append(time.perf_counter() - t)
        rates.append(batch * (n - 1) / (times[1] - times[0]))
    return statistics.median(rates)


@dataclass
class DecodeBenchConfig:
    preset: str = field(default="small", metadata={"help": "small, or a model.PRESETS name",
                                                   "choices": ["small"] + sorted(PRESETS)})
    device: str = field(default="cuda" if torch.cuda.is_available() else "cpu",
                        metadata={"choices": ["cpu", "cuda"]})
    dtype: Optional[str] = field(default=None, metadata={"help": "None: bfloat16 on cuda, float32 on cpu",
                                                         "choices": ["float32", "bfloat16", "float16"]})
    batch_sizes: list[int] = field(default_factory=lambda: [1, 32], metadata={"min": 1})
    prompt_len: int = field(default=64, metadata={"min": 1})
    new_tokens: int = field(default=64, metadata={"help": "the rate needs at least 2", "min": 2})
    repeats: int = field(default=3, metadata={"min": 1})
    compile: bool = field(default=False, metadata={"help": "also time sample.py --compile"})
    threads: Optional[int] = field(default=None, metadata={"help": "torch CPU threads", "min": 1})


def main(argv=None):
    a = parse_config(DecodeBenchConfig, argv, description=__doc__.split("\n\n")[0])
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype) if a.dtype else (
        torch.bfloat16 if torch.device(a.device).type == "cuda" else torch.float32)
    model = build(a.preset, a.device, dtype)
    hf = to_hf(model, dtype, a.device)
    args = model.args
    weight_bytes = model.num_params() * dtype.itemsize
    print(f"# {a.preset}: {model.num_params() / 1e6:.0f}M parameters, {dtype}, {a.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads", file=sys.stderr)

    # correctness first: greedy (with the penalty) token for token against transformers
    g = torch.Generator().manual_seed(1)
    check = torch.randint(3, 32000, (2, 16), generator=g).to(a.device)
    check[:, 0] = 1
    mine, hers = ours(model, check, 16, False, greedy=True), theirs(hf, check, 16, greedy=True)
    same = sum(x == y for r, s in zip(mine, hers) for x, y in zip(r, s)) / (2 * 16)
    print(f"greedy agreement with transformers: {same:.0%} of 32 tokens", file=sys.stderr)

    rows = []
    for batch in a.batch_sizes:
        prompts = torch.randint(3, 32000, (batch, a.prompt_len), generator=g).to(a.device)
        prompts[:, 0] = 1
        impls = [("transformers generate", lambda k: theirs(hf, prompts, k)),
                 ("sample.generate", lambda k: ours(model, prompts, k, False))]
        if a.compile:
            impls.append(("sample.generate --compile", lambda k: ours(model, prompts, k, True)))
        # floor: each step reads the weights and every row's live keys and values
        mean_len = a.prompt_len + a.new_tokens / 2
        kv_bytes = batch * mean_len * args.n_layers * 2 * args.kv_heads * args.head_dim * dtype.itemsize
        bound = batch * BANDWIDTH / (weight_bytes + kv_bytes)
        base = None
        for name, fn in impls:
            rate = decode_rate(fn, batch, a.new_tokens, a.device, a.repeats)
            base = base or rate
            rows.append((name, batch, rate, rate / base, rate / bound))
            print(f"  {name}, batch {batch}: {rate:.1f} tok/s", file=sys.stderr)

    cuda = torch.device(a.device).type == "cuda"
    print("| implementation | batch | decode tok/s | vs transformers |"
          + (" % of bandwidth bound |" if cuda else ""))
    print("|---|---|---|---|" + ("---|" if cuda else ""))
    for name, batch, rate, rel, frac in rows:
        print(f"| {name} | {batch} | {rate:.1f} | {rel:.2f}x |" + (f" {frac:.0%} |" if cuda else ""))


if __name__ == "__main__":
    main()
