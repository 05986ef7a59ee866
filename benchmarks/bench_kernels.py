"""Kernel benchmarks (docs/performance.md): one command, one table, every variant checked
before it is timed.

    python benchmarks/bench_kernels.py                      # on a GPU: all of it, a few minutes
    python benchmarks/bench_kernels.py --only packed --out $OUT/bench.md
    python benchmarks/bench_kernels.py --only tune          # block-size candidates
    python benchmarks/bench_kernels.py -h

What is counted (kernels/NOTES.md has the reasoning):
- causal attention forward: 4 * B * H * D * S^2 / 2 FLOPs (QK^T and PV, half the matrix);
  backward 2.5x that (five matmuls, one of them recomputing QK^T); a packed batch counts
  sum(L_i^2) over its examples instead of B * S^2, for every variant, padded ones included.
- RMSNorm: the minimum bytes, read + written once: forward x, w -> y; backward dy, x, w -> dx, dw.
Correctness: outputs and gradients against the PyTorch reference computed in fp32 from the same
inputs (relative error of the worst of them); a variant over tolerance is marked FAIL.
"""

import datetime
import importlib
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

from config import parse_config  # noqa: E402
from kernels.attention import attention_reference, attention_triton  # noqa: E402
from kernels.rmsnorm import rms_norm_reference, rms_norm_triton  # noqa: E402


@dataclass
class BenchConfig:
    only: str = field(default="all", metadata={"help": "tune: attention block-size candidates at --tune_seqlen; "
                                                       "tune_rmsnorm: tile candidates at --rms_dims",
                                               "choices": ["attention", "packed", "rmsnorm", "all", "tune", "tune_rmsnorm"]})
    dtype: str = field(default="bfloat16", metadata={"choices": ["bfloat16", "float16", "float32"]})
    seqlens: list[int] = field(default_factory=lambda: [512, 1024, 2048, 4096], metadata={"min": 1})
    head_dims: list[int] = field(default_factory=lambda: [64, 128], metadata={"min": 1})
    tokens: int = field(default=16384, metadata={"help": "batch * seqlen of each attention shape", "min": 1})
    model_dim: int = field(default=2048, metadata={"help": "n_heads * head_dim", "min": 1})
    packed_examples: int = field(default=32, metadata={"help": "LIMA §4: 32 examples per batch", "min": 1})
    packed_max_len: int = field(default=2048, metadata={"help": "LIMA §4: 2048 tokens max", "min": 1})
    packed_head_dim: int = field(default=128, metadata={"min": 1})
    tune_seqlen: int = field(default=2048, metadata={"help": "sequence length of --only tune", "min": 1})
    tune_limit: int = field(default=0, metadata={"help": "--only tune: the first N candidates of each pass (0: all)", "min": 0})
    rms_rows: int = field(default=16384, metadata={"min": 1})
    rms_dims: list[int] = field(default_factory=lambda: [4096, 8192], metadata={"min": 1})
    compile: bool = field(default=True, metadata={"help": "also time torch.compile'd RMSNorm"})
    backends: list[str] = field(default_factory=lambda: ["sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math"],
                                metadata={"help": "torch SDPA backends to compare against",
                                          "choices": ["sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math"]})
    check_only: bool = field(default=False, metadata={"help": "check every variant, time nothing"})
    cpu_timing: bool = field(default=False, metadata={"help": "on CPU, time with the wall clock anyway "
                                                            "(smoke runs: the numbers mean nothing)"})
    out: str = field(default="", metadata={"help": "also write the table (markdown) here"})
    seed: int = field(default=0, metadata={"min": 0})


SDPA_BACKENDS = {
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa-math": SDPBackend.MATH,
}


def rel_err(out, ref):
    ref = ref.float()
    return ((out.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def tolerance(dtype):
    return 1e-4 if dtype == torch.float32 else 1e-2


def lima_lengths(n, max_len, generator):
    # LIMA's mix (docs/method.md): mean ~750 tokens, a fifth near 1.8k (wikiHow answers), max 2048.
    # The rest: log-normal with its mean set so the whole batch averages ~750/2048 of max_len.
    n_long = round(n / 5)
    long = max_len * (0.8 + 0.2 * torch.rand(n_long, generator=generator))
    short_mean = (0.366 * n - 0.9 * n_long) / (n - n_long)  # fractions of max_len
    short = torch.exp(torch.randn(n - n_long, generator=generator) * 0.8) * short_mean * math.exp(-0.32)
    lengths = torch.cat([long, short * max_len]).clamp(1, max_len).round().int()
    return lengths[torch.randperm(n, generator=generator)].tolist()


def sdpa_attention(backend):
    def run(q, k, v):  # (B, T, H, D) in and out, like ours; SDPA wants (B, H, T, D)
        with sdpa_kernel([backend]):
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                               v.transpose(1, 2), is_causal=True)
        return o.transpose(1, 2)
    return run


def forward_backward(fn, inputs, dout):
    # gradients of sum(out * dout) w.r.t. every input; the graph is kept so backward can be timed
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, dout, retain_graph=True)
    return inputs, out, grads


