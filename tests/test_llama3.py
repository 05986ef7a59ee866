"""Llama 3.x bases, tried as a user would: tiny Llama-3-style checkpoints written by
transformers ("llama3" RoPE scaling, GQA, an explicit head_dim, tied and untied embeddings) with
the tokenizer.json and Meta's tiktoken tokenizer.model made in conftest.py.

The reference is transformers: its LlamaForCausalLM gives the logits and the greedy generations
that ours must equal, and it must read the checkpoints we save (tying and RoPE scaling intact).
Meta's layout is made here from the same weights (vocabulary-parallel embedding, as Llama 3's
shards are cut).
"""

import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")  # dev dependency: the reference
pytest.importorskip("tokenizers")
pytest.importorskip("tiktoken")

import checkpoint  # noqa: E402
import data  # noqa: E402
import generate  # noqa: E402
import model as M  # noqa: E402
import prepare_data  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
from tests.conftest import LLAMA3_RANKS, ROOT, WORDS  # noqa: E402
from tests.test_checkpoint import HF_TO_META, rotate_half_to_interleaved, scale_up  # noqa: E402
from tokenizer import CHAT_TEMPLATE, HFTokenizer, TiktokenTokenizer, load_tokenizer  # noqa: E402

VOCAB = LLAMA3_RANKS + 256  # the BPE ranks, then Llama 3's 256 special tokens
BOS, EOS, EOT = LLAMA3_RANKS, LLAMA3_RANKS + 1, LLAMA3_RANKS + 9  # as 128000, 128001, 128009
ATOL = 1e-4
# Llama 3.2 1B / 3B: tied, factor 32; Llama 3.1 8B / 3.3 70B: untied, factor 8
STYLES = {"3.2": dict(tied=True, factor=32.0), "3.1": dict(tied=False, factor=8.0)}
PROMPTS = ["the cat sat on a mat", "seven happy robots answer questions", "bright green lamps",
           "tea, maps, music", "river stones hum quietly", "what is the cat"]


def hf_config(tied, factor, original=32, head_dim=24, intermediate_size=96):
    # original context 32 (Llama 3: 8192) so that, with theta 500000 and head_dim 24, every
    # branch of the scaling is taken: wavelengths below 8 kept, above 32 divided, one between
    return transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=intermediate_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, rms_norm_eps=1e-5,
        max_position_embeddings=256, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=factor, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=original),
        tie_word_embeddings=tied, bos_token_id=BOS, eos_token_id=EOS, attn_implementation="eager")


def make_hf(tied, factor, seed=0, **config):
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(hf_config(tied, factor, **config))
    scale_up(hf.named_parameters())
    if not tied:  # EOT made likely enough that greedy decoding reaches it within a few tokens
        with torch.no_grad():
            hf.lm_head.weight[EOT] *= 2
    return hf.eval()


def add_tokenizer_json(folder, files):
    src = os.path.dirname(files["json"])
    for name in os.listdir(src):
        shutil.copy(os.path.join(src, name), folder)


@pytest.fixture(scope="module", params=list(STYLES))
def base(request, tmp_path_factory, llama3_tokenizer_files):
    """A Hugging Face Llama-3-style base as a user downloads it: weights and config.json written by
    transformers, tokenizer.json and tokenizer_config.json beside them."""
    style = STYLES[request.param]
    hf = make_hf(**style)
    path = tmp_path_factory.mktemp(f"llama{request.param}") / "base"
    hf.save_pretrained(path)
    add_tokenizer_json(path, llama3_tokenizer_files)
    return dict(hf=hf, path=path, **style)


TOKENS = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        if isinstance(model, M.Transformer):
            return model.eval()(TOKENS)
        return model.eval()(TOKENS).logits.float()


# ---- the architecture: logits equal transformers' -----------------------------------------------

def test_hf_layout_matches_transformers(base):
    model = checkpoint.load_model(base["path"])
    a = model.args
    assert a.rope_theta == 500000.0 and a.kv_heads == 2 and a.head_dim == 24 != a.dim // a.n_heads
    assert a.rope_scaling == M.RopeScaling(factor=base["factor"], original_max_position_embeddings=32)
    assert a.tie_embeddings == base["tied"]
    assert (model.output.weight is model.tok_embeddings.weight) == base["tied"]
    assert model.num_params() == sum(p.numel() for p in base["hf"].parameters())  # tied: once
    torch.testing.assert_close(logits(model), logits(base["hf"]), atol=ATOL, rtol=0)


def test_the_comparison_catches_a_missing_rope_scaling(base, monkeypatch):
    monkeypatch.setattr(M, "scaled_frequencies", lambda inv_freq, scaling: inv_freq)
    wrong = logits(checkpoint.load_model(base["path"]))
    assert (wrong - logits(base["hf"])).abs().max() > 100 * ATOL


