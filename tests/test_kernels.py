"""Triton kernels against the PyTorch references: forward and every gradient, in float64.

Triton's interpreter (TRITON_INTERPRET=1) must be on before triton is imported, and the rest of
the suite, in this same pytest process, must not run through it. So the CPU cases run in one
child process, this file run as a script, which prints every case's errors as JSON; each test
below checks one case. Outputs are NaN-poisoned there (LIMA_KERNELS_POISON=1), so an element
no kernel wrote fails. With a GPU the same cases, and a few longer ones, also run in-process.
"""

import contextlib
import io
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

ATTENTION_CASES = {
    "T1": dict(B=1, T=1, H=2, H_kv=2, D=16),
    "T37_gqa": dict(B=2, T=37, H=4, H_kv=2, D=16),
    "T100_mqa": dict(B=1, T=100, H=4, H_kv=1, D=32),
    "T64_d64": dict(B=1, T=64, H=2, H_kv=1, D=64),
    "T50_d128": dict(B=1, T=50, H=2, H_kv=1, D=128),  # dk/dv: the one-loop path of head dim 128
    # packed: B == 1, T = sum(lengths); examples of length 1 at both ends of a block boundary
    "packed_gqa": dict(B=1, lengths=[1, 38, 1, 60], H=4, H_kv=2, D=16),
    "packed_mqa": dict(B=1, lengths=[37, 1, 23, 39], H=4, H_kv=1, D=32),
    # q, k, v as views into one fused qkv projection, the way the model makes them
    "strided": dict(B=2, T=45, H=4, H_kv=2, D=16, fused_qkv=True),
}
# Scores of a hundred and more (q and k scaled by 12): exp of such a score overflows fp32 unless
# the running maximum is subtracted first, as the online softmax does, forward and backward;
# at unit scale a kernel that skipped it would pass. On a GPU in fp32 only: in bf16 these near
# one-hot rows make dS a difference of nearly equal terms, O's rounding included (not measured).
LARGE_SCORE_CASES = {
    "large_scores_gqa": dict(B=2, T=45, H=4, H_kv=2, D=16, scale=12.0),
    "large_scores_packed": dict(B=1, lengths=[20, 1, 30, 13], H=2, H_kv=1, D=32, scale=12.0),
}
# GPU only: long enough to cross the GPU block sizes (128), head dims of the real models
CUDA_ATTENTION_CASES = {
    "T1000_d128_gqa": dict(B=2, T=1000, H=4, H_kv=2, D=128),
    "packed_d64": dict(B=1, lengths=[1, 300, 700, 129, 1000, 1], H=4, H_kv=1, D=64),
    "packed_d128_strided": dict(B=1, lengths=[517, 1, 2048, 64], H=4, H_kv=2, D=128, fused_qkv=True),
}
RMS_NORM_CASES = {
    "rows35_dim100": dict(shape=(5, 7, 100)),
    "row1_dim16": dict(shape=(1, 16)),
    "dim16384": dict(shape=(3, 16384)),
    "strided": dict(shape=(6, 48), strided=True),  # x: a slice of a wider tensor
    # where eps is a large part of mean(x^2) + eps: small activations (LLaMA's eps), a large eps
    "small_x_eps1e-5": dict(shape=(7, 64), scale=1e-3, eps=1e-5),
    "tiny_x_eps1e-6": dict(shape=(5, 100), scale=1e-4, eps=1e-6),
    "large_eps": dict(shape=(6, 48), eps=0.5),
}
# GPU only: enough rows that each backward program walks several tiles, with a ragged last one
CUDA_RMS_NORM_CASES = {
    "rows4133_dim4096": dict(shape=(4133, 4096)),
    "rows1000_dim8192": dict(shape=(1000, 8192)),
}
# the bench's own correctness path, on shapes the interpreter runs in a second
TINY_BENCH = ["--check_only", "--no-compile", "--dtype", "float32", "--seqlens", "37",
              "--head_dims", "16", "--tokens", "74", "--model_dim", "32", "--packed_examples", "5",
              "--packed_max_len", "40", "--packed_head_dim", "16", "--rms_rows", "5", "--rms_dims", "100"]


def rel_err(out, ref):
    out, ref = out.double().cpu(), ref.double().cpu()
    ref_norm = ref.norm()  # some true gradients are exactly 0 (T == 1: dq, dk)
    return ((out - ref).norm() / ref_norm if ref_norm > 0 else out.norm()).item()


