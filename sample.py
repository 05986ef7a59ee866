"""Sample from a LIMA model: one prompt, a file of prompts, or a conversation (LIMA §5).

    python sample.py --checkpoint out/lima-65b/epoch_07 --prompt "How do I brew good tea?"
    python sample.py --checkpoint out/lima-65b/epoch_07 --prompt_file data/lima/test_prompts.jsonl --out gens.jsonl
    python sample.py --checkpoint out/lima-65b/epoch_07 --interactive
    python sample.py --checkpoint llama-7b --raw --prompt "The capital of France is"
    python sample.py --checkpoint out/demo/epoch_15 --prompt_file data/demo/test_prompts.jsonl --base demo/base
    python sample.py --checkpoint llama-65b --device cuda:0,cuda:1 --prompt ...   # layers split
    python sample.py --checkpoint out/lima-llama3.2-1b/epoch_07 --prompt "How do I brew good tea?"

The paper's decoding (generate.py): repetition penalty 1.2 on the tokens generated so far,
temperature 0.7, nucleus p 0.9, at most 2048 tokens in all (prompt + response), stop at the
end-of-turn token (Llama 3's own <|eot_id|>). The prompt is the training format, BOS user EOT
(LIMA §3); `--raw` is plain completion for a base model (BOS text ..., stop at EOS).

stdout carries the generated text and nothing else; logs and the progress bar go to stderr.
With --out, each response is saved the moment it is made, one process at a time per file
(a second is refused while the first runs); Ctrl-C, a crash or a full disk keep every finished
response, and the same command continues where it stopped.
"""

import os
import shlex
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Optional

from tqdm import tqdm

import checkpoint
import config
import data
import devices
import files
from generate import (DECODING, Decoding, PromptError, check_chat_model, check_text, decode,
                      encode_prompt, prompt_seed, respond, stop_ids)

# a resumed run may draw new randomness, and read its prompt file from another place (each line
# of --out is checked against the prompt it answers); nothing else may change
SKIP_IN_RESUME_CHECK = ("seed", "prompt_file")


@dataclass
class SampleConfig(Decoding):  # the decoding flags and their defaults come from generate.Decoding
    checkpoint: str = field(default="", metadata={"help": "model directory (Meta, Hugging Face or ours)"})
    tokenizer: Optional[str] = field(default=None, metadata={"help": "tokenizer.model or tokenizer.json; default: beside the checkpoint or in its parent"})
    prompt: Optional[str] = field(default=None, metadata={"help": "one prompt; the response streams to stdout"})
    prompt_file: Optional[str] = field(default=None, metadata={"help": "LIMA-style .jsonl (conversations), prepare_data.py's *_prompts.jsonl (turns), or a text file, one prompt per line"})
    out: Optional[str] = field(default=None, metadata={"help": "JSON lines for --prompt_file, resumed if it exists; without it the answers print to stdout"})
    interactive: bool = field(default=False, metadata={"help": "a multi-turn conversation in the terminal"})
    raw: bool = field(default=False, metadata={"help": "plain completion (BOS text ...), stop at EOS: for base models"})
    seed: Optional[int] = field(default=None, metadata={"help": "makes sampling repeatable; default: a fresh seed, logged", "min": 0, "max": 2**64 - 1})
    batch_size: int = field(default=16, metadata={"help": "prompts decoded together (--prompt_file)", "min": 1})
    device: str = field(default="auto", metadata={"help": "auto (cuda if any; all visible GPUs, layers split, when the model does not fit one), cpu, cuda:1, or a list cuda:0,cuda:1"})
    dtype: str = field(default="auto", metadata={"help": "auto: bfloat16 on GPU, float32 on CPU", "choices": ("auto",) + config.DTYPES})
    compile: bool = field(default=False, metadata={"help": "torch.compile the decode step"})
    base: Optional[str] = field(default=None, metadata={"help": "the base model it was fine-tuned from: under each answer (--prompt_file without --out), the base's plain continuation (--raw) of the same prompt"})


def log(*args):
    print(*args, file=sys.stderr, flush=True)


