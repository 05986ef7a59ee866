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

def meta_forward(sd, args, tokens):
    """LLaMA forward from a state dict, following meta-llama/llama's model.py step by step."""
    B, T = tokens.shape
    hd, H, KV = args.dim // args.n_heads, args.n_heads, args.n_kv_heads or args.n_heads
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
        _, total = m(x, y, cu_seqlens=cu, reduction="sum")
        _, mean = m(x, y, cu_seqlens=cu)
        _, a = m(x[:, :12], y[:, :12], reduction="sum")
        _, b = m(x[:, 12:], y[:, 12:], reduction="sum")
    assert torch.allclose(total, a + b, rtol=1e-5)
    assert torch.allclose(mean, total / 25, rtol=1e-5)


def test_loss_counts_only_targets_not_ignored():
    m = random_model(tiny_args())
    x = torch.randint(0, 97, (1, 16))
    y = torch.randint(0, 97, (1, 16))
    y[0, :8] = M.IGNORE_INDEX
    logits, loss = m(x, y)
    expect = F.cross_entropy(logits[0, 8:], y[0, 8:])
    assert torch.allclose(loss, expect)
    # the logits at ignored positions get no gradient
    logits, loss = m(x, y)
    logits.retain_grad()
    loss.backward()
    assert logits.grad[0, :8].abs().max() == 0 and logits.grad[0, 8:].abs().max() > 0


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
