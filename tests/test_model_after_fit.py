"""After fit(distribution=...) the model is an ordinary model again."""

import os

import keras
import numpy as np
import pytest

import keras_strategies as ks
from models import build, initial_weights, make_data

pytestmark = pytest.mark.in_process  # one process only: may run beside another backend's (tests/run_all.py)


def test_model_is_ordinary_after_distributed_fit(tmp_path, replica_devices):
    x, y = make_data(n=64)
    model = build("functional", initial_weights("functional"))
    model.fit(x, y, batch_size=16, epochs=1, verbose=0,
              distribution=ks.Mirrored(devices=replica_devices))
    trained = model.get_weights()

    # plain predict/evaluate/fit work and start from the trained weights
    predictions = model.predict(x, batch_size=16, verbose=0)
    model.evaluate(x, y, batch_size=16, verbose=0)
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    for got, want in zip(loaded.get_weights(), trained):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(loaded.predict(x, batch_size=16, verbose=0), predictions, atol=1e-6)

    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert any(np.abs(a - b).max() > 0 for a, b in zip(model.get_weights(), trained))

    # and it can be distributed again, with another strategy
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, distribution=ks.OneDevice("cpu:0"))


def test_validation_data_runs_under_the_strategy(replica_devices):
    x, y = make_data(n=64)
    ref = build("functional", initial_weights("functional"))
    ref_history = ref.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0,
                          validation_data=(x[:32], y[:32]))
    model = build("functional", initial_weights("functional"))
    history = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0,
                        validation_data=(x[:32], y[:32]),
                        distribution=ks.Mirrored(devices=replica_devices))
    for key in ("val_loss", "val_sparse_categorical_accuracy"):
        np.testing.assert_allclose(history.history[key], ref_history.history[key], atol=1e-5)


@pytest.mark.parametrize("name", ["one_device", "mirrored"])
def test_an_optimizer_built_by_fit_is_laid_out_with_the_weights(replica_devices, name):
    """Pattern 1 with an unbuilt optimizer: its slots must not end up on one
    device beside the distributed weights (Keras warns 'a mix of local ...
    and distributed variables' on JAX, and the step mixes devices)."""
    import warnings

    x, y = make_data(n=64)
    model = build("functional", initial_weights("functional"))
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    assert not model.optimizer.built
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        strategy = ks.OneDevice("cpu:0") if name == "one_device" else ks.Mirrored(replica_devices)
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, distribution=strategy)
    assert not [w for w in caught if "mix of local" in str(w.message)]
    assert model.optimizer.built


def _train_function_recorder(seen):
    """A callback class appending the model's train_function to `seen` at each
    fit's first step: the same object twice means the step was not compiled again."""

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 0:
                seen.append(self.model.train_function)

    return Record


def test_repeated_calls_train_like_one_device_and_jax_compiles_once(replica_devices):
    """fit/evaluate/fit with `distribution=` equal the same plain calls (with
    a weight changed by hand between them). On JAX and TensorFlow the second
    fit reuses the step compiled by the first (a model built in the scope
    does; compiling or tracing again cost ~1 s per call); compile() again, or
    another strategy, compiles anew."""
    x, y = make_data(n=64)
    seen = []
    Record = _train_function_recorder(seen)

    def calls(model, **distribution):
        kwargs = dict(batch_size=16, verbose=0, **distribution)
        model.fit(x, y, epochs=1, shuffle=False, callbacks=[Record()], **kwargs)
        loss = model.evaluate(x, y, **kwargs)
        model.layers[-1].kernel.assign(model.layers[-1].kernel * 0.5)  # changed between calls: seen by the next
        model.fit(x, y, epochs=1, shuffle=False, callbacks=[Record()], **kwargs)
        weights = model.get_weights()
        model.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy")
        model.fit(x, y, epochs=1, shuffle=False, callbacks=[Record()], **kwargs)
        return loss, weights, model.get_weights()

    ref = build("functional", initial_weights("functional"))
    want = calls(ref)
    seen.clear()
    strategy = ks.Mirrored(devices=replica_devices)
    got = calls(build("functional", initial_weights("functional")), distribution=strategy)
    np.testing.assert_allclose(got[0], want[0], atol=1e-5)
    for stage in (1, 2):
        for a, b in zip(got[stage], want[stage]):
            np.testing.assert_allclose(a, b, atol=1e-5)
    assert seen[2] is not seen[1]  # compiled anew after compile()
    if keras.backend.backend() in ("jax", "tensorflow"):  # torch's Mirrored is other processes
        assert seen[1] is seen[0]


