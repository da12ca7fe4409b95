"""Every script in examples/ runs end to end, small, so none rots."""

import os
import pathlib
import subprocess
import sys

import pytest

from conftest import BACKEND

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
ARGS = {
    "mirrored.py": ["--epochs", "1"],
    "central_storage.py": ["--epochs", "1", "--devices", "cpu:0,cpu:1"],
    "multi_worker.py": ["--epochs", "1"],
    "parameter_server.py": ["--epochs", "3"],
}
# two replicas everywhere (on torch, Mirrored starts one process per device)
ARGS["mirrored.py"] += ["--devices", "cpu:0,cpu:1"]
# examples started the way their docstring says, through the launcher
LAUNCHER = {
    "multi_worker.py": ["-m", "keras_strategies.launch", "--nproc-per-node", "2"],
    # a chief, 2 workers and 1 parameter server
    "parameter_server.py": ["-m", "keras_strategies.launch", "--nproc-per-node", "4", "--num-ps", "1"],
}
# What each example prints on success here ("accuracy" unless listed): there
# is no TPU on the test machines, so tpu.py must say what it needs and exit 0.
EXPECTED = {
    "tpu.py": "This example needs a TPU, and cannot run here: TPU on the",
    "multi_worker.py": "[rank 1] worker 1/2: backend",
    "parameter_server.py": "[chief] chief: backend",
    "resume.py": "final weights equal the uninterrupted run",
}


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_example_runs(name):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["KERAS_BACKEND"] = BACKEND
    result = subprocess.run(
        [sys.executable, *LAUNCHER.get(name, []), str(EXAMPLES / name), *ARGS.get(name, [])],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert EXPECTED.get(name, "accuracy") in result.stdout, result.stdout[-2000:]
