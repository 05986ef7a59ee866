"""sample.py: the paper's decoding (LIMA §5) on hand-made logits, the KV-cache decode loop
against a plain no-cache greedy loop, batching, stopping, layer placement, and the CLI."""

import io
import json
import os

import pytest
import torch

import checkpoint
import data
import devices
import generate
import sample
from model import Transformer, model_args
from tokenizer import load_tokenizer

GREEDY = dict(temperature=0.0, top_p=0.9, repetition_penalty=1.2)


def tiny_model(vocab_size, seed=0, **overrides):
    torch.manual_seed(seed)
    # default nn init (not init_weights' 0.02): logits spread enough that greedy picks
    # are far from ties, so cache/no-cache and batch/single agree exactly
    return Transformer(model_args("debug", vocab_size=vocab_size, **overrides)).eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny matmuls: more threads only add sync cost, and on a busy 2-core box OpenMP spinning
    # makes them ~100x slower
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_path):
    return load_tokenizer(tiny_tokenizer_path)


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok.vocab_size)


def prompts_of(tok, texts):
    return [tok.encode_dialog([t])[0] for t in texts]


# ---- LIMA §5 on hand-made logits ------------------------------------------------------------

def test_repetition_penalty_divides_positive_multiplies_negative_once_per_token():
    logits = torch.tensor([[2.4, -1.0, 0.6, 3.0, 0.0]])
    # token 0 occurred three times, token 1 once, token 4 (logit 0) once: each penalised once
    ids = torch.tensor([[0, 0, 1, 0, 4]])
    want = torch.tensor([[2.4 / 1.2, -1.0 * 1.2, 0.6, 3.0, 0.0]])
    torch.testing.assert_close(generate.apply_repetition_penalty(logits, ids, 1.2), want)
    mask = torch.tensor([[True, True, False, False, True]])
    torch.testing.assert_close(generate.apply_repetition_penalty(logits, mask, 1.2), want)
    assert generate.apply_repetition_penalty(logits, mask, 1.0) is logits


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.1, 0.5, 0.15, 0.25]])  # sorted: 0.5, 0.25, 0.15, 0.1
    logits = probs.log()
    kept = lambda p: torch.isfinite(generate.top_p_filter(logits, p))[0].tolist()
    assert kept(0.3) == [False, True, False, False]  # 0.5 alone reaches 0.3
    assert kept(0.6) == [False, True, False, True]  # 0.5 + 0.25 = 0.75 >= 0.6
    assert kept(0.8) == [False, True, True, True]  # 0.9 >= 0.8
    assert kept(0.95) == [True, True, True, True]
    assert kept(1.0) == [True, True, True, True]
    assert kept(1e-9) == [False, True, False, False]  # always at least one
    # kept logits are unchanged, so the renormalised distribution is p / kept mass
    out = generate.top_p_filter(logits, 0.6)
    torch.testing.assert_close(out.softmax(-1), torch.tensor([[0, 0.5 / 0.75, 0, 0.25 / 0.75]]))
    # rows are independent
    two = torch.stack([logits[0], logits[0].flip(0)])
    assert torch.isfinite(generate.top_p_filter(two, 0.3)).tolist() == [
        [False, True, False, False], [False, False, True, False]]


def test_order_is_penalty_then_temperature_then_top_p():
    g = torch.Generator().manual_seed(0)
    many = lambda row: row.expand(4000, -1).contiguous()
    # temperature before top-p: at T=0.5 logits [2, 1, 0] give probs [0.867, 0.117, 0.016], so
    # p = 0.8 keeps token 0 alone; at T=1 (probs [0.665, 0.245, 0.09]) it would keep two
    x = many(torch.tensor([[2.0, 1.0, 0.0]]))
    out = generate.sample_next(x, None, temperature=0.5, top_p=0.8, generator=g)
    assert out.unique().tolist() == [0]
    out = generate.sample_next(x, None, temperature=1.0, top_p=0.8, generator=g)
    assert out.unique().tolist() == [0, 1]
    # penalty before top-p: logits [2.0, 1.8, -5]; penalising token 0 gives [1.667, 1.8, -5],
    # so token 1 becomes the most likely and with p = 0.5 the only one kept
    x = many(torch.tensor([[2.0, 1.8, -5.0]]))
    pen = torch.zeros_like(x, dtype=torch.bool)
    pen[:, 0] = True
    out = generate.sample_next(x, pen, temperature=1.0, top_p=0.5, repetition_penalty=1.2, generator=g)
    assert out.unique().tolist() == [1]
    # greedy (temperature 0) is argmax of the penalised logits
    out = generate.sample_next(x[:1], pen[:1], temperature=0.0, repetition_penalty=1.2)
    assert out.tolist() == [1]


def test_sampling_frequencies_follow_the_nucleus():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = (probs.log() * 0.7).expand(40000, -1).contiguous()  # T = 0.7 undoes the 0.7
    ids = generate.sample_next(logits, None, temperature=0.7, top_p=0.85,
                             generator=torch.Generator().manual_seed(1))
    freq = torch.bincount(ids, minlength=4).float() / len(ids)
    torch.testing.assert_close(freq, torch.tensor([4, 3, 2, 0]) / 9, atol=0.01, rtol=0)


# ---- the decode loop ---------------------------------------------------------------------------

