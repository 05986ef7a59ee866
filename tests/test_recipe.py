"""The paper's recipe (LIMA §3, §5), each number and mechanism checked as it acts, against a
computation written out here by hand: the AdamW that train.py builds (its parameter groups, two
steps of the update, bf16 master weights in expectation), the learning rate the optimizer is
given at every step, the clip on the update, the residual dropout each block applies, the EOT
rows, the loss mask and its normalisation over the whole step, packing, trimming at 2,048
tokens, each decoding step and the 2,048-token context, and RMSNorm where its eps matters.

End-to-end tests elsewhere compare runs with one another, which a bug common to every run
passes; these compare with the paper. tests/mutations.py plants such bugs one at a time and
checks that these tests fail.
"""

import contextlib
import json
import math
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

import checkpoint
import data
import generate
import model as M
import prepare_data
import train
from model import IGNORE_INDEX
from tests.conftest import WORDS
from tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_path):
    return load_tokenizer(tiny_tokenizer_path)


def full(t):
    """The whole tensor of a parameter or gradient, sharded (FSDP2's DTensor) or not, in fp64."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().double()


def tiny_model(vocab_size=301, seed=0, std=0.02, **overrides):
    torch.manual_seed(seed)
    m = M.Transformer(M.model_args("debug", vocab_size=vocab_size, **overrides))
    m.init_weights(std=std)
    with torch.no_grad():  # norm gains away from 1, so that a decayed gain shows
        for name, p in m.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return m


@contextlib.contextmanager
def process_group_of_one(tmp_path):
    """train.train_step all-reduces the step's loss: a gloo group of one rank."""
    if dist.is_initialized():
        pytest.skip("needs a fresh torch.distributed")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


# ---- the optimizer: AdamW (0.9, 0.95), weight decay 0.1 on the matrices (LIMA §3) ------------------

PAPER = train.TrainConfig()  # the paper's numbers (test_the_papers_numbers_are_the_defaults)


