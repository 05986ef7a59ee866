"""train.py on CPU: the recipe's schedule, packing and loss masking, and that the per-step losses
do not depend on the number of ranks (torchrun, gloo), the micro-batching, or a kill and resume."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoint
import data
import distributed
import model as M
import prepare_data
import train
from model import IGNORE_INDEX
from tests.conftest import ROOT, WORDS
from tokenizer import load_tokenizer


def sentence(rng, lo, hi):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer_path):
    """A tiny base model (no EOT row yet, as a downloaded LLaMA) and data prepared for it."""
    d = tmp_path_factory.mktemp("train")
    rng = random.Random(0)
    with open(d / "train.jsonl", "w") as f:
        for i in range(44):
            turns = [sentence(rng, 2, 10), sentence(rng, 3, 25)]
            if i % 7 == 0:
                turns += [sentence(rng, 2, 6), sentence(rng, 2, 12)]
            f.write(json.dumps({"conversations": turns, "source": "multi_turn" if len(turns) > 2 else "gen"}) + "\n")
    prepare_data.main(["--train", str(d / "train.jsonl"), "--tokenizer", tiny_tokenizer_path,
                       "--out_dir", str(d / "data"), "--dev_size", "4", "--seed", "0"])
    torch.manual_seed(0)
    base = M.Transformer(M.model_args("debug", vocab_size=300))
    base.init_weights()
    checkpoint.save_model(base, str(d / "base"), tokenizer_path=tiny_tokenizer_path)
    return d


def run(setup, out, *flags, nproc=1):
    cmd = [sys.executable, os.path.join(ROOT, "train.py")]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(29500 + random.Random(out).randint(0, 1000)), os.path.join(ROOT, "train.py")]
    cmd += ["--init_from", str(setup / "base"), "--data_dir", str(setup / "data"),
            "--out_dir", str(setup / out), "--epochs", "2", "--batch_size", "8",
            "--resid_dropout", "0", "--lr", "1e-3", "--min_lr", "1e-4", "--seed", "3",
            "--save_epochs", "2", "--dev_max_new_tokens", "4", *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(setup / out / "metrics.jsonl") as f:
        return [json.loads(line) for line in f], proc


@pytest.fixture(scope="module")
def reference(setup):
    return run(setup, "ref")[0]


def losses(records):
    return np.array([r["loss"] for r in records])


def test_lr_schedule_and_metrics(reference):
    # 40 train examples / 8 per step = 5 steps an epoch, 2 epochs
    assert [r["step"] for r in reference] == list(range(10))
    assert [r["epoch"] for r in reference] == [1] * 5 + [2] * 5
    assert reference[0]["lr"] == pytest.approx(1e-3) and reference[-1]["lr"] == pytest.approx(1e-4)
    lrs = [r["lr"] for r in reference]
    assert np.allclose(np.diff(lrs), np.diff(lrs)[0])  # linear, no warmup
    assert losses(reference)[-1] < losses(reference)[0]
    assert all(np.isfinite(r["grad_norm"]) and r["tokens_per_s"] > 0 for r in reference)


def test_paper_defaults():
    cfg = train.TrainConfig()
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.min_lr) == (15, 32, 1e-5, 1e-6)
    assert (cfg.beta1, cfg.beta2, cfg.weight_decay, cfg.resid_dropout) == (0.9, 0.95, 0.1, 0.3)
    assert train.PRESETS["small"] == dict(batch_size=64, resid_dropout=0.2)
    total = 40
    assert train.lr_at(0, total, cfg) == 1e-5 and train.lr_at(total - 1, total, cfg) == pytest.approx(1e-6)


def test_micro_batching_and_activation_checkpointing_do_not_change_the_loss(setup, reference):
    # several packed micro-batches per step, each block recomputed in the backward
    records, _ = run(setup, "micro", "--micro_batch_tokens", "40", "--activation_checkpointing")
    assert np.allclose(losses(records), losses(reference), rtol=1e-4, atol=0)


def test_bf16_master_weights(setup, reference):
    # --param_dtype bfloat16 (the 65B-on-8-GPUs option): the weights really are bf16, so the first
    # loss moves by bf16 rounding, no more
    records, _ = run(setup, "bf16", "--param_dtype", "bfloat16", "--max_steps", "2")
    first, ref = records[0]["loss"], reference[0]["loss"]
    assert first != ref and first == pytest.approx(ref, rel=2e-2)


def test_two_ranks_equal_one(setup, reference):
    records, _ = run(setup, "ddp", nproc=2)
    assert np.allclose(losses(records), losses(reference), rtol=1e-4, atol=0)


def test_killed_after_epoch_one_then_resumed_equals_uninterrupted(setup):
    # with dropout on, so the resumed run must also restore the random state
    whole, _ = run(setup, "whole", "--resid_dropout", "0.3")
    first, _ = run(setup, "resumed", "--resid_dropout", "0.3", "--max_steps", "5")  # stops after epoch 1
    assert len(first) == 5 and os.path.isfile(setup / "resumed" / "resume" / "state.json")
    records, proc = run(setup, "resumed", "--resid_dropout", "0.3", "--resume")
    assert "resumed at epoch 2" in proc.stderr
    assert [r["step"] for r in records] == list(range(10))
    assert np.allclose(losses(records), losses(whole), rtol=1e-4, atol=0)


def test_checkpoint_loads_back_with_the_trained_weights(setup, reference, tiny_tokenizer_path):
    ckpt = setup / "ref" / "epoch_02"
    m = checkpoint.load_model(str(ckpt))
    assert m.args.vocab_size == 301  # the EOT row was added to the 300-piece base
    # the dev loss the training run measured equals the one measured with the saved checkpoint
    with open(setup / "ref" / "dev.jsonl") as f:
        logged = [json.loads(line) for line in f][-1]
    dev = data.load_split(setup / "data", "dev")
    total = count = 0.0
    with torch.no_grad():
        for i in range(len(dev)):
            x, y, cu = train.pack(dev, [i], "cpu", 1)
            loss = m(x, y, reduction="sum")
            total, count = total + loss.item(), count + (y != IGNORE_INDEX).sum().item()
    assert total / count == pytest.approx(logged["dev_loss"], rel=1e-5)
    with open(setup / "ref" / "dev_generations" / "epoch_02.jsonl") as f:
        gens = [json.loads(line) for line in f]
    assert len(gens) == 4 and all(g["epoch"] == 2 and "prompt" in g and "response" in g for g in gens)


def test_pack_trains_only_on_assistant_tokens(setup, tiny_tokenizer_path):
    split = data.load_split(setup / "data", "train")
    x, y, cu = train.pack(split, [0, 1, 2], "cpu", 1)
    assert cu.tolist()[0] == 0 and cu.tolist()[-1] == x.shape[1]
    for k, i in enumerate([0, 1, 2]):
        tokens, mask = split.example(i)
        xs, ys = x[0, cu[k]:cu[k + 1]], y[0, cu[k]:cu[k + 1]]
        assert xs.tolist() == tokens[:-1].tolist()
        expect = [t if m else IGNORE_INDEX for t, m in zip(tokens[1:].tolist(), mask[1:])]
        assert ys.tolist() == expect  # user tokens (and their EOT) never count
    # changing what the user said changes no target
    tok = load_tokenizer(tiny_tokenizer_path)
    t1, m1 = tok.encode_dialog(["the cat sat", "seven robots"])
    t2, m2 = tok.encode_dialog(["green lamps hum quietly", "seven robots"])
    assert [t for t, m in zip(t1, m1) if m] == [t for t, m in zip(t2, m2) if m]


def test_plan_microbatches_balances_and_covers_every_example():
    lengths = np.array([50, 3, 40, 7, 7, 20, 1, 90])
    plan = train.plan_microbatches(list(range(8)), lengths, world_size=3, budget=60)
    assert len({len(p) for p in plan}) == 1  # same number of micro-batches on every rank
    flat = sorted(i for rank in plan for micro in rank for i in micro)
    assert flat == list(range(8))
    for rank in plan:
        for micro in rank:
            assert len(micro) <= 1 or sum(lengths[i] for i in micro) <= 60


def test_first_step_takes_the_longest_examples():
    lengths = np.arange(100)
    order = train.epoch_order(100, 0, 1, lengths, 8)
    assert sorted(order[:8].tolist()) == list(range(92, 100))
    assert sorted(order.tolist()) == list(range(100))
    again = train.epoch_order(100, 3, 1, lengths, 8)
    assert np.array_equal(again, train.epoch_order(100, 3, 1, lengths, 8))  # seeded per epoch


def test_nan_loss_stops_before_any_checkpoint(setup):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    out = setup / "nan"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--init_from", str(setup / "base"),
           "--data_dir", str(setup / "data"), "--out_dir", str(out), "--epochs", "1",
           "--batch_size", "8", "--lr", "1e30", "--min_lr", "1e30", "--grad_clip", "0", "--save_epochs", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert "loss is nan at step" in proc.stderr or "loss is inf at step" in proc.stderr
    assert "lower --lr" in proc.stderr
    assert not (out / "epoch_01").exists() and not (out / "resume").exists()


def test_mismatched_tokenizer_is_refused(setup, tmp_path):
    from tests.conftest import train_tiny_tokenizer
    other = train_tiny_tokenizer(str(tmp_path), vocab_size=300, seed=5)  # same size, other pieces
    checkpoint.save_model(M.Transformer(M.model_args("debug", vocab_size=300)), str(tmp_path / "base"), tokenizer_path=other)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--init_from", str(tmp_path / "base"),
           "--data_dir", str(setup / "data"), "--out_dir", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0 and "Run prepare_data.py again with --tokenizer" in proc.stderr


def test_memory_plan_refuses_what_cannot_fit_and_says_what_to_do():
    # 65B on 8 x 80 GB fits only with bf16 state, offload, or more GPUs
    args = M.model_args("65B", vocab_size=32001)
    gpu = torch.device("cuda")
    cfg = train.TrainConfig()
    with pytest.raises(SystemExit, match="--activation_checkpointing.*--cpu_offload"):
        distributed.memory_plan(cfg, args, 8, gpu, 2048, capacity=80 * 2**30)
    plan = distributed.memory_plan(train.TrainConfig(force=True), args, 8, gpu, 2048, capacity=80 * 2**30)
    assert plan["optimizer state (sharded)"] == pytest.approx(2 * 4 * args_params(args) / 8)
    fits = train.TrainConfig(param_dtype="bfloat16", activation_checkpointing=True, micro_batch_tokens=2048)
    plan = distributed.memory_plan(fits, args, 8, gpu, 2048, capacity=80 * 2**30)
    assert plan["total"] < 0.95 * 80 * 2**30
    offload = train.TrainConfig(cpu_offload=True, activation_checkpointing=True, micro_batch_tokens=2048)
    assert distributed.memory_plan(offload, args, 8, gpu, 2048, capacity=80 * 2**30)["parameters (sharded)"] == 0


def args_params(args):
    with torch.device("meta"):
        return M.Transformer(args).num_params()


def test_memory_plans_for_llama3():
    # the commands in train.py's docstring, on GPUs of 80 GB
    gpu, cap = torch.device("cuda"), 80 * 2**30
    fits = lambda name, ranks, **kw: distributed.memory_plan(train.TrainConfig(**kw), M.model_args(name), ranks, gpu, 2048, capacity=cap)
    assert fits("llama3.2-1B", 1)["total"] < 0.95 * cap  # one GPU, the defaults
    with pytest.raises(SystemExit, match="--activation_checkpointing"):
        fits("llama3.2-3B", 1)
    assert fits("llama3.2-3B", 1, activation_checkpointing=True)["total"] < 0.95 * cap
    assert fits("llama3.1-8B", 8)["total"] < 0.95 * cap
    with pytest.raises(SystemExit):
        fits("llama3.3-70B", 8, param_dtype="bfloat16", activation_checkpointing=True, micro_batch_tokens=2048)
    assert fits("llama3.3-70B", 8, cpu_offload=True, activation_checkpointing=True)["total"] < 0.95 * cap
    assert fits("llama3.3-70B", 16, param_dtype="bfloat16", activation_checkpointing=True)["total"] < 0.95 * cap
    # a tied head is one tensor: counted once in the state and in the unsharded root
    tied = M.model_args("llama3.2-1B")
    untied = M.model_args("llama3.2-1B", tie_embeddings=False)
    a, b = fits("llama3.2-1B", 1), distributed.memory_plan(train.TrainConfig(), untied, 1, gpu, 2048, capacity=cap)
    V_dim = tied.vocab_size * tied.dim
    assert b["parameters (sharded)"] - a["parameters (sharded)"] == pytest.approx(4 * V_dim)
    assert b["unsharded blocks (2) and root"] - a["unsharded blocks (2) and root"] == pytest.approx(2 * V_dim)


def test_logits_memory_is_one_loss_slice_whatever_the_vocabulary():
    gpu = torch.device("cuda")
    bound = M.LOSS_CHUNK_LOGITS * (2 + 4 + 4)  # a slice's bf16 logits, fp32 copy, fp32 gradient
    for vocab in (32001, 128256, 256000):
        for tokens in (8192, 65536):
            cfg = train.TrainConfig(micro_batch_tokens=tokens)
            plan = distributed.memory_plan(cfg, M.model_args("llama3.1-8B", vocab_size=vocab), 8, gpu, 2048,
                                           capacity=10**15)
            assert plan["logits (one loss slice)"] <= bound  # whole fp32 logits: 3-60 GB here


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_sliced_loss_under_fsdp2_equals_unsliced(tmp_path, monkeypatch, tied):
    # train.py's model (FSDP2, blocks recomputed) with the loss in 7-token slices, each made
    # again in the backward: the same loss and gradients as in one piece; a tied head's two
    # uses add into its one sharded gradient
    import torch.distributed as dist
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs a fresh torch.distributed")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        cfg = train.TrainConfig(activation_checkpointing=True, resid_dropout=0.0)
        args = M.model_args("debug", vocab_size=300, tie_embeddings=tied)
        x = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(0))
        y = x.roll(-1, 1)
        y[0, :9] = IGNORE_INDEX
        cu = torch.tensor([0, 17, 40], dtype=torch.int32)

        def loss_and_grads():
            model = distributed.build_model(cfg, args, train.source_weights(cfg, args, False, 299), torch.device("cpu"))
            assert (model.output.weight is model.tok_embeddings.weight) == tied
            loss = model(x, y, cu_seqlens=cu, reduction="sum")
            loss.backward()
            return loss.item(), {n: p.grad.full_tensor() for n, p in model.named_parameters()}

        whole, whole_grads = loss_and_grads()
        monkeypatch.setattr(M, "LOSS_CHUNK_LOGITS", 7 * 300)
        sliced, sliced_grads = loss_and_grads()
        assert sliced == pytest.approx(whole, rel=1e-6)
        assert sliced_grads.keys() == whole_grads.keys()
        assert ("output.weight" in whole_grads) != tied  # one parameter when tied
        for name, g in whole_grads.items():
            assert (sliced_grads[name] - g).abs().max() <= 1e-5 * g.abs().max(), name
    finally:
        dist.destroy_process_group()