def test_cached_logits_equal_full_forward(model, tok):
    prompts = prompts_of(tok, ["the cat sat on a mat while river stones hum", "tea", "maps and music"])
    lengths = torch.tensor([len(p) for p in prompts])
    T = int(lengths.max())
    extra = torch.randint(3, 300, (3, 20))  # continuations, fed one token at a time
    full = [torch.cat([torch.tensor(p), extra[i]]) for i, p in enumerate(prompts)]
    model.setup_cache(3, T + 7)  # too short on purpose: grown at step 7
    padded = torch.stack([torch.cat([torch.tensor(p), torch.full((T - len(p),), p[-1])])
                          for p in prompts])
    with torch.no_grad():
        got = [generate.prefill(model, padded, lengths)]
        for i in range(extra.shape[1]):
            if i == 7:
                model.grow_cache(T + 40)  # contents survive the growth
            # odd steps read the cache only up to the furthest row (what eager decoding does)
            cache_len = int((lengths + i).max()) + 1 if i % 2 else None
            got.append(generate.decode_one(model, extra[:, i:i + 1], (lengths + i)[:, None], cache_len))
        model.clear_cache()
        for b, seq in enumerate(full):
            want = model(seq[None])[0]  # (len, V), no cache
            n = len(prompts[b])
            for i, logits in enumerate(got):
                torch.testing.assert_close(logits[b], want[n - 1 + i], atol=1e-4, rtol=1e-4)


def reference_greedy(model, prompt, n, stop, penalty=1.2, penalize_prompt=False):
    """The plainest greedy loop: whole forward each step, no cache, penalty by hand."""
    ids = list(prompt)
    out = []
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, -1].tolist()
        for t in set(out) | (set(prompt) if penalize_prompt else set()):
            logits[t] = logits[t] * penalty if logits[t] < 0 else logits[t] / penalty
        t = max(range(len(logits)), key=logits.__getitem__)
        if t in stop:
            break
        out.append(t)
        ids.append(t)
    return out


@pytest.mark.parametrize("penalize_prompt", [False, True])
def test_greedy_matches_independent_loop_and_is_deterministic(model, tok, penalize_prompt):
    prompt = prompts_of(tok, ["seven happy robots answer questions about tea"])[0]
    kw = dict(stop_ids=(tok.eot_id,), max_new_tokens=24, penalize_prompt=penalize_prompt, **GREEDY)
    first = generate.generate(model, [prompt], **kw)[0]
    assert first == generate.generate(model, [prompt], **kw)[0]
    assert first == reference_greedy(model, prompt, 24, {tok.eot_id}, 1.2, penalize_prompt)
    assert len(first) == 24 or tok.eot_id in reference_greedy(model, prompt, 25, set())


def test_generation_stops_at_its_stop_token_per_row(model, tok):
    prompts = prompts_of(tok, ["tea", "the cat sat on a mat", "numbers 1 2 3"])
    free = generate.generate(model, prompts, stop_ids=(), max_new_tokens=16, **GREEDY)
    stop = free[1][5]  # a token row 1 makes; each row must end just before its first one
    got = generate.generate(model, prompts, stop_ids=(stop,), max_new_tokens=16, **GREEDY)
    for f, g in zip(free, got):
        assert g == (f[:f.index(stop)] if stop in f else f)
    assert len(got[1]) <= 5


def test_stops_at_eot(model, tok):
    import copy
    prompt = prompts_of(tok, ["the cat sat on a mat"])[0]
    free = generate.generate(model, [prompt], stop_ids=(), max_new_tokens=16, **GREEDY)[0]
    assert tok.eot_id not in free
    t = free[4]
    # swap t's and EOT's output rows: the model now says EOT exactly where it said t before,
    # and everything up to there is unchanged
    swapped = copy.deepcopy(model)
    with torch.no_grad():
        w = swapped.output.weight
        w[[t, tok.eot_id]] = w[[tok.eot_id, t]]
    cut = free[:free.index(t)]
    got = generate.generate(swapped, [prompt], stop_ids=generate.stop_ids(tok), max_new_tokens=16,
                          **GREEDY)[0]
    assert got == cut
    text = generate.respond(swapped, tok, [["the cat sat on a mat"]], max_new_tokens=16, **GREEDY)
    assert text == [tok.decode(cut)]


def test_batched_equals_one_by_one(model, tok):
    texts = ["tea", "the cat sat on a mat while river stones hum quietly under bright green lamps",
             "maps", "seven happy robots", "1 2 3 4 5 numbers"]
    prompts = prompts_of(tok, texts)
    context = max(map(len, prompts)) + 12  # the long prompt's budget ends first
    for kw in (dict(max_new_tokens=20), dict(max_seq_len=context)):
        batched = generate.generate(model, prompts, stop_ids=(tok.eot_id,), **kw, **GREEDY)
        single = [generate.generate(model, [p], stop_ids=(tok.eot_id,), **kw, **GREEDY)[0]
                  for p in prompts]
        assert batched == single
        if "max_seq_len" in kw:
            assert all(len(p) + len(r) <= context for p, r in zip(prompts, batched))
            assert len(prompts[1]) + len(batched[1]) == context


def test_generate_leaves_the_model_as_it_found_it(model, tok):
    model.train()
    generate.generate(model, prompts_of(tok, ["tea"]), stop_ids=(), max_new_tokens=3)
    assert model.training and model.layers[0].attention.kv_cache is None
    model.eval()


def test_sampling_is_repeatable_with_a_seed(model, tok):
    prompts = prompts_of(tok, ["tea", "maps and music"])
    run = lambda seed: generate.generate(model, prompts, stop_ids=(), max_new_tokens=12,
                                       generator=torch.Generator().manual_seed(seed))
    assert run(3) == run(3)
    assert run(3) != run(4)


def test_vocab_cap_never_samples_padding_rows(tok):
    m = tiny_model(320)  # tokenizer 301 + 19 padding rows
    with torch.no_grad():
        m.output.weight[301:] = m.output.weight[5] * 50  # padding rows would win everything
    out = generate.generate(m, [[1, 5]], stop_ids=(), max_new_tokens=8, vocab_size=301,
                          generator=torch.Generator().manual_seed(0))
    assert all(t < 301 for t in out[0])


