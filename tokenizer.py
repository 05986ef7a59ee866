"""Every LLaMA's tokenizer behind one interface, and LIMA's chat format on each.

LIMA §3: a dialogue is exactly

    BOS user_1 EOT assistant_1 EOT user_2 EOT assistant_2 EOT ...

EOT ends every utterance; it stops generation like EOS but is a different id. The paper names
no role prefixes, so there are none. `load_tokenizer(path)` reads three kinds of file, told
apart by what the file holds, not by its name:

- SentencePiece `tokenizer.model` (LLaMA 1, Llama 2): 32000 pieces, BOS 1, EOS 2, no EOT.
- Hugging Face `tokenizer.json` (Llama 3.x as transformers ships it), read with `tokenizers`.
- Meta's Llama 3.x `tokenizer.model`: a tiktoken BPE file, one `base64(token bytes) rank` per
  line, read with `tiktoken`; Meta's 256 special tokens follow the 128000 ranks.

Our decisions (the paper used LLaMA 1 only):
- BOS is the base's own (`<s>` 1, `<|begin_of_text|>` 128000); we add it, the file's own
  post-processor never does, so the ids are exactly the layout above on every base.
- EOT: where the base has an end-of-turn token (Llama 3's `<|eot_id|>`, 128009), the format
  uses it and the vocabulary is unchanged. Otherwise (SentencePiece) it is a new id, the base
  vocabulary size (32000), and the model grows one row (model.mean_rows). Its text, where other
  programs see one, is `<|eot_id|>` too: so every LIMA checkpoint ends a turn with the same
  token text, and it is the one that llama.cpp, Ollama and vLLM's users already know as an
  end of turn (llama.cpp stops generating at a token by its text; `<eot>` it would not know).
- Text is text: a special token's name inside a conversation ("<|eot_id|>") is encoded as the
  characters it is, never as the special id, with every backend (as Meta's Llama 3 tokenizer
  does), so no example can forge a turn boundary.
- A tokenizer's identity is the sha256 of its file (`sha256()`).
`tokenizers` and `tiktoken` are optional: only the file that needs one imports it.
"""

import base64
import binascii
import hashlib
import importlib
import os
import re
import struct

# The names by which a tokenizer.json marks LLaMA's special tokens (Llama 3's, then LLaMA 1/2's)
BOS_NAMES = ("<|begin_of_text|>", "<s>")
EOS_NAMES = ("<|end_of_text|>", "</s>")
EOT_NAME = "<|eot_id|>"  # Llama 3's end of turn; also the text of the EOT row added to LLaMA 1/2

# Meta's Llama 3.x tokenizer (llama-models, models/llama3/tokenizer.py): the split regex, and the
# 256 special tokens that follow the BPE ranks (only BOS, EOS and EOT matter to LIMA; their
# positions 0, 1 and 9 are the same in Llama 3, 3.1, 3.2 and 3.3)
TIKTOKEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
TIKTOKEN_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                     "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                     "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                     "<|python_tag|>", "<|image|>"]
TIKTOKEN_SPECIALS += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(TIKTOKEN_SPECIALS))]
TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} \d+")  # the first line of such a file
# tiktoken's regex overflows its stack on very long runs; Meta's tokenizer splits them first
TIKTOKEN_MAX_CHARS, TIKTOKEN_MAX_RUN = 400_000, 25_000

FORMATS = ("not a SentencePiece model (LLaMA 1 / Llama 2's tokenizer.model), not a Hugging Face "
           "tokenizer.json, not a tiktoken BPE file (Meta's Llama 3 tokenizer.model)")


