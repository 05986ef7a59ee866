"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight  (LLaMA; Zhang and Sennrich 2019).

Statistics are computed in fp32 and the normalised value is cast back to the input dtype
before it is multiplied by the weight, exactly as Meta's reference does.
"""

import functools

import torch

from ._triton import INTERPRET, poisoned_empty, tl, triton


def rms_norm_reference(x, weight, eps):
    # x: (..., dim), weight: (dim,)
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return y.type_as(x) * weight


# ----------------------------------------------------------------------------------------------
# Triton. Forward: each program normalises a tile of BLOCK_M whole rows. Backward: each program
# owns a contiguous chunk of rows and walks it BLOCK_M rows at a time, keeping its dweight
# partial sum in fp32 registers. Short rows are grouped into tiles so a program has enough
# bytes in flight; benchmarks/gpu.py sweeps the tile sizes and warps.

MAX_DIM = 65536  # a whole row lives in registers; 64K fp32 across 32 warps is the ceiling


@triton.jit
def _rms_norm_fwd_kernel(X, W, Y, RSTD, stride_x, stride_y, M, N, eps,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    mask = row_mask[:, None] & (cols < N)[None, :]
    rows = rows.to(tl.int64)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / N + eps)  # (BLOCK_M,)
    w = tl.load(W + cols, mask=cols < N, other=0.0)
    # round to x's dtype first, then multiply in the output dtype: the reference's order
    y = (xf * rstd[:, None]).to(x.dtype).to(Y.dtype.element_ty) * w[None, :].to(Y.dtype.element_ty)
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y, mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


# Backward, per row, with r = rstd = (mean(x^2) + eps)^-1/2, n = x * r, y = n * w:
#   dn = dy * w
#   dx = r * (dn - n * mean(dn * n))          (dr/dx_j = -r^3 x_j / N)
#   dw = sum over rows of dy * n              (n rounded to x's dtype, as in the forward)
# The (n_programs, N) dweight partials are summed once afterwards: no atomics, no contention.
@triton.jit
def _rms_norm_bwd_kernel(DY, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_x, stride_dx,
                         M, N, rows_per_program, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # rows summed once, at the end
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for r in range(row_start, row_end, BLOCK_M):
        rows = r + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        n = x.to(tl.float32) * rstd[:, None]
        dn = dy * w[None, :]
        dx = rstd[:, None] * (dn - n * (tl.sum(dn * n, axis=1) / N)[:, None])
        tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * n.to(x.dtype).to(tl.float32)
    tl.store(DW_PARTIAL + pid * N + cols, tl.sum(dw, axis=0), mask=col_mask)



# (rows per tile, warps) by pass and block width; `TUNE` entries (the benchmark's sweep) win.
# Default, from a sweep on an H200 (benchmarks/gpu_h200.md): tiles of one row from 4096 up
# (several rows per tile were slower there: 0.4-2.5x the time), at least 4096 elements below;
# forward a warp per 512 elements, backward 16 warps up to 8192 (1.3-1.9x faster than 8 at 4096).
TUNE = {}


def _config(kind, N):
    BLOCK_N = triton.next_power_of_2(N)
    assert BLOCK_N <= MAX_DIM, f"rms_norm: rows of {N} do not fit in one block"
    if INTERPRET:  # tiny tiles, so the tests' small shapes cross tile and chunk boundaries
        return 2, BLOCK_N, 1
    if (kind, BLOCK_N) in TUNE:
        rows, warps = TUNE[kind, BLOCK_N]
        return rows, BLOCK_N, warps
    rows = max(1, 4096 // BLOCK_N)
    tile = rows * BLOCK_N
    warps = min(32, max(4, tile // 512)) if kind == "fwd" else (16 if tile <= 8192 else 32)
    return rows, BLOCK_N, warps


@functools.lru_cache
def _n_programs_bwd(device):
    # a few programs per SM keep enough loads in flight; on the interpreter, few so that each
    # program loops over several tiles (what the tests must exercise)
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
    y = poisoned_empty((M, N), torch.promote_types(x.dtype, weight.dtype), x.device)
    rstd = poisoned_empty((M,), torch.float32, x.device)
    if M > 0:
        BLOCK_M, BLOCK_N, num_warps = _config("fwd", N)
        _rms_norm_fwd_kernel[(triton.cdiv(M, BLOCK_M),)](
            x2, weight.contiguous(), y, rstd, x2.stride(0), y.stride(0), M, N, eps,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=num_warps)
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
    dx = poisoned_empty((M, N), x.dtype, x.device)
    P = max(1, min(M, _n_programs_bwd(x.device)))
    dw_partial = poisoned_empty((P, N), torch.float32, x.device)
    BLOCK_M, BLOCK_N, num_warps = _config("bwd", N)
    _rms_norm_bwd_kernel[(P,)](dy2, x2, weight.contiguous(), rstd, dx, dw_partial,
                               dy2.stride(0), x2.stride(0), dx.stride(0), M, N,
                               triton.cdiv(M, P), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=num_warps)
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
