"""Sample from a LIMA model: one prompt, a file of prompts, or a conversation (LIMA.md §5).

    python sample.py --checkpoint out/lima-65b/epoch-7 --prompt "How do I brew good tea?"
    python sample.py --checkpoint out/lima-65b/epoch-7 --prompt_file data/test.jsonl --out gens.jsonl
    python sample.py --checkpoint out/lima-65b/epoch-7 --interactive
    python sample.py --checkpoint llama-7b --raw --prompt "The capital of France is"
    python sample.py --checkpoint llama-65b --device cuda:0,cuda:1 --prompt ...   # layers split

The paper's decoding: repetition penalty 1.2 on the tokens generated so far, temperature 0.7,
nucleus p 0.9, at most 2048 tokens in all (prompt + response), stop at the end-of-turn token.
The prompt is the training format, BOS user EOT (LIMA.md §3); `--raw` is plain completion for
a base model (BOS text ..., stop at EOS).

stdout carries the generated text and nothing else; logs and the progress bar go to stderr.
"""

import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import torch

import config
from model import KVCache

# generate()'s decoding keywords, as SampleConfig names them
DECODING = ("temperature", "top_p", "repetition_penalty", "penalize_prompt", "max_new_tokens",
            "max_seq_len")
SKIP_IN_RESUME_CHECK = ("seed",)  # a resumed run may draw new randomness; nothing else changes


@dataclass
class SampleConfig:
    checkpoint: str = field(default="", metadata={"help": "model directory (Meta, Hugging Face or ours)"})
    tokenizer: Optional[str] = field(default=None, metadata={"help": "tokenizer.model; default: beside the checkpoint or in its parent"})
    prompt: Optional[str] = field(default=None, metadata={"help": "one prompt; the response streams to stdout"})
    prompt_file: Optional[str] = field(default=None, metadata={"help": "LIMA-style .jsonl (conversations), prepare_data.py's *_prompts.jsonl (turns), or a text file, one prompt per line"})
    out: Optional[str] = field(default=None, metadata={"help": "JSON lines for --prompt_file, resumed if it exists; without it the answers print to stdout"})
    interactive: bool = field(default=False, metadata={"help": "a multi-turn conversation in the terminal"})
    raw: bool = field(default=False, metadata={"help": "plain completion (BOS text ...), stop at EOS: for base models"})
    # LIMA §5: the paper's decoding
    temperature: float = field(default=0.7, metadata={"help": "LIMA §5; 0 is greedy"})
    top_p: float = field(default=0.9, metadata={"help": "LIMA §5 nucleus sampling"})
    repetition_penalty: float = field(default=1.2, metadata={"help": "LIMA §5 (Keskar et al. 2019); 1 is off"})
    penalize_prompt: bool = field(default=False, metadata={"help": "penalise the prompt's tokens too (transformers' behaviour)"})
    max_new_tokens: Optional[int] = field(default=None, metadata={"help": "cap on the response; default: until the context is full"})
    max_seq_len: int = field(default=2048, metadata={"help": "LIMA §5: prompt + response at most this"})
    seed: Optional[int] = field(default=None, metadata={"help": "makes sampling repeatable; default: a fresh seed, logged"})
    batch_size: int = field(default=16, metadata={"help": "prompts decoded together (--prompt_file)"})
    device: str = field(default="auto", metadata={"help": "auto (cuda if any; all visible GPUs, layers split, when the model does not fit one), cpu, cuda:1, or a list cuda:0,cuda:1"})
    dtype: str = field(default="auto", metadata={"help": "auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the decode step"})


class PromptError(ValueError):
    """A problem with what the user asked for (empty, too long, wrong format): a message, no trace."""


# ---- decoding: pure functions on logits (LIMA.md §5) ------------------------------------------

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


