"""Every script in examples/ runs end to end, small, so none rots."""

import os
import pathlib
import subprocess
import sys

import pytest

from conftest import BACKEND

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
ARGS = {"mirrored.py": ["--epochs", "1"]}
if BACKEND != "torch":
    ARGS["mirrored.py"] += ["--devices", "cpu:0,cpu:1"]


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_example_runs(name):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["KERAS_BACKEND"] = BACKEND
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *ARGS.get(name, [])],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "accuracy" in result.stdout
