"""LIMA's decoding (LIMA §5): nucleus sampling with p 0.9 at temperature 0.7, a repetition
penalty of 1.2 on the tokens generated so far, at most 2048 tokens in all, stopping at the
end-of-turn token; batched, with a KV cache, and compilable (gpt-fast's split: small functions
that are also compile boundaries).

    respond(model, tokenizer, [["How do I brew tea?"]])   # conversations -> response strings
    generate(model, [[1, 523, ...]], stop_ids=(eot,))     # token ids -> new token ids
    for i, ids in decode(model, prompts, stop_ids=(eot,), batch_size=16, seeds=seeds): ...
                                                          # many prompts, continuous batching

sample.py, train.py's dev generations and evaluate.py's model judge all decode through here.
"""

import hashlib
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import torch

from model import UNTRAINED


@dataclass
class Decoding:
    """The decoding settings, with the paper's values as defaults (LIMA §5). sample.py's flags."""
    temperature: float = field(default=0.7, metadata={"help": "LIMA §5; 0 is greedy", "min": 0})
    top_p: float = field(default=0.9, metadata={"help": "LIMA §5 nucleus sampling", "gt": 0, "max": 1})
    repetition_penalty: float = field(default=1.2, metadata={"help": "LIMA §5 (Keskar et al. 2019); 1 is off", "gt": 0})
    penalize_prompt: bool = field(default=False, metadata={"help": "penalise the prompt's tokens too (transformers' behaviour)"})
    max_new_tokens: Optional[int] = field(default=None, metadata={"help": "cap on the response; default: until the context is full", "min": 1})
    max_seq_len: int = field(default=2048, metadata={"help": "LIMA §5: prompt + response at most this", "min": 2})


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
    Temperature 0 is greedy (on the penalised logits, as transformers does).
    generator: one for the whole batch, or a list of one per row (None for a row whose token
    nobody reads), so that a row's draws do not depend on the rows beside it."""
    if penalized is not None:
        logits = apply_repetition_penalty(logits, penalized, repetition_penalty)
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = top_p_filter(logits / temperature, top_p).softmax(dim=-1)
    # argmax(p_i / E_i), E_i ~ Exp(1), picks i with probability p_i (what multinomial does,
    # without its host sync on GPU). The clamp keeps E > 0, so a dropped token (p = 0) scores 0.
    e = exponential_noise(probs.shape, probs.device, generator).clamp_min_(torch.finfo(probs.dtype).tiny)
    return (probs / e).argmax(dim=-1)


def exponential_noise(shape, device, generator):
    """(B, V) draws of Exp(1) on `device`, from `generator` (on its own device), or row by row
    from a list of generators."""
    if not isinstance(generator, (list, tuple)):
        where = generator.device if generator is not None else device
        return torch.empty(shape, device=where).exponential_(generator=generator).to(device)
    rows = [torch.ones(shape[1:], device=device) if g is None else
            torch.empty(shape[1:], device=g.device).exponential_(generator=g).to(device)
            for g in generator]
    return torch.stack(rows)


