"""The README opens with exactly two commands, and CI runs the second one verbatim."""

import os
import re

from tests.conftest import ROOT


def test_readme_opens_with_two_commands_and_ci_runs_the_test_one():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    first_block = re.search(r"```\n(.*?)```", readme, re.S).group(1)
    lines = first_block.strip().splitlines()
    assert len(lines) == 2
    demo, tests = lines
    assert "prepare_data.py --demo" in demo and "train.py --preset demo" in demo and "sample.py" in demo
    # the demo fine-tunes the shipped base and prints each answer above the base's continuation
    import train
    assert train.PRESETS["demo"]["init_from"] == "demo/base" and "--base demo/base" in demo
    assert os.path.isfile(os.path.join(ROOT, "demo", "base", "config.json"))
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert tests in f.read().splitlines()
