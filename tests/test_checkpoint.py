"""Checkpoints in and out (checkpoint.py), on tiny random fp32 weights.

The reference is transformers' LlamaForCausalLM, an independent LLaMA: it writes the Hugging
Face layouts, its logits are what every load must reproduce (the q/k un-permutation is only
right if they match), and it must read what we write. The Meta layouts are made here from the
same weights with this file's own name table, row order and shard splitter (docs/method.md, Checkpoints).
"""

import errno
import json
import os
import shutil
from dataclasses import replace

import pytest
import torch

import checkpoint
from model import ModelArgs, Transformer
from tokenizer import file_sha256, load_tokenizer

transformers = pytest.importorskip("transformers")  # dev dependency: the reference

VOCAB = 301  # the tiny tokenizer's 300 pieces + EOT (LIMA §3)
ATOL = 1e-4


def tiny_args(n_kv_heads=4, vocab_size=VOCAB, **kw):
    return ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=vocab_size,
                     multiple_of=16, norm_eps=1e-5, max_seq_len=64, **kw)  # ffn_hidden 176


def hf_config(args):
    return transformers.LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_hidden,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
        num_key_value_heads=args.kv_heads, rms_norm_eps=args.norm_eps,
        max_position_embeddings=args.max_seq_len, tie_word_embeddings=False,
        attn_implementation="eager")


@torch.no_grad()
def scale_up(named_params, seed=0):
    """Weights large enough that logits are O(1): at init scale (0.02) they are ~1e-3 and a
    1e-4 tolerance would let a wrong permutation pass. Norm weights not all ones, so a
    misplaced norm shows too."""
    g = torch.Generator().manual_seed(seed)
    for name, p in named_params:
        if p.dim() == 1:
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
        elif "embed" in name or "tok_embeddings" in name:
            p.copy_(torch.randn(p.shape, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)


TOKENS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))


def logits_of(model):
    with torch.no_grad():
        if isinstance(model, Transformer):
            return model.eval()(TOKENS)
        return model.eval()(TOKENS).logits.float()


# ---- the reference and the layouts it writes ---------------------------------------------------

@pytest.fixture(scope="module", params=[4, 2], ids=["mha", "gqa"])
def ref(request, tmp_path_factory):
    """An HF model, its logits, and its weights saved as single / sharded safetensors and as
    single / sharded pytorch_model.bin."""
    args = tiny_args(request.param)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_config(args))
    scale_up(hf.named_parameters())
    root = tmp_path_factory.mktemp(f"ref_{request.param}")
    hf.save_pretrained(root / "single")
    hf.save_pretrained(root / "sharded", max_shard_size="60KB")
    assert (root / "sharded" / "model.safetensors.index.json").exists()
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    # transformers >= 5 no longer writes .bin; this is the file its older versions wrote
    (root / "bin").mkdir()
    shutil.copy(root / "single" / "config.json", root / "bin")
    # older conversions also saved this buffer: the loader must skip it
    torch.save({**state, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)},
               root / "bin" / "pytorch_model.bin")
    (root / "bin_sharded").mkdir()
    shutil.copy(root / "single" / "config.json", root / "bin_sharded")
    names = list(state)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:]), 1):
        file = f"pytorch_model-{i:05d}-of-00002.bin"
        torch.save({n: state[n] for n in part}, root / "bin_sharded" / file)
        weight_map.update({n: file for n in part})
    with open(root / "bin_sharded" / "pytorch_model.bin.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return dict(args=args, hf=hf, logits=logits_of(hf), state=state, root=root)


# This file's own HF -> Meta table, independent of checkpoint.py's.
HF_TO_META = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
              "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
              "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
              "mlp.down_proj": "feed_forward.w2", "input_layernorm": "attention_norm",
              "post_attention_layernorm": "ffn_norm"}


