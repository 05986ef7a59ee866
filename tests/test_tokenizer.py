"""The chat format of LIMA §3 on every base's tokenizer: a tiny SentencePiece model trained in
conftest.py, and a tiny Llama 3 tokenizer made there as Meta's tiktoken file and as tokenizer.json."""

import shutil

import pytest

from tokenizer import SentencePieceTokenizer, load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_path):
    return load_tokenizer(tiny_tokenizer_path)


def test_special_ids(tok):
    assert (tok.bos_id, tok.eos_id) == (1, 2)  # LLaMA's
    assert tok.eot_id == tok.sp.vocab_size() == 300  # the first id past the base vocabulary
    assert tok.vocab_size == 301


def test_single_turn_layout_and_mask(tok):
    u, a = "what is the cat", "the cat sat on a mat"
    tokens, mask = tok.encode_dialog([u, a])
    U, A = tok.encode(u), tok.encode(a)
    assert tokens == [tok.bos_id] + U + [tok.eot_id] + A + [tok.eot_id]
    # loss on the assistant's tokens and the EOT that closes its turn, nothing else
    assert mask == [False] * (1 + len(U) + 1) + [True] * (len(A) + 1)


def test_multi_turn_layout_and_mask(tok):
    turns = ["tea please", "seven robots answer", "maps and music", "green lamps hum"]
    tokens, mask = tok.encode_dialog(turns)
    expect_t, expect_m = [tok.bos_id], [False]
    for i, t in enumerate(turns):  # each utterance tokenized on its own
        ids = tok.encode(t) + [tok.eot_id]
        expect_t += ids
        expect_m += [i % 2 == 1] * len(ids)
    assert tokens == expect_t and mask == expect_m
    assert tokens.count(tok.eot_id) == 4


def test_train_on_prompt_trains_every_token_after_bos(tok):
    tokens, mask = tok.encode_dialog(["a river", "stones hum"], train_on_prompt=True)
    assert mask == [False] + [True] * (len(tokens) - 1)


def test_prompt_for_sampling_ends_with_user_eot(tok):
    tokens, mask = tok.encode_dialog(["what is the cat"])
    assert tokens[0] == tok.bos_id and tokens[-1] == tok.eot_id and not any(mask)


def test_decode_drops_special_ids(tok):
    ids = tok.encode("happy robots")
    assert tok.decode([tok.bos_id] + ids + [tok.eot_id, tok.eos_id]) == "happy robots"


def test_errors_are_clear(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="no tokenizer here"):
        load_tokenizer(tmp_path / "missing.model")
    bogus = tmp_path / "tokenizer.json"
    bogus.write_text("{}")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        SentencePieceTokenizer(bogus)
    tok.check_model_vocab(300, "ckpt")  # base model, no EOT yet
    tok.check_model_vocab(301, "ckpt")  # fine-tuned, with EOT
    with pytest.raises(ValueError, match="32001 rows.*300 pieces"):
        tok.check_model_vocab(32001, "ckpt")


# ---- Llama 3: tokenizer.json and Meta's tiktoken tokenizer.model (made in conftest.py) ----------

LLAMA3_TEXTS = ["the cat sat on a mat", "Hello, World! 12345 and 7", "tea\n\n  maps\tmusic  ",
                "It's the robots' tea, isn't it?", "naïve café 🙂 ∑", ""]


@pytest.fixture(scope="module")
def llama3(llama3_tokenizer_files):
    from tests.conftest import LLAMA3_RANKS
    return {kind: load_tokenizer(path) for kind, path in llama3_tokenizer_files.items()}, LLAMA3_RANKS


def test_backend_is_chosen_by_what_the_file_holds(llama3, llama3_tokenizer_files, tiny_tokenizer_path, tmp_path):
    from tokenizer import HFTokenizer, TiktokenTokenizer
    toks, _ = llama3
    assert isinstance(toks["json"], HFTokenizer) and isinstance(toks["tiktoken"], TiktokenTokenizer)
    # names do not decide: a tiktoken file called tokenizer.json, SentencePiece called anything
    shutil.copy(llama3_tokenizer_files["tiktoken"], tmp_path / "tokenizer.json")
    assert isinstance(load_tokenizer(tmp_path / "tokenizer.json"), TiktokenTokenizer)
    shutil.copy(tiny_tokenizer_path, tmp_path / "spm.bin")
    assert isinstance(load_tokenizer(tmp_path / "spm.bin"), SentencePieceTokenizer)
    # a folder: its tokenizer.model (the original, for Llama 2's HF folders that have both)
    assert load_tokenizer(tmp_path).path == str(tmp_path / "tokenizer.json")
    shutil.copy(tiny_tokenizer_path, tmp_path / "tokenizer.model")
    assert isinstance(load_tokenizer(tmp_path), SentencePieceTokenizer)


