"""The GPU check: everything a lent GPU must show, in one command of at most 7 minutes.

    python benchmarks/gpu.py --out $OUT                        # on the GPU (an H200): ~7 min
    python benchmarks/gpu.py --smoke --out /tmp/gpu-smoke      # on a CPU: every part, < 1 min
    python benchmarks/gpu.py --parts kernels,decoding --out $OUT   # rerun some parts

Each part runs in its own process with its own time budget (a crash, a hang or a CUDA error
in one is reported and the next part still runs), in this order:

  correctness  the CUDA cases of tests/test_kernels.py (fp32, bf16); the model's packed forward
               and backward with the kernels against the PyTorch path, both against float64;
               20 steps of train.py's train_step in bf16 with the kernels and without
               (LIMA_KERNELS=torch). Kernel outputs are NaN-poisoned before every launch.
  kernels      the two ceilings (a large bf16 matmul, a device-to-device copy); attention forward
               and backward against torch's SDPA backends, head dim 64 and 128, S 512-4096,
               causal; packed (varlen) against padded SDPA on LIMA's length mix; RMSNorm in TB/s;
               block-size sweeps (benchmarks/bench_kernels.py, every variant checked first).
  training     a ~1B LLaMA (random init) on LIMA-like packed batches through train.py's
               build_model and train_step, bf16: tokens/s, MFU, peak memory against the memory
               plan, with and without activation checkpointing; --cpu_offload through the first
               gradient clip and optimizer step.
  decoding     the 7B shape (random weights, bf16) at batch 1 against the bandwidth bound, eager
               and --compile; 64 prompts with LIMA-like answer lengths (each answer's length set
               by its prompt's last token, bench_decode.forced_answers, for both) against
               transformers' generate.

Under --out: <part>.log (all a part printed), results.md (every table, with device, date and
command), results.json (every row). The summary table is printed last. --smoke runs the same
code on tiny shapes and models on a CPU, the Triton kernels under TRITON_INTERPRET=1; its
numbers mean nothing, it only proves the script runs (tests/test_gpu_script.py).
"""

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import bench_decode  # noqa: E402 - beside this script
import bench_kernels  # noqa: E402
import bench_train_cpu  # noqa: E402
import checkpoint  # noqa: E402
import distributed  # noqa: E402
import generate  # noqa: E402
import kernels  # noqa: E402
import train  # noqa: E402
from model import IGNORE_INDEX, ModelArgs, Transformer, model_args  # noqa: E402

# seconds of GPU time each part may take; the smoke run on a CPU gets its own (generous) ones
BUDGETS = {"correctness": 90, "kernels": 110, "training": 75, "decoding": 145}
SMOKE_BUDGETS = {"correctness": 120, "kernels": 120, "training": 120, "decoding": 120}

# PERF targets (H200 / H100, bf16)
PEAK_BF16 = 989e12  # H100/H200 SXM dense bf16, the vendor's figure: MFU's denominator
TARGETS = dict(attn_fwd=400.0, attn_bwd=300.0, vs_sdpa=1.0, packed_vs_padded=2.0,
               rms_fwd=0.70, rms_bwd=0.60, mfu=0.50, decode_bound=0.70, vs_hf=3.0)


# ---- rows: what every part reports --------------------------------------------------------------

class Recorder:
    """Appends each result to <out>/<part>.rows.jsonl the moment it exists (a part killed at
    its budget keeps what it measured) and prints it."""

    def __init__(self, out, part, smoke):
        self.path = os.path.join(out, f"{part}.rows.jsonl")
        self.part, self.smoke = part, smoke

    def row(self, name, value, unit="", target=None, met=None, note=""):
        """target: a string such as '>= 400'; met: True / False / None (nothing to compare)."""
        if self.smoke:
            met = None  # tiny shapes on a CPU: no target applies
        r = dict(part=self.part, name=name, value=value, unit=unit, target=target, met=met, note=note)
        with open(self.path, "a") as f:
            f.write(json.dumps(r) + "\n")
        shown = f"{value:.4g}" if isinstance(value, float) else value
        print(f"  [{self.part}] {name}: {shown} {unit} {'' if target is None else '(target ' + target + ')'}"
              f" {'' if met is None else ('MET' if met else 'MISSED')} {note}", flush=True)
        return r

    def table(self, title, text):
        with open(self.path, "a") as f:
            f.write(json.dumps(dict(part=self.part, table=title, text=text)) + "\n")

    def failure(self, name, error):
        return self.row(name, "error", target="runs", met=False, note=error)


SELECTED = None  # --checks: substrings of the check names to run (None: every check)
DEADLINE = float("inf")  # time.time() at which the part's process will be killed


