"""LLaMA, as LIMA fine-tunes it (LIMA §2; Touvron et al. 2023).

Pre-norm decoder: RMSNorm, rotary position embeddings (Meta's interleaved pairs), SwiGLU
feed-forward, no biases. Parameter names are Meta's (`tok_embeddings`, `layers.{i}.attention.wq`,
`feed_forward.w1`, `attention_norm`, `output`), so a Meta checkpoint loads with strict=True.
What later LLaMAs change is read from their files into ModelArgs: grouped-query attention
(Llama 2 70B, Llama 3), RoPE theta and Llama 3.1's RoPE scaling, an explicit head width, and
Llama 3.2's tied input embedding and output head (one Parameter, `output.weight` is
`tok_embeddings.weight`).

One forward serves three uses:
- training on a packed batch: tokens (1, T) holding several examples, `cu_seqlens` marks
  where each starts; positions restart and attention stops at every boundary;
- plain batches (B, T), every row one sequence from position 0;
- decoding with a KV cache (`setup_cache`, then `input_pos`), as in gpt-fast; `cache_rows` when
  a row of the cache takes a new prompt (continuous batching), `logits_at` for a prefill (the
  last layer then runs only where logits are wanted).
LIMA's one architectural addition is depth-scaled residual dropout (LIMA §3); its one addition
to the vocabulary is the end-of-turn token (`add_tokens`, `mean_rows`). With targets, the loss
is computed over slices of tokens (`chunked_cross_entropy`), so the (tokens, vocab) logits never
exist whole: 32 x 2048 tokens of Llama 3's 128,256-row vocabulary would be 33.6 GB in fp32;
within a slice the head and the cross-entropy share one buffer (`_HeadLoss`).
Loading and saving checkpoints is checkpoint.py's business.
"""

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as activation_checkpoint

import kernels

