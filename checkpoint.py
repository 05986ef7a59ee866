"""Checkpoints in and out: Meta's and Hugging Face's LLaMA layouts (docs/method.md, "Checkpoints").

Reading, `load_model(path)`: the layout is detected from the files,
- Meta: params.json + consolidated.00.pth .. consolidated.NN.pth (model-parallel shards, merged
  one tensor at a time), tokenizer.model beside them or in the parent folder;
- Hugging Face: config.json + model.safetensors, model-*.safetensors with
  model.safetensors.index.json, or pytorch_model*.bin (+ pytorch_model.bin.index.json);
  tokenizer.model or tokenizer.json beside them;
- ours: the Hugging Face layout plus lima.json (our extras: EOT id, training config).
Every tensor comes out under Meta's name and in Meta's q/k row order, whatever the source.
LLaMA 1, Llama 2 and Llama 3.x: grouped-query attention, RoPE theta, Llama 3.1's "llama3" RoPE
scaling, an explicit head_dim and Llama 3.2's tied embeddings are read from the files; anything
else a config asks for (other RoPE scalings, biases, other model types) is refused by name.

Memory: the model is built on the meta device (no random-init copy), files are opened lazily
(torch.load(mmap=True), safetensors' safe_open), and each parameter is assigned the tensor
read for it. So host memory holds at most the weights once, plus one tensor in flight; at 65B
that is the difference between fitting and not.

Writing, `save_hf(out_dir, ...)`: the Hugging Face LLaMA layout, so transformers, vLLM and
llama.cpp's converter read it as it is, tokenizer, chat template and stop token included
(`_write_tokenizer`). Written into a temporary directory beside out_dir, fsync'd, then renamed
into place: out_dir is never half-written.
"""

import dataclasses
import errno
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import replace

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

import files
from generate import Decoding
from model import ModelArgs, RopeScaling, Transformer
from tokenizer import (CHAT_TEMPLATE, EOT_NAME, HFTokenizer, SentencePieceTokenizer,
                       find_tokenizer_file, load_tokenizer)

META_SHARD = re.compile(r"consolidated\.(\d+)\.pth")
HF_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
HF_SINGLES = ("model.safetensors", "pytorch_model.bin")
EXPECTED_LAYOUTS = (
    "Expected a checkpoint directory in Meta's layout (params.json + consolidated.00.pth, "
    "consolidated.01.pth, ...) or Hugging Face's (config.json + model.safetensors, or "
    "model-0000i-of-0000n.safetensors + model.safetensors.index.json, or pytorch_model*.bin).")


def _torch_load(file):
    # weights_only: no pickled code runs; mmap: a 16 GB shard costs nothing until a tensor is
    # touched, and then only that tensor's pages, which the OS can drop again (file-backed)
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ValueError(f"{file}: cannot be read as a PyTorch weights file ({e}). Re-download "
                         f"it, or convert a very old (pre-zip) .pth with a plain torch.load "
                         f"and torch.save.") from e


def _read_json(file, fix):
    """A JSON object file of a checkpoint; anything wrong with it: one ValueError naming the file."""
    value = files.read_json(file, fix)
    if not isinstance(value, dict):
        raise ValueError(f"{file}: holds a JSON {type(value).__name__}, expected an object. {fix}")
    return value


def _config_value(c, key, file, fix, kind=int):
    """A required field of params.json / config.json, of the right type (positive ints)."""
    value = c.get(key)
    if kind is int and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        raise ValueError(f"{file}: {'has no ' + repr(key) if key not in c else f'{key!r} is {value!r}'}"
                         f" (a positive integer is needed). {fix}")
    if kind is float and not (isinstance(value, (int, float)) and not isinstance(value, bool)):
        raise ValueError(f"{file}: {'has no ' + repr(key) if key not in c else f'{key!r} is {value!r}'}"
                         f" (a number is needed). {fix}")
    return value


CONFIG_FIX = "Use the {name} that came with the weights (download it again if it was damaged)."


# ---- which layout ----------------------------------------------------------------------------

