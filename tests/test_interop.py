"""A saved checkpoint in other programs: transformers 5 and 4, and llama.cpp (issue 15).

Each client must give exactly tokenizer.encode_dialog's ids for LIMA's chat format through the
checkpoint's own chat template, on every demo dialogue, and stop generating at EOT. The clients
run in subprocesses, as a user runs them:
- transformers 5 (a dev requirement), with protobuf, sentencepiece and tiktoken hidden, so
  the checkpoint must be readable with tokenizer.json alone;
- transformers 4, where LIMA_TRANSFORMERS4_PYTHON names a Python that has it, e.g.
      python -m venv --system-site-packages /tmp/tf4 && /tmp/tf4/bin/pip install "transformers==4.57.*"
      LIMA_TRANSFORMERS4_PYTHON=/tmp/tf4/bin/python pytest tests/test_interop.py
- llama.cpp, where LIMA_LLAMA_CPP_CONVERT names its convert_hf_to_gguf.py (a llama.cpp
  checkout, or the vendor/llama.cpp of llama-cpp-python's source package) and a Python with
  llama-cpp-python is this one or LIMA_LLAMA_CPP_PYTHON.
Skipped, with the reason, where a client is not there.
"""

import json
import os
import shutil
import site
import subprocess
import sys

import pytest
import torch

import checkpoint
import data
import generate
import prepare_data
from model import ModelArgs, Transformer
from tests.conftest import ROOT
from tests.test_checkpoint import scale_up
from tokenizer import CHAT_TEMPLATE, EOT_NAME, SentencePieceTokenizer, load_tokenizer, sentencepiece_to_hf

transformers = pytest.importorskip("transformers")  # dev dependency: the client under test
DEMO = os.path.join(ROOT, "demo", "train.jsonl")
CLIENT = os.path.join(ROOT, "tests", "hf_client.py")
# utterances that test SentencePiece's leading space and its byte fallback beyond the demo's text
# what transformers 5 would need to read tokenizer.model instead of tokenizer.json
HIDDEN = {"google", "protobuf", "sentencepiece", "tiktoken", "tiktoken_ext"}
EDGES = [[" leading space", "two  spaces ", "\n"], ["tab\tand\nnewline", "é, 中文 and 😀"],
         ["ends with a space ", "  "]]