def prompt_seed(seed, index):
    """The seed of prompt `index`'s own generator in a run seeded with `seed`: its random draws
    are the same whichever prompts share its batch, in whatever order, and on a resumed run."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: any torch.Generator takes it


def draw_seeds(generator, n):
    """n prompt seeds from a caller's generator (or torch's global one when None)."""
    device = generator.device if generator is not None else "cpu"
    return torch.randint(2**62, (n,), generator=generator, device=device).tolist()


# ---- batched generation -----------------------------------------------------------------------

CACHE_STEP = 64  # the eager KV cache's length: a multiple of this, doubling as it grows
PREFILL_TOKENS = 1 << 13  # tokens per prefill chunk, all rows together: bounds its activations
CHECK_EVERY = 8  # decode steps between looks at the new tokens (each a host sync)


def prefill(model, tokens, lengths, rows=None):
    """Right-padded prompts (B, T) -> logits (B, V) after each row's last prompt token, their
    keys and values written to cache rows `rows` (B,) (default 0..B-1).

    Every row writes positions 0..T-1; a row's padding slots sit past its length, hidden by
    the mask until its own decoding overwrites them. Only each row's last prompt position goes
    through the output head (logits_at): the other positions' logits would be thrown away.
    Chunked along T so that a long prompt batch's activations stay bounded."""
    B, T = tokens.shape
    chunk = max(1, PREFILL_TOKENS // B)
    last = lengths - 1
    out = None
    for s in range(0, T, chunk):
        e = min(T, s + chunk)
        # the first chunk is positions 0..e-1: plain causal attention (no input_pos); later
        # ones attend to the cache through the mask
        pos = None if s == 0 else torch.arange(s, e, device=tokens.device).expand(B, -1)
        logits = model(tokens[:, s:e], input_pos=pos, cache_rows=rows, cache_len=e,
                       logits_at=(last - s).clamp(0, e - s - 1))  # (B, V)
        here = ((last >= s) & (last < e)).to(logits.device)
        out = logits if out is None else torch.where(here[:, None], logits, out)
    return out


def decode_one(model, token, input_pos, cache_len=None):
    """token, input_pos (B, 1) -> logits (B, V) for the next token. The compile boundary
    (compiled, without cache_len: the whole cache, fixed shapes)."""
    return model(token, input_pos=input_pos, cache_len=cache_len)[:, -1]


_compiled = {}


def compiled_decode_one(device_type):
    if device_type not in _compiled:
        # CUDA graphs (reduce-overhead) remove the per-kernel launch cost that dominates batch-1
        # decoding; they need the cache buffers to stay put, which decode() ensures
        mode = "reduce-overhead" if device_type == "cuda" else None
        _compiled[device_type] = torch.compile(decode_one, mode=mode, fullgraph=True)
    return _compiled[device_type]


def check_prompts(prompts, context):
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise PromptError(f"prompt {i} is empty (it needs at least BOS)")
        if len(p) >= context:
            raise PromptError(f"prompt {i} is {len(p)} tokens; the context holds {context} tokens in "
                              f"all (prompt + response), leaving no room for a response")


# no_grad, not inference_mode: a caller's model may be sharded or hooked in ways that refuse
# inference tensors (FSDP2 does)
@torch.no_grad()
def decode(model, prompts, *, stop_ids, batch_size=16, seeds=None,
           max_new_tokens=Decoding.max_new_tokens, max_seq_len=Decoding.max_seq_len,
           temperature=Decoding.temperature, top_p=Decoding.top_p,
           repetition_penalty=Decoding.repetition_penalty, penalize_prompt=Decoding.penalize_prompt,
           on_token=None, progress=None, vocab_size=None, compile=False, keep_cache=False,
           all_done=None):
    """Decode many prompts, batch_size rows at a time, with continuous batching (LIMA §5).

    Yields (index, new tokens) as each prompt's answer ends, without its stop token: at its
    first stop id, when prompt + answer reach max_seq_len, or after max_new_tokens. A row whose
    answer ended takes the next prompt at once (its prefill), so a batch never waits for its
    longest answer; once no prompt is left, finished rows leave the batch. Rows are looked at
    every CHECK_EVERY steps (a host sync) and when one's budget ends.

    prompts: token-id lists, BOS included. seeds: one per prompt when sampling (temperature >
    0; default: drawn from torch's global generator): each prompt draws from its own
    generator, so its answer does not depend on the others, nor on batch_size (up to the
    rounding of a batched matmul, which may differ with the batch's size). on_token(index, id) sees each kept token as it is made (a host sync per
    step): for streaming. progress(n) is told, every 8 steps and at the end, how many tokens
    the answers gained since its last call. vocab_size: ids at or past it are never sampled (a
    padded embedding's rows). The model is put in eval mode and given back in the mode it was
    in; its KV cache is dropped afterwards unless keep_cache (a compiled decode then reuses it
    when it fits). all_done(done) -> bool decides, from the (B,) bool tensor of finished rows,
    that decoding may stop; with one (several processes decoding in lockstep, every forward a
    collective) every prompt gets a row at once and rows stay put: no refills, no leaving.
    """
    context = min(max_seq_len, model.args.max_seq_len)
    check_prompts(prompts, context)
    if not prompts:
        return
    n_prompts = len(prompts)
    budgets = [context - len(p) if max_new_tokens is None else min(max_new_tokens, context - len(p))
               for p in prompts]
    sampled = temperature > 0
    if sampled and seeds is None:
        seeds = draw_seeds(None, n_prompts)
    stops = set(stop_ids)
    lockstep = all_done is not None
    all_done = all_done or (lambda done: bool(done.all()))
    device = model.tok_embeddings.weight.device
    out_device = model.output.weight.device  # logits come out here (layers may be spread)
    V = model.args.vocab_size if vocab_size is None else min(vocab_size, model.args.vocab_size)
    step_fn = compiled_decode_one(device.type) if compile else decode_one
    B = n_prompts if lockstep else min(batch_size, n_prompts)
    queue = deque(range(n_prompts))
    # each row's prompt (None: idle), the tokens it kept, its tokens so far (synced or not),
    # whether it is finished, and its generator
    who, kept, count, ended, gens = [None] * B, [[] for _ in range(B)], [0] * B, [True] * B, [None] * B
    pos = torch.zeros(B, dtype=torch.long, device=device)  # where each row's next token goes
    logits = torch.zeros(B, V, device=out_device)
    penalized = None if repetition_penalty == 1.0 else torch.zeros(B, V, dtype=torch.bool, device=out_device)

    was_training = model.training
    model.eval()
    try:
        # Compiled: one fixed-size cache (the full context), reused across calls, so the graph
        # and its buffers stay put. Eager: a cache that grows as the furthest row needs.
        if compile:
            shape = model.cache_shape()
            if shape is None or shape[0] < B or shape[1] != context:
                model.setup_cache(B, context, zeroed=True)
        else:
            model.setup_cache(B, cache_length(max(map(len, prompts[:B])), 0, context))

        def admit(rows):
            """The next prompts into these idle rows: prefill, fresh penalty and generator."""
            idx = [queue.popleft() for _ in rows]
            lengths = [len(prompts[i]) for i in idx]
            T = max(lengths)
            if T > model.cache_shape()[1]:
                model.grow_cache(cache_length(T, model.cache_shape()[1], context))
            tokens = torch.tensor([prompts[i] + [prompts[i][-1]] * (T - len(prompts[i])) for i in idx],
                                  device=device)
            r = torch.tensor(rows, device=device)
            whole = rows == list(range(B))  # every row: the cache's own order, no gather
            new = prefill(model, tokens, torch.tensor(lengths, device=device), None if whole else r)
            r_out = r.to(out_device)
            logits[r_out] = new[:, :V].to(logits.dtype)
            pos[r] = torch.tensor(lengths, device=device)
            if penalized is not None:
                penalized[r_out] = False
                if penalize_prompt:  # transformers' behaviour: the prompt (BOS too) counts; the
                    # padding repeats each row's last token, so it adds nothing
                    penalized[r_out] = penalized[r_out].scatter(1, tokens.to(out_device), True)
            for b, i in zip(rows, idx):
                who[b], kept[b], count[b], ended[b] = i, [], 0, False
                gens[b] = torch.Generator(out_device).manual_seed(seeds[i]) if sampled else None

        admit(list(range(B)))
        step, total, reported, pending = 0, 0, 0, []  # total: tokens kept so far, all prompts
        while True:
            refill = []
            nxt = sample_next(logits, penalized, temperature=temperature, top_p=top_p,
                              repetition_penalty=repetition_penalty, generator=gens if sampled else None)
            pending.append(nxt)
            if penalized is not None:
                penalized.scatter_(1, nxt[:, None], True)
            step += 1
            for b in range(B):
                count[b] += 1
            budget_ends = any(not ended[b] and count[b] >= budgets[who[b]] for b in range(B))
            if on_token is not None or step % CHECK_EVERY == 0 or budget_ends:
                # the host sync: the new tokens of every row since the last look
                for b, new in enumerate(torch.stack(pending, 1).tolist()):
                    for t in new:
                        if ended[b]:
                            break
                        if t in stops:
                            ended[b] = True
                            break
                        kept[b].append(t)
                        total += 1
                        if on_token is not None:
                            on_token(who[b], t)
                        ended[b] = len(kept[b]) >= budgets[who[b]]
                pending = []
                if progress is not None and step % CHECK_EVERY == 0:
                    progress(total - reported)
                    reported = total
                for b in range(B):
                    if ended[b] and who[b] is not None:
                        yield who[b], kept[b]
                        who[b], kept[b] = None, []
                if all_done(torch.tensor([w is None for w in who], device=out_device)) and not queue:
                    break
                idle = [b for b in range(B) if who[b] is None]
                if queue:
                    refill = idle[:len(queue)]  # prefilled after this step's tokens are fed
                elif idle and not lockstep and not compile:
                    # no prompt left: finished rows leave the batch (each row is work on a CPU,
                    # and a long cache's reads on a GPU); a compiled step keeps its shapes
                    keep = [b for b in range(B) if who[b] is not None]
                    rows = torch.tensor(keep, device=device)
                    model.keep_cache_rows(rows)
                    pos, nxt = pos[rows], nxt[rows.to(nxt.device)]
                    penalized = None if penalized is None else penalized[rows.to(out_device)]
                    who, kept, count, ended, gens = ([x[b] for b in keep]
                                                     for x in (who, kept, count, ended, gens))
                    B = len(keep)
            # feed each row's token at its position; the cache grows to what running rows need
            # (finished and idle rows keep writing, clamped, into their own row, which nobody reads)
            needed = max((len(prompts[who[b]]) + count[b] - 1 for b in range(B) if not ended[b]),
                         default=0) + 1
            allocated = model.cache_shape()[1]
            if needed > allocated:
                allocated = cache_length(needed, allocated, context)
                model.grow_cache(allocated)
            # eager: attention reads the cache up to the furthest running row, not all of it
            # (masked slots cost SDPA as much as read ones; transformers' cache holds exactly
            # the tokens so far)
            token, at = nxt[:, None].to(device), pos.clamp(max=allocated - 1)[:, None]
            logits = step_fn(model, token, at) if compile else step_fn(model, token, at, needed)
            logits = logits[:, :V]
            pos += 1
            if refill:
                admit(refill)
    finally:
        model.train(was_training)
        if not keep_cache:
            model.clear_cache()
    if progress is not None and total > reported:
        progress(total - reported)


def generate(model, prompts, *, stop_ids, generator=None, seeds=None, **kwargs):
    """Decode a batch of prompts together (LIMA §5): decode() with a row for every prompt.

    Returns each prompt's new tokens, without the stop token. generator: where the prompts'
    seeds are drawn from when sampling and no seeds are given (torch's global generator when
    None). kwargs: decode()'s (max_new_tokens, max_seq_len, temperature, top_p,
    repetition_penalty, penalize_prompt, on_token, progress, vocab_size, compile, keep_cache,
    all_done)."""
    if seeds is None and kwargs.get("temperature", Decoding.temperature) > 0:
        seeds = draw_seeds(generator, len(prompts))
    results = [None] * len(prompts)
    for i, tokens in decode(model, prompts, stop_ids=stop_ids, batch_size=max(1, len(prompts)),
                            seeds=seeds, **kwargs):
        results[i] = tokens
    return results


def cache_length(needed, current, context):
    """The length of an eager KV cache that must hold `needed` positions and now holds
    `current`: at least double (each growth copies the cache, so the copies add up to less
    than the final length), no more than the context. Each step reads only the positions in
    use (cache_len), so the room ahead costs memory, not time; a first cache only as long as
    the prompts is little memory to clear before the first token."""
    return min(context, max(CACHE_STEP * math.ceil(needed / CACHE_STEP), 2 * current))


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
    for t in turns:
        check_text(t)
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


def check_text(text, what="the prompt"):
    """Text the tokenizer can take: no lone surrogate (what undecodable bytes on a command line or
    a "\\ud800" escape become), which would crash SentencePiece."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PromptError(f"{what} is not valid text: after {text[max(0, e.start - 20):e.start]!r} "
                          f"comes {text[e.start]!r}, half of a UTF-16 pair or a byte that is not "
                          f"UTF-8") from None


def check_chat_model(model, tokenizer):
    """A model that never learned the chat format would not know when to stop. Its EOT row
    tells: missing (a LLaMA 1 / 2 base ends its vocabulary before it), or never trained (Llama 3
    base models ship <|eot_id|> as zeros). The second is checked on whole weights only (not on
    train.py's sharded model, whose EOT row was initialised before training)."""
    if model.args.vocab_size <= tokenizer.eot_id:
        raise PromptError(
            f"the model's vocabulary has {model.args.vocab_size} rows, the base tokenizer's size: "
            f"it has no end-of-turn token, so it is a base model that was never trained on the "
            f"chat format and would not know when to stop. Use --raw for plain completion.")
    w = model.tok_embeddings.weight
    if type(w) in (torch.Tensor, torch.nn.Parameter) and w[tokenizer.eot_id].abs().max() <= UNTRAINED:
        raise PromptError(
            f"the model's end-of-turn token (id {tokenizer.eot_id}) was never trained: its "
            f"embedding is all zeros, as in Llama 3 base models. It is a base model that was never "
            f"trained on the chat format and would not know when to stop. Use --raw for plain "
            f"completion, or fine-tune it first.")


def respond(model, tokenizer, conversations, *, raw=False, batch_size=16, generator=None,
            seeds=None, on_token=None, progress=None, compile=False, keep_cache=False,
            all_done=None, **decoding):
    """Conversations (each a list of turns ending on a user turn) -> response strings, in the
    input order.

    decoding: max_new_tokens, max_seq_len, temperature, top_p, repetition_penalty,
    penalize_prompt (decode's keywords). All conversations go through decode() together,
    batch_size rows at a time (continuous batching); with all_done (processes decoding in
    lockstep), fixed batches of batch_size prompts of similar length instead. seeds: one per
    conversation when sampling (prompt_seed); default: drawn from generator. on_token(index,
    id) streams tokens of conversation `index`; progress(n) counts new tokens (decode's).
    """
    if not raw:
        check_chat_model(model, tokenizer)
    prompts = [encode_prompt(tokenizer, turns, raw) for turns in conversations]
    if seeds is None and decoding.get("temperature", Decoding.temperature) > 0:
        seeds = draw_seeds(generator, len(prompts))
    if all_done is None:
        batches = [list(range(len(prompts)))]
    else:
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # less padding
        batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    responses = [None] * len(prompts)
    try:
        for idx in batches:
            stream = None if on_token is None else (lambda j, t, idx=idx: on_token(idx[j], t))
            for j, ids in decode(model, [prompts[i] for i in idx], stop_ids=stop_ids(tokenizer),
                                 batch_size=batch_size,
                                 seeds=None if seeds is None else [seeds[i] for i in idx],
                                 vocab_size=tokenizer.vocab_size, on_token=stream, progress=progress,
                                 compile=compile, keep_cache=True, all_done=all_done, **decoding):
                responses[idx[j]] = tokenizer.decode(ids)
    finally:
        if not keep_cache:
            model.clear_cache()
    return responses