def detect_layout(path):
    """-> "meta" or "hf" (a checkpoint we wrote is "hf" plus lima.json)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory. Pass the checkpoint "
                                f"directory (the one holding params.json or config.json).")
    if not os.path.isdir(path):
        raise ValueError(f"{path} is a file; pass the directory that holds it "
                         f"({os.path.dirname(path) or '.'}) instead.")
    files = sorted(os.listdir(path))
    if "params.json" in files:
        if not any(META_SHARD.fullmatch(f) for f in files):
            raise FileNotFoundError(f"{path}: params.json is here but no consolidated.NN.pth "
                                    f"weights. Download the consolidated.*.pth files beside it.")
        return "meta"
    if "config.json" in files:
        if not any(f in files for f in HF_INDEXES + HF_SINGLES):
            raise FileNotFoundError(
                f"{path}: config.json is here but no weights ({', '.join(HF_SINGLES + HF_INDEXES)})."
                f" Found: {_listing(files)}. Download the weight files beside config.json.")
        return "hf"
    raise ValueError(f"{path}: not a checkpoint I can read. Found: {_listing(files)}. "
                     f"{EXPECTED_LAYOUTS}")


def _listing(files, n=12):
    if not files:
        return "nothing (empty directory)"
    return ", ".join(files[:n]) + (f", ... ({len(files)} in all)" if len(files) > n else "")


def _meta_shards(path):
    """consolidated.00.pth .. consolidated.NN.pth, every one present, in order."""
    found = {int(m.group(1)): m.group(0) for f in os.listdir(path) if (m := META_SHARD.fullmatch(f))}
    missing = [f"consolidated.{i:02d}.pth" for i in range(max(found) + 1) if i not in found]
    if missing:
        raise FileNotFoundError(
            f"{path}: {', '.join(missing)} missing (found {', '.join(sorted(found.values()))}). "
            f"A Meta checkpoint of N shards has every consolidated.00.pth .. consolidated.NN.pth; "
            f"download the missing file(s).")
    return [os.path.join(path, found[i]) for i in sorted(found)]


def _hf_weight_files(path):
    """[(file, names the index puts there, or None: all of them)], safetensors preferred."""
    for index_name in HF_INDEXES:
        index = os.path.join(path, index_name)
        if not os.path.isfile(index):
            continue
        fix = "Download the index again with the weights it lists."
        weight_map = _read_json(index, fix).get("weight_map")
        if not (isinstance(weight_map, dict) and weight_map and
                all(isinstance(v, str) for v in weight_map.values())):
            raise ValueError(f"{index}: no 'weight_map' of tensor names to files. {fix}")
        by_file = {}
        for name, file in weight_map.items():
            by_file.setdefault(file, []).append(name)
        for file, names in by_file.items():
            if not os.path.isfile(os.path.join(path, file)):
                raise FileNotFoundError(
                    f"{index} lists {file} (holding {names[0]} and {len(names) - 1} more tensors) "
                    f"but {os.path.join(path, file)} does not exist. Download the missing shard.")
        return [(os.path.join(path, file), names) for file, names in by_file.items()]
    for single in HF_SINGLES:
        if os.path.isfile(os.path.join(path, single)):
            return [(os.path.join(path, single), None)]
    raise FileNotFoundError(f"{path}: no Hugging Face weight files. {EXPECTED_LAYOUTS}")


# ---- model arguments -------------------------------------------------------------------------

def load_args(path, weights=True):
    """ModelArgs from params.json (Meta) or config.json (Hugging Face). weights=False reads the
    configuration alone, for a plan made before the weights are downloaded (train.py
    --plan_only): a Meta vocabulary of -1 is then taken as LLaMA's 32,000 and the head as untied,
    which only the weights could tell otherwise."""
    path = os.fspath(path)
    if not weights:
        if os.path.isfile(os.path.join(path, "params.json")):
            return _meta_args(path, weights=False)
        if os.path.isfile(os.path.join(path, "config.json")):
            return _hf_args(os.path.join(path, "config.json"))
    if detect_layout(path) == "meta":
        return _meta_args(path)
    return _hf_args(os.path.join(path, "config.json"))


def _meta_args(path, weights=True):
    file = os.path.join(path, "params.json")
    fix = CONFIG_FIX.format(name="params.json")
    p = _read_json(file, fix)
    dim, n_layers, n_heads = (_config_value(p, k, file, fix) for k in ("dim", "n_layers", "n_heads"))
    unsupported = [k for k in p if k.startswith(("vision", "moe")) or k in ("quantization_args", "lora_args")]
    if unsupported:
        raise ValueError(f"{file}: {', '.join(unsupported)}: not a plain LLaMA (vision, mixture of "
                         f"experts or quantized weights); this project fine-tunes text LLaMAs.")
    # read it, never assume it: LLaMA 1 uses 1e-6, 65B and Llama 2 1e-5
    norm_eps = _config_value(p, "norm_eps", file, fix, float)
    shards = _meta_shards(path) if weights else []
    vocab = p.get("vocab_size", -1)
    if vocab <= 0:  # Meta writes -1 for LLaMA 1 / 2: the vocabulary is the embedding's row count
        vocab = _meta_vocab(shards[0]) if shards else 32000
    scaling, context = None, p.get("max_seq_len", ModelArgs.max_seq_len)
    if p.get("use_scaled_rope"):
        # Llama 3.1+: Meta's reference applies fixed values (factor 8, low 1, high 4, original
        # context 8192) whenever use_scaled_rope is set, for 3.2 too, whose Hugging Face
        # config.json says factor 32; newer params.json files may carry the two factors.
        scaling = RopeScaling(factor=p.get("rope_scaling_factor", 8.0),
                              high_freq_factor=p.get("rope_high_freq_factor", 4.0))
        context = p.get("max_seq_len", 131072)  # Llama 3.1's context (transformers' converter)
    args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads,
                     n_kv_heads=p.get("n_kv_heads"), vocab_size=vocab,
                     multiple_of=p.get("multiple_of", 256),
                     ffn_dim_multiplier=p.get("ffn_dim_multiplier"), norm_eps=norm_eps,
                     rope_theta=p.get("rope_theta", 10000.0), rope_scaling=scaling,
                     max_seq_len=context)
    args.tie_embeddings = _meta_tied(shards, args) if shards else False
    return args


def _meta_vocab(shard0):
    # LLaMA 1 / 2 split tok_embeddings on dim 1 (features), so every shard has all the rows;
    # with mmap, reading its shape touches no weight data
    weights = _torch_load(shard0)
    if "tok_embeddings.weight" not in weights:
        raise ValueError(f"{shard0}: no tok_embeddings.weight; not a LLaMA checkpoint shard.")
    return weights["tok_embeddings.weight"].shape[0]


def _meta_tied(shards, args):
    """Meta's params.json does not say whether the output head is the embedding: Llama 3.2 1B
    and 3B's shards store output.weight as an exact copy of tok_embeddings.weight (Meta's
    reference loads the two separately; transformers' converter ties them, as do we). Tied:
    output.weight absent, or equal to the embedding in every shard. The first rows are compared
    first, so an untied model costs nothing; a tied one reads both tensors once (mmap)."""
    weights = [_torch_load(f) for f in shards]
    if "output.weight" not in weights[0]:
        return True
    for w in weights:
        out, emb = w["output.weight"], w.get("tok_embeddings.weight")
        if emb is None or out.shape != emb.shape or not torch.equal(out[:1], emb[:1]):
            return False
        if not torch.equal(out, emb):
            return False
    return True


HF_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
               "intermediate_size")


def _hf_args(file):
    fix = CONFIG_FIX.format(name="config.json")
    c = _read_json(file, fix)
    required = {k: _config_value(c, k, file, fix) for k in HF_REQUIRED}
    _check_hf_config(c, file)
    rope = _hf_rope(c)
    scaling = None
    if rope.get("rope_type", rope.get("type")) == "llama3":
        scaling = RopeScaling(factor=rope["factor"], low_freq_factor=rope["low_freq_factor"],
                              high_freq_factor=rope["high_freq_factor"],
                              original_max_position_embeddings=rope["original_max_position_embeddings"])
    head_dim = c.get("head_dim")
    if head_dim == required["hidden_size"] // required["num_attention_heads"]:
        head_dim = None  # the usual width: nothing to record
    return ModelArgs(dim=required["hidden_size"], n_layers=required["num_hidden_layers"],
                     n_heads=required["num_attention_heads"], n_kv_heads=c.get("num_key_value_heads"),
                     vocab_size=required["vocab_size"], hidden_dim=required["intermediate_size"],
                     norm_eps=c.get("rms_norm_eps", 1e-6),  # LlamaConfig's own default
                     rope_theta=c.get("rope_theta", rope.get("rope_theta", 10000.0)),
                     rope_scaling=scaling, head_size=head_dim,
                     tie_embeddings=bool(c.get("tie_word_embeddings", False)),
                     max_seq_len=c.get("max_position_embeddings", ModelArgs.max_seq_len))


def _hf_rope(c):
    """The RoPE settings: `rope_scaling` (+ `rope_theta`) as Meta's configs and transformers < 5
    write them, or transformers >= 5's `rope_parameters` (theta inside)."""
    return c.get("rope_scaling") or c.get("rope_parameters") or {}


