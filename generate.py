"""LIMA's decoding (LIMA §5): nucleus sampling with p 0.9 at temperature 0.7, a repetition
penalty of 1.2 on the tokens generated so far, at most 2048 tokens in all, stopping at the
end-of-turn token; batched, with a KV cache, and compilable (gpt-fast's split: small functions
that are also compile boundaries).

    respond(model, tokenizer, [["How do I brew tea?"]])   # conversations -> response strings
    generate(model, [[1, 523, ...]], stop_ids=(eot,))     # token ids -> new token ids

sample.py, train.py's dev generations and evaluate.py's model judge all decode through here.
"""

import math
from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class Decoding:
    """The decoding settings, with the paper's values as defaults (LIMA §5). sample.py's flags."""
    temperature: float = field(default=0.7, metadata={"help": "LIMA §5; 0 is greedy"})
    top_p: float = field(default=0.9, metadata={"help": "LIMA §5 nucleus sampling"})
    repetition_penalty: float = field(default=1.2, metadata={"help": "LIMA §5 (Keskar et al. 2019); 1 is off"})
    penalize_prompt: bool = field(default=False, metadata={"help": "penalise the prompt's tokens too (transformers' behaviour)"})
    max_new_tokens: Optional[int] = field(default=None, metadata={"help": "cap on the response; default: until the context is full"})
    max_seq_len: int = field(default=2048, metadata={"help": "LIMA §5: prompt + response at most this"})


DECODING = tuple(f for f in Decoding.__dataclass_fields__)  # generate()'s decoding keywords


class PromptError(ValueError):
    """A problem with what the user asked for (empty, too long, wrong format): a message, no trace."""


# ---- one step: pure functions on logits -----------------------------------------------------

def apply_repetition_penalty(logits, penalized, penalty):
    """Keskar et al. 2019, as in transformers: for each distinct penalised token, a positive
    logit is divided by `penalty`, a negative one multiplied by it: once per token, however
    often it occurred.

    logits (B, V) float; penalized: bool mask (B, V), or ids (B, N) (repeats are harmless).
    """
    if penalty == 1.0:
        return logits
    if penalized.dtype != torch.bool:
        ids = penalized
        penalized = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, ids, True)
    scaled = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(penalized, scaled, logits)