class Tokenizer:
    """What every backend provides. A subclass sets path, bos_id, eos_id, eot_id and n_base
    (the ids the base defines: the rows of the base model's embedding) and implements encode
    and _decode."""
    path: str
    bos_id: int
    eos_id: int
    eot_id: int
    n_base: int

    @property
    def adds_eot(self):
        """True when the EOT is a new id past the base vocabulary (the model grows a row)."""
        return self.eot_id == self.n_base

    @property
    def vocab_size(self):
        """Rows a model needs for the chat format: the base's, plus the EOT if it is new."""
        return self.n_base + self.adds_eot

    def encode(self, text):
        """Text -> ids, no BOS or EOS; special tokens' names are plain text."""
        raise NotImplementedError

    def decode(self, ids):
        """Ids -> text; special tokens (BOS, EOS, EOT, ...) and ids past the vocabulary are dropped."""
        return self._decode([int(i) for i in ids if 0 <= i < self.n_base])

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

    def hf_tokenizer_json(self, eot_id=None):
        """This tokenizer as a Hugging Face tokenizer.json (a dict), with the EOT at eot_id where
        it is a new row; None where the file is a tokenizer.json already, or cannot be one.
        See "As Hugging Face files" below."""
        return None

    def check_model_vocab(self, vocab_size, where):
        """A model of this tokenizer has the base's rows, or (EOT added) one more."""
        if vocab_size not in (self.n_base, self.vocab_size):
            new = f" (+1 for EOT = {self.vocab_size})" if self.adds_eot else ""
            raise ValueError(
                f"{where}: the model's vocabulary has {vocab_size} rows but the tokenizer "
                f"{self.path} has {self.n_base} pieces{new}. They do not belong together: use "
                f"the tokenizer file that came with this checkpoint.")

    def sha256(self):
        return file_sha256(self.path)


class SentencePieceTokenizer(Tokenizer):
    """LLaMA 1 and Llama 2: SentencePiece, with EOT a new id (the base vocabulary size)."""

    def __init__(self, path):
        import sentencepiece as spm
        self.path = _check_file(path)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(self.path)
        except Exception as e:
            raise ValueError(f"{self.path}: not a SentencePiece model ({e}). Pass the "
                             f"tokenizer.model file, not tokenizer.json or a directory.") from None
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.n_base = self.sp.vocab_size()
        self.eot_id = self.n_base  # our choice: the first id past the base vocabulary

    def encode(self, text):
        return self.sp.EncodeAsIds(text)  # control pieces (<s>) are never matched in text

    def _decode(self, ids):
        specials = {self.bos_id, self.eos_id, self.sp.pad_id()}
        return self.sp.DecodeIds([i for i in ids if i not in specials])

    def hf_tokenizer_json(self, eot_id=None):
        return sentencepiece_to_hf(self.path, eot_id)


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer.json (Llama 3.x's), through the `tokenizers` library."""

    def __init__(self, path):
        self.path = _check_file(path)
        tokenizers = _optional("tokenizers", self.path, "a Hugging Face tokenizer.json")
        try:
            self.tok = tokenizers.Tokenizer.from_file(self.path)
        except Exception as e:
            raise ValueError(f"{self.path}: not a tokenizer.json the `tokenizers` library can "
                             f"read ({e}). Use the tokenizer.json that came with the weights.") from None
        self.tok.encode_special_tokens = True  # text is text (see the module docstring)
        self.n_base = self.tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._special(BOS_NAMES, "BOS")
        self.eos_id = self._special(EOS_NAMES, "EOS")
        eot = self.tok.token_to_id(EOT_NAME)
        self.eot_id = self.n_base if eot is None else eot  # none (a Llama 2 tokenizer.json): new id

    def _special(self, names, what):
        for name in names:
            if (i := self.tok.token_to_id(name)) is not None:
                return i
        raise ValueError(f"{self.path}: has no {what} token ({' or '.join(names)}); not a LLaMA "
                         f"tokenizer. Use the tokenizer.json that came with the LLaMA weights.")

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def _decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=True)


