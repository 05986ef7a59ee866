"""train.py on CPU: the recipe's schedule, packing and loss masking, and that the per-step losses
do not depend on the number of ranks (torchrun, gloo), the micro-batching, or a kill and resume."""

import contextlib
import io
import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import checkpoint
import data
import distributed
import files
import model as M
import prepare_data
import report
import rundir
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
                       "--out_dir", str(d / "data"), "--dev_size", "4", "--seed", "0", "--dialogues"])
    torch.manual_seed(0)
    base = M.Transformer(M.model_args("debug", vocab_size=300))
    base.init_weights()
    checkpoint.save_model(base, str(d / "base"), tokenizer_path=tiny_tokenizer_path)
    return d


FLAGS = ["--epochs", "2", "--batch_size", "8", "--resid_dropout", "0", "--lr", "1e-3", "--min_lr", "1e-4",
         "--seed", "3", "--save_epochs", "2", "--dev_max_new_tokens", "4"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


def launch(setup, out, *flags, nproc=1):
    """train.py (under torchrun with nproc > 1) with the tests' flags, then these. Returns the
    finished process."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py")]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), os.path.join(ROOT, "train.py")]
    cmd += ["--init_from", str(setup / "base"), "--data_dir", str(setup / "data"),
            "--out_dir", str(setup / out), *FLAGS, *flags]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)


def train_here(setup, out, *flags):
    """train.py's main in this process, which saves starting an interpreter (seconds) per run.
    Returns what launch() does: returncode, stderr."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            train.main(["--init_from", str(setup / "base"), "--data_dir", str(setup / "data"),
                        "--out_dir", str(setup / out), *FLAGS, *flags])
        code, message = 0, ""
    except SystemExit as e:  # as the interpreter reports it: a string is printed, status 1
        code, message = (1, e.code + "\n") if isinstance(e.code, str) else (e.code, "")
    return SimpleNamespace(returncode=code, stderr=err.getvalue() + message)