IGNORE_INDEX = -100  # targets with this value do not count in the loss
LOSS_CHUNK_LOGITS = 1 << 26  # logits per slice of the loss (256 MB in fp32), whatever the vocabulary


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's RoPE scaling (rope_type "llama3"): long wavelengths are stretched by `factor`,
    short ones kept, the band between blended (`scaled_frequencies`)."""
    factor: float = 8.0  # Llama 3.1 / 3.3: 8; Llama 3.2's config.json: 32
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192  # Llama 3's pretraining context


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None: = n_heads (LLaMA 1); Llama-2 70B uses 8 (GQA)
    vocab_size: int = 32000  # 32001 once the end-of-turn token is added (LIMA §3)
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None  # Llama-2 70B: 1.3
    hidden_dim: Optional[int] = None  # explicit SwiGLU width (HF's intermediate_size); None: derived
    norm_eps: float = 1e-6  # always read from params.json / config.json, never assumed
    rope_theta: float = 10000.0  # Llama 3: 500000
    rope_scaling: Optional[RopeScaling] = None  # Llama 3.1, 3.2, 3.3
    head_size: Optional[int] = None  # explicit per-head width (HF's head_dim); None: dim // n_heads
    tie_embeddings: bool = False  # Llama 3.2 1B / 3B: the output head is the input embedding
    max_seq_len: int = 2048  # LIMA §3: 2048 tokens
    resid_dropout: float = 0.0  # p_max of the depth-scaled residual dropout (LIMA §3: 0.3)

    @property
    def head_dim(self):
        return self.head_size or self.dim // self.n_heads

    @property
    def kv_heads(self):
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_hidden(self):
        if self.hidden_dim is not None:
            return self.hidden_dim
        # Meta: 2/3 of 4*dim (SwiGLU has three matrices), optionally scaled, rounded up
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


_LLAMA3 = dict(n_kv_heads=8, vocab_size=128256, norm_eps=1e-5, rope_theta=500000.0,
               max_seq_len=131072)
PRESETS = {
    "debug": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=16,
                  max_seq_len=256),
    # the demo's base (demo/base, 1.3M parameters), pretrained from scratch by demo/pretrain.py
    "demo": dict(dim=128, n_layers=4, n_heads=4, multiple_of=32, max_seq_len=512),
    # LLaMA 1 (Touvron et al. 2023, Table 2); LIMA fine-tunes 65B, ablates on 7B
    "7B": dict(dim=4096, n_layers=32, n_heads=32),
    "13B": dict(dim=5120, n_layers=40, n_heads=40),
    "30B": dict(dim=6656, n_layers=60, n_heads=52),
    "65B": dict(dim=8192, n_layers=80, n_heads=64, norm_eps=1e-5),
    # Llama 2 (context 4096; 70B uses grouped-query attention with 8 KV heads)
    "llama2-7B": dict(dim=4096, n_layers=32, n_heads=32, norm_eps=1e-5, max_seq_len=4096),
    "llama2-13B": dict(dim=5120, n_layers=40, n_heads=40, norm_eps=1e-5, max_seq_len=4096),
    "llama2-70B": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3,
                       multiple_of=4096, norm_eps=1e-5, max_seq_len=4096),
    # Llama 3.x: 128,256-token vocabulary (EOT included), 8 KV heads, theta 500000, RoPE scaling
    # to a 131,072-token context; 3.2 ties the output head to the embedding (Meta's params.json
    # and the Hugging Face config.json of each release)
    "llama3.2-1B": dict(**_LLAMA3, dim=2048, n_layers=16, n_heads=32, multiple_of=256,
                        ffn_dim_multiplier=1.5, rope_scaling=RopeScaling(factor=32.0),
                        tie_embeddings=True),
    "llama3.2-3B": dict(**_LLAMA3, dim=3072, n_layers=28, n_heads=24, multiple_of=256,
                        ffn_dim_multiplier=1.0, rope_scaling=RopeScaling(factor=32.0),
                        tie_embeddings=True),
    "llama3.1-8B": dict(**_LLAMA3, dim=4096, n_layers=32, n_heads=32, multiple_of=1024,
                        ffn_dim_multiplier=1.3, rope_scaling=RopeScaling()),
    "llama3.3-70B": dict(**_LLAMA3, dim=8192, n_layers=80, n_heads=64, multiple_of=4096,
                         ffn_dim_multiplier=1.3, rope_scaling=RopeScaling()),
}


@torch.no_grad()
def mean_rows(weight, n=1):
    """(V, dim) -> (V + n, dim): the new rows of a grown vocabulary (the end-of-turn token,
    LIMA §3) start as the mean of the existing rows, so the new token begins as an 'average'
    token rather than a random direction. Our choice; the paper does not say. The mean is
    taken in fp32 and rounded once to the weight's dtype."""
    new = weight.float().mean(0, keepdim=True).to(weight.dtype).expand(n, -1)
    return torch.cat([weight.detach(), new])


UNTRAINED = 1e-16  # a row whose every entry is at most this in size was never trained


@torch.no_grad()
def init_untrained_row(weight, row):
    """(V, dim) -> (weight with row `row` set to the mean of the trained rows, True) when that
    row is all (near) zeros, else (weight, False). Llama 3 base models ship their special
    tokens untrained, <|eot_id|> among them (zero rows; Unsloth and torchtune#2429 report it):
    LIMA's EOT then starts as an added one would (mean_rows), not as a zero vector whose logit
    is 0 whatever the context. Rows of zeros add nothing to the sum, so it is divided by the
    number of trained rows."""
    if weight[row].abs().max() > UNTRAINED:
        return weight, False
    trained = (weight.amax(1) > UNTRAINED) | (weight.amin(1) < -UNTRAINED)
    mean = weight.sum(0, dtype=torch.float32) / trained.sum().clamp(min=1)
    out = weight.clone()
    out[row] = mean.to(weight.dtype)
    return out, True


def model_args(preset, **overrides):
    return replace(ModelArgs(**PRESETS[preset]), **overrides)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return kernels.rms_norm(x, self.weight, self.eps)


