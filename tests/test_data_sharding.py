"""How input is split between workers (backend-neutral, no processes)."""

import numpy as np
import pytest

import keras_strategies as ks
from conftest import BACKEND
from keras_strategies.implementation import data

pytestmark = pytest.mark.in_process  # one process only: may run beside another backend's (tests/run_all.py)


def test_chunks_make_up_the_global_batch_in_rank_order():
    for world in (1, 2, 3, 4):
        for size in range(world, 40):
            bounds = [data.chunk_bounds(size, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == size
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))


def test_each_example_once_per_epoch_in_order_and_same_step_count():
    n, batch, world = 69, 16, 2
    x = np.arange(n, dtype="float32")[:, None]
    shards = [data.shard_input(x, np.arange(n), None, batch, False, r, world, "MultiWorkerMirrored(...)")[0]
              for r in range(world)]
    assert len(shards[0]) == len(shards[1]) == 5
    batches = [[s[i] for i in range(len(s))] for s in shards]
    # step i of every worker makes up global batch i, in rank order
    seen = [int(v) for i in range(5) for r in range(world) for v in batches[r][i][1]]
    assert seen == list(range(n))
    assert all(np.array_equal(b[0][:, 0], b[1]) for part in batches for b in part)


def test_an_unshuffled_share_is_views_of_the_input_not_a_copy():
    """A worker's share of in-memory arrays was copied whole before each fit
    (peak memory 1.11x the hand-written DDP loop's on 2 processes)."""
    x = np.random.default_rng(0).random((64, 3), dtype="float32")
    y = np.arange(64)
    weights = np.ones(64, "float32")
    shard, *_ = data.shard_input(x, y, weights, 16, False, 1, 2, "MultiWorkerMirrored(...)")
    bx, by, bw = shard[2]
    np.testing.assert_array_equal(bx, x[40:48])
    assert np.shares_memory(bx, x) and np.shares_memory(by, y) and np.shares_memory(bw, weights)


@pytest.mark.skipif(BACKEND != "torch", reason="the torch backend's batch conversion (backends/torch/base.py)")
def test_torch_batches_share_the_input_and_keep_the_dtype_keras_gives_them():
    """Keras's torch convert_to_tensor copied every numpy batch (np.array)
    before torch saw it; a tensor sharing the input's memory passes through."""
    import torch
    from keras.src.backend.torch.core import convert_to_tensor

    from keras_strategies.backends.torch.base import host_tensor

    x = np.random.default_rng(0).random((64, 3), dtype="float32")
    y = np.arange(64, dtype="int32")
    shard, *_ = data.shard_input(x, y, None, 16, False, 1, 2, "MultiWorkerMirrored(...)", convert=host_tensor)
    bx, by = shard[2]
    assert isinstance(bx, torch.Tensor) and isinstance(by, torch.Tensor)
    for batch, source in ((bx, x), (by, y)):
        converted = convert_to_tensor(batch)
        assert np.shares_memory(converted.numpy(), source)
        assert converted.dtype == convert_to_tensor(np.array(source[:1])).dtype
    np.testing.assert_array_equal(bx.numpy(), x[40:48])
    read_only = x.copy()
    read_only.flags.writeable = False
    for kept in (read_only, x[::-1], x.astype("uint32")):  # Keras converts these itself
        assert host_tensor(kept) is kept


def test_global_shuffle_changes_every_epoch_and_covers_everything():
    x = np.arange(69, dtype="float32")[:, None]
    y = np.arange(69)
    shards = [data.ShuffledShards(x, y, None, 16, r, 2, seed=7) for r in range(2)]

    def epoch():
        seen = [int(v) for s in shards for i in range(len(s)) for v in s[i][1]]
        for s in shards:
            s.on_epoch_end()
        return seen

    first, second = epoch(), epoch()
    assert sorted(first) == sorted(second) == list(range(69))
    assert first != second


def test_each_shuffled_fit_draws_a_new_seed_the_chiefs_on_every_worker():
    """data.fit_seed: a fit that shuffles arrays draws a new seed from
    numpy's generator (the same again after `keras.utils.set_random_seed`),
    the chief's sent to every worker; other calls draw nothing."""
    import inspect

    import keras

    x = np.zeros((8, 2), "float32")

    def call(**arguments):
        return inspect.signature(lambda x=None, y=None, shuffle=True: None).bind(**{"x": x, **arguments})

    keras.utils.set_random_seed(5)
    first = [data.fit_seed("fit", call()) for _ in range(3)]
    assert len(set(first)) == 3 and all(s >= 0 for s in first)
    keras.utils.set_random_seed(5)
    state = np.random.get_state()[1].copy(), np.random.get_state()[2]
    for method, arguments in (("fit", call(shuffle=False)), ("fit", call(shuffle="batch")), ("evaluate", call()),
                              ("fit", call(x=iter([x])))):
        assert data.fit_seed(method, arguments) == data.shuffle_seed() == 5
    assert np.array_equal(np.random.get_state()[1], state[0]) and np.random.get_state()[2] == state[1]
    assert [data.fit_seed("fit", call()) for _ in range(3)] == first
    sent = []

    def chiefs(payload):  # a worker's broadcast: it sends its own draw, gets the chief's
        sent.append(int.from_bytes(payload, "little"))
        return (12345).to_bytes(8, "little")

    keras.utils.set_random_seed(5)
    assert data.fit_seed("fit", call(), chiefs) == 12345 and sent == first[:1]


