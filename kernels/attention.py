"""Causal self-attention over (optionally packed) sequences.

q: (B, T, n_heads, head_dim); k, v: (B, T, n_kv_heads, head_dim), n_kv_heads divides n_heads
(grouped-query attention: query head h reads kv head h // (n_heads // n_kv_heads)).
cu_seqlens: None, or int32 (n_examples + 1,) cumulative lengths starting at 0 when B == 1 and
the T tokens are several examples concatenated: a token attends only to earlier tokens of its
own example. Returns (B, T, n_heads, head_dim).
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ._triton import INTERPRET, LN2_C, LOG2E, LOG2E_C, poisoned_empty, tl, triton


def attention_reference(q, k, v, cu_seqlens=None):
    # (B, T, H, D) -> (B, H, T, D); enable_gqa: query head h reads kv head h // group, no copies
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    gqa = q.shape[1] != k.shape[1]
    if cu_seqlens is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa).transpose(1, 2)
    assert q.shape[0] == 1, "a packed batch has B == 1"
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    # one causal attention per example. split + cat, not writes into slices of one output: the
    # backward then builds each gradient once, instead of a zero-filled full-size tensor per
    # example (measured: that fill was a fifth of a CPU training step)
    outs = [F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, enable_gqa=gqa)
            for qi, ki, vi in zip(*(t.split(lengths, dim=2) for t in (q, k, v)))]
    return torch.cat(outs, dim=2).transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# Triton flash attention (Dao et al. 2022, FA2's loop order): never materialise the (T, T)
# scores; a program owns a block of rows and streams over the blocks of the other side.
#
# Packing: seq_start[t] / seq_end[t] are where the example of token t begins and ends in the
# packed stream. Query m sees key n iff  seq_start[m] <= n <= m  (equivalently n <= m < seq_end[n]).
# For a block of rows only the key blocks between the first row's example start and the
# diagonal are visited (everything else is skipped, not masked), and of those only the blocks
# that straddle a boundary or the diagonal pay for the mask: `lo, full_lo, full_hi, hi` below.
#
# Scores are kept in log2 units (qk * scale * log2 e) so the kernels use exp2; the LSE saved for
# the backward is natural-log, (B, H, T) fp32.



@triton.jit
def _key_blocks(SEQ_START, offs_m, m0, T, PACKED: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """The keys a block of query rows m0.. needs, split by how much masking they take:
    [lo, full_lo) masked | [full_lo, full_hi) every row sees every key | [full_hi, hi) masked.
    Blocks before lo (earlier examples of a packed batch) are skipped, not computed."""
    last = tl.minimum(m0 + BLOCK_M, T) - 1
    if PACKED:
        row_start = tl.load(SEQ_START + offs_m, mask=offs_m < T, other=0)
        first_start, last_start = tl.load(SEQ_START + m0), tl.load(SEQ_START + last)
    else:
        row_start = tl.zeros([BLOCK_M], dtype=tl.int32)
        first_start, last_start = tl.full([], 0, tl.int32), tl.full([], 0, tl.int32)
    lo = first_start // BLOCK_N * BLOCK_N
    full_lo = tl.maximum(lo, tl.cdiv(last_start, BLOCK_N) * BLOCK_N)
    full_hi = tl.maximum(full_lo, (m0 + 1) // BLOCK_N * BLOCK_N)
    return row_start, lo, full_lo, full_hi, last + 1


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K, V, sk_t, sv_t, offs_m, row_start, lo, hi, T, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
               DOT: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if MASK:  # a boundary block: may run past T
            kT = tl.load(K + offs_n[None, :] * sk_t + offs_d[:, None], mask=offs_n[None, :] < T, other=0.0)
            v = tl.load(V + offs_n[:, None] * sv_t + offs_d[None, :], mask=offs_n[:, None] < T, other=0.0)
        else:
            kT = tl.load(K + offs_n[None, :] * sk_t + offs_d[:, None])  # (D, BLOCK_N)
            v = tl.load(V + offs_n[:, None] * sv_t + offs_d[None, :])  # (BLOCK_N, D)
        s = tl.dot(q, kT, input_precision=DOT) * qk_scale  # (BLOCK_M, BLOCK_N)
        if MASK:
            visible = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] >= row_start[:, None])
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_sub = m_new
        if MASK:  # a row that has seen no key yet (packing) keeps m = -inf: subtract 0, not -inf
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_sub[:, None])
        alpha = tl.exp2(m_i - m_sub)  # rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, SEQ_START,
                     sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, so_b, so_t, so_h,
                     T, H, GROUP, qk_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     PACKED: tl.constexpr, DOT: tl.constexpr):
    m0 = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M  # longest rows first: short tail
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    hk = h // GROUP  # GQA: the kv head this query head reads
    Q += b.to(tl.int64) * sq_b + h * sq_h
    K += b.to(tl.int64) * sk_b + hk * sk_h
    V += b.to(tl.int64) * sv_b + hk * sv_h
    O += b.to(tl.int64) * so_b + h * so_h
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + offs_m[:, None] * sq_t + offs_d[None, :], mask=offs_m[:, None] < T, other=0.0)
    row_start, lo, full_lo, full_hi, hi = _key_blocks(SEQ_START, offs_m, m0, T, PACKED, BLOCK_M, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, sk_t, sv_t, offs_m, row_start,
                               lo, tl.minimum(full_lo, hi), T, qk_scale,
                               HEAD_DIM, BLOCK_N, True, DOT)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, sk_t, sv_t, offs_m, row_start,
                               full_lo, full_hi, T, qk_scale, HEAD_DIM, BLOCK_N, False, DOT)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, sk_t, sv_t, offs_m, row_start,
                               full_hi, hi, T, qk_scale, HEAD_DIM, BLOCK_N, True, DOT)
    # every row sees at least its own key, so l_i >= 1
    o = acc / l_i[:, None]
    tl.store(O + offs_m[:, None] * so_t + offs_d[None, :], o.to(O.dtype.element_ty),
             mask=offs_m[:, None] < T)
    tl.store(LSE + bh * T + offs_m, (m_i + tl.log2(l_i)) * LN2_C, mask=offs_m < T)


# Backward. With P = softmax(S) row-wise, S = scale * Q K^T, O = P V, and dO given:
#   dV = P^T dO
#   dP = dO V^T
#   dS = P * (dP - delta),  delta_i = sum_j P_ij dP_ij = rowsum(dO * O)_i   (softmax Jacobian)
#   dQ = scale * dS K
#   dK = scale * dS^T Q
# P is recomputed block by block from the saved LSE: P_ij = exp(S_ij - lse_i). delta is a
# preprocess. Then two passes, neither with atomics: one program per key block accumulates dK
# and dV over all query rows (and over the query heads of its GQA group: the sum dK/dV need),
# and one program per query block accumulates dQ over all key blocks.
@triton.jit
def _attn_bwd_delta_kernel(O, DO, DELTA, so_b, so_t, so_h, sdo_b, sdo_t, sdo_h, T, H,
                           HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m[:, None] < T
    o = tl.load(O + b.to(tl.int64) * so_b + h * so_h + offs_m[:, None] * so_t + offs_d[None, :],
                mask=rows, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * sdo_b + h * sdo_h + offs_m[:, None] * sdo_t + offs_d[None, :],
                 mask=rows, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + bh * T + offs_m, delta, mask=offs_m < T)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, sq_t, sdo_t, offs_n, key_end, lo, hi, T,
                    qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                    MASK: tl.constexpr, DOT: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for m0 in range(lo, hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        if MASK:
            rows = offs_m < T
            qT = tl.load(Q + offs_m[None, :] * sq_t + offs_d[:, None], mask=rows[None, :], other=0.0)
            do = tl.load(DO + offs_m[:, None] * sdo_t + offs_d[None, :], mask=rows[:, None], other=0.0)
            lse = tl.load(LSE + offs_m, mask=rows, other=0.0)
            delta = tl.load(DELTA + offs_m, mask=rows, other=0.0)
        else:
            qT = tl.load(Q + offs_m[None, :] * sq_t + offs_d[:, None])  # (D, BLOCK_M)
            do = tl.load(DO + offs_m[:, None] * sdo_t + offs_d[None, :])  # (BLOCK_M, D)
            lse = tl.load(LSE + offs_m)
            delta = tl.load(DELTA + offs_m)
        sT = tl.dot(k, qT, input_precision=DOT) * qk_scale  # (BLOCK_N, BLOCK_M), log2 units
        pT = tl.exp2(sT - lse[None, :] * LOG2E_C)
        if MASK:
            visible = (offs_n[:, None] <= offs_m[None, :]) & (offs_m[None, :] < key_end[:, None])
            pT = tl.where(visible, pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT)  # (BLOCK_N, BLOCK_M)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=DOT)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, SEQ_END,
                          sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h,
                          sdo_b, sdo_t, sdo_h, sdk_b, sdk_t, sdk_h,
                          T, H, GROUP, sm_scale,
                          HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          PACKED: tl.constexpr, SPLIT_MASK: tl.constexpr, DOT: tl.constexpr):
    n0 = tl.program_id(0) * BLOCK_N  # the first key blocks see the most rows and go first
    bhk = tl.program_id(1)
    H_KV = H // GROUP
    b, hk = bhk // H_KV, bhk % H_KV
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    keys = offs_n[:, None] < T
    k = tl.load(K + b.to(tl.int64) * sk_b + hk * sk_h + offs_n[:, None] * sk_t + offs_d[None, :],
                mask=keys, other=0.0)  # (BLOCK_N, D)
    v = tl.load(V + b.to(tl.int64) * sv_b + hk * sv_h + offs_n[:, None] * sv_t + offs_d[None, :],
                mask=keys, other=0.0)
    last = tl.minimum(n0 + BLOCK_N, T) - 1
    if PACKED:
        key_end = tl.load(SEQ_END + offs_n, mask=offs_n < T, other=0)
        first_end, hi = tl.load(SEQ_END + n0), tl.load(SEQ_END + last)
    else:
        key_end = tl.zeros([BLOCK_N], dtype=tl.int32) + T
        first_end, hi = tl.zeros([], dtype=tl.int32) + T, tl.zeros([], dtype=tl.int32) + T
    # query blocks: [lo, full_lo) masked | [full_lo, full_hi) every row sees every key | [full_hi, hi) masked
    lo = n0 // BLOCK_M * BLOCK_M
    full_lo = tl.maximum(lo, tl.cdiv(n0 + BLOCK_N - 1, BLOCK_M) * BLOCK_M)
    full_hi = tl.maximum(full_lo, first_end // BLOCK_M * BLOCK_M)
    qk_scale = sm_scale * LOG2E_C

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for g in range(GROUP):  # GQA: dK, dV sum over the query heads that share this kv head
        h = hk * GROUP + g
        Qh = Q + b.to(tl.int64) * sq_b + h * sq_h
        DOh = DO + b.to(tl.int64) * sdo_b + h * sdo_h
        LSEh, DELTAh = LSE + (b * H + h) * T, DELTA + (b * H + h) * T
        if SPLIT_MASK:
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, sq_t, sdo_t, offs_n, key_end,
                                     lo, tl.minimum(full_lo, hi), T, qk_scale, HEAD_DIM, BLOCK_M, True, DOT)
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, sq_t, sdo_t, offs_n, key_end,
                                     full_lo, full_hi, T, qk_scale, HEAD_DIM, BLOCK_M, False, DOT)
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, sq_t, sdo_t, offs_n, key_end,
                                     full_hi, hi, T, qk_scale, HEAD_DIM, BLOCK_M, True, DOT)
        else:  # one loop, every block masked: at head dim 128 the three loops spill registers
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, sq_t, sdo_t, offs_n, key_end,
                                     lo, hi, T, qk_scale, HEAD_DIM, BLOCK_M, True, DOT)
    out = b.to(tl.int64) * sdk_b + hk * sdk_h + offs_n[:, None] * sdk_t + offs_d[None, :]
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=keys)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=keys)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, K, V, sk_t, sv_t, offs_m, row_start, lo, hi, T,
                  qk_scale, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                  MASK: tl.constexpr, DOT: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if MASK:
            kT = tl.load(K + offs_n[None, :] * sk_t + offs_d[:, None], mask=offs_n[None, :] < T, other=0.0)
            vT = tl.load(V + offs_n[None, :] * sv_t + offs_d[:, None], mask=offs_n[None, :] < T, other=0.0)
        else:
            kT = tl.load(K + offs_n[None, :] * sk_t + offs_d[:, None])  # (D, BLOCK_N)
            vT = tl.load(V + offs_n[None, :] * sv_t + offs_d[:, None])
        s = tl.dot(q, kT, input_precision=DOT) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        p = tl.exp2(s - lse[:, None])
        if MASK:
            visible = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] >= row_start[:, None])
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, vT, input_precision=DOT)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=DOT)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, SEQ_START,
                        sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h,
                        sdo_b, sdo_t, sdo_h, sdq_b, sdq_t, sdq_h,
                        T, H, GROUP, sm_scale,
                        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        PACKED: tl.constexpr, DOT: tl.constexpr):
    m0 = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M  # longest rows first
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    hk = h // GROUP
    K += b.to(tl.int64) * sk_b + hk * sk_h
    V += b.to(tl.int64) * sv_b + hk * sv_h
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m < T
    q = tl.load(Q + b.to(tl.int64) * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :],
                mask=rows[:, None], other=0.0)
    do = tl.load(DO + b.to(tl.int64) * sdo_b + h * sdo_h + offs_m[:, None] * sdo_t + offs_d[None, :],
                 mask=rows[:, None], other=0.0)
    lse = tl.load(LSE + bh * T + offs_m, mask=rows, other=0.0) * LOG2E_C
    delta = tl.load(DELTA + bh * T + offs_m, mask=rows, other=0.0)
    # the same key-block split as the forward
    row_start, lo, full_lo, full_hi, hi = _key_blocks(SEQ_START, offs_m, m0, T, PACKED, BLOCK_M, BLOCK_N)
    qk_scale = sm_scale * LOG2E_C

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, K, V, sk_t, sv_t, offs_m, row_start,
                       lo, tl.minimum(full_lo, hi), T, qk_scale, HEAD_DIM, BLOCK_N, True, DOT)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, K, V, sk_t, sv_t, offs_m, row_start,
                       full_lo, full_hi, T, qk_scale, HEAD_DIM, BLOCK_N, False, DOT)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, K, V, sk_t, sv_t, offs_m, row_start,
                       full_hi, hi, T, qk_scale, HEAD_DIM, BLOCK_N, True, DOT)
    tl.store(DQ + b.to(tl.int64) * sdq_b + h * sdq_h + offs_m[:, None] * sdq_t + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=rows[:, None])


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per pass and head dim (smaller head dims use 64's),
# for bf16 / fp16: the fastest of two block-size sweeps on an H200 at S = 2048 (each pass varied
# with the others fixed; benchmarks/gpu_h200.md). fp32 is for tests on a GPU only: small tiles
# that compile quickly and do not spill. The interpreter: small unequal blocks, so that the tiny
# test shapes cross many block and example boundaries.
_CONFIGS = {
    #       fwd (rows, keys)       dk/dv (rows, keys)     dq (rows, keys)
    64: dict(fwd=(128, 64, 8, 3), dkdv=(32, 64, 4, 3), dq=(64, 32, 4, 3)),
    128: dict(fwd=(64, 64, 4, 3), dkdv=(32, 64, 4, 3), dq=(64, 32, 4, 3)),
}
_FP32_CONFIG = (32, 32, 4, 1)
_INTERPRET_CONFIGS = dict(fwd=(32, 16, 1, 1), dkdv=(16, 32, 1, 1), dq=(32, 16, 1, 1))


def _config(kind, head_dim, dtype):
    if INTERPRET:
        return _INTERPRET_CONFIGS[kind]
    if dtype == torch.float32:
        return _FP32_CONFIG
    return _CONFIGS[max(head_dim, 64)][kind]



def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides(t):  # (B, T, H, D) -> batch, token, head strides; the last dim is contiguous
    return t.stride(0), t.stride(1), t.stride(2)


def seq_bounds(cu_seqlens, T):
    # per token: where its example starts and ends in the packed stream, (T,) int32 each.
    # searchsorted keeps this on the device: no host sync to learn the lengths.
    t = torch.arange(T, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    example = torch.searchsorted(cu_seqlens, t, right=True)  # 1 .. n_examples
    return cu_seqlens[example - 1].int(), cu_seqlens[example].int()


# The launchers are custom ops: torch.compile sees each as one opaque node, shaped by its fake
# implementation, instead of tracing into Triton launches.
@torch.library.custom_op("lima::attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  seq_start: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, H, D = q.shape
    group = H // k.shape[2]
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    o = poisoned_empty((B, T, H, D), q.dtype, q.device)
    lse = poisoned_empty((B, H, T), torch.float32, q.device)
    BLOCK_M, BLOCK_N, num_warps, num_stages = _config("fwd", D, q.dtype)
    grid = (triton.cdiv(T, BLOCK_M), B * H)
    _attn_fwd_kernel[grid](
        q, k, v, o, lse, seq_start, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        T, H, group, LOG2E / math.sqrt(D),
        HEAD_DIM=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, PACKED=seq_start is not None,
        DOT="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages)
    return o, lse


@attention_fwd.register_fake
def _(q, k, v, seq_start):
    B, T, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, T), dtype=torch.float32)


@torch.library.custom_op("lima::attention_bwd", mutates_args=())
def attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  o: torch.Tensor, lse: torch.Tensor, seq_start: Optional[torch.Tensor],
                  seq_end: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, T, H, D = q.shape
    H_kv = k.shape[2]
    do = _last_dim_contiguous(do)
    packed = seq_start is not None
    dot = "ieee" if q.dtype == torch.float32 else "tf32"
    sm_scale = 1.0 / math.sqrt(D)

    delta = poisoned_empty((B, H, T), torch.float32, q.device)
    _attn_bwd_delta_kernel[(triton.cdiv(T, 64), B * H)](
        o, do, delta, *_strides(o), *_strides(do), T, H, HEAD_DIM=D, BLOCK_M=64)

    dk = poisoned_empty(k.shape, k.dtype, k.device)
    dv = poisoned_empty(v.shape, v.dtype, v.device)
    BLOCK_M, BLOCK_N, num_warps, num_stages = _config("dkdv", D, q.dtype)
    _attn_bwd_dkdv_kernel[(triton.cdiv(T, BLOCK_N), B * H_kv)](
        q, k, v, do, lse, delta, dk, dv, seq_end,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk),
        T, H, H // H_kv, sm_scale,
        HEAD_DIM=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, PACKED=packed, SPLIT_MASK=D < 128,
        DOT=dot, num_warps=num_warps, num_stages=num_stages)

    dq = poisoned_empty(q.shape, q.dtype, q.device)
    BLOCK_M, BLOCK_N, num_warps, num_stages = _config("dq", D, q.dtype)
    _attn_bwd_dq_kernel[(triton.cdiv(T, BLOCK_M), B * H)](
        q, k, v, do, lse, delta, dq, seq_start,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
        T, H, H // H_kv, sm_scale,
        HEAD_DIM=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, PACKED=packed, DOT=dot,
        num_warps=num_warps, num_stages=num_stages)
    return dq, dk, dv


@attention_bwd.register_fake
def _(do, q, k, v, o, lse, seq_start, seq_end):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens):
        packed = cu_seqlens is not None
        seq_start, seq_end = seq_bounds(cu_seqlens.to(q.device), q.shape[1]) if packed else (None, None)
        o, lse = attention_fwd(q, k, v, seq_start)
        ctx.save_for_backward(q, k, v, o, lse, seq_start, seq_end)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, seq_start, seq_end = ctx.saved_tensors
        dq, dk, dv = attention_bwd(do, q, k, v, o, lse, seq_start, seq_end)
        return dq, dk, dv, None


def attention_triton(q, k, v, cu_seqlens=None):
    assert cu_seqlens is None or q.shape[0] == 1, "a packed batch has B == 1"
    return FlashAttention.apply(q, k, v, cu_seqlens)


def triton_supports(q, k, v):
    D = q.shape[-1]
    return (q.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and q.dtype == k.dtype == v.dtype
            and 16 <= D <= 128 and D & (D - 1) == 0)  # a power of two: a whole tl.dot operand
