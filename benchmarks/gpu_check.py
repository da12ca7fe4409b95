"""One-GPU check: the strategies that run on one GPU train there, equal to
plain Keras on the same GPU, and the torch fused Adam path runs on CUDA.

    KERAS_BACKEND=torch python benchmarks/gpu_check.py
    KERAS_BACKEND=jax python benchmarks/gpu_check.py

Prints one line per check and a throughput comparison (A = fit(distribution=),
B = plain Keras fit) for the benchmark MLP; exits non-zero on a mismatch.
Needs a machine with one GPU; with several, MultiWorkerMirrored is the test
suite's multi-process case with NCCL instead of gloo.
"""

import os
import sys
import time

import numpy as np

import keras_strategies as ks  # before the backend starts

import keras  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workloads import build_keras, make_data, set_seed  # noqa: E402

BACKEND = keras.backend.backend()
x, y = make_data("mlp", 256 * 40)


class EpochTimes(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.begin = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        float(keras.ops.convert_to_numpy(logs["loss"]))  # wait for the device
        self.times.append(time.perf_counter() - self.begin)


def train(distribution, epochs=6):
    """Steady state: samples/s over epochs 2..N (epoch 1 compiles)."""
    set_seed(0)
    model = build_keras("mlp")
    model.compile(keras.optimizers.Adam(1e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    kwargs = {"distribution": distribution} if distribution is not None else {}
    timer = EpochTimes()
    timer.times = []
    model.fit(x, y, batch_size=256, epochs=epochs, shuffle=False, verbose=0, callbacks=[timer],
              **kwargs)
    return model, len(x) / float(np.median(timer.times[1:]))


def placement(model):
    value = model.trainable_variables[0].value
    if BACKEND == "jax":
        return sorted(str(d) for d in value.devices())
    return str(value.device)


failures = 0
reference, plain = train(None)
print(f"{BACKEND}: plain Keras fit on {placement(reference)}: {plain:.0f} samples/s")
for strategy in (ks.Default(), ks.OneDevice("gpu:0"), ks.Mirrored()):
    model, rate = train(strategy)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(model.get_weights(), reference.get_weights()))
    where = str(placement(model)).lower()
    ok = diff < 1e-4 and ("gpu" in where or "cuda" in where)
    failures += not ok
    print(f"{BACKEND}: {strategy!r}: on {placement(model)}, max weight diff vs plain {diff:.2e}, "
          f"{rate:.0f} samples/s (A/B {rate / plain:.2f}) {'ok' if ok else 'MISMATCH'}")
sys.exit(1 if failures else 0)