def rotate_half_to_interleaved(w, n_heads):
    """Within each head HF keeps the first halves of the rotated pairs in rows 0..d/2-1 and the
    second halves in rows d/2..d-1; Meta interleaves them: Meta row 2j = HF row j, Meta row
    2j+1 = HF row j + d/2. Written as a gather, unlike checkpoint.py's view/transpose."""
    d = w.shape[0] // n_heads
    rows = [h * d + j + half for h in range(n_heads) for j in range(d // 2) for half in (0, d // 2)]
    return w[rows]


def meta_state(ref):
    args, out = ref["args"], {}
    for name, w in ref["state"].items():
        if name == "model.embed_tokens.weight":
            out["tok_embeddings.weight"] = w
        elif name == "model.norm.weight":
            out["norm.weight"] = w
        elif name == "lm_head.weight":
            out["output.weight"] = w
        else:
            _, _, i, part = name.removesuffix(".weight").split(".", 3)  # model.layers.{i}.{part}
            meta = f"layers.{i}.{HF_TO_META[part]}.weight"
            if part in ("self_attn.q_proj", "self_attn.k_proj"):
                w = rotate_half_to_interleaved(w, args.n_heads if "q_" in part else args.kv_heads)
            out[meta] = w
    return out


def write_meta(state, args, out_dir, n_shards, **params_overrides):
    """Split like Meta's model-parallel release: dim 0 for wq wk wv w1 w3 output,
    dim 1 for wo w2 tok_embeddings, norms replicated, a rope.freqs buffer in every shard."""
    os.makedirs(out_dir)
    dim0, dim1 = ("wq", "wk", "wv", "w1", "w3", "output"), ("wo", "w2", "tok_embeddings")
    shards = [{} for _ in range(n_shards)]
    for name, w in state.items():
        kind = name.split(".")[-2]
        pieces = (w.tensor_split(n_shards, 0) if kind in dim0 else
                  w.tensor_split(n_shards, 1) if kind in dim1 else [w] * n_shards)
        for shard, piece in zip(shards, pieces):
            shard[name] = piece.clone()
    for i, shard in enumerate(shards):
        shard["rope.freqs"] = torch.ones(args.head_dim // 2)
        torch.save(shard, os.path.join(out_dir, f"consolidated.{i:02d}.pth"))
    params = dict(dim=args.dim, multiple_of=args.multiple_of, n_heads=args.n_heads,
                  n_layers=args.n_layers, norm_eps=args.norm_eps, vocab_size=-1)
    if args.n_kv_heads != args.n_heads:
        params["n_kv_heads"] = args.n_kv_heads
    with open(os.path.join(out_dir, "params.json"), "w") as f:
        json.dump({**params, **params_overrides}, f)
    return out_dir


# ---- loading: every layout gives transformers' logits ------------------------------------------

@pytest.mark.parametrize("layout", ["single", "sharded", "bin", "bin_sharded"])
def test_hf_layouts_match_transformers(ref, layout):
    path = ref["root"] / layout
    assert checkpoint.detect_layout(path) == "hf"
    model = checkpoint.load_model(path)
    assert model.args.kv_heads == ref["args"].kv_heads
    assert model.args.ffn_hidden == ref["args"].ffn_hidden
    torch.testing.assert_close(logits_of(model), ref["logits"], atol=ATOL, rtol=0)


def test_the_comparison_catches_a_missing_unpermute(ref, monkeypatch):
    # the check above is only worth something if skipping the q/k un-permutation fails it
    monkeypatch.setattr(checkpoint, "permute_to_meta", lambda w, n_heads: w)
    wrong = logits_of(checkpoint.load_model(ref["root"] / "single"))
    assert (wrong - ref["logits"]).abs().max() > 100 * ATOL


@pytest.mark.parametrize("n_shards", [1, 2, 4])
def test_meta_shards_match_transformers(ref, tmp_path, n_shards):
    path = write_meta(meta_state(ref), ref["args"], tmp_path / "7B", n_shards)
    assert checkpoint.detect_layout(path) == "meta"
    args = checkpoint.load_args(path)
    assert args.vocab_size == VOCAB and args.norm_eps == ref["args"].norm_eps  # from the files
    torch.testing.assert_close(logits_of(checkpoint.load_model(path)), ref["logits"],
                               atol=ATOL, rtol=0)


def test_iter_weights_streams_meta_names(ref, tmp_path):
    path = write_meta(meta_state(ref), ref["args"], tmp_path / "m", 2)
    names = [name for name, _ in checkpoint.iter_weights(path)]
    assert "rope.freqs" not in names and len(names) == len(set(names)) == 2 + 2 * 9 + 1
    hf_names = [name for name, _ in checkpoint.iter_weights(ref["root"] / "sharded")]
    assert sorted(hf_names) == sorted(names)


def test_load_dtype_and_overrides(ref):
    model = checkpoint.load_model(ref["root"] / "single", dtype=torch.bfloat16, resid_dropout=0.3)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.args.resid_dropout == 0.3


def test_loader_keeps_one_copy(ref, tmp_path, monkeypatch):
    """The weights are in memory once: the model is built on the meta device (no random-init
    weights to overwrite), and each parameter *is* the tensor iter_weights produced (assigned,
    not copied into a preallocated parameter). For a one-shard fp32 Meta checkpoint that tensor
    is the mmap'd one from torch.load, so the parameters live in the page cache of the file."""
    built_on = []

    class Recording(Transformer):
        def __init__(self, args):
            super().__init__(args)
            built_on.append(self.output.weight.device.type)

    produced = {}
    real_iter = checkpoint.iter_weights

    def recording_iter(path, args=None):
        for name, tensor in real_iter(path, args):
            produced[name] = tensor.data_ptr()
            yield name, tensor

    monkeypatch.setattr(checkpoint, "Transformer", Recording)
    monkeypatch.setattr(checkpoint, "iter_weights", recording_iter)
    for path in (write_meta(meta_state(ref), ref["args"], tmp_path / "m1", 1), ref["root"] / "single"):
        produced.clear()
        model = checkpoint.load_model(path)
        assert set(built_on) == {"meta"}
        params = dict(model.named_parameters())
        assert produced.keys() == params.keys()
        assert all(params[name].data_ptr() == ptr for name, ptr in produced.items())


# ---- saving: transformers reads what we write, and so do we -----------------------------------

@pytest.fixture(scope="module")
def ours():
    """A model of our own, with a non-default RoPE theta so that config.json must carry it."""
    torch.manual_seed(0)
    model = Transformer(tiny_args(2, rope_theta=500.0))
    scale_up(model.named_parameters())
    return model


def test_save_is_real_hf_and_round_trips(ours, tmp_path, tiny_tokenizer_path):
    out = tmp_path / "ckpt"
    extra = {"eot_id": 300, "train": {"lr": 1e-5, "epochs": 15}}
    checkpoint.save_model(ours, out, tokenizer_path=tiny_tokenizer_path, extra=extra)
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.model",
            "added_tokens.json", "tokenizer_config.json", "lima.json"} <= files
    assert not any(f.startswith(".") for f in os.listdir(tmp_path))  # no temp dir left behind

    hf = transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation="eager")
    torch.testing.assert_close(logits_of(hf), logits_of(ours), atol=ATOL, rtol=0)

    back, tok = checkpoint.load_model_and_tokenizer(out)
    # config.json states the SwiGLU width (intermediate_size), not how it was derived
    assert replace(back.args, multiple_of=16, hidden_dim=None) == ours.args
    for (name, p), q in zip(ours.state_dict().items(), back.state_dict().values()):
        assert torch.equal(p, q), name
    # lima.json: the extras, and the tokenizer's identity, which loaders check
    assert checkpoint.read_extra(out) == {**extra, "tokenizer_sha256": file_sha256(tiny_tokenizer_path)}
    # the EOT row (vocab = 300 pieces + 1) is visible to HF and llama.cpp, and stops sampling
    assert tok.eot_id == 300
    assert json.loads((out / "added_tokens.json").read_text()) == {"<|eot_id|>": 300}
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [2, 300] and gen["top_p"] == 0.9 and gen["temperature"] == 0.7


def test_save_sharded_bf16(ours, tmp_path):
    out = tmp_path / "sharded"
    checkpoint.save_hf(out, ours.args, ours.state_dict().items(), max_shard_bytes=40_000,
                       dtype=torch.bfloat16)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert checkpoint.read_extra(out) == {}
    hf = transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation="eager",
                                                       dtype=torch.float32)
    back = checkpoint.load_model(out)
    torch.testing.assert_close(logits_of(hf), logits_of(back), atol=ATOL, rtol=0)
    for p, q in zip(ours.parameters(), back.parameters()):
        assert torch.equal(p.to(torch.bfloat16).float(), q)