def _check_hf_config(c, file):
    """Refuse what our model does not compute, rather than load it and generate nonsense."""
    problems = []
    if c.get("model_type", "llama") != "llama":
        problems.append(f"model_type is {c['model_type']!r}, not 'llama'")
    if c.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {c['hidden_act']!r} (SwiGLU needs silu)")
    if c.get("attention_bias") or c.get("mlp_bias"):
        problems.append("biases in attention or MLP")
    rope = _hf_rope(c)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        problems.append(f"RoPE scaling of type {kind!r} (implemented: none, and 'llama3')")
    elif kind == "llama3":
        missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor",
                               "original_max_position_embeddings") if k not in rope]
        if missing:
            problems.append(f"'llama3' RoPE scaling without {', '.join(missing)}")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        problems.append(f"partial_rotary_factor {rope['partial_rotary_factor']}")
    if problems:
        raise ValueError(f"{file}: not a LLaMA this project implements: {'; '.join(problems)}.")


def expected_shapes(args):
    """{meta name: shape} of every parameter, from a model built on the meta device (free)."""
    with torch.device("meta"):
        model = Transformer(args)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


# ---- names and the q/k permutation -----------------------------------------------------------

HF_TOP = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
HF_LAYER = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
            "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
            "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
            "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
            "ffn_norm": "post_attention_layernorm"}
META_TOP = {hf: meta for meta, hf in HF_TOP.items()}
META_LAYER = {hf: meta for meta, hf in HF_LAYER.items()}


def meta_to_hf_name(name):
    """layers.3.attention.wq.weight -> model.layers.3.self_attn.q_proj.weight"""
    stem = name.removesuffix(".weight")
    if stem in HF_TOP:
        return HF_TOP[stem] + ".weight"
    _, i, rest = stem.split(".", 2)  # "layers", "3", "attention.wq"
    return f"model.layers.{i}.{HF_LAYER[rest]}.weight"


