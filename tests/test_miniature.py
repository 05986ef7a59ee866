"""The miniature (demo/, experiments/miniature.py): the held-out half of the invented world stays
out of every fine-tune set while the corpus states all of it; the grader; the shipped base and
its tokenizer; pretraining, the demo fine-tune and the experiment, each end to end on tiny
settings."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import checkpoint
import data
import prepare_data
import train
from demo import make_demo, pretrain
from demo import world as W
from tests.conftest import ROOT
from tokenizer import load_tokenizer

BASE = os.path.join(ROOT, "demo", "base")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


@pytest.fixture(scope="module")
def world():
    return W.make_world()


def held_names(world):
    """Every name that belongs to the held-out half: its entities and its countries' capitals."""
    held = world.split(True)
    return {e.bare for e in held} | {e.facts["capital"] for e in held if e.kind == "country"}


def fine_tune_texts(world):
    curated = W.curated(world)
    sets = {"curated": [it.record() for it in curated],
            "dialogues": W.dialogues(world),
            "dev": [it.record() for it in W.dev_set(world, exclude={it.prompt for it in curated})],
            "unfiltered": [it.record() for it in W.unfiltered(world, 16000)]}
    for name in ("train", "dev"):  # the committed demo files
        with open(os.path.join(ROOT, "demo", f"{name}.jsonl")) as f:
            sets[f"demo/{name}.jsonl"] = [json.loads(line) for line in f]
    return {name: ["\n".join(r["conversations"]) for r in rows] for name, rows in sets.items()}


def test_no_held_out_fact_reaches_a_fine_tune_set(world):
    names = held_names(world)
    pattern = re.compile(r"(?<![A-Za-z])(" + "|".join(map(re.escape, names)) + r")(?![A-Za-z])")
    for name, texts in fine_tune_texts(world).items():
        leaks = [t for t in texts if pattern.search(t)]
        assert not leaks, f"{name}: {len(leaks)} examples name the held-out half, e.g. {leaks[0]!r}"
    # and every held-out question is about the held-out half, its answer about nothing else
    for it in W.test_items(world):
        if it.task != "sum":
            assert it.entity.held and it.entity.bare in names
        else:
            assert it.sum in world.held_sums


def test_held_out_sums_are_not_asked_in_fine_tuning(world):
    asked = {it.sum for it in W.curated(world) + W.unfiltered(world, 16000) if it.task == "sum"}
    assert asked and not asked & world.held_sums


def test_the_corpus_states_every_held_out_fact(world):
    docs = W.corpus(world, 5000)
    sentences = [s for d in docs for s in W.sentences(d)]
    for e in world.split(True):
        for attribute, value in e.facts.items():
            hits = [s for s in sentences if e.bare in s and value in W.mentioned(s, W.values(world, e.kind, attribute))]
            assert len(hits) >= 3, (e.name, attribute)
    text = "\n".join(docs)
    for a, op, b in sorted(world.held_sums)[:20]:
        assert f"{a} {W.OP_WORDS[op]} {b} is {W.result(a, op, b)}." in text or \
               f"{a} {op} {b} = {W.result(a, op, b)}." in text, (a, op, b)


def test_world_and_sets_are_deterministic(world):
    again = W.make_world()
    assert [e.facts for e in again.entities] == [e.facts for e in world.entities]
    assert W.corpus(world, 50) == W.corpus(again, 50)
    assert [it.record() for it in W.unfiltered(world, 300)][:100] == [it.record() for it in W.unfiltered(again, 100)]


def test_demo_files_are_make_demo_output():
    train_rows, dev_rows, test_rows = make_demo.make()
    for name, rows in (("train", train_rows), ("dev", dev_rows), ("test", test_rows)):
        with open(os.path.join(ROOT, "demo", f"{name}.jsonl")) as f:
            assert [json.loads(line) for line in f] == rows
    # LIMA's shape: 1,000 single-turn examples + 30 dialogues marked multi_turn, 50 dev
    sources = [r["source"] for r in train_rows]
    assert len(train_rows) == 1030 and sources.count("multi_turn") == 30
    assert all(len(r["conversations"]) == 2 for r in train_rows if r["source"] != "multi_turn")
    assert all(len(r["conversations"]) > 2 for r in train_rows if r["source"] == "multi_turn")
    assert len(dev_rows) == 50 and len(test_rows) == 16
    prompts = {r["conversations"][0] for r in train_rows}
    assert not prompts & {r["conversations"][0] for r in dev_rows + test_rows}