def write_meta_llama3(hf, out_dir, n_shards, tied):
    """Meta's Llama 3.x layout: params.json with use_scaled_rope, n_kv_heads, ffn_dim_multiplier,
    multiple_of, rope_theta, vocab_size; shards cut as Llama 3's model-parallel code cuts them
    (the embedding along the vocabulary, dim 0); a tied model stores output.weight as a copy of
    the embedding, as Meta's 3.2 shards do."""
    os.makedirs(out_dir)
    c = hf.config
    state = {}
    for name, w in hf.state_dict().items():
        if name == "model.embed_tokens.weight":
            state["tok_embeddings.weight"] = w
        elif name == "model.norm.weight":
            state["norm.weight"] = w
        elif name == "lm_head.weight":
            state["output.weight"] = w
        else:
            _, _, i, part = name.removesuffix(".weight").split(".", 3)
            if part in ("self_attn.q_proj", "self_attn.k_proj"):
                w = rotate_half_to_interleaved(w, c.num_attention_heads if "q_" in part else c.num_key_value_heads)
            state[f"layers.{i}.{HF_TO_META[part]}.weight"] = w
    if tied:
        state["output.weight"] = state["tok_embeddings.weight"].clone()
    dim0 = ("wq", "wk", "wv", "w1", "w3", "output", "tok_embeddings")
    shards = [{} for _ in range(n_shards)]
    for name, w in state.items():
        kind = name.split(".")[-2]
        pieces = (w.tensor_split(n_shards, 0) if kind in dim0 else
                  w.tensor_split(n_shards, 1) if kind in ("wo", "w2") else [w] * n_shards)
        for shard, piece in zip(shards, pieces):
            shard[name] = piece.clone()
    for i, shard in enumerate(shards):
        torch.save(shard, os.path.join(out_dir, f"consolidated.{i:02d}.pth"))
    params = dict(dim=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
                  n_kv_heads=c.num_key_value_heads, vocab_size=c.vocab_size, multiple_of=32,
                  ffn_dim_multiplier=1.3, norm_eps=c.rms_norm_eps, rope_theta=500000.0,
                  use_scaled_rope=True)
    with open(os.path.join(out_dir, "params.json"), "w") as f:
        json.dump(params, f)
    return out_dir


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_layout_matches_transformers(tmp_path, llama3_tokenizer_files, tied, n_shards):
    # Meta's reference scales RoPE with factor 8 and Llama 3's 8192-token original context;
    # its params.json has no head_dim (dim / n_heads = 16) and derives the SwiGLU width:
    # 32 * ceil(int(1.3 * int(8 * 64 / 3)) / 32) = 224
    hf = make_hf(tied, 8.0, original=8192, head_dim=16, intermediate_size=224)
    path = write_meta_llama3(hf, str(tmp_path / "Llama3.2-1B"), n_shards, tied)
    shutil.copy(llama3_tokenizer_files["tiktoken"], path)
    args = checkpoint.load_args(path)
    assert checkpoint.detect_layout(path) == "meta" and args.ffn_hidden == 224
    assert args.rope_scaling == M.RopeScaling(factor=8.0) and args.tie_embeddings == tied
    model, tok = checkpoint.load_model_and_tokenizer(path)
    assert isinstance(tok, TiktokenTokenizer) and (tok.bos_id, tok.eot_id) == (BOS, EOT)
    assert (model.output.weight is model.tok_embeddings.weight) == tied
    torch.testing.assert_close(logits(model), logits(hf), atol=ATOL, rtol=0)


def test_meta_untied_head_equal_only_in_its_first_row_stays_untied(tmp_path):
    hf = make_hf(False, 8.0, original=8192, head_dim=16, intermediate_size=224)
    with torch.no_grad():
        hf.lm_head.weight[0] = hf.model.embed_tokens.weight[0]
    path = write_meta_llama3(hf, str(tmp_path / "m"), 1, tied=False)
    assert not checkpoint.load_args(path).tie_embeddings


def test_other_rope_scalings_are_refused(tmp_path, base):
    path = shutil.copytree(base["path"], tmp_path / "yarn")
    config = json.loads((path / "config.json").read_text())
    config.pop("rope_parameters", None)
    config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json: not a LLaMA .*RoPE scaling of type 'yarn'"):
        checkpoint.load_args(path)


# ---- decoding: greedy sample.py equals transformers' generate -----------------------------------

def hf_greedy(hf, ids, n):
    out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      do_sample=False, max_new_tokens=n, eos_token_id=[EOT, EOS], pad_token_id=EOS)
    new = out[0, len(ids):].tolist()
    stop = next((i for i, t in enumerate(new) if t in (EOT, EOS)), len(new))
    return new[:stop], stop < len(new) and new[stop] == EOT