def top_p_filter(logits, top_p):
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches
    top_p (always at least the top one); the rest become -inf. logits (B, V)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of the tokens more likely than this one
    drop = mass_before >= top_p  # the set already reached p without this token
    drop[..., 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample_next(logits, penalized=None, *, temperature=Decoding.temperature, top_p=Decoding.top_p,
                repetition_penalty=Decoding.repetition_penalty, generator=None):
    """(B, V) logits -> (B,) next ids. Our order: penalty, then temperature, then top-p (as
    transformers applies them; the paper names the three, not their order).
    Temperature 0 is greedy (on the penalised logits, as transformers does)."""
    if penalized is not None:
        logits = apply_repetition_penalty(logits, penalized, repetition_penalty)
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = top_p_filter(logits / temperature, top_p).softmax(dim=-1)
    # argmax(p_i / E_i), E_i ~ Exp(1), picks i with probability p_i (what multinomial does,
    # without its host sync on GPU). The clamp keeps E > 0, so a dropped token (p = 0) scores 0.
    device = generator.device if generator is not None else probs.device
    e = torch.empty(probs.shape, device=device).exponential_(generator=generator)
    e = e.to(probs.device).clamp_min_(torch.finfo(e.dtype).tiny)
    return (probs / e).argmax(dim=-1)


# ---- batched generation -----------------------------------------------------------------------

CACHE_STEP = 256  # grow the cache in chunks of this many positions (each growth copies it)
PREFILL_LOGITS = 1 << 27  # at most this many fp32 logits per prefill chunk (512 MB)


def prefill(model, tokens, lengths):
    """Right-padded prompts (B, T) -> logits (B, V) after each row's last prompt token.

    Every row writes positions 0..T-1; a row's padding slots sit past its length, hidden by
    the mask until its own decoding overwrites them. Chunked along T so that the (B, T, V)
    logits of a long prompt batch never exist at once (32 x 2048 x 32000 fp32 = 8 GB)."""
    B, T = tokens.shape
    chunk = max(1, PREFILL_LOGITS // (B * model.args.vocab_size))
    last = lengths - 1
    rows = torch.arange(B, device=tokens.device)
    out = None
    for s in range(0, T, chunk):
        e = min(T, s + chunk)
        pos = torch.arange(s, e, device=tokens.device).expand(B, -1)
        logits = model(tokens[:, s:e], input_pos=pos)  # (B, e - s, V)
        picked = logits[rows, (last - s).clamp(0, e - s - 1)]
        here = (last >= s) & (last < e)
        out = picked if out is None else torch.where(here[:, None], picked, out)
    return out


def decode_one(model, token, input_pos):
    """token, input_pos (B, 1) -> logits (B, V) for the next token. The compile boundary."""
    return model(token, input_pos=input_pos)[:, -1]


_compiled = {}


def compiled_decode_one(device_type):
    if device_type not in _compiled:
        # CUDA graphs (reduce-overhead) remove the per-kernel launch cost that dominates batch-1
        # decoding; they need the cache buffers to stay put, which generate() ensures
        mode = "reduce-overhead" if device_type == "cuda" else None
        _compiled[device_type] = torch.compile(decode_one, mode=mode, fullgraph=True)
    return _compiled[device_type]


# no_grad, not inference_mode: a caller's model may be sharded or hooked in ways that refuse
# inference tensors (FSDP2 does)
@torch.no_grad()
def generate(model, prompts, *, stop_ids, max_new_tokens=Decoding.max_new_tokens,
             max_seq_len=Decoding.max_seq_len, temperature=Decoding.temperature,
             top_p=Decoding.top_p, repetition_penalty=Decoding.repetition_penalty,
             penalize_prompt=Decoding.penalize_prompt, generator=None, on_token=None,
             progress=None, vocab_size=None, compile=False, keep_cache=False, all_done=None):
    """Decode a batch of prompts together (LIMA §5).

    prompts: token-id lists, BOS included. Returns each prompt's new tokens, without the stop
    token. Row b stops at its first stop id or when prompt + response reach max_seq_len (and
    after max_new_tokens). on_token(row, id) sees each kept token as it is made (a host sync
    per step). progress(n) is told of n more kept tokens, every 8 steps and at the end, for
    progress bars: counted on the device, read where decoding syncs anyway (no extra sync per
    step). vocab_size: ids at or past it are never sampled (a padded embedding's rows).
    The model is put in eval mode and given back in the mode it was in; its KV cache is
    dropped afterwards unless keep_cache (then the next call reuses it when it fits).
    all_done(done) -> bool decides, from the (B,) bool tensor of finished rows, that decoding
    may stop; a caller whose every forward is a collective (several processes decoding in
    lockstep) passes one that agrees across them. Default: every row is finished.
    """
    if not prompts:
        return []
    context = min(max_seq_len, model.args.max_seq_len)
    lengths = [len(p) for p in prompts]
    for i, n in enumerate(lengths):
        if n == 0:
            raise PromptError(f"prompt {i} is empty (it needs at least BOS)")
        if n >= context:
            raise PromptError(f"prompt {i} is {n} tokens; the context holds {context} tokens in "
                              f"all (prompt + response), leaving no room for a response")
    budgets = [context - n if max_new_tokens is None else min(max_new_tokens, context - n)
               for n in lengths]
    B, T, steps = len(prompts), max(lengths), max(budgets)
    if steps <= 0:
        return [[] for _ in prompts]
    # the last position a row feeds is n + budget - 2 (its final token is never fed back)
    last_pos = [n + b - 2 for n, b in zip(lengths, budgets)]
    most = max(T, max(last_pos) + 1)  # cache positions the longest row can need

    all_done = all_done or (lambda done: bool(done.all()))
    device = model.tok_embeddings.weight.device
    step_fn = compiled_decode_one(device.type) if compile else decode_one
    was_training = model.training
    model.eval()
    try:
        # Compiled: one fixed-size cache (the full context), reused across calls, so the graph
        # and its buffers stay put. Eager: a cache as long as the longest row needs so far.
        if compile:
            shape = model.cache_shape()
            if shape is None or shape[0] < B or shape[1] != context:
                model.setup_cache(B, context)
        else:
            model.setup_cache(B, min(most, _round_up(T, CACHE_STEP)))
        cache_len = model.cache_shape()[1]

        tokens = torch.tensor([p + [p[-1]] * (T - len(p)) for p in prompts], device=device)
        lengths_t = torch.tensor(lengths, device=device)
        logits = prefill(model, tokens, lengths_t)  # (B, V) on the last layer's device
        out_device = logits.device
        if vocab_size is not None:
            logits = logits[:, :vocab_size]
        V = logits.shape[-1]
        penalized = None
        if repetition_penalty != 1.0:
            penalized = torch.zeros(B, V, dtype=torch.bool, device=out_device)
            if penalize_prompt:  # transformers' behaviour: the prompt (BOS too) counts; the
                # padding repeats each row's last token, so it adds nothing
                penalized.scatter_(1, tokens.to(out_device), True)
        stops = torch.tensor(sorted(stop_ids), device=out_device, dtype=torch.long)
        budgets_t = torch.tensor(budgets, device=out_device)
        stopped = torch.zeros(B, dtype=torch.bool, device=out_device)
        host_done = [False] * B  # for on_token only
        new_tokens = []
        made = torch.zeros((), dtype=torch.long, device=out_device)  # kept tokens, for progress
        reported = 0

        for i in range(steps):
            nxt = sample_next(logits, penalized, temperature=temperature, top_p=top_p,
                              repetition_penalty=repetition_penalty, generator=generator)
            new_tokens.append(nxt)
            stopped |= torch.isin(nxt, stops)
            if progress is not None:  # rows still answering, within budget; a stop id is not kept
                made += (~stopped & (budgets_t > i)).sum()
            if on_token is not None:
                for row, t in enumerate(nxt.tolist()):
                    if not host_done[row]:
                        host_done[row] = t in stop_ids or i + 1 >= budgets[row]
                        if t not in stop_ids:
                            on_token(row, t)
            if i + 1 == steps:
                break
            # every row stopped or out of budget: done. Ask only every 8 steps (a host sync)
            if (on_token is not None or i % 8 == 7) and all_done(stopped | (budgets_t <= i + 1)):
                break
            if progress is not None and i % 8 == 7:  # the device has just synced in all_done
                n = int(made)
                progress(n - reported)
                reported = n
            if penalized is not None:
                penalized.scatter_(1, nxt[:, None], True)
            # token i of row b goes to position n_b + i; finished rows keep writing (clamped)
            # into their own row's slots, which nobody reads
            needed = max((n + i for n, lp in zip(lengths, last_pos) if n + i <= lp), default=0) + 1
            if needed > cache_len:
                cache_len = min(most, _round_up(needed, CACHE_STEP))
                model.grow_cache(cache_len)
            pos = (lengths_t + i).clamp(max=cache_len - 1)
            logits = step_fn(model, nxt[:, None].to(device), pos[:, None])
            if vocab_size is not None:
                logits = logits[:, :vocab_size]

        generated = torch.stack(new_tokens, dim=1).tolist()  # (B, steps): the one big sync
    finally:
        model.train(was_training)
        if not keep_cache:
            model.clear_cache()
    results = []
    for row, budget in zip(generated, budgets):
        row = row[:budget]
        cut = next((j for j, t in enumerate(row) if t in stop_ids), len(row))
        results.append(row[:cut])
    if progress is not None:
        progress(sum(map(len, results)) - reported)
    return results


def _round_up(n, m):
    return m * math.ceil(n / m)


# ---- prompts and responses -------------------------------------------------------------------

def stop_ids(tokenizer):
    # LIMA §3: EOT ends a turn. EOS is never trained in the chat format, but if a model says it,
    # what follows is a new document, not the answer: stop there too (and --raw stops at EOS)
    return (tokenizer.eot_id, tokenizer.eos_id)


def encode_prompt(tokenizer, turns, raw=False):
    """A conversation ending on a user turn -> BOS u1 EOT a1 EOT .. u_n EOT (LIMA §3);
    raw: BOS text (one turn), for plain completion."""
    if not turns or not all(isinstance(t, str) for t in turns):
        raise PromptError(f"a prompt is a list of strings, got {turns!r}")
    if not any(t.strip() for t in turns):
        raise PromptError("the prompt is empty")
    if raw:
        if len(turns) != 1:
            raise PromptError("--raw completes one text, not a conversation")
        return [tokenizer.bos_id] + tokenizer.encode(turns[0])
    if len(turns) % 2 == 0:
        raise PromptError(f"a chat prompt ends on a user turn; this one has {len(turns)} turns "
                          f"(ends on an assistant turn)")
    return tokenizer.encode_dialog(turns)[0]


def check_chat_model(model, tokenizer):
    if model.args.vocab_size <= tokenizer.eot_id:
        raise PromptError(
            f"the model's vocabulary has {model.args.vocab_size} rows, the base tokenizer's size: "
            f"it has no end-of-turn token, so it is a base model that was never trained on the "
            f"chat format and would not know when to stop. Use --raw for plain completion.")


def respond(model, tokenizer, conversations, *, raw=False, batch_size=16, generator=None,
            on_token=None, progress=None, compile=False, keep_cache=False, all_done=None,
            **decoding):
    """Conversations (each a list of turns ending on a user turn) -> response strings.

    decoding: max_new_tokens, max_seq_len, temperature, top_p, repetition_penalty,
    penalize_prompt (generate's keywords). Batches of similar prompt length, answers in the
    input order. on_token(index, id) streams tokens of conversation `index`; progress(n) counts
    tokens made (generate's).
    """
    if not raw:
        check_chat_model(model, tokenizer)
    prompts = [encode_prompt(tokenizer, turns, raw) for turns in conversations]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # less padding
    responses = [None] * len(prompts)
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            stream = None if on_token is None else (lambda row, t, idx=idx: on_token(idx[row], t))
            new = generate(model, [prompts[i] for i in idx], stop_ids=stop_ids(tokenizer),
                           vocab_size=tokenizer.vocab_size, generator=generator,
                           on_token=stream, progress=progress, compile=compile, keep_cache=True,
                           all_done=all_done,
                           **decoding)
            for i, ids in zip(idx, new):
                responses[i] = tokenizer.decode(ids)
    finally:
        if not keep_cache:
            model.clear_cache()
    return responses