# ---- a file of prompts, answered into a resumable file ------------------------------------------

def remaining(records, out_path, settings):
    """Indexes of the records (data.read_prompts) not yet answered in out_path.

    Each line of out_path names the prompt it answers twice: by its index in the prompt file and
    by its text. A line made with other settings, or whose prompt is not the prompt file's at
    that index (another prompt file, or edited prompts), is refused rather than extended with
    answers whose indexes collide. A prompt file that grew at its end resumes; so does one that
    moved."""
    if not os.path.exists(out_path):
        return list(range(len(records)))
    ours = {k: v for k, v in settings.items() if k not in SKIP_IN_RESUME_CHECK}
    done = {}
    for n, rec in data.read_jsonl(out_path, repair_tail=True):
        recorded = rec.get("settings") if isinstance(rec.get("settings"), dict) else {}
        theirs = {k: v for k, v in recorded.items() if k not in SKIP_IN_RESUME_CHECK}
        if theirs != ours:
            diff = {k: (theirs.get(k), ours.get(k)) for k in theirs.keys() | ours.keys()
                    if theirs.get(k) != ours.get(k)}
            raise PromptError(f"{out_path}:{n} was made with other settings (theirs, ours): "
                              f"{diff}. Write to another --out.")
        i, context = rec.get("index"), rec.get("context", [])
        if not (isinstance(i, int) and not isinstance(i, bool) and i >= 0 and
                isinstance(rec.get("prompt"), str) and isinstance(context, list)):
            raise PromptError(f"{out_path}:{n}: no 'index' and 'prompt' of a line sample.py "
                              f"writes. Write to another --out.")
        if i >= len(records) or records[i]["turns"] != context + [rec["prompt"]]:
            here = (f"is {records[i]['turns'][-1][:60]!r}" if i < len(records) else
                    f"does not exist ({len(records)} prompts)")
            raise PromptError(
                f"{out_path}:{n} answers prompt {i + 1}, {rec['prompt'][:60]!r}, but prompt {i + 1} "
                f"of {settings.get('prompt_file', 'the prompt file')} {here}: {out_path} was made "
                f"from another prompt file ({recorded.get('prompt_file', 'unknown')}) "
                f"or the prompts were changed. Write to another --out.")
        if i in done:
            raise PromptError(f"{out_path}:{n} answers prompt {i + 1} again (first at line "
                              f"{done[i]}). Write to another --out.")
        done[i] = n
    return [i for i in range(len(records)) if i not in done]


def check_lengths(model, tokenizer, records, todo, raw, max_seq_len):
    """{index: prompt ids} for the records in todo; a prompt that leaves no room for a response
    is refused before any work, not an hour in."""
    prompts = {i: encode_prompt(tokenizer, records[i]["turns"], raw) for i in todo}
    context = min(max_seq_len, model.args.max_seq_len)
    for i in todo:
        if len(prompts[i]) >= context:
            raise PromptError(f"prompt {i + 1} ({records[i]['turns'][-1][:60]!r}...) is "
                              f"{len(prompts[i])} tokens; the context holds {context} (prompt + "
                              f"response), leaving no room for a response")
    return prompts