def test_errors_on_empty_and_too_long_prompts(model):
    with pytest.raises(generate.PromptError, match="empty"):
        generate.generate(model, [[]], stop_ids=())
    with pytest.raises(generate.PromptError, match="no room"):
        generate.generate(model, [[1] * 256], stop_ids=())  # debug context is 256


# ---- issue 16: continuous batching, the prefill's logits, the cache layout, streaming -------------

def varied_stops(model, tok, prompts, n=24):
    """Stop tokens that end the greedy answers of these prompts at different lengths, and those
    answers as each prompt decoded alone gives them."""
    import collections
    free = [generate.generate(model, [p], stop_ids=(), max_new_tokens=n, **GREEDY)[0] for p in prompts]
    counts = collections.Counter(t for f in free for t in f)
    # tokens only one answer says, each later than the last: answers end at different steps
    stops = set()
    for f in free:
        t = next((t for t in f[2 + 7 * len(stops):] if counts[t] == 1), None)
        stops |= {t} - {None}
    alone = [generate.generate(model, [p], stop_ids=stops, max_new_tokens=n, **GREEDY)[0] for p in prompts]
    return stops, alone


def test_continuous_batching_answers_as_each_prompt_alone(model, tok, monkeypatch):
    texts = ["tea", "the cat sat on a mat while river stones hum", "maps and music", "seven happy robots",
             "1 2 3 4 5 numbers", "green lamps", "river stones answer questions"]
    prompts = prompts_of(tok, texts)
    stops, alone = varied_stops(model, tok, prompts)
    assert len({len(a) for a in alone}) >= 3  # answers end at different steps
    admitted = []
    real = generate.prefill
    monkeypatch.setattr(generate, "prefill", lambda m, t, *a: admitted.append(len(t)) or real(m, t, *a))
    for batch_size in (1, 2, 3, 7):
        admitted.clear()
        got = dict(generate.decode(model, prompts, stop_ids=stops, batch_size=batch_size,
                                   max_new_tokens=24, **GREEDY))
        assert [got[i] for i in range(len(prompts))] == alone
        assert sum(admitted) == len(prompts) and admitted[0] == batch_size
        if batch_size == 3:  # rows are refilled as their answers end: more prefills than the
            assert len(admitted) > 3  # three of fixed batches (3 + 3 + 1)


def test_continuous_batching_samples_each_prompt_from_its_own_seed(model, tok):
    prompts = prompts_of(tok, ["tea", "the cat sat on a mat", "maps", "music and numbers 1 2 3", "robots"])
    seeds = [generate.prompt_seed(7, i) for i in range(len(prompts))]
    kw = dict(stop_ids=(tok.eot_id,), max_new_tokens=16, temperature=0.7, top_p=0.9, repetition_penalty=1.2)

    def run(order, batch_size):
        out = dict(generate.decode(model, [prompts[i] for i in order], seeds=[seeds[i] for i in order],
                                   batch_size=batch_size, **kw))
        return [out[order.index(i)] for i in range(len(prompts))]
    alone = [generate.generate(model, [p], seeds=[s], **kw)[0] for p, s in zip(prompts, seeds)]
    assert run([0, 1, 2, 3, 4], 2) == alone
    assert run([4, 2, 0, 3, 1], 3) == alone
    assert run([1, 0, 2, 3, 4], 5) == alone
    other = [generate.generate(model, [p], seeds=[generate.prompt_seed(8, i)], **kw)[0]
             for i, p in enumerate(prompts)]
    assert other != alone


def test_uninitialised_cache_memory_is_never_read(model, tok, monkeypatch):
    # the KV cache is allocated empty, not zeroed: fill its unwritten slots with NaN, as reused
    # memory may hold, and decode as above (ragged prefills, a grown cache, rows refilled and
    # dropped). Every slot attention reads must have been written or zeroed first: a hidden
    # slot's NaN would come through the mask (its weight 0 times NaN).
    import model as M
    init = M.KVCache.__init__

    def poisoned(self, *args, **kw):
        init(self, *args, **kw)
        self.k[:, :, self.clean:] = float("nan")
        self.v[:, :, self.clean:] = float("nan")
    monkeypatch.setattr(M.KVCache, "__init__", poisoned)
    test_cached_logits_equal_full_forward(model, tok)
    test_continuous_batching_answers_as_each_prompt_alone(model, tok, monkeypatch)
    # a row refilled with a prompt longer than any slot read so far, beside a row still decoding
    short, other, long = prompts_of(tok, ["tea", "green lamps", "the cat sat on a mat while river stones hum"])
    extra = torch.randint(3, 300, (4,)).tolist()
    with torch.no_grad():
        model.setup_cache(2, 64)
        lengths = torch.tensor([len(short), len(other)])
        T = int(lengths.max())
        padded = torch.tensor([short + [short[-1]] * (T - len(short)), other])
        generate.prefill(model, padded, lengths)
        pos = lengths.clone()
        for t in extra[:2]:  # both rows decode two tokens
            generate.decode_one(model, torch.tensor([[t], [t]]), pos[:, None], int(pos.max()) + 1)
            pos += 1
        assert len(long) > int(pos.max()) + 1
        generate.prefill(model, torch.tensor([long]), torch.tensor([len(long)]), torch.tensor([0]))
        pos[0] = len(long)
        got = generate.decode_one(model, torch.tensor([[extra[2]], [extra[2]]]), pos[:, None], int(pos.max()) + 1)
        model.clear_cache()
        want = model(torch.tensor([other + extra[:3]]))[0, -1]
    torch.testing.assert_close(got[1], want, atol=1e-4, rtol=1e-4)


