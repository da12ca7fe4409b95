"""Host memory kept mapped between training steps on the CPU
(`keras_strategies/implementation/host_memory.py`): set when
`keras_strategies` is imported on JAX and PyTorch CPU installs, never on
TensorFlow unless asked, and undone by `KERAS_STRATEGIES_KEEP_HOST_MEMORY=0`.
"""

import json
import os
import subprocess
import sys

import keras
import pytest

from keras_strategies import loader
from keras_strategies.errors import StrategyError
from keras_strategies.implementation import host_memory

BACKEND = keras.backend.backend()
HERE = os.path.dirname(os.path.abspath(__file__))


def run_job(value=None, steps=8):
    env = {k: v for k, v in os.environ.items() if k != host_memory.VARIABLE}
    if value is not None:
        env[host_memory.VARIABLE] = value
    result = subprocess.run([sys.executable, os.path.join(HERE, "host_memory_job.py"), str(steps)],
                            capture_output=True, text=True, timeout=300, env=dict(env, KERAS_BACKEND=BACKEND))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["loss_finite"], report
    return report


@pytest.mark.skipif(BACKEND == "tensorflow", reason="TensorFlow keeps its host memory itself (11 faults a step): "
                    "nothing is set, test_tensorflow_is_left_alone_unless_asked checks that")
def test_each_step_no_longer_faults_its_memory_in_again():
    """Each step of the CNN at batch 256 took 2 700-5 400 (PyTorch) or 28 000
    (JAX) page faults with glibc's defaults (the median step); kept mapped, 0."""
    kept = run_job()
    released = run_job("0")
    assert kept["kept"] and "CPU" in kept["reason"], kept
    assert not released["kept"] and host_memory.VARIABLE in released["reason"], released
    assert released["faults_per_step"] > 1000, released  # the cost this removes is there without it
    assert kept["faults_per_step"] < 100, (kept, released)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="the other backends keep it by default (test above)")
def test_tensorflow_is_left_alone_unless_asked():
    left = run_job(steps=2)
    asked = run_job("1", steps=2)
    assert not left["kept"] and "keeps its host memory itself" in left["reason"], left
    assert asked["kept"] and host_memory.VARIABLE in asked["reason"], asked


@pytest.mark.in_process
def test_this_process_kept_it_as_the_backend_says():
    """The suite's own processes: imported by conftest.py before any engine ran."""
    state = host_memory.state()
    if os.environ.get(host_memory.VARIABLE):
        pytest.skip(f"{host_memory.VARIABLE} is set in this environment: {state}")
    expected = BACKEND != "tensorflow" and not loader.local_accelerators()
    assert state["kept"] is expected, state


@pytest.mark.in_process
def test_a_wrong_value_is_a_clear_error():
    with pytest.raises(StrategyError, match=r"KERAS_STRATEGIES_KEEP_HOST_MEMORY='maybe': use 1 .* 0 .* unset"):
        host_memory.requested({host_memory.VARIABLE: "maybe"})
    with pytest.raises(StrategyError, match="KERAS_STRATEGIES_KEEP_HOST_MEMORY"):
        host_memory.keep(lambda: True, environ={host_memory.VARIABLE: "2"})
    assert host_memory.requested({}) is None and host_memory.requested({host_memory.VARIABLE: " On "}) is True
