"""One input iterator for all of a `fit`'s epochs on arrays (TensorFlow
Mirrored, CentralStorage and MultiWorkerMirrored).

Keras's `fit` makes a new iterator over its distributed dataset at every
epoch (under one `MirroredStrategy` of 2 CPUs, reading a step's input took
6-12 ms with 20-step epochs, against ~1 ms here). Under
`MultiWorkerMirroredStrategy` each costs ~0.1 s of CPU (a
multi-device iterator and the 7 functions it traces), often 0.2-1.5 s of wall
time with both workers waiting, and a finite dataset makes every step agree
across the workers on whether each still has data (`get_next_as_optional`).
TensorFlow's own custom-training-loop tutorial keeps one iterator for the run.

Here the arrays of a `fit` call become one endless `tf.data.Dataset` whose
epoch `e` holds exactly the batches Keras would make for it (in order, or in
`data.epoch_order(n, seed, e)` when shuffled, as `data.ShuffledShards` draws
it), and `steps_per_epoch` its number of batches: Keras then keeps one
iterator over it for the whole call. Validation arrays become one endless
dataset of their batches too, with `validation_steps` its number of batches;
Keras's `evaluate` drops its iterator at each validation (`EpochIterator.reset`),
which `keeping_whole_epochs_iterator` (patch "tf-one-validation-iterator")
keeps for these datasets alone.

The dataset is said to be endless (`assert_cardinality`): on one of unknown
cardinality TensorFlow's distributed iterator makes the workers agree at every
step on whether each has input left, an all-reduce across the processes that
took ~3 ms a step to read the benchmark CNN's input on 2 CPU workers, ~1 ms
without (benchmarks/input_pipeline.py). Given the strategy, each worker's
pipeline makes only its own replicas' parts of each global batch
(`distribute_datasets_from_function`, as TensorFlow's tutorial), where Keras's
way, global batches given to `experimental_distribute_dataset`, has every
worker gather every global batch to keep its share.
"""

import math

import numpy as np
import tensorflow as tf
from keras.src import tree
from keras.src.trainers.data_adapters import array_slicing
from keras.src.trainers.data_adapters.array_data_adapter import ArrayDataAdapter

from keras_strategies.devices import usable_cores
from keras_strategies.implementation import data as data_lib


WHOLE_EPOCHS = "_keras_strategies_whole_epochs"  # marks the datasets made here


def _plain_arrays(*structures):
    leaves = [leaf for part in structures for leaf in tree.flatten(part) if leaf is not None]
    return bool(leaves) and all(isinstance(leaf, np.ndarray) and leaf.dtype != object for leaf in leaves)


def _whole_executions(model, batches):
    return batches % max(1, int(getattr(model, "steps_per_execution", 1) or 1)) == 0


def applies(model, arguments):
    """Whether this `fit` call's input can become one endless dataset with
    the same batches: arrays, no `steps_per_epoch` of the user's, a shuffle
    of the whole input or none, an execution size that divides the epoch, and
    no `BackupAndRestore` when shuffled (it sets each epoch's order itself)."""
    import keras

    a = arguments.arguments
    if a.get("steps_per_epoch") is not None or not data_lib.is_array_like(a.get("x")):
        return False
    if a.get("shuffle", True) not in (True, False):  # "batch": Keras's own
        return False
    shuffle = a.get("shuffle", True)
    if shuffle and any(isinstance(c, keras.callbacks.BackupAndRestore) for c in a.get("callbacks") or ()):
        return False  # a resumed run's epochs keep their orders through ShuffledShards.set_epoch
    if not _plain_arrays(a.get("x"), a.get("y"), a.get("sample_weight")):
        return False
    return _whole_executions(model, math.ceil(data_lib.num_examples(a.get("x")) / (a.get("batch_size") or 32)))


def validation_applies(model, arguments):
    """Whether this `fit` call's validation data can become one endless
    dataset: a tuple of arrays, no `validation_steps` of the user's, an
    execution size that divides its batches."""
    a = arguments.arguments
    data = a.get("validation_data")
    if a.get("validation_steps") is not None or not isinstance(data, (tuple, list)) or len(data) not in (2, 3):
        return False
    if not _plain_arrays(*data):
        return False
    batch = a.get("validation_batch_size") or a.get("batch_size") or 32
    return _whole_executions(model, math.ceil(data_lib.num_examples(data[0]) / batch))


