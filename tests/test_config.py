"""config.py: a dataclass becomes flags; defaults < preset < command line; typos are errors."""

from dataclasses import dataclass, field
from typing import Optional

import pytest

import config
from config import parse_config


@dataclass
class Cfg:
    lr: float = field(default=1e-5, metadata={"help": "LIMA §3, 100% linear"})
    epochs: int = 15
    resume: bool = False
    cap: Optional[int] = None
    save: list[int] = field(default_factory=lambda: [5, 6])
    name: str = "x"


PRESETS = {"small": {"epochs": 3, "name": "s"}}


def test_defaults_preset_then_flags():
    assert parse_config(Cfg, [], PRESETS) == Cfg()
    assert parse_config(Cfg, ["--preset", "small"], PRESETS) == Cfg(epochs=3, name="s")
    cfg = parse_config(Cfg, ["--preset", "small", "--epochs", "7", "--lr", "2e-5", "--resume",
                             "--cap", "4", "--save", "1", "2", "3"], PRESETS)
    assert cfg == Cfg(lr=2e-5, epochs=7, resume=True, cap=4, save=[1, 2, 3], name="s")
    assert parse_config(Cfg, ["--cap", "none", "--no-resume"]).cap is None


def test_typos_and_bad_values_are_errors(capsys):
    for argv in (["--epoch", "3"], ["--epochs", "three"], ["--preset", "huge"]):
        with pytest.raises(SystemExit):
            parse_config(Cfg, argv, PRESETS)


def test_help_lists_defaults_and_survives_percent(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(Cfg, ["-h"], PRESETS)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--lr" in out and "100% linear" in out and "(default: 1e-05)" in out


@dataclass
class Ranged:
    top_p: float = field(default=0.9, metadata={"gt": 0, "max": 1})
    batch_size: int = field(default=16, metadata={"min": 1})
    cap: Optional[int] = field(default=None, metadata={"min": 1})
    epochs: int = field(default=15, metadata={"min": 1})
    lr: float = field(default=1e-5, metadata={"min": 0})
    min_lr: float = field(default=1e-6, metadata={"min": 0, "max": "lr"})
    save: list[int] = field(default_factory=lambda: [5], metadata={"min": 1, "max": "epochs"})
    dtype: str = field(default="auto", metadata={"choices": ("auto", "float32", "bfloat16")})
    kind: Optional[str] = field(default=None, metadata={"choices": ["a", "b"]})


@pytest.mark.parametrize("argv, message", [
    (["--top_p", "0"], "--top_p 0.0: must be greater than 0 and at most 1"),
    (["--top_p", "1.5"], "--top_p 1.5: must be greater than 0 and at most 1"),
    (["--batch_size", "0"], "--batch_size 0: must be at least 1"),
    (["--cap", "-5"], "--cap -5: must be at least 1"),
    (["--epochs", "0"], "--epochs 0: must be at least 1"),
    (["--lr", "-1"], "--lr -1.0: must be at least 0"),
    (["--lr", "nan"], "--lr nan: must be a finite number"),
    (["--min_lr", "1e-4"], "--min_lr 0.0001: must be at least 0 and at most --lr (1e-05)"),
    (["--save", "3", "16"], "--save 16: must be at least 1 and at most --epochs (15)"),
    (["--save", "0"], "--save 0: must be at least 1"),
    (["--dtype", "fp16"], "--dtype 'fp16': must be one of auto, float32, bfloat16"),
    (["--kind", "c"], "--kind 'c': must be one of a, b"),
    (["--preset", "bad"], "--epochs 0: must be at least 1"),  # a preset's values are checked too
])
def test_out_of_range_values_are_one_message_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(Ranged, argv, {"bad": {"epochs": 0, "save": [1]}})
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_in_range_values_and_unset_optionals_pass(capsys):
    cfg = parse_config(Ranged, ["--top_p", "1", "--batch_size", "1", "--cap", "none", "--epochs", "1",
                                "--save", "1", "--min_lr", "1e-5", "--kind", "none", "--dtype", "bfloat16"])
    assert cfg == Ranged(top_p=1.0, batch_size=1, cap=None, epochs=1, save=[1], min_lr=1e-5, dtype="bfloat16")
    assert parse_config(Ranged, ["--kind", "b"]).kind == "b"
    with pytest.raises(SystemExit):
        parse_config(Ranged, ["-h"])
    assert "greater than 0 and at most 1" in capsys.readouterr().out  # the range is in -h


def test_check_ranges_for_configs_built_in_code():
    from config import check_ranges
    check_ranges(Ranged())
    with pytest.raises(ValueError, match="--epochs 0: must be at least 1"):
        check_ranges(Ranged(epochs=0, save=[]))


def test_resolve_device_names_a_bad_device():
    from config import resolve_device
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="device 'nope': not a device"):
        resolve_device("nope")


def test_cpu_threads_one_for_a_narrow_model_the_cores_for_a_wide_one(monkeypatch):
    import os

    import torch
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    try:
        assert config.set_cpu_threads(128, "cpu") == 1  # the demo's width: every op is tiny
        assert config.set_cpu_threads(4096, "cpu") == 3  # the cores this process may use
        torch.set_num_threads(2)
        assert config.set_cpu_threads(128, "cuda:0") == 2  # a GPU run keeps torch's default
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert config.set_cpu_threads(128, "cpu") == 2  # the user's choice wins
    finally:
        torch.set_num_threads(before)