def test_prefill_computes_only_the_last_prompt_logits(model, tok, monkeypatch):
    prompts = prompts_of(tok, ["the cat sat on a mat while river stones hum", "tea"])
    lengths = torch.tensor([len(p) for p in prompts])
    T = int(lengths.max())
    padded = torch.tensor([p + [p[-1]] * (T - len(p)) for p in prompts])
    rows = []
    real = model.output.forward
    monkeypatch.setattr(model.output, "forward", lambda h: rows.append(h.shape[:-1].numel()) or real(h))
    for chunk in (T, 5):  # the prompts in one go, and in chunks of 5 positions
        monkeypatch.setattr(generate, "PREFILL_TOKENS", 2 * chunk)
        rows.clear()
        model.setup_cache(2, T)
        with torch.no_grad():
            got = generate.prefill(model, padded, lengths)
        model.clear_cache()
        assert rows == [2] * -(-T // chunk)  # one position per row reaches the head, in every chunk
        with torch.no_grad():
            for b, p in enumerate(prompts):
                torch.testing.assert_close(got[b], model(torch.tensor([p]))[0, -1], atol=1e-5, rtol=1e-5)


def test_decoding_reads_the_cache_only_up_to_the_furthest_row(model, tok, monkeypatch):
    prompts = prompts_of(tok, ["tea", "the cat sat on a mat"])
    read = []  # the keys' length of every cached attention (a decode step: one query per row)
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, *a, **kw: (q.shape[2] == 1 and read.append(k.shape[2])) or real(q, k, *a, **kw))
    [out] = generate.generate(model, [prompts[1]], stop_ids=(), max_new_tokens=6, **GREEDY)
    assert generate.CACHE_STEP > len(prompts[1]) + 6  # the cache is longer than what is read
    # the first: the prefill's last layer, where each row's one query (its last prompt token)
    # reads the prompt's keys; then a decode step's, each layer in turn
    assert read[0] == len(prompts[1])
    per_layer = read[1::model.args.n_layers]
    assert per_layer == list(range(len(prompts[1]) + 1, len(prompts[1]) + 6))
    read.clear()
    generate.generate(model, prompts, stop_ids=(), max_new_tokens=3, **GREEDY)
    assert read[1::model.args.n_layers] == [len(prompts[1]) + 1, len(prompts[1]) + 2]  # the longer row


def test_the_cache_grows_by_doubling(model, tok, monkeypatch):
    assert [generate.cache_length(n, c, 300) for n, c in ((10, 0), (65, 64), (300, 128), (257, 256))] == \
        [64, 128, 300, 300]  # a multiple of CACHE_STEP, at least double, at most the context
    monkeypatch.setattr(generate, "CACHE_STEP", 4)
    lengths = []
    real = model.grow_cache
    monkeypatch.setattr(model, "grow_cache", lambda n: lengths.append(n) or real(n))
    [prompt] = prompts_of(tok, ["tea"])
    [out] = generate.generate(model, [prompt], stop_ids=(), max_new_tokens=60, **GREEDY)
    n = 4 * -(-len(prompt) // 4)  # the first cache: the prompt, rounded up
    want = []
    while n < len(prompt) + 59:  # the last token fed sits at len(prompt) + 58
        n *= 2
        want.append(n)
    assert len(out) == 60 and lengths == want and len(want) <= 4


def test_cache_is_stored_in_the_layout_attention_reads(model):
    model.setup_cache(3, 40)
    cache = model.layers[0].attention.kv_cache
    args = model.args
    assert cache.k.shape == (3, args.kv_heads, 40, args.head_dim) and cache.k.is_contiguous()
    assert model.cache_shape() == (3, 40)
    model.clear_cache()


def test_text_streamer_prints_the_decoded_text_in_linear_time(tok, llama3_tokenizer_files):
    from tokenizer import load_tokenizer as load
    g = torch.Generator().manual_seed(0)
    for t in (tok, load(llama3_tokenizer_files["json"])):
        text = "Tea: 1 2 3, with Ümlaut and 🍵 emoji.\n\nThe cat sat  on a mat."
        for ids in (t.encode(text * 3), torch.randint(3, t.n_base, (300,), generator=g).tolist()):
            decoded = []
            real = t.decode
            t.decode = lambda x, real=real: decoded.append(len(x)) or real(x)
            out = io.StringIO()
            streamer = sample.TextStreamer(t, out)
            for i in ids:
                streamer.put(i)
            streamer.end()
            del t.decode
            assert out.getvalue() == t.decode(ids) + "\n"
            assert sum(decoded) < 12 * len(ids)  # a window per token, not the whole response


# ---- layers on several devices -----------------------------------------------------------------

def test_placement_plan_is_contiguous_and_balanced():
    args = model_args("debug", n_layers=8)
    plan = devices.placement_plan(args, ["cuda:0", "cuda:1"])
    order = ["tok_embeddings"] + [f"layers.{i}" for i in range(8)] + ["norm", "output"]
    assert list(plan) == order
    devs = [plan[k] for k in order]
    assert devs == sorted(devs) and devs[0] == "cuda:0" and devs[-1] == "cuda:1"
    assert plan["norm"] == plan["output"]
    n0 = sum(1 for k in order if k.startswith("layers.") and plan[k] == "cuda:0")
    assert n0 == 4  # embedding and head weigh the same; the layers split evenly
    plan4 = devices.placement_plan(model_args("debug", n_layers=16), [f"cuda:{i}" for i in range(4)])
    counts = [sum(1 for k, d in plan4.items() if k.startswith("layers.") and d == f"cuda:{i}")
              for i in range(4)]
    assert sorted(counts)[0] >= 3 and sum(counts) == 16


def test_placed_model_generates_the_same(tok):
    ref = tiny_model(tok.vocab_size, seed=1, n_layers=4)
    placed = tiny_model(tok.vocab_size, seed=1, n_layers=4)
    plan = devices.placement_plan(placed.args, ["cpu", "cpu"])
    devices.place_model(placed, plan)
    prompts = prompts_of(tok, ["tea", "the cat sat"])
    kw = dict(stop_ids=(), max_new_tokens=10, **GREEDY)
    assert generate.generate(placed, prompts, **kw) == generate.generate(ref, prompts, **kw)


def test_tied_embedding_sits_with_the_head(tok):
    # Llama 3.2: one weight for the embedding and the head, so one device for both
    args = model_args("debug", n_layers=8, tie_embeddings=True)
    plan = devices.placement_plan(args, ["cuda:0", "cuda:1"])
    assert plan["tok_embeddings"] == plan["output"] == plan["norm"] == "cuda:1"
    assert sum(1 for k, d in plan.items() if k.startswith("layers.") and d == "cuda:0") >= 4
    ref = tiny_model(tok.vocab_size, seed=1, n_layers=4, tie_embeddings=True)
    placed = devices.place_model(tiny_model(tok.vocab_size, seed=1, n_layers=4, tie_embeddings=True),
                                 devices.placement_plan(ref.args, ["cpu", "cpu"]))
    assert placed.output.weight is placed.tok_embeddings.weight
    prompts = prompts_of(tok, ["tea", "the cat sat"])
    kw = dict(stop_ids=(), max_new_tokens=10, **GREEDY)
    assert generate.generate(placed, prompts, **kw) == generate.generate(ref, prompts, **kw)


# ---- respond, files, and the command line ------------------------------------------------------

@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory, tiny_tokenizer_path, tok):
    path = str(tmp_path_factory.mktemp("ckpt") / "chat")
    checkpoint.save_model(tiny_model(tok.vocab_size, seed=2), path, tokenizer_path=tiny_tokenizer_path)
    return path