def test_a_strategy_that_leaves_shuffling_to_keras_shuffles_as_plain_keras():
    """`Default()` and `OneDevice()` leave a shuffled fit's orders to Keras:
    after the same `keras.utils.set_random_seed`, two shuffled fits end with
    plain Keras's weights exactly (a seed of ours drawn from numpy's
    generator for every call would shift Keras's permutations on JAX and
    PyTorch, which draw from it)."""
    import keras

    x = np.random.default_rng(0).normal(size=(48, 3)).astype("float32")
    y = x @ np.array([[1.0], [-2.0], [0.5]], "float32")

    def trained(**distribution):
        keras.utils.set_random_seed(11)
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, kernel_initializer="zeros")])
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        for _ in range(2):
            model.fit(x, y, batch_size=8, epochs=2, shuffle=True, verbose=0, **distribution)
        return model.get_weights()

    plain = trained()
    for strategy in (ks.Default(), ks.OneDevice("cpu:0")):
        for got, want in zip(trained(distribution=strategy), plain):
            np.testing.assert_array_equal(got, want, err_msg=type(strategy).__name__)


def test_too_few_examples_in_the_last_batch_is_a_clear_error():
    with pytest.raises(ks.StrategyError, match="last global batch has 1 example"):
        data.check_splittable(65, 16, 2, "MultiWorkerMirrored(...)")


def test_indivisible_global_batch_is_a_clear_error():
    x = np.zeros((32, 2), "float32")
    with pytest.raises(ks.StrategyError, match="batch_size=5 .* not a multiple of the 2 workers"):
        data.shard_input(x, None, None, 5, False, 0, 2, "MultiWorkerMirrored(...)")


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.data's options; the other backends iterate arrays in "
                    "numpy")
def test_tensorflow_datasets_of_a_process_bound_to_one_core_do_not_autotune(monkeypatch):
    """backends/tensorflow/one_iterator.py's `dataset_options`: bound to one
    core, dropping an autotuned iterator waited up to half its life
    (docs/upstream/tf-autotune-one-core-wait.md), so Keras's dataset of
    arrays (patch tf-dataset-rewrites) and the endless fit input turn
    autotuning off there, and keep TensorFlow's default on more cores."""
    import os

    from keras.src.trainers.data_adapters.array_data_adapter import ArrayDataAdapter

    from keras_strategies.backends.tensorflow import one_iterator

    x, y = np.zeros((8, 2), "float32"), np.zeros(8, "int32")
    keras_dataset = one_iterator.with_default_rewrites(ArrayDataAdapter.get_tf_dataset)
    for cores, autotune in (({3}, False), ({0, 1}, None)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, cores=cores: cores)
        arrays = keras_dataset(ArrayDataAdapter(x, y, batch_size=4))
        endless, _ = one_iterator.endless_batches(x, y, None, 4, None, False, 0, 0)
        assert arrays.options().autotune.enabled is autotune, cores
        assert endless.options().autotune.enabled is autotune, cores
        assert arrays.options().experimental_optimization.apply_default_optimizations  # the rewrites stay on


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow MultiWorkerMirrored's input (tf.data); the "
                    "other backends iterate arrays in numpy")
