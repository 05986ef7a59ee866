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


def ctrl_c_reaches_the_child():
    """Popen's preexec_fn for a test that presses Ctrl-C (SIGINT) on a child: the child starts
    with SIGINT at its default, as from a terminal, even when the tests themselves were started
    with it ignored (a shell's background job does that, and children inherit it)."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_DFL)


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


# ---- Llama 3 tokenizers, made here -------------------------------------------------------------
# Meta's tiktoken file (one `base64(bytes) rank` a line) for a tiny byte-level BPE learned from the
# same generated text, and the tokenizer.json that transformers' own converter makes of it (as
# Hugging Face made Llama 3's), with Llama 3.1's 256 special tokens after the ranks.

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = (["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>",
                    "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
                    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
                   + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)])
LLAMA3_RANKS = 400  # BPE ranks; the specials follow: BOS 400, EOS 401, EOT 409; 656 ids in all


def write_tiny_tiktoken(path, n_ranks=LLAMA3_RANKS, seed=0):
    """Greedy byte-pair merges (the most frequent adjacent pair first, as tiktoken's ranks
    mean) over pre-tokenized generated text: 256 single bytes, then n_ranks - 256 merges."""
    import base64
    import collections
    regex = pytest.importorskip("regex")
    rng = random.Random(seed)
    vocab = list(WORDS) + ["".join(rng.choice("etaoinshrdlucmfw") for _ in range(rng.randint(2, 7)))
                           for _ in range(150)]  # made-up words: pairs enough for every merge
    text = "\n".join(" ".join(rng.choice(vocab) for _ in range(rng.randint(3, 15))) for _ in range(600))
    counts = collections.Counter(regex.findall(LLAMA3_PATTERN, text))
    words = {w: [bytes([b]) for b in w.encode()] for w in counts}
    ranks = {bytes([i]): i for i in range(256)}
    while len(ranks) < n_ranks:
        pairs = collections.Counter()
        for w, parts in words.items():
            for a, b in zip(parts, parts[1:]):
                pairs[a, b] += counts[w]
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        ranks[a + b] = len(ranks)
        for w, parts in words.items():
            merged, i = [], 0
            while i < len(parts):
                if parts[i:i + 2] == [a, b]:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            words[w] = merged
    with open(path, "w") as f:
        f.writelines(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items())
    return path


def write_tokenizer_json(tiktoken_path, out_dir):
    """tokenizer.json (+ tokenizer_config.json, special_tokens_map.json) as transformers'
    Llama 3 converter writes them: its TikTokenConverter, BOS added by the post-processor."""
    pytest.importorskip("tiktoken")
    pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import TikTokenConverter
    tok = TikTokenConverter(vocab_file=tiktoken_path, pattern=LLAMA3_PATTERN,
                            extra_special_tokens=LLAMA3_SPECIALS).converted()
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                      special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                                eos_token="<|end_of_text|>")
    fast.save_pretrained(out_dir)
    return os.path.join(out_dir, "tokenizer.json")


@pytest.fixture(scope="session")
def llama3_tokenizer_files(tmp_path_factory):
    """{"tiktoken": Meta's tokenizer.model, "json": the Hugging Face tokenizer.json}"""
    d = tmp_path_factory.mktemp("llama3_tok")
    tiktoken_path = write_tiny_tiktoken(str(d / "tokenizer.model"))
    (d / "hf").mkdir()
    return {"tiktoken": tiktoken_path, "json": write_tokenizer_json(tiktoken_path, str(d / "hf"))}
