"""Pretrains the miniature's base model, demo/base/, from nothing: the stand-in for LLaMA.

    python demo/pretrain.py            # ~8 minutes on a CPU core; rewrites demo/base/

LIMA fine-tunes a *pretrained* model (LIMA §2-§3); its point is that the knowledge is already
there. So the demo starts from a base that has read about an invented world (demo/world.py):
1. the corpus: encyclopedia entries, stories, letters and worksheets of sums, every fact of
   every entity (the held-out half too) in many phrasings, written to data/pretrain/corpus.jsonl;
2. the tokenizer: a SentencePiece BPE trained on the corpus with LLaMA's settings (unk 0,
   BOS 1, EOS 2, digits split, byte fallback), so the base is tokenized the way a LLaMA is;
3. the prepared data: each document is one example, BOS text EOS, every token trained (plain
   next-token loss; no EOT anywhere, so the base's vocabulary has no EOT row: the fine-tune
   adds it as LIMA does, model.mean_rows);
4. pretraining with this repo's train.py from random weights: the `demo` model (model.PRESETS),
   `PRETRAIN` below, a larger learning rate than LIMA's (it is pretraining, not fine-tuning),
   linear decay from it to a tenth, no dropout; then the last epoch's checkpoint is copied to
   demo/base/ (Hugging Face layout, fp32: 5 MB, exactly what train.py wrote).

Reproducible: the corpus and the tokenizer come out byte for byte the same, and training is
seeded and runs on one thread (--threads 1, how demo/base was made), so on the same kind of CPU
the weights come out bit for bit the same. Another CPU (other vector instructions) or more
threads add the matrix products' terms in another order: the weights then differ in their last
bits, and the fine-tunes' numbers by a little. So does a change to how train.py computes a
step: demo/base was remade on 2026-11-30 after the loss was fused (model._HeadLoss), which
rounds differently from the unfused loss the first base was made with (git history has both).
demo/base/model.safetensors: sha256 0ff65fbf...; tokenizer.model: c57378d1...
"""

import io
import os
import shutil
import sys
import time
from dataclasses import dataclass, field

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import data  # noqa: E402
import files  # noqa: E402
import train  # noqa: E402
from config import parse_config  # noqa: E402
from demo import world as W  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

BASE_DIR = os.path.join(HERE, "base")
VOCAB_SIZE = 2048  # BPE pieces: whole words for the common ones, invented names in 2-3 pieces
MAX_LEN = 512  # the base's context; the longest document is well under it
TOKENIZER_DOCS = 20_000  # the tokenizer is trained on the corpus's first documents