def groups_by_name(model, optimizer):
    """[(weight_decay, betas, eps, sorted names)] of each parameter group."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [(g["weight_decay"], tuple(g["betas"]), g["eps"], sorted(names[id(p)] for p in g["params"]))
            for g in optimizer.param_groups]


def adamw_by_hand(w, grads, lrs, wd, beta1=0.9, beta2=0.95, eps=1e-8):
    """Loshchilov and Hutter's AdamW as torch defines it, in fp64, one step per gradient:
    decoupled decay w *= 1 - lr wd, then w -= lr m_hat / (sqrt(v_hat) + eps). -> w, m, v."""
    w, m, v = w.double().clone(), torch.zeros_like(w, dtype=torch.float64), torch.zeros_like(w, dtype=torch.float64)
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        g = g.double()
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat, v_hat = m / (1 - beta1 ** t), v / (1 - beta2 ** t)
        w = w * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps)
    return w, m, v


def fixed_gradient(p, seed):
    """A gradient whose entries span 1e-7 to 1e-1, so that eps matters for some of them."""
    g = torch.Generator().manual_seed(seed)
    scale = 10.0 ** -torch.empty(p.shape, dtype=torch.float64).uniform_(1, 7, generator=g)
    return (torch.randn(p.shape, generator=g, dtype=torch.float64) * scale).to(p.dtype)


def test_two_adamw_steps_equal_the_update_by_hand():
    """fp32 master weights (torch.optim.AdamW): two steps on fixed gradients, the learning rate
    changed between them as train.py's schedule does, equal AdamW written out by hand; the
    moments after the first step show the betas directly."""
    model = tiny_model()
    optimizer = train.make_optimizer(model, PAPER)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: [fixed_gradient(p, 2 * i), fixed_gradient(p, 2 * i + 1)]
             for i, (n, p) in enumerate(model.named_parameters())}
    lrs = [1e-3, 4e-4]  # large enough that every part of the update shows in fp32
    for step, lr in enumerate(lrs):
        for group in optimizer.param_groups:
            group["lr"] = lr
        for n, p in model.named_parameters():
            p.grad = grads[n][step].clone()
        optimizer.step()
        if step == 0:
            for n, p in model.named_parameters():
                g = grads[n][0].double()
                state = optimizer.state[p]
                torch.testing.assert_close(state["exp_avg"].double(), 0.1 * g, rtol=1e-6, atol=0)
                torch.testing.assert_close(state["exp_avg_sq"].double(), 0.05 * g * g, rtol=1e-6, atol=0)
    for n, p in model.named_parameters():
        wd = 0.0 if n.endswith("norm.weight") else 0.1
        want, _, _ = adamw_by_hand(start[n], grads[n], lrs, wd)
        moved = (want - start[n].double()).abs().max()
        assert moved > 1e-4  # the two steps really moved every tensor
        # fp32 weights of at most ~1.5: rounding, ~1e-7, is far below the update, ~1e-3
        torch.testing.assert_close(p.detach().double(), want, rtol=0, atol=1e-6, msg=n)


@pytest.mark.parametrize("tied", [False, True])
def test_weight_decay_is_on_the_matrices_only(tied):
    """Two groups, as the optimizer holds them: decay 0.1 on every matrix (embedding and output
    head included), none on the norms' gains; a tied head is one parameter, in the first."""
    model = tiny_model(tie_embeddings=tied)
    optimizer = train.make_optimizer(model, PAPER)
    groups = groups_by_name(model, optimizer)
    names = [n for n, _ in model.named_parameters()]
    matrices = sorted(n for n in names if not n.endswith("norm.weight"))
    norms = sorted(n for n in names if n.endswith("norm.weight"))
    assert len(norms) == 2 * model.args.n_layers + 1
    decayed = [g for g in groups if g[0] == 0.1]
    plain = [g for g in groups if g[0] == 0.0]
    assert len(decayed) == 1 and decayed[0][3] == matrices  # embeddings and output head too
    assert len(plain) == 1 and plain[0][3] == norms
    assert len(groups) == 2 and all(g[1] == (0.9, 0.95) for g in groups)
    assert ("output.weight" in matrices) != tied  # a tied head is the embedding: one parameter


class Constant(torch.nn.Module):
    """A matrix and a gain (named as the norms' are), each holding one value everywhere: the mean
    of the bf16 results is then an estimate of the expected value of every element."""

    def __init__(self, dtype):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((512, 512), 0.0123, dtype=dtype))
        self.norm = torch.nn.Module()
        self.norm.weight = torch.nn.Parameter(torch.full((262144,), 0.0123, dtype=dtype))


def test_bf16_master_weights_step_is_adamw_in_expectation():
    """--param_dtype bfloat16: optim.AdamW rounds the fp32 update stochastically into the bf16
    weights and moments. At LIMA's learning rate (1e-5) the update is below a bf16 step of the
    weight (0.0123: a step is 6e-5), so round-to-nearest would keep the old weight; the mean over
    many elements is the fp32 AdamW result, decay and moments included."""
    cfg = train.TrainConfig(param_dtype="bfloat16")
    model = Constant(torch.bfloat16)
    optimizer = train.make_optimizer(model, cfg)
    assert groups_by_name(model, optimizer) == [(0.1, (0.9, 0.95), 1e-8, ["weight"]),
                                                (0.0, (0.9, 0.95), 1e-8, ["norm.weight"])]
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr
    for n, p in model.named_parameters():
        p.grad = torch.full_like(p, 3e-4 if n == "weight" else -2e-3)
    # the values as bf16 holds them
    w0 = {n: p.detach().double().flatten()[0].item() for n, p in model.named_parameters()}
    g = {n: p.grad.double().flatten()[0].item() for n, p in model.named_parameters()}
    optimizer.step()
    for n, p in model.named_parameters():
        assert p.dtype == torch.bfloat16
        wd = 0.0 if n == "norm.weight" else 0.1
        want, m, v = adamw_by_hand(torch.tensor([w0[n]]), [torch.tensor([g[n]])], [cfg.lr], wd)
        got = p.detach().double()
        assert len(got.unique()) == 2  # each element landed on one of its two bf16 neighbours
        assert abs(got.mean().item() - want.item()) < 0.05 * cfg.lr, n
        state = optimizer.state[p]
        assert abs(state["exp_avg"].double().mean().item() - m.item()) < 1e-3 * abs(m.item())
        assert abs(state["exp_avg_sq"].double().mean().item() - v.item()) < 1e-3 * v.item()


