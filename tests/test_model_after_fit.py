"""After fit(distribution=...) the model is an ordinary model again."""

import os

import keras
import numpy as np
import pytest

import keras_strategies as ks
from models import build, initial_weights, make_data


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