def replica_part(indices, replica, replicas):
    """Replica `replica`'s part of a global batch's `indices`, the chunk
    `data.chunk_bounds` gives a worker on the other backends. Any split trains
    the same: each replica's loss is weighted by its share of the global batch
    (`keras_fixes.share_weighted_train_step`)."""
    size = tf.shape(indices, out_type=tf.int64)[0]
    return indices[size * replica // replicas:size * (replica + 1) // replicas]


def endless_batches(x, y, sample_weight, batch_size, class_weight, shuffle, seed, first_epoch, strategy=None):
    """Every epoch's batches from `first_epoch` on, as one endless dataset.

    Args:
        x, y, sample_weight, class_weight: as given to `fit` (numpy arrays).
        batch_size: the global batch size.
        shuffle: whether each epoch draws its own order.
        seed: the shuffle seed, the same on every worker.
        first_epoch: the epoch the dataset starts with (`initial_epoch`).
        strategy: a `tf.distribute` strategy: the dataset is then distributed
            over its replicas, each worker making its own replicas' parts of
            every global batch; None: a dataset of the global batches.

    Returns:
        `(dataset, batches_per_epoch)`.

    Example:

    >>> dataset, steps = endless_batches(x, y, None, 256, None, True, 0, 0, strategy)
    >>> model.fit(dataset, epochs=3, steps_per_epoch=steps)
    """
    # Keras's own conversion: class weights as sample weights, floats as floatx
    adapter = ArrayDataAdapter(x, y, sample_weight, batch_size=batch_size, class_weight=class_weight)
    n, size = adapter._num_samples, adapter._batch_size
    full = n // size
    with tf.device("/cpu:0"):
        inputs = tree.lists_to_tuples(array_slicing.convert_to_sliceable(adapter._inputs, target_backend="tensorflow"))

    def order(epoch):
        return data_lib.epoch_order(n, seed, epoch).astype(np.int64)

    def indices(epoch):
        if shuffle:
            return tf.numpy_function(order, [epoch], tf.int64, stateful=False)
        return tf.range(n, dtype=tf.int64)

    def batches(epoch_indices):
        epoch_indices = tf.reshape(epoch_indices, [n])
        flat = tf.data.Dataset.from_tensor_slices(tf.reshape(epoch_indices[:full * size], [full, size]))
        if n % size:
            flat = flat.concatenate(tf.data.Dataset.from_tensors(epoch_indices[full * size:]))
        return flat

    def grab(i, data):
        return tree.map_structure(lambda t: tf.gather(t, i, axis=0), data)

    def pipeline(replicas=1, own=(0,)):  # the batches of replicas `own` (of `replicas`), in turn
        global_batches = tf.data.Dataset.counter(first_epoch).map(indices).prefetch(1).flat_map(batches)
        if replicas == 1:
            parts = global_batches
        else:
            parts = global_batches.flat_map(lambda b: tf.data.Dataset.from_tensor_slices(
                tf.constant(own, tf.int64)).map(lambda r: replica_part(b, r, replicas)))
        dataset = tf.data.Dataset.zip((parts, tf.data.Dataset.from_tensors(inputs).repeat()))
        dataset = dataset.map(grab, num_parallel_calls=tf.data.AUTOTUNE)
        # endless, said so: TensorFlow's distributed iterators make every worker agree at each step on whether
        # each still has data (an all-reduce a step across processes) unless the dataset is known to be infinite
        dataset = dataset.apply(tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY))
        options = dataset_options()  # TensorFlow's default graph rewrites stay on: see `with_default_rewrites`
        options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)

    if strategy is None:
        dataset = pipeline()
    else:
        def worker_pipeline(context):  # a worker's local replicas take its batches in turn
            local = context.num_replicas_in_sync // context.num_input_pipelines
            first = context.input_pipeline_id * local
            return pipeline(context.num_replicas_in_sync, tuple(range(first, first + local)))

        dataset = strategy.distribute_datasets_from_function(worker_pipeline)
    setattr(dataset, WHOLE_EPOCHS, True)
    return dataset, adapter._size


