"""Training under a strategy equals single-device training on the same global
batches: weights, history, evaluate and predict; both usage patterns."""

import numpy as np
import pytest

import keras_strategies as ks
from conftest import BACKEND
from models import CustomTrainStep, build, initial_weights, make_data

pytestmark = pytest.mark.in_process  # one process only: may run beside another backend's (tests/run_all.py)

BATCH = 16  # global batch; 69 samples leave a last batch of 5
EPOCHS = 2
TOL = 1e-5


def make_strategy(name, devices):
    if name == "default":
        return ks.Default()
    if name == "one_device":
        return ks.OneDevice("cpu:0")
    return ks.Mirrored(devices=devices)


def reference(kind, x, y, batch_norm=False):
    model = build(kind, initial_weights(kind, batch_norm), batch_norm)
    history = model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0)
    return model, history.history


def assert_same(model, history, ref_model, ref_history, x, y):
    for got, want in zip(model.get_weights(), ref_model.get_weights()):
        np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)
    assert history.keys() == ref_history.keys()
    for key in ref_history:
        np.testing.assert_allclose(history[key], ref_history[key], atol=TOL, rtol=TOL)


# Every model kind under Mirrored (the strategy that changes the most); the
# one-replica strategies with a functional model and a custom train_step.
# PyTorch's Mirrored over two devices is two processes: tests/test_multi_worker.py.
MIRRORED = [] if BACKEND == "torch" else [
    ("mirrored", kind) for kind in ("functional", "sequential", "convnet", "subclassed", "custom_train_step")]
CASES = MIRRORED + [(name, kind) for name in ("default", "one_device") for kind in ("functional", "custom_train_step")]


@pytest.mark.parametrize("strategy_name,kind", CASES)
@pytest.mark.parametrize("pattern", ["fit_argument", "scope"])
def test_training_equals_single_device(strategy_name, kind, pattern, replica_devices):
    x, y = make_data()
    ref_model, ref_history = reference(kind, x, y)
    strategy = make_strategy(strategy_name, replica_devices)
    CustomTrainStep.train_step_calls = 0
    if pattern == "scope":
        with strategy.scope():
            model = build(kind, initial_weights(kind))
        history = model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0)
    else:
        model = build(kind, initial_weights(kind))
        history = model.fit(
            x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0,
            distribution=strategy,
        )
    assert_same(model, history.history, ref_model, ref_history, x, y)
    if kind == "custom_train_step":
        assert CustomTrainStep.train_step_calls > 0

    # evaluate and predict under the strategy give the single-device results
    kwargs = {} if pattern == "scope" else {"distribution": strategy}
    ref_eval = ref_model.evaluate(x, y, batch_size=BATCH, verbose=0)
    got_eval = model.evaluate(x, y, batch_size=BATCH, verbose=0, **kwargs)
    np.testing.assert_allclose(got_eval, ref_eval, atol=TOL, rtol=TOL)
    np.testing.assert_allclose(
        model.predict(x, batch_size=BATCH, verbose=0, **kwargs),
        ref_model.predict(x, batch_size=BATCH, verbose=0),
        atol=TOL, rtol=TOL,
    )


@pytest.mark.skipif(BACKEND == "torch", reason="PyTorch's Mirrored over two devices is two processes "
                    "(tests/test_multi_worker.py counts them)")
@pytest.mark.parametrize("pattern", ["fit_argument", "scope"])
def test_mirrored_really_runs_two_replicas(pattern, replica_devices, monkeypatch):
    """Not the configured count: evidence from the run. TensorFlow traces the
    step once per replica (replica ids 0 and 1); on JAX every batch is an
    array sharded over both devices."""
    import keras

    seen = set()
    if BACKEND == "tensorflow":
        import tensorflow as tf

        class Probe(keras.layers.Layer):
            def call(self, x):
                context = tf.distribute.get_replica_context()
                if context is not None:  # None when Keras builds the model symbolically
                    replica = tf.get_static_value(context.replica_id_in_sync_group)
                    seen.add((context.num_replicas_in_sync, None if replica is None else int(replica)))
                return x
    else:
        from keras_strategies.backends.jax import keras_fixes

        factory = keras_fixes.replicating_distribute_data_input

        def recording(original):
            distribute = factory(original)

            def distribute_data_input(batch, layout, batch_dim_name):
                array = distribute(batch, layout, batch_dim_name)
                seen.add((len(array.sharding.device_set), array.sharding.spec[0], array.shape[0]))
                return array

            return distribute_data_input

        monkeypatch.setattr(keras_fixes, "replicating_distribute_data_input", recording)

        class Probe(keras.layers.Layer):
            def call(self, x):
                return x

    def model():
        m = keras.Sequential([keras.Input((8,)), Probe(), keras.layers.Dense(3, activation="softmax")])
        m.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
        return m

    strategy = ks.Mirrored(devices=replica_devices)
    x, y = make_data(n=64)
    if pattern == "scope":
        with strategy.scope():
            m = model()
        m.fit(x, y, batch_size=16, epochs=1, verbose=0)
    else:
        m = model()
        m.fit(x, y, batch_size=16, epochs=1, verbose=0, distribution=strategy)
    if BACKEND == "tensorflow":
        assert {(2, 0), (2, 1)} <= seen, seen
    else:
        assert seen == {(2, "batch", 16)}, seen
