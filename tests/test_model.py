"""model.py against an independent LLaMA written here the way Meta's reference writes it
(complex-number rotary embeddings, explicit masks, repeat_kv), plus packing, caching, dropout."""

import math

import pytest
import torch
import torch.nn.functional as F

import model as M


def tiny_args(**kw):
    base = dict(dim=64, n_layers=3, n_heads=4, n_kv_heads=None, vocab_size=97, multiple_of=16,
                norm_eps=1e-5, max_seq_len=64)
    base.update(kw)
    return M.ModelArgs(**base)


def random_model(args, seed=0):
    torch.manual_seed(seed)
    m = M.Transformer(args)
    m.init_weights(std=0.1)
    with torch.no_grad():  # norms away from 1 so a misplaced weight would show
        for name, p in m.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return m.eval()


# ---- an independent reference, Meta-style -------------------------------------------------

def meta_forward(sd, args, tokens, freqs=None):
    """LLaMA forward from a state dict, following meta-llama/llama's model.py step by step.
    freqs: the RoPE frequencies if not theta's plain ones (Llama 3.1's scaling)."""
    B, T = tokens.shape
    hd, H, KV = args.head_size or args.dim // args.n_heads, args.n_heads, args.n_kv_heads or args.n_heads
    if freqs is None:
        freqs = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2)[: hd // 2].double() / hd))
    freqs_cis = torch.polar(torch.ones(T, hd // 2, dtype=torch.float64),
                            torch.outer(torch.arange(T).double(), freqs))

    def rope(x):  # (B, T, heads, hd) as complex pairs (x0 + i x1)
        xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + args.norm_eps) * w

    W = {k: v.double() for k, v in sd.items()}
    h = W["tok_embeddings.weight"][tokens]
    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(args.n_layers):
        p = f"layers.{i}."
        x = norm(h, W[p + "attention_norm.weight"])
        q = (x @ W[p + "attention.wq.weight"].T).view(B, T, H, hd)
        k = (x @ W[p + "attention.wk.weight"].T).view(B, T, KV, hd)
        v = (x @ W[p + "attention.wv.weight"].T).view(B, T, KV, hd)
        q, k = rope(q), rope(k)
        k = k[:, :, :, None].expand(B, T, KV, H // KV, hd).reshape(B, T, H, hd)  # repeat_kv
        v = v[:, :, :, None].expand(B, T, KV, H // KV, hd).reshape(B, T, H, hd)
        scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd) + mask
        out = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(B, T, -1)
        h = h + out @ W[p + "attention.wo.weight"].T
        x = norm(h, W[p + "ffn_norm.weight"])
        ff = F.silu(x @ W[p + "feed_forward.w1.weight"].T) * (x @ W[p + "feed_forward.w3.weight"].T)
        h = h + ff @ W[p + "feed_forward.w2.weight"].T
    return norm(h, W["norm.weight"]) @ W["output.weight"].T


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
def test_matches_meta_reference(n_kv_heads):
    args = tiny_args(n_kv_heads=n_kv_heads)
    m = random_model(args)
    tokens = torch.randint(0, args.vocab_size, (2, 23))
    with torch.no_grad():
        ours = m(tokens).double()
    ref = meta_forward(m.state_dict(), args, tokens)
    assert (ours - ref).norm() / ref.norm() < 1e-5
    assert (ours - ref).abs().max() < 1e-4


def test_meta_parameter_names():
    names = set(M.Transformer(tiny_args(n_layers=1)).state_dict())
    assert names == {
        "tok_embeddings.weight", "norm.weight", "output.weight",
        "layers.0.attention.wq.weight", "layers.0.attention.wk.weight",
        "layers.0.attention.wv.weight", "layers.0.attention.wo.weight",
        "layers.0.feed_forward.w1.weight", "layers.0.feed_forward.w2.weight",
        "layers.0.feed_forward.w3.weight", "layers.0.attention_norm.weight",
        "layers.0.ffn_norm.weight"}


def test_presets_match_the_paper_sizes():
    # docs/method.md's table: (dim, heads, layers, ffn hidden); parameter counts ~ the names
    expect = {"7B": (4096, 32, 32, 11008, 6.7e9), "13B": (5120, 40, 40, 13824, 13.0e9),
              "30B": (6656, 52, 60, 17920, 32.5e9), "65B": (8192, 64, 80, 22016, 65.2e9)}
    for name, (dim, heads, layers, hidden, n_params) in expect.items():
        a = M.model_args(name)
        assert (a.dim, a.n_heads, a.n_layers, a.ffn_hidden) == (dim, heads, layers, hidden)
        with torch.device("meta"):
            count = M.Transformer(a).num_params()
        assert abs(count - n_params) / n_params < 0.01, (name, count)
    assert M.model_args("llama2-70B").kv_heads == 8
    assert M.model_args("llama2-70B").ffn_hidden == 28672


def test_packed_batch_equals_examples_one_by_one():
    args = tiny_args(n_kv_heads=2)
    m = random_model(args)
    lengths = [7, 1, 20, 3]
    examples = [torch.randint(0, args.vocab_size, (1, n)) for n in lengths]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    with torch.no_grad():
        packed = m(torch.cat(examples, 1), cu_seqlens=cu)
        single = torch.cat([m(x) for x in examples], 1)
    assert (packed - single).abs().max() < 1e-5


def test_packed_loss_equals_sum_over_examples():
    args = tiny_args()
    m = random_model(args)
    x = torch.randint(0, args.vocab_size, (1, 30))
    y = torch.randint(0, args.vocab_size, (1, 30))
    y[0, :5] = M.IGNORE_INDEX  # e.g. a prompt: does not count
    cu = torch.tensor([0, 12, 30], dtype=torch.int32)
    with torch.no_grad():
        total = m(x, y, cu_seqlens=cu, reduction="sum")
        mean = m(x, y, cu_seqlens=cu)
        a = m(x[:, :12], y[:, :12], reduction="sum")
        b = m(x[:, 12:], y[:, 12:], reduction="sum")
    assert torch.allclose(total, a + b, rtol=1e-5)
    assert torch.allclose(mean, total / 25, rtol=1e-5)


def test_loss_counts_only_targets_not_ignored():
    m = random_model(tiny_args())
    x = torch.randint(0, 97, (1, 16))
    y = torch.randint(0, 97, (1, 16))
    y[0, :8] = M.IGNORE_INDEX
    loss = m(x, y)
    with torch.no_grad():
        logits = m(x)
    expect = F.cross_entropy(logits[0, 8:], y[0, 8:])
    assert torch.allclose(loss, expect)
    # the logits at ignored positions get no gradient: nor does the final hidden state there,
    # the one input of those logits (the loss never hands out the logits themselves; the last
    # block's output at a position reaches nothing but that position's logits)
    final = []

    def keep(module, inputs, out):
        out.retain_grad()
        final.append(out)

    m.layers[-1].register_forward_hook(keep)
    loss = m(x, y)
    loss.backward()
    grad = final[0].grad
    assert grad[0, :8].abs().max() == 0 and grad[0, 8:].abs().max() > 0


def test_kv_cache_equals_full_forward_for_ragged_batch():
    args = tiny_args(n_kv_heads=2)
    m = random_model(args)
    tokens = torch.randint(0, args.vocab_size, (2, 15))
    lens = [9, 5]  # row 1 is shorter: its prefill slots 5..8 hold padding, later overwritten
    m.setup_cache(2, 32)
    with torch.no_grad():
        pre = m(tokens[:, :9], input_pos=torch.arange(9).expand(2, 9))
        steps = []
        for s in range(6):
            pos = torch.tensor([[lens[0] + s], [lens[1] + s]])
            steps.append(m(tokens.gather(1, pos), input_pos=pos))
        m.clear_cache()
        for row, n in enumerate(lens):
            full = m(tokens[row:row + 1, : n + 6])[0]
            assert (pre[row, :n] - full[:n]).abs().max() < 1e-5
            got = torch.cat([s_[row] for s_ in steps])
            assert (got - full[n:n + 6]).abs().max() < 1e-5


def test_logits_at_runs_the_last_layer_only_where_needed():
    # logits_at: the last layer's query, attention and feed-forward only at each row's kept
    # position (its keys and values still at every position, for the cache): the same logits as
    # the whole forward, without a cache, in a prefill, and in a later prefill chunk
    args = tiny_args(n_kv_heads=2)
    m = random_model(args)
    tokens = torch.randint(0, args.vocab_size, (3, 12))
    at = torch.tensor([11, 4, 7])
    with torch.no_grad():
        full = m(tokens)  # (3, 12, V)
        want = full[torch.arange(3), at]
        torch.testing.assert_close(m(tokens, logits_at=at), want, atol=1e-5, rtol=1e-5)
        m.setup_cache(3, 16)
        torch.testing.assert_close(m(tokens, logits_at=at), want, atol=1e-5, rtol=1e-5)
        # positions 0..5 cached, then 6..11 as a chunk with input_pos; kept positions in it
        m.setup_cache(3, 16)
        m(tokens[:, :6], logits_at=torch.tensor([5, 4, 5]))
        chunk = m(tokens[:, 6:], input_pos=torch.arange(6, 12).expand(3, 6), cache_len=12,
                  logits_at=torch.tensor([5, 0, 1]))
        m.clear_cache()
    torch.testing.assert_close(chunk, full[torch.arange(3), torch.tensor([11, 6, 7])], atol=1e-5, rtol=1e-5)


def test_residual_dropout_schedule():
    # LIMA §3: p_l = p_max * l / (L - 1), from 0 at the first layer to p_max at the last
    m = M.Transformer(tiny_args(n_layers=4, resid_dropout=0.3))
    assert [b.resid_dropout for b in m.layers] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    m = M.Transformer(tiny_args(n_layers=1, resid_dropout=0.3))
    assert m.layers[0].resid_dropout == 0.0


def test_residual_dropout_only_in_training_and_only_on_residual_branches():
    args = tiny_args(n_layers=2, resid_dropout=0.5)
    m = random_model(args)
    x = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        ref = M.Transformer(tiny_args(n_layers=2))
        ref.load_state_dict(m.state_dict())
        assert torch.equal(m.eval()(x), ref.eval()(x))  # off in eval
        m.train()
        torch.manual_seed(1)
        a = m(x)
        torch.manual_seed(2)
        b = m(x)
    assert not torch.allclose(a, b)  # on in training (layer 1 has p = 0.5)
    # layer 0 has p = 0: with only that layer active, training equals eval
    m0 = M.Transformer(tiny_args(n_layers=1, resid_dropout=0.5))
    m0.init_weights()
    with torch.no_grad():
        assert torch.equal(m0.train()(x), m0.eval()(x))


def test_add_tokens_mean_initialises_new_rows():
    m = random_model(tiny_args())
    emb, out = m.tok_embeddings.weight.clone(), m.output.weight.clone()
    m.add_tokens(1)
    assert m.args.vocab_size == 98
    assert m.tok_embeddings.weight.shape == (98, 64) and m.output.weight.shape == (98, 64)
    assert torch.equal(m.tok_embeddings.weight[:97], emb)
    assert torch.allclose(m.tok_embeddings.weight[97], emb.mean(0), atol=1e-6)
    assert torch.allclose(m.output.weight[97], out.mean(0), atol=1e-6)
    x = torch.randint(0, 98, (1, 10))
    assert m(x).shape == (1, 10, 98)


def test_add_tokens_keeps_a_tied_head_tied():
    m = random_model(tiny_args(tie_embeddings=True))
    assert m.output.weight is m.tok_embeddings.weight
    m.add_tokens(1)
    assert m.output.weight is m.tok_embeddings.weight and m.output.weight.shape == (98, 64)


# ---- Llama 3.x: RoPE scaling, explicit head width, tied head -------------------------------------

@pytest.mark.parametrize("head_dim,theta,factor,original", [(128, 500000.0, 8.0, 8192),
                                                            (64, 500000.0, 32.0, 8192),
                                                            (24, 500000.0, 32.0, 32),
                                                            (16, 10000.0, 4.0, 64)])
def test_rope_scaling_equals_transformers(head_dim, theta, factor, original):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    scaling = dict(factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=original)
    config = transformers.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                                      rope_theta=theta, rope_scaling=dict(rope_type="llama3", **scaling))
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    args = M.ModelArgs(dim=4 * head_dim, n_heads=4, rope_theta=theta, rope_scaling=M.RopeScaling(**scaling))
    got = M.rope_frequencies(args)
    assert torch.equal(got, want)
    plain = M.rope_frequencies(M.ModelArgs(dim=4 * head_dim, n_heads=4, rope_theta=theta))
    L = original
    wavelen = 2 * math.pi / plain
    assert torch.equal(got[wavelen < L / 4], plain[wavelen < L / 4])  # short wavelengths kept
    torch.testing.assert_close(got[wavelen > L], plain[wavelen > L] / factor)  # long ones stretched


def test_explicit_head_dim_and_rope_scaling_match_meta_reference():
    # the Meta-style reference above with head_dim 24 (not 64 / 4) and Llama 3.1's scaling
    args = tiny_args(n_kv_heads=2, head_size=24, rope_theta=500000.0,
                     rope_scaling=M.RopeScaling(factor=8.0, original_max_position_embeddings=32))
    m = random_model(args)
    assert m.layers[0].attention.wq.weight.shape == (4 * 24, 64)
    tokens = torch.randint(0, args.vocab_size, (2, 23))
    with torch.no_grad():
        ours = m(tokens).double()
    ref = meta_forward(m.state_dict(), args, tokens, M.rope_frequencies(args).double())
    assert (ours - ref).abs().max() < 1e-4
    assert (ours - meta_forward(m.state_dict(), args, tokens)).abs().max() > 1e-2  # scaling matters


def test_tied_head_is_the_embedding():
    m = random_model(tiny_args(tie_embeddings=True))
    assert m.output.weight is m.tok_embeddings.weight
    assert [n for n, _ in m.named_parameters()].count("tok_embeddings.weight") == 1
    assert "output.weight" not in dict(m.named_parameters())
    x = torch.randint(0, 97, (1, 10))
    m(x, x).backward()  # both uses add into the one gradient
    untied = random_model(tiny_args())
    untied.load_state_dict(m.state_dict())
    untied(x, x).backward()
    torch.testing.assert_close(m.tok_embeddings.weight.grad,
                               untied.tok_embeddings.weight.grad + untied.output.weight.grad)


def test_llama3_presets():
    # the Hugging Face config.json of each release: (dim, layers, heads, kv heads, ffn, head dim)
    expect = {"llama3.2-1B": (2048, 16, 32, 8, 8192, 64, 1.24e9, True, 32.0),
              "llama3.2-3B": (3072, 28, 24, 8, 8192, 128, 3.21e9, True, 32.0),
              "llama3.1-8B": (4096, 32, 32, 8, 14336, 128, 8.03e9, False, 8.0),
              "llama3.3-70B": (8192, 80, 64, 8, 28672, 128, 70.6e9, False, 8.0)}
    for name, (dim, layers, heads, kv, ffn, hd, n_params, tied, factor) in expect.items():
        a = M.model_args(name)
        assert (a.dim, a.n_layers, a.n_heads, a.kv_heads, a.ffn_hidden, a.head_dim) == (dim, layers, heads, kv, ffn, hd)
        assert (a.vocab_size, a.rope_theta, a.tie_embeddings) == (128256, 500000.0, tied)
        assert a.rope_scaling.factor == factor
        with torch.device("meta"):
            count = M.Transformer(a).num_params()
        assert abs(count - n_params) / n_params < 0.01, (name, count)


# ---- the loss in slices ------------------------------------------------------------------------

def test_chunked_loss_and_gradients_equal_unchunked():
    torch.manual_seed(0)
    N, dim, V = 37, 16, 50
    h = torch.randn(N, dim, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, dim, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, V, (N,))
    t[::5] = M.IGNORE_INDEX
    ref = F.cross_entropy(h @ w.T, t, ignore_index=M.IGNORE_INDEX, reduction="none")
    gh, gw = torch.autograd.grad(ref.sum(), (h, w))
    for chunk_tokens in (1, 5, 8, 36, 37, 100):  # slices that do and do not divide N
        losses = M.chunked_cross_entropy(h, w, t, chunk_logits=chunk_tokens * V)
        assert torch.allclose(losses, ref, rtol=1e-12, atol=0)
        assert (losses[::5] == 0).all()
        ch, cw = torch.autograd.grad(losses.sum(), (h, w))
        assert torch.allclose(ch, gh, rtol=1e-12, atol=1e-14) and torch.allclose(cw, gw, rtol=1e-12, atol=1e-14)


def test_fused_head_loss_equals_linear_then_cross_entropy():
    # the fused slice (the softmax and its gradient in the logits' buffer) against the unfused
    # ops, with a different incoming gradient per token (reduction="none" callers, masks)
    torch.manual_seed(1)
    N, dim, V = 29, 12, 41
    t = torch.randint(0, V, (N,))
    t[3::7] = M.IGNORE_INDEX
    upstream = torch.randn(N, dtype=torch.float64)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        h = torch.randn(N, dim, dtype=torch.float64).to(dtype).requires_grad_()
        w = torch.randn(V, dim, dtype=torch.float64).to(dtype).requires_grad_()
        logits = (h.double() @ w.double().T)
        if dtype == torch.bfloat16:  # the matmul's output is bf16 before the fp32 softmax
            logits = logits.to(dtype).double()
        ref = F.cross_entropy(logits, t, ignore_index=M.IGNORE_INDEX, reduction="none")
        gh, gw = torch.autograd.grad((ref * upstream).sum(), (h, w))
        losses = M._head_losses(h, w, t)
        assert losses.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(losses.double(), ref, rtol=tol, atol=tol)
        assert (losses[3::7] == 0).all()
        fh, fw = torch.autograd.grad((losses * upstream.to(losses.dtype)).sum(), (h, w), retain_graph=True)
        assert fh.dtype == dtype and fw.dtype == dtype
        torch.testing.assert_close(fh.double(), gh.double(), rtol=tol, atol=tol * gh.abs().max().item())
        torch.testing.assert_close(fw.double(), gw.double(), rtol=tol, atol=tol * gw.abs().max().item())
        with pytest.raises(RuntimeError, match="once"):  # its buffer is now the gradient
            torch.autograd.grad(losses.sum(), (h, w))


def test_model_loss_is_sliced_and_equals_unsliced(monkeypatch):
    # fp32 model: the per-token losses and every gradient equal the one-slice computation
    args = tiny_args(n_kv_heads=2)
    x = torch.randint(0, 97, (1, 30))
    y = torch.randint(0, 97, (1, 30))
    y[0, :6] = M.IGNORE_INDEX
    cu = torch.tensor([0, 11, 30], dtype=torch.int32)

    def run():
        m = random_model(args)
        per_token = m(x, y, cu_seqlens=cu, reduction="none")
        per_token.sum().backward()
        return per_token.detach(), {n: p.grad for n, p in m.named_parameters()}

    whole, whole_grads = run()
    sizes = []
    real = M._head_losses
    monkeypatch.setattr(M, "_head_losses", lambda h, w, t: (sizes.append(h.shape[0]), real(h, w, t))[1])
    monkeypatch.setattr(M, "LOSS_CHUNK_LOGITS", 7 * 97)  # 7 tokens a slice
    sliced, sliced_grads = run()
    # every slice made twice (forward, backward), of the 24 counted tokens only: the 6 ignored
    # ones never reach the output head
    assert max(sizes) == 7 and sum(sizes) == 2 * 24
    assert (whole[0, :6] == 0).all()
    torch.testing.assert_close(sliced, whole, rtol=1e-6, atol=1e-6)
    for name, g in whole_grads.items():  # fp32: equal up to the order of the sums, ~1e-7
        assert (sliced_grads[name] - g).abs().max() <= 1e-5 * g.abs().max(), name


def test_untrained_row_starts_as_the_mean_of_trained_rows():
    w = torch.randn(10, 4)
    w[[3, 7]] = 0  # two rows pretraining never touched
    out, untrained = M.init_untrained_row(w, 3)
    assert untrained and torch.allclose(out[3], w[[0, 1, 2, 4, 5, 6, 8, 9]].mean(0))
    assert torch.equal(out[7], w[7]) and torch.equal(out[:3], w[:3]) and w[3].abs().max() == 0
    same, untrained = M.init_untrained_row(w, 5)
    assert not untrained and same is w
