"""JAX strategies on host (CPU) devices: a fit's steps never run far ahead of
their results (`keras_fixes.bounded_steps`), so XLA's all-reduce cannot
abort the process.

XLA's CPU client admits 32 computations per device, and the launch of one
more waits for a slot on one of the client's own threads (as many as the
machine's cores: 2 on CI). Keras's JAX `fit` reads no step's result until the
epoch ends; once a device's queue was full, its next launch held a client
thread while the device's queued steps needed it, and the other device,
inside the all-reduce, waited for them: "Termination timeout for all reduce
... Expected 2 threads to join the rendezvous, but only 1 of them arrived on
time", and XLA aborted the whole process after 40 s (plain JAX too:
docs/upstream/jax-cpu-inflight-deadlock.md)."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import BACKEND

pytestmark = pytest.mark.skipif(BACKEND != "jax", reason="XLA's CPU client under the JAX backend")

FITS = 4
SCRIPT = textwrap.dedent(f"""
    import numpy as np
    import keras_strategies as ks
    strategies = {{"Mirrored": ks.Mirrored(devices=["cpu:0", "cpu:1"]),  # before JAX starts, as documented
                   "CentralStorage": ks.CentralStorage(devices=["cpu:0", "cpu:1"])}}
    import keras
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200 * 256, 784), dtype=np.float32)
    y = rng.integers(0, 10, size=(200 * 256,))
    for name, strategy in strategies.items():
        for i in range({FITS}):
            with strategy.scope():
                model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(256, activation="relu"),
                                          keras.layers.Dense(256, activation="relu"), keras.layers.Dense(10)])
                model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
                model.fit(x, y, batch_size=256, epochs=1, verbose=0)
            print("fit done", name, i, flush=True)
""")


def test_long_fits_on_two_cpu_devices_end_instead_of_aborting_in_the_all_reduce():
    # 200-step fits, XLA's CPU client with its own thread count (the machine's cores, 2 on CI)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PJRT_NPROC", "NPROC")}
    env["KERAS_BACKEND"] = "jax"
    try:
        done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                              timeout=300)
    except subprocess.TimeoutExpired as error:  # subprocess.run killed the child
        pytest.fail(f"the fits did not end within 300 s: {error.stdout!r}")
    tail = (done.stdout + done.stderr)[-2000:]
    assert "Termination timeout" not in tail, tail
    assert done.returncode == 0, tail
    assert done.stdout.count("fit done Mirrored") == FITS, tail
    assert done.stdout.count("fit done CentralStorage") == FITS, tail


@pytest.mark.in_process
def test_each_step_waits_for_the_one_depth_calls_earlier(monkeypatch):
    from keras_strategies.backends.jax import keras_fixes

    waited = []
    monkeypatch.setattr(keras_fixes.jax, "block_until_ready", waited.append)
    made = []

    def make_function(step_function, concatenate_outputs=False):
        made.append(concatenate_outputs)
        return step_function

    step = keras_fixes.bounded_steps(make_function, depth=2)(lambda state, data: (f"out{data}", state + 1),
                                                             concatenate_outputs=True)
    state = 0
    for data in range(5):
        outputs, state = step(state, data)
        assert outputs == f"out{data}"
    assert state == 5 and made == [True]
    assert waited == ["out0", "out1", "out2"]  # after calls 2, 3, 4: the one two calls earlier


@pytest.mark.in_process
def test_fit_on_two_cpu_devices_bounds_its_steps_and_leaves_the_model_as_it_was(replica_devices):
    import keras

    import keras_strategies as ks

    seen = {}

    class Look(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen["during"] = "_make_function" in self.model.__dict__

    x = np.zeros((64, 4), np.float32)
    y = np.zeros((64, 1), np.float32)
    for strategy, bounded in ((ks.Mirrored(devices=replica_devices), True), (ks.OneDevice("cpu:0"), False)):
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        model.compile("sgd", "mse")
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[Look()], distribution=strategy)
        assert seen.pop("during") is bounded, strategy
        assert "_make_function" not in model.__dict__