def hf_to_meta_name(name):
    """The inverse; None for a name that is not a LLaMA parameter."""
    stem = name.removesuffix(".weight")
    if stem in META_TOP:
        return META_TOP[stem] + ".weight"
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", stem)
    if m and m.group(2) in META_LAYER:
        return f"layers.{m.group(1)}.{META_LAYER[m.group(2)]}.weight"
    return None


def permute_to_hf(w, n_heads):
    """Meta's interleaved-pair rows of wq/wk -> HF's rotate-half order.

    Within each head, Meta rotates pairs (row 2i, row 2i+1); HF rotates (row i, row i + d/2).
    (n_heads * head_dim, dim) -> (n_heads, head_dim // 2, 2, dim) -> swap the middle two.
    """
    rows, dim = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


def permute_to_meta(w, n_heads):
    """HF's rotate-half rows of wq/wk -> Meta's interleaved pairs: the inverse of the above."""
    rows, dim = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, dim).transpose(1, 2).reshape(rows, dim)


def _qk_heads(name, args):
    """How many heads a q/k matrix holds (wk has n_kv_heads under GQA), or None."""
    if name.endswith("attention.wq.weight"):
        return args.n_heads
    if name.endswith("attention.wk.weight"):
        return args.kv_heads
    return None


# ---- reading weights -------------------------------------------------------------------------

def iter_weights(path, args=None):
    """Yield (meta_name, tensor), one full tensor at a time, in Meta's names and q/k order.

    Every name and shape is checked against `args` (read from the checkpoint if not given);
    an unknown, repeated, misshapen or missing tensor is an error naming the file. train.py
    materialises its FSDP shards from this, parameter by parameter.
    """
    path = os.fspath(path)
    args = args or load_args(path)
    expected = expected_shapes(args)
    seen, files = set(), []
    meta = detect_layout(path) == "meta"
    source = _iter_meta(path, args) if meta else _iter_hf(path, args)
    for name, tensor, where in source:
        if args.tie_embeddings and name == "output.weight":
            continue  # tied: it is tok_embeddings.weight (Meta's shards store a copy, HF's usually none)
        layer = _layer_of(name)
        if name not in expected and layer is not None and layer >= args.n_layers:
            raise ValueError(_layer_count_mismatch(path, meta, args.n_layers, f"include {name}"))
        if name not in expected or name in seen:
            raise ValueError(f"{where}: {'repeated' if name in seen else 'unexpected'} tensor "
                             f"{name!r}. This loader reads LLaMA checkpoints only; check that "
                             f"the files in {path} all belong to one model.")
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(
                f"{where}: {name} has shape {tuple(tensor.shape)}, but the config "
                f"(params.json / config.json) says {expected[name]}. The config and the weights "
                f"are from different models, or a shard is missing; use the files that were "
                f"released together.")
        if not _all_finite(tensor):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"{where}: {name} holds {bad} NaN or infinite values (of "
                             f"{tensor.numel()}): these weights can only produce garbage. The "
                             f"checkpoint is damaged (a diverged run or a corrupt file); use "
                             f"another checkpoint, or download this one again.")
        seen.add(name)
        if where not in files:
            files.append(where)
        yield name, tensor
    missing = [name for name in expected if name not in seen]
    held = {_layer_of(name) for name in seen} - {None}
    n_held = max(held, default=-1) + 1
    if missing and n_held < args.n_layers and all(
            _layer_of(name) is not None and _layer_of(name) >= n_held for name in missing):
        raise ValueError(_layer_count_mismatch(path, meta, args.n_layers, f"hold {n_held} layers"))
    if missing:
        raise ValueError(f"{', '.join(files)}: no {', '.join(missing[:5])}"
                         f"{f' (and {len(missing) - 5} more)' if len(missing) > 5 else ''} in "
                         f"these files. The checkpoint is incomplete: download it again.")


def _layer_of(name):
    """layers.12.attention.wq.weight -> 12; None for the embedding, final norm and head."""
    m = re.match(r"layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _layer_count_mismatch(path, meta, n_layers, what_weights_hold):
    file, key = ("params.json", "n_layers") if meta else ("config.json", "num_hidden_layers")
    return (f"{os.path.join(path, file)} says {key} = {n_layers}, but the weights in {path} "
            f"{what_weights_hold}: the config and the weights disagree on the number of layers. "
            f"The weights are what they are; use the {file} that came with them (or set {key} "
            f"to the number of layers the weight files hold).")


def _all_finite(tensor):
    # a sum is finite exactly when every element is, unless finite values overflow it (then the
    # elementwise check decides): one fast pass over the tensor as it is read (~30 GB/s on one
    # CPU core), so NaN weights are refused at load, naming the tensor
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


# Meta's model-parallel split: column-parallel matrices are cut along their output
# rows (dim 0), row-parallel ones along dim 1; norms are replicated. The embedding is cut along
# dim 1 (features) in LLaMA 1 / 2 and along dim 0 (vocabulary) in Llama 3: see _iter_meta.
META_CAT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0,
                "wo": 1, "w2": 1, "tok_embeddings": 1}