def sample_next(logits, penalized=None, *, temperature=0.7, top_p=0.9, repetition_penalty=1.2,
                generator=None):
    """(B, V) logits -> (B,) next ids. LIMA.md §5 order: penalty, then temperature, then top-p.
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


# ---- the KV cache, placed beside each layer ---------------------------------------------------

def cache_shape(model):
    """(rows, length) of the current KV cache, or None."""
    cache = model.layers[0].attention.kv_cache
    return None if cache is None else tuple(cache.k.shape[:2])


def setup_cache(model, batch_size, length):
    """model.setup_cache, except that each layer's cache lives on that layer's device (layers
    may be spread over GPUs)."""
    args = model.args
    for layer in model.layers:
        w = layer.attention.wk.weight
        layer.attention.kv_cache = KVCache(batch_size, length, args.kv_heads, args.head_dim,
                                           w.dtype, w.device)


def grow_cache(model, length):
    """Longer caches, contents kept. The cached attention reads the whole buffer every step,
    so a cache only as long as the longest row so far bounds the work."""
    for layer in model.layers:
        old = layer.attention.kv_cache
        B, S, H, D = old.k.shape
        new = KVCache(B, length, H, D, old.k.dtype, old.k.device)
        new.k[:, :S], new.v[:, :S] = old.k, old.v
        layer.attention.kv_cache = new


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


@torch.no_grad()  # not inference_mode: FSDP2 (train.py's dev generations) fails under it
def generate(model, prompts, *, stop_ids, max_new_tokens=None, max_seq_len=2048,
             temperature=0.7, top_p=0.9, repetition_penalty=1.2, penalize_prompt=False,
             generator=None, on_token=None, vocab_size=None, compile=False, keep_cache=False):
    """Decode a batch of prompts together (LIMA.md §5).

    prompts: token-id lists, BOS included. Returns each prompt's new tokens, without the stop
    token. Row b stops at its first stop id or when prompt + response reach max_seq_len (and
    after max_new_tokens). on_token(row, id) sees each kept token as it is made (a host sync
    per step). vocab_size: ids at or past it are never sampled (a padded embedding's rows).
    The model is put in eval mode and given back in the mode it was in; its KV cache is
    dropped afterwards unless keep_cache (then the next call reuses it when it fits).
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

    device = model.tok_embeddings.weight.device
    step_fn = compiled_decode_one(device.type) if compile else decode_one
    was_training = model.training
    model.eval()
    try:
        # Compiled: one fixed-size cache (the full context), reused across calls, so the graph
        # and its buffers stay put. Eager: a cache as long as the longest row needs so far.
        if compile:
            shape = cache_shape(model)
            if shape is None or shape[0] < B or shape[1] != context:
                setup_cache(model, B, context)
        else:
            setup_cache(model, B, min(most, _round_up(T, CACHE_STEP)))
        cache_len = cache_shape(model)[1]

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

        for i in range(steps):
            nxt = sample_next(logits, penalized, temperature=temperature, top_p=top_p,
                              repetition_penalty=repetition_penalty, generator=generator)
            new_tokens.append(nxt)
            stopped |= torch.isin(nxt, stops)
            if on_token is not None:
                for row, t in enumerate(nxt.tolist()):
                    if not host_done[row]:
                        host_done[row] = t in stop_ids or i + 1 >= budgets[row]
                        if t not in stop_ids:
                            on_token(row, t)
            if i + 1 == steps:
                break
            # every row stopped or out of budget: done. Ask only every 8 steps (a host sync)
            if (on_token is not None or i % 8 == 7) and _finished(stopped | (budgets_t <= i + 1), model):
                break
            if penalized is not None:
                penalized.scatter_(1, nxt[:, None], True)
            # token i of row b goes to position n_b + i; finished rows keep writing (clamped)
            # into their own row's slots, which nobody reads
            needed = max((n + i for n, lp in zip(lengths, last_pos) if n + i <= lp), default=0) + 1
            if needed > cache_len:
                cache_len = min(most, _round_up(needed, CACHE_STEP))
                grow_cache(model, cache_len)
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
    return results


def _finished(done, model):
    """done (B,) -> all rows finished? Under FSDP (train.py's dev generations) every forward is
    a collective, so all ranks must agree on when to stop."""
    done = done.all()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from torch.distributed.tensor import DTensor
        if isinstance(model.output.weight, DTensor):
            done = done.to(torch.int32)
            torch.distributed.all_reduce(done, op=torch.distributed.ReduceOp.MIN)
    return bool(done)


def _round_up(n, m):
    return m * math.ceil(n / m)


# ---- prompts, responses, files ------------------------------------------------------------------

def stop_ids(tokenizer):
    # LIMA §3: EOT ends a turn. EOS is never trained in the chat format, but if a model says it,
    # what follows is a new document, not the answer: stop there too (and --raw stops at EOS)
    return (tokenizer.eot_id, tokenizer.eos_id)


def encode_prompt(tokenizer, turns, raw=False):
    """A conversation ending on a user turn -> BOS u1 EOT a1 EOT .. u_n EOT (LIMA.md §3);
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
            on_token=None, compile=False, keep_cache=False, **decoding):
    """Conversations (each a list of turns ending on a user turn) -> response strings.

    decoding: max_new_tokens, max_seq_len, temperature, top_p, repetition_penalty,
    penalize_prompt (generate's keywords). Batches of similar prompt length, answers in the
    input order. on_token(index, id) streams tokens of conversation `index`.
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
                           on_token=stream, compile=compile, keep_cache=True, **decoding)
            for i, ids in zip(idx, new):
                responses[i] = tokenizer.decode(ids)
    finally:
        if not keep_cache:
            model.clear_cache()
    return responses


def read_prompts(path):
    """-> [{"turns": [...], ...the row's other fields}].

    .jsonl/.json: one JSON object per line, {"conversations": [user, assistant, ...]} (GAIR/lima;
    a conversation that ends on an assistant turn loses that turn: it is the reference answer)
    or {"prompt": "..."}. Any other file: one prompt per non-empty line."""
    with open(path) as f:
        lines = f.read().splitlines()
    if not path.endswith((".jsonl", ".json")):
        return [{"turns": [line]} for line in lines if line.strip()]
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptError(f"{path}:{n}: not JSON ({e})") from None
        if isinstance(row, dict) and isinstance(row.get("turns"), list):  # prepare_data.py's prompts
            turns = row.pop("turns")
        elif isinstance(row, dict) and isinstance(row.get("conversations"), list):
            turns = row.pop("conversations")
            turns = turns[:-1] if len(turns) % 2 == 0 else turns
        elif isinstance(row, dict) and isinstance(row.get("prompt"), str):
            turns = [row.pop("prompt")]
        else:
            raise PromptError(f"{path}:{n}: expected {{\"conversations\": [...]}}, "
                              f"{{\"turns\": [...]}} or {{\"prompt\": \"...\"}}")
        if not turns or not any(t.strip() for t in turns):
            raise PromptError(f"{path}:{n}: empty prompt")
        row.pop("response", None)
        records.append({"turns": turns, **row})
    return records


def _read_done(out_path, settings):
    """Turns already answered in out_path (with multiplicity); a torn last line is cut off."""
    done = Counter()
    if not os.path.exists(out_path):
        return done
    with open(out_path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):  # killed mid-write: drop the partial line
            data = data[:data.rfind(b"\n") + 1]
            f.truncate(len(data))
    for n, line in enumerate(data.decode().splitlines(), 1):
        rec = json.loads(line)
        theirs = {k: v for k, v in rec.get("settings", {}).items() if k not in SKIP_IN_RESUME_CHECK}
        ours = {k: v for k, v in settings.items() if k not in SKIP_IN_RESUME_CHECK}
        if theirs != ours:
            diff = {k: (theirs.get(k), ours.get(k)) for k in theirs.keys() | ours.keys()
                    if theirs.get(k) != ours.get(k)}
            raise PromptError(f"{out_path}:{n} was made with other settings (theirs, ours): "
                              f"{diff}. Write to another --out.")
        done[tuple(rec.get("context", [])) + (rec["prompt"],)] += 1
    return done


def check_lengths(model, tokenizer, records, todo, raw, max_seq_len):
    """Prompt lengths in tokens; a prompt that leaves no room for a response is refused before
    any work, not an hour in."""
    lengths = {i: len(encode_prompt(tokenizer, records[i]["turns"], raw)) for i in todo}
    context = min(max_seq_len, model.args.max_seq_len)
    for i in todo:
        if lengths[i] >= context:
            raise PromptError(f"prompt {i + 1} ({records[i]['turns'][-1][:60]!r}...) is "
                              f"{lengths[i]} tokens; the context holds {context} (prompt + "
                              f"response), leaving no room for a response")
    return lengths


def generate_file(model, tokenizer, records, out_path, settings, *, batch_size=16,
                  generator=None, compile=False):
    """Answer records (from read_prompts) into out_path as JSON lines
    {"index", "prompt", ["context",] "response", "settings", ...the record's fields}.

    Resumable: prompts already answered in out_path are skipped (a prompt listed k times is
    answered k times). settings: decoding keywords plus raw, seed, checkpoint; a file made
    with other settings is refused. Returns the number of new responses."""
    done = _read_done(out_path, settings)
    todo, seen = [], Counter()
    for i, rec in enumerate(records):
        key = tuple(rec["turns"])
        seen[key] += 1
        if seen[key] > done[key]:
            todo.append(i)
    skipped = len(records) - len(todo)
    if skipped:
        print(f"{out_path}: {skipped} of {len(records)} prompts already answered; resuming",
              file=sys.stderr)
    raw = settings.get("raw", False)
    decoding = {k: settings[k] for k in DECODING}
    lengths = check_lengths(model, tokenizer, records, todo, raw, settings["max_seq_len"])
    todo.sort(key=lambda i: -lengths[i])  # batches of similar length: less padding

    from tqdm import tqdm
    t0, n_tokens = time.time(), 0
    try:
        with open(out_path, "a") as f, tqdm(total=len(todo), file=sys.stderr, unit="prompt") as bar:
            for s in range(0, len(todo), batch_size):
                idx = todo[s:s + batch_size]
                responses = respond(model, tokenizer, [records[i]["turns"] for i in idx],
                                    raw=raw, batch_size=batch_size, generator=generator,
                                    compile=compile, keep_cache=True, **decoding)
                for i, response in zip(idx, responses):
                    rec = {k: v for k, v in records[i].items() if k != "turns"}
                    turns = records[i]["turns"]
                    line = {"index": i, "prompt": turns[-1],
                            **({"context": turns[:-1]} if len(turns) > 1 else {}),
                            "response": response, "settings": settings, **rec}
                    f.write(json.dumps(line, ensure_ascii=False) + "\n")
                    n_tokens += len(tokenizer.encode(response))
                f.flush()
                bar.update(len(idx))
                bar.set_postfix(tok_s=f"{n_tokens / (time.time() - t0):.1f}")
    finally:
        model.clear_cache()
    if todo:
        _sort_by_index(out_path)
    return len(todo)


def _sort_by_index(out_path):
    """Batches run longest prompt first; put the finished file back in the prompt file's order."""
    with open(out_path) as f:
        lines = f.read().splitlines()
    lines.sort(key=lambda line: json.loads(line).get("index", 0))
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        f.write("".join(line + "\n" for line in lines))
    os.replace(tmp, out_path)


class TextStreamer:
    """Print a response as its tokens arrive. SentencePiece decodes a piece differently at the
    start of a text (no leading space), so decode the whole response each time and print what
    is new; hold back a half-made UTF-8 character (byte-fallback pieces)."""

    def __init__(self, tokenizer, file=None):
        self.tokenizer, self.file = tokenizer, file or sys.stdout
        self.ids, self.printed = [], ""

    def put(self, token_id):
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            self._emit(text)

    def end(self):
        self._emit(self.tokenizer.decode(self.ids))
        self.file.write("\n")
        self.file.flush()

    def _emit(self, text):
        if text.startswith(self.printed) and len(text) > len(self.printed):
            self.file.write(text[len(self.printed):])
            self.file.flush()
            self.printed = text


# ---- models bigger than one GPU: consecutive layers on consecutive devices --------------------

def placement_plan(args, devices):
    """{module name: device} for tok_embeddings, layers.0 .. layers.{L-1}, norm, output:
    contiguous runs balanced by parameter count (a module goes to the device whose share of the
    total holds its midpoint). The output head sits with the final norm on the last device."""
    from model import Transformer
    with torch.device("meta"):
        model = Transformer(args)  # shapes only
    parts = [("tok_embeddings", model.tok_embeddings)]
    parts += [(f"layers.{i}", layer) for i, layer in enumerate(model.layers)]
    parts += [("norm", model.norm), ("output", model.output)]
    sizes = [sum(p.numel() for p in m.parameters()) for _, m in parts]
    total, n, cum, plan = sum(sizes), len(devices), 0, {}
    for (name, _), size in zip(parts, sizes):
        plan[name] = devices[min(n - 1, int(n * (cum + size / 2) / total))]
        cum += size
    plan["norm"] = plan["output"]
    return plan


def _inputs_to(device):
    def hook(module, args):
        return tuple(a.to(device, non_blocking=True) if torch.is_tensor(a) else a for a in args)
    return hook


def place_model(model, plan):
    """Move each part to its device and hook every layer (and the final norm) to bring its
    inputs along: activations, RoPE angles and cache positions hop device at the boundaries,
    model.forward is unchanged. Tokens go in on plan["tok_embeddings"]; logits come out on
    plan["output"]."""
    for name, device in plan.items():
        module = model.get_submodule(name)
        module.to(device)
        if name.startswith("layers.") or name == "norm":
            module.register_forward_pre_hook(_inputs_to(torch.device(device)))
    return model


def load_placed(path, plan, dtype):
    """Like checkpoint.load_model, but each tensor goes straight to its planned device, so a 65B
    model never sits whole in host memory."""
    import torch.nn as nn
    import checkpoint
    from model import Transformer
    args = checkpoint.load_args(path)
    with torch.device("meta"):
        model = Transformer(args)
    for name, tensor in checkpoint.iter_weights(path, args):
        module_name, _, leaf = name.rpartition(".")
        device = next(d for part, d in plan.items() if name == part or name.startswith(part + "."))
        setattr(model.get_submodule(module_name), leaf,
                nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False))
    return place_model(model, plan)