def answer(model, tokenizer, records, todo, settings, *, batch_size=16, seed=0, compile=False):
    """Yield (index, response) for the records in todo as each response ends: batch_size rows
    decode together, and a row whose answer ended takes the next prompt at once (continuous
    batching, generate.decode), longest prompts first. Prompt i samples from its own generator,
    seeded from (seed, i): its random draws do not depend on which prompts share its batch, so
    a resumed run answers it as an uninterrupted one would have. The progress bar counts
    tokens as they are made: its total is the most the prompts left can take (each one's room
    up to max_new_tokens or the context), and each finished response gives back the room it
    left unused, so the rate is real tokens per second and the ETA an upper bound that
    tightens."""
    raw = settings.get("raw", False)
    decoding = {k: settings[k] for k in DECODING}
    prompts = check_lengths(model, tokenizer, records, todo, raw, settings["max_seq_len"])
    context = min(settings["max_seq_len"], model.args.max_seq_len)
    cap = settings.get("max_new_tokens") or context
    room = {i: min(cap, context - len(prompts[i])) for i in todo}
    todo = sorted(todo, key=lambda i: -len(prompts[i]))
    bar = tqdm(total=sum(room.values()), unit="tok", unit_scale=True, file=sys.stderr,
               dynamic_ncols=True, desc=f"answering {len(todo)} prompts")
    responses = decode(model, [prompts[i] for i in todo], stop_ids=stop_ids(tokenizer),
                       batch_size=batch_size, seeds=[prompt_seed(seed, i) for i in todo],
                       vocab_size=tokenizer.vocab_size, progress=bar.update, compile=compile,
                       keep_cache=True, **decoding)
    try:
        for done, (j, ids) in enumerate(responses, 1):
            i = todo[j]
            bar.total -= room[i] - len(ids)  # the room this response left unused
            bar.set_postfix_str(f"{done}/{len(todo)} prompts", refresh=True)
            yield i, tokenizer.decode(ids)
    finally:
        responses.close()
        bar.close()
        model.clear_cache()


def generate_file(model, tokenizer, records, out_path, settings, *, batch_size=16, seed=0,
                  compile=False):
    """Answer records (from data.read_prompts) into out_path, one data.generation_record each,
    written as each response ends.

    Resumable: prompts already answered in out_path are skipped (remaining()). settings:
    decoding keywords plus raw, seed, checkpoint, prompt_file. The caller holds files.lock on
    out_path. Returns the number of new responses; the finished file is in the prompt file's
    order."""
    todo = remaining(records, out_path, settings)
    if len(todo) < len(records):
        log(f"{out_path}: {len(records) - len(todo)} of {len(records)} prompts already answered; resuming")
    with data.Appender(out_path) as out:
        for i, response in answer(model, tokenizer, records, todo, settings, batch_size=batch_size,
                                  seed=seed, compile=compile):
            extra = {k: v for k, v in records[i].items() if k != "turns"}
            out.write(data.generation_record(i, records[i]["turns"], response, settings, extra))
    sort_by_index(out_path)
    return len(todo)


def sort_by_index(out_path):
    """Responses are written as they end: put the file back in the prompt file's order (also
    after a run stopped before it could)."""
    rows = [r for _, r in data.read_jsonl(out_path)] if os.path.exists(out_path) else []
    order = sorted(rows, key=lambda r: r["index"])
    if order != rows:
        try:
            data.write_jsonl(out_path, order)  # atomic: on failure the file stays as it was
        except OSError as e:
            raise OSError(data.write_failure(out_path, e, "could not be put in the prompt "
                                             "file's order")) from None


class TextStreamer:
    """Print a response as its tokens arrive, in time linear in its length. SentencePiece
    decodes a piece differently at the start of a text (no leading space), so each new token
    is decoded with a few tokens before it: the text of tokens[start:] minus that of
    tokens[start:printed] is what is new (the incremental detokenizing of text-generation-
    inference and vLLM). A half-made UTF-8 character (byte-fallback pieces) is held back until
    it is whole."""

    def __init__(self, tokenizer, file=None):
        self.tokenizer, self.file = tokenizer, file or sys.stdout
        self.ids = []
        self.start = self.printed = 0  # the window's first token; the tokens already printed

    def put(self, token_id):
        self.ids.append(token_id)
        self._emit(final=False)

    def end(self):
        self._emit(final=True)
        self.file.write("\n")
        self.file.flush()

    def _emit(self, final):
        before = self.tokenizer.decode(self.ids[self.start:self.printed])
        text = self.tokenizer.decode(self.ids[self.start:])
        if len(text) > len(before) and (final or not text.endswith("\ufffd")):
            self.file.write(text[len(before):])
            self.file.flush()
            # the window moves on: what was printed up to now becomes its leading context
            self.start, self.printed = self.printed, len(self.ids)


# ---- command line ----------------------------------------------------------------------------