def _iter_meta(path, args):
    files = _meta_shards(path)
    shards = [_torch_load(f) for f in files]  # mmap: nothing is read yet
    where = files[0] if len(files) == 1 else f"{path} ({len(files)} consolidated shards)"
    for name in list(shards[0]):
        if name.startswith("rope.freqs"):  # a precomputed buffer, not a parameter
            continue
        pieces = []
        for file, shard in zip(files, shards):
            if name not in shard:
                raise ValueError(f"{file}: has no {name} but consolidated.00.pth does; the shards "
                                 f"are from different checkpoints. Download them again.")
            pieces.append(shard.pop(name))  # drop our reference as we go
        key = name.removesuffix(".weight").split(".")[-1]
        if len(pieces) == 1 or key not in META_CAT_DIM:
            tensor = pieces[0]  # one shard: the mmap'd tensor itself, no copy; norms: shard 0
        elif key == "tok_embeddings" and pieces[0].shape[1] == args.dim:
            tensor = torch.cat(pieces, dim=0)  # Llama 3's vocabulary-parallel embedding
        else:
            tensor = torch.cat(pieces, dim=META_CAT_DIM[key])
        yield name, tensor, where


def _iter_hf(path, args):
    for file, names in _hf_weight_files(path):
        with _open_weights(file) as (keys, get):
            in_file = set(keys)
            for hf_name in (names or keys):
                if hf_name.endswith("rotary_emb.inv_freq"):  # a buffer older conversions saved
                    continue
                if hf_name not in in_file:
                    raise ValueError(f"{file}: has no {hf_name}, though the index puts it there. "
                                     f"The shard is corrupt or from another model; download it again.")
                name = hf_to_meta_name(hf_name)
                if name is None:
                    raise ValueError(f"{file}: unexpected tensor {hf_name!r}; this loader reads "
                                     f"LlamaForCausalLM checkpoints only.")
                tensor = get(hf_name)
                heads = _qk_heads(name, args)
                if heads is not None and tensor.shape[0] % (2 * heads) == 0:
                    # a misshapen q/k is left alone here and reported by iter_weights' check
                    tensor = permute_to_meta(tensor, heads)
                yield name, tensor, file


@contextmanager
def _open_weights(file):
    """(names in the file, name -> tensor), reading one tensor per call."""
    if file.endswith(".safetensors"):
        try:
            handle = safe_open(file, framework="pt")
        except Exception as e:  # safetensors' own error type: a damaged header or a short file
            raise ValueError(f"{file}: cannot be read as safetensors ({e}). The file is truncated "
                             f"or corrupt: download it again.") from None

        def get(name):
            try:
                return f.get_tensor(name)
            except Exception as e:
                raise ValueError(f"{file}: cannot read {name} ({e}). The file is truncated or "
                                 f"corrupt: download it again.") from None
        with handle as f:
            yield list(f.keys()), get
    else:
        weights = _torch_load(file)
        yield list(weights), weights.pop


# ---- building the model ----------------------------------------------------------------------

def load_model(path, dtype=torch.float32, device="cpu", **arg_overrides):
    """A Transformer with the weights at `path`; arg_overrides replace ModelArgs fields
    (e.g. resid_dropout=0.3 for training, max_seq_len)."""
    args = replace(load_args(path), **arg_overrides)
    with torch.device("meta"):
        model = Transformer(args)  # shapes only: no memory, no random init to throw away
    for name, tensor in iter_weights(path, args):
        # What load_state_dict(assign=True) does, one parameter at a time: the parameter *is*
        # the tensor read (no copy when dtype and device already match, e.g. an fp32 mmap'd
        # Meta shard), so the weights are in memory once.
        module_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(module_name), leaf,
                nn.Parameter(tensor.to(device=device, dtype=dtype)))
    model.tie_weights()  # a tied output head shares the embedding just assigned
    # iter_weights has checked that every parameter came exactly once; this guards the guard
    left = [name for name, p in model.named_parameters() if p.is_meta]
    assert not left, f"{path}: never filled: {left}"
    return model


def find_tokenizer(path):
    """The tokenizer file of a checkpoint: tokenizer.model or tokenizer.json in its directory,
    or in the parent (Meta's LLaMA 1 download puts tokenizer.model beside the 7B/ folder), or None."""
    path = os.fspath(path)
    for folder in (path, os.path.dirname(os.path.abspath(path))):
        found = find_tokenizer_file(folder)
        if found is not None:
            return found
    return None


def load_model_and_tokenizer(path, tokenizer_path=None, dtype=torch.float32, device="cpu",
                             **arg_overrides):
    """(model, tokenizer); a tokenizer that does not fit the embedding fails before any
    weights are read."""
    tokenizer_path = tokenizer_path or find_tokenizer(path)
    if tokenizer_path is None:
        raise FileNotFoundError(f"{path}: no tokenizer.model or tokenizer.json in this directory or "
                                f"its parent. Pass tokenizer_path= (the tokenizer file of these weights).")
    tok = load_tokenizer(tokenizer_path)
    tok.check_model_vocab(load_args(path).vocab_size, path)
    check_tokenizer(path, tok)
    return load_model(path, dtype=dtype, device=device, **arg_overrides), tok


