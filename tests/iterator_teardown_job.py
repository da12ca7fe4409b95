"""Run by tests/test_input_teardown.py::test_tensorflow_endless_input_survives_dropped_iterators_under_load.

    python tests/iterator_teardown_job.py SECONDS

Makes the endless input of TensorFlow `Mirrored` and `CentralStorage`
(backends/tensorflow/one_iterator.py) over two logical CPUs again and again,
takes a few batches from each and drops its iterator while TensorFlow's
multi-device iterator is still reading ahead, as the end of every `fit` on
arrays does, for SECONDS seconds. Prints `iterators N` at the end; a crash
ends the process with a signal instead.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras_strategies as ks  # noqa: E402  (before the backend starts)

seconds = float(sys.argv[1])
strategies = [ks.Mirrored(devices=["cpu:0", "cpu:1"]), ks.CentralStorage(devices=["cpu:0", "cpu:1"])]

import numpy as np  # noqa: E402

from keras_strategies.backends.tensorflow import one_iterator  # noqa: E402

x = np.arange(64 * 2, dtype="float32").reshape(64, 2)
y = np.arange(64)
start, made = time.time(), 0
while time.time() - start < seconds:
    native = strategies[made % 2]._impl.native
    dataset, steps = one_iterator.endless_batches(x, y, None, 16, None, True, 0, 0, native)
    for batch, _ in zip(dataset, range(steps)):  # zip takes a fifth batch, then drops the iterator
        assert len(native.experimental_local_results(batch[1])) == 2
    made += 1
print(f"iterators {made}", flush=True)