def test_failed_save_leaves_previous_checkpoint(ours, tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    checkpoint.save_model(ours, out, extra={"epoch": 5})
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}

    def disk_full(tensors, file):
        raise OSError(errno.ENOSPC, "No space left on device", file)

    monkeypatch.setattr(checkpoint, "_write_shard", disk_full)
    with pytest.raises(RuntimeError, match="disk is full"):
        checkpoint.save_model(ours, out, extra={"epoch": 6})
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before
    with pytest.raises(RuntimeError, match=str(tmp_path / "fresh")):
        checkpoint.save_model(ours, tmp_path / "fresh")
    assert os.listdir(tmp_path) == ["ckpt"]  # no temp dir, no half-written "fresh"
    assert checkpoint.read_extra(out) == {"epoch": 5}
    monkeypatch.undo()  # the disk has room again: the next save replaces the old checkpoint
    checkpoint.save_model(ours, out, extra={"epoch": 6})
    assert checkpoint.read_extra(out) == {"epoch": 6} and os.listdir(tmp_path) == ["ckpt"]


def test_save_replaces_only_checkpoints(ours, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="not a checkpoint directory"):
        checkpoint.save_model(ours, tmp_path / "notes")
    assert (tmp_path / "notes" / "thesis.tex").read_text() == "precious"