def test_grader(world):
    items = W.test_items(world)
    for it in items:  # the curated answer is right and on format; cut off, it is not on format
        assert W.grade(world, it, it.answer, True) == (True, True), it.prompt
        assert W.grade(world, it, it.answer, False) == (True, False)
    fact = next(it for it in items if it.task == "fact" and it.attribute == "colour")
    other = next(c for c in W.COLOURS if c != fact.entity.facts["colour"])
    right = fact.entity.facts["colour"]
    assert W.grade(world, fact, f"{W.cap(fact.entity.name)} is {other}.", True) == (False, True)
    assert W.grade(world, fact, f"{W.cap(fact.entity.name)} is {right} or {other}.", True)[0] is False
    assert W.grade(world, fact, f"{right}.", True) == (True, False)  # no subject: not an answer's form
    assert W.grade(world, fact, f"Good question! {fact.answer} Hope this helps!", True) == (True, False)
    add = next(it for it in items if it.task == "sum")
    a, op, b = add.sum
    assert W.grade(world, add, f"{a} {W.OP_WORDS[op]} {b} is {W.result(a, op, b) + 1}.", True) == (False, True)
    desc = next(it for it in items if it.task == "describe" and it.entity.kind == "creature")
    assert W.grade(world, desc, W.answer_fact(desc.entity, "colour"), True)[0] is False  # one fact is not enough
    note = next(it for it in items if it.task == "note")
    assert W.grade(world, note, note.answer.replace("Best wishes", "Best wishes and see you in the spring"), True)[1] is False


def test_unfiltered_mix_is_what_it_says(world):
    """The unfiltered pool is a fixed mixture: about its stated share of curated-format answers
    and of wrong ones (graded by the same grader as the models)."""
    pool = W.unfiltered(world, 4000)
    graded = [W.grade(world, it, it.answer, True) for it in pool]
    correct = np.mean([c for c, _ in graded])
    wrong_share = W.UNFILTERED_MIX["wrong"] + W.UNFILTERED_MIX["non_answer"] + W.UNFILTERED_MIX["off_topic"]
    assert abs((1 - correct) - wrong_share) < 0.05


# ---- the shipped base ---------------------------------------------------------------------------

def test_shipped_base_is_a_base_model_with_its_tokenizer():
    model, tok = checkpoint.load_model_and_tokenizer(BASE)
    assert model.args.vocab_size == tok.eot_id  # no EOT row: the fine-tune adds it (LIMA §3)
    assert (model.args.dim, model.args.n_layers) == (128, 4)
    assert 1e6 < model.num_params() < 2e6
    assert tok.sp.vocab_size() == pretrain.VOCAB_SIZE and (tok.bos_id, tok.eos_id, tok.sp.unk_id()) == (1, 2, 0)
    size = sum(os.path.getsize(os.path.join(BASE, f)) for f in os.listdir(BASE))
    assert size < 8e6  # a few MB in the repository
    # the demo data is tokenized with the base's own tokenizer, and round-trips through it
    for name in ("train", "test"):
        with open(os.path.join(ROOT, "demo", f"{name}.jsonl")) as f:
            for line in f:
                for turn in json.loads(line)["conversations"]:
                    assert tok.decode(tok.encode(turn)) == turn
    # the base knows the world: its loss on corpus text is far below a random model's
    docs = W.corpus(W.make_world(), 40, seed=123)
    import torch
    with torch.no_grad():
        losses = []
        for d in docs:
            x = torch.tensor([tok.bos_id] + tok.encode(d) + [tok.eos_id])[None]
            losses.append(model(x[:, :-1], x[:, 1:]).item())
    assert np.mean(losses) < 1.0  # a random model: ln(2048) = 7.6


def test_prepare_data_demo_uses_the_base_tokenizer(tmp_path, capsys):
    meta = prepare_data.main(["--demo", "--out_dir", str(tmp_path / "demo")])
    assert "multi_turn" in capsys.readouterr().out
    tok = load_tokenizer(os.path.join(BASE, "tokenizer.model"))
    assert meta["tokenizer"] == os.path.abspath(os.path.join(BASE, "tokenizer.model"))
    assert meta["tokenizer_sha256"] == tok.sha256() and meta["eot_id"] == tok.eot_id == pretrain.VOCAB_SIZE
    tr, dev = data.load_split(tmp_path / "demo", "train"), data.load_split(tmp_path / "demo", "dev")
    # the 1,000 single-turn examples (whether the 30 multi_turn rows are in is prepare_data's
    # default to decide) and the 50 of demo/dev.jsonl, not carved from train
    sources = meta["splits"]["train"]["sources"]
    assert sum(n for k, n in sources.items() if k != "multi_turn") == 1000 and len(dev) == 50
    assert len(tr) == 1000 + sources.get("multi_turn", 0)
    assert meta["splits"]["train"]["len_max"] < 128
    tokens, mask = tr.example(0)
    assert tokens[0] == tok.bos_id and tokens[-1] == tok.eot_id and mask[-1]
    tests = data.read_prompts(tmp_path / "demo", "test")
    assert len(tests) == 16 and all(t["reference"] for t in tests)


# ---- end to end, tiny --------------------------------------------------------------------------