def test_tensorflow_one_iterator_input_has_each_epochs_batches():
    """backends/tensorflow/one_iterator.py: one endless dataset whose epoch e
    is the batches Keras makes from the arrays (shuffle=False), or those of
    `ShuffledShards` at epoch e (shuffle=True), from `initial_epoch` on;
    class weights as Keras's sample weights, float64 as floatx."""
    import inspect

    import keras

    from keras_strategies.backends.tensorflow import one_iterator
    from keras.src.trainers.data_adapters.array_data_adapter import ArrayDataAdapter

    n, batch = 37, 8  # 5 batches, the last of 5 examples
    x = np.arange(n * 3, dtype="float64").reshape(n, 3)
    y = np.arange(n) % 4
    weights = {0: 1.0, 1: 2.0, 2: 0.5, 3: 3.0}

    def first_batches(dataset, count):
        return [keras.tree.map_structure(np.asarray, b) for b, _ in zip(dataset, range(count))]

    plain, steps = one_iterator.endless_batches(x, y, None, batch, weights, False, 0, 0)
    assert steps == 5
    keras_batches = list(ArrayDataAdapter(x, y, batch_size=batch, class_weight=weights).get_numpy_iterator())
    got = first_batches(plain, 15)  # three epochs, each the same batches
    for i, (bx, by, bw) in enumerate(got):
        kx, ky, kw = keras_batches[i % 5]
        assert bx.dtype == np.float32 and np.array_equal(bx, kx) and np.array_equal(by, ky) \
            and np.array_equal(bw, kw)

    shuffled, _ = one_iterator.endless_batches(x, y, None, batch, None, True, 7, 2)
    got = first_batches(shuffled, 10)  # epochs 2 and 3
    for epoch in (2, 3):
        shards = data.ShuffledShards(x, y, None, batch, 0, 1, 7)
        shards.set_epoch(epoch)
        for i in range(5):
            sx, sy = shards[i]
            gx, gy = got[(epoch - 2) * 5 + i]
            assert np.array_equal(gx, sx.astype("float32")) and np.array_equal(gy, sy)
    assert not np.array_equal(got[0][1], got[5][1])  # a new order each epoch

    def fit_arguments(**kwargs):
        def fit(x=None, y=None, batch_size=None, epochs=1, callbacks=None, validation_split=0.0,
                validation_data=None, shuffle=True, class_weight=None, sample_weight=None, initial_epoch=0,
                steps_per_epoch=None, validation_steps=None, validation_batch_size=None):
            pass

        return inspect.signature(fit).bind(**kwargs)

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(loss="mse", steps_per_execution=2)  # 5 batches: not a whole number of executions
    assert not one_iterator.one_iterator_fit(model, "fit", fit_arguments(x=x, y=y, batch_size=batch), 0)
    model.compile(loss="mse", steps_per_execution=2)  # 27 examples for training: 4 batches
    arguments = fit_arguments(x=x, y=y, batch_size=batch, validation_split=0.25)
    assert one_iterator.one_iterator_fit(model, "fit", arguments, 0)
    a = arguments.arguments
    assert a["steps_per_epoch"] == 4 and a["y"] is None  # 27 examples of 37 for training
    validation = first_batches(a["validation_data"], 6)  # the last 10 examples, 2 batches an epoch
    assert a["validation_steps"] == 2 and [len(b[1]) for b in validation] == [8, 2, 8, 2, 8, 2]
    assert np.array_equal(validation[1][1], y[35:]) and np.array_equal(validation[3][1], y[35:])
    assert getattr(a["validation_data"], one_iterator.WHOLE_EPOCHS)
    arguments = fit_arguments(x=x[:32], y=y[:32], batch_size=batch, validation_data=(x[:17], y[:17]))
    assert one_iterator.one_iterator_fit(model, "fit", arguments, 0)
    assert isinstance(arguments.arguments["validation_data"], tuple)  # 3 batches: not whole executions of 2
    backup = keras.callbacks.BackupAndRestore("unused")
    model.compile(loss="mse")
    for kwargs in (dict(steps_per_epoch=2), dict(shuffle="batch"), dict(callbacks=[backup])):
        assert not one_iterator.one_iterator_fit(model, "fit", fit_arguments(x=x, y=y, batch_size=batch, **kwargs), 0)
    assert one_iterator.one_iterator_fit(  # without shuffling, the order is the same every epoch
        model, "fit", fit_arguments(x=x, y=y, batch_size=batch, callbacks=[backup], shuffle=False), 0)
    assert not one_iterator.one_iterator_fit(model, "evaluate", fit_arguments(x=x, y=y), 0)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow MultiWorkerMirrored's input (tf.data); the "
                    "other backends iterate arrays in numpy")