class TiktokenTokenizer(Tokenizer):
    """Meta's Llama 3.x tokenizer.model (tiktoken BPE ranks), read as Meta's reference reads it."""

    def __init__(self, path):
        self.path = _check_file(path)
        tiktoken = _optional("tiktoken", self.path, "a tiktoken BPE file (Llama 3's tokenizer.model)")
        ranks = read_tiktoken_ranks(self.path)
        specials = {name: len(ranks) + i for i, name in enumerate(TIKTOKEN_SPECIALS)}
        self.enc = tiktoken.Encoding(name=os.path.basename(self.path), pat_str=TIKTOKEN_PATTERN,
                                     mergeable_ranks=ranks, special_tokens=specials)
        self.n_ranks, self.n_base = len(ranks), len(ranks) + len(specials)
        self.bos_id, self.eos_id = specials["<|begin_of_text|>"], specials["<|end_of_text|>"]
        self.eot_id = specials[EOT_NAME]

    def encode(self, text):
        ids = []
        for start in range(0, len(text), TIKTOKEN_MAX_CHARS):
            for piece in _split_long_runs(text[start:start + TIKTOKEN_MAX_CHARS]):
                # disallowed_special=(): a special token's name is encoded as plain text
                ids += self.enc.encode(piece, allowed_special=set(), disallowed_special=())
        return ids

    def _decode(self, ids):
        return self.enc.decode([i for i in ids if i < self.n_ranks])  # specials dropped

    def hf_tokenizer_json(self, eot_id=None):
        return tiktoken_to_hf(read_tiktoken_ranks(self.path))  # its EOT is its own <|eot_id|>


def read_tiktoken_ranks(path):
    """{token bytes: rank} from a tiktoken BPE file; read here rather than by tiktoken.load,
    which caches files by path (a replaced file at the same path would read stale)."""
    ranks = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error):
                raise ValueError(f"{path}:{n}: not a `base64 rank` line of a tiktoken BPE file "
                                 f"({line[:60]!r}). Use the tokenizer.model that came with the "
                                 f"Llama 3 weights.") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: the ranks are not 0 .. {len(ranks) - 1}, each once; the file "
                         f"is damaged. Use the tokenizer.model that came with the weights.")
    return ranks


def _split_long_runs(text):
    """Pieces of `text` with no run of whitespace or of non-whitespace longer than
    TIKTOKEN_MAX_RUN characters (what Meta's tokenizer does before calling tiktoken)."""
    start, run, space = 0, 0, text[:1].isspace()
    for i, ch in enumerate(text):
        if ch.isspace() != space:
            run, space = 1, ch.isspace()
        else:
            run += 1
            if run > TIKTOKEN_MAX_RUN:
                yield text[start:i]
                start, run = i, 1
    yield text[start:]


# ---- choosing the backend ------------------------------------------------------------------------

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")  # in this order of preference


def find_tokenizer_file(folder):
    """tokenizer.model (SentencePiece or tiktoken) or else tokenizer.json in `folder`, or None.
    A Hugging Face Llama 2 folder has both: its tokenizer.model is the original."""
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def load_tokenizer(path):
    """The tokenizer in a file, or in a folder's tokenizer.model / tokenizer.json; the backend is
    chosen by what the file holds: JSON, tiktoken's `base64 rank` lines, or SentencePiece."""
    path = os.fspath(path)
    if os.path.isdir(path):
        found = find_tokenizer_file(path)
        if found is None:
            raise FileNotFoundError(f"{path}: no tokenizer.model or tokenizer.json in this folder. "
                                    f"Pass the tokenizer file that came with the LLaMA weights.")
        path = found
    _check_file(path)
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.lstrip().startswith(b"{"):
        return HFTokenizer(path)
    if TIKTOKEN_LINE.fullmatch(head.split(b"\n", 1)[0].strip()):
        return TiktokenTokenizer(path)
    try:
        return SentencePieceTokenizer(path)
    except ValueError:
        raise ValueError(f"{path}: not a tokenizer this project reads: {FORMATS}. Pass the "
                         f"tokenizer file that came with the LLaMA weights.") from None


def _check_file(path):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path}: no tokenizer here. Pass the tokenizer file that came with the LLaMA weights "
            f"(tokenizer.model or tokenizer.json, beside params.json / config.json).")
    return path