@pytest.fixture(scope="module")
def chat(chat_dir):
    return checkpoint.load_model_and_tokenizer(chat_dir)


def run_main(argv, capsys):
    sample.main(argv)
    return capsys.readouterr()


def fail_main(argv, capsys):
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    assert e.value.code != 0
    return capsys.readouterr().err


def test_cli_prompt_prints_only_the_response(chat_dir, chat, capsys):
    model, tok = chat
    want = generate.respond(model, tok, [["the cat sat"]], max_new_tokens=12, **GREEDY)[0]
    got = run_main(["--checkpoint", chat_dir, "--prompt", "the cat sat", "--temperature", "0",
                    "--max_new_tokens", "12"], capsys)
    assert got.out == want + "\n"
    assert "parameters" in got.err  # logs go to stderr


def test_cli_layers_split_over_devices(chat_dir, capsys):
    # --device a,b loads each tensor straight onto its planned device (load_placed)
    argv = ["--checkpoint", chat_dir, "--prompt", "maps", "--temperature", "0",
            "--max_new_tokens", "10"]
    one = run_main(argv, capsys)
    two = run_main(argv + ["--device", "cpu,cpu"], capsys)
    assert two.out == one.out and "on cpu, cpu" in two.err


def test_cli_seed_repeats(chat_dir, capsys):
    argv = ["--checkpoint", chat_dir, "--prompt", "tea", "--max_new_tokens", "12", "--seed", "7"]
    assert run_main(argv, capsys).out == run_main(argv, capsys).out


def test_cli_errors(chat_dir, tiny_tokenizer_path, tmp_path, capsys):
    assert "no such" in fail_main(["--checkpoint", str(tmp_path / "nope"), "--prompt", "hi"], capsys)
    assert "empty" in fail_main(["--checkpoint", chat_dir, "--prompt", ""], capsys)
    assert "empty" in fail_main(["--checkpoint", chat_dir, "--prompt", "   "], capsys)
    assert "empty" in fail_main(["--checkpoint", chat_dir], capsys)
    err = fail_main(["--checkpoint", chat_dir, "--prompt", "the cat sat on a mat " * 20,
                     "--max_seq_len", "64"], capsys)
    assert "no room" in err and "64" in err
    # a model whose vocabulary fits another tokenizer
    other = str(tmp_path / "other")
    checkpoint.save_model(tiny_model(512, seed=3), other)
    err = fail_main(["--checkpoint", other, "--tokenizer", tiny_tokenizer_path, "--prompt", "hi"],
                    capsys)
    assert "512" in err and "tokenizer" in err


