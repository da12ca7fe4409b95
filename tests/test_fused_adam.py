"""torch: Keras's Adam runs as one fused kernel under MultiWorkerMirrored, with
the same result as Keras's own update to float tolerance; the one-device
strategies keep Keras's own update bit for bit."""

import contextlib

import keras
import numpy as np
import pytest

from conftest import BACKEND

pytestmark = [pytest.mark.in_process, pytest.mark.skipif(
    BACKEND != "torch", reason="fused Adam is torch-backend code (backends/torch/fused_adam.py)"
)]


def train(fused, optimizer_fn, steps=60):
    import torch

    from keras_strategies.backends.torch.fused_adam import fused_adam

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(8), keras.layers.Dense(3)])
    optimizer = optimizer_fn()
    optimizer.build(model.trainable_variables)
    generator = torch.Generator().manual_seed(0)
    with fused_adam(optimizer) if fused else contextlib.nullcontext():
        for _ in range(steps):
            grads = [torch.randn(v.value.shape, generator=generator) for v in model.trainable_variables]
            optimizer.apply(grads, model.trainable_variables)
    assert "_backend_update_step" not in optimizer.__dict__  # restored afterwards
    return [v.numpy() for v in model.trainable_variables + optimizer.variables]


@pytest.mark.parametrize("name,make", [
    ("adam", lambda: keras.optimizers.Adam(1e-2)),
    ("schedule_decay_clip", lambda: keras.optimizers.Adam(
        keras.optimizers.schedules.ExponentialDecay(1e-2, 10, 0.8), weight_decay=0.01,
        global_clipnorm=1.0, epsilon=1e-3)),
    ("adamw", lambda: keras.optimizers.AdamW(1e-2, weight_decay=0.05)),
])
def test_fused_update_equals_keras(name, make):
    for got, want in zip(train(True, make), train(False, make)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_only_plain_adam_and_adamw_are_fused():
    from keras_strategies.backends.torch.fused_adam import supports

    assert supports(keras.optimizers.Adam())
    assert supports(keras.optimizers.AdamW())  # Adam's update; Keras decays the weights before it
    assert not supports(keras.optimizers.Adam(amsgrad=True))
    assert not supports(keras.optimizers.AdamW(amsgrad=True))
    assert not supports(keras.optimizers.SGD())


def linear_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 12)).astype("float32")
    return x, (x @ rng.normal(size=(12, 3))).astype("float32")


def fit(distribution, epochs=10, optimizer=None):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(3)])
    model.compile(optimizer or keras.optimizers.Adam(1e-2), "mse")
    x, y = linear_data()
    kwargs = {"distribution": distribution} if distribution is not None else {}
    model.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0, **kwargs)
    return model.get_weights()


def counting_fused_steps(monkeypatch, module=None):
    """The calls of `module`'s fused update step (default: fused_adam)."""
    if module is None:
        from keras_strategies.backends.torch import fused_adam as module

    calls = []
    original = module.fused_update_step

    def counting(optimizer):
        step = original(optimizer)

        def wrapped(*args):
            calls.append(1)
            return step(*args)

        return wrapped

    monkeypatch.setattr(module, "fused_update_step", counting)
    return calls


def test_multi_worker_uses_it_and_matches_plain_keras(monkeypatch):
    import keras_strategies as ks

    calls = counting_fused_steps(monkeypatch)
    got = fit(ks.MultiWorkerMirrored())  # one process here: the same step code
    assert len(calls) == 10 * 16
    for a, b in zip(got, fit(None)):  # 160 steps: float rounding, not bit for bit
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["Default", "OneDevice", "Mirrored"])
def test_one_device_strategies_keep_keras_update_bit_for_bit(monkeypatch, name):
    import keras_strategies as ks

    calls = counting_fused_steps(monkeypatch)
    strategy = ks.OneDevice("cpu:0") if name == "OneDevice" else getattr(ks, name)()
    got = fit(strategy, epochs=3)
    assert not calls
    for a, b in zip(got, fit(None, epochs=3)):
        np.testing.assert_array_equal(a, b)