# ---- command line ----------------------------------------------------------------------------

def log(*args):
    print(*args, file=sys.stderr, flush=True)


def resolve_devices(cfg, args):
    """-> list of devices to spread the layers over (one for most models)."""
    if cfg.device != "auto":
        devices = [d.strip() for d in cfg.device.split(",") if d.strip()]
        if any(d.startswith("cuda") for d in devices) and not torch.cuda.is_available():
            raise PromptError(f"--device {cfg.device}: no CUDA device here; use --device cpu")
        return devices
    if not torch.cuda.is_available():
        return ["cpu"]
    n = torch.cuda.device_count()
    dtype = resolve_dtype(cfg, "cuda")
    with torch.device("meta"):
        from model import Transformer
        weight_bytes = Transformer(args).num_params() * dtype.itemsize
    # the full-context KV cache of one batch: 30B's weights fit an 80 GB GPU, with it they don't
    rows = cfg.batch_size if cfg.prompt_file else 1
    context = min(cfg.max_seq_len, args.max_seq_len)
    cache_bytes = rows * context * args.n_layers * 2 * args.kv_heads * args.head_dim * dtype.itemsize
    free = torch.cuda.mem_get_info(0)[0]
    if n > 1 and weight_bytes + cache_bytes > 0.9 * free:  # 10% for activations and logits
        return [f"cuda:{i}" for i in range(n)]
    return ["cuda"]