# ---- one step of train.py: the loss mask, its normalisation, packing, the clip --------------------

class Recorder:
    """Stands in for the optimizer: keeps the gradients train_step hands to its step."""

    def __init__(self, model):
        self.params = dict(model.named_parameters())
        self.param_groups = [dict(params=list(self.params.values()), lr=0.0)]
        self.state = {}
        self.grads = None

    def step(self, closure=None):
        self.grads = {n: p.grad.detach().double().clone() for n, p in self.params.items()}

    def zero_grad(self, set_to_none=True):
        for p in self.params.values():
            p.grad = None


CONVERSATIONS = [
    ["the cat sat on a mat", "while river stones hum quietly"],
    ["tea", "seven happy robots answer questions about tea, maps, music", "and numbers?", "1 2 3 4 5"],
    ["under bright green lamps", "the cat sat"],
]


def by_hand(tok, turns):
    """LIMA's chat format written out: BOS, then each utterance and its EOT; the targets that
    train are the assistant's tokens and the EOT closing each of its turns (LIMA §3)."""
    tokens, trains = [tok.bos_id], [False]
    for i, text in enumerate(turns):
        ids = tok.encode(text) + [tok.eot_id]
        tokens += ids
        trains += [i % 2 == 1] * len(ids)
    return tokens, trains


