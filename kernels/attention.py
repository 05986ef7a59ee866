"""Causal self-attention over (optionally packed) sequences.

q: (B, T, n_heads, head_dim); k, v: (B, T, n_kv_heads, head_dim), n_kv_heads divides n_heads
(grouped-query attention: query head h reads kv head h // (n_heads // n_kv_heads)).
cu_seqlens: None, or int32 (n_examples + 1,) cumulative lengths starting at 0 when B == 1 and
the T tokens are several examples concatenated: a token attends only to earlier tokens of its
own example. Returns (B, T, n_heads, head_dim).
"""

import torch
import torch.nn.functional as F


def attention_reference(q, k, v, cu_seqlens=None):
    n_rep = q.shape[2] // k.shape[2]
    # (B, T, H, D) -> (B, H, T, D); kv heads repeated for each query head of their group
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    if cu_seqlens is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    assert q.shape[0] == 1, "a packed batch has B == 1"
    bounds = cu_seqlens.tolist()
    out = torch.empty_like(q)
    for start, end in zip(bounds[:-1], bounds[1:]):  # one causal attention per example
        out[:, :, start:end] = F.scaled_dot_product_attention(
            q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], is_causal=True)
    return out.transpose(1, 2)