def check_tokenizer(path, tokenizer):
    """A checkpoint we wrote records the sha256 of the tokenizer it was trained with
    (lima.json["tokenizer_sha256"]); another tokenizer, even one of the same size, would map
    its ids to other pieces: refused. Checkpoints from elsewhere record nothing: not checked."""
    want = read_extra(path).get("tokenizer_sha256")
    if want is None or tokenizer.sha256() == want:
        return
    raise ValueError(
        f"{tokenizer.path} (sha256 {tokenizer.sha256()[:12]}...) is not the tokenizer "
        f"{os.path.join(os.fspath(path), 'lima.json')} records for this checkpoint (sha256 "
        f"{want[:12]}...): its ids would mean other pieces and the output would be garbage. Use "
        f"the tokenizer.model saved in {path}.")


def read_extra(path):
    """What lima.json holds (the `extra` given to save_hf, plus the tokenizer's sha256), {} for
    a checkpoint not ours."""
    file = os.path.join(os.fspath(path), "lima.json")
    fix = ("It holds this project's notes on the checkpoint (EOT id, tokenizer sha256, training "
           "config); restore it from where the checkpoint came from.")
    return _read_json(file, fix) if os.path.isfile(file) else {}


# ---- writing ---------------------------------------------------------------------------------

def save_model(model, out_dir, tokenizer_path=None, extra=None):
    """A Transformer in memory -> the Hugging Face layout at out_dir (save_hf)."""
    save_hf(out_dir, model.args, model.state_dict().items(), tokenizer_path=tokenizer_path,
            extra=extra)


def save_hf(out_dir, args, named_tensors, tokenizer_path=None, extra=None,
            max_shard_bytes=2 * 2**30, dtype=None):
    """Write the Hugging Face LLaMA layout at out_dir, atomically. lima.json holds `extra` and,
    with a tokenizer, its sha256 ("tokenizer_sha256"), which every loader checks. A checkpoint
    of the chat format (extra has "eot_id", as train.py's do) gets LIMA's chat template; a
    base model saved as it is (a conversion) keeps its own.

    named_tensors: (meta_name, tensor) pairs, consumed one at a time (train.py streams
    parameters gathered on rank 0), so at most one shard's worth of tensors is held.
    dtype: cast on the way out (e.g. torch.bfloat16); None keeps each tensor's dtype.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    _check_replaceable(out_dir)
    extra = dict(extra or {})
    bos, eos, eot = 1, 2, extra.get("eot_id")  # LLaMA's ids
    if tokenizer_path is not None:
        tok = load_tokenizer(tokenizer_path)
        tok.check_model_vocab(args.vocab_size, out_dir)
        bos, eos = tok.bos_id, tok.eos_id
        eot = tok.eot_id if args.vocab_size == tok.vocab_size else None
        extra["tokenizer_sha256"] = tok.sha256()  # its identity: loaders refuse another one
    chat = eot is not None and extra.get("eot_id") is not None
    tmp = files.make_temp_dir(out_dir)
    try:
        torch_dtype = _write_shards(tmp, args, named_tensors, max_shard_bytes, dtype)
        files.write_json(os.path.join(tmp, "config.json"), hf_config(args, torch_dtype, bos, eos))
        files.write_json(os.path.join(tmp, "generation_config.json"), generation_config(bos, eos, eot))
        if tokenizer_path is not None:
            _write_tokenizer(tmp, tok, eot, chat)
        if chat:
            files.write_atomic(os.path.join(tmp, "README.md"), model_card(eot))
        files.write_json(os.path.join(tmp, "lima.json"), extra)
        for name in os.listdir(tmp):
            # safetensors writes 0600 whatever the umask, copies follow the umask: a checkpoint
            # is shared (a cluster's other users, a serving account), so 0644 as HF's own saves
            os.chmod(os.path.join(tmp, name), 0o644)
        files.swap_dir(tmp, out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, Exception):  # KeyboardInterrupt: clean up, then let it through
            raise
        full = isinstance(e, OSError) and e.errno == errno.ENOSPC
        raise RuntimeError(
            f"saving the checkpoint to {out_dir} failed: {e!r}. "
            f"{'The disk is full: free space or save elsewhere. ' if full else ''}"
            f"{out_dir} is as it was before (the partial write was removed).") from e


def _check_replaceable(out_dir):
    """An existing out_dir is replaced only if it is empty or a checkpoint, so a typo in the
    output path cannot throw away someone's home directory."""
    if not os.path.lexists(out_dir):
        return
    marks = ("config.json", "lima.json", "params.json")
    if not os.path.isdir(out_dir) or (os.listdir(out_dir) and
                                      not any(os.path.exists(os.path.join(out_dir, m)) for m in marks)):
        raise FileExistsError(f"{out_dir} exists and is not a checkpoint directory; refusing to "
                              f"replace it. Choose another output path or remove it yourself.")