def attention_errors(B, H, H_kv, D, T=None, lengths=None, fused_qkv=False, scale=1.0,
                     device="cpu", dtype=torch.float32):
    from kernels.attention import attention_reference, attention_triton
    g = torch.Generator().manual_seed(0)
    T = sum(lengths) if lengths else T
    cu_seqlens = torch.tensor([0, *lengths]).cumsum(0).int() if lengths else None
    sizes = [H * D, H_kv * D, H_kv * D]
    qkv = torch.randn(B, T, sum(sizes), generator=g)
    qkv[..., :H * D + H_kv * D] *= scale  # q and k: the scores scale by scale^2
    qkv = qkv.to(dtype)  # rounded once: both sides see it
    do = torch.randn(B, T, H, D, generator=g).to(dtype)

    def run(attention, qkv, do, cu_seqlens):
        if fused_qkv:  # one leaf, three strided views
            qkv = qkv.requires_grad_()
            q, k, v = (t.view(B, T, -1, D) for t in qkv.split(sizes, dim=-1))
        else:
            q, k, v = (t.reshape(B, T, -1, D).contiguous().requires_grad_() for t in qkv.split(sizes, dim=-1))
        out = attention(q, k, v, cu_seqlens)
        return [out, *torch.autograd.grad(out, (q, k, v), do)]

    ours = run(attention_triton, qkv.to(device), do.to(device),
               cu_seqlens.to(device) if lengths else None)
    ref = run(attention_reference, qkv.double(), do.double(), cu_seqlens)
    return {name: rel_err(a, b) for name, a, b in zip(["out", "dq", "dk", "dv"], ours, ref)}


def rms_norm_errors(shape, strided=False, scale=1.0, eps=1e-6, device="cpu", dtype=torch.float32):
    from kernels.rmsnorm import rms_norm_reference, rms_norm_triton
    g = torch.Generator().manual_seed(0)
    N = shape[-1]
    x = (scale * torch.randn(*shape[:-1], N + 5 if strided else N, generator=g)).to(dtype)
    w = (1 + 0.1 * torch.randn(N, generator=g)).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)

    def run(rms_norm, x, w, dy):
        x, w = x.requires_grad_(), w.requires_grad_()
        y = rms_norm(x[..., :N], w, eps)
        return [y, *torch.autograd.grad(y, (x, w), dy)]

    ours = run(rms_norm_triton, x.to(device), w.to(device), dy.to(device))
    ref = run(rms_norm_reference, x.double(), w.double(), dy.double())
    return {name: rel_err(a, b) for name, a, b in zip(["out", "dx", "dweight"], ours, ref)}


def dispatch_report():
    # which implementation kernels.attention / kernels.rms_norm picked, by the autograd node
    import kernels
    q = torch.randn(1, 8, 2, 16, requires_grad=True)
    x, w = torch.randn(3, 16, requires_grad=True), torch.ones(16)

    def picked():
        return dict(attention=type(kernels.attention(q, q, q).grad_fn).__name__,
                    rms_norm=type(kernels.rms_norm(x, w, 1e-6).grad_fn).__name__,
                    float64=type(kernels.attention(q.double(), q.double(), q.double()).grad_fn).__name__,
                    head_dim_8=type(kernels.attention(q[..., :8], q[..., :8], q[..., :8]).grad_fn).__name__)
    report = dict(default=picked())
    os.environ["LIMA_KERNELS"] = "torch"
    report["forced_torch"] = picked()
    del os.environ["LIMA_KERNELS"]
    return report


def compiled_errors():
    # torch.compile must see each launcher as one opaque op: a full graph, no breaks, same grads
    from kernels.attention import attention_reference, attention_triton
    from kernels.rmsnorm import rms_norm_reference, rms_norm_triton

    def loss(attention, rms_norm, x, w, q, k, v, cu_seqlens):
        return rms_norm(x, w, 1e-6).square().sum() + attention(q, k, v, cu_seqlens).square().sum()
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(*shape, generator=g, dtype=torch.float64)
              for shape in [(4, 32), (32,), (1, 20, 4, 16), (1, 20, 2, 16), (1, 20, 2, 16)]]
    cu_seqlens = torch.tensor([0, 7, 20], dtype=torch.int32)
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    ours = [t.float().requires_grad_() for t in inputs]
    ref = [t.requires_grad_() for t in inputs]
    grads = torch.autograd.grad(compiled(attention_triton, rms_norm_triton, *ours, cu_seqlens), ours)
    ref_grads = torch.autograd.grad(loss(attention_reference, rms_norm_reference, *ref, cu_seqlens), ref)
    return {name: rel_err(a, b) for name, a, b in zip(["dx", "dweight", "dq", "dk", "dv"], grads, ref_grads)}