def guarded(rec, name, fn, *args, **kwargs):
    """Run one check; an exception becomes a failed row and the part goes on."""
    if SELECTED is not None and not any(key in name for key in SELECTED):
        return None
    t = time.perf_counter()
    print(f"-- {name}", flush=True)
    try:
        return fn(*args, **kwargs)
    except BaseException as e:  # noqa: BLE001 - SystemExit from train.py's helpers included
        traceback.print_exc()
        rec.failure(name, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    finally:
        print(f"-- {name}: {time.perf_counter() - t:.1f} s", flush=True)


# ---- measuring ----------------------------------------------------------------------------------

def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def wall(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def ceilings(device, smoke):
    """(bf16 matmul FLOP/s, copy bytes/s) measured now on random data: the rates every
    compute- and memory-bound figure below is held against."""
    n = 256 if smoke else 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    matmul = 2 * n ** 3 / (bench_kernels.time_ms(lambda: a @ b, device) / 1e3)
    size = (1 << 20) if smoke else (1 << 30)  # 2 GiB of bf16 read + written: far past the L2
    x = torch.randn(size, device=device, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    copy = 2 * x.numel() * x.element_size() / (bench_kernels.time_ms(lambda: y.copy_(x), device) / 1e3)
    return matmul, copy


# ---- part 1: correctness ------------------------------------------------------------------------

def kernel_tests(rec, smoke):
    """tests/test_kernels.py's CUDA cases, run by pytest exactly as the suite runs them, its
    output streamed; stopped short of the part's deadline so a partial count is still reported
    (on a fresh machine every kernel variant compiles first)."""
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "tests/test_kernels.py",
           "-k", "cuda"]
    if importlib.util.find_spec("xdist"):  # on the GPU image: compile the kernels in parallel
        cmd += ["-n", "8"]
    counts = {"PASSED": 0, "FAILED": 0, "ERROR": 0, "SKIPPED": 0}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timer = threading.Timer(max(5.0, DEADLINE - time.time() - 5), proc.kill)
    timer.start()
    last = ""
    for line in proc.stdout:
        print(line, end="", flush=True)
        for word in counts:
            if f" {word}" in line and "::" in line:
                counts[word] += 1
        last = line.strip() or last
    proc.wait()
    stopped = not timer.is_alive()
    timer.cancel()
    passed, failed = counts["PASSED"], counts["FAILED"] + counts["ERROR"]
    rec.row("kernel tests, CUDA cases (fp32 + bf16)", f"{passed} passed, {failed} failed",
            target="all pass", met=failed == 0 and passed > 0 and proc.returncode == 0,
            note=("stopped at the part's deadline; " if stopped else "") + last[:120])


def interpreted_kernel_cases(rec):
    """Smoke only (no CUDA here): a few of the same cases through the Triton interpreter."""
    from tests.test_kernels import ATTENTION_CASES, RMS_NORM_CASES, attention_errors, rms_norm_errors
    worst = max(max(attention_errors(**ATTENTION_CASES["packed_gqa"]).values()),
                max(rms_norm_errors(**RMS_NORM_CASES["rows35_dim100"]).values()))
    rec.row("kernel cases under the interpreter (fp32)", worst, "rel err", "< 1e-4", worst < 1e-4)


def count_triton_calls():
    """Wrap the two Triton launchers so a check can prove the kernels (not the fallback) ran."""
    calls = {"attention": 0, "rms_norm": 0}
    for module, fn_name, key in ((kernels._attention, "attention_triton", "attention"),
                                 (kernels._rmsnorm, "rms_norm_triton", "rms_norm")):
        fn = getattr(module, fn_name)

        def counted(*args, _fn=fn, _key=key, **kwargs):
            calls[_key] += 1
            return _fn(*args, **kwargs)
        setattr(module, fn_name, counted)
    return calls


def small_args(smoke, **overrides):
    if smoke:
        base = dict(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=128, multiple_of=16,
                    max_seq_len=64)
    else:  # head dim 128 and GQA: the kernels' main path
        base = dict(dim=512, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=2048, multiple_of=64,
                    max_seq_len=2048)
    return ModelArgs(**{**base, **overrides})


def packed_forward_backward(model, tokens, targets, cu_seqlens, use_kernels):
    """Logits and every parameter's gradient of the packed summed loss."""
    os.environ["LIMA_KERNELS"] = "triton" if use_kernels else "torch"
    try:
        model.zero_grad(set_to_none=True)
        loss = model(tokens, targets, cu_seqlens=cu_seqlens, reduction="sum")  # the training path
        loss.backward()
        with torch.no_grad():
            logits = model(tokens, cu_seqlens=cu_seqlens)
        return [logits] + [p.grad.detach() for p in model.parameters()]
    finally:
        os.environ.pop("LIMA_KERNELS", None)


def model_check(rec, device, dtype, smoke, calls):
    """Packed forward and backward of a small model: the kernels and the PyTorch path, each in
    `dtype`, against the same model in float64. The kernels pass if their worst relative error
    is at most twice the PyTorch path's (or under a floor), and every value is finite."""
    import copy
    args = small_args(smoke)
    lengths = [5, 1, 19, 7] if smoke else [1, 300, 700, 129, 1000, 1]
    torch.manual_seed(0)
    base = Transformer(args)
    base.init_weights()
    T = sum(lengths)
    tokens = torch.randint(0, args.vocab_size, (1, T), device=device)
    targets = torch.randint(0, args.vocab_size, (1, T), device=device)
    targets[0, ::7] = IGNORE_INDEX
    cu = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
    ref = packed_forward_backward(copy.deepcopy(base).to(device, torch.float64), tokens, targets, cu, False)
    errors = {}
    for use_kernels in (True, False):
        before = dict(calls)
        out = packed_forward_backward(copy.deepcopy(base).to(device, dtype), tokens, targets, cu, use_kernels)
        if use_kernels and (calls["attention"] == before["attention"] or calls["rms_norm"] == before["rms_norm"]):
            raise RuntimeError("the Triton kernels did not run (dispatch fell back to PyTorch)")
        finite = all(torch.isfinite(t).all() for t in out)
        errors[use_kernels] = (max(((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()
                                   for a, b in zip(out, ref)), finite)
    (ours, ours_finite), (torchs, _) = errors[True], errors[False]
    floor = 1e-5 if dtype == torch.float32 else 1e-3
    name = f"model packed fwd+bwd, {str(dtype).removeprefix('torch.')}: worst rel err vs float64"
    rec.row(name, ours, "", f"<= 2x PyTorch path ({torchs:.2e})",
            ours_finite and ours <= max(2 * torchs, floor),
            note=f"logits and {len(ref) - 1} gradients; all finite: {ours_finite}")


def run_steps(cfg, args, split, steps, batch_size, device, before_step=None):
    """train.py's path: build_model (FSDP2, mixed precision), make_optimizer, then train_step
    on its packed micro-batches. Returns per-step (loss, grad_norm, seconds, tokens)."""
    # the vocabulary already holds its EOT (the last id), as a fine-tuned checkpoint's does
    weights = train.source_weights(cfg, args, add_eot=False, eot_id=args.vocab_size - 1)
    model = distributed.build_model(cfg, args, weights, device)
    optimizer = train.make_optimizer(model, cfg)
    supervised = train.supervised_counts(split)
    torch.manual_seed(cfg.seed)  # the same dropout masks for every run of this function
    total_steps = math.ceil(len(split) / batch_size)
    results = []
    for step in range(steps):
        batch = list(range(step * batch_size, (step + 1) * batch_size))
        batch = [i % len(split) for i in batch]
        for group in optimizer.param_groups:
            group["lr"] = train.lr_at(step, total_steps, cfg)
        if before_step is not None:
            before_step(step)
        sync(device)
        t = time.perf_counter()
        plan = train.plan_microbatches(batch, split.lengths, 1, cfg.micro_batch_tokens)
        micro = [train.pack(split, examples, device, 1) for examples in plan[0]]
        loss, grad_norm = train.train_step(model, optimizer, micro, int(supervised[batch].sum()),
                                           cfg.grad_clip)
        sync(device)
        results.append((loss, grad_norm, time.perf_counter() - t, int(sum(split.lengths[i] - 1 for i in batch))))
    del model, optimizer
    return results


def training_equivalence(rec, device, smoke):
    """20 steps of train_step, bf16 on the GPU, with the kernels and with LIMA_KERNELS=torch:
    the same weights, data and dropout masks, so the losses must agree to bf16 tolerance."""
    args = small_args(smoke, resid_dropout=0.3)
    steps = 3 if smoke else 20
    lengths = [9, 30, 17, 4, 22, 11] * 4 if smoke else [120, 900, 37, 1000, 256, 513, 64, 800] * 10
    split = bench_train_cpu.synthetic_split(lengths, args.vocab_size, seed=0)
    cfg = train.TrainConfig(init_from=train.SCRATCH, lr=1e-3, min_lr=1e-4, micro_batch_tokens=64 if smoke else 2048,
                      compute_dtype="auto", resid_dropout=0.3)
    losses = {}
    for use_kernels in (True, False):
        os.environ["LIMA_KERNELS"] = "triton" if use_kernels else "torch"
        try:
            losses[use_kernels] = [r[0] for r in run_steps(cfg, args, split, steps, 4, device)]
        finally:
            os.environ.pop("LIMA_KERNELS", None)
    ours, ref = losses[True], losses[False]
    worst = max(abs(a - b) / abs(b) for a, b in zip(ours, ref))
    dtype = "bf16" if device.type == "cuda" else "fp32"
    tol = 1e-2 if device.type == "cuda" else 1e-4
    rec.row(f"{steps} train steps ({dtype}), kernels vs PyTorch path: worst loss rel diff", worst, "",
            f"< {tol:g}", worst < tol and all(map(math.isfinite, ours)),
            note=f"loss {ours[0]:.4f} -> {ours[-1]:.4f} (PyTorch path {ref[0]:.4f} -> {ref[-1]:.4f})")


def part_correctness(rec, device, smoke):
    calls = count_triton_calls()
    # the model and the training step first: they show most if the budget runs out
    dtypes = [torch.float32] if device.type == "cpu" else [torch.float32, torch.bfloat16]
    for dtype in dtypes:
        guarded(rec, f"model check {dtype}", model_check, rec, device, dtype, smoke, calls)
    guarded(rec, "training equivalence", training_equivalence, rec, device, smoke)
    if device.type == "cpu":
        guarded(rec, "interpreted kernel cases", interpreted_kernel_cases, rec)
    guarded(rec, "kernel tests (pytest -k cuda; on a CPU all skip)", kernel_tests, rec, smoke)


# ---- part 2: kernels ------------------------------------------------------------------------

def part_kernels(rec, device, smoke):
    """Tune on the machine, then measure: the block-size sweeps pick each pass's blocks (set
    here, in this process, and reported so they can be written into the kernels), then the
    tables are measured with them."""
    bench = bench_kernels
    matmul, copy = ceilings(device, smoke)
    rec.row("ceiling: bf16 matmul (8192^3, random)", matmul / 1e12, "TFLOP/s",
            note=f"{matmul / PEAK_BF16:.0%} of the 989 TFLOP/s datasheet figure")
    rec.row("ceiling: device-to-device copy (read + write)", copy / 1e12, "TB/s")
    if smoke:
        common = ["--dtype", "float32", "--no-compile", "--cpu_timing", "--head_dims", "16",
                  "--seqlens", "37", "--tokens", "74", "--model_dim", "32", "--rms_rows", "5",
                  "--rms_dims", "100"]
        main = common + ["--packed_examples", "5", "--packed_max_len", "40", "--packed_head_dim", "16",
                         "--backends", "sdpa-math"]
        sweeps = [common + ["--only", "tune", "--tune_seqlen", "37", "--tune_limit", "1"],
                  common + ["--only", "tune_rmsnorm", "--tune_limit", "1"]]
    else:
        main = ["--backends", "sdpa-flash", "sdpa-cudnn"]
        sweeps = [["--only", "tune", "--head_dims", "64", "128"], ["--only", "tune_rmsnorm"]]
    for argv in sweeps:
        guarded(rec, "sweep " + argv[argv.index("--only") + 1], sweep, rec, bench, argv)
    rows = guarded(rec, "kernel tables", bench.main, main)
    if rows:
        rec.table("kernels, with the blocks the sweeps chose (python benchmarks/bench_kernels.py " + " ".join(main) + ")",
                  bench.HEADER + "\n" + "\n".join(bench.format_row(r) for r in rows))
        judge_kernels(rec, rows, copy, smoke)


def sweep(rec, bench, argv):
    """One sweep; each pass's fastest candidate is reported and put in place for what follows."""
    import importlib
    attention = importlib.import_module("kernels.attention")  # the module, not kernels.attention()
    rmsnorm = importlib.import_module("kernels.rmsnorm")
    rows = bench.main(argv)
    rec.table("sweep (python benchmarks/bench_kernels.py " + " ".join(argv) + ")",
              bench.HEADER + "\n" + "\n".join(bench.format_row(r) for r in rows))
    for (op, shape), (config, rate) in sorted(bench.best_configs(rows).items()):
        kind = op.split()[-1]
        if op.startswith("tune rmsnorm"):
            N = int(shape.split("N")[-1])
            rmsnorm.TUNE[kind, bench.triton_next_power_of_2(N)] = config
            unit = "TB/s"
        else:
            D = int(shape.split("D")[-1])
            attention._CONFIGS[max(D, 64)] = {**attention._CONFIGS[max(D, 64)], kind: config}
            unit = "TFLOP/s"
        rec.row(f"{op}, {shape}: fastest", str(config), note=f"{rate:.1f} {unit} "
                f"({'forward' if kind == 'fwd' else 'whole backward'})")


def judge_kernels(rec, rows, copy, smoke):
    """The bench's rows against the targets."""
    def rate(op, variant, shape_has, key):
        for r in rows:
            if r["op"] == op and r["variant"] == variant and shape_has in r["shape"] and key in r:
                return r[key]
        return None

    bad = [f"{r['op']} {r['shape']} {r['variant']}" for r in rows if r["variant"].startswith("triton") and not r["ok"]]
    rec.row("kernel bench checks (every Triton variant vs fp32 reference)",
            f"{sum(1 for r in rows if r['variant'].startswith('triton')) - len(bad)} ok, {len(bad)} failed",
            target="all ok", met=not bad, note="; ".join(bad)[:300])
    shape = "S37" if smoke else "S2048 H16 D128"
    for key, label, target in (("fwd_rate", "forward", TARGETS["attn_fwd"]),
                               ("bwd_rate", "backward", TARGETS["attn_bwd"])):
        ours = rate("attention", "triton", shape, key)
        if ours is None:
            rec.failure(f"attention {label}, head dim 128, S = 2048", "not measured")
            continue
        rec.row(f"attention {label}, head dim 128, S = 2048, causal", ours, "TFLOP/s",
                f">= {target:.0f}", ours >= target)
        peers = {r["variant"]: r[key] for r in rows
                 if r["op"] == "attention" and shape in r["shape"] and r["variant"].startswith("sdpa") and key in r}
        if peers:
            best = max(peers, key=peers.get)
            rec.row(f"attention {label} vs SDPA's fastest ({best})", ours / peers[best], "x",
                    f">= {TARGETS['vs_sdpa']:.1f}", ours / peers[best] >= TARGETS["vs_sdpa"])
    packed = [r for r in rows if r["op"] == "packed" and "fwd_ms" in r]
    ours = next((r for r in packed if r["variant"] == "triton varlen"), None)
    padded = [r for r in packed if r["variant"].startswith("padded")]
    if ours and padded:
        for key, label in (("fwd_ms", "forward"), ("bwd_ms", "backward")):
            best = min(padded, key=lambda r: r[key])
            speedup = best[key] / ours[key]
            rec.row(f"packed {label} vs padded ({best['variant']})", speedup, "x",
                    f">= {TARGETS['packed_vs_padded']:.0f}", speedup >= TARGETS["packed_vs_padded"])
    for r in rows:
        if r["op"] == "rmsnorm" and r["variant"] == "triton" and "fwd_rate" in r:
            for key, label, target in (("fwd_rate", "forward", TARGETS["rms_fwd"]),
                                       ("bwd_rate", "backward", TARGETS["rms_bwd"])):
                share = r[key] * 1e12 / copy
                rec.row(f"RMSNorm {label} {r['shape']}", r[key], "TB/s", f">= {target:.0%} of copy",
                        share >= target, note=f"{share:.0%} of the measured copy rate")


# ---- part 3: training -----------------------------------------------------------------------

def one_billion(smoke):
    """~1.2B parameters, LLaMA proportions, head dim 128 (LLaMA 1/2's), 32k vocabulary."""
    if smoke:
        return ModelArgs(dim=64, n_layers=2, n_heads=2, vocab_size=256, multiple_of=32, max_seq_len=128)
    return ModelArgs(dim=2048, n_layers=20, n_heads=16, vocab_size=32001, multiple_of=256, max_seq_len=2048)


def part_training(rec, device, smoke):
    """Fine-tuning as a user runs it: a base checkpoint on disk (made here once, random
    weights, bf16 as LLaMA ships), loaded by train.py's build_model, trained by train_step."""
    args = one_billion(smoke)
    with torch.device("meta"):
        n_params = Transformer(args).num_params()
    batch = 4 if smoke else 32  # LIMA §3: 32 examples per step
    gen = torch.Generator().manual_seed(0)
    lengths = bench_kernels.lima_lengths(batch * 8, args.max_seq_len, gen)
    split = bench_train_cpu.synthetic_split(lengths, args.vocab_size, seed=1)
    matmul, _ = ceilings(device, smoke)
    budget = 64 if smoke else 8192
    configs = [("packed", dict()),
               ("packed, micro-batches of 4x the tokens", dict(micro_batch_tokens=4 * budget)),
               ("packed, activation checkpointing", dict(activation_checkpointing=True)),
               ("--cpu_offload (+ checkpointing), first steps", dict(cpu_offload=True, activation_checkpointing=True))]
    with tempfile.TemporaryDirectory(dir=shm_or_tmp(2 * n_params)) as tmp:
        base = os.path.join(tmp, "base")
        torch.manual_seed(0)
        with torch.device(device):
            model = Transformer(args)
        model.init_weights()
        checkpoint.save_model(model.to(torch.bfloat16 if device.type == "cuda" else torch.float32), base)
        del model
        for name, options in configs:
            if options.get("cpu_offload") and device.type != "cuda":
                rec.row(name, "skipped", note="--cpu_offload needs CUDA (train.py refuses it on CPU)")
                continue
            cfg = train.TrainConfig(init_from=base, resid_dropout=0.3, micro_batch_tokens=budget)
            cfg = train.TrainConfig(**{**cfg.__dict__, **options})
            name = "train " + name + ", " + str(compute_dtype_name(cfg, device))
            guarded(rec, name, train_config_run, rec, name, cfg, args, split, batch, device, n_params, matmul)
        cfg = train.TrainConfig(init_from=base, resid_dropout=0.3, micro_batch_tokens=budget)
        guarded(rec, "train profile of one step", profile_step, rec, cfg, args, split, batch, device)


def compute_dtype_name(cfg, device):
    return str(distributed.compute_dtype(cfg, device)).removeprefix("torch.")


def shm_or_tmp(size):
    """Memory-backed /dev/shm for a temporary checkpoint when it has room, else the temp dir."""
    import shutil
    ok = os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > 2 * size
    return "/dev/shm" if ok else None


def profile_step(rec, cfg, args, split, batch, device):
    """torch.profiler over one step after a warm-up one: where the time goes, GPU and CPU."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    state = {}

    def around(step):
        if step == 1:
            state["prof"] = profile(activities=activities)
            state["prof"].__enter__()
    results = run_steps(cfg, args, split, 2, batch, device, before_step=around)
    prof = state["prof"]
    prof.__exit__(None, None, None)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=25)
    print(table, flush=True)
    rec.table(f"profile of one training step ({results[1][2]:.2f} s, {results[1][3]} tokens), "
              f"sorted by {key}", "```\n" + table + "\n```")
    # GPU time: the device-side events, less the annotation ranges that span many kernels
    # (the profiler table's "Self CUDA time total" counts the same way)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and not getattr(e, "is_user_annotation", False)]
    gpu = sum(e.device_time for e in kernels) / 1e6  # us -> s
    rec.row("train profile: GPU busy / step time", gpu / results[1][2], "",
            note=f"kernels {gpu:.3f} s of a {results[1][2]:.3f} s step (the rest: the GPU waits on Python)")


def train_config_run(rec, name, cfg, args, split, batch, device, n_params, matmul):
    import gc
    offload = cfg.cpu_offload
    warmup, timed = (1, 1) if offload or device.type != "cuda" else (2, 4)
    gc.collect()  # FSDP modules hold reference cycles: free the previous run's model first
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    plan = distributed.memory_plan(cfg, args, 1, device, args.max_seq_len)
    results = run_steps(cfg, args, split, warmup + timed, batch, device)
    losses = [r[0] for r in results]
    if not all(map(math.isfinite, losses)):
        raise RuntimeError(f"non-finite loss {losses}")
    seconds = sum(r[2] for r in results[warmup:])
    tokens = sum(r[3] for r in results[warmup:])
    # train.py's MFU: 6 N per token for the matmuls plus causal attention, 6 * L * dim * len^2
    # per example (forward + backward); recomputation under checkpointing is not counted
    lengths = split.lengths
    attn = 0
    for step in range(warmup, warmup + timed):
        batch_ids = [i % len(split) for i in range(step * batch, (step + 1) * batch)]
        attn += sum(6 * args.n_layers * args.dim * int(lengths[i]) ** 2 for i in batch_ids)
    flops = 6 * n_params * tokens + attn
    rate = flops / seconds
    rec.row(f"{name}: tokens/s", tokens / seconds, "tok/s",
            note=f"{n_params / 1e9:.2f}B params, {timed} timed steps of {tokens // timed} tokens, "
                 f"losses {losses[0]:.3f} .. {losses[-1]:.3f}, grad norm {results[-1][1]:.3f}")
    if offload:
        rec.row(f"{name}: clip + optimizer step ran", "yes", target="runs", met=True,
                note=f"{seconds / timed:.1f} s per step")
    else:
        rec.row(f"{name}: MFU vs 989 TFLOP/s", rate / PEAK_BF16, "", f">= {TARGETS['mfu']:.0%}",
                rate / PEAK_BF16 >= TARGETS["mfu"], note=f"{rate / matmul:.0%} of the measured matmul rate")
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        rec.row(f"{name}: peak GPU memory / memory plan", peak / plan["total"], "x",
                "<= 1.0", peak <= plan["total"],
                note=f"{peak / 2**30:.1f} GiB measured, {plan['total'] / 2**30:.1f} GiB planned")


# ---- part 4: decoding -----------------------------------------------------------------------

def build_decoder(smoke, device):
    args = (ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=512, multiple_of=32, max_seq_len=256)
            if smoke else model_args("7B", vocab_size=32001))
    dtype = torch.float32 if smoke else torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(args)
    model.init_weights()
    return model.to(dtype).eval(), dtype


def decode_rate(model, device, new_tokens, compile, repeats):
    """Batch-1 decode tokens/s = (N - 1) / (time(N new tokens) - time(1)): the prefill and
    the first token cancel out. Median of `repeats`."""
    prompt = [[1] + torch.randint(3, model.args.vocab_size - 1, (63,)).tolist()]

    def run(n):
        return generate.generate(model, prompt, stop_ids=(), max_new_tokens=n, temperature=0.7,
                               top_p=0.9, repetition_penalty=1.2, compile=compile, keep_cache=compile,
                               generator=torch.Generator(device).manual_seed(0))
    first, _ = wall(lambda: run(2), device)  # warm up (and compile)
    rates = []
    for _ in range(repeats):
        t1, _ = wall(lambda: run(1), device)
        tn, _ = wall(lambda: run(new_tokens), device)
        rates.append((new_tokens - 1) / (tn - t1))
    return statistics.median(rates), first


def ours_batch(model, prompts, lengths, eot, device):
    """generate.generate on the whole batch, each answer's length forced by its prompt's last
    token (bench_decode.forced_answers)."""
    with bench_decode.forced_answers(model, eot):
        return generate.generate(model, prompts, stop_ids=(eot,), max_new_tokens=max(lengths) + 1,
                                 temperature=0.7, top_p=0.9, repetition_penalty=1.2, penalize_prompt=True,
                                 generator=torch.Generator(device).manual_seed(0))


def theirs_batch(hf, prompts, lengths, eot, device):
    """transformers' generate, same settings (its penalty covers the prompt: penalize_prompt
    above), prompts left-padded, the same answers forced through a logits processor."""
    return bench_decode.transformers_batches(hf, prompts, eot, len(prompts), device)


def to_hf(model, dtype, device):
    """Our weights -> transformers' LlamaForCausalLM through the Hugging Face checkpoint
    layout (checkpoint.py), in memory-backed /dev/shm when there is one."""
    from transformers import LlamaForCausalLM
    with tempfile.TemporaryDirectory(dir=shm_or_tmp(model.num_params() * dtype.itemsize)) as tmp:
        checkpoint.save_model(model, f"{tmp}/hf")
        hf = LlamaForCausalLM.from_pretrained(f"{tmp}/hf", dtype=dtype)
    return hf.to(device).eval()


def part_decoding(rec, device, smoke):
    _, copy = ceilings(device, smoke)
    model, dtype = build_decoder(smoke, device)
    # batch 1: every step reads every weight once, except the embedding table (one row)
    weight_bytes = (model.num_params() - model.tok_embeddings.weight.numel()) * dtype.itemsize
    bound = copy / weight_bytes
    new_tokens, repeats = (8, 1) if smoke else (128, 2)

    def batch1(compile):
        rate, first = decode_rate(model, device, new_tokens, compile, repeats)
        label = "--compile" if compile else "eager"
        rec.row(f"decode batch 1, {label}: tokens/s", rate, "tok/s",
                f">= {TARGETS['decode_bound']:.0%} of bound", rate / bound >= TARGETS["decode_bound"],
                note=f"{rate / bound:.0%} of {bound:.0f} tok/s (copy rate / {weight_bytes / 1e9:.1f} GB of "
                     f"weights); first call {first:.1f} s")
    guarded(rec, "decode batch 1, eager", batch1, False)

    def versus_transformers():
        n, max_answer = (8, 24) if smoke else (64, 512)
        gen = torch.Generator().manual_seed(2)
        vocab = model.args.vocab_size
        eot = vocab - 1
        prompts, answers = bench_decode.countdown_prompts(n, 64 if smoke else 256, max_answer, vocab, gen)
        prompt_lens = [len(p) for p in prompts]
        hf = to_hf(model, dtype, device)
        total = sum(answers) + n  # every answer's tokens and its EOT
        for who, fn in (("transformers generate", lambda: theirs_batch(hf, prompts, answers, eot, device)),
                        ("generate", lambda: ours_batch(model, prompts, answers, eot, device))):
            short = [p[:-1] + [bench_decode.COUNTDOWN + k] for p, k in zip(prompts[:2], (2, 3))]
            fn_small = (lambda: theirs_batch(hf, short, [2, 3], eot, device)) if who.startswith("tr") \
                else (lambda: ours_batch(model, short, [2, 3], eot, device))
            wall(fn_small, device)  # warm up
            seconds, out = wall(fn, device)
            got = [len(r) for r in out]  # each answer without its EOT
            if got != answers:
                raise RuntimeError(f"{who}: answer lengths {got[:8]}... not the forced {answers[:8]}...")
            times[who] = seconds
            rec.row(f"{n} prompts, LIMA-like answers (max {max_answer}): {who}", total / seconds, "tok/s",
                    note=f"{seconds:.1f} s for {total} tokens, prompts {min(prompt_lens)}-{max(prompt_lens)} tokens")
        speedup = times["transformers generate"] / times["generate"]
        rec.row(f"{n} prompts: generate vs transformers generate", speedup, "x",
                f">= {TARGETS['vs_hf']:.0f}", speedup >= TARGETS["vs_hf"])
    times = {}
    guarded(rec, "batch vs transformers", versus_transformers)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    guarded(rec, "decode batch 1, --compile", batch1, True)


# ---- the driver -----------------------------------------------------------------------------

PARTS = {"correctness": part_correctness, "kernels": part_kernels, "training": part_training,
         "decoding": part_decoding}


def run_part(name, out, smoke, checks, budget):
    """In the child process: one part, its rows appended as they come."""
    global SELECTED, DEADLINE
    SELECTED = checks.split(",") if checks else None
    DEADLINE = time.time() + budget
    rec = Recorder(out, name, smoke)
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    if name in ("correctness", "training"):
        device, _, _ = distributed.setup_distributed(device.type)
    print(f"{name} on {device}: torch {torch.__version__}", flush=True)
    try:
        PARTS[name](rec, device, smoke)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_child(name, out, smoke, budget, checks):
    """Start a part in its own process group, stream its output to <part>.log and ours, kill
    it at its budget. Returns (seconds, exit status or 'timeout')."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LIMA_KERNELS")}
    env["PYTHONUNBUFFERED"] = "1"
    if smoke:
        env["TRITON_INTERPRET"] = "1"  # the real kernels, on CPU tensors
        env.setdefault("OMP_NUM_THREADS", "2")
    if name == "correctness":
        env["LIMA_KERNELS_POISON"] = "1"  # every kernel output NaN-filled before its launch
    cmd = [sys.executable, os.path.abspath(__file__), "--part", name, "--out", out] + (["--smoke"] if smoke else [])
    cmd += (["--checks", checks] if checks else []) + ["--budget_s", str(budget)]
    t0 = time.perf_counter()
    with open(os.path.join(out, f"{name}.log"), "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        timed_out = threading.Event()

        def kill():
            timed_out.set()
            os.killpg(proc.pid, signal.SIGKILL)
        timer = threading.Timer(budget, kill)
        timer.start()
        for line in proc.stdout:
            log.write(line)
            log.flush()
            print(f"[{name}] {line}", end="", flush=True)
        proc.wait()
        timer.cancel()
    status = "timeout" if timed_out.is_set() else proc.returncode
    return time.perf_counter() - t0, status


def environment():
    info = dict(date=str(datetime.date.today()), torch=torch.__version__, python=platform.python_version(),
                device=torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.machine()})")
    for pkg in ("triton", "transformers"):
        try:
            info[pkg] = __import__(pkg).__version__
        except ImportError:
            info[pkg] = "not installed"
    return info


def summarise(out, parts, statuses, command, budgets):
    rows, tables = [], []
    for name in parts:
        path = os.path.join(out, f"{name}.rows.jsonl")
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    r = json.loads(line)
                    (tables if "table" in r else rows).append(r)
            os.remove(path)
        seconds, status = statuses[name]
        ok = status == 0
        rows.append(dict(part=name, name="part finished within its budget", value=f"{seconds:.0f} s",
                         unit="", target=f"<= {budgets[name]} s, exit 0",
                         met=ok, note="" if ok else f"exit status: {status}"))
    info = environment()
    smoke = "--smoke" in command
    head = (f"# GPU check: {info['device']}, {info['date']}\n\n"
            f"torch {info['torch']}, triton {info['triton']}, transformers {info['transformers']}, "
            f"Python {info['python']}{' (SMOKE RUN on a CPU: the numbers mean nothing)' if smoke else ''}\n\n"
            f"command: `{command}`\n")

    def fmt(r):
        value = f"{r['value']:.4g}" if isinstance(r["value"], float) else str(r["value"])
        met = {True: "yes", False: "**NO**", None: ""}[r["met"]]
        return f"| {r['part']} | {r['name']} | {value} {r['unit']} | {r['target'] or ''} | {met} | {r['note']} |"
    summary = ("| part | check | measured | target | met | note |\n|---|---|---|---|---|---|\n"
               + "\n".join(fmt(r) for r in rows))
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(head + "\n## Summary\n\n" + summary + "\n")
        for t in tables:
            f.write(f"\n## {t['part']}: {t['table']}\n\n{t['text']}\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(dict(environment=info, command=command, rows=rows, tables=tables), f, indent=1)
    print("\n" + head + "\n" + summary)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for the logs and result tables")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {','.join(PARTS)}")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on a CPU (the interpreter): proves the script runs")
    p.add_argument("--checks", default="", help="comma-separated substrings of check names: run only "
                   "those checks (a rerun of what failed), e.g. 'kernel tests,--cpu_offload,--compile'")
    p.add_argument("--budget", action="append", default=[], metavar="PART=SECONDS",
                   help="another time budget for a part (reruns of a few checks)")
    p.add_argument("--part", help=argparse.SUPPRESS)  # the child process of one part
    p.add_argument("--budget_s", type=float, default=float("inf"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    if a.part:
        return run_part(a.part, a.out, a.smoke, a.checks, a.budget_s)
    parts = [x for x in a.parts.split(",") if x]
    unknown = [x for x in parts if x not in PARTS]
    if unknown:
        raise SystemExit(f"--parts: unknown {unknown}; choose from {','.join(PARTS)}")
    if not a.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run this on the GPU machine, or add --smoke for the CPU dry run")
    budgets = dict(SMOKE_BUDGETS if a.smoke else BUDGETS)
    for item in a.budget:
        part, _, seconds = item.partition("=")
        if part not in PARTS or not seconds.isdigit():
            raise SystemExit(f"--budget {item}: expected PART=SECONDS with PART one of {','.join(PARTS)}")
        budgets[part] = int(seconds)
    total = sum(budgets[x] for x in parts)
    print(f"GPU check: {', '.join(f'{x} {budgets[x]} s' for x in parts)}: at most {total} s "
          f"({total / 60:.1f} min){' of CPU (smoke)' if a.smoke else ' of GPU time'}", flush=True)
    command = "python benchmarks/gpu.py " + " ".join(sys.argv[1:] if argv is None else argv)
    statuses = {}
    for name in parts:
        statuses[name] = run_child(name, a.out, a.smoke, budgets[name], a.checks)
    rows = summarise(a.out, parts, statuses, command, budgets)
    return 0 if all(r["met"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
