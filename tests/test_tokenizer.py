"""The chat format of LIMA §3 on a tiny SentencePiece model trained in conftest.py."""

import pytest

from tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_path):
    return Tokenizer(tiny_tokenizer_path)


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
        Tokenizer(tmp_path / "missing.model")
    bogus = tmp_path / "tokenizer.json"
    bogus.write_text("{}")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer(bogus)
    tok.check_model_vocab(300, "ckpt")  # base model, no EOT yet
    tok.check_model_vocab(301, "ckpt")  # fine-tuned, with EOT
    with pytest.raises(ValueError, match="32001 rows.*300 pieces"):
        tok.check_model_vocab(32001, "ckpt")