def interpreted_results():
    cases = {f"attention/{n}": (attention_errors, c) for n, c in (ATTENTION_CASES | LARGE_SCORE_CASES).items()}
    cases |= {f"rms_norm/{n}": (rms_norm_errors, c) for n, c in RMS_NORM_CASES.items()}
    cases["compiled"] = (compiled_errors, {})
    results = {}
    for name, (fn, case) in cases.items():
        try:
            results[name] = fn(**case)
        except Exception:  # one broken case must not hide the others
            results[name] = traceback.format_exc()
    results["dispatch"] = dispatch_report()
    import bench_kernels as bench
    with contextlib.redirect_stdout(io.StringIO()):
        rows = bench.main(TINY_BENCH)
    results["bench"] = {f"{r['op']} {r['variant']}": r["err"] for r in rows}
    return results


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "LIMA_KERNELS_POISON": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")])}
    env.pop("LIMA_KERNELS", None)
    proc = subprocess.run([sys.executable, __file__], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.splitlines()[-1])


def assert_close(errors, tol):
    assert isinstance(errors, dict), errors  # else: the child's traceback
    assert all(err < tol for err in errors.values()), errors  # NaN (unwritten) fails too


@pytest.mark.parametrize("name", [*ATTENTION_CASES, *LARGE_SCORE_CASES])
def test_attention_interpreted(interpreted, name):
    assert_close(interpreted[f"attention/{name}"], 1e-4)


@pytest.mark.parametrize("name", RMS_NORM_CASES)
def test_rms_norm_interpreted(interpreted, name):
    assert_close(interpreted[f"rms_norm/{name}"], 1e-4)


def test_torch_compile_fullgraph_interpreted(interpreted):
    assert_close(interpreted["compiled"], 1e-4)


def test_dispatch_interpreted(interpreted):
    report = interpreted["dispatch"]
    assert report["default"] == dict(attention="FlashAttentionBackward", rms_norm="RMSNormFunctionBackward",
                                     float64="TransposeBackward0", head_dim_8="TransposeBackward0")
    assert "Flash" not in report["forced_torch"]["attention"]
    assert "RMSNormFunction" not in report["forced_torch"]["rms_norm"]


def test_bench_checks_interpreted(interpreted):
    checked = {k: err for k, err in interpreted["bench"].items() if err is not None}
    assert {"attention triton", "packed triton varlen", "rmsnorm triton", "packed padded sdpa-math"} <= set(checked)
    assert all(err < 1e-4 for err in checked.values()), checked


def test_reference_without_interpreter_or_gpu():
    # in this process: CPU tensors, no interpreter -> exactly the references
    import kernels
    from kernels.attention import attention_reference
    from kernels.rmsnorm import rms_norm_reference
    if kernels._attention.INTERPRET:
        pytest.skip("this process runs under TRITON_INTERPRET")
    q, k = torch.randn(1, 9, 4, 16), torch.randn(1, 9, 2, 16)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    assert torch.equal(kernels.attention(q, k, k, cu), attention_reference(q, k, k, cu))
    x, w = torch.randn(3, 16), torch.randn(16)
    assert torch.equal(kernels.rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))


def test_import_without_triton():
    code = ("import sys; sys.modules['triton'] = None; import torch, kernels; "
            "from kernels.attention import attention_reference; q = torch.randn(1, 5, 2, 16); "
            "assert torch.equal(kernels.attention(q, q, q), attention_reference(q, q, q)); "
            "x = torch.randn(2, 8); kernels.rms_norm(x, torch.ones(8), 1e-6); print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=300)
    assert proc.stdout.strip() == "ok", proc.stderr[-2000:]


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
DTYPES = pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)],
                                 ids=["fp32", "bf16"])


@cuda
@DTYPES
@pytest.mark.parametrize("name", [*ATTENTION_CASES, *CUDA_ATTENTION_CASES])
def test_attention_cuda(name, dtype, tol, monkeypatch):
    monkeypatch.setenv("LIMA_KERNELS_POISON", "1")
    case = ATTENTION_CASES.get(name) or CUDA_ATTENTION_CASES[name]
    assert_close(attention_errors(**case, device="cuda", dtype=dtype), tol)


@cuda
@pytest.mark.parametrize("name", LARGE_SCORE_CASES)
def test_attention_large_scores_cuda(name, monkeypatch):
    monkeypatch.setenv("LIMA_KERNELS_POISON", "1")
    assert_close(attention_errors(**LARGE_SCORE_CASES[name], device="cuda", dtype=torch.float32), 1e-4)


@cuda
@DTYPES
@pytest.mark.parametrize("name", [*RMS_NORM_CASES, *CUDA_RMS_NORM_CASES])
def test_rms_norm_cuda(name, dtype, tol, monkeypatch):
    monkeypatch.setenv("LIMA_KERNELS_POISON", "1")
    case = RMS_NORM_CASES.get(name) or CUDA_RMS_NORM_CASES[name]
    assert_close(rms_norm_errors(**case, device="cuda", dtype=dtype), tol)


if __name__ == "__main__":  # the child process of the `interpreted` fixture
    print(json.dumps(interpreted_results()))