def hand_loss_and_grads(model, tok, conversations):
    """Each example alone, from position 0, no packing: the sum of cross-entropies of the trained
    next-token targets over the whole step, divided by how many there are in the whole step."""
    model.zero_grad(set_to_none=True)
    total, count = 0.0, 0
    for turns in conversations:
        tokens, trains = by_hand(tok, turns)
        logits = model(torch.tensor([tokens[:-1]]))[0]  # (n - 1, V)
        picked = [j for j in range(len(tokens) - 1) if trains[j + 1]]
        total = total + F.cross_entropy(logits[picked], torch.tensor(tokens[1:])[picked], reduction="sum")
        count += len(picked)
    (total / count).backward()
    grads = {n: p.grad.detach().double().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return total.item() / count, count, grads


def step_batches(tok, conversations, micro):
    """The conversations as prepare_data stores them, packed by train.py into the micro-batches
    `micro` (lists of example indices). -> (micro-batches, trained targets in the step)."""
    enc = data.encode_examples([dict(turns=t, source="x", dropped=0) for t in conversations], tok, 2048)
    split = data.Split(enc.tokens, enc.mask, enc.offsets)
    for i, turns in enumerate(conversations):  # what is stored is the chat format by hand
        tokens, trains = split.example(i)
        assert (tokens.tolist(), trains.tolist()) == by_hand(tok, turns)
    batches = [train.pack(split, examples, torch.device("cpu"), tok.bos_id) for examples in micro]
    n = int(train.supervised_counts(split)[sorted(i for m in micro for i in m)].sum())
    return batches, n


def test_a_step_trains_on_the_mean_over_the_steps_trained_tokens(tmp_path, tok):
    """The gradient one train_step hands the optimizer, for three examples packed into two
    micro-batches, equals the gradient of the loss written out by hand: each example alone, only
    the assistant's tokens and their EOT, summed and divided by the step's count of such tokens."""
    model = tiny_model()
    want_loss, count, want = hand_loss_and_grads(model, tok, CONVERSATIONS)
    batches, n_supervised = step_batches(tok, CONVERSATIONS, [[0, 1], [2]])
    assert n_supervised == count
    recorder = Recorder(model)
    with process_group_of_one(tmp_path):
        loss, grad_norm = train.train_step(model, recorder, batches, n_supervised, grad_clip=0.0)  # 0: no clip
    assert loss == pytest.approx(want_loss, rel=1e-5)
    assert grad_norm == pytest.approx(math.sqrt(sum(g.square().sum().item() for g in want.values())), rel=1e-4)
    for name, g in want.items():
        assert (recorder.grads[name] - g).abs().max() <= 1e-4 * g.abs().max(), name


def test_an_example_trains_the_same_alone_and_packed(tmp_path, tok):
    """Packing isolation: an example packed behind two others, with its neighbours' targets
    all masked out, gives the loss and gradient it gives alone."""
    model = tiny_model()
    alone_batches, n = step_batches(tok, CONVERSATIONS, [[1]])
    packed_batches, _ = step_batches(tok, CONVERSATIONS, [[0, 2, 1]])
    x, y, cu = packed_batches[0]
    y = y.clone()
    y[0, :int(cu[2])] = IGNORE_INDEX  # only example 1's targets count
    results = []
    with process_group_of_one(tmp_path):
        for batches in (alone_batches, [(x, y, cu)]):
            recorder = Recorder(model)
            loss, _ = train.train_step(model, recorder, batches, n, grad_clip=0.0)
            results.append((loss, recorder.grads))
    (alone, ga), (packed, gp) = results
    assert packed == pytest.approx(alone, rel=1e-5)
    for name, g in ga.items():
        assert (gp[name] - g).abs().max() <= 1e-4 * g.abs().max(), name


def test_the_update_is_clipped_to_norm_one(tmp_path, tok):
    """The gradient that reaches the optimizer has norm at most the clip (1.0): scaled down as a
    whole, direction kept; train_step reports the norm before clipping; a smaller one is kept."""
    model = tiny_model(std=0.5)  # a gradient far above the clip
    batches, n = step_batches(tok, CONVERSATIONS, [[0, 1], [2]])
    with process_group_of_one(tmp_path):
        raw = Recorder(model)
        _, raw_norm = train.train_step(model, raw, batches, n, grad_clip=0.0)
        clipped = Recorder(model)
        _, norm = train.train_step(model, clipped, batches, n, grad_clip=PAPER.grad_clip)
        kept = Recorder(model)
        train.train_step(model, kept, batches, n, grad_clip=2 * raw_norm)
    by_hand_norm = math.sqrt(sum(g.square().sum().item() for g in raw.grads.values()))
    assert raw_norm == pytest.approx(by_hand_norm, rel=1e-5) and raw_norm > 3
    assert norm == pytest.approx(raw_norm, rel=1e-5)  # reported before clipping
    after = math.sqrt(sum(g.square().sum().item() for g in clipped.grads.values()))
    assert after == pytest.approx(1.0, rel=1e-5)
    for name, g in raw.grads.items():
        torch.testing.assert_close(clipped.grads[name], g / raw_norm, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(kept.grads[name], g, rtol=1e-6, atol=0)


# ---- the EOT rows (LIMA §3): the mean of the base's rows -------------------------------------------

@pytest.mark.parametrize("tied", [False, True])
def test_eot_rows_start_as_the_mean_of_the_base_rows(tmp_path, tiny_tokenizer_path, tied):
    """train.py's source of weights: a base without an EOT (LLaMA 1 / 2) gets a row appended to the
    embedding and to the output head, each the mean of the base's rows; a base whose own EOT row
    was never trained (Llama 3: zeros) gets that row set to the mean of the trained rows."""
    base = tiny_model(vocab_size=300, std=0.3, tie_embeddings=tied)
    checkpoint.save_model(base, str(tmp_path / "base"), tokenizer_path=tiny_tokenizer_path)
    cfg = train.TrainConfig(init_from=str(tmp_path / "base"))
    args = checkpoint.load_args(cfg.init_from)
    args.vocab_size = 301
    got = dict(train.source_weights(cfg, args, add_eot=True, eot_id=300))
    heads = ["tok_embeddings.weight"] + ([] if tied else ["output.weight"])
    assert ("output.weight" in got) != tied
    for name in heads:
        w, b = got[name].double(), dict(base.named_parameters())[name].detach().double()
        assert w.shape == (301, 64)
        assert torch.equal(w[:300], b)
        torch.testing.assert_close(w[300], b.mean(0), rtol=0, atol=1e-7)

    with torch.no_grad():  # the EOT as the base's own row, never trained: zeros (Llama 3)
        for name in heads:
            dict(base.named_parameters())[name][7] = 0
    checkpoint.save_model(base, str(tmp_path / "zero"), tokenizer_path=tiny_tokenizer_path)
    cfg = train.TrainConfig(init_from=str(tmp_path / "zero"))
    got = dict(train.source_weights(cfg, checkpoint.load_args(cfg.init_from), add_eot=False, eot_id=7))
    for name in heads:
        w, b = got[name].double(), dict(base.named_parameters())[name].detach().double()
        trained = [i for i in range(300) if i != 7]
        torch.testing.assert_close(w[7], b[trained].mean(0), rtol=0, atol=1e-7)
        assert torch.equal(w[trained], b[trained])


# ---- residual dropout (LIMA §3): 0 at the bottom layer rising linearly to p_max at the top ---------

def test_residual_dropout_rate_each_block_applies():
    """Each sub-block's output is replaced by ones (the other's by zeros), so what a block adds
    to the residual stream is dropout(ones): zeros at the dropped places, 1 / (1 - p) elsewhere.
    Measured per block and branch in train mode: the fraction dropped is p_l = 0.3 l / (L - 1);
    in eval mode nothing is dropped."""
    args = M.ModelArgs(dim=64, n_layers=4, n_heads=4, vocab_size=97, multiple_of=16, max_seq_len=512,
                       resid_dropout=0.3)
    model = M.Transformer(args)
    x = torch.randint(0, 97, (2, 256))  # 32,768 elements per block: the rate to within ~0.003
    rates = [0.3 * l / 3 for l in range(4)]
    for branch in ("attention", "feed_forward"):
        for mode in ("train", "eval"):
            getattr(model, mode)()
            added, hooks = [], []
            for layer in model.layers:
                for name in ("attention", "feed_forward"):
                    value = 1.0 if name == branch else 0.0
                    hooks.append(getattr(layer, name).register_forward_hook(
                        lambda mod, inp, out, value=value: torch.full_like(out, value)))
                hooks.append(layer.register_forward_hook(
                    lambda mod, inp, out: added.append((out - inp[0]).detach())))
            torch.manual_seed(0)
            with torch.no_grad():
                model(x)
            for h in hooks:
                h.remove()
            for layer_id, (d, p) in enumerate(zip(added, rates)):
                if mode == "eval":  # (x + 1) - x: 1 up to the rounding of x + 1
                    torch.testing.assert_close(d, torch.ones_like(d), rtol=0, atol=1e-6)
                    continue
                dropped = (d == 0).float().mean().item()
                assert abs(dropped - p) < 0.015, (branch, layer_id, dropped, p)
                kept = d[d != 0]
                torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - p)), rtol=1e-6, atol=0)


