"""optim.AdamW: torch's AdamW update, and bf16 weights that keep LIMA's small updates."""

import torch

from model import ModelArgs, Transformer
from optim import AdamW, stochastic_round_bf16

TINY = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=128, multiple_of=16, max_seq_len=64)


def test_fp32_update_equals_torch_adamw():
    torch.manual_seed(0)
    a = [torch.randn(5, 7, requires_grad=True), torch.randn(7, requires_grad=True)]
    b = [t.detach().clone().requires_grad_() for t in a]
    ours = AdamW(a, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ref = torch.optim.AdamW(b, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for step in range(5):
        grads = [torch.randn_like(t) for t in a]
        for opt, params in ((ours, a), (ref, b)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour():
    x = torch.full((200_000,), 1.0 + 2 ** -10)  # a quarter of the way from 1 to the next bf16 (1 + 2^-7)
    x[::2] = -x[::2]
    out = stochastic_round_bf16(x, torch.Generator().manual_seed(0)).float()
    assert set(out.abs().unique().tolist()) == {1.0, 1.0 + 2 ** -7}
    assert abs(out.abs().mean().item() - (1.0 + 2 ** -10)) < 2e-5  # expectation = the fp32 value
    exact = torch.tensor([0.0, 1.5, -2.0, float("inf"), float("-inf")])
    assert torch.equal(stochastic_round_bf16(exact).float(), exact)
    assert stochastic_round_bf16(torch.tensor([float("nan")])).isnan().all()


def _losses(kind, steps=150, lr=2e-5):
    """150 steps of a tiny LLaMA on fixed data at an update/weight ratio of LIMA's (lr 2e-5 on
    weights of ~2e-2: 1e-3, below bf16's resolution of 2^-8)."""
    torch.manual_seed(0)
    model = Transformer(TINY)
    model.init_weights()
    if kind != "fp32":
        model = model.to(torch.bfloat16)
    hp = dict(lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    opt = AdamW(model.parameters(), **hp) if kind == "stochastic" else torch.optim.AdamW(model.parameters(), **hp)
    x = torch.randint(0, TINY.vocab_size, (8, 33), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_bf16_weights_track_fp32_with_stochastic_rounding_not_without():
    fp32, nearest, stochastic = (_losses(k) for k in ("fp32", "nearest", "stochastic"))
    drop = fp32[0] - fp32[-1]
    assert drop > 0.2
    # round-to-nearest bf16 loses most of the updates: the loss falls far less
    assert fp32[0] - nearest[-1] < 0.6 * drop
    # stochastic rounding keeps them: the same curve, step by step
    assert max(abs(a - b) for a, b in zip(fp32, stochastic)) < 0.05 * drop
    assert abs((fp32[0] - stochastic[-1]) - drop) < 0.05 * drop
