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


@pytest.mark.skipif(keras.backend.backend() == "torch", reason="TensorFlow and JAX: PyTorch's BatchNormalization is test_torch_batchnorm.py's")
def test_batchnorm_subclass_keeps_its_own_moments(replica_devices):
    """A BatchNormalization subclass with its own `_moments` keeps it under our
    strategies: only Keras's own method is replaced (by the one-all-reduce one
    on TensorFlow, the one-pass one on JAX)."""
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
    assert calls, calls  # traced in the step: the subclass's own method ran
    if keras.backend.backend() == "tensorflow":
        assert all(calls), calls  # in each replica, synchronized (global statistics)


def _all_reduces(compiled_text):
    """The all-reduce instructions of an XLA program (one per collective,
    however many arrays XLA combined into it)."""
    import re

    return len(re.findall(r"= (?:\S+|\([^)]*\)) all-reduce\(", compiled_text))


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="JAX only: TensorFlow's is tested above, PyTorch's in test_torch_batchnorm.py")
@pytest.mark.parametrize("kind", ["functional", "convnet"])
def test_jax_batchnorm_statistics_take_one_all_reduce_each_way(kind, replica_devices):
    """Over a batch split across devices, Keras's JAX moments (`jnp.mean`, then
    `jnp.var`) make XLA all-reduce twice in the forward pass and twice more in
    the backward pass, one after the other; the one-pass moments
    (`jax-one-pass-moments`) once each way. Counted in the compiled programs
    of a forward pass and of a gradient over 2 devices."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from keras_strategies.backends.jax.base import global_moments_in_one_pass

    mesh = Mesh(jax.devices()[:len(replica_devices)], ("batch",))
    x, _ = make_data(n=64)
    counts = {}
    for replicas in (1, len(replica_devices)):  # 1: Keras's own moments
        model = build(kind, initial_weights(kind, batch_norm=True), batch_norm=True)
        state = [[jax.device_put(v.value, NamedSharding(mesh, PartitionSpec())) for v in variables]
                 for variables in (model.trainable_variables, model.non_trainable_variables)]
        batch = jax.device_put(x[:BATCH], NamedSharding(mesh, PartitionSpec("batch")))

        def forward(trainable, non_trainable, inputs):
            return model.stateless_call(trainable, non_trainable, inputs, training=True)[0]

        def loss(trainable, non_trainable, inputs):
            return jnp.sum(forward(trainable, non_trainable, inputs) ** 2)

        with global_moments_in_one_pass(model, replicas):
            counts[replicas] = tuple(_all_reduces(jax.jit(f).lower(*state, batch).compile().as_text())
                                     for f in (forward, jax.grad(loss)))
    keras_own, ours = counts[1], counts[len(replica_devices)]
    assert keras_own[0] == 2 and ours[0] == 1, counts  # forward: mean, then variance -> both at once
    assert ours[1] <= keras_own[1] - 2, counts  # and one fewer each way in the gradient's program


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="JAX only")
def test_jax_one_pass_moments_only_where_the_batch_is_split(replica_devices, monkeypatch):
    """Under Mirrored over 2 devices every BatchNormalization's statistics come
    from the one-pass moments (the equivalence test above trains with them);
    over one device and under Default, from Keras's own formula, as on one
    device."""
    from keras_strategies.backends.jax import base

    made = []
    original = base.one_pass_moments

    def recording(layer):
        made.append(layer.name)
        return original(layer)

    monkeypatch.setattr(base, "one_pass_moments", recording)
    x, y = make_data(n=64)
    for strategy, expected in ((ks.Mirrored(devices=replica_devices), True),
                               (ks.Mirrored(devices=replica_devices[:1]), False), (ks.Default(), False)):
        made.clear()
        model = build("convnet", initial_weights("convnet", batch_norm=True), batch_norm=True)
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, distribution=strategy)
        norms = [l.name for l in model._flatten_layers() if isinstance(l, keras.layers.BatchNormalization)]
        assert sorted(made) == (sorted(norms) if expected else []), (strategy, made)
        assert all("_moments" not in l.__dict__ for l in model._flatten_layers())  # restored after the run


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="JAX only")
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_jax_one_pass_moments_equal_exact_moments(dtype):
    """The one-pass moments equal Keras's own and the exact (float64) ones; with
    the moving mean near the data's mean (the shift), also for data whose mean
    is large against its spread, where the unshifted one-pass formula loses the
    variance to cancellation."""
    import jax.numpy as jnp

    from keras_strategies.backends.jax.keras_fixes import one_pass_moments

    norm = keras.layers.BatchNormalization(dtype=dtype)
    norm.build((None, 3, 3, 4))
    ours = one_pass_moments(norm)
    rng = np.random.default_rng(0)
    tolerance = 1e-5 if dtype == "float32" else 1e-2
    x = rng.normal(2.0, 3.0, (12, 3, 3, 4)).astype(dtype)
    mean, variance = ours(jnp.asarray(x), None)
    want = keras.ops.moments(jnp.asarray(x), axes=[0, 1, 2])
    exact = x.astype("float64").mean(axis=(0, 1, 2)), x.astype("float64").var(axis=(0, 1, 2))
    for got, keras_own, truth in zip((mean, variance), want, exact):
        assert got.dtype == keras_own.dtype == np.dtype(dtype)
        np.testing.assert_allclose(np.asarray(got), np.asarray(keras_own), rtol=tolerance, atol=tolerance)
        np.testing.assert_allclose(np.asarray(got), truth, rtol=tolerance, atol=tolerance)
    if dtype == "float32":
        far = rng.normal(1000.0, 1.0, (12, 3, 3, 4)).astype(dtype)
        norm.moving_mean.assign(np.full(4, 999.5, dtype="float32"))
        _, variance = ours(jnp.asarray(far), None)
        np.testing.assert_allclose(np.asarray(variance), far.astype("float64").var(axis=(0, 1, 2)), rtol=1e-3)