def check(fn, inputs, dout, reference, valid=None):
    # worst relative error over the output and every gradient; valid: which (batch, token) to compare
    try:
        _, out, grads = forward_backward(fn, inputs, dout)
    except Exception as e:  # an SDPA backend that does not take this shape, a config too big, ...
        return None, str(e).splitlines()[0][:60]
    ref_out, ref_grads = reference
    pairs = [(out, ref_out), *zip(grads, ref_grads)]
    if valid is not None:
        pairs = [(a[valid], b[valid]) for a, b in pairs]
    return max(rel_err(a, b) for a, b in pairs), ""


def time_ms(fn, device):
    """Median milliseconds of fn(). On CUDA: triton's do_bench (CUDA events, L2 flushed between
    runs, 25 ms of warm-up, 100 ms of runs). On CPU a few wall-clock runs, which only show that
    the code path works (smoke runs under the interpreter)."""
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(2):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def time_fwd_bwd(fn, inputs, dout):
    inputs, out, _ = forward_backward(fn, inputs, dout)
    with torch.no_grad():
        fwd = time_ms(lambda: fn(*inputs), dout.device)
    bwd = time_ms(lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True), dout.device)
    return fwd, bwd


def run_variants(cfg, rows, op, shape, variants, reference, work, unit):
    # variants: (name, fn, inputs, dout, valid); work: (fwd, bwd) in FLOPs or bytes; a row each
    for name, fn, var_inputs, var_dout, var_valid in variants:
        err, why = check(fn, var_inputs, var_dout, reference, var_valid)
        tol = tolerance(var_inputs[0].dtype)
        row = dict(op=op, shape=shape, variant=name, err=err, ok=err is not None and err < tol,
                   note=why, unit=unit)
        if err is not None and not cfg.check_only:
            row["fwd_ms"], row["bwd_ms"] = time_fwd_bwd(fn, var_inputs, var_dout)
            fwd_work, bwd_work = work
            row["fwd_rate"] = fwd_work / row["fwd_ms"] / 1e9  # per ms -> T per s
            row["bwd_rate"] = bwd_work / row["bwd_ms"] / 1e9
        rows.append(row)
        print(format_row(row), flush=True)


def reference_fwd_bwd(fn, inputs, dout):
    _, out, grads = forward_backward(fn, [t.float() for t in inputs], dout.float())
    return out, grads


