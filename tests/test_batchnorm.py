"""BatchNormalization under Mirrored: statistics over the global batch, so
training equals one device, and every replica holds identical values."""

import keras
import numpy as np
import pytest

import keras_strategies as ks
from models import build, initial_weights, make_data

pytestmark = pytest.mark.in_process  # one process only: may run beside another backend's (tests/run_all.py)

BATCH = 16


def replica_values(variable):
    """Each replica's copy of a variable (one entry when not mirrored)."""
    value = variable._value
    copies = getattr(value, "values", None)  # tf.distribute MirroredVariable
    if isinstance(copies, (tuple, list)):
        return [keras.ops.convert_to_numpy(c) for c in copies]
    shards = getattr(value, "addressable_shards", None)  # jax.Array
    if shards is not None:
        return [np.asarray(s.data) for s in shards]
    return [keras.ops.convert_to_numpy(value)]


@pytest.mark.parametrize("pattern", ["fit_argument", "scope"])
def test_batchnorm_matches_single_device_and_replicas_agree(pattern, replica_devices):
    x, y = make_data(n=64)
    weights = initial_weights("functional", batch_norm=True)
    ref = build("functional", weights, batch_norm=True)
    ref.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)

    strategy = ks.Mirrored(devices=replica_devices)
    if pattern == "scope":
        with strategy.scope():
            model = build("functional", weights, batch_norm=True)
        model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
        norm = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)][0]
        for variable in (norm.moving_mean, norm.moving_variance):
            copies = replica_values(variable)
            assert len(copies) == len(replica_devices)
            for copy in copies[1:]:
                np.testing.assert_array_equal(copy, copies[0])
        assert norm.synchronized is False  # the user's config is untouched
    else:
        model = build("functional", weights, batch_norm=True)
        model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0, distribution=strategy)

    for got, want in zip(model.get_weights(), ref.get_weights()):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow only: JAX and PyTorch variables have no tf.distribute aggregation to change")
def test_tensorflow_moving_statistics_update_per_replica_during_a_run_only(replica_devices):
    """During a run the (synchronized, so identical) moving statistics update on
    each replica alone, without an all-reduce each; afterwards their mirrored
    variables have the MEAN aggregation they were created with again (a
    custom loop in the scope, where nothing is synchronized, keeps replicas
    equal)."""
    import tensorflow as tf

    x, y = make_data(n=64)
    strategy = ks.Mirrored(devices=replica_devices)
    with strategy.scope():
        model = build("functional", initial_weights("functional", batch_norm=True), batch_norm=True)
    norm = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)][0]
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            seen.append(norm.moving_mean._value.aggregation)

    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[Record()])
    assert set(seen) == {tf.VariableAggregation.NONE}, seen
    assert norm.moving_mean._value.aggregation == tf.VariableAggregation.MEAN
    assert norm.moving_variance._value.aggregation == tf.VariableAggregation.MEAN
    copies = replica_values(norm.moving_variance)
    assert len(copies) == len(replica_devices)
    for copy in copies[1:]:
        np.testing.assert_array_equal(copy, copies[0])


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow only: Keras's synchronized BatchNormalization is TensorFlow's")
def test_tensorflow_batchnorm_statistics_take_one_all_reduce_a_layer(replica_devices, monkeypatch):
    """Keras's synchronized moments all-reduce the sum, the sum of squares and
    the count (a sum of ones as large as the input) one by one; under our
    strategies one all-reduce carries all three (`tf-one-allreduce-moments`),
    and the training still equals one device (the test above)."""
    import tensorflow as tf

    reduced = []
    original = tf.distribute.ReplicaContext.all_reduce

    def recording(self, reduce_op, value, options=None):
        reduced.append([tuple(v.shape) for v in tf.nest.flatten(value)])
        return original(self, reduce_op, value, options=options)

    monkeypatch.setattr(tf.distribute.ReplicaContext, "all_reduce", recording)
    x, y = make_data(n=64)
    for kind in ("functional", "convnet"):
        reduced.clear()
        model = build(kind, initial_weights(kind, batch_norm=True), batch_norm=True)
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
                  distribution=ks.Mirrored(devices=replica_devices))
        norms = [l for l in model._flatten_layers() if isinstance(l, keras.layers.BatchNormalization)]
        assert norms
        for norm in norms:
            channels = norm.moving_mean.shape[0]
            packed = [shapes for shapes in reduced if shapes == [(2 * channels + 1,)]]
            keras_own = [shapes for shapes in reduced
                         if len(shapes) == 1 and len(shapes[0]) > 1 and shapes[0][-1] == channels
                         and all(d == 1 for d in shapes[0][:-1])]
            assert packed, (kind, reduced)
            assert not keras_own, (kind, keras_own)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow only: Keras's synchronized BatchNormalization is TensorFlow's")
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_tensorflow_one_all_reduce_moments_equal_keras_synchronized_moments(replica_devices, dtype):
    import tensorflow as tf
    from keras.src.backend.tensorflow import nn as tf_nn

    from keras_strategies.backends.tensorflow.keras_fixes import one_allreduce_moments

    norm = keras.layers.BatchNormalization(synchronized=True, dtype=dtype)
    norm.build((None, 3, 3, 4))
    ours = one_allreduce_moments(norm)
    with ks.Mirrored(devices=replica_devices).scope():  # its tf.distribute strategy (a second one in this
        strategy = tf.distribute.get_strategy()  # process could reuse the first one's collective keys)
    rng = np.random.default_rng(0)
    parts = [tf.constant(rng.normal(2.0, 3.0, (5 + i, 3, 3, 4)).astype(dtype)) for i in range(len(replica_devices))]

    def per_replica(context):
        return parts[context.replica_id_in_sync_group]

    inputs = strategy.experimental_distribute_values_from_function(per_replica)
    got = strategy.run(tf.function(lambda v: ours(v, None)), args=(inputs,))
    want = strategy.run(tf.function(lambda v: tf_nn.moments(v, [0, 1, 2], synchronized=True)), args=(inputs,))
    whole = np.concatenate([p.numpy().astype("float64") for p in parts])
    tolerance = 1e-5 if dtype == "float32" else 1e-2
    for g, w, exact in zip(got, want, (whole.mean(axis=(0, 1, 2)), whole.var(axis=(0, 1, 2)))):
        for replica_g, replica_w in zip(strategy.experimental_local_results(g), strategy.experimental_local_results(w)):
            assert replica_g.dtype == replica_w.dtype == tf.as_dtype(dtype)
            np.testing.assert_allclose(replica_g.numpy(), replica_w.numpy(), rtol=tolerance, atol=tolerance)
            np.testing.assert_allclose(replica_g.numpy(), exact, rtol=tolerance, atol=tolerance)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow only: Keras's synchronized BatchNormalization is TensorFlow's")
def test_tensorflow_batchnorm_subclass_keeps_its_own_moments(replica_devices):
    """A BatchNormalization subclass with its own `_moments` keeps it under our
    strategies: only Keras's own method is replaced by the one-all-reduce one."""
    calls = []

    class Recorded(keras.layers.BatchNormalization):
        def _moments(self, inputs, mask):
            calls.append(self.synchronized)
            return super()._moments(inputs, mask)

    x, y = make_data(n=64)
    inputs = keras.Input((x.shape[1],))
    hidden = Recorded()(keras.layers.Dense(8, activation="relu")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(int(y.max()) + 1, activation="softmax")(hidden))
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
              distribution=ks.Mirrored(devices=replica_devices))
    assert calls and all(calls), calls  # traced in each replica, synchronized (global statistics)