def test_llama3_special_ids_and_no_added_row(llama3):
    toks, ranks = llama3
    for tok in toks.values():
        # Llama 3's layout: BOS 128000, EOS 128001, EOT 128009 after the ranks; nothing added
        assert (tok.bos_id, tok.eos_id, tok.eot_id) == (ranks, ranks + 1, ranks + 9)
        assert tok.n_base == tok.vocab_size == ranks + 256 and not tok.adds_eot
        tok.check_model_vocab(ranks + 256, "ckpt")
        with pytest.raises(ValueError, match=f"{ranks + 257} rows.*{ranks + 256} pieces"):
            tok.check_model_vocab(ranks + 257, "ckpt")


def test_llama3_backends_agree_with_each_other_and_transformers(llama3, llama3_tokenizer_files):
    transformers = pytest.importorskip("transformers")
    import os
    toks, _ = llama3
    hf = transformers.AutoTokenizer.from_pretrained(os.path.dirname(llama3_tokenizer_files["json"]))
    for text in LLAMA3_TEXTS:
        ids = toks["tiktoken"].encode(text)
        assert toks["json"].encode(text) == ids == hf.encode(text, add_special_tokens=False), text
        assert toks["json"].decode(ids) == toks["tiktoken"].decode(ids) == text


def test_llama3_chat_format_is_bos_then_utterances_each_closed_by_eot(llama3):
    toks, ranks = llama3
    for tok in toks.values():
        turns = ["what is the cat", "the cat sat on a mat", "and the robots?", "seven"]
        tokens, mask = tok.encode_dialog(turns)
        expect, expect_mask = [ranks], [False]  # the base's own BOS, once
        for i, t in enumerate(turns):
            ids = tok.encode(t) + [ranks + 9]
            expect += ids
            expect_mask += [i % 2 == 1] * len(ids)
        assert tokens == expect and mask == expect_mask
        assert tok.decode(tokens) == "".join(turns)  # BOS and EOT dropped


def test_special_token_names_in_text_are_text(llama3, tok):
    # a conversation quoting "<|eot_id|>" must not end its turn: every backend encodes the
    # characters (Meta's tiktoken tokenizer does so; tokenizers must be told to)
    toks, ranks = llama3
    text = "say <|eot_id|> or <|begin_of_text|>"
    for t in toks.values():
        ids = t.encode(text)
        assert ranks + 9 not in ids and ranks not in ids and t.decode(ids) == text
    assert tok.eot_id not in tok.encode("<s> </s> <|eot_id|> <eot>") and tok.bos_id not in tok.encode("<s>")


def test_tokenizer_identity_is_the_file(llama3, llama3_tokenizer_files, tok):
    from tokenizer import file_sha256
    toks, _ = llama3
    for kind, t in toks.items():
        assert t.sha256() == file_sha256(llama3_tokenizer_files[kind])
    assert len({t.sha256() for t in toks.values()} | {tok.sha256()}) == 3


def test_llama3_errors_name_the_file_and_what_to_do(tmp_path, monkeypatch, llama3_tokenizer_files):
    import sys
    junk = tmp_path / "tokenizer.model"
    junk.write_bytes(b"\x00\x01 not a tokenizer at all")
    with pytest.raises(ValueError, match=f"{junk}: not a tokenizer this project reads.*SentencePiece"
                                         r".*tokenizer\.json.*tiktoken"):
        load_tokenizer(junk)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: no tokenizer\.model or tokenizer\.json"):
        load_tokenizer(tmp_path / "empty")
    bad = tmp_path / "bad.model"
    bad.write_text("IQ== 0\nIg== 1\nnot base64 here\n")
    with pytest.raises(ValueError, match=rf"{bad}:3: not a `base64 rank` line"):
        load_tokenizer(bad)
    broken = tmp_path / "tokenizer.json"
    broken.write_text('{"model": "nonsense"}')
    with pytest.raises(ValueError, match=f"{broken}: not a tokenizer.json"):
        load_tokenizer(broken)
    # the optional packages: missing, the message names the one to install
    for kind, package in (("json", "tokenizers"), ("tiktoken", "tiktoken")):
        monkeypatch.setitem(sys.modules, package, None)  # import fails as if not installed
        with pytest.raises(ValueError, match=rf"needs the `{package}` package: pip install {package}"):
            load_tokenizer(llama3_tokenizer_files[kind])
        monkeypatch.undo()


def test_long_runs_are_cut_before_tiktoken_as_metas_tokenizer_does(llama3):
    import re
    from tokenizer import TIKTOKEN_MAX_RUN, _split_long_runs
    toks, _ = llama3
    text = "ab" * 30000 + "  c" + " " * 30000 + "d e"
    pieces = list(_split_long_runs(text))
    assert "".join(pieces) == text and len(pieces) == 4
    assert max(len(run) for p in pieces for run in re.findall(r"\s+|\S+", p)) <= TIKTOKEN_MAX_RUN
    assert toks["tiktoken"].decode(toks["tiktoken"].encode(text)) == text