def test_cli_base_model_needs_raw(tiny_tokenizer_path, tok, tmp_path, capsys):
    base = str(tmp_path / "base")
    checkpoint.save_model(tiny_model(tok.eot_id, seed=4), base, tokenizer_path=tiny_tokenizer_path)
    err = fail_main(["--checkpoint", base, "--prompt", "the cat"], capsys)
    assert "--raw" in err and "end-of-turn" in err
    out = run_main(["--checkpoint", base, "--prompt", "the cat", "--raw", "--max_new_tokens", "6",
                    "--temperature", "0"], capsys).out
    m, _ = checkpoint.load_model_and_tokenizer(base)
    ids = generate.generate(m, [[tok.bos_id] + tok.encode("the cat")], stop_ids=(tok.eos_id,),
                          max_new_tokens=6, **GREEDY)[0]
    assert out == tok.decode(ids) + "\n"


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_cli_prompt_file_jsonl_resumes(chat_dir, chat, tmp_path, capsys):
    model, tok = chat
    rows = [{"conversations": ["tea"], "source": "a"},
            {"conversations": ["the cat sat", "a reference answer"], "source": "b"},  # ref dropped
            {"conversations": ["maps", "music", "numbers 1 2"], "source": "multi_turn"},
            {"conversations": ["tea"], "source": "a"}]  # a repeat is answered twice
    prompts, out = tmp_path / "test.jsonl", str(tmp_path / "gens.jsonl")
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    argv = ["--checkpoint", chat_dir, "--prompt_file", str(prompts), "--out", out,
            "--temperature", "0", "--max_new_tokens", "8", "--batch_size", "2", "--seed", "0"]
    assert run_main(argv, capsys).out == ""  # responses go to --out only
    first = read_jsonl(out)
    assert [r["prompt"] for r in first] == ["tea", "the cat sat", "numbers 1 2"]
    assert first[2]["context"] == ["maps", "music"] and first[2]["source"] == "multi_turn"
    assert first[0]["settings"]["temperature"] == 0.0 and "response" in first[0]
    want = generate.respond(model, tok, [["tea"], ["the cat sat"], ["maps", "music", "numbers 1 2"]],
                          max_new_tokens=8, **GREEDY)
    assert [r["response"] for r in first] == want

    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))  # one more prompt
    err = run_main(argv, capsys).err
    assert "3 of 4 prompts already answered" in err
    second = read_jsonl(out)
    assert len(second) == 4 and second[:3] == first and second[3]["prompt"] == "tea"
    run_main(argv, capsys)
    assert read_jsonl(out) == second  # nothing left to do: nothing added

    with open(out, "a") as f:  # a run killed mid-write leaves a torn line: it is redone
        f.write('{"index": 3, "prom')
    lines = open(out).read().splitlines()
    open(out, "w").write("\n".join(lines[:3]) + "\n" + lines[4])
    run_main(argv, capsys)
    assert read_jsonl(out) == second

    err = fail_main(argv[:-6] + ["--temperature", "0.5", "--max_new_tokens", "8"], capsys)
    assert "other settings" in err


def test_cli_prompt_file_text(chat_dir, tmp_path, capsys):
    prompts, out = tmp_path / "prompts.txt", str(tmp_path / "gens.jsonl")
    prompts.write_text("tea\n\nthe cat sat\n")
    run_main(["--checkpoint", chat_dir, "--prompt_file", str(prompts), "--out", out,
              "--max_new_tokens", "5", "--seed", "0"], capsys)
    assert [r["prompt"] for r in read_jsonl(out)] == ["tea", "the cat sat"]
    # one prompt too long for the context: refused before anything is generated
    prompts.write_text("tea\n" + "the cat sat on a mat " * 20 + "\n")
    out2 = str(tmp_path / "gens2.jsonl")
    err = fail_main(["--checkpoint", chat_dir, "--prompt_file", str(prompts), "--out", out2,
                     "--max_seq_len", "64"], capsys)
    assert "prompt 2" in err and "no room" in err
    assert not os.path.exists(out2) or read_jsonl(out2) == []


