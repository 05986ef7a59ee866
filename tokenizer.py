"""The LLaMA SentencePiece tokenizer plus LIMA's end-of-turn token, and the chat format.

LIMA §3: a dialogue is exactly

    BOS user_1 EOT assistant_1 EOT user_2 EOT assistant_2 EOT ...

EOT is a new special token appended after every utterance; it stops generation like EOS but
is a different id. The paper names no role prefixes, so there are none. Our decision: the EOT
id is the base vocabulary size (32000 for LLaMA), so the model's vocabulary grows by one.
"""

import hashlib
import os

import sentencepiece as spm


class Tokenizer:
    def __init__(self, model_path):
        model_path = os.fspath(model_path)
        if not os.path.isfile(model_path):
            raise FileNotFoundError(
                f"{model_path}: no tokenizer here. Pass the tokenizer.model that came with the "
                f"LLaMA weights (it sits beside params.json / config.json).")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(model_path)
        except Exception as e:
            raise ValueError(f"{model_path}: not a SentencePiece model ({e}). Pass the "
                             f"tokenizer.model file, not tokenizer.json or a directory.") from None
        self.path = model_path
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.eot_id = self.sp.vocab_size()  # our choice: the first id past the base vocabulary
        self.vocab_size = self.eot_id + 1

    def encode(self, text):
        """Text -> ids, no BOS or EOS."""
        return self.sp.EncodeAsIds(text)

    def decode(self, ids):
        """Ids -> text; BOS, EOS, EOT, padding and any id past the vocabulary are dropped."""
        specials = {self.bos_id, self.eos_id, self.sp.pad_id()}
        return self.sp.DecodeIds([i for i in ids if 0 <= i < self.eot_id and i not in specials])

    def encode_dialog(self, turns, train_on_prompt=False):
        """Alternating user/assistant utterances -> (tokens, mask), two lists of equal length.

        mask[i] is True where the loss trains on tokens[i]: every assistant token and the EOT
        that closes its turn; the user's tokens and their EOT are context only. With
        train_on_prompt, every token after BOS trains. Each utterance is tokenized on its own,
        so SentencePiece's leading-space piece comes out the same here and when sampling.
        A list ending on a user turn is a prompt: BOS u1 EOT ... u_n EOT, ready for the reply.
        """
        tokens, mask = [self.bos_id], [False]
        for i, text in enumerate(turns):
            ids = self.encode(text) + [self.eot_id]
            trains = train_on_prompt or i % 2 == 1  # odd turns are the assistant's
            tokens += ids
            mask += [trains] * len(ids)
        return tokens, mask

    def check_model_vocab(self, vocab_size, where):
        """A model trained with this tokenizer has vocab_size == base (no EOT yet) or base + 1."""
        if vocab_size not in (self.eot_id, self.vocab_size):
            raise ValueError(
                f"{where}: the model's vocabulary has {vocab_size} rows but the tokenizer "
                f"{self.path} has {self.eot_id} pieces (+1 for EOT = {self.vocab_size}). "
                f"They do not belong together: use the tokenizer.model that came with this "
                f"checkpoint.")

    def sha256(self):
        return file_sha256(self.path)


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