def _optional(package, path, what):
    """Import an optional dependency, or say which package the file needs."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise ValueError(f"{path} is {what}; reading it needs the `{package}` package: "
                         f"pip install {package}") from None


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---- as Hugging Face files: tokenizer.json and the chat template ---------------------------------
# What transformers, vLLM and llama.cpp read beside the weights (checkpoint.save_hf writes them).
# tokenizer.json is built here from the tokenizer file itself, the way transformers' converters
# build it (LlamaConverter, TikTokenConverter), so saving needs neither transformers nor protobuf.

# LIMA §3's chat format as a Jinja chat template: BOS, then every utterance closed by EOT; no role
# names and no system prompt, and nothing to add for the reply, which starts right after the
# user's EOT. Each utterance follows a special token, and each client tokenizes the text between
# special tokens on its own, as encode_dialog tokenizes each utterance: SentencePiece's leading
# space comes out the same (tokenizer.json's normalizer prepends it to every run of text, and
# llama.cpp does so after every special token). The tests check the ids in each client.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] != ('user' if loop.index0 % 2 == 0 else 'assistant') %}"
    "{{ raise_exception('The LIMA chat format has user and assistant turns, in turn, starting "
    "with the user, and no system prompt.') }}{% endif %}"
    "{{ message['content'] }}" + EOT_NAME + "{% endfor %}")

# SentencePiece's piece types (4, user-defined, and 5, unused, are not in LLaMA's), and BPE's
# number in its TrainerSpec.model_type
SPM_NORMAL, SPM_UNKNOWN, SPM_CONTROL, SPM_BYTE = 1, 2, 3, 6
SPM_BPE = 2


def _protobuf_fields(buf):
    """(field number, value) of a serialized protobuf message, in order: varints as ints,
    length-delimited fields as bytes (strings, nested messages), fixed-width ones as raw bytes.
    Enough to read a SentencePiece model without the protobuf package."""
    i = 0

    def varint():
        nonlocal i
        value = shift = 0
        while True:
            byte = buf[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while i < len(buf):
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            value = varint()
        elif wire == 2:
            n = varint()
            value, i = buf[i:i + n], i + n
        elif wire in (1, 5):  # fixed 64 / 32 bits
            n = 8 if wire == 1 else 4
            value, i = buf[i:i + n], i + n
        else:
            raise ValueError(f"protobuf wire type {wire}")
        yield field, value


def read_sentencepiece_model(path):
    """(pieces, settings) of a SentencePiece .model file (a ModelProto): pieces is a list of
    (text, score, type) in id order; settings holds what encoding depends on, with the defaults
    sentencepiece_model.proto declares."""
    with open(path, "rb") as f:
        proto = f.read()
    pieces, trainer, normalizer = [], {}, {}
    for field, value in _protobuf_fields(proto):
        if field == 1:  # SentencePiece {1: piece, 2: score (float), 3: type}
            p = dict(_protobuf_fields(value))
            pieces.append((p[1].decode("utf-8"), struct.unpack("<f", p.get(2, b"\0" * 4))[0],
                           p.get(3, SPM_NORMAL)))
        elif field == 2:
            trainer = dict(_protobuf_fields(value))
        elif field == 3:
            normalizer = dict(_protobuf_fields(value))
    settings = {"model_type": trainer.get(3, 1), "treat_whitespace_as_suffix": bool(trainer.get(24, 0)),
                "charsmap": normalizer.get(2, b""), "add_dummy_prefix": bool(normalizer.get(3, 1)),
                "remove_extra_whitespaces": bool(normalizer.get(4, 1)),
                "escape_whitespaces": bool(normalizer.get(5, 1))}
    return pieces, settings


def _added_token(i, text):
    return {"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


def _bos_template(bos_text, bos_id):
    """A post-processor that puts BOS first, as LLaMA's Hugging Face tokenizers do."""
    bos = {"SpecialToken": {"id": bos_text, "type_id": 0}}
    return {"type": "TemplateProcessing",
            "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos_text, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos_text: {"id": bos_text, "ids": [bos_id], "tokens": [bos_text]}}}


def sentencepiece_to_hf(path, eot_id=None):
    """A SentencePiece BPE model (LLaMA 1/2), + our EOT at eot_id -> tokenizer.json (a dict) that
    gives SentencePiece's ids. None for a model this cannot express exactly (not BPE, user-defined
    or unused pieces, whitespace as a suffix): the checkpoint then has tokenizer.model only.

    As transformers' LlamaConverter: the pieces are the vocabulary; a merge is every split of a
    piece into two pieces, ranked by the merged piece's score (SentencePiece merges the pair
    whose merge scores highest); bytes for characters not in it (byte fallback). The normalizer
    is SentencePiece's: its character map, if any, extra spaces removed if it does so, "▁"
    prepended and spaces escaped; no pre-tokenizer (SentencePiece does not split the text).
    """
    pieces, s = read_sentencepiece_model(path)
    kinds = {kind for _, _, kind in pieces}
    if (s["model_type"] != SPM_BPE or s["treat_whitespace_as_suffix"]
            or not kinds <= {SPM_NORMAL, SPM_UNKNOWN, SPM_CONTROL, SPM_BYTE}):
        return None
    vocab = {text: i for i, (text, _, _) in enumerate(pieces)}
    normal = {text for text, _, kind in pieces if kind == SPM_NORMAL}
    merges = []
    for text, score, kind in pieces:
        if kind != SPM_NORMAL:
            continue
        splits = [(text[:k], text[k:]) for k in range(1, len(text)) if text[:k] in normal and text[k:] in normal]
        splits.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        merges += [(score, len(a), len(b), a, b) for a, b in splits]
    merges.sort(key=lambda m: m[:3], reverse=True)  # stable: ties keep the order above

    space = "▁" if s["escape_whitespaces"] else " "
    normalizers = []
    if s["charsmap"]:
        normalizers.append({"type": "Precompiled",
                            "precompiled_charsmap": base64.b64encode(s["charsmap"]).decode()})
    if s["remove_extra_whitespaces"]:  # leading and trailing spaces dropped, runs made one
        normalizers += [{"type": "Replace", "pattern": {"Regex": r"\A +| +\z"}, "content": ""},
                        {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]
    if s["add_dummy_prefix"]:
        normalizers.append({"type": "Prepend", "prepend": space})
    if s["escape_whitespaces"]:
        normalizers.append({"type": "Replace", "pattern": {"String": " "}, "content": space})
    decoders = [{"type": "Replace", "pattern": {"String": space}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]
    if s["add_dummy_prefix"]:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})

    unk = next(text for text, _, kind in pieces if kind == SPM_UNKNOWN)
    bos = next(i for i, (text, _, _) in enumerate(pieces) if text == "<s>")
    added = [_added_token(i, text) for i, (text, _, kind) in enumerate(pieces)
             if kind in (SPM_UNKNOWN, SPM_CONTROL)]
    if eot_id is not None:
        added.append(_added_token(eot_id, EOT_NAME))
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": {"type": "Sequence", "normalizers": normalizers}, "pre_tokenizer": None,
            "post_processor": _bos_template(pieces[bos][0], bos),
            "decoder": {"type": "Sequence", "decoders": decoders},
            "model": {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": SPM_BYTE in kinds,
                      "ignore_merges": False, "vocab": vocab, "merges": [[a, b] for *_, a, b in merges]}}