def demo_dialogues():
    """Every demo conversation, whole and as the prompt of its last answer (what sample.py sends)."""
    out = []
    for c in data.read_conversations(DEMO):
        turns = c["turns"][:len(c["turns"]) // 2 * 2]
        out += [turns, turns[:-1]]
    return out + EDGES


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model on the demo's tokenizer (demo/base's, which prepare_data.py --demo uses),
    saved as train.py saves."""
    d = tmp_path_factory.mktemp("interop")
    shutil.copyfile(prepare_data.DEMO_TOKENIZER, d / "tokenizer.model")
    tok = load_tokenizer(d / "tokenizer.model")
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size,
                                  multiple_of=16, max_seq_len=256))
    scale_up(model.named_parameters())
    checkpoint.save_model(model, d / "ckpt", tokenizer_path=tok.path, extra={"eot_id": tok.eot_id})
    return {"path": d / "ckpt", "tok": tok, "model": model, "dir": d}


def run_client(python, args, env=None, timeout=600):
    out = subprocess.run([*python, *args], capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, **(env or {})})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def check_hf_client(result, tok, dialogues, strip=False):
    """The ids of apply_chat_template are encode_dialog's; decoding skips BOS and EOT, giving our
    text (strip: but for the spaces at its ends, which transformers 4's sentencepiece
    LlamaTokenizer trims one too many of)."""
    assert len(result["chat_ids"]) == len(dialogues)
    for turns, ids, text in zip(dialogues, result["chat_ids"], result["decoded"]):
        assert ids == tok.encode_dialog(turns)[0], turns
        want = tok.decode(ids)
        if strip:
            text, want = text.strip(), want.strip()
        assert text == want, turns
    assert result["eot_id"] == tok.eot_id
    assert result["plain_ids"] == [tok.bos_id] + tok.encode("hello world")
    assert "no system prompt" in result["system_refused"]
    generation = result["generation"]  # read as written: the paper's decoding, stop at EOT
    assert generation["eos_token_id"] == [tok.eos_id, tok.eot_id] and generation["max_length"] == 2048
    assert (generation["temperature"], generation["top_p"], generation["top_k"]) == (0.7, 0.9, 0)


def python_without(tmp_path, hidden):
    """A command running this Python with the packages `hidden` absent: every entry of its
    site-packages linked into one folder but those, and no `site` (which would add them back)."""
    mirror = tmp_path / "site-packages"
    mirror.mkdir()
    for folder in site.getsitepackages():
        for name in os.listdir(folder):
            stem = name.split("-")[0].split(".")[0].lower()
            if stem not in hidden and not (mirror / name).exists():
                (mirror / name).symlink_to(os.path.join(folder, name))
    return [sys.executable, "-S", "-c", f"import runpy, sys; sys.path.insert(0, {str(mirror)!r}); "
            f"sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"]


# ---- the files -----------------------------------------------------------------------------------

def test_saved_files_carry_the_format_for_every_client(saved):
    path, tok = saved["path"], saved["tok"]
    config = json.loads((path / "tokenizer_config.json").read_text())
    # one template for every client: transformers reads the .jinja first, llama.cpp's converter
    # tokenizer_config.json
    assert (path / "chat_template.jinja").read_text() == config["chat_template"] == CHAT_TEMPLATE
    assert json.loads((path / "added_tokens.json").read_text()) == {EOT_NAME: tok.eot_id}
    assert config["added_tokens_decoder"][str(tok.eot_id)]["special"] is True
    assert config["additional_special_tokens"] == [EOT_NAME]  # transformers 4's sentencepiece class
    special_map = json.loads((path / "special_tokens_map.json").read_text())
    assert special_map["additional_special_tokens"] == [EOT_NAME]
    # tokenizer.json beside tokenizer.model; the checkpoint's tokenizer is still tokenizer.model
    assert (path / "tokenizer.json").exists()
    assert checkpoint.find_tokenizer(path) == str(path / "tokenizer.model")
    assert isinstance(checkpoint.load_model_and_tokenizer(path)[1], SentencePieceTokenizer)


def test_tokenizer_json_gives_sentencepieces_ids(saved):
    """tokenizer.json in the `tokenizers` library itself: sentencepiece's ids on every utterance
    of the demo and on generated text with spaces, tabs, newlines, accents, CJK and emoji."""
    import random
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer.from_file(str(saved["path"] / "tokenizer.json"))
    tok = saved["tok"]
    rng = random.Random(0)
    alphabet = "abcdefghij  \n\t.,!?0123456789éü中文😀▁"
    texts = [t for turns in demo_dialogues() for t in turns]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(2000)]
    for text in texts:
        assert hf.encode(text, add_special_tokens=False).ids == tok.encode(text), text
    assert hf.token_to_id(EOT_NAME) == tok.eot_id and hf.get_vocab_size() == tok.vocab_size


@pytest.mark.parametrize("options, exact", [
    (dict(model_type="bpe"), True),
    (dict(model_type="bpe", normalization_rule_name="identity", remove_extra_whitespaces=False), True),
    (dict(model_type="bpe", add_dummy_prefix=False), True),
    (dict(model_type="unigram"), False),  # not LLaMA's kind: no tokenizer.json
    (dict(model_type="bpe", treat_whitespace_as_suffix=True), False),
    (dict(model_type="bpe", user_defined_symbols=["<x>"]), False)])
def test_sentencepiece_settings_are_read_from_the_file(tmp_path, options, exact):
    """The .model's settings, read without protobuf, decide the tokenizer.json; a model it
    cannot express exactly gets none (transformers then converts tokenizer.model itself)."""
    import random
    import sentencepiece as spm
    tokenizers = pytest.importorskip("tokenizers")
    from tests.conftest import WORDS
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))) for _ in range(500)]
    spm.SentencePieceTrainer.Train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "t"),
                                   vocab_size=330, hard_vocab_limit=False, minloglevel=2,
                                   byte_fallback=True, **options)
    path = str(tmp_path / "t.model")
    made = sentencepiece_to_hf(path)
    assert (made is not None) == exact
    if exact:
        hf = tokenizers.Tokenizer.from_str(json.dumps(made))
        sp = spm.SentencePieceProcessor(model_file=path)
        for text in lines[:100] + ["  two  spaces ", "\ttab", "é中😀", ""]:
            assert hf.encode(text, add_special_tokens=False).ids == sp.encode(text), text


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_checkpoint_files_are_readable_by_all(saved, tmp_path, umask):
    old = os.umask(umask)
    try:
        checkpoint.save_model(saved["model"], tmp_path / "ckpt", tokenizer_path=saved["tok"].path,
                              extra={"eot_id": saved["tok"].eot_id})
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "ckpt").st_mode & 0o777 == 0o755
    modes = {name: oct(os.stat(tmp_path / "ckpt" / name).st_mode & 0o777)
             for name in os.listdir(tmp_path / "ckpt")}
    assert "model.safetensors" in modes and set(modes.values()) == {"0o644"}, modes


def test_generation_config_is_the_papers_decoding_and_says_what_differs(saved):
    gen = json.loads((saved["path"] / "generation_config.json").read_text())
    tok = saved["tok"]
    assert gen["eos_token_id"] == [tok.eos_id, tok.eot_id]
    d = generate.Decoding()
    assert (gen["temperature"], gen["top_p"], gen["repetition_penalty"]) == (d.temperature, d.top_p, d.repetition_penalty)
    assert gen["do_sample"] and gen["top_k"] == 0  # transformers would add top-k 50 otherwise
    assert gen["max_length"] == d.max_seq_len  # prompt + response, as ours (transformers: 20)
    card = (saved["path"] / "README.md").read_text()
    assert "penalises the prompt" in card and EOT_NAME in card


def stopping_model(model, prompt, eot_id):
    """A copy of `model` whose greedy choice right after `prompt` is EOT: its output row for EOT
    is the final hidden state there, scaled to a logit of 50 (the others are O(1))."""
    stopper = Transformer(model.args)
    stopper.load_state_dict(model.state_dict())
    hidden = []
    handle = stopper.norm.register_forward_hook(lambda m, i, out: hidden.append(out[0, -1]))
    with torch.no_grad():
        stopper(torch.tensor([prompt]))
        handle.remove()
        stopper.output.weight[eot_id] = 50 * hidden[0] / hidden[0].square().sum()
    return stopper


def test_transformers_generate_stops_at_eot(saved, tmp_path):
    """transformers' generate with the checkpoint's own generation_config stops at EOT: greedy,
    a model whose next token is EOT gives exactly that one token, not max_new_tokens."""
    tok = saved["tok"]
    prompt = tok.encode_dialog(["Is 7 or 0 bigger?"])[0]
    stopper = stopping_model(saved["model"], prompt, tok.eot_id)
    assert generate.generate(stopper, [prompt], stop_ids=[tok.eot_id], temperature=0,
                             max_new_tokens=8) == [[]]  # ours stops at once
    checkpoint.save_model(stopper, tmp_path / "stopper", tokenizer_path=tok.path,
                          extra={"eot_id": tok.eot_id})
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "stopper")
    out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=8)
    assert out[0, len(prompt):].tolist() == [tok.eot_id]


# ---- the clients ---------------------------------------------------------------------------------

def test_transformers5_reads_the_tokenizer_with_tokenizer_json_alone(saved, tmp_path):
    """AutoTokenizer with no protobuf, sentencepiece or tiktoken: it loads, warns of nothing,
    and apply_chat_template gives encode_dialog's ids on every demo dialogue."""
    dialogues = demo_dialogues()
    (tmp_path / "dialogues.json").write_text(json.dumps(dialogues))
    python = python_without(tmp_path, HIDDEN)
    (tmp_path / "probe.py").write_text("import transformers, tokenizers, torch\nimport sentencepiece\n")
    probe = subprocess.run([*python, str(tmp_path / "probe.py")], capture_output=True, text=True)
    assert "No module named 'sentencepiece'" in probe.stderr, probe.stderr  # the hiding works
    result = json.loads(run_client(python, [CLIENT, str(saved["path"]), str(tmp_path / "dialogues.json")]))
    assert result["version"].startswith("5.") and result["warnings"] == []
    check_hf_client(result, saved["tok"], dialogues)


