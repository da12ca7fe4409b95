"""Run by tests/test_input_teardown.py::test_tensorflow_inputs_survive_dropped_iterators_under_load.

    python tests/iterator_teardown_job.py SECONDS endless|keras

Makes TensorFlow `Mirrored`'s input over two logical CPUs again and again,
takes a few batches from each and drops its iterator while TensorFlow's
multi-device iterator is still reading ahead, for SECONDS seconds:
`endless`, the endless datasets of `Mirrored` and `CentralStorage` in turn
(backends/tensorflow/one_iterator.py; the end of every `fit` on arrays);
`keras`, Keras's own dataset of arrays made under `Mirrored`'s run patches
and distributed as Keras's `fit` does (a `fit` with `steps_per_epoch`
shorter than the data). Prints `iterators N` at the end; a crash ends the process with a
signal instead.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras_strategies as ks  # noqa: E402  (before the backend starts)

seconds, kind = float(sys.argv[1]), sys.argv[2]
strategies = [ks.Mirrored(devices=["cpu:0", "cpu:1"]), ks.CentralStorage(devices=["cpu:0", "cpu:1"])]

import numpy as np  # noqa: E402

from keras.src.trainers.data_adapters.array_data_adapter import ArrayDataAdapter  # noqa: E402

from keras_strategies import patches  # noqa: E402
from keras_strategies.backends.tensorflow import one_iterator  # noqa: E402

x = np.arange(64 * 2, dtype="float32").reshape(64, 2)
y = np.arange(64)
start, made = time.time(), 0
while time.time() - start < seconds:
    implementation = strategies[made % 2 if kind == "endless" else 0]._impl
    native = implementation.native
    if kind == "endless":
        dataset, steps = one_iterator.endless_batches(x, y, None, 16, None, True, 0, 0, native)
    else:
        with patches.active(implementation.keras_patches):  # as in a fit under the strategy
            dataset = ArrayDataAdapter(np.concatenate([x] * 4), np.concatenate([y] * 4), batch_size=16,
                                       shuffle=True).get_tf_dataset()
        dataset, steps = native.experimental_distribute_dataset(dataset), 4  # 4 of its 16 batches
    for batch, _ in zip(dataset, range(steps)):  # zip takes a fifth batch, then drops the iterator
        assert len(native.experimental_local_results(batch[1])) == 2
    made += 1
print(f"iterators {made}", flush=True)