def test_a_model_built_in_the_scope_compiles_its_step_once(replica_devices):
    """The tf.distribute idiom: fit, evaluate, fit again reuse the first fit's
    step, as under plain tf.distribute (on TensorFlow with several replicas it
    was traced again at every call, ~1.3 s each for a small MLP), and train as
    plain Keras does."""
    x, y = make_data(n=64)
    seen = []
    Record = _train_function_recorder(seen)

    def calls(model):
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[Record()])
        model.evaluate(x, y, batch_size=16, verbose=0)
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[Record()])
        return model.get_weights()

    want = calls(build("functional", initial_weights("functional")))
    seen.clear()
    with ks.Mirrored(devices=replica_devices).scope():
        model = build("functional", initial_weights("functional"))
    for a, b in zip(calls(model), want):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert seen[1] is seen[0]


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="JAX's jit: a step is traced per input layout")
@pytest.mark.parametrize("replicas", [1, 2])
def test_jax_fit_and_evaluate_trace_their_steps_once(replicas, replica_devices):
    """On a mesh of one device (Mirrored or OneDevice on one GPU) Keras resets
    its metrics to single-device zeros, which the jitted step told apart from
    the mesh-laid-out values it returns, and traced and compiled again at the
    second step (`jax-one-device-mesh`); two devices: once already. A fit of
    two epochs with validation, then an evaluate: the train step and the test
    step are traced once each, and the model trains as on one device."""
    x, y = make_data(n=64)
    want = build("functional", initial_weights("functional"))
    want.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    model = build("functional", initial_weights("functional"))
    traces = {"train_step": 0, "test_step": 0}
    for name in traces:
        step = getattr(model, name)

        def traced(*args, _step=step, _name=name, **kwargs):  # runs in Python only when jit traces it
            traces[_name] += 1
            return _step(*args, **kwargs)

        setattr(model, name, traced)
    strategy = ks.Mirrored(devices=replica_devices[:replicas])
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, validation_data=(x[:32], y[:32]),
              distribution=strategy)
    model.evaluate(x, y, batch_size=16, verbose=0, distribution=strategy)
    assert traces == {"train_step": 1, "test_step": 1}, f"steps traced: {traces}"
    for a, b in zip(model.get_weights(), want.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="tf.distribute's sync-on-read metric variables")
def test_tf_metrics_are_reset_and_read_without_a_reduction_per_variable(replica_devices):
    """Under MirroredStrategy (and MultiWorkerMirroredStrategy, where each is
    an all-reduce between the workers) every read of a metric variable outside
    a step is a reduction over the replicas. Keras read each one at every
    epoch's and validation's logs, and once more at each reset (its `assign`
    reads the value back): two fits of two epochs with validation, then an
    evaluate, made none of those reads; the logs are one device's."""
    import tensorflow as tf
    from tensorflow.python.distribute import values as tf_values

    x, y = make_data(n=64)
    want = build("functional", initial_weights("functional"))
    want_history = want.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0,
                            validation_data=(x[:32], y[:32])).history
    strategy = ks.Mirrored(devices=replica_devices)
    model = build("functional", initial_weights("functional"))
    reads = []
    read = tf_values.SyncOnReadVariable._get_cross_replica

    def counted(self):
        if tf.executing_eagerly():  # not the symbolic build's reads: a graph that never runs
            reads.append(self.name)
        return read(self)

    tf_values.SyncOnReadVariable._get_cross_replica = counted
    try:
        history = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0,
                            validation_data=(x[:32], y[:32]), distribution=strategy).history
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, distribution=strategy)
        model.evaluate(x, y, batch_size=16, verbose=0, distribution=strategy)
    finally:
        tf_values.SyncOnReadVariable._get_cross_replica = read
    assert reads == [], f"{len(reads)} reads, one reduction each: {sorted(set(reads))}"
    assert history.keys() == want_history.keys()
    for key in want_history:
        np.testing.assert_allclose(history[key], want_history[key], atol=1e-5, err_msg=key)