def transformers4():
    python = os.environ.get("LIMA_TRANSFORMERS4_PYTHON")
    if not python:
        pytest.skip("transformers 4 not given: set LIMA_TRANSFORMERS4_PYTHON to a Python that has "
                    "it (see this file's docstring)")
    return [python]


@pytest.mark.parametrize("slow", [False, True], ids=["AutoTokenizer", "LlamaTokenizer"])
def test_transformers4_gives_our_ids(saved, tmp_path, slow):
    """transformers 4: AutoTokenizer (tokenizer.json), and the sentencepiece LlamaTokenizer,
    which must also drop the EOT when decoding with skip_special_tokens."""
    python = transformers4()
    dialogues = demo_dialogues()
    (tmp_path / "dialogues.json").write_text(json.dumps(dialogues))
    args = [CLIENT, str(saved["path"]), str(tmp_path / "dialogues.json")] + ["--slow"] * slow
    result = json.loads(run_client(python, args))
    assert result["version"].startswith("4.")
    assert result["class"] == ("LlamaTokenizer" if slow else "PreTrainedTokenizerFast")
    if not slow:  # (loading LlamaTokenizer by name says the folder names another class)
        assert result["warnings"] == []
    check_hf_client(result, saved["tok"], dialogues, strip=slow)


@pytest.fixture(scope="module")
def llama3_saved(tmp_path_factory, llama3_tokenizer_files):
    """A tiny model on the Llama 3 tokenizer of conftest, saved from Meta's tiktoken file and
    from the Hugging Face tokenizer.json, as a chat checkpoint (EOT: its own <|eot_id|>)."""
    d = tmp_path_factory.mktemp("llama3_interop")
    out = {}
    for kind, path in llama3_tokenizer_files.items():
        tok = load_tokenizer(path)
        torch.manual_seed(0)
        model = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=tok.vocab_size,
                                      multiple_of=16, max_seq_len=256))
        checkpoint.save_model(model, d / kind, tokenizer_path=path, extra={"eot_id": tok.eot_id})
        out[kind] = (d / kind, tok)
    return out