def load(cfg):
    """The model on the chosen device(s), and its tokenizer (which must fit its vocabulary)."""
    if not cfg.checkpoint:
        raise PromptError("no --checkpoint given: pass the model directory")
    if not os.path.exists(cfg.checkpoint):
        raise PromptError(f"--checkpoint {cfg.checkpoint}: no such directory")
    tokenizer_path = cfg.tokenizer or checkpoint.find_tokenizer(cfg.checkpoint)
    if tokenizer_path is None:
        raise PromptError(f"{cfg.checkpoint}: no tokenizer.model or tokenizer.json here or in "
                          f"the parent directory; pass --tokenizer")
    rows = cfg.batch_size if cfg.prompt_file else 1
    model, tokenizer, placed, dtype = devices.load_for_inference(
        cfg.checkpoint, tokenizer_path, cfg.device, cfg.dtype, rows, cfg.max_seq_len)
    threads = config.set_cpu_threads(model.args.dim, placed[0])
    n = model.num_params()
    size = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
    on_cpu = f" ({threads} thread{'s' * (threads > 1)}; OMP_NUM_THREADS sets it)" if placed == ["cpu"] else ""
    log(f"{cfg.checkpoint}: {size} parameters, {dtype}, on {', '.join(placed)}{on_cpu}; "
        f"tokenizer {tokenizer.path}")
    return model, tokenizer


def base_continuations(cfg, records, gen, seed):
    """What the base model does with each prompt before any fine-tuning: plain completion of
    the prompt's text (a conversation shown with its roles, data.render_prompt). Prompt i
    samples with prompt_seed(seed, i), as its fine-tuned answer does."""
    base, base_tokenizer = load(replace(cfg, checkpoint=cfg.base, tokenizer=None))
    texts = [[data.render_prompt(r["turns"])] for r in records]
    check_lengths(base, base_tokenizer, [{"turns": t} for t in texts], range(len(texts)), True, cfg.max_seq_len)
    return respond(base, base_tokenizer, texts, raw=True, batch_size=cfg.batch_size,
                   seeds=[prompt_seed(seed, i) for i in range(len(texts))], **gen)


def interactive(model, tokenizer, cfg, gen, seed):
    """Talk to the model. Each exchange is appended in the training format, so turn n sees
    BOS u1 EOT a1 EOT .. u_n EOT (LIMA §3); the oldest exchanges drop out when the
    conversation outgrows the context. Reply k samples with prompt_seed(seed, k)."""
    log("Interactive: type a message (one line). /reset starts over, /exit or Ctrl-D quits.")
    turns, context, k = [], min(cfg.max_seq_len, model.args.max_seq_len), 0
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        try:
            line = sys.stdin.readline()
            check_text(line, "that message")
        except (UnicodeDecodeError, PromptError) as e:
            log(f"error: {e if isinstance(e, PromptError) else 'that message is not UTF-8 text'}; say it again")
            continue
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
                          seeds=[prompt_seed(seed, k)], on_token=lambda _, t: streamer.put(t),
                          keep_cache=True, **gen)
        streamer.end()
        k += 1
        if not cfg.raw:
            turns = turns + [reply]