def test_pretrain_script_end_to_end(tmp_path):
    """demo/pretrain.py on a small corpus: the corpus, a deterministic tokenizer, documents as
    BOS text EOS with every token trained, and a base without an EOT row installed."""
    args = ["--docs", "2500", "--batch_size", "256", "--data_dir", str(tmp_path / "d"),
            "--out_dir", str(tmp_path / "o"), "--base_dir", str(tmp_path / "base"), "--threads", "1"]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "demo", "pretrain.py"), *args],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = data.load_meta(tmp_path / "d")
    tok = load_tokenizer(meta["tokenizer"])
    assert meta["vocab_size"] == tok.eot_id  # the base vocabulary: no EOT in pretraining
    split = data.load_split(tmp_path / "d", "train")
    tokens, mask = split.example(3)
    assert tokens[0] == tok.bos_id and tokens[-1] == tok.eos_id and mask.all()
    assert tok.eot_id not in split.tokens
    with open(tmp_path / "d" / "corpus.jsonl") as f:
        first = json.loads(f.readline())["text"]
    docs = W.corpus(W.make_world(), 2500)
    assert first == docs[0] and tok.decode(tokens.tolist()) == docs[meta["dev_size"] + 3]
    model = checkpoint.load_model(tmp_path / "base")
    assert model.args.vocab_size == tok.eot_id
    assert os.path.isfile(tmp_path / "base" / "tokenizer.model")
    again = tmp_path / "tok2.model"
    pretrain.train_tokenizer(docs[:pretrain.TOKENIZER_DOCS], again)
    assert load_tokenizer(again).sha256() == tok.sha256()


def test_demo_fine_tunes_the_shipped_base_and_prints_beside_it(tmp_path):
    assert train.PRESETS["demo"]["init_from"] == "demo/base"
    run = lambda *cmd: subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=ENV,
                                      timeout=600, cwd=ROOT)
    data_dir, out = str(tmp_path / "data"), str(tmp_path / "out")
    proc = run("prepare_data.py", "--demo", "--out_dir", data_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run("train.py", "--preset", "demo", "--data_dir", data_dir, "--out_dir", out, "--epochs", "1", "--save_epochs", "1",
               "--dev_max_new_tokens", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = os.path.join(out, "epoch_01")
    assert checkpoint.load_args(ckpt).vocab_size == pretrain.VOCAB_SIZE + 1  # EOT added to the base
    with open(os.path.join(out, "train_config.json")) as f:
        cfg = json.load(f)
    assert (cfg["init_from"], cfg["batch_size"], cfg["resid_dropout"], cfg["beta2"]) == ("demo/base", 64, 0.2, 0.95)
    proc = run("sample.py", "--checkpoint", ckpt, "--prompt_file", os.path.join(data_dir, "test_prompts.jsonl"),
               "--base", "demo/base", "--seed", "0", "--max_new_tokens", "6")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("### ") == 16 and proc.stdout.count("--- the base model") == 16


def test_experiment_end_to_end_tiny(tmp_path):
    """experiments/miniature.py with tiny settings: every fine-tune, grade and table."""
    args = ["--out_dir", str(tmp_path / "out"), "--results_dir", str(tmp_path / "res"), "--curated", "64",
            "--sizes", "64", "128", "--epochs", "2", "--samples", "2", "--epoch_samples", "1", "--items", "2",
            "--max_new_tokens", "24"]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "miniature.py"), *args],
                          capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / "res" / "miniature.md").read_text()
    for section in ("1. Knowledge from pretraining", "2. Quality over quantity", "3. Perplexity is not quality"):
        assert section in md
    with open(tmp_path / "res" / "miniature.json") as f:
        results = json.load(f)
    assert list(results["quality"]) == ["curated_64", "unfiltered_64", "unfiltered_128"]  # the tables' order
    assert set(results["perplexity"]) == {"1", "2"}
    assert results["knowledge"]["finetuned"]["prompts"] == 2 and results["knowledge"]["finetuned"]["answers"] == 4
    for block in results["quality"].values():
        lo, hi = block["helpfulness"]["ci"]
        assert 0 <= lo <= block["helpfulness"]["mean"] <= hi <= 2
    # run again: every fine-tune is reused (same config, same data), and every answer is the
    # same, whichever worker process made it (each answer samples from its own seed)
    again = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "miniature.py"), *args, "--workers", "1"],
                           capture_output=True, text=True, env=ENV, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "It reused 3 fine-tunes" in (tmp_path / "res" / "miniature.md").read_text()
    with open(tmp_path / "res" / "miniature.json") as f:
        second = json.load(f)
    for key in ("knowledge", "quality", "perplexity"):
        assert second[key] == results[key], key
    # the learning-rate sweep on the same prepared data
    sweep = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "miniature.py"), *args,
                            "--lr_sweep", "--sweep_lrs", "1e-4", "3e-4"], capture_output=True, text=True, env=ENV, timeout=600)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    table = (tmp_path / "res" / "lr_sweep.md").read_text()
    assert "| 0.0001 |" in table and "| 0.0003 |" in table