def test_tiktoken_file_becomes_the_tokenizer_json_transformers_makes(llama3_tokenizer_files, llama3_saved):
    """Meta's Llama 3 tokenizer.model -> tokenizer.json: the vocabulary and merges that
    transformers' own TikTokenConverter makes of it (conftest), and the same ids as tiktoken."""
    tokenizers = pytest.importorskip("tokenizers")
    path, tok = llama3_saved["tiktoken"]
    ours = json.loads((path / "tokenizer.json").read_text())
    theirs = json.loads(open(llama3_tokenizer_files["json"]).read())
    assert ours["model"]["vocab"] == theirs["model"]["vocab"]
    assert ours["model"]["merges"] == [list(m) for m in theirs["model"]["merges"]]
    assert ours["pre_tokenizer"] == theirs["pre_tokenizer"] and ours["decoder"] == theirs["decoder"]
    hf = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    for text in [t for turns in demo_dialogues() for t in turns]:
        assert hf.encode(text, add_special_tokens=False).ids == tok.encode(text), text
    assert (path / "tokenizer.model").read_bytes() == open(tok.path, "rb").read()  # its identity


@pytest.mark.parametrize("version", [5, 4])
@pytest.mark.parametrize("kind", ["tiktoken", "json"])
def test_llama3_chat_template_in_transformers(llama3_saved, tmp_path, kind, version):
    """Llama 3 bases: the base's own special tokens, LIMA's template (not the base's), our ids."""
    path, tok = llama3_saved[kind]
    python = transformers4() if version == 4 else python_without(tmp_path, HIDDEN)
    dialogues = demo_dialogues()
    (tmp_path / "dialogues.json").write_text(json.dumps(dialogues))
    result = json.loads(run_client(python, [CLIENT, str(path), str(tmp_path / "dialogues.json")]))
    assert result["version"].startswith(f"{version}.") and result["warnings"] == []
    check_hf_client(result, tok, dialogues)