@dataclass
class PretrainConfig:
    """Write the corpus of the invented world, train its tokenizer, pretrain the demo's base."""
    docs: int = field(default=80_000, metadata={"help": "documents in the corpus (~5M tokens)"})
    epochs: int = field(default=1, metadata={"help": "passes over the corpus"})
    batch_size: int = field(default=64, metadata={"help": "documents per optimizer step"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate, at step 0"})
    min_lr: float = field(default=3e-4, metadata={"help": "at the last step (linear decay)"})
    seed: int = W.SEED
    threads: int = field(default=1, metadata={"help": "torch threads; one reproduces demo/base bit for bit on any number of cores"})
    data_dir: str = field(default=os.path.join(ROOT, "data", "pretrain"), metadata={"help": "corpus, tokenizer and prepared data"})
    out_dir: str = field(default=os.path.join(ROOT, "out", "pretrain"), metadata={"help": "train.py's run directory"})
    base_dir: str = field(default=BASE_DIR, metadata={"help": "where the finished base goes"})
    max_steps: int = field(default=None, metadata={"help": "stop early (tests); the base is then not copied"})


def train_tokenizer(texts, path, vocab_size=VOCAB_SIZE):
    """SentencePiece BPE with LLaMA's settings: unk 0, BOS 1, EOS 2, no pad, digits split, byte
    fallback, no normalization. Trained from an iterator into memory on one thread, so the file
    (and its sha256) is the same every run."""
    import sentencepiece as spm
    model = io.BytesIO()
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(texts), model_writer=model, model_type="bpe",
        vocab_size=vocab_size, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
        split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, character_coverage=1.0, num_threads=1,
        max_sentence_length=1 << 14, minloglevel=2)
    files.write_atomic(path, model.getvalue())


def encode_documents(docs, tokenizer):
    """Documents -> data.Encoded: each one BOS text EOS, every token trained."""
    ids = [[tokenizer.bos_id] + tokenizer.encode(d) + [tokenizer.eos_id] for d in docs]
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    if lengths.max() > MAX_LEN:
        raise ValueError(f"a document of {lengths.max()} tokens is longer than the context {MAX_LEN}")
    tokens = np.concatenate([np.asarray(x, dtype=data.token_dtype(tokenizer.vocab_size)) for x in ids])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    stats = dict(examples=len(docs), tokens=int(offsets[-1]), supervised_tokens=int(offsets[-1]),
                 len_mean=round(float(lengths.mean()), 1), len_max=int(lengths.max()))
    return data.Encoded(tokens, np.ones(len(tokens), dtype=np.bool_), offsets, docs, stats)


def prepare(cfg):
    """data_dir: corpus.jsonl, tokenizer.model and a prepared-data directory for train.py."""
    os.makedirs(cfg.data_dir, exist_ok=True)
    world = W.make_world(cfg.seed)
    docs = W.corpus(world, cfg.docs, cfg.seed)
    data.write_jsonl(os.path.join(cfg.data_dir, "corpus.jsonl"), [{"text": d} for d in docs])
    tok_path = os.path.join(cfg.data_dir, "tokenizer.model")
    train_tokenizer(docs[:TOKENIZER_DOCS], tok_path)
    tokenizer = load_tokenizer(tok_path)
    n_dev = len(docs) // 100  # 1% held out: the dev loss of pretraining
    splits = {"train": encode_documents(docs[n_dev:], tokenizer), "dev": encode_documents(docs[:n_dev], tokenizer)}
    for name, enc in splits.items():
        data.write_split(cfg.data_dir, name, enc)
    data.write_jsonl(os.path.join(cfg.data_dir, "dev_prompts.jsonl"), [])  # nothing to answer
    files.write_json(os.path.join(cfg.data_dir, "meta.json"), dict(
        format=data.FORMAT, tokenizer=os.path.abspath(tok_path), tokenizer_sha256=tokenizer.sha256(),
        bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, eot_id=tokenizer.eot_id,
        # the rows a model of this data needs: the base vocabulary, no EOT (it never occurs)
        vocab_size=tokenizer.eot_id,
        token_dtype=np.dtype(data.token_dtype(tokenizer.vocab_size)).name, max_len=MAX_LEN,
        train_on_prompt=True, seed=cfg.seed, dev_size=n_dev, test_prompts=0,
        splits={name: e.stats for name, e in splits.items()}, source="demo/pretrain.py"))
    return splits


def pretrain_config(cfg):
    return train.TrainConfig(
        init_from=train.SCRATCH, model="demo", data_dir=cfg.data_dir, out_dir=cfg.out_dir, epochs=cfg.epochs,
        batch_size=cfg.batch_size, lr=cfg.lr, min_lr=cfg.min_lr, resid_dropout=0.0,
        save_epochs=[cfg.epochs], micro_batch_tokens=16384, seed=cfg.seed, device="cpu",
        max_steps=cfg.max_steps)


def install(run_dir, base_dir):
    """Copy the finished checkpoint to base_dir, replacing the old one only once complete."""
    tmp = files.make_temp_dir(base_dir)
    try:
        for name in sorted(os.listdir(run_dir)):
            shutil.copyfile(os.path.join(run_dir, name), os.path.join(tmp, name))
            files.fsync(os.path.join(tmp, name))
        files.swap_dir(tmp, base_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv=None):
    cfg = parse_config(PretrainConfig, argv)
    import torch
    torch.set_num_threads(cfg.threads)
    t0 = time.time()
    splits = prepare(cfg)
    s = splits["train"].stats
    print(f"corpus: {s['examples']:,} documents, {s['tokens']:,} tokens (mean {s['len_mean']}); "
          f"tokenizer {VOCAB_SIZE} pieces; in {cfg.data_dir} ({time.time() - t0:.0f}s)", file=sys.stderr)
    tcfg = pretrain_config(cfg)
    train.train(tcfg)
    if cfg.max_steps is None:
        install(os.path.join(cfg.out_dir, f"epoch_{cfg.epochs:02d}"), cfg.base_dir)
        print(f"base model in {cfg.base_dir} ({(time.time() - t0) / 60:.1f} min in all)", file=sys.stderr)


if __name__ == "__main__":
    main()