def _write_shards(tmp, args, named_tensors, max_shard_bytes, dtype):
    """Stream tensors into safetensors shards of at most max_shard_bytes (a larger tensor gets a
    shard of its own); name them model-0000i-of-0000n once n is known. -> the torch dtype."""
    expected, seen = expected_shapes(args), set()
    shards, current, current_bytes, total_bytes, torch_dtype = [], {}, 0, 0, dtype

    def flush():
        nonlocal current, current_bytes
        shard = os.path.join(tmp, f"shard-{len(shards)}.safetensors")
        _write_shard(current, shard)
        shards.append((shard, list(current)))
        current, current_bytes = {}, 0

    for name, tensor in named_tensors:
        if args.tie_embeddings and name == "output.weight":
            continue  # tied: HF stores the one tensor as model.embed_tokens, no lm_head
        if expected.get(name) != tuple(tensor.shape) or name in seen:
            raise ValueError(f"cannot save {name!r} with shape {tuple(tensor.shape)}: the model "
                             f"args say {expected.get(name, 'no such parameter')}"
                             f"{' (and it came twice)' if name in seen else ''}.")
        seen.add(name)
        tensor = tensor.detach().to("cpu", dtype=dtype)
        heads = _qk_heads(name, args)
        if heads is not None:
            tensor = permute_to_hf(tensor, heads)  # HF stores q/k rows for rotate-half RoPE
        torch_dtype = torch_dtype or tensor.dtype
        size = tensor.numel() * tensor.element_size()
        if current and current_bytes + size > max_shard_bytes:
            flush()
        current[meta_to_hf_name(name)] = tensor.contiguous()
        current_bytes, total_bytes = current_bytes + size, total_bytes + size
    missing = [name for name in expected if name not in seen]
    if missing:
        raise ValueError(f"cannot save: no tensors given for {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}.")
    flush()

    if len(shards) == 1:  # what transformers itself writes for a small model: no index
        os.rename(shards[0][0], os.path.join(tmp, "model.safetensors"))
        return torch_dtype
    weight_map, n = {}, len(shards)
    for i, (shard, names) in enumerate(shards, 1):
        final = f"model-{i:05d}-of-{n:05d}.safetensors"
        os.rename(shard, os.path.join(tmp, final))
        weight_map.update({name: final for name in names})
    files.write_json(os.path.join(tmp, "model.safetensors.index.json"),
                {"metadata": {"total_size": total_bytes}, "weight_map": weight_map})
    return torch_dtype


def _write_shard(tensors, file):
    save_file(tensors, file, metadata={"format": "pt"})  # transformers checks "format"
    files.fsync(file)


def hf_config(args: ModelArgs, torch_dtype, bos_id=1, eos_id=2):
    """config.json of transformers' LlamaForCausalLM (read also by vLLM and llama.cpp)."""
    dtype_name = str(torch_dtype).removeprefix("torch.")
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": args.dim, "intermediate_size": args.ffn_hidden,
        "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads, "head_dim": args.head_dim,
        "vocab_size": args.vocab_size, "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
        # the spelling Meta's Llama 3.1+ configs use, read by transformers 4 and 5, vLLM, llama.cpp
        "rope_scaling": None if args.rope_scaling is None else
        {"rope_type": "llama3", **dataclasses.asdict(args.rope_scaling)},
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": args.tie_embeddings, "bos_token_id": bos_id, "eos_token_id": eos_id,
        "initializer_range": 0.02, "use_cache": True,
        "torch_dtype": dtype_name, "dtype": dtype_name,  # transformers < 5 and >= 5 spellings
    }


def generation_config(bos_id, eos_id, eot_id=None):
    """generation_config.json: the paper's decoding (generate.Decoding, LIMA §5), which
    transformers' generate and vLLM take as their defaults. The format cannot say everything:
    its repetition penalty also penalises the prompt's tokens (transformers', vLLM's and
    llama.cpp's do), where ours penalises only generated ones by default (the paper's
    "previously generated tokens"; sample.py --penalize_prompt is theirs). model_card says so."""
    d = Decoding()
    return {"bos_token_id": bos_id, "eos_token_id": eos_id if eot_id is None else [eos_id, eot_id],
            "do_sample": True, "temperature": d.temperature, "top_p": d.top_p, "top_k": 0,
            "repetition_penalty": d.repetition_penalty,
            "max_length": d.max_seq_len}  # prompt + response, as ours (transformers' default: 20)


def model_card(eot_id):
    """README.md of a chat checkpoint: the format and the decoding, where a person looks."""
    d = Decoding()
    return f"""# A LIMA model

A LLaMA fine-tuned with the recipe of "LIMA: Less Is More for Alignment" (Zhou et al., 2023),
in the Hugging Face LLaMA layout: transformers, vLLM and llama.cpp's converter read this folder
as it is. `lima.json` holds the training run's settings.

**Chat format** (LIMA §3): `BOS user EOT assistant EOT user EOT ...`, with no role names and
no system prompt; the end-of-turn token EOT is `{EOT_NAME}` (id {eot_id}). The chat template
(`chat_template.jinja`, and `chat_template` in `tokenizer_config.json` for llama.cpp's
converter) writes it, and `generation_config.json` stops generation at EOT.

**Decoding** (LIMA §5): temperature {d.temperature}, top-p {d.top_p}, repetition penalty
{d.repetition_penalty}, at most {d.max_seq_len} tokens of prompt and response, stop at EOT.
`generation_config.json` holds these as the defaults of transformers' `generate` and of vLLM;
llama.cpp reads none of them, so give them as flags: `--temp {d.temperature} --top-p {d.top_p}
--top-k 0 --min-p 0 --repeat-penalty {d.repetition_penalty} --repeat-last-n -1`. One difference
remains: their repetition penalty also penalises the prompt's tokens, while the paper's
penalises only the tokens generated so far. lima's `sample.py` decodes as the paper does
(`--penalize_prompt` gives their behaviour).
"""