def test_greedy_sample_equals_transformers_generate(base, capsys):
    tok = load_tokenizer(base["path"])
    assert isinstance(tok, HFTokenizer) and tok.eot_id == EOT and not tok.adds_eot
    hf_tok = transformers.AutoTokenizer.from_pretrained(base["path"])
    model = checkpoint.load_model(base["path"])
    flags = ["--checkpoint", str(base["path"]), "--temperature", "0", "--repetition_penalty", "1",
             "--max_new_tokens", "12", "--device", "cpu", "--dtype", "float32"]
    stopped_at_eot = 0
    for text in PROMPTS:
        for raw in (True, False):
            ids = [BOS] + tok.encode(text) if raw else tok.encode_dialog([text])[0]
            assert raw or ids == [BOS] + tok.encode(text) + [EOT]  # LIMA §3: BOS u EOT
            want, eot = hf_greedy(base["hf"], ids, 12)
            stopped_at_eot += eot and len(want) >= 2
            got = generate.generate(model, [ids], stop_ids=(EOT, EOS), max_new_tokens=12,
                                    temperature=0.0, repetition_penalty=1.0)[0]
            assert got == want, (text, raw)
            sample.main(flags + ["--prompt", text] + (["--raw"] if raw else []))
            printed = capsys.readouterr().out
            assert printed == hf_tok.decode(want, skip_special_tokens=True) + "\n"
    if not base["tied"]:  # the EOT stop was exercised, after a real response
        assert stopped_at_eot >= 2


# ---- the EOT row: Llama 3's own, never added; trained where the base never trained it ----------

def test_untrained_eot_row_starts_as_the_mean_of_the_trained_rows(base, tmp_path, capsys,
                                                                   llama3_tokenizer_files):
    hf = make_hf(**STYLES["3.2" if base["tied"] else "3.1"])
    with torch.no_grad():  # Llama 3 base models ship <|eot_id|> and the reserved tokens as zeros
        for row in (EOT, EOT + 1, EOT + 2):
            hf.model.embed_tokens.weight[row] = 0
            hf.lm_head.weight[row] = 0
    hf.save_pretrained(tmp_path / "zero")
    cfg = train.TrainConfig(init_from=str(tmp_path / "zero"))
    args = checkpoint.load_args(cfg.init_from)
    got = dict(train.source_weights(cfg, args, add_eot=False, eot_id=EOT))
    assert ("output.weight" in got) != base["tied"]
    for name in got.keys() & {"tok_embeddings.weight", "output.weight"}:
        w = got[name]
        trained = [i for i in range(VOCAB) if i not in (EOT, EOT + 1, EOT + 2)]
        torch.testing.assert_close(w[EOT], w[trained].mean(0), atol=1e-6, rtol=0)
        assert w[EOT + 1].abs().max() == 0  # only the EOT is touched
    # such a base answers in plain completion only: the chat format would never stop
    flags = ["--checkpoint", cfg.init_from, "--prompt", "tea", "--temperature", "0", "--max_new_tokens", "3"]
    add_tokenizer_json(tmp_path / "zero", llama3_tokenizer_files)
    with pytest.raises(SystemExit):
        sample.main(flags)
    assert f"end-of-turn token (id {EOT}) was never trained" in capsys.readouterr().err
    sample.main(flags + ["--raw"])
    # a trained EOT row is left as it is
    cfg = train.TrainConfig(init_from=str(base["path"]))
    for name, w in train.source_weights(cfg, checkpoint.load_args(cfg.init_from), False, EOT):
        if name == "tok_embeddings.weight":
            assert torch.equal(w, base["hf"].model.embed_tokens.weight)


# ---- prepare_data, training, and a checkpoint transformers reads ---------------------------------

