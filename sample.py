"""Sample from a LIMA model: one prompt, a file of prompts, or a conversation (LIMA §5).

    python sample.py --checkpoint out/lima-65b/epoch_07 --prompt "How do I brew good tea?"
    python sample.py --checkpoint out/lima-65b/epoch_07 --prompt_file data/lima/test_prompts.jsonl --out gens.jsonl
    python sample.py --checkpoint out/lima-65b/epoch_07 --interactive
    python sample.py --checkpoint llama-7b --raw --prompt "The capital of France is"
    python sample.py --checkpoint out/demo/epoch_15 --prompt_file data/demo/test_prompts.jsonl --base demo/base
    python sample.py --checkpoint llama-65b --device cuda:0,cuda:1 --prompt ...   # layers split

The paper's decoding (generate.py): repetition penalty 1.2 on the tokens generated so far,
temperature 0.7, nucleus p 0.9, at most 2048 tokens in all (prompt + response), stop at the
end-of-turn token. The prompt is the training format, BOS user EOT (LIMA §3); `--raw` is plain
completion for a base model (BOS text ..., stop at EOS).

stdout carries the generated text and nothing else; logs and the progress bar go to stderr.
"""

import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
from tqdm import tqdm

import checkpoint
import config
import data
import devices
from generate import DECODING, Decoding, PromptError, check_chat_model, encode_prompt, respond
from tokenizer import Tokenizer

SKIP_IN_RESUME_CHECK = ("seed",)  # a resumed run may draw new randomness; nothing else changes