def test_cli_prepare_data_prompts_print_without_out(chat_dir, tmp_path, capsys):
    # prepare_data.py's {split}_prompts.jsonl rows hold "turns"; with no --out the answers print
    prompts = tmp_path / "test_prompts.jsonl"
    rows = [{"id": 0, "source": "s", "turns": ["tea"]},
            {"id": 1, "source": "multi_turn", "turns": ["the cat", "sat", "on a mat"], "reference": "x"}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = run_main(["--checkpoint", chat_dir, "--prompt_file", str(prompts), "--temperature", "0",
                    "--max_new_tokens", "4"], capsys).out
    assert out.startswith("### tea\n") and "\n### on a mat\n" in out
    records = data.read_prompts(str(prompts))
    assert [r["turns"] for r in records] == [["tea"], ["the cat", "sat", "on a mat"]]


def test_cli_interactive_keeps_the_conversation(chat_dir, monkeypatch, capsys):
    seen = []
    real = generate.respond
    monkeypatch.setattr(sample, "respond", lambda m, t, convs, **kw: seen.append(convs[0]) or
                        real(m, t, convs, **kw))
    monkeypatch.setattr("sys.stdin", io.StringIO("tea\nthe cat sat\n/reset\nmaps\n"))
    out = run_main(["--checkpoint", chat_dir, "--interactive", "--temperature", "0",
                    "--max_new_tokens", "6"], capsys).out
    replies = out.split("\n")[:3]
    assert seen == [["tea"], ["tea", replies[0], "the cat sat"], ["maps"]]


def test_compiled_decode_step_matches_eager(model, tok, monkeypatch):
    # the real path compiles with inductor (a minute on CPU); dynamo's eager backend checks that
    # the decode step traces as one graph through the fixed-size cache, in seconds
    compiled = torch.compile(generate.decode_one, backend="eager", fullgraph=True)
    monkeypatch.setitem(generate._compiled, "cpu", compiled)
    prompts = prompts_of(tok, ["tea", "the cat sat on a mat"])
    kw = dict(stop_ids=(), max_new_tokens=10, **GREEDY)
    assert generate.generate(model, prompts, compile=True, **kw) == generate.generate(model, prompts, **kw)


def test_generate_under_fsdp2_then_train(tok, tmp_path):
    # train.py writes dev generations from its FSDP2 model mid-training: generation must work on
    # the sharded model (FSDP2 breaks under inference_mode) and leave it trainable
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs a fresh torch.distributed")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                            world_size=1)
    try:
        ref, sharded = tiny_model(tok.vocab_size, seed=5), tiny_model(tok.vocab_size, seed=5)
        for layer in sharded.layers:
            fully_shard(layer)
        fully_shard(sharded)
        sharded.train()
        prompts = prompts_of(tok, ["tea", "the cat sat"])
        kw = dict(stop_ids=(), max_new_tokens=10, **GREEDY)
        assert generate.generate(sharded, prompts, **kw) == generate.generate(ref, prompts, **kw)
        assert sharded.training
        x = torch.randint(0, tok.vocab_size, (2, 8))
        sharded(x, x).backward()
    finally:
        dist.destroy_process_group()


# ---- issue 12: bad input, faults and interruptions ---------------------------------------------

def test_progress_counts_kept_tokens_every_8_steps(model, tok):
    prompts = prompts_of(tok, ["tea", "the cat sat on a mat while river stones hum", "numbers 1 2 3"])
    free = generate.generate(model, prompts, stop_ids=(), max_new_tokens=40, **GREEDY)
    stop = free[1][11]  # row 1 stops early; the long prompt's budget ends first (max_seq_len)
    context = max(map(len, prompts)) + 30
    calls = []
    got = generate.generate(model, prompts, stop_ids=(stop,), max_seq_len=context, progress=calls.append,
                            **GREEDY)
    lengths = [len(r) for r in got]
    assert len(set(lengths)) > 1 and sum(calls) == sum(lengths)
    made = 0
    for j, n in enumerate(calls[:-1]):  # every 8 steps: exactly the kept tokens so far
        made += n
        assert made == sum(min(L, 8 * (j + 1)) for L in lengths)
    assert len(calls) <= max(lengths) // 8 + 2


def test_cli_flags_out_of_range_are_refused_by_name(chat_dir, capsys):
    for flag, value in (("--temperature", "-1"), ("--top_p", "0"), ("--top_p", "1.5"),
                        ("--repetition_penalty", "0"), ("--max_new_tokens", "-5"),
                        ("--batch_size", "0"), ("--dtype", "foo"), ("--max_seq_len", "1")):
        with pytest.raises(SystemExit) as e:
            sample.main(["--checkpoint", chat_dir, "--prompt", "tea", flag, value])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"{flag} " in err.splitlines()[-1] and "must be" in err, err


def test_cli_refuses_a_tokenizer_of_the_same_size_with_other_pieces(chat_dir, tmp_path, capsys):
    from conftest import train_tiny_tokenizer
    other = train_tiny_tokenizer(str(tmp_path), seed=1)  # 300 pieces, like the checkpoint's
    err = fail_main(["--checkpoint", chat_dir, "--tokenizer", other, "--prompt", "tea"], capsys)
    assert other in err and os.path.join(chat_dir, "lima.json") in err and "Traceback" not in err


def test_cli_refuses_nan_weights_naming_the_tensor(tok, tiny_tokenizer_path, tmp_path, capsys):
    m = tiny_model(tok.vocab_size, seed=6)
    with torch.no_grad():
        m.layers[1].feed_forward.w2.weight[0, 0] = float("nan")
    path = str(tmp_path / "nan")
    checkpoint.save_model(m, path, tokenizer_path=tiny_tokenizer_path)
    err = fail_main(["--checkpoint", path, "--prompt", "tea"], capsys)
    assert "layers.1.feed_forward.w2.weight holds 1 NaN" in err and "Traceback" not in err


def test_cli_a_second_run_on_the_same_out_is_refused(chat_dir, tmp_path, capsys):
    import files
    prompts, out = tmp_path / "p.txt", tmp_path / "gens.jsonl"
    prompts.write_text("tea\nmaps\n")
    argv = ["--checkpoint", chat_dir, "--prompt_file", str(prompts), "--out", str(out), "--max_new_tokens", "4"]
    with files.lock(out):  # the first run, still going
        err = fail_main(argv, capsys)
    assert "is being written by another process" in err and not out.exists()
    run_main(argv, capsys)  # the first one finished: the next goes ahead
    assert len(read_jsonl(out)) == 2 and not os.path.exists(f"{out}.lock")


def test_cli_out_made_from_another_prompt_file_is_refused(chat_dir, tmp_path, capsys):
    a, b, out = tmp_path / "a.txt", tmp_path / "b.txt", str(tmp_path / "gens.jsonl")
    a.write_text("tea\nmaps\nthe cat sat\n")
    b.write_text("numbers 1 2\nmusic\n")
    flags = ["--checkpoint", chat_dir, "--out", out, "--max_new_tokens", "4", "--seed", "1"]
    run_main(flags + ["--prompt_file", str(a)], capsys)
    before = open(out).read()
    err = fail_main(flags + ["--prompt_file", str(b)], capsys)
    assert f"{out}:1 answers prompt 1, 'tea', but prompt 1 of {b} is 'numbers 1 2'" in err
    assert "another prompt file" in err and str(a) in err and open(out).read() == before
    moved = tmp_path / "moved.txt"  # the same prompts from another place: nothing left to do
    os.rename(a, moved)
    assert "all 3 prompts already answered" in run_main(flags + ["--prompt_file", str(moved)], capsys).err
    assert open(out).read() == before


@pytest.mark.parametrize("case", ["out_is_dir", "prompt_not_utf8", "jsonl_not_utf8", "out_not_utf8",
                                  "surrogate_prompt", "surrogate_in_file"])
def test_cli_bad_input_is_one_message(chat_dir, tmp_path, capsys, case):
    prompts, out = tmp_path / "p.txt", tmp_path / "gens.jsonl"
    prompts.write_text("tea\nmaps\n")
    argv = ["--checkpoint", chat_dir, "--prompt_file", str(prompts), "--out", str(out), "--max_new_tokens", "3"]
    if case == "out_is_dir":
        out.mkdir()
        want = f"--out {out} is a directory"
    elif case == "prompt_not_utf8":
        prompts.write_bytes(b"tea\ncaf\xe9\n")
        want = f"{prompts}: not valid UTF-8"
    elif case == "jsonl_not_utf8":
        prompts = tmp_path / "p.jsonl"
        prompts.write_bytes(b'{"prompt": "tea"}\n{"prompt": "caf\xe9"}\n')
        argv[3], want = str(prompts), f"{prompts}:2: not valid UTF-8"
    elif case == "out_not_utf8":
        out.write_bytes(b'{"index": 0, "prompt": "caf\xe9"}\n')
        want = f"{out}:1: not valid UTF-8"
    elif case == "surrogate_prompt":
        argv, want = ["--checkpoint", chat_dir, "--prompt", "tea \udcff"], "--prompt is not valid text"
    else:
        prompts = tmp_path / "p.jsonl"
        prompts.write_text('{"prompt": "tea"}\n{"prompt": "\\udcff tea"}\n')
        argv[3], want = str(prompts), f"{prompts}:2: a lone surrogate \\udcff"
    err = fail_main(argv, capsys)
    assert want in err and "Traceback" not in err


def test_cli_full_disk_keeps_every_response_and_resumes(chat_dir, tmp_path, capsys, monkeypatch):
    import errno
    prompts = tmp_path / "p.txt"
    prompts.write_text("tea\nmaps\nthe cat sat\nmusic\n")
    flags = ["--checkpoint", chat_dir, "--prompt_file", str(prompts), "--max_new_tokens", "5",
             "--seed", "3", "--batch_size", "1", "--temperature", "0"]  # greedy: a resume is the same
    whole = str(tmp_path / "whole.jsonl")
    run_main(flags + ["--out", whole], capsys)
    out = str(tmp_path / "gens.jsonl")
    real_write, writes = os.write, []

    def fills_up(fd, buf):
        if os.readlink(f"/proc/self/fd/{fd}") == out:
            writes.append(1)
            if len(writes) == 3:  # the third record finds the disk full, half-way through
                real_write(fd, bytes(buf[:7]))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, buf)

    monkeypatch.setattr(os, "write", fills_up)
    err = fail_main(flags + ["--out", out], capsys)
    assert "the disk is full" in err and f"kept in {out}" in err and "Traceback" not in err
    assert len(read_jsonl(out)) == 2  # whole records only
    monkeypatch.undo()
    run_main(flags + ["--out", out], capsys)
    assert read_jsonl(out) == read_jsonl(whole)