# ---- bad input: each error says what is wrong and what to do ----------------------------------

def test_missing_meta_shard(ref, tmp_path):
    path = write_meta(meta_state(ref), ref["args"], tmp_path / "13B", 4)
    os.remove(path / "consolidated.02.pth")
    with pytest.raises(FileNotFoundError, match=r"consolidated\.02\.pth missing.*download"):
        checkpoint.load_model(path)


def test_missing_safetensors_shard(ref, tmp_path):
    path = shutil.copytree(ref["root"] / "sharded", tmp_path / "hf")
    victim = sorted(f for f in os.listdir(path) if f.startswith("model-"))[1]
    os.remove(path / victim)
    with pytest.raises(FileNotFoundError, match=rf"index\.json lists {victim}.*Download"):
        checkpoint.load_model(path)


def test_unknown_layout(tmp_path):
    with pytest.raises(ValueError, match=r"Found: nothing.*params\.json.*config\.json"):
        checkpoint.detect_layout(tmp_path)
    (tmp_path / "weights.npz").write_bytes(b"junk")
    (tmp_path / "README.md").write_text("hi")
    with pytest.raises(ValueError, match=r"Found: README\.md, weights\.npz\. Expected"):
        checkpoint.load_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="config.json is here but no weights"):
        checkpoint.load_model(tmp_path)


def test_nonexistent_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'}: no such"):
        checkpoint.load_model(tmp_path / "nope")


def test_shape_mismatch(ref, tmp_path):
    # params.json from another size: multiple_of 32 gives a 192-wide SwiGLU, the tensors say 176
    path = write_meta(meta_state(ref), ref["args"], tmp_path / "m", 2, multiple_of=32)
    with pytest.raises(ValueError, match=r"2 consolidated shards.*feed_forward\.w1\.weight has "
                                         r"shape \(176, 64\).*says \(192, 64\)"):
        checkpoint.load_model(path)
    path = shutil.copytree(ref["root"] / "single", tmp_path / "hf")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "intermediate_size": 192}))
    with pytest.raises(ValueError, match=r"model\.safetensors: layers\.0\.feed_forward\.w\d\.weight "
                                         r"has shape .*192"):
        checkpoint.load_model(path)


def test_missing_tensor(ref, tmp_path):
    state = meta_state(ref)
    del state["layers.1.ffn_norm.weight"]
    path = write_meta(state, ref["args"], tmp_path / "m", 1)
    with pytest.raises(ValueError, match=r"consolidated\.00\.pth: no layers\.1\.ffn_norm\.weight"
                                         r".*incomplete"):
        checkpoint.load_model(path)


def test_tokenizer_must_fit_the_embedding(tmp_path, tiny_tokenizer_path):
    torch.manual_seed(0)
    path = tmp_path / "ckpt"
    checkpoint.save_model(Transformer(tiny_args(vocab_size=320)), path)
    shutil.copy(tiny_tokenizer_path, tmp_path / "tokenizer.model")  # beside, like Meta's download
    assert checkpoint.find_tokenizer(path) == str(tmp_path / "tokenizer.model")
    with pytest.raises(ValueError, match=r"320 rows but the tokenizer .* has 300 pieces"):
        checkpoint.load_model_and_tokenizer(path)
    os.remove(tmp_path / "tokenizer.model")
    with pytest.raises(FileNotFoundError, match="no tokenizer.model.*tokenizer_path="):
        checkpoint.load_model_and_tokenizer(path)


# ---- damaged files and wrong companions: refused, naming the file and what to do ----------------

@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(ref, tmp_path, value):
    state = meta_state(ref)
    state["layers.1.attention.wv.weight"] = state["layers.1.attention.wv.weight"].clone()
    state["layers.1.attention.wv.weight"][3, 5] = value
    path = write_meta(state, ref["args"], tmp_path / "m", 2)
    with pytest.raises(ValueError, match=r"layers\.1\.attention\.wv\.weight holds 1 NaN or "
                                         r"infinite values.*another checkpoint"):
        checkpoint.load_model(path)
    hf = shutil.copytree(ref["root"] / "single", tmp_path / "hf")
    from safetensors.torch import load_file, save_file
    tensors = load_file(hf / "model.safetensors")
    tensors["model.norm.weight"][0] = value
    save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.safetensors: norm\.weight holds 1 NaN"):
        checkpoint.load_model(hf)


