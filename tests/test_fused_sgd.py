"""torch: Keras's SGD runs as one fused kernel under MultiWorkerMirrored, the
division by the global example count folded in, with the same result as
Keras's own update of the divided gradients to float tolerance."""

import contextlib

import keras
import numpy as np
import pytest

from conftest import BACKEND
from test_fused_adam import counting_fused_steps, fit

pytestmark = [pytest.mark.in_process, pytest.mark.skipif(
    BACKEND != "torch", reason="fused SGD is torch-backend code (backends/torch/fused_sgd.py)"
)]

COUNT = 3.0  # the summed example count the fused update divides by


def train(fused, optimizer_fn, folded, steps=40):
    """Keras's own update of g (fused=False) against the fused update handed
    COUNT * g with the division folded in (folded=True) or g (folded=False)."""
    import torch

    from keras_strategies.backends.torch import fused_sgd

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(8), keras.layers.Dense(3)])
    optimizer = optimizer_fn()
    optimizer.build(model.trainable_variables)
    generator = torch.Generator().manual_seed(0)
    with fused_sgd.fused_sgd(optimizer) if fused else contextlib.nullcontext():
        assert fused_sgd.folds_count(optimizer, model.trainable_variables) == fused
        for _ in range(steps):
            grads = [torch.randn(v.value.shape, generator=generator) for v in model.trainable_variables]
            if fused and folded:
                with fused_sgd.dividing_by(torch.tensor(COUNT)):
                    optimizer.apply([g * COUNT for g in grads], model.trainable_variables)
            else:
                optimizer.apply(grads, model.trainable_variables)
    assert "_backend_update_step" not in optimizer.__dict__  # restored afterwards
    assert not fused_sgd._active
    return [v.numpy() for v in model.trainable_variables + optimizer.variables]


OPTIMIZERS = {
    "plain": lambda: keras.optimizers.SGD(0.05),
    "momentum": lambda: keras.optimizers.SGD(0.05, momentum=0.9),
    "nesterov": lambda: keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True),
    "schedule_decay": lambda: keras.optimizers.SGD(
        keras.optimizers.schedules.ExponentialDecay(0.05, 10, 0.8), momentum=0.5, weight_decay=0.01),
}


@pytest.mark.parametrize("folded", [True, False], ids=["count_folded", "no_count"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_fused_update_equals_keras(name, folded):
    make = OPTIMIZERS[name]
    want = train(False, make, folded)
    for got, want in zip(train(True, make, folded), want):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_only_plain_sgd_is_fused_and_the_count_is_folded_only_when_nothing_reads_the_gradients_first():
    from keras_strategies.backends.torch import fused_sgd

    assert fused_sgd.supports(keras.optimizers.SGD(momentum=0.9))
    assert fused_sgd.supports(keras.optimizers.SGD(momentum=0.9, nesterov=True))
    assert fused_sgd.supports(keras.optimizers.SGD())  # Keras's _foreach_add_, the count folded in
    assert not fused_sgd.supports(keras.optimizers.Adam())
    assert not fused_sgd.supports(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD()))
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    for kwargs, folds in [({}, True), ({"clipnorm": 1.0}, False), ({"clipvalue": 1.0}, False),
                          ({"global_clipnorm": 1.0}, False), ({"gradient_accumulation_steps": 2}, False),
                          ({"momentum": 0.0}, True), ({"momentum": 0.0, "clipnorm": 1.0}, False)]:
        optimizer = keras.optimizers.SGD(**{"momentum": 0.9, **kwargs})
        assert not fused_sgd.folds_count(optimizer, model.trainable_variables)  # not active
        with fused_sgd.fused_sgd(optimizer):
            assert fused_sgd.folds_count(optimizer, model.trainable_variables) == folds, kwargs


@pytest.mark.parametrize("name", ["momentum", "plain"])
def test_multi_worker_uses_it_and_matches_plain_keras(monkeypatch, name):
    import keras_strategies as ks
    from keras_strategies.backends.torch import fused_sgd

    calls = counting_fused_steps(monkeypatch, fused_sgd)
    make = OPTIMIZERS[name]
    got = fit(ks.MultiWorkerMirrored(), epochs=6, optimizer=make())  # one process here: the same update code
    assert len(calls) == 6 * 16
    calls.clear()
    want = fit(None, epochs=6, optimizer=make())
    assert not calls  # plain Keras keeps its own update
    for a, b in zip(got, want):  # 96 steps: float rounding, not bit for bit
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