def test_tensorflow_one_iterator_workers_make_only_their_replicas_parts():
    """Given the strategy, `one_iterator.endless_batches` has each worker's
    pipeline make its own replicas' parts of every global batch (the chunks
    of `data.chunk_bounds`), not every global batch to keep a share: worker 1
    of 2 reads the second chunk of each of Keras's batches, of the short last
    batch too; a worker with both replicas takes the two parts in
    turn. Either way the dataset is known to be endless."""
    import tensorflow as tf
    from keras.src.trainers.data_adapters.array_data_adapter import ArrayDataAdapter

    from keras_strategies.backends.tensorflow import one_iterator

    class OneWorker:  # distribute_datasets_from_function, for one worker's input pipeline
        def __init__(self, pipelines, pipeline_id, replicas):
            self.context = tf.distribute.InputContext(pipelines, pipeline_id, replicas)

        def distribute_datasets_from_function(self, make):
            return make(self.context)

    n, batch = 37, 8  # 5 batches, the last of 5 examples
    x = np.arange(n * 3, dtype="float32").reshape(n, 3)
    y = np.arange(n) % 4
    keras_batches = list(ArrayDataAdapter(x, y, batch_size=batch).get_numpy_iterator())

    def parts(strategy, count):
        dataset, steps = one_iterator.endless_batches(x, y, None, batch, None, False, 0, 0, strategy)
        assert steps == 5 and getattr(dataset, one_iterator.WHOLE_EPOCHS)
        # known endless: else TensorFlow's distributed iterator has the workers agree at every step on whether
        # each has input left, an all-reduce a step across processes (~2 ms of 3 a step here)
        assert int(dataset.cardinality()) == tf.data.INFINITE_CARDINALITY
        return [(np.asarray(bx), np.asarray(by)) for (bx, by), _ in zip(dataset, range(count))]

    for worker in (0, 1):
        got = parts(OneWorker(2, worker, 2), 10)  # two epochs, a part of each batch
        for i, (gx, gy) in enumerate(got):
            kx, ky = keras_batches[i % 5]
            start, stop = data.chunk_bounds(len(kx), worker, 2)
            assert np.array_equal(gx, kx[start:stop]) and np.array_equal(gy, ky[start:stop])
    assert [len(gy) for _, gy in parts(OneWorker(2, 1, 2), 5)] == [4, 4, 4, 4, 3]

    got = parts(None, 5)  # no strategy: the global batches
    assert all(np.array_equal(g[0], k[0]) for g, k in zip(got, keras_batches))
    got = parts(OneWorker(1, 0, 2), 10)  # one worker, two replicas: both parts of each batch, in turn
    for i in range(5):
        kx, _ = keras_batches[i]
        assert np.array_equal(np.concatenate([got[2 * i][0], got[2 * i + 1][0]]), kx)
        assert len(got[2 * i][0]) == data.chunk_bounds(len(kx), 0, 2)[1]


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow Mirrored's input (tf.data); the other backends "
                    "batch arrays as Keras does")
@pytest.mark.parametrize("kind", ["Mirrored", "CentralStorage"])
def test_tensorflow_mirrored_reads_one_endless_dataset_shuffled_anew_each_fit(kind):
    """TensorFlow `Mirrored` and `CentralStorage` turn a fit's arrays into one
    endless dataset of their replicas' parts (backends/tensorflow/one_iterator.py):
    each fit draws its own shuffle order (one process: no seed to agree on),
    the same ones again after `keras.utils.set_random_seed`."""
    import inspect

    import keras

    from conftest import REPLICA_DEVICES
    from keras_strategies.backends.tensorflow import one_iterator

    x = np.arange(64 * 2, dtype="float32").reshape(64, 2)
    y = np.arange(64)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(loss="mse")
    strategy = getattr(ks, kind)(devices=REPLICA_DEVICES)

    def prepare_call(method, arguments):  # what the strategy's run does first
        strategy._impl._seed_call, strategy._impl._call_seed = (method, arguments), None
        strategy._impl.prepare_call(model, method, arguments)

    def first_epoch_labels():
        def fit(x=None, y=None, batch_size=None, epochs=1, shuffle=True, validation_data=None, initial_epoch=0,
                steps_per_epoch=None, validation_split=0.0, callbacks=None, class_weight=None, sample_weight=None,
                validation_steps=None, validation_batch_size=None):
            pass

        arguments = inspect.signature(fit).bind(x=x, y=y, batch_size=16)
        prepare_call("fit", arguments)
        a = arguments.arguments
        assert a["steps_per_epoch"] == 4 and getattr(a["x"], one_iterator.WHOLE_EPOCHS)
        native = strategy._impl.native
        labels = [np.concatenate([np.asarray(v) for v in native.experimental_local_results(batch[1])])
                  for batch, _ in zip(a["x"], range(4))]
        assert sorted(np.concatenate(labels).tolist()) == list(range(64))  # the whole epoch, each example once
        return np.concatenate(labels)

    _, key, position, *_ = np.random.get_state()
    key = key.copy()
    for shuffle in (False, "batch"):  # no shuffle of ours: numpy's generator is left as it is
        arguments = inspect.signature(lambda x=None, y=None, batch_size=None, shuffle=True: None).bind(
            x=x, y=y, batch_size=16, shuffle=shuffle)
        prepare_call("fit", arguments)
    prepare_call("evaluate", inspect.signature(lambda x=None, y=None: None).bind(x=x, y=y))
    _, key_after, position_after, *_ = np.random.get_state()
    assert position_after == position and np.array_equal(key_after, key)
    keras.utils.set_random_seed(3)
    first, second = first_epoch_labels(), first_epoch_labels()
    assert not np.array_equal(first, second)  # a new order for each fit
    keras.utils.set_random_seed(3)
    assert np.array_equal(first_epoch_labels(), first) and np.array_equal(first_epoch_labels(), second)