def resolve_dtype(cfg, device_type):
    if cfg.dtype == "auto":
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    return getattr(torch, cfg.dtype)


def load(cfg):
    import checkpoint
    from tokenizer import Tokenizer
    if not cfg.checkpoint:
        raise PromptError("no --checkpoint given: pass the model directory")
    if not os.path.exists(cfg.checkpoint):
        raise PromptError(f"--checkpoint {cfg.checkpoint}: no such directory")
    args = checkpoint.load_args(cfg.checkpoint)
    devices = resolve_devices(cfg, args)
    dtype = resolve_dtype(cfg, torch.device(devices[0]).type)
    if len(devices) == 1:
        model, tokenizer = checkpoint.load_model_and_tokenizer(
            cfg.checkpoint, cfg.tokenizer, dtype=dtype, device=devices[0])
    else:
        tokenizer_path = cfg.tokenizer or checkpoint.find_tokenizer(cfg.checkpoint)
        if tokenizer_path is None:
            raise PromptError(f"{cfg.checkpoint}: no tokenizer.model here or in the parent "
                              f"directory; pass --tokenizer")
        tokenizer = Tokenizer(tokenizer_path)
        tokenizer.check_model_vocab(args.vocab_size, cfg.checkpoint)
        model = load_placed(cfg.checkpoint, placement_plan(args, devices), dtype)
    model.requires_grad_(False).eval()
    n = model.num_params()
    size = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
    log(f"{cfg.checkpoint}: {size} parameters, {dtype}, on "
        f"{', '.join(devices)}; tokenizer {tokenizer.path}")
    return model, tokenizer


