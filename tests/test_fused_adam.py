"""torch: Keras's Adam runs as one fused kernel under a strategy, with the same
result as Keras's own update (float tolerance), and only where it is exact."""

import contextlib

import keras
import numpy as np
import pytest

from conftest import BACKEND

pytestmark = pytest.mark.skipif(BACKEND != "torch", reason="the torch Adam update")


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
])
def test_fused_update_equals_keras(name, make):
    for got, want in zip(train(True, make), train(False, make)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_only_plain_adam_is_fused():
    from keras_strategies.backends.torch.fused_adam import supports

    assert supports(keras.optimizers.Adam())
    assert not supports(keras.optimizers.Adam(amsgrad=True))
    assert not supports(keras.optimizers.AdamW())
    assert not supports(keras.optimizers.SGD())


def test_fit_under_a_strategy_uses_it_and_matches_plain_keras():
    import keras_strategies as ks
    from keras_strategies.backends.torch import fused_adam as module

    calls = []
    original = module.fused_update_step

    def counting(optimizer):
        step = original(optimizer)

        def wrapped(*args):
            calls.append(1)
            return step(*args)

        return wrapped

    module.fused_update_step = counting
    try:
        rng = np.random.default_rng(0)
        x, y = rng.normal(size=(64, 12)).astype("float32"), rng.normal(size=(64, 3)).astype("float32")
        weights = None
        results = []
        for distribution in (None, ks.Default()):
            keras.utils.set_random_seed(0)
            model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(3)])
            if weights is None:
                weights = model.get_weights()
            model.set_weights(weights)
            model.compile(keras.optimizers.Adam(1e-2), "mse")
            model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0,
                      **({"distribution": distribution} if distribution else {}))
            results.append(model.get_weights())
    finally:
        module.fused_update_step = original
    assert len(calls) == 12  # 3 epochs x 4 steps, under the strategy only
    for got, want in zip(results[1], results[0]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