def test_large_finite_weights_are_not_mistaken_for_infinite(ref, tmp_path):
    # the fast check sums each tensor; finite values whose sum overflows must still load
    path = shutil.copytree(ref["root"] / "single", tmp_path / "hf")
    from safetensors.torch import load_file, save_file
    tensors = load_file(path / "model.safetensors")
    tensors["model.norm.weight"][:] = 3e38  # 64 of them: the float32 sum is inf
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    assert checkpoint.load_model(path).norm.weight[0].item() == pytest.approx(3e38)


def test_a_tokenizer_of_the_same_size_but_other_pieces_is_refused(ours, tmp_path, tiny_tokenizer_path):
    from conftest import train_tiny_tokenizer
    (tmp_path / "other").mkdir()
    other = train_tiny_tokenizer(str(tmp_path / "other"), seed=1)  # 300 pieces too
    assert load_tokenizer(other).vocab_size == load_tokenizer(tiny_tokenizer_path).vocab_size
    assert file_sha256(other) != file_sha256(tiny_tokenizer_path)
    torch.manual_seed(0)
    path = tmp_path / "ckpt"
    checkpoint.save_model(Transformer(tiny_args(vocab_size=VOCAB)), path, tokenizer_path=tiny_tokenizer_path)
    with pytest.raises(ValueError, match=rf"{other} \(sha256 .*\) is not the tokenizer "
                                         rf"{path / 'lima.json'} records"):
        checkpoint.load_model_and_tokenizer(path, tokenizer_path=other)
    _, tok = checkpoint.load_model_and_tokenizer(path)  # its own: fine
    assert tok.path == str(path / "tokenizer.model")


def _truncate(file):
    data = file.read_bytes()
    file.write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize("damage, message", [
    (lambda p: _truncate(p / "config.json"), r"config\.json: not valid JSON .*Use the config\.json that came"),
    (lambda p: (p / "config.json").write_text("[" * 200_000 + "]" * 200_000), r"config\.json: not valid JSON \(nested too deeply\)"),
    (lambda p: (p / "config.json").write_text('["a list"]'), r"config\.json: holds a JSON list, expected an object"),
    (lambda p: (p / "config.json").write_text(json.dumps({**json.loads((p / "config.json").read_text()), "hidden_size": "64"})),
     r"config\.json: 'hidden_size' is '64' \(a positive integer is needed\)"),
    (lambda p: _truncate(p / "model.safetensors"), r"model\.safetensors: cannot be read as safetensors .*download it again"),
    (lambda p: (p / "model.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"{not json}" + b"\x00" * 100),
     r"model\.safetensors: cannot be read as safetensors \(.*header"),
    (lambda p: (p / "lima.json").write_text("{"), r"lima\.json: not valid JSON"),
], ids=["truncated-config", "deep-config", "list-config", "typed-config", "truncated-safetensors",
        "bad-header", "bad-lima-json"])
def test_damaged_hf_files_are_named(ref, tmp_path, damage, message):
    path = shutil.copytree(ref["root"] / "single", tmp_path / "hf")
    (path / "lima.json").write_text("{}")
    damage(path)
    with pytest.raises(ValueError, match=message):
        checkpoint.load_model(path)
        checkpoint.read_extra(path)


def test_index_without_weight_map_and_params_without_dim(ref, tmp_path):
    path = shutil.copytree(ref["root"] / "sharded", tmp_path / "hf")
    (path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match=r"index\.json: no 'weight_map' .*Download the index again"):
        checkpoint.load_model(path)
    meta = write_meta(meta_state(ref), ref["args"], tmp_path / "m", 1)
    params = json.loads((meta / "params.json").read_text())
    del params["dim"]
    (meta / "params.json").write_text(json.dumps(params))
    with pytest.raises(ValueError, match=r"params\.json: has no 'dim' .*Use the params\.json that came"):
        checkpoint.load_model(meta)


@pytest.mark.parametrize("n_layers, holds", [(4, "hold 2 layers"), (1, "include layers.1.")])
def test_a_wrong_layer_count_names_the_disagreement(ref, tmp_path, n_layers, holds):
    path = shutil.copytree(ref["root"] / "single", tmp_path / "hf")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": n_layers}))
    with pytest.raises(ValueError) as e:
        checkpoint.load_model(path)
    msg = str(e.value)
    assert f"says num_hidden_layers = {n_layers}" in msg and holds in msg
    assert "disagree on the number of layers" in msg and "download" not in msg.lower()
    meta = write_meta(meta_state(ref), ref["args"], tmp_path / "m", 2, n_layers=n_layers)
    with pytest.raises(ValueError, match=f"params.json says n_layers = {n_layers}.*{holds}"):
        checkpoint.load_model(meta)