def interactive(model, tokenizer, cfg, gen):
    """Talk to the model. Each exchange is appended in the training format, so turn n sees
    BOS u1 EOT a1 EOT .. u_n EOT (LIMA.md §3); the oldest exchanges drop out when the
    conversation outgrows the context."""
    log("Interactive: type a message (one line). /reset starts over, /exit or Ctrl-D quits.")
    turns, context = [], min(cfg.max_seq_len, model.args.max_seq_len)
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            turns = []
            log("(conversation reset)")
            continue
        if not text.strip():
            continue
        turns = [text] if cfg.raw else turns + [text]
        while len(turns) > 1 and len(encode_prompt(tokenizer, turns, cfg.raw)) >= context:
            turns = turns[2:]
            log("(the conversation outgrew the context: dropped the oldest exchange)")
        if len(encode_prompt(tokenizer, turns, cfg.raw)) >= context:
            log(f"error: this message alone fills the {context}-token context; say less")
            turns = turns[:-1]
            continue
        streamer = TextStreamer(tokenizer, sys.stdout)
        [reply] = respond(model, tokenizer, [turns], raw=cfg.raw, batch_size=1,
                          on_token=lambda _, t: streamer.put(t), keep_cache=True, **gen)
        streamer.end()
        if not cfg.raw:
            turns = turns + [reply]