def free_port():
    """A port nothing listens on now (other test runs may share the machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(setup, out, *flags, nproc=1):
    proc = launch(setup, out, *flags, nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_metrics(setup / out), proc


def read_metrics(out):
    with open(out / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


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


def test_training_curves_are_drawn_each_epoch(setup, reference):
    if report.pyplot() is not None:
        assert (setup / "ref" / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:  # drawn without matplotlib
        assert (setup / "ref" / "training_curves.svg").read_text().startswith("<svg")


def test_training_curves_plot_the_logged_numbers(tmp_path, monkeypatch):
    """What is drawn is metrics.jsonl and dev.jsonl: the loss and learning rate of each step,
    the dev loss of each epoch (the last line of an epoch a resumed run repeated), a torn last
    line ignored; without matplotlib, no picture and no error."""
    pytest.importorskip("matplotlib")
    steps = [dict(step=i, epoch=i // 3 + 1, loss=3.0 - 0.1 * i, lr=1e-5 - 1e-6 * i) for i in range(6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps) + '{"step": 6, "lo')
    dev = [dict(epoch=1, step=3, dev_loss=2.5), dict(epoch=1, step=3, dev_loss=2.4), dict(epoch=2, step=6, dev_loss=2.6)]
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dev))
    plt = report.pyplot()
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    assert report.training_curves(str(tmp_path)) == str(tmp_path / "training_curves.png")
    top, bottom = figures[0].axes
    per_step, per_epoch, dev_line = [line for line in top.get_lines() if line.get_label()[0] != "_"]
    assert list(per_step.get_ydata()) == [r["loss"] for r in steps]
    assert list(per_epoch.get_xdata()) == [2, 5] and np.allclose(per_epoch.get_ydata(), [2.9, 2.6])
    assert list(dev_line.get_xdata()) == [2, 5] and list(dev_line.get_ydata()) == [2.4, 2.6]
    lr, = [line for line in bottom.get_lines() if line.get_label()[0] != "_"]
    assert list(lr.get_ydata()) == [r["lr"] for r in steps]
    assert (tmp_path / "training_curves.png").read_bytes()[:4] == b"\x89PNG"

    (tmp_path / "training_curves.png").unlink()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed
    assert report.pyplot() is None
    assert report.training_curves(str(tmp_path / "nothing yet")) is None


def test_training_curves_without_matplotlib_are_an_svg_of_the_logged_numbers(tmp_path, monkeypatch):
    """Without matplotlib the same curves are drawn by hand as SVG: the loss of each step, the
    epoch means, the last dev loss of each epoch, the learning rate; a torn last line ignored."""
    import xml.etree.ElementTree as ET
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed
    steps = [dict(step=i, epoch=i // 3 + 1, loss=3.0 - 0.1 * i, lr=1e-5 - 1e-6 * i) for i in range(6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps) + '{"step": 6, "lo')
    dev = [dict(epoch=1, step=3, dev_loss=2.5), dict(epoch=1, step=3, dev_loss=2.4), dict(epoch=2, step=6, dev_loss=2.6)]
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dev))
    assert report.training_curves(str(tmp_path)) == str(tmp_path / "training_curves.svg")
    assert not (tmp_path / "training_curves.png").exists()
    svg = ET.parse(tmp_path / "training_curves.svg").getroot()
    ns = "{http://www.w3.org/2000/svg}"
    per_step, per_epoch, dev_line, lr = [[tuple(map(float, p.split(","))) for p in line.get("points").split()]
                                         for line in svg.iter(ns + "polyline")]
    assert len(per_step) == len(lr) == 6 and len(per_epoch) == len(dev_line) == 2

    def linear(pixels, values):  # pixel coordinates are one affine map of the values
        a, b = np.polyfit(values, pixels, 1)
        return np.allclose(np.polyval([a, b], values), pixels, atol=0.11)

    xs = [p[0] for p in per_step]
    assert linear(xs, [r["step"] for r in steps]) and xs == sorted(xs)
    loss_y = [p[1] for p in per_step] + [p[1] for p in per_epoch] + [p[1] for p in dev_line]
    assert linear(loss_y, [r["loss"] for r in steps] + [2.9, 2.6] + [2.4, 2.6])
    assert [p[0] for p in per_epoch] == [p[0] for p in dev_line] == [xs[2], xs[5]]
    assert linear([p[1] for p in lr], [r["lr"] for r in steps])
    assert "lowest 2.400" in (tmp_path / "training_curves.svg").read_text()


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


@pytest.fixture(scope="module")
def whole(setup):
    """With dropout on, so that a resumed run must also restore the random state."""
    return run(setup, "whole", "--resid_dropout", "0.3")[0]


@pytest.fixture(scope="module")
def after_epoch1(setup):
    """A run stopped after epoch 1 (of 2): its resume state, logs and lock, to copy and resume."""
    assert train_here(setup, "epoch1", "--resid_dropout", "0.3", "--max_steps", "5").returncode == 0
    return setup / "epoch1"


def test_killed_after_epoch_one_then_resumed_equals_uninterrupted(setup, whole):
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


def test_epochs_are_seeded_shuffles_and_the_first_step_an_ordinary_batch(setup, reference):
    order = train.epoch_order(100, 0, 1)
    assert np.array_equal(order, np.random.default_rng([1, 0]).permutation(100))
    assert sorted(order.tolist()) == list(range(100))
    again = train.epoch_order(100, 3, 1)
    assert np.array_equal(again, train.epoch_order(100, 3, 1))  # seeded per epoch
    assert not np.array_equal(again, order)
    # the reference run's first step trained on the seeded shuffle's first 8, not the longest 8
    lengths = data.load_split(setup / "data", "train").lengths
    first = train.epoch_order(len(lengths), 0, 3)[:8]  # --seed 3, --batch_size 8
    longest = np.argsort(-lengths, kind="stable")[:8]
    assert reference[0]["tokens"] == int(sum(lengths[first] - 1))
    assert set(first.tolist()) != set(longest.tolist())


def test_the_memory_probe_takes_the_heaviest_micro_batches():
    lengths = np.array([5, 90, 7, 60, 3, 80, 20, 1, 70, 10])
    # the 4 longest (90, 80, 70, 60) over 2 ranks, micro-batches of at most 100 tokens
    assert train.probe_plan(lengths, 4, 2, 100) == [[1], [5]]
    assert train.probe_plan(lengths, 4, 1, 1000) == [[1, 5, 8, 3]]


def test_the_memory_probe_leaves_the_run_exactly_as_it_was(setup, monkeypatch):
    # dropout on, so a probe that drew random numbers, kept a gradient, took a step or left Adam's
    # state anywhere but at zero would change the losses
    flags = ("--max_steps", "3", "--resid_dropout", "0.2")
    probed = []
    real_probe = train.probe_memory
    monkeypatch.setattr(train, "probe_memory", lambda run: probed.append(1) or real_probe(run))
    with_probe = train_here(setup, "probe_on", *flags)
    monkeypatch.setattr(train, "probe_memory", lambda run: None)
    without = train_here(setup, "probe_off", *flags)
    assert with_probe.returncode == without.returncode == 0 and probed == [1]
    assert "memory check: the heaviest micro-batch" in with_probe.stderr
    a, b = read_metrics(setup / "probe_on"), read_metrics(setup / "probe_off")
    assert [(r["loss"], r["grad_norm"]) for r in a] == [(r["loss"], r["grad_norm"]) for r in b]


def test_a_run_that_cannot_fit_fails_before_the_first_step_with_the_plans_options(setup, monkeypatch):
    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
    monkeypatch.setattr(M.Transformer, "forward", out_of_memory)
    proc = train_here(setup, "oom")
    assert proc.returncode == 1 and "out of memory on rank 0 before the first step" in proc.stderr
    assert distributed.MEMORY_OPTIONS in proc.stderr and "Traceback" not in proc.stderr
    assert not (setup / "oom" / "metrics.jsonl").exists() or not read_metrics(setup / "oom")


def test_non_finite_step_stops_before_any_checkpoint(setup):
    # lr 1e30: the first step makes the weights huge; at the second the loss is still finite but
    # the gradient is NaN. That step is not taken, and the run stops with nothing written.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    out = setup / "nan"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--init_from", str(setup / "base"),
           "--data_dir", str(setup / "data"), "--out_dir", str(out), "--epochs", "1",
           "--batch_size", "8", "--lr", "1e30", "--min_lr", "1e30", "--grad_clip", "0", "--save_epochs", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert "the gradient norm is nan" in proc.stderr and "at step 1 (epoch 1)" in proc.stderr
    assert "the step was not taken" in proc.stderr and "Traceback" not in proc.stderr
    assert "lower --lr" in proc.stderr
    assert not (out / "epoch_01").exists() and not (out / "resume").exists()
    assert len(read_metrics(out)) == 1  # step 0 only


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


@pytest.mark.parametrize("shard", [True, False], ids=["fsdp2", "plain"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_sliced_loss_under_fsdp2_equals_unsliced(tmp_path, monkeypatch, tied, shard):
    # train.py's model (FSDP2 as on several ranks, or the plain model of one CPU process;
    # blocks recomputed) with the loss in 7-token slices, each made again in the backward: the
    # same loss and gradients as in one piece; a tied head's two uses add into its one gradient
    import torch.distributed as dist
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs a fresh torch.distributed")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        cfg = train.TrainConfig(init_from=train.SCRATCH, activation_checkpointing=True, resid_dropout=0.0)
        args = M.model_args("debug", vocab_size=300, tie_embeddings=tied)
        x = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(0))
        y = x.roll(-1, 1)
        y[0, :9] = IGNORE_INDEX
        cu = torch.tensor([0, 17, 40], dtype=torch.int32)

        def loss_and_grads():
            model = distributed.build_model(cfg, args, train.source_weights(cfg, args, False, 299),
                                            torch.device("cpu"), shard=shard)
            assert (model.output.weight is model.tok_embeddings.weight) == tied
            loss = model(x, y, cu_seqlens=cu, reduction="sum")
            loss.backward()
            return loss.item(), {n: getattr(p.grad, "full_tensor", p.grad.clone)()
                                 for n, p in model.named_parameters()}

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


# ---- faults, bad input and interruptions -------------------------------------------------------

def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def failed(proc, *needles):
    """train.py refused or stopped: exit status 1 (2 for flags), one message, no traceback."""
    assert proc.returncode in (1, 2), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in proc.stderr, proc.stderr[-3000:]
    return proc.stderr


def test_resume_state_is_safetensors_and_json_only(after_epoch1):
    names = os.listdir(after_epoch1 / "resume")
    assert "state.json" in names and all(n == "state.json" or n.endswith(".safetensors") for n in names)
    state = json.loads((after_epoch1 / "resume" / "state.json").read_text())
    assert (state["step"], state["epoch"], state["world_size"]) == (5, 1, 1)
    assert state["run"]["batch_size"] == 8 and len(state["run"]["data_sha256"]) == 64


PAYLOAD = '''
import os, pickle
class Payload:
    def __reduce__(self):
        return (os.system, ("touch " + {marker!r},))
with open({path!r}, "wb") as f:
    pickle.dump(Payload(), f)
'''


@pytest.mark.parametrize("damage", ["pickle as a shard", "pickle as state.json", "truncated shard"])
def test_resume_runs_no_code_and_a_damaged_state_is_one_message(setup, after_epoch1, tmp_path, damage):
    # an attacker replaces a file of the resume state with a pickle whose loading runs a command
    # (the old format unpickled DCP's .metadata); or a disk lost the end of a shard
    out = copy_run(after_epoch1, setup / f"damaged-{damage.replace(' ', '-')}")
    target = out / "resume" / ("state.json" if "state.json" in damage else "rank00000-000.safetensors")
    marker = tmp_path / "ran"
    if damage.startswith("pickle"):
        subprocess.run([sys.executable, "-c", PAYLOAD.format(marker=str(marker), path=str(target))], check=True)
    else:
        target.write_bytes(target.read_bytes()[:-10])
    proc = train_here(setup, out.name, "--resid_dropout", "0.3", "--resume")
    assert not marker.exists()  # nothing ran
    failed(proc, f"{target}: ", "restore it, or start the run again with --overwrite")


def test_resume_finds_the_state_a_crash_between_the_renames_left(setup, after_epoch1, whole):
    # killed in the end-of-epoch save between its two renames: no resume/, the new complete state
    # in resume.tmp, the one before in resume.old; and, as a killed run leaves them, a torn last
    # line in metrics.jsonl, a dev loss logged for an epoch that will run again, a half-written
    # checkpoint directory
    out = copy_run(after_epoch1, setup / "crash")
    os.rename(out / "resume", out / "resume.tmp")
    shutil.copytree(out / "resume.tmp", out / "resume.old")
    older = json.loads((out / "resume.old" / "state.json").read_text())
    (out / "resume.old" / "state.json").write_text(json.dumps(dict(older, step=0, epoch=0)))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "epoch": 2, "lo')
    with open(out / "dev.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "step": 10, "dev_loss": 9.9}) + "\n")
    (out / ".epoch_02.tmp-abc123").mkdir()
    (out / ".epoch_02.tmp-abc123" / "model.safetensors").write_bytes(b"\0" * 1000)
    proc = train_here(setup, out.name, "--resid_dropout", "0.3", "--resume")
    assert proc.returncode == 0 and "resumed at epoch 2, step 5" in proc.stderr
    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(10))
    assert np.allclose(losses(records), losses(whole), rtol=1e-4, atol=0)
    dev = [json.loads(line) for line in (out / "dev.jsonl").read_text().splitlines()]
    assert [d["epoch"] for d in dev] == [1, 2] and dev[1]["dev_loss"] != 9.9
    assert sorted(n for n in os.listdir(out) if n.startswith((".", "resume"))) == ["resume"]


def test_recover_resume_takes_the_newest_complete_state(tmp_path):
    def state(name, step):
        os.makedirs(tmp_path / name)
        if step is not None:  # None: killed before state.json, which is written last
            (tmp_path / name / "state.json").write_text(json.dumps(
                dict(step=step, epoch=step // 5, world_size=1, files=[1])))
    state("resume", 5)
    state("resume.tmp", None)  # killed while writing the next one
    assert distributed.recover_resume(str(tmp_path))["step"] == 5
    assert os.listdir(tmp_path) == ["resume"]
    state("resume.tmp", 10)  # killed after state.json, before the renames
    assert distributed.recover_resume(str(tmp_path))["step"] == 10
    assert os.listdir(tmp_path) == ["resume"]
    os.rename(tmp_path / "resume", tmp_path / "resume.old")  # killed after the first rename
    state("resume.tmp", 15)
    assert distributed.recover_resume(str(tmp_path))["step"] == 15
    assert os.listdir(tmp_path) == ["resume"]
    state("resume.old", 10)  # killed after the second rename, before the deletion
    assert distributed.recover_resume(str(tmp_path))["step"] == 15
    assert os.listdir(tmp_path) == ["resume"]


def test_resume_refuses_another_run_naming_each_difference(setup, after_epoch1, tiny_tokenizer_path):
    other = setup / "other_data"
    if not other.exists():  # the same file, another dev split
        prepare_data.main(["--train", str(setup / "train.jsonl"), "--tokenizer", tiny_tokenizer_path,
                           "--out_dir", str(other), "--dev_size", "4", "--seed", "1", "--dialogues"])
    out = copy_run(after_epoch1, setup / "another")
    before = (out / "metrics.jsonl").read_bytes()
    proc = train_here(setup, out.name, "--resid_dropout", "0.3", "--resume", "--batch_size", "4",
                      "--lr", "2e-3", "--data_dir", str(other))
    err = failed(proc, "--batch_size (8 there, 4 now)", "--lr (0.001 there, 0.002 now)",
                 "the prepared data (sha256")
    assert "--resid_dropout" not in err and "--seed" not in err  # only what differs
    assert (out / "metrics.jsonl").read_bytes() == before
    # what may differ: how the step is computed, when to stop
    proc = train_here(setup, out.name, "--resid_dropout", "0.3", "--resume", "--micro_batch_tokens", "64",
                      "--max_steps", "6")
    assert proc.returncode == 0 and [r["step"] for r in read_metrics(out)] == list(range(6))


def test_resume_on_another_number_of_ranks(setup, reference):
    # saved by 2 ranks (each holding half the rows of every tensor), resumed by 1
    run(setup, "reshard", "--max_steps", "5", nproc=2)
    proc = train_here(setup, "reshard", "--resume")
    assert proc.returncode == 0 and "saved by 2 ranks, now 1" in proc.stderr
    assert np.allclose(losses(read_metrics(setup / "reshard")), losses(reference), rtol=1e-4, atol=0)


def test_an_earlier_run_is_kept_unless_resume_or_overwrite(setup, after_epoch1):
    out = copy_run(after_epoch1, setup / "earlier")
    before = {n: (out / n).read_bytes() for n in ("metrics.jsonl", "dev.jsonl")}
    failed(train_here(setup, out.name), f"{out} holds an earlier run", "--resume", "--overwrite")
    assert {n: (out / n).read_bytes() for n in before} == before and (out / "resume").is_dir()
    proc = train_here(setup, out.name, "--overwrite", "--max_steps", "1")
    assert proc.returncode == 0 and "deleted the earlier run" in proc.stderr
    assert len(read_metrics(out)) == 1 and not (out / "resume").exists() and not (out / "dev.jsonl").exists()
    failed(train_here(setup, "never_ran", "--resume"), "holds no resume state")


def test_a_second_run_on_the_same_out_dir_is_refused_while_the_first_runs(setup):
    out = setup / "busy"
    out.mkdir()
    with files.lock(out / "train"):  # as train.py holds it for its whole run (flock: per open file)
        failed(train_here(setup, "busy"),
               f"{out / 'train'} is being written by another process (pid {os.getpid()}")
    assert os.listdir(out) == []  # the refused run left nothing; the holder removed its lock file


def test_weights_gone_non_finite_are_never_written(setup, after_epoch1, monkeypatch):
    # a NaN in a weight (however it got there) at the end of epoch 2: no checkpoint, no dev
    # answers, no resume state of epoch 2; epoch 1's stay
    out = copy_run(after_epoch1, setup / "poisoned")
    end = train.end_of_epoch

    def poisoned(run, epoch):
        with torch.no_grad():
            distributed._local(run.model.norm.weight)[0] = float("nan")
        end(run, epoch)
    monkeypatch.setattr(train, "end_of_epoch", poisoned)
    proc = train_here(setup, out.name, "--resid_dropout", "0.3", "--resume", "--save_epochs", "1", "2")
    failed(proc, "hold NaN or inf: model/norm.weight", "Nothing of epoch 2 was written",
           "kept: the resume state of epoch 1 (step 5)")
    assert json.loads((out / "resume" / "state.json").read_text())["epoch"] == 1
    assert not (out / "epoch_02").exists() and not (out / "dev_generations" / "epoch_02.jsonl").exists()
    assert [json.loads(line)["epoch"] for line in (out / "dev.jsonl").read_text().splitlines()] == [1]


def test_train_step_takes_no_step_on_a_non_finite_gradient(tmp_path):
    import torch.distributed as dist
    if dist.is_initialized():
        pytest.skip("needs a fresh torch.distributed")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = M.Transformer(M.model_args("debug", vocab_size=64))
        model.init_weights()
        optimizer = train.make_optimizer(model, train.TrainConfig(lr=1e-3))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        x = torch.randint(0, 64, (1, 16))
        batch = [(x, x, torch.tensor([0, 16], dtype=torch.int32))]
        model.norm.weight.register_hook(lambda g: g * float("inf"))  # finite loss, inf gradient
        loss, grad_norm = train.train_step(model, optimizer, batch, 16, grad_clip=1.0)
        assert np.isfinite(loss) and not np.isfinite(grad_norm)
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
        assert not optimizer.state and all(p.grad is None for p in model.parameters())
    finally:
        dist.destroy_process_group()


def test_ctrl_c_says_what_was_kept_and_the_command_that_continues(setup):
    from conftest import ctrl_c_reaches_the_child
    out = setup / "interrupted"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--init_from", str(setup / "base"),
           "--data_dir", str(setup / "data"), "--out_dir", str(out), *FLAGS, "--epochs", "60", "--save_epochs", "60"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=ENV, preexec_fn=ctrl_c_reaches_the_child)
    deadline = time.time() + 120
    while not (out / "resume" / "state.json").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"interrupted. Kept in {out}: the resume state of epoch "), last
    command = last.split("Continue with: ")[1]
    assert command.startswith("python train.py ") and command.endswith(" --resume")
    # the command it gives continues the run (a step of it here)
    state = json.loads((out / "resume" / "state.json").read_text())
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        train.main(shlex.split(command)[2:] + ["--max_steps", str(state["step"] + 1)])
    assert f"resumed at epoch {state['epoch'] + 1}" in err.getvalue()


def test_training_from_random_weights_only_when_asked(setup, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--data_dir", str(setup / "data"), "--out_dir", str(setup / "no_base")])
    assert e.value.code == 1
    assert "--init_from: pass the base model's directory" in capsys.readouterr().err
    assert not (setup / "no_base").exists()
    proc = train_here(setup, "scratch", "--init_from", "scratch", "--model", "debug", "--max_steps", "1")
    assert proc.returncode == 0 and len(read_metrics(setup / "scratch")) == 1


def test_a_base_without_its_tokenizer_needs_one_named(setup, tmp_path, tiny_tokenizer_path):
    from tests.conftest import train_tiny_tokenizer
    base = tmp_path / "weights" / "base"  # no tokenizer.model here or in the parent
    checkpoint.save_model(M.Transformer(M.model_args("debug", vocab_size=300)), str(base))
    meta = data.load_meta(setup / "data")
    tokenizer = load_tokenizer(meta["tokenizer"])
    with pytest.raises(ValueError, match=f"{base}: no tokenizer.model .* Pass --tokenizer PATH"):
        train.resolve_model_args(train.TrainConfig(init_from=str(base)), meta, tokenizer)
    other = train_tiny_tokenizer(str(tmp_path), vocab_size=300, seed=5)  # same size, other pieces
    with pytest.raises(ValueError, match="Run prepare_data.py again with --tokenizer"):
        train.resolve_model_args(train.TrainConfig(init_from=str(base), tokenizer=other), meta, tokenizer)
    args, add_eot = train.resolve_model_args(train.TrainConfig(init_from=str(base), tokenizer=tiny_tokenizer_path),
                                             meta, tokenizer)
    assert args.vocab_size == 301 and add_eot


def test_checkpoints_record_the_tokenizer(reference, setup, tiny_tokenizer_path):
    from tokenizer import file_sha256
    extra = checkpoint.read_extra(str(setup / "ref" / "epoch_02"))
    assert extra["tokenizer_sha256"] == file_sha256(tiny_tokenizer_path)


@pytest.mark.parametrize("argv, message", [
    (["--min_lr", "-0.1"], "--min_lr -0.1: must be at least 0"),
    (["--epochs", "0"], "--epochs 0: must be at least 1"),
    (["--save_epochs", "16"], "--save_epochs 16: must be at least 1 and at most --epochs (15)"),
    (["--batch_size", "0"], "--batch_size 0: must be at least 1"),
    (["--model", "nope"], "--model 'nope': must be one of"),
    (["--param_dtype", "fp16"], "--param_dtype 'fp16': must be one of float32, bfloat16"),
    (["--device", "tpu"], "--device 'tpu': must be one of auto, cpu, cuda"),
    (["--resid_dropout", "1.5"], "--resid_dropout 1.5: must be at least 0 and at most 1"),
])
def test_flags_are_range_checked_when_read(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--init_from", "scratch", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_no_gpu_and_an_unwritable_out_dir_are_one_message(setup):
    if not torch.cuda.is_available():
        failed(train_here(setup, "cuda", "--device", "cuda"), "--device cuda: no CUDA device")
    (setup / "a_file").write_text("")
    failed(train_here(setup, "a_file/out"), f"{setup / 'a_file' / 'out'}: Not a directory")


def test_dev_generation_progress_is_counted_in_tokens():
    import generate
    torch.manual_seed(0)
    model = M.Transformer(M.model_args("debug", vocab_size=64))
    model.init_weights()
    calls = []
    out = generate.generate(model, [[1, 5, 9], [1, 7]], stop_ids=(3,), max_new_tokens=40, temperature=1.0,
                            top_p=1.0, progress=calls.append, generator=torch.Generator().manual_seed(0))
    assert sum(calls) == sum(map(len, out)) > 0  # every kept token, stop tokens not
    assert len(calls) <= 40 // 8 + 1  # every 8 steps, where decoding syncs anyway, and at the end


def test_the_continue_command_keeps_the_launcher_and_the_flags(monkeypatch):
    argv = ["--init_from", "llama/7B", "--out_dir", "out/my run", "--overwrite"]
    for name in ("TORCHELASTIC_RUN_ID", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert rundir.continue_command(argv, True) == "python train.py --init_from llama/7B --out_dir 'out/my run' --resume"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "1")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert rundir.continue_command(argv, True).startswith("torchrun --nproc_per_node=8 train.py --init_from")
    assert rundir.continue_command(argv + ["--resume"], False).endswith("'out/my run' --overwrite")


def test_dev_answers_from_a_saved_checkpoint_equal_the_sharded_models(reference, setup, tmp_path):
    # train.py answers the dev prompts of a saved epoch from its checkpoint once training is
    # over (one process, the model placed like sample.py's) instead of through the sharded model
    # at every epoch end: on CPU the answers are the same for the same seed
    import torch.distributed as dist
    ckpt = setup / "ref" / "epoch_02"
    assert (setup / "ref" / "dev_generations" / "epoch_02.jsonl").exists()  # written at the end
    cfg = train.TrainConfig(init_from=str(ckpt), dev_max_new_tokens=24, seed=3)
    tokenizer = load_tokenizer(ckpt / "tokenizer.model")
    prompts = data.read_prompts(setup / "data", "dev")
    plain = checkpoint.load_model(str(ckpt)).eval()
    train.dev_generations(plain, tokenizer, prompts, str(tmp_path / "plain.jsonl"), 2, cfg, 5, sharded=False)
    if dist.is_initialized():
        pytest.skip("needs a fresh torch.distributed")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        args = checkpoint.load_args(str(ckpt))
        sharded = distributed.build_model(cfg, args, checkpoint.iter_weights(str(ckpt)), torch.device("cpu"))
        train.dev_generations(sharded, tokenizer, prompts, str(tmp_path / "sharded.jsonl"), 2, cfg, 5)
    finally:
        dist.destroy_process_group()
    a, b = (data.read_jsonl(tmp_path / f"{n}.jsonl") for n in ("plain", "sharded"))
    assert [r["response"] for _, r in a] == [r["response"] for _, r in b]
    assert sum(len(tokenizer.encode(r["response"])) for _, r in a) > 20  # something was said


def test_plan_only_from_a_config_alone(tmp_path, capsys):
    # the plan before renting GPUs: LLaMA 65B's params.json alone (no weights downloaded yet)
    base = tmp_path / "65B"
    base.mkdir()
    (base / "params.json").write_text(json.dumps(
        {"dim": 8192, "multiple_of": 256, "n_heads": 64, "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1}))
    train.main(["--init_from", str(base), "--data_dir", str(tmp_path / "none"), "--out_dir", str(tmp_path / "out"),
                "--plan_only", "--gpus", "8", "--gpu_memory_gib", "80", "--micro_batch_tokens", "2048"])
    out = capsys.readouterr().out
    assert "plan for 65.29B parameters on 8 GPUs of 80 GiB" in out
    rows = {tuple(cell.strip() for cell in line.split("|")[1:4]): line.split("|")[5].strip()
            for line in out.splitlines() if line.startswith("| float32") or line.startswith("| bfloat16")}
    assert rows[("float32 (given)", "False", "False")] == "no"  # fp32 AdamW: 1 TB over 8 GPUs
    assert rows[("float32", "True", "True")] == "yes"  # the README's first 65B command
    assert rows[("bfloat16", "True", "False")] == "yes"  # and its second
    assert "the resume state (float32 weights and Adam's two moments): 783 GB" in out
    assert "LIMA's 1,000 examples" in out and "MFU" in out
    assert not (tmp_path / "out").exists()  # nothing built, nothing written