def llama_cpp():
    """(Python command, convert_hf_to_gguf.py) of llama.cpp, or a skip saying what is missing."""
    convert = os.environ.get("LIMA_LLAMA_CPP_CONVERT")
    if not convert or not os.path.isfile(convert):
        pytest.skip("llama.cpp's converter not given: set LIMA_LLAMA_CPP_CONVERT to its "
                    "convert_hf_to_gguf.py (a llama.cpp checkout, or vendor/llama.cpp in "
                    "llama-cpp-python's source package: pip download llama-cpp-python --no-binary :all:)")
    python = os.environ.get("LIMA_LLAMA_CPP_PYTHON", sys.executable)
    probe = subprocess.run([python, "-c", "import llama_cpp"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"{python} cannot import llama_cpp (llama.cpp's runtime): pip install "
                    f"llama-cpp-python, or set LIMA_LLAMA_CPP_PYTHON to a Python that has it")
    return [python], convert


def to_gguf(python, convert, checkpoint_dir, out):
    """llama.cpp's converter, as its README says to run it (full precision: f32)."""
    run_client(python, [convert, str(checkpoint_dir), "--outfile", str(out), "--outtype", "f32"])
    return out


def test_llama_cpp_gguf_has_the_template_and_stops_at_eot(saved, tmp_path):
    """The GGUF carries the chat template and marks EOT as an end of generation; its chat
    completions tokenize every demo dialogue as encode_dialog does, its logits are ours, and a
    model whose next token is EOT stops there."""
    python, convert = llama_cpp()
    env_gguf = os.path.join(os.path.dirname(os.path.abspath(convert)), "gguf-py")
    env = {"PYTHONPATH": env_gguf} if os.path.isdir(env_gguf) else {}  # the converter's own gguf
    tok, model = saved["tok"], saved["model"]
    dialogues = demo_dialogues()
    prompts = [tok.encode_dialog(turns)[0] for turns in dialogues[1:12:2]]
    (tmp_path / "dialogues.json").write_text(json.dumps(dialogues))
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    client = [os.path.join(ROOT, "tests", "llama_cpp_client.py")]

    gguf = to_gguf(python, convert, saved["path"], tmp_path / "model.gguf")
    result = json.loads(run_client(python, client + [str(gguf), str(tmp_path / "dialogues.json"),
                                                     str(tmp_path / "prompts.json")], env))
    assert result["chat_template"] == CHAT_TEMPLATE
    assert (result["bos"], result["eos"], result["eot"]) == (tok.bos_id, tok.eos_id, tok.eot_id)
    assert result["eot_text"] == EOT_NAME and result["eot_type"] == 3  # CONTROL: never text
    assert tok.eot_id in result["eog"] and tok.eos_id in result["eog"]
    for turns, ids in zip(dialogues, result["chat_ids"]):
        assert ids == tok.encode_dialog(turns)[0], turns
    with torch.no_grad():
        for prompt, theirs in zip(prompts, result["logits"]):
            ours = model(torch.tensor([prompt]))[0]
            torch.testing.assert_close(torch.tensor(theirs), ours, atol=1e-4, rtol=0)

    stopper = stopping_model(model, tok.encode_dialog(dialogues[0][:1])[0], tok.eot_id)
    checkpoint.save_model(stopper, tmp_path / "stopper", tokenizer_path=tok.path,
                          extra={"eot_id": tok.eot_id})
    gguf = to_gguf(python, convert, tmp_path / "stopper", tmp_path / "stopper.gguf")
    result = json.loads(run_client(python, client + [str(gguf), str(tmp_path / "dialogues.json"),
                                                     str(tmp_path / "prompts.json")], env))
    assert (result["finish_reason"], result["completion_tokens"]) == ("stop", 0)
