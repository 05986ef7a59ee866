"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight  (LLaMA, LIMA.md §2).

Statistics are computed in fp32 and the normalised value is cast back to the input dtype
before it is multiplied by the weight, exactly as Meta's reference does.
"""

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # no Triton here: kernels/__init__.py only ever calls the reference
    from types import SimpleNamespace
    triton, tl = SimpleNamespace(jit=lambda fn: fn), SimpleNamespace(constexpr=None)
    HAS_TRITON = False


def rms_norm_reference(x, weight, eps):
    # x: (..., dim), weight: (dim,)
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return y.type_as(x) * weight


# ----------------------------------------------------------------------------------------------
# Triton: one program per row forward; backward with per-program fp32 partial sums of dweight.

# triton.jit reads TRITON_INTERPRET when it decorates, i.e. now: the kernels below run on CPU
# tensors (numpy) only if it was set before this module was imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
MAX_DIM = 65536  # a whole row lives in registers; 64K fp32 across 32 warps is the ceiling


@triton.jit
def _rms_norm_fwd_kernel(X, W, Y, RSTD, stride_x, stride_y, N, eps, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / N + eps)
    w = tl.load(W + cols, mask=mask, other=0.0)
    # round to x's dtype first, then multiply in the output dtype: the reference's order
    y = (xf * rstd).to(x.dtype).to(Y.dtype.element_ty) * w.to(Y.dtype.element_ty)
    tl.store(Y + row * stride_y + cols, y, mask=mask)
    tl.store(RSTD + row, rstd)


# Backward, per row, with r = rstd = (mean(x^2) + eps)^-1/2, n = x * r, y = n * w:
#   dn = dy * w
#   dx = r * (dn - n * mean(dn * n))          (dr/dx_j = -r^3 x_j / N)
#   dw = sum over rows of dy * n              (n rounded to x's dtype, as in the forward)
# Each program owns a contiguous chunk of rows and keeps its dw partial sum in fp32 registers;
# the (n_programs, N) partials are summed once afterwards: no atomics, no contention.
@triton.jit
def _rms_norm_bwd_kernel(DY, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_x, stride_dx,
                         M, N, rows_per_program, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = pid * rows_per_program
    X += row_start.to(tl.int64) * stride_x  # 64-bit offsets once; small ones inside the loop
    DY += row_start.to(tl.int64) * stride_dy
    DX += row_start.to(tl.int64) * stride_dx
    RSTD += row_start
    for i in range(0, tl.minimum(rows_per_program, M - row_start)):
        x = tl.load(X + i * stride_x + cols, mask=mask, other=0.0)
        dy = tl.load(DY + i * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + i)
        n = x.to(tl.float32) * rstd
        dn = dy * w
        dx = rstd * (dn - n * (tl.sum(dn * n, axis=0) / N))
        tl.store(DX + i * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * n.to(x.dtype).to(tl.float32)
    tl.store(DW_PARTIAL + pid * N + cols, dw, mask=mask)


def _empty(shape, dtype, device):
    # LIMA_KERNELS_POISON=1 (the tests): NaN-fill every output so an element no kernel wrote fails
    out = torch.empty(shape, dtype=dtype, device=device)
    return out.fill_(float("nan")) if os.environ.get("LIMA_KERNELS_POISON") == "1" else out


def _row_config(N):
    BLOCK_N = triton.next_power_of_2(N)
    assert BLOCK_N <= MAX_DIM, f"rms_norm: rows of {N} do not fit in one block"
    num_warps = 4 if BLOCK_N < 2048 else 8 if BLOCK_N < 8192 else 16 if BLOCK_N < 32768 else 32
    return BLOCK_N, num_warps


@functools.lru_cache
def _n_programs_bwd(device):
    # a few programs per SM keep enough loads in flight; on the interpreter, few so that each
    # program loops over several rows (what the tests must exercise)
    if device.type != "cuda":
        return 3
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


# The launchers are custom ops: torch.compile sees each as one opaque node, shaped by its fake
# implementation, instead of tracing into Triton launches.
@torch.library.custom_op("lima::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    x2 = x.reshape(-1, x.shape[-1])  # (M, N), a copy only if x's rows cannot be viewed
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M, N = x2.shape
    y = _empty((M, N), torch.promote_types(x.dtype, weight.dtype), x.device)
    rstd = _empty((M,), torch.float32, x.device)
    if M > 0:
        BLOCK_N, num_warps = _row_config(N)
        _rms_norm_fwd_kernel[(M,)](x2, weight.contiguous(), y, rstd, x2.stride(0), y.stride(0),
                                   N, eps, BLOCK_N=BLOCK_N, num_warps=num_warps)
    return y.view(x.shape), rstd


@rms_norm_fwd.register_fake
def _(x, weight, eps):
    return (x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype)),
            x.new_empty((x.numel() // x.shape[-1],), dtype=torch.float32))


@torch.library.custom_op("lima::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                 rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    dy2 = dy2 if dy2.stride(-1) == 1 else dy2.contiguous()
    M, N = x2.shape
    dx = _empty((M, N), x.dtype, x.device)
    P = max(1, min(M, _n_programs_bwd(x.device)))
    dw_partial = _empty((P, N), torch.float32, x.device)
    BLOCK_N, num_warps = _row_config(N)
    _rms_norm_bwd_kernel[(P,)](dy2, x2, weight.contiguous(), rstd, dx, dw_partial,
                               dy2.stride(0), x2.stride(0), dx.stride(0), M, N,
                               triton.cdiv(M, P), BLOCK_N=BLOCK_N, num_warps=num_warps)
    dw = dw_partial.sum(0).to(weight.dtype)
    return dx.view(x.shape), dw


@rms_norm_bwd.register_fake
def _(dy, x, weight, rstd):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = rms_norm_fwd(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_bwd(dy, x, weight, rstd)
        return dx, dw, None


def rms_norm_triton(x, weight, eps):
    return RMSNormFunction.apply(x, weight, eps)


def triton_supports(x, weight):
    return (x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and weight.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and x.shape[-1] <= MAX_DIM)