# ---- RMSNorm where eps matters --------------------------------------------------------------------

@pytest.mark.parametrize("scale,eps", [(1e-3, 1e-5), (1e-4, 1e-6), (1.0, 0.5)])
def test_every_rms_norm_of_the_model_is_the_formula_where_eps_matters(scale, eps):
    """y = x / sqrt(mean(x^2) + eps) * g (LLaMA), with the model's norm_eps, at activations small
    enough or eps large enough that eps is a large part of the denominator: every norm of the
    model, checked on the input it was given."""
    model = tiny_model(vocab_size=97, std=scale, norm_eps=eps)
    seen = []
    norms = [m for m in model.modules() if isinstance(m, M.RMSNorm)]
    assert len(norms) == 5
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append((mod, inp[0], out))) for m in norms]
    with torch.no_grad():
        model(torch.randint(0, 97, (1, 9)))
    for h in hooks:
        h.remove()
    assert len(seen) == 5
    for mod, x, y in seen:
        x64 = x.double()
        rms2 = x64.square().mean(-1, keepdim=True)
        if mod is norms[0]:  # the first norm sees the embedding: eps is a large part of it
            assert (eps / (rms2 + eps)).min() > 0.05
        want = x64 / (rms2 + eps).sqrt() * mod.weight.double()
        torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