def test_cli_ctrl_c_says_what_was_kept_and_how_to_continue(chat_dir, tmp_path, capsys, monkeypatch):
    prompts, out = tmp_path / "p.txt", str(tmp_path / "gens.jsonl")
    prompts.write_text("tea\nmaps\nthe cat sat\n")
    argv = ["--checkpoint", chat_dir, "--prompt_file", str(prompts), "--out", out,
            "--max_new_tokens", "4", "--batch_size", "1", "--seed", "2"]
    real, calls = generate.decode, []

    def interrupted_at_the_third(*a, **kw):  # responses come one by one (continuous batching)
        for response in real(*a, **kw):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            yield response

    monkeypatch.setattr(sample, "decode", interrupted_at_the_third)
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"sample.py: interrupted; 2 responses are saved in {out}. "
                                            f"To continue: python sample.py {' '.join(argv)}")
    monkeypatch.undo()
    assert "2 of 3 prompts already answered" in run_main(argv, capsys).err
    assert [r["prompt"] for r in read_jsonl(out)] == ["tea", "maps", "the cat sat"]


def test_cli_prompt_file_without_out_shows_progress_in_tokens(chat_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("tea\nmaps\nthe cat sat\n")
    got = run_main(["--checkpoint", chat_dir, "--prompt_file", str(prompts), "--max_new_tokens", "9",
                    "--batch_size", "2"], capsys)
    assert got.out.count("### ") == 3
    last = got.err.replace("\r", "\n").strip().splitlines()
    bar = [line for line in last if "tok/s" in line][-1]
    assert "3/3 prompts" in bar and "100%" in bar


def test_cli_bad_device_is_one_message(chat_dir, capsys):
    for device, want in (("nope", "'nope' is not a device"), (" , ", "--device is empty")):
        err = fail_main(["--checkpoint", chat_dir, "--prompt", "tea", "--device", device], capsys)
        assert want in err and "Traceback" not in err


def test_cli_base_prints_the_base_continuation_under_each_answer(chat_dir, tiny_tokenizer_path, tok, tmp_path, capsys):
    base = str(tmp_path / "base")
    checkpoint.save_model(tiny_model(tok.eot_id, seed=4), base, tokenizer_path=tiny_tokenizer_path)
    prompts = tmp_path / "p.txt"
    prompts.write_text("the cat sat\nseven robots\n")
    argv = ["--checkpoint", chat_dir, "--prompt_file", str(prompts), "--temperature", "0", "--max_new_tokens", "5"]
    out = run_main(argv + ["--base", base], capsys).out
    m, _ = checkpoint.load_model_and_tokenizer(base)
    want = [tok.decode(ids) for ids in generate.generate(
        m, [[tok.bos_id] + tok.encode(p) for p in ("the cat sat", "seven robots")], stop_ids=(tok.eos_id,),
        max_new_tokens=5, **GREEDY)]
    blocks = out.split("### ")[1:]
    assert len(blocks) == 2
    for block, continuation in zip(blocks, want):
        answer, base_part = block.split("--- the base model, continuing the same text:\n")
        assert base_part.strip("\n") == continuation.strip("\n")
    plain = run_main(argv, capsys).out
    assert [b.split("--- the base")[0] for b in blocks] == plain.split("### ")[1:]  # answers unchanged
    assert "--base goes with --prompt_file" in fail_main(["--checkpoint", chat_dir, "--prompt", "hi", "--base", base], capsys)