def run(cfg):
    modes = sum([cfg.prompt is not None, cfg.prompt_file is not None, cfg.interactive])
    if modes == 0:
        raise PromptError("the prompt is empty: give --prompt TEXT, --prompt_file FILE or --interactive")
    if modes > 1:
        raise PromptError("give one of --prompt, --prompt_file, --interactive")
    if cfg.prompt is not None:
        check_text(cfg.prompt, "--prompt")
        if not cfg.prompt.strip():
            raise PromptError("the prompt is empty")
    if cfg.out and cfg.prompt_file is None:
        raise PromptError("--out goes with --prompt_file; --prompt and --interactive print the "
                          "response to stdout")
    if cfg.out and os.path.isdir(cfg.out):
        raise PromptError(f"--out {cfg.out} is a directory; give a file name, e.g. "
                          f"{os.path.join(cfg.out, 'generations.jsonl')}")
    if cfg.base and (cfg.prompt_file is None or cfg.out):
        raise PromptError("--base goes with --prompt_file and no --out: it prints each answer "
                          "above the base model's continuation of the same prompt")
    records = data.read_prompts(cfg.prompt_file) if cfg.prompt_file else None
    seed = cfg.seed if cfg.seed is not None else int.from_bytes(os.urandom(4), "little")
    decoding = {k: getattr(cfg, k) for k in DECODING}
    if records is not None and cfg.out:
        settings = dict(decoding, raw=cfg.raw, seed=seed, checkpoint=os.path.abspath(cfg.checkpoint),
                        prompt_file=os.path.abspath(cfg.prompt_file))
        with files.lock(cfg.out):  # a second run on this --out is refused here, before any work
            if not remaining(records, cfg.out, settings):  # a wrong --out is refused before loading
                sort_by_index(cfg.out)
                log(f"{cfg.out}: all {len(records)} prompts already answered")
                return
            model, tokenizer = load(cfg)
            if not cfg.raw:
                check_chat_model(model, tokenizer)
            log(f"seed {seed}")
            n = generate_file(model, tokenizer, records, cfg.out, settings, batch_size=cfg.batch_size,
                              seed=seed, compile=cfg.compile)
        log(f"{cfg.out}: {n} new responses")
        return
    model, tokenizer = load(cfg)
    if not cfg.raw:
        check_chat_model(model, tokenizer)
    log(f"seed {seed}")
    gen = dict(decoding, compile=cfg.compile)
    if records is not None:  # a quick look: each prompt and its answer, in the file's order
        settings = dict(decoding, raw=cfg.raw)
        responses = dict(answer(model, tokenizer, records, list(range(len(records))), settings,
                                batch_size=cfg.batch_size, seed=seed, compile=cfg.compile))
        continuations = base_continuations(cfg, records, gen, seed) if cfg.base else None
        for i, r in enumerate(records):
            print(f"### {r['turns'][-1]}\n{responses[i]}\n", flush=True)
            if continuations is not None:
                print(f"--- the base model, continuing the same text:\n{continuations[i]}\n", flush=True)
    elif cfg.interactive:
        interactive(model, tokenizer, cfg, gen, seed)
    else:
        check_lengths(model, tokenizer, [{"turns": [cfg.prompt]}], [0], cfg.raw, cfg.max_seq_len)
        streamer = TextStreamer(tokenizer, sys.stdout)
        t0 = time.time()
        respond(model, tokenizer, [[cfg.prompt]], raw=cfg.raw, batch_size=1,
                seeds=[prompt_seed(seed, 0)], on_token=lambda _, t: streamer.put(t), **gen)
        streamer.end()
        log(f"{len(streamer.ids)} tokens in {time.time() - t0:.1f}s")


def interrupted(cfg, argv):
    """One line for Ctrl-C: what was kept, and the command that continues."""
    if not (cfg.prompt_file and cfg.out):
        if cfg.prompt_file:
            return ("sample.py: interrupted; nothing was saved (without --out the responses print "
                    "at the end). Pass --out FILE to keep each response as it is made.")
        return "sample.py: interrupted"
    try:
        kept = len(data.read_jsonl(cfg.out)) if os.path.isfile(cfg.out) else 0
    except (data.DataError, OSError):
        kept = "every finished"
    return (f"sample.py: interrupted; {kept} responses are saved in {cfg.out}. To continue: "
            f"python sample.py {shlex.join(argv)}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = config.parse_config(SampleConfig, argv, description=__doc__.split("\n\n")[0])
    try:
        run(cfg)
    except (PromptError, data.DataError, ValueError, OSError) as e:
        # user-facing problems (paths, vocabularies, prompts, a full or read-only disk, another
        # run on the same --out): the message, no traceback
        kept = (isinstance(e, OSError) and not isinstance(e, (files.LockedError, FileNotFoundError))
                and cfg.out and os.path.isfile(cfg.out))
        log(f"sample.py: error: {e}" + (f". Every response finished before is kept in {cfg.out}; "
                                        f"rerun the same command to continue." if kept else ""))
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        log("\n" + interrupted(cfg, argv))
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
