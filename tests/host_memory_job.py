"""One process: import keras_strategies first (as documented), train a small
CNN on the CPU at batch 256, and print what host_memory did and the page
faults of each step (tests/test_host_memory.py)."""

import json
import resource
import statistics
import sys
import time

import keras_strategies as ks  # noqa: I001  (first: before the engine's threads allocate)
from keras_strategies.implementation import host_memory

import keras
import numpy as np

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 8
batch = 256
rng = np.random.default_rng(0)
x = rng.random((steps * batch, 28, 28, 1), dtype=np.float32)
y = rng.integers(0, 10, steps * batch)
keras.utils.set_random_seed(0)
model = keras.Sequential([
    keras.Input((28, 28, 1)),
    keras.layers.Conv2D(16, 3, activation="relu"),
    keras.layers.MaxPooling2D(),
    keras.layers.Conv2D(32, 3, activation="relu"),
    keras.layers.MaxPooling2D(),
    keras.layers.Flatten(),
    keras.layers.Dense(10),
])
model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
strategy = ks.OneDevice("cpu:0")


class Faults(keras.callbacks.Callback):
    """The page faults and seconds between one step's end and the next's."""

    def __init__(self):
        super().__init__()
        self.marks = []

    def on_train_batch_end(self, batch, logs=None):
        self.marks.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()))


model.fit(x, y, batch_size=batch, epochs=1, verbose=0, distribution=strategy)  # tracing, compiling
faults = Faults()
model.fit(x, y, batch_size=batch, epochs=1, verbose=0, distribution=strategy, callbacks=[faults])
steps_seen = list(zip(faults.marks, faults.marks[1:]))
# the median step: a one-off (the heap growing to a new peak once) is not a step's own cost
faults_per_step = statistics.median(b[0] - a[0] for a, b in steps_seen)
ms_per_step = 1e3 * statistics.median(b[1] - a[1] for a, b in steps_seen)
print(json.dumps(dict(host_memory.state(), faults_per_step=faults_per_step, ms_per_step=ms_per_step,
                      loss_finite=bool(np.isfinite(model.evaluate(x[:batch], y[:batch], verbose=0))))))