# ---- decoding (LIMA §5): penalty, temperature, nucleus, stop, 2,048 tokens -------------------------

# The logits of a bigram model: row a is what follows token a. Token 0 is the prompt (and the
# likeliest first token, so penalising the prompt would show), 5 the end of turn. The nucleus of
# the first step is {0, 1, 2}: rows 3 to 5 are never read.
BIGRAM = [[2.2, 1.6, 1.7, 0.2, -1.0, 0.4],
          [1.5, 2.0, 0.8, 1.2, -0.5, 0.9],
          [-3.0, -2.4, -0.8, -3.5, -1.2, -2.6],  # negative: the penalty multiplies
          [1.0, -0.8, 1.4, 2.1, 0.9, 0.6],
          [-0.5, 1.1, 0.6, 1.2, 2.4, 0.7],
          [0.0] * 6]
PROMPT, EOT = 0, 5


def bigram_model(max_seq_len=64):
    """A real Transformer whose blocks add nothing (wo = w2 = 0): the logits after token a are the
    output head applied to a's normalised embedding, here one-hot rows, so they are BIGRAM[a]."""
    V, dim = len(BIGRAM), 16
    m = M.Transformer(M.ModelArgs(dim=dim, n_layers=1, n_heads=2, vocab_size=V, multiple_of=16,
                                  max_seq_len=max_seq_len))
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
        m.tok_embeddings.weight[:, :V] = 4 * torch.eye(V)  # rms 1: the norm leaves it as it is
        m.output.weight[:, :V] = torch.tensor(BIGRAM).T / 4
    return m.eval()


def lima_next(logits, generated):
    """One decoding step of LIMA §5, written out (fp64): each distinct token generated so far has
    its logit divided by 1.2 when positive, multiplied by 1.2 when negative (the prompt's tokens
    are not penalised); then temperature 0.7; then the smallest set of most likely tokens whose
    probability reaches 0.9, the token that crosses 0.9 included. -> probabilities (V,)."""
    logits = [float(x) for x in logits]
    for t in set(generated):
        logits[t] = logits[t] / 1.2 if logits[t] > 0 else logits[t] * 1.2
    e = [math.exp(x / 0.7) for x in logits]
    probs = [x / sum(e) for x in e]
    kept, mass = [], 0.0
    for t in sorted(range(len(probs)), key=lambda t: -probs[t]):
        kept.append(t)
        mass += probs[t]
        if mass >= 0.9:
            break
    out = [probs[t] if t in kept else 0.0 for t in range(len(probs))]
    return [p / sum(out) for p in out]


