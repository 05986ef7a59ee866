"""benchmarks/gpu.py, the one command a GPU session runs, proven on a CPU before any GPU is at
hand: --smoke runs every part end to end (tiny shapes, the Triton kernels under the
interpreter), and a part that fails or runs past its budget is reported while the next runs."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import gpu  # noqa: E402

PARTS = ["correctness", "kernels", "training", "decoding"]


def test_gpu_budgets_fit_seven_minutes():
    assert set(gpu.BUDGETS) == set(PARTS)
    assert sum(gpu.BUDGETS.values()) <= 7 * 60


def test_smoke_runs_every_part(tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.run([sys.executable, "benchmarks/gpu.py", "--smoke", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert f"at most {sum(gpu.SMOKE_BUDGETS.values())} s" in proc.stdout.splitlines()[0]
    assert sorted(os.listdir(out)) == sorted([f"{p}.log" for p in PARTS] + ["results.json", "results.md"])
    rows = json.loads((out / "results.json").read_text())["rows"]
    errors = [r for r in rows if r["value"] == "error" or r["met"] is False]
    assert not errors, errors
    names = {(r["part"], r["name"]) for r in rows}
    for part in PARTS:
        assert (part, "part finished within its budget") in names
    expected = ["model packed fwd+bwd, float32", "3 train steps (fp32)", "kernel tests, CUDA cases",
                "ceiling: bf16 matmul", "attention forward, head dim 128", "attention backward vs SDPA",
                "packed forward vs padded", "RMSNorm backward", "tune dq, B", "tune rmsnorm bwd, M",
                "train packed, float32: MFU", "train packed, activation checkpointing, float32: tokens/s",
                "train packed, micro-batches of 4x", "train profile", "--cpu_offload",
                "decode batch 1, eager", "decode batch 1, --compile",
                "8 prompts: generate vs transformers generate"]
    for prefix in expected:
        assert any(name.startswith(prefix) for _, name in names), prefix
    # the numbers are meaningless on a CPU: nothing is judged against a GPU target
    assert all(r["met"] is None for r in rows if r["name"] != "part finished within its budget")
    md = (out / "results.md").read_text()
    assert "SMOKE RUN" in md and "command: `python benchmarks/gpu.py --smoke" in md
    assert "| triton |" in md and "| tune fwd |" in md  # the kernel bench's own tables are kept
    assert proc.stdout.rstrip().endswith(md.split("## Summary\n\n")[1].split("\n\n## ")[0].rstrip())


def test_a_part_past_its_budget_is_reported_and_the_next_still_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(gpu.SMOKE_BUDGETS, "decoding", 2)  # killed while still importing torch's compile stack
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    status = gpu.main(["--smoke", "--parts", "decoding,training", "--out", str(tmp_path)])
    assert status == 1
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    finished = {r["part"]: r for r in rows if r["name"] == "part finished within its budget"}
    assert finished["decoding"]["met"] is False and "timeout" in finished["decoding"]["note"]
    assert finished["training"]["met"] is True
    assert any(r["part"] == "training" and "tokens/s" in r["name"] for r in rows)


def test_unknown_part_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="unknown"):
        gpu.main(["--smoke", "--parts", "kernel", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="PART=SECONDS"):
        gpu.main(["--smoke", "--budget", "kernels:30", "--out", str(tmp_path)])


def test_a_rerun_of_some_checks(tmp_path, monkeypatch):
    # what a second GPU call does: only the checks that need it, with budgets of its own
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    status = gpu.main(["--smoke", "--parts", "training", "--checks", "activation checkpointing",
                       "--budget", "training=100", "--out", str(tmp_path)])
    assert status == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    names = [r["name"] for r in rows]
    assert any("activation checkpointing" in n for n in names)
    assert not any("micro-batches" in n or "profile" in n for n in names)
    assert "<= 100 s" in rows[-1]["target"]
