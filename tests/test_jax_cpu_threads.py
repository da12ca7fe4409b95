"""JAX Mirrored on host (CPU) devices: XLA's CPU client gets the threads its
all-reduces need (`backends/jax/base.py`, `cpu_client_threads`).

With as many devices as client threads (2 virtual devices on a 2-core
machine, as on CI), a device's all-reduce could hold the thread the other
device's computation needed, and XLA aborted the whole process after 40 s:
"Termination timeout for all reduce ... Expected 2 threads to join the
rendezvous, but only 1 of them arrived on time" (7 of 8 processes running
three 200-step fits; on a machine with 4 or more cores the client already has
enough threads and nothing changes)."""

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import BACKEND

pytestmark = pytest.mark.skipif(BACKEND != "jax", reason="XLA's CPU client under the JAX backend")

FITS = 4
SCRIPT = textwrap.dedent(f"""
    import numpy as np
    import keras_strategies as ks
    strategy = ks.Mirrored(devices=["cpu:0", "cpu:1"])  # before JAX starts, as documented
    import keras
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200 * 256, 784), dtype=np.float32)
    y = rng.integers(0, 10, size=(200 * 256,))
    for i in range({FITS}):
        with strategy.scope():
            model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(256, activation="relu"),
                                      keras.layers.Dense(256, activation="relu"), keras.layers.Dense(10)])
            model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            model.fit(x, y, batch_size=256, epochs=1, verbose=0)
        print("fit done", i, flush=True)
""")


def test_long_fits_on_two_cpu_devices_end_instead_of_aborting_in_the_all_reduce():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PJRT_NPROC", "NPROC")}
    env["KERAS_BACKEND"] = "jax"
    try:
        done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                              timeout=240)
    except subprocess.TimeoutExpired as error:  # subprocess.run killed the child
        pytest.fail(f"the fits did not end within 240 s: {error.stdout!r}")
    tail = (done.stdout + done.stderr)[-2000:]
    assert "Termination timeout" not in tail, tail
    assert done.returncode == 0, tail
    assert done.stdout.count("fit done") == FITS, tail


@pytest.mark.in_process
def test_the_client_threads_asked_for(monkeypatch):
    from keras_strategies.backends.jax import base

    monkeypatch.delenv("PJRT_NPROC", raising=False)
    monkeypatch.delenv("NPROC", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})  # 2 cores
    assert base.cpu_client_threads(2) == 4
    assert base.cpu_client_threads(3) == 6
    assert base.cpu_client_threads(1) is None  # no all-reduce between devices
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert base.cpu_client_threads(2) is None  # 8 threads already
    assert base.cpu_client_threads(8) == 16
    monkeypatch.setenv("PJRT_NPROC", "3")
    assert base.cpu_client_threads(8) is None  # the user's choice stands
    monkeypatch.delenv("PJRT_NPROC")
    # JAX already started (here: by this test session) with too few threads: the user is told what to do, once
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(base, "_warned_threads", [])
    with pytest.warns(UserWarning, match="Mirrored on the jax backend: JAX started before.*PJRT_NPROC=4"):
        base.ensure_cpu_devices(2, "Mirrored")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        base.ensure_cpu_devices(2, "Mirrored")