def one_iterator_fit(model, method, arguments, seed, strategy=None):
    """Rewrites a `fit` call on arrays to one endless dataset and its
    `steps_per_epoch` (see the module's docstring); leaves any other call as
    it is.

    Args:
        model: the compiled Keras model.
        method: `"fit"`, `"evaluate"` or `"predict"`.
        arguments: the call's `inspect.BoundArguments` (changed in place).
        seed: the shuffle seed, the same on every worker.
        strategy: the `tf.distribute` strategy the datasets are distributed
            over (see `endless_batches`); None: datasets of global batches.

    Returns:
        Whether the call's training input was rewritten (its validation
        arrays may be, either way).
    """
    if method != "fit":
        return False
    data_lib.split_validation(arguments)
    a = arguments.arguments
    if validation_applies(model, arguments):
        data = a["validation_data"]
        a["validation_data"], a["validation_steps"] = endless_batches(
            *data, *([None] * (3 - len(data))), a.get("validation_batch_size") or a.get("batch_size") or 32,
            None, False, seed, 0, strategy)
        a["validation_batch_size"] = None
    if not applies(model, arguments):
        return False
    dataset, steps = endless_batches(
        a.get("x"), a.get("y"), a.get("sample_weight"), a.get("batch_size") or 32, a.get("class_weight"),
        bool(a.get("shuffle", True)), seed, a.get("initial_epoch", 0) or 0, strategy)
    a["x"], a["steps_per_epoch"] = dataset, steps
    a["y"] = a["sample_weight"] = a["batch_size"] = a["class_weight"] = None
    a["shuffle"] = False
    return True


def keeping_whole_epochs_iterator(original):
    """`EpochIterator.reset` that keeps the iterator of a dataset made here
    (each run takes whole epochs of it, so the next starts where an epoch
    does): `evaluate` resets its epoch iterator at every validation of a
    `fit`, which under `MultiWorkerMirroredStrategy` made a new distributed
    iterator each epoch."""

    def reset(self):
        dataset = getattr(getattr(self, "data_adapter", None), "_dataset", None)
        kept = self._current_iterator if getattr(dataset, WHOLE_EPOCHS, False) else None
        original(self)
        if kept is not None:
            self._current_iterator = kept

    return reset


def one_core():
    """Whether this process may run on one CPU core only (its affinity: `taskset -c 3`, a Slurm task bound
    to one CPU, a Kubernetes container given one exclusive core)."""
    return usable_cores() == 1


def dataset_options():
    """The `tf.data.Options` of the datasets this package makes or lets Keras make: tf.data's autotuning is
    off in a process bound to one core (`one_core`).

    TensorFlow 2.21 there: dropping an iterator whose pipeline autotunes waits, idle, for a time that grows
    with the iterator's life (0.12 s after 0.23 s, 0.6 s after 0.75 s, 2.5 s after 3.5 s; the autotuner's
    period doubles from 10 ms as an iterator lives, which fits), so every `fit` epoch, `evaluate` and
    `predict` ended in such a wait: a Keras `predict` of 65 536 rows took 1.37 s, 0.61 s of it after its last
    batch, against 0.72 s with autotuning off (docs/upstream/tf-autotune-one-core-wait.md). On two cores,
    none. With one core autotuning has no parallelism to tune, and prefetching still runs. Every other
    process keeps it.
    """
    options = tf.data.Options()
    if one_core():
        options.autotune.enabled = False
    return options


def with_default_rewrites(original):
    """`ArrayDataAdapter.get_tf_dataset` whose dataset keeps TensorFlow's
    default graph rewrites, as the endless datasets made here do (patch
    "tf-dataset-rewrites").

    Keras turns them off for arrays (`apply_default_optimizations = False`,
    to save the rewrite's few milliseconds per iterator). With them off,
    dropping a distributed iterator while TensorFlow's multi-device iterator
    still read ahead (a `fit` with `steps_per_epoch` shorter than the data,
    the end of every `fit` on the endless datasets) crashed the process with
    a segmentation fault on a busy machine (TensorFlow 2.21, 2 CPU replicas:
    the core's backtrace in that iterator's background thread). In
    tests/test_input_teardown.py's runs (a job per input beside busy
    processes), with the rewrites off: every run red, each input's job
    crashed in 5 of 6 runs; with them on, none crashed. They cost
    ~6 ms per iterator (126 against 133 ms to make one and read its first
    batch, the benchmark CNN's input). In a process bound to one core the
    dataset's autotuning is off too (`dataset_options`).
    """

    def get_tf_dataset(self):
        dataset = original(self)
        options = dataset_options()
        options.experimental_optimization.apply_default_optimizations = True
        return dataset.with_options(options)

    return get_tf_dataset