def bench_attention(cfg, rows, device, dtype, gen):
    for D in cfg.head_dims:
        H = cfg.model_dim // D
        for S in cfg.seqlens:
            B = max(1, cfg.tokens // S)
            q, k, v, do = (torch.randn(B, S, H, D, generator=gen).to(device, dtype) for _ in range(4))
            reference = reference_fwd_bwd(attention_reference, [q, k, v], do)
            fwd_flops = 4 * B * H * D * S * S / 2
            variants = [("triton", attention_triton, [q, k, v], do, None)]
            variants += [(name, sdpa_attention(SDPA_BACKENDS[name]), [q, k, v], do, None) for name in cfg.backends]
            run_variants(cfg, rows, "attention", f"B{B} S{S} H{H} D{D}", variants, reference,
                         (fwd_flops, 2.5 * fwd_flops), "TFLOP/s")


def bench_packed(cfg, rows, device, dtype, gen):
    D = cfg.packed_head_dim
    H = cfg.model_dim // D
    lengths = lima_lengths(cfg.packed_examples, cfg.packed_max_len, gen)
    T, L = sum(lengths), max(lengths)
    cu_seqlens = torch.tensor([0] + lengths, device=device).cumsum(0).int()
    q, k, v, do = (torch.randn(1, T, H, D, generator=gen).to(device, dtype) for _ in range(4))
    reference = reference_fwd_bwd(lambda q, k, v: attention_reference(q, k, v, cu_seqlens), [q, k, v], do)

    # the same examples padded to the longest: (n, L, H, D); do = 0 on padding so its gradients vanish
    def pad(t):
        out = t.new_zeros(len(lengths), L, *t.shape[2:])
        for i, (start, n) in enumerate(zip(cu_seqlens.tolist(), lengths)):
            out[i, :n] = t[0, start:start + n]
        return out
    valid = torch.arange(L, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
    padded_reference = [pad(t) for t in (reference[0], *reference[1])]
    fwd_flops = 4 * H * D * sum(n * n for n in lengths) / 2  # useful work only, for every variant
    work = (fwd_flops, 2.5 * fwd_flops)
    shape = f"{len(lengths)} ex, T{T} (max {L}, mean {T / len(lengths):.0f}) H{H} D{D}"
    run_variants(cfg, rows, "packed", shape,
                 [("triton varlen", lambda q, k, v: attention_triton(q, k, v, cu_seqlens), [q, k, v], do, None)],
                 reference, work, "TFLOP/s")
    padded = [("padded " + name, sdpa_attention(SDPA_BACKENDS[name]), [pad(q), pad(k), pad(v)], pad(do), valid)
              for name in cfg.backends]
    run_variants(cfg, rows, "packed", shape, padded, (padded_reference[0], padded_reference[1:]),
                 work, "TFLOP/s")
    print(f"(padding to the longest does {len(lengths) * L * L / sum(n * n for n in lengths):.2f}x "
          f"the useful attention FLOPs; rates above count the useful ones only)")


def rmsnorm_inputs(cfg, N, device, dtype, gen):
    x, dy = (torch.randn(cfg.rms_rows, N, generator=gen).to(device, dtype) for _ in range(2))
    w = (1 + 0.1 * torch.randn(N, generator=gen)).to(device, dtype)
    reference = reference_fwd_bwd(lambda x, w: rms_norm_reference(x, w, 1e-6), [x, w], dy)
    size = dtype.itemsize
    fwd_bytes = 2 * x.numel() * size + N * size  # x, w in; y out
    bwd_bytes = 3 * x.numel() * size + 2 * N * size  # dy, x, w in; dx, dw out
    return x, w, dy, reference, (fwd_bytes, bwd_bytes)


def bench_rmsnorm(cfg, rows, device, dtype, gen):
    for N in cfg.rms_dims:
        variants = [("triton", rms_norm_triton), ("eager", rms_norm_reference)]
        if cfg.compile:  # a fresh static-shape compile per width (its backward cannot be re-run
            # with retain_graph once a recompile made it dynamic)
            variants.append(("torch.compile", torch.compile(rms_norm_reference, dynamic=False)))
        x, w, dy, reference, work = rmsnorm_inputs(cfg, N, device, dtype, gen)
        run_variants(cfg, rows, "rmsnorm", f"M{cfg.rms_rows} N{N}",
                     [(name, lambda x, w, fn=fn: fn(x, w, 1e-6), [x, w], dy, None) for name, fn in variants],
                     reference, work, "TB/s")


# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates for each pass of the attention kernels,
# around the best of a first sweep on an H200 (benchmarks/gpu_h200.md)
TUNE_CANDIDATES = dict(
    fwd=[(64, 64, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4), (64, 32, 4, 3), (128, 64, 8, 3),
         (128, 128, 8, 2), (64, 128, 8, 3), (128, 64, 8, 4)],
    dkdv=[(32, 64, 4, 3), (32, 64, 4, 2), (32, 64, 4, 4), (32, 128, 4, 3), (32, 32, 4, 3),
          (64, 64, 4, 3), (32, 128, 8, 3), (16, 64, 4, 3)],
    dq=[(64, 32, 4, 3), (64, 32, 4, 2), (32, 32, 4, 3), (64, 16, 4, 3), (128, 32, 8, 2),
        (64, 64, 4, 2)],
)
# (rows per tile, warps) candidates for the RMSNorm kernels
TUNE_RMSNORM = dict(fwd=[(1, 4), (1, 8), (1, 16), (2, 8), (2, 16), (4, 16)],
                    bwd=[(1, 8), (1, 16), (2, 8), (2, 16), (4, 16), (4, 32), (8, 32)])


def bench_tune(cfg, rows, device, dtype, gen):
    # each candidate of each pass, checked then timed (the whole backward for dkdv and dq);
    # the fastest go into _CONFIGS in kernels/attention.py by hand, with the table in NOTES.md
    attention_module = importlib.import_module("kernels.attention")
    S = cfg.tune_seqlen
    for D in cfg.head_dims:
        H, B = cfg.model_dim // D, max(1, cfg.tokens // S)
        q, k, v, do = (torch.randn(B, S, H, D, generator=gen).to(device, dtype) for _ in range(4))
        reference = reference_fwd_bwd(attention_reference, [q, k, v], do)
        fwd_flops = 4 * B * H * D * S * S / 2
        key = max(D, 64)  # the kernels' _config: head dims below 64 share 64's blocks
        default = attention_module._CONFIGS[key]
        for kind, candidates in TUNE_CANDIDATES.items():
            for candidate in candidates[:cfg.tune_limit or None]:
                attention_module._CONFIGS[key] = {**default, kind: candidate}
                run_variants(cfg, rows, f"tune {kind}", f"B{B} S{S} H{H} D{D}",
                             [(str(candidate), attention_triton, [q, k, v], do, None)],
                             reference, (fwd_flops, 2.5 * fwd_flops), "TFLOP/s")
        attention_module._CONFIGS[key] = default


def bench_tune_rmsnorm(cfg, rows, device, dtype, gen):
    # each (rows per tile, warps) candidate of each pass, checked then timed (forward and
    # backward both, whichever was varied); TUNE in kernels/rmsnorm.py takes the fastest
    rmsnorm_module = importlib.import_module("kernels.rmsnorm")
    for N in cfg.rms_dims:
        x, w, dy, reference, work = rmsnorm_inputs(cfg, N, device, dtype, gen)
        block = triton_next_power_of_2(N)
        for kind, candidates in TUNE_RMSNORM.items():
            for candidate in candidates[:cfg.tune_limit or None]:
                saved = dict(rmsnorm_module.TUNE)
                rmsnorm_module.TUNE[kind, block] = candidate
                try:
                    run_variants(cfg, rows, f"tune rmsnorm {kind}", f"M{cfg.rms_rows} N{N}",
                                 [(str(candidate), lambda x, w: rms_norm_triton(x, w, 1e-6), [x, w], dy, None)],
                                 reference, work, "TB/s")
                finally:
                    rmsnorm_module.TUNE.clear()
                    rmsnorm_module.TUNE.update(saved)


def triton_next_power_of_2(n):
    return 1 << (n - 1).bit_length()


def best_configs(rows):
    """The fastest checked candidate of each swept pass: {(op, shape): (variant tuple, rate)};
    the forward pass is judged by its forward rate, every other by the backward's."""
    import ast
    best = {}
    for r in rows:
        if not r["op"].startswith("tune") or not r["ok"] or "fwd_ms" not in r:
            continue
        rate = r["fwd_rate"] if r["op"].endswith("fwd") else r["bwd_rate"]
        key = (r["op"], r["shape"])
        if key not in best or rate > best[key][1]:
            best[key] = (ast.literal_eval(r["variant"]), rate)
    return best


def format_row(r):
    err = "n/a" if r["err"] is None else f"{r['err']:.1e}" + ("" if r["ok"] else " FAIL")
    if "fwd_ms" in r:
        timing = (f"| {r['fwd_ms']:8.3f} | {r['fwd_rate']:7.1f} | {r['bwd_ms']:8.3f} | "
                  f"{r['bwd_rate']:7.1f} ")
    else:
        timing = "| " + " | ".join(["-"] * 4) + " "
    return f"| {r['op']} | {r['shape']} | {r['variant']} | {err} {r['note']} {timing}| {r['unit']} |"


HEADER = ("| op | shape | variant | check (rel err) | fwd ms | fwd rate | bwd ms | bwd rate | unit |\n"
          "|---|---|---|---|---|---|---|---|---|")


def main(argv=None):
    cfg = parse_config(BenchConfig, argv, description=__doc__.split("\n")[0])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg.check_only |= device == "cpu" and not cfg.cpu_timing  # no CUDA events; the interpreter is slow
    dtype = getattr(torch, cfg.dtype)
    gen = torch.Generator().manual_seed(cfg.seed)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter, checks only)"
    import triton
    title = (f"{name}, {datetime.date.today()}, torch {torch.__version__}, triton {triton.__version__}, "
             f"{cfg.dtype}, medians of triton.testing.do_bench\n"
             f"command: python benchmarks/bench_kernels.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(title)
    print(HEADER)
    rows = []
    benches = dict(attention=bench_attention, packed=bench_packed, rmsnorm=bench_rmsnorm, tune=bench_tune,
                   tune_rmsnorm=bench_tune_rmsnorm)
    for what, bench in benches.items():
        if cfg.only == what or (cfg.only == "all" and not what.startswith("tune")):
            bench(cfg, rows, device, dtype, gen)
    if cfg.out:
        with open(cfg.out, "w") as f:
            f.write(title + "\n\n" + HEADER + "\n" + "\n".join(format_row(r) for r in rows) + "\n")
    return rows


if __name__ == "__main__":
    rows = main()
    ours = [r for r in rows if r["variant"].startswith("triton")]
    sys.exit(0 if all(r["ok"] for r in ours) else 1)