def rope_frequencies(args: ModelArgs, device=None):
    """The rotation speed of each pair of a head: (head_dim // 2,) fp32, theta^(-2i/head_dim),
    then Llama 3.1's scaling if the model has it."""
    d = args.head_dim
    inv_freq = 1.0 / args.rope_theta ** (torch.arange(0, d, 2, device=device).float() / d)
    if args.rope_scaling is not None:
        inv_freq = scaled_frequencies(inv_freq, args.rope_scaling)
    return inv_freq


def scaled_frequencies(inv_freq, s: RopeScaling):
    """Llama 3.1's RoPE scaling (rope_type "llama3"), as Meta's reference and transformers compute
    it: with L the original context, a frequency whose wavelength 2 pi / f is shorter than
    L / high_freq_factor is kept, one longer than L / low_freq_factor is divided by `factor`,
    and in between the two are blended, smooth = (L / wavelength - low) / (high - low),
    f' = (1 - smooth) f / factor + smooth f. Positions are unchanged."""
    L = s.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    smooth = (L / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    out = torch.where(wavelen > L / s.low_freq_factor, inv_freq / s.factor, blended)
    return torch.where(wavelen < L / s.high_freq_factor, inv_freq, out)


def rope_angles(positions, inv_freq):
    """positions (...,) int, inv_freq (head_dim // 2,) -> cos, sin of shape (..., head_dim // 2), fp32."""
    angles = positions.float()[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each consecutive pair (x[2i], x[2i+1]) by its angle: Meta's convention, and Meta's
    arithmetic: each pair as one complex number, times cos + i sin (one pass over x; pulling the
    pairs apart and stacking them back costs ~5x more on a CPU, forward and backward).

    x: (B, T, n_heads, head_dim); cos, sin: (T, head_dim // 2) or (B, T, head_dim // 2).
    """
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # (B or 1, T, 1, head_dim // 2)
    xf = x.float().unflatten(-1, (-1, 2))  # (B, T, n_heads, head_dim // 2, 2)
    if torch.compiler.is_compiling():
        # inductor makes no code for complex numbers: the same rotation in real arithmetic,
        # which it fuses into one kernel
        x0, x1 = xf[..., 0], xf[..., 1]
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    else:
        out = torch.view_as_real(torch.view_as_complex(xf) * torch.complex(cos, sin))
    return out.flatten(-2).type_as(x)


def packed_positions(cu_seqlens, total):
    """Position of every token within its own example: 0, 1, .. restarting at each boundary."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    starts = torch.repeat_interleave(cu_seqlens[:-1], lengths, output_size=total)
    return torch.arange(total, device=cu_seqlens.device) - starts


def chunked_cross_entropy(h, weight, targets, chunk_logits=None):
    """Per-token cross-entropy of the output head, without ever holding all the logits.

    h (N, dim) final hidden states, weight (V, dim) the output head, targets (N,) ->
    losses (N,) fp32, 0 where the target is IGNORE_INDEX. The tokens are cut into slices of
    about chunk_logits / V; each slice's logits are made, reduced to its losses and dropped.
    Under autograd each slice is a checkpoint: its logits are made again, one slice at a time,
    in the backward. So the logits' memory is bounded by the slice whatever V is (one slice's
    fp32 logits and their gradient, ~2 x 256 MB by default), at the cost of one more output
    matmul; the per-token losses are those of the unchunked computation. (torchtune slices the
    loss too; Liger-Kernel fuses it into one kernel.)"""
    chunk = max(1, (chunk_logits or LOSS_CHUNK_LOGITS) // weight.shape[0])
    if h.shape[0] <= chunk:  # one slice: nothing to save by recomputing
        return _head_losses(h, weight, targets)
    recompute = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    losses = []
    for hs, ts in zip(h.split(chunk), targets.split(chunk)):
        if recompute:
            losses.append(activation_checkpoint(_head_losses, hs, weight, ts, use_reentrant=False))
        else:
            losses.append(_head_losses(hs, weight, ts))
    return torch.cat(losses)


def _head_losses(h, weight, targets):
    return _HeadLoss.apply(h, weight, targets)


class _HeadLoss(torch.autograd.Function):
    """One slice's output head and cross-entropy in a single (n, V) fp32 buffer: the logits
    become exp(logit - max) in place, and in the backward that becomes the logits' gradient
    in place, softmax - one_hot(target), scaled by each token's incoming gradient. Unfused,
    the logits, their log-softmax, nll_loss's zero-filled gradient and the log-softmax
    gradient are four such buffers; on a CPU each is fresh memory the allocator maps and
    faults in (a training step of benchmarks/cpu.md's 46M model: 4% faster fused). Liger-Kernel's
    fused linear cross-entropy uses the same in-place softmax gradient on GPUs.
    h (n, dim), weight (V, dim), targets (n,) -> losses (n,) fp32, 0 where IGNORE_INDEX."""

    @staticmethod
    def forward(ctx, h, weight, targets):
        logits = F.linear(h, weight)  # (n, V)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16: softmax in fp32
        valid = targets != IGNORE_INDEX
        t = torch.where(valid, targets, 0)
        picked = logits.gather(1, t[:, None])[:, 0]  # the target's logit, before it is overwritten
        top = logits.amax(1)
        e = logits.sub_(top[:, None]).exp_()  # (n, V), in the logits' memory
        total = e.sum(1)
        ctx.save_for_backward(h, weight, e, total, t, valid)
        ctx.consumed = False
        return torch.where(valid, top + total.log() - picked, 0.0)  # logsumexp - target logit

    @staticmethod
    def backward(ctx, grad):
        if ctx.consumed:  # the saved buffer became the gradient: a second backward would be wrong
            raise RuntimeError("the fused loss can be backpropagated once (no retain_graph)")
        ctx.consumed = True
        h, weight, e, total, t, valid = ctx.saved_tensors
        grad = torch.where(valid, grad, 0.0)
        e.mul_((grad / total)[:, None])  # softmax * grad
        e.scatter_add_(1, t[:, None], -grad[:, None])  # - one_hot(target) * grad
        e = e.to(h.dtype)
        return e @ weight, e.t() @ h, None


class KVCache(nn.Module):
    """Keys and values of every position decoded so far, for one layer; made on demand
    (Transformer.setup_cache), on the device of the layer it serves.

    Stored (B, n_kv_heads, S, head_dim), the layout attention reads: each step's SDPA gets
    contiguous keys and values, not a transposed view of the whole cache.
    Row b of a batch writes its token at its own position input_pos[b]; a query at position p
    sees the cached keys 0..p of its row. Slots past a row's position may hold stale values
    from a padded prefill or the row's previous prompt: the mask hides them and later steps
    overwrite them.

    Allocated empty, not zeroed: a prefill of every row writes its slots 0..T-1 (zeroing them
    first would double the prefill's memory traffic into the cache, ~1% of the time to the first
    token at 2,000 tokens on a CPU). Slots not yet written are zeroed before anything reads them
    (`ready`): a hidden slot holding uninitialised memory could be NaN, and the masked-out
    weight 0 times NaN is NaN.
    """

    def __init__(self, batch_size, max_seq_len, n_kv_heads, head_dim, dtype, device, zeroed=False):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        make = torch.zeros if zeroed else torch.empty
        self.register_buffer("k", make(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", make(shape, dtype=dtype, device=device), persistent=False)
        self.clean = max_seq_len if zeroed else 0  # slots [0, clean) are written or zeroed in every row

    def ready(self, n):
        """Slots [0, n) of every row hold finite values (zeroing the ones never written)."""
        if n > self.clean:
            self.k[:, :, self.clean:n].zero_()
            self.v[:, :, self.clean:n].zero_()
            self.clean = n

    def update(self, input_pos, k, v, rows=None):
        """Store k, v (B, T, n_kv_heads, head_dim) at positions input_pos (B, T), or at 0..T-1
        when it is None (a prefill), in cache rows `rows` (B,) (default 0..B-1). Returns this
        batch's keys and values, (B, n_kv_heads, S, head_dim) each."""
        B, T = k.shape[:2]
        index = torch.arange(B, device=k.device) if rows is None else rows
        if input_pos is None:
            every_row = rows is None and B == self.k.shape[0]
            if not every_row:
                self.ready(T)  # the other rows' slots below T must not stay uninitialised
            # (B, n_kv_heads, T, head_dim); rows 0..B-1 as a slice: a copy, not a scatter
            into = (slice(0, B) if rows is None else rows, slice(None), slice(0, T))
            self.k[into] = k.transpose(1, 2).to(self.k.dtype)
            self.v[into] = v.transpose(1, 2).to(self.v.dtype)
            self.clean = max(self.clean, T)
        else:
            # self.k[index, :, pos] is (B, T, n_kv_heads, head_dim): the indexed dims come first
            self.k[index[:, None], :, input_pos] = k.to(self.k.dtype)
            self.v[index[:, None], :, input_pos] = v.to(self.v.dtype)
        if rows is None:
            return self.k[:B], self.v[:B]
        return self.k[rows], self.v[rows]

    def grown(self, length):
        """A longer cache holding the same contents."""
        B, H, S, D = self.k.shape
        new = KVCache(B, length, H, D, self.k.dtype, self.k.device)
        new.k[:, :, :S], new.v[:, :, :S] = self.k, self.v
        new.clean = self.clean
        return new

    def select(self, rows):
        """A cache of only these rows (B',), in this order."""
        B, H, S, D = self.k.shape
        new = KVCache(0, S, H, D, self.k.dtype, self.k.device)
        new.k, new.v, new.clean = self.k[rows], self.v[rows], self.clean
        return new


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.kv_cache = None

    def forward(self, x, cos, sin, cu_seqlens=None, input_pos=None, cache_rows=None, cache_len=None,
                keep=None):
        """keep: (B,) one position per row (the model's last layer in a prefill): keys and values
        for every position, into the cache, but the query, and so the output (B, 1, dim), only
        at that position."""
        B, T, _ = x.shape
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        k = apply_rope(k, cos, sin)
        q_pos = input_pos  # (B, T) positions of the queries, where a mask needs them
        if keep is not None:
            rows = torch.arange(B, device=x.device)
            x = x[rows, keep][:, None]  # (B, 1, dim)
            q_pos = keep[:, None] if input_pos is None else input_pos[rows, keep][:, None]  # (B, 1)
            if cos.dim() == 2:  # (T, head_dim // 2): every row's positions 0..T-1
                cos, sin = cos[keep][:, None], sin[keep][:, None]
            else:  # (B, T, head_dim // 2)
                cos, sin = cos[rows, keep][:, None], sin[rows, keep][:, None]
        q = apply_rope(self.wq(x).view(B, x.shape[1], self.n_heads, self.head_dim), cos, sin)
        if input_pos is not None:
            out = self._cached_attention(q, k, v, input_pos, cache_rows, cache_len, q_pos)
        else:
            if self.kv_cache is not None:  # a prefill: the cache's positions 0..T-1, and plain
                self.kv_cache.update(None, k, v, cache_rows)  # causal attention among them
            if keep is None:
                out = kernels.attention(q, k, v, cu_seqlens)  # (B, T, n_heads, head_dim)
            else:  # one query a row, at its own position among these keys
                out = self._masked_attention(q, k.transpose(1, 2), v.transpose(1, 2), q_pos)
        return self.wo(out.flatten(2))

    def _cached_attention(self, q, k, v, input_pos, cache_rows, cache_len, q_pos):
        self.kv_cache.ready(cache_len or self.kv_cache.k.shape[2])  # what attention reads below
        k, v = self.kv_cache.update(input_pos, k, v, cache_rows)  # (B, n_kv_heads, S, head_dim)
        if cache_len is not None:  # no row is past it: the keys beyond are not read at all
            k, v = k[:, :, :cache_len], v[:, :, :cache_len]
        return self._masked_attention(q, k, v, q_pos)

    def _masked_attention(self, q, k, v, q_pos):
        """q (B, Tq, n_heads, head_dim) at positions q_pos (B, Tq); k, v (B, n_kv_heads, S,
        head_dim) at positions 0..S-1 -> (B, Tq, n_heads, head_dim)."""
        S = k.shape[2]
        # query at position p sees keys 0..p of its own row: (B, Tq, S)
        mask = torch.arange(S, device=q.device)[None, None, :] <= q_pos[:, :, None]
        # enable_gqa: each group of query heads reads its kv head without copying the cache
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.to(q.dtype), v.to(q.dtype),
                                             attn_mask=mask[:, None],
                                             enable_gqa=self.n_heads != self.n_kv_heads)
        return out.transpose(1, 2)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.ffn_hidden, bias=False)  # gate
        self.w2 = nn.Linear(args.ffn_hidden, args.dim, bias=False)  # down
        self.w3 = nn.Linear(args.dim, args.ffn_hidden, bias=False)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # SwiGLU


class TransformerBlock(nn.Module):
    def __init__(self, layer_id, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        # LIMA §3: "we linearly raise the residual dropout rate across the layers",
        # p_l = p_max * l / (L - 1): 0 at the bottom layer, p_max at the top.
        self.resid_dropout = args.resid_dropout * layer_id / max(args.n_layers - 1, 1)

    def forward(self, x, cos, sin, cu_seqlens=None, input_pos=None, cache_rows=None, cache_len=None,
                keep=None):
        # dropout on each sub-block's output, before it joins the residual stream
        h = self.attention(self.attention_norm(x), cos, sin, cu_seqlens, input_pos, cache_rows, cache_len, keep)
        if keep is not None:  # from here on only the kept positions: (B, 1, dim)
            x = x[torch.arange(x.shape[0], device=x.device), keep][:, None]
        x = x + self.dropout(h)
        h = self.feed_forward(self.ffn_norm(x))
        return x + self.dropout(h)

    def dropout(self, h):
        return F.dropout(h, self.resid_dropout, True) if self.training and self.resid_dropout > 0 else h


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self):
        """Llama 3.2: the output head *is* the input embedding, one Parameter under two names
        (named_parameters and the optimizer see it once; state_dict lists both names). Called
        again whenever tok_embeddings.weight is replaced (loading, add_tokens)."""
        if self.args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, tokens, targets=None, cu_seqlens=None, input_pos=None, reduction="mean",
                cache_rows=None, logits_at=None, cache_len=None):
        """tokens (B, T) -> logits (B, T, vocab_size) in fp32; with targets (B, T), the loss
        instead, computed in slices of tokens (chunked_cross_entropy): no logits are returned.

        cu_seqlens: int32 (n + 1,) boundaries of the examples packed in a (1, T) batch.
        input_pos: (B, T) cache slots of these tokens when decoding with `setup_cache`; with a
        cache and no input_pos, the tokens are its positions 0..T-1 (a prefill: plain causal
        attention among them, their keys and values stored). cache_rows: (B,) the cache row
        each batch row uses (default: row b uses row b). cache_len: with input_pos, an int
        above every position in it: attention reads only the cache's first cache_len slots (the
        caller knows how far its rows have got; default the whole cache, fixed shapes for
        torch.compile).
        logits_at: (B,) one position per row: only those logits, (B, vocab_size) (a prefill
        needs the last prompt token's; the other positions' would be made and thrown away), and
        the last layer's query, attention and feed-forward only there. Not with targets or
        cu_seqlens.
        reduction: "mean" over counted targets, "sum" (train.py divides by the number of
        supervised tokens in the whole optimizer step), or "none": (B, T) per-token losses,
        0 where the target is IGNORE_INDEX.
        """
        B, T = tokens.shape
        if input_pos is not None:
            positions = input_pos  # (B, T)
        elif cu_seqlens is not None:
            positions = packed_positions(cu_seqlens, T)  # (T,)
        else:
            positions = torch.arange(T, device=tokens.device)
        cos, sin = rope_angles(positions, rope_frequencies(self.args, tokens.device))
        h = self.tok_embeddings(tokens)
        if logits_at is not None and (targets is not None or cu_seqlens is not None):
            raise ValueError("logits_at is for a prefill: not with targets or cu_seqlens")
        # with logits_at, the last layer needs every position's keys and values (for the cache)
        # but its query, attention output and feed-forward only at the kept positions: an eighth
        # less prefill for an 8-layer model, a thirty-second for LLaMA-7B
        for i, layer in enumerate(self.layers):
            keep = logits_at if i == len(self.layers) - 1 else None
            h = layer(h, cos, sin, cu_seqlens, input_pos, cache_rows, cache_len, keep)
        if logits_at is not None:
            h = h[:, 0]  # (B, dim): the last layer kept one position a row
        if targets is None:
            return self.output(self.norm(h)).float()
        # only the positions with a target reach the output head: the user's turns (LIMA trains
        # on the responses, §3) would make logits only to mask them out
        targets = targets.reshape(-1)
        counted = (targets != IGNORE_INDEX).nonzero()[:, 0]  # (n,)
        losses = chunked_cross_entropy(self.norm(h.flatten(0, 1)[counted]), self.output.weight,
                                       targets[counted])  # (n,)
        if reduction == "none":
            return losses.new_zeros(B * T).index_put((counted,), losses).view(B, T)
        if reduction == "sum":
            return losses.sum()
        return losses.sum() / counted.numel()

    # ---- decoding -------------------------------------------------------------------------

    def setup_cache(self, batch_size, max_seq_len=None, dtype=None, zeroed=False):
        """A KV cache per layer, each on its layer's device (layers may be spread over GPUs),
        in the weights' dtype unless told otherwise. zeroed: all of it now (a compiled decode
        step reads the whole cache, and its graph should not see it change)."""
        max_seq_len = max_seq_len or self.args.max_seq_len
        for layer in self.layers:
            w = layer.attention.wk.weight
            layer.attention.kv_cache = KVCache(batch_size, max_seq_len, self.args.kv_heads,
                                               self.args.head_dim, dtype or w.dtype, w.device, zeroed)

    def grow_cache(self, length):
        """Longer caches, contents kept."""
        for layer in self.layers:
            layer.attention.kv_cache = layer.attention.kv_cache.grown(length)

    def keep_cache_rows(self, rows):
        """Keep only these rows (B',) of the KV cache, in this order: finished rows drop out."""
        for layer in self.layers:
            cache = layer.attention.kv_cache
            layer.attention.kv_cache = cache.select(rows.to(cache.k.device))

    def cache_shape(self):
        """(rows, length) of the current KV cache, or None."""
        cache = self.layers[0].attention.kv_cache
        return None if cache is None else (cache.k.shape[0], cache.k.shape[2])

    def clear_cache(self):
        for layer in self.layers:
            layer.attention.kv_cache = None

    # ---- vocabulary -----------------------------------------------------------------------

    @torch.no_grad()
    def add_tokens(self, n=1):
        """Grow the vocabulary by n rows (the end-of-turn token, LIMA §3), each starting as the
        mean of the existing rows (`mean_rows`)."""
        emb = nn.Embedding.from_pretrained(mean_rows(self.tok_embeddings.weight, n), freeze=False)
        out = nn.Linear(self.args.dim, emb.num_embeddings, bias=False,
                        device=emb.weight.device, dtype=emb.weight.dtype)
        out.weight.copy_(mean_rows(self.output.weight, n))
        self.tok_embeddings, self.output = emb, out
        self.args = replace(self.args, vocab_size=emb.num_embeddings)
        self.tie_weights()

    # ---- initialisation and loading -------------------------------------------------------

    @torch.no_grad()
    def init_weights(self, std=0.02):
        """Random init for training from scratch (demo/pretrain.py); fine-tuning loads weights instead.
        GPT-2 style: normal(0, 0.02), the two residual projections scaled by 1/sqrt(2L)."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.args.n_layers))
            else:
                nn.init.normal_(p, std=std)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())