@dataclass
class SampleConfig(Decoding):  # the decoding flags and their defaults come from generate.Decoding
    checkpoint: str = field(default="", metadata={"help": "model directory (Meta, Hugging Face or ours)"})
    tokenizer: Optional[str] = field(default=None, metadata={"help": "tokenizer.model; default: beside the checkpoint or in its parent"})
    prompt: Optional[str] = field(default=None, metadata={"help": "one prompt; the response streams to stdout"})
    prompt_file: Optional[str] = field(default=None, metadata={"help": "LIMA-style .jsonl (conversations), prepare_data.py's *_prompts.jsonl (turns), or a text file, one prompt per line"})
    out: Optional[str] = field(default=None, metadata={"help": "JSON lines for --prompt_file, resumed if it exists; without it the answers print to stdout"})
    interactive: bool = field(default=False, metadata={"help": "a multi-turn conversation in the terminal"})
    raw: bool = field(default=False, metadata={"help": "plain completion (BOS text ...), stop at EOS: for base models"})
    seed: Optional[int] = field(default=None, metadata={"help": "makes sampling repeatable; default: a fresh seed, logged"})
    batch_size: int = field(default=16, metadata={"help": "prompts decoded together (--prompt_file)"})
    device: str = field(default="auto", metadata={"help": "auto (cuda if any; all visible GPUs, layers split, when the model does not fit one), cpu, cuda:1, or a list cuda:0,cuda:1"})
    dtype: str = field(default="auto", metadata={"help": f"auto (bfloat16 on GPU, float32 on CPU), {', '.join(config.DTYPES)}"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the decode step"})
    base: Optional[str] = field(default=None, metadata={"help": "the base model it was fine-tuned from: under each answer (--prompt_file without --out), the base's plain continuation (--raw) of the same prompt"})


def log(*args):
    print(*args, file=sys.stderr, flush=True)


# ---- a file of prompts, answered into a resumable file ------------------------------------------

def answered_before(out_path, settings):
    """Turns already answered in out_path (with multiplicity); a file made with other settings
    is refused rather than extended."""
    done = Counter()
    if not os.path.exists(out_path):
        return done
    for n, rec in data.read_jsonl(out_path, repair_tail=True):
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
    """Answer records (from data.read_prompts) into out_path, one data.generation_record each.

    Resumable: prompts already answered in out_path are skipped (a prompt listed k times is
    answered k times). settings: decoding keywords plus raw, seed, checkpoint. Returns the
    number of new responses; the finished file is in the prompt file's order."""
    done = answered_before(out_path, settings)
    todo, seen = [], Counter()
    for i, rec in enumerate(records):
        key = tuple(rec["turns"])
        seen[key] += 1
        if seen[key] > done[key]:
            todo.append(i)
    if len(todo) < len(records):
        log(f"{out_path}: {len(records) - len(todo)} of {len(records)} prompts already answered; resuming")
    raw = settings.get("raw", False)
    decoding = {k: settings[k] for k in DECODING}
    lengths = check_lengths(model, tokenizer, records, todo, raw, settings["max_seq_len"])
    todo.sort(key=lambda i: -lengths[i])  # batches of similar length: less padding
    t0, n_tokens = time.time(), 0
    try:
        with data.Appender(out_path) as out, tqdm(total=len(todo), file=sys.stderr, unit="prompt") as bar:
            for s in range(0, len(todo), batch_size):
                idx = todo[s:s + batch_size]
                responses = respond(model, tokenizer, [records[i]["turns"] for i in idx],
                                    raw=raw, batch_size=batch_size, generator=generator,
                                    compile=compile, keep_cache=True, **decoding)
                for i, response in zip(idx, responses):
                    extra = {k: v for k, v in records[i].items() if k != "turns"}
                    out.write(data.generation_record(i, records[i]["turns"], response, settings, extra))
                    n_tokens += len(tokenizer.encode(response))
                bar.update(len(idx))
                bar.set_postfix(tok_s=f"{n_tokens / (time.time() - t0):.1f}")
    finally:
        model.clear_cache()
    if todo:  # batches ran longest prompt first; put the file back in the prompt file's order
        rows = data.read_jsonl(out_path)
        data.write_jsonl(out_path, sorted((r for _, r in rows), key=lambda r: r.get("index", 0)))
    return len(todo)


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


# ---- command line ----------------------------------------------------------------------------

def load(cfg):
    """The model on the chosen device(s), and its tokenizer (which must fit its vocabulary)."""
    if not cfg.checkpoint:
        raise PromptError("no --checkpoint given: pass the model directory")
    if not os.path.exists(cfg.checkpoint):
        raise PromptError(f"--checkpoint {cfg.checkpoint}: no such directory")
    args = checkpoint.load_args(cfg.checkpoint)
    probe = config.resolve_dtype(cfg.dtype, "cuda" if torch.cuda.is_available() else "cpu")
    rows = cfg.batch_size if cfg.prompt_file else 1
    placed = devices.choose_devices(cfg.device, args, probe, rows, min(cfg.max_seq_len, args.max_seq_len))
    dtype = config.resolve_dtype(cfg.dtype, placed[0])
    tokenizer_path = cfg.tokenizer or checkpoint.find_tokenizer(cfg.checkpoint)
    if tokenizer_path is None:
        raise PromptError(f"{cfg.checkpoint}: no tokenizer.model here or in the parent "
                          f"directory; pass --tokenizer")
    tokenizer = Tokenizer(tokenizer_path)
    tokenizer.check_model_vocab(args.vocab_size, cfg.checkpoint)
    if len(placed) == 1:
        model = checkpoint.load_model(cfg.checkpoint, dtype=dtype, device=placed[0])
    else:
        model = devices.load_placed(cfg.checkpoint, devices.placement_plan(args, placed), dtype)
    model.requires_grad_(False).eval()
    n = model.num_params()
    size = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
    log(f"{cfg.checkpoint}: {size} parameters, {dtype}, on {', '.join(placed)}; "
        f"tokenizer {tokenizer.path}")
    return model, tokenizer


def base_continuations(cfg, records, gen):
    """What the base model does with each prompt before any fine-tuning: plain completion of
    the prompt's text (a conversation shown with its roles, data.render_prompt)."""
    base, base_tokenizer = load(replace(cfg, checkpoint=cfg.base, tokenizer=None))
    texts = [[data.render_prompt(r["turns"])] for r in records]
    check_lengths(base, base_tokenizer, [{"turns": t} for t in texts], range(len(texts)), True, cfg.max_seq_len)
    return respond(base, base_tokenizer, texts, raw=True, batch_size=cfg.batch_size, **gen)


def interactive(model, tokenizer, cfg, gen):
    """Talk to the model. Each exchange is appended in the training format, so turn n sees
    BOS u1 EOT a1 EOT .. u_n EOT (LIMA §3); the oldest exchanges drop out when the
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


def run(cfg):
    modes = sum([cfg.prompt is not None, cfg.prompt_file is not None, cfg.interactive])
    if modes == 0:
        raise PromptError("the prompt is empty: give --prompt TEXT, --prompt_file FILE or --interactive")
    if modes > 1:
        raise PromptError("give one of --prompt, --prompt_file, --interactive")
    if cfg.prompt is not None and not cfg.prompt.strip():
        raise PromptError("the prompt is empty")
    if cfg.out and cfg.prompt_file is None:
        raise PromptError("--out goes with --prompt_file; --prompt and --interactive print the "
                          "response to stdout")
    if cfg.base and (cfg.prompt_file is None or cfg.out):
        raise PromptError("--base goes with --prompt_file and no --out: it prints each answer "
                          "above the base model's continuation of the same prompt")
    records = data.read_prompts(cfg.prompt_file) if cfg.prompt_file else None
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
        continuations = base_continuations(cfg, records, gen) if cfg.base else None
        for i, (r, response) in enumerate(zip(records, responses)):
            print(f"### {r['turns'][-1]}\n{response}\n", flush=True)
            if continuations is not None:
                print(f"--- the base model, continuing the same text:\n{continuations[i]}\n", flush=True)
    elif records is not None:
        settings = dict(decoding, raw=cfg.raw, seed=seed, checkpoint=os.path.abspath(cfg.checkpoint))
        n = generate_file(model, tokenizer, records, cfg.out, settings, batch_size=cfg.batch_size,
                          generator=generator, compile=cfg.compile)
        log(f"{cfg.out}: {n} new responses")
    elif cfg.interactive:
        interactive(model, tokenizer, cfg, gen)
    else:
        check_lengths(model, tokenizer, [{"turns": [cfg.prompt]}], [0], cfg.raw, cfg.max_seq_len)
        streamer = TextStreamer(tokenizer, sys.stdout)
        t0 = time.time()
        respond(model, tokenizer, [[cfg.prompt]], raw=cfg.raw, batch_size=1,
                on_token=lambda _, t: streamer.put(t), **gen)
        streamer.end()
        log(f"{len(streamer.ids)} tokens in {time.time() - t0:.1f}s")


def main(argv=None):
    cfg = config.parse_config(SampleConfig, argv, description=__doc__.split("\n\n")[0])
    try:
        run(cfg)
    except (PromptError, data.DataError, FileNotFoundError, ValueError) as e:
        # user-facing problems (paths, vocabularies, prompts): the message, no traceback
        log(f"sample.py: error: {e}")
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
