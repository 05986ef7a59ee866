"""Shared fixtures: a tiny SentencePiece tokenizer trained here, on generated text (nothing is
downloaded), with LLaMA's special ids (unk 0, BOS 1, EOS 2, no pad)."""

import os
import random
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # benchmark scripts import as modules too

WORDS = ("the cat sat on a mat while river stones hum quietly under bright green lamps and "
         "seven happy robots answer questions about tea, maps, music, numbers: 1 2 3 4 5").split()


def train_tiny_tokenizer(out_dir, vocab_size=300, seed=0):
    import sentencepiece as spm
    rng = random.Random(seed)
    text = os.path.join(out_dir, "corpus.txt")
    with open(text, "w") as f:
        for _ in range(2000):
            f.write(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))) + "\n")
    prefix = os.path.join(out_dir, "tokenizer")
    spm.SentencePieceTrainer.Train(
        input=text, model_prefix=prefix, vocab_size=vocab_size, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
        character_coverage=1.0, num_threads=1, minloglevel=2)
    return prefix + ".model"


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory):
    return train_tiny_tokenizer(str(tmp_path_factory.mktemp("tok")))