def sentence(rng, lo, hi):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def run_train(base_path, data_dir, out, *flags, nproc=1, epochs=1):
    cmd = [sys.executable, os.path.join(ROOT, "train.py")]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(29500 + random.Random(str(out)).randint(1001, 2000)),
               os.path.join(ROOT, "train.py")]
    cmd += ["--init_from", str(base_path), "--data_dir", str(data_dir), "--out_dir", str(out),
            "--epochs", str(epochs), "--batch_size", "4", "--save_epochs", str(epochs),
            "--resid_dropout", "0", "--lr", "1e-3", "--min_lr", "1e-4", "--dev_max_new_tokens", "4",
            "--micro_batch_tokens", "64", *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def prepared(base, tmp_path_factory):
    """LIMA-format conversations prepared with the base's folder as --tokenizer."""
    d = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    with open(d / "train.jsonl", "w") as f:
        for _ in range(10):  # 8 train + 2 dev: two steps of 4 make an epoch
            f.write(json.dumps({"conversations": [sentence(rng, 2, 8), sentence(rng, 3, 12)]}) + "\n")
    meta = prepare_data.main(["--train", str(d / "train.jsonl"), "--tokenizer", str(base["path"]),
                              "--out_dir", str(d / "data"), "--dev_size", "2", "--seed", "0"])
    return d / "data", meta


def test_prepare_train_save_and_transformers_loads_it(base, prepared, tmp_path):
    data_dir, meta = prepared
    assert meta["tokenizer"] == str(base["path"] / "tokenizer.json")  # the folder's file
    assert (meta["bos_id"], meta["eot_id"], meta["vocab_size"]) == (BOS, EOT, VOCAB)  # no added row
    tokens, mask = data.load_split(data_dir, "train").example(0)
    assert tokens[0] == BOS and tokens[-1] == EOT and (tokens == EOT).sum() == 2

    records = run_train(base["path"], data_dir, tmp_path / "out")
    assert [r["step"] for r in records] == [0, 1] and all(np.isfinite(r["loss"]) for r in records)
    saved = tmp_path / "out" / "epoch_01"
    config = json.loads((saved / "config.json").read_text())
    assert config["tie_word_embeddings"] == base["tied"] and config["vocab_size"] == VOCAB
    assert config["rope_scaling"]["rope_type"] == "llama3" and config["head_dim"] == 24
    assert json.loads((saved / "generation_config.json").read_text())["eos_token_id"] == [EOS, EOT]
    assert (saved / "tokenizer.json").read_bytes() == (base["path"] / "tokenizer.json").read_bytes()
    # the base's tokenizer_config.json with LIMA's chat template (and transformers 4's name for
    # the class transformers 5 wrote), the template also in chat_template.jinja
    config, base_config = (json.loads((d / "tokenizer_config.json").read_text()) for d in (saved, base["path"]))
    assert config.pop("chat_template") == CHAT_TEMPLATE == (saved / "chat_template.jinja").read_text()
    base_config.pop("chat_template", None)
    assert config == {**base_config, "tokenizer_class": "PreTrainedTokenizerFast"}
    assert not (saved / "added_tokens.json").exists()

    hf = transformers.LlamaForCausalLM.from_pretrained(saved, attn_implementation="eager")
    assert hf.config.rope_parameters["rope_type"] == "llama3"
    assert hf.config.rope_parameters["factor"] == base["factor"]
    assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) == base["tied"]
    ours = checkpoint.load_model(saved)
    torch.testing.assert_close(logits(hf), logits(ours), atol=ATOL, rtol=0)
    assert not torch.equal(hf.model.embed_tokens.weight, base["hf"].model.embed_tokens.weight)  # trained
    assert transformers.AutoTokenizer.from_pretrained(saved).convert_tokens_to_ids("<|eot_id|>") == EOT

    if base["tied"]:  # the tied weight sharded over two ranks trains as on one
        two = run_train(base["path"], data_dir, tmp_path / "out2", nproc=2)
        assert np.allclose([r["loss"] for r in two], [r["loss"] for r in records], rtol=1e-4, atol=0)


def test_tied_head_resumes_as_if_never_stopped(base, prepared, tmp_path):
    if not base["tied"]:
        pytest.skip("tests/test_train.py resumes an untied model")
    data_dir, _ = prepared
    whole = run_train(base["path"], data_dir, tmp_path / "whole", "--resid_dropout", "0.3", epochs=2)
    run_train(base["path"], data_dir, tmp_path / "resumed", "--resid_dropout", "0.3", "--max_steps", "2", epochs=2)
    resumed = run_train(base["path"], data_dir, tmp_path / "resumed", "--resid_dropout", "0.3", "--resume", epochs=2)
    assert [r["step"] for r in resumed] == [0, 1, 2, 3]
    assert np.allclose([r["loss"] for r in resumed], [r["loss"] for r in whole], rtol=1e-6, atol=0)


def test_save_from_meta_keeps_the_tiktoken_file(tmp_path, llama3_tokenizer_files):
    hf = make_hf(True, 8.0, original=8192, head_dim=16, intermediate_size=224)
    path = write_meta_llama3(hf, str(tmp_path / "meta"), 1, tied=True)
    shutil.copy(llama3_tokenizer_files["tiktoken"], path)
    model, tok = checkpoint.load_model_and_tokenizer(path)
    checkpoint.save_model(model, tmp_path / "out", tokenizer_path=tok.path)
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == open(tok.path, "rb").read()
    back, tok2 = checkpoint.load_model_and_tokenizer(tmp_path / "out")
    assert isinstance(tok2, TiktokenTokenizer) and back.args.tie_embeddings
    hf2 = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    assert hf2.config.tie_word_embeddings and hf2.config.rope_parameters["factor"] == 8.0
    torch.testing.assert_close(logits(hf2), logits(hf), atol=ATOL, rtol=0)
