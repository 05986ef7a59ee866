"""config.py: a dataclass becomes flags; defaults < preset < command line; typos are errors."""

from dataclasses import dataclass, field
from typing import Optional

import pytest

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