def test_each_decoding_step_samples_the_papers_distribution():
    """generate() with its defaults, 40,000 rows of the same one-token prompt, two steps each. The
    frequency of every (first, second) pair, and of stopping at the end of turn, is what LIMA §5
    gives by hand from the model's own logits (a plain forward, no cache): within 5 standard
    deviations, and exactly zero where the nucleus leaves a token out."""
    model = bigram_model()
    with torch.no_grad():
        logits = model(torch.arange(6)[None])[0]  # (6, 6): the row after each token
    torch.testing.assert_close(logits, torch.tensor(BIGRAM), rtol=0, atol=1e-4)
    V, N = 6, 40000
    want = np.zeros((V, V))  # [first, second]; a row that stops at once counts as [EOT, 0]
    first = lima_next(logits[PROMPT], [])
    for a in range(V):
        if a == EOT:
            want[a, 0] = first[a]
            continue
        want[a] += first[a] * np.array(lima_next(logits[a], [a]))
    out = generate.generate(model, [[PROMPT]] * N, stop_ids=(EOT,), max_new_tokens=2,
                            generator=torch.Generator().manual_seed(0))
    got = np.zeros((V, V))
    for row in out:
        assert EOT not in row  # the stop token ends the response and is not part of it
        if not row:
            got[EOT, 0] += 1
        elif len(row) == 1:  # the second token was the end of turn
            got[row[0], EOT] += 1
        else:
            got[row[0], row[1]] += 1
    expected = want * N
    sigma = np.sqrt(expected * (1 - want))
    assert (got[want == 0] == 0).all(), np.argwhere((want == 0) & (got > 0))
    z = np.abs(got - expected)[want > 0] / sigma[want > 0]
    assert z.max() < 5, (np.round(got / N, 4), np.round(want, 4))


def test_prompt_and_response_together_are_at_most_2048_tokens():
    """LIMA §5: at most 2,048 tokens in all. A model with a longer context, a 2,040-token prompt,
    no stop token: the response is exactly 8 tokens long."""
    model = bigram_model(max_seq_len=4096)
    out = generate.generate(model, [[PROMPT] * 2040], stop_ids=(), generator=torch.Generator().manual_seed(0))
    assert len(out[0]) == 8


# ---- the training loop as it runs: schedule, groups, clip, EOT rows, trimming ----------------------