def main(argv=None):
    cfg = config.parse_config(SampleConfig, argv, description=__doc__.split("\n\n")[0])
    modes = sum([cfg.prompt is not None, cfg.prompt_file is not None, cfg.interactive])
    try:
        if modes == 0:
            raise PromptError("the prompt is empty: give --prompt TEXT, --prompt_file FILE or "
                              "--interactive")
        if modes > 1:
            raise PromptError("give one of --prompt, --prompt_file, --interactive")
        if cfg.prompt is not None and not cfg.prompt.strip():
            raise PromptError("the prompt is empty")
        if cfg.out and cfg.prompt_file is None:
            raise PromptError("--out goes with --prompt_file; --prompt and --interactive print "
                              "the response to stdout")
        records = read_prompts(cfg.prompt_file) if cfg.prompt_file else None
        model, tokenizer = load(cfg)
        if not cfg.raw:
            check_chat_model(model, tokenizer)
        seed = cfg.seed if cfg.seed is not None else int.from_bytes(os.urandom(4), "little")
        generator = torch.Generator(model.output.weight.device).manual_seed(seed)
        log(f"seed {seed}")
        decoding = {k: getattr(cfg, k) for k in DECODING}
        gen = dict(decoding, generator=generator, compile=cfg.compile)
        if records is not None and not cfg.out:  # a quick look: each prompt and its answer
            check_lengths(model, tokenizer, records, range(len(records)), cfg.raw, cfg.max_seq_len)
            responses = respond(model, tokenizer, [r["turns"] for r in records], raw=cfg.raw,
                                batch_size=cfg.batch_size, **gen)
            for r, response in zip(records, responses):
                print(f"### {r['turns'][-1]}\n{response}\n", flush=True)
            return
        if records is not None:
            settings = dict(decoding, raw=cfg.raw, seed=seed,
                            checkpoint=os.path.abspath(cfg.checkpoint))
            n = generate_file(model, tokenizer, records, cfg.out, settings,
                              batch_size=cfg.batch_size, generator=generator,
                              compile=cfg.compile)
            log(f"{cfg.out}: {n} new responses")
            return
        if cfg.interactive:
            return interactive(model, tokenizer, cfg, gen)
        prompt = encode_prompt(tokenizer, [cfg.prompt], cfg.raw)  # checks the length early
        context = min(cfg.max_seq_len, model.args.max_seq_len)
        if len(prompt) >= context:
            raise PromptError(f"the prompt is {len(prompt)} tokens; the context holds {context} "
                              f"(prompt + response), leaving no room for a response")
        streamer = TextStreamer(tokenizer, sys.stdout)
        t0 = time.time()
        respond(model, tokenizer, [[cfg.prompt]], raw=cfg.raw, batch_size=1,
                on_token=lambda _, t: streamer.put(t), **gen)
        streamer.end()
        log(f"{len(streamer.ids)} tokens in {time.time() - t0:.1f}s")
    except (PromptError, FileNotFoundError, ValueError) as e:
        # user-facing problems (paths, vocabularies, prompts): the message, no traceback
        log(f"sample.py: error: {e}")
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