def _write_tokenizer(tmp, tok, eot, chat):
    """The tokenizer files that transformers, vLLM and llama.cpp read:
    - the base's own tokenizer file (tokenizer.model, or tokenizer.json) as it is: our loaders
      read it, and its sha256 is the checkpoint's tokenizer identity (lima.json);
    - tokenizer.json, where the base has none (SentencePiece, Meta's tiktoken file), made from
      that file (tokenizer.hf_tokenizer_json), so that transformers reads the tokenizer with no
      sentencepiece, protobuf or tiktoken, and every version the same way;
    - tokenizer_config.json: BOS, EOS, and the EOT declared special (so decoding can skip it);
    - with `chat`, LIMA's chat template: in chat_template.jinja (transformers and vLLM read it
      first) and in tokenizer_config.json (llama.cpp's GGUF converter reads it there), the same;
    - where the EOT is a new row (LLaMA 1/2): added_tokens.json, which llama.cpp's converter
      reads with tokenizer.model, and special_tokens_map.json, which transformers' sentencepiece
      LlamaTokenizer reads."""
    def copy(src, name):
        shutil.copyfile(src, os.path.join(tmp, name))
        files.fsync(os.path.join(tmp, name))

    def write(name, obj):
        files.write_json(os.path.join(tmp, name), obj)

    def special(text):  # how tokenizer_config.json declares a special token
        return {"content": text, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": True}

    new_eot = eot is not None and tok.adds_eot
    if isinstance(tok, HFTokenizer):
        copy(tok.path, "tokenizer.json")
        folder = os.path.dirname(os.path.abspath(tok.path))
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if os.path.isfile(os.path.join(folder, name)):
                copy(os.path.join(folder, name), name)
        if os.path.isfile(os.path.join(tmp, "tokenizer_config.json")):
            if not (chat or new_eot):
                return  # the base's own, unchanged
            config = _read_json(os.path.join(tmp, "tokenizer_config.json"),
                                "Use the tokenizer_config.json that came with the tokenizer.json.")
            if config.get("tokenizer_class") == "TokenizersBackend":  # transformers 5's name for
                config["tokenizer_class"] = "PreTrainedTokenizerFast"  # it, unknown to 4
        else:  # a bare tokenizer.json: say which tokens are BOS and EOS
            config = {"tokenizer_class": "PreTrainedTokenizerFast",
                      "bos_token": tok.tok.id_to_token(tok.bos_id),
                      "eos_token": tok.tok.id_to_token(tok.eos_id)}
    else:
        copy(tok.path, "tokenizer.model")
        made = tok.hf_tokenizer_json(eot)
        if made is not None:
            write("tokenizer.json", made)
        if isinstance(tok, SentencePieceTokenizer):
            specials = {i: tok.sp.IdToPiece(i) for i in (tok.sp.unk_id(), tok.bos_id, tok.eos_id)}
            config = {"unk_token": specials[tok.sp.unk_id()], "add_bos_token": True,
                      "add_eos_token": False,
                      "legacy": True}  # sentencepiece LlamaTokenizer: each text's leading space
        else:  # Meta's Llama 3: the 256 special tokens, as tokenizer.json adds them
            specials = {t["id"]: t["content"] for t in made["added_tokens"]}
            config = {}
        config = {"tokenizer_class": "PreTrainedTokenizerFast" if made else "LlamaTokenizer",
                  "bos_token": specials[tok.bos_id], "eos_token": specials[tok.eos_id], **config,
                  "clean_up_tokenization_spaces": False,  # decode gives the text as it was
                  "model_input_names": ["input_ids", "attention_mask"],  # no token_type_ids
                  "added_tokens_decoder": {str(i): special(text) for i, text in sorted(specials.items())}}
    if new_eot:
        write("added_tokens.json", {EOT_NAME: eot})
        config.setdefault("added_tokens_decoder", {})[str(eot)] = special(EOT_NAME)
        config["additional_special_tokens"] = [EOT_NAME]
        named = {k: config[k] for k in ("bos_token", "eos_token", "unk_token") if config.get(k)}
        write("special_tokens_map.json", {**named, "additional_special_tokens": [EOT_NAME]})
    if chat:
        config["chat_template"] = CHAT_TEMPLATE
        files.write_atomic(os.path.join(tmp, "chat_template.jinja"), CHAT_TEMPLATE)
    write("tokenizer_config.json", config)