def words(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def test_the_training_loop_applies_the_recipe_at_every_step(tmp_path, tok, tiny_tokenizer_path, monkeypatch):
    """train.py's main, in this process, with the paper's optimizer, schedule, clip and dropout
    (only epochs and batch size made small), watched at every step as train_step receives it:
    the learning rate the optimizer holds falls linearly from 1e-5 at the first step to 1e-6 at
    the last, no warmup; the groups are AdamW (0.9, 0.95) with decay 0.1 on the matrices; the
    gradient the optimizer steps on has norm min(raw, 1); the step's count of trained tokens is
    that of all its micro-batches; before the first step the EOT rows are the mean of the
    base's rows; an example longer than 2,048 tokens arrives trimmed to its first 2,048."""
    rng = random.Random(0)
    rows = [{"conversations": [words(rng, rng.randint(2, 6)), words(rng, rng.randint(3, 20))]} for _ in range(10)]
    rows.append({"conversations": ["tea", words(rng, 1500)]})  # > 2,048 tokens
    rows.append({"conversations": ["maps", words(rng, 8), "music", words(rng, 5)]})
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare_data.main(["--train", str(tmp_path / "train.jsonl"), "--tokenizer", tiny_tokenizer_path,
                       "--out_dir", str(tmp_path / "data"), "--dev_size", "0"])  # max_len: the default
    split = data.load_split(tmp_path / "data", "train")
    long_tokens, long_mask = tok.encode_dialog(rows[10]["conversations"])
    assert len(long_tokens) > 2100
    stored = [i for i in range(len(split)) if split.lengths[i] == 2048]
    assert len(stored) == 1 and split.lengths.max() == 2048
    tokens, mask = split.example(stored[0])
    assert tokens.tolist() == long_tokens[:2048] and mask.tolist() == long_mask[:2048]  # the start kept

    base = tiny_model(vocab_size=300, std=0.3)  # no EOT row yet, as a LLaMA 1 / 2 base
    checkpoint.save_model(base, str(tmp_path / "base"), tokenizer_path=tiny_tokenizer_path)
    base_rows = {"tok_embeddings.weight": base.tok_embeddings.weight.detach().double(),
                 "output.weight": base.output.weight.detach().double()}

    seen = []
    real_step = train.train_step

    def watch(model, optimizer, micro_batches, n_supervised, grad_clip):
        record = dict(lr=[g["lr"] for g in optimizer.param_groups],
                      groups=groups_by_name(model, optimizer), n_supervised=n_supervised,
                      counted=sum(int((y != IGNORE_INDEX).sum()) for _, y, _ in micro_batches),
                      longest=max(int((cu[1:] - cu[:-1]).max()) for _, _, cu in micro_batches),
                      dropout=[layer.resid_dropout for layer in model.layers], training=model.training)
        if not seen:
            params = dict(model.named_parameters())
            record["eot_rows"] = {n: (full(params[n])[300], full(params[n])[:300]) for n in base_rows}

        def at_step(opt, args, kwargs):
            record["stepped_norm"] = math.sqrt(sum(full(p.grad).square().sum().item()
                                                   for g in opt.param_groups for p in g["params"]))
        hook = optimizer.register_step_pre_hook(at_step)
        try:
            out = real_step(model, optimizer, micro_batches, n_supervised, grad_clip)
        finally:
            hook.remove()
        seen.append(record)
        return out

    monkeypatch.setattr(train, "train_step", watch)
    train.main(["--init_from", str(tmp_path / "base"), "--data_dir", str(tmp_path / "data"),
                "--out_dir", str(tmp_path / "out"), "--epochs", "2", "--batch_size", "4",
                "--save_epochs", "2", "--micro_batch_tokens", "64"])
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]

    steps = 2 * math.ceil(len(split) / 4)
    assert len(seen) == len(metrics) == steps == 6
    lrs = [1e-5 + (1e-6 - 1e-5) * s / (steps - 1) for s in range(steps)]  # LIMA §3, by hand
    for s, (record, logged) in enumerate(zip(seen, metrics)):
        assert record["lr"] == pytest.approx([lrs[s]] * 2, rel=1e-9, abs=0), s
        assert logged["lr"] == pytest.approx(lrs[s], rel=1e-9)
        decayed, plain = sorted(record["groups"], reverse=True)
        assert decayed[:3] == (0.1, (0.9, 0.95), 1e-8) and plain[:3] == (0.0, (0.9, 0.95), 1e-8)
        assert all(not n.endswith("norm.weight") for n in decayed[3])
        assert all(n.endswith("norm.weight") for n in plain[3]) and len(plain[3]) == 5
        assert record["n_supervised"] == record["counted"] == logged["supervised_tokens"]
        assert record["training"] and record["dropout"] == pytest.approx([0.0, 0.3])  # p_max 0.3, 2 layers
        # the optimizer steps on the clipped gradient: its norm is min(raw norm, 1.0)
        assert record["stepped_norm"] == pytest.approx(min(logged["grad_norm"], 1.0), rel=1e-4), s
    assert min(m["grad_norm"] for m in metrics) > 1.5  # every step was one the clip acts on
    assert max(r["longest"] for r in seen) == 2047  # the trimmed example: 2,048 tokens, 2,047 targets
    for name, (eot, rows_) in seen[0]["eot_rows"].items():
        torch.testing.assert_close(rows_, base_rows[name])
        torch.testing.assert_close(eot, base_rows[name].mean(0), rtol=0, atol=1e-7)


# ---- the numbers themselves ------------------------------------------------------------------------

def test_the_papers_numbers_are_the_defaults():
    # LIMA §3; the clip is ours (the paper is silent): LLaMA's pretraining value
    assert (PAPER.beta1, PAPER.beta2, PAPER.weight_decay, PAPER.lr, PAPER.min_lr) == (0.9, 0.95, 0.1, 1e-5, 1e-6)
    assert (PAPER.grad_clip, PAPER.resid_dropout, PAPER.epochs, PAPER.batch_size) == (1.0, 0.3, 15, 32)
    assert prepare_data.PrepareConfig().max_len == 2048
    d = generate.Decoding()  # LIMA §5
    assert (d.temperature, d.top_p, d.repetition_penalty, d.max_seq_len) == (0.7, 0.9, 1.2, 2048)
    assert d.penalize_prompt is False and d.max_new_tokens is None
