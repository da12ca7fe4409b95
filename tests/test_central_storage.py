"""CentralStorage: variables in one place, replicas on two CPU devices, and
training equal to one device (BatchNormalization included), on every backend."""

import keras
import numpy as np
import pytest

import keras_strategies as ks
from conftest import BACKEND
from models import build, initial_weights, make_data

pytestmark = pytest.mark.in_process  # one process only: may run beside another backend's (tests/run_all.py)

DEVICES = ["cpu:0", "cpu:1"]  # two replicas on every backend (torch: both on "cpu")
BATCH = 16  # global; 69 samples leave a last batch of 5, split 3/2
EPOCHS = 2
TOL = 1e-5


def train(model, x, y, **kwargs):
    return model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0, **kwargs)


def assert_close(got, want):
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=TOL, rtol=TOL)


def state_variables(model):
    return model.variables + model.optimizer.variables + model.metrics_variables


def storage_devices(variable):
    """The devices a variable's value lives on, as lowercase Keras-ish names."""
    value = variable._value
    if BACKEND == "jax":
        return {f"{d.platform}:{d.id}" for d in value.devices()}
    if BACKEND == "tensorflow":
        kind, index = value.device.split("device:")[1].split(":")
        return {f"{kind.lower()}:{index}"}
    return {str(value.device)}


# Each model kind under both patterns, and each (pattern, BatchNormalization)
# pair with two kinds: 8 of the 16 combinations, to keep the suite short; and a
# convnet with BatchNormalization.
@pytest.mark.parametrize("kind,pattern,batch_norm", [
    ("functional", "fit_argument", True), ("functional", "scope", False),
    ("sequential", "fit_argument", False), ("sequential", "scope", True),
    ("subclassed", "fit_argument", True), ("subclassed", "scope", False),
    ("custom_train_step", "fit_argument", False), ("custom_train_step", "scope", True),
    ("convnet", "fit_argument", True),
])
def test_training_equals_single_device(kind, batch_norm, pattern):
    x, y = make_data()
    weights = initial_weights(kind, batch_norm)
    ref = build(kind, weights, batch_norm)
    ref_history = train(ref, x, y).history

    strategy = ks.CentralStorage(devices=DEVICES)
    kwargs = {} if pattern == "scope" else {"distribution": strategy}
    if pattern == "scope":
        with strategy.scope():
            model = build(kind, weights, batch_norm)
    else:
        model = build(kind, weights, batch_norm)
    history = train(model, x, y, **kwargs).history

    assert_close(model.get_weights(), ref.get_weights())  # incl. BN moving statistics
    assert history.keys() == ref_history.keys()
    for key in ref_history:
        np.testing.assert_allclose(history[key], ref_history[key], atol=TOL, rtol=TOL)
    np.testing.assert_allclose(
        model.evaluate(x, y, batch_size=BATCH, verbose=0, **kwargs),
        ref.evaluate(x, y, batch_size=BATCH, verbose=0), atol=TOL, rtol=TOL,
    )
    np.testing.assert_allclose(
        model.predict(x, batch_size=BATCH, verbose=0, **kwargs),
        ref.predict(x, batch_size=BATCH, verbose=0), atol=TOL, rtol=TOL,
    )


def test_two_replicas_and_default_storage():
    strategy = ks.CentralStorage(devices=DEVICES)
    assert strategy.num_replicas_in_sync == 2
    assert strategy.devices == DEVICES
    assert strategy.storage_device == "cpu:0"
    assert "storage_device='cpu:0'" in repr(strategy)
    assert strategy.num_workers == 1 and strategy.is_chief
    assert "CentralStorage" in ks.__all__


@pytest.mark.skipif(BACKEND == "torch", reason="torch has one CPU device; see test_torch_replicas")
@pytest.mark.parametrize("pattern", ["fit_argument", "scope"])
def test_variables_live_on_the_storage_device(pattern):
    """With storage on cpu:1, every variable (model, optimizer with Adam's
    slots, metrics) is on cpu:1 and only there, between steps and after
    training."""
    x, y = make_data(n=64)
    strategy = ks.CentralStorage(devices=DEVICES, storage_device="cpu:1")
    assert strategy.storage_device == "cpu:1"
    weights = initial_weights("functional", batch_norm=True)
    if pattern == "scope":  # the tf.distribute idiom: the optimizer is made in the scope too
        with strategy.scope():
            model = build("functional", weights, batch_norm=True, optimizer=keras.optimizers.Adam(1e-2))
        kwargs = {}
    else:
        model = build("functional", weights, batch_norm=True, optimizer=keras.optimizers.Adam(1e-2))
        kwargs = {"distribution": strategy}
    seen = []

    class Where(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if BACKEND == "jax":  # the step's state, before Keras writes it back
                state = self.model._jax_state
                seen.append({f"{d.platform}:{d.id}" for k in state for a in state[k] for d in a.devices()})
            else:
                seen.append(set().union(*(storage_devices(v) for v in state_variables(self.model))))

    train(model, x, y, callbacks=[Where()], **kwargs)
    # Adam's momenta and velocities (two per trainable variable) were there too
    assert len(model.optimizer.variables) >= 2 + 2 * len(model.trainable_variables)
    assert seen and all(devices == {"cpu:1"} for devices in seen), seen
    if pattern == "scope":
        for variable in state_variables(model):
            assert storage_devices(variable) == {"cpu:1"}, variable.path
        if BACKEND == "tensorflow":
            assert type(model.variables[0]._value).__name__ == "AggregatingVariable"
            assert model.distribute_strategy is strategy.native
    else:  # pattern 1 leaves an ordinary model on the default device
        assert all(storage_devices(v) == {"cpu:0"} for v in model.variables)


@pytest.mark.skipif(BACKEND != "torch", reason="the torch replica mechanism")
def test_torch_replicas():
    """Two real replicas: each its own copy of every variable, half the batch,
    and the master copy (the model's own parameters) untouched by them."""
    x, y = make_data(n=64)
    strategy = ks.CentralStorage(devices=DEVICES)
    model = build("functional", initial_weights("functional", True), batch_norm=True)
    train(model, x, y, distribution=strategy)
    step = strategy._impl.last_step
    assert step["devices"] == ["cpu", "cpu"]
    assert step["batch_sizes"] == [8, 8]
    master = {v.path: v.value.data_ptr() for v in model.variables}
    first, second = step["copies"]
    assert first.keys() == second.keys() == master.keys()
    for path, pointer in master.items():
        assert len({pointer, first[path][1], second[path][1]}) == 3, path
    assert all(str(v.value.device) == "cpu" for v in state_variables(model))


def test_without_devices_one_cpu_holds_the_replica_and_the_variables():
    """`devices=None`: every local GPU, or one CPU when there is none (on JAX it
    raised a TypeError: the method borrowed from Mirrored called super())."""
    strategy = ks.CentralStorage()
    assert strategy.devices == ["cpu:0"] and strategy.storage_device == "cpu:0"
    assert strategy.num_replicas_in_sync == 1


def test_bad_storage_device():
    with pytest.raises(ks.StrategyError, match="gpu:0"):
        ks.CentralStorage(devices=DEVICES, storage_device="gpu:0")