def _byte_chars():
    """GPT-2's reversible map of the 256 byte values to printable characters, in which byte-level
    BPE vocabularies (Llama 3's tokenizer.json) write their tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def tiktoken_to_hf(ranks):
    """Meta's tiktoken ranks (Llama 3.x) -> tokenizer.json (a dict), as transformers'
    TikTokenConverter writes it: the ranks as the vocabulary in byte-level characters; a merge
    is every split of a token into two tokens, ranked by the token's rank; tiktoken's split
    regex, then bytes; a whole pre-token that is a token is taken as it is (ignore_merges, as
    tiktoken does); the 256 special tokens after the ranks, BOS first in every encoding."""
    chars = _byte_chars()
    text = {token: "".join(chars[b] for b in token) for token in ranks}
    merges = []
    for token, rank in ranks.items():
        splits = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in ranks and token[k:] in ranks]
        splits.sort(key=lambda pair: (ranks[pair[0]], ranks[pair[1]]))
        merges += [(rank, a, b) for a, b in splits]
    merges.sort(key=lambda m: m[0])
    specials = [_added_token(len(ranks) + i, name) for i, name in enumerate(TIKTOKEN_SPECIALS)]
    bos = specials[TIKTOKEN_SPECIALS.index("<|begin_of_text|>")]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": specials,
            "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": TIKTOKEN_PATTERN}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
            "post_processor": {"type": "Sequence", "processors": [
                {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
                _bos_template(bos["content"], bos["id"])]},
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": True, "vocab": {text[t]: r for t, r in ranks.items()},
                      "merges": [[text[a], text[b]] for _, a, b in merges]}}
