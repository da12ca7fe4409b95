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
