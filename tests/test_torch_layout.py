"""torch: Keras's channels_last conv and pooling without layout copies
(backends/torch/layout.py): the same forward values bit for bit and the same
training to float rounding, no copies, Keras's own ops again once the call
ends, used by the multi-replica strategies only."""

import contextlib

import keras
import numpy as np
import pytest

import keras_strategies as ks
from conftest import BACKEND

pytestmark = [pytest.mark.in_process, pytest.mark.skipif(
    BACKEND != "torch", reason="the layout fix is torch-backend code (backends/torch/layout.py)"
)]

layers = keras.layers


def conv_model():
    """Every op the fix touches (2D and 3D), beside the ones it leaves alone."""
    image = keras.Input((12, 12, 3))
    a = layers.Conv2D(8, 3, activation="relu")(image)
    a = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(a)
    a = layers.MaxPooling2D(2, padding="same")(a)
    a = layers.AveragePooling2D(3, strides=1, padding="same")(a)
    b = layers.Conv2DTranspose(4, 3, strides=2, padding="same")(image)  # left as Keras has it
    b = layers.AveragePooling2D(2)(b)
    b = layers.BatchNormalization()(b)
    b = layers.GlobalMaxPooling2D()(b)
    volume = keras.Input((6, 6, 6, 2))
    c = layers.Conv3D(4, 3, activation="relu")(volume)
    c = layers.MaxPooling3D(2)(c)
    c = layers.Flatten()(c)
    series = keras.Input((10, 3))
    d = layers.Conv1D(4, 3)(series)  # 1D: no channels_last format, left as it is
    d = layers.MaxPooling1D(2)(d)
    d = layers.Flatten()(d)
    a = layers.Flatten()(a)
    out = layers.Dense(5)(layers.Concatenate()([a, b, c, d]))
    return keras.Model([image, volume, series], out)


def data(n=48):
    rng = np.random.default_rng(0)
    x = [rng.standard_normal((n, 12, 12, 3), dtype=np.float32),
         rng.standard_normal((n, 6, 6, 6, 2), dtype=np.float32),
         rng.standard_normal((n, 10, 3), dtype=np.float32)]
    return x, rng.integers(0, 5, n).astype("int32")


def train(context):
    keras.utils.set_random_seed(0)
    model = conv_model()
    # SGD: Adam's m / sqrt(v) turns rounding in near-zero gradients into whole steps
    model.compile(optimizer=keras.optimizers.SGD(0.05),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data()
    with context:
        first = model.predict(x, batch_size=16, verbose=0)
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    return first, model.get_weights()


def test_same_forward_bit_for_bit_and_same_training_to_rounding():
    from keras_strategies.backends.torch.layout import copy_free_layouts

    plain_predictions, plain_weights = train(contextlib.nullcontext())
    fast_predictions, fast_weights = train(copy_free_layouts())
    np.testing.assert_array_equal(plain_predictions, fast_predictions)
    assert len(plain_weights) == len(fast_weights)
    for plain, fast in zip(plain_weights, fast_weights):
        np.testing.assert_allclose(plain, fast, rtol=1e-5, atol=1e-6)


def activation_copies(context, batch=5):
    """`aten::copy_` calls on batch-sized 4D tensors in one forward pass (the
    backward pass has copies of torch's own, inside its pooling kernels)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((14, 14, 2)), layers.Conv2D(4, 3), layers.MaxPooling2D(2),
                              layers.Conv2D(4, 3), layers.AveragePooling2D(2), layers.Flatten()])
    x = torch.randn(batch, 14, 14, 2)
    with context:
        model(x, training=True)  # builds; the profile below is of a steady call
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            model(x, training=True)
    return sum(
        event.count for event in prof.key_averages(group_by_input_shape=True)
        if event.key == "aten::copy_"
        and any(len(shape) == 4 and shape[0] == batch for shape in event.input_shapes)
    )


def test_conv_and_pooling_copy_no_activation():
    from keras_strategies.backends.torch.layout import copy_free_layouts

    assert activation_copies(copy_free_layouts()) == 0


def test_keras_ops_are_restored_after_each_call_even_a_failed_one():
    from keras.src.backend.torch import nn as torch_nn

    from keras_strategies.backends.torch.layout import OPS, copy_free_layouts

    before = {name: getattr(torch_nn, name) for name in OPS}
    with copy_free_layouts():
        inside = {name: getattr(torch_nn, name) for name in OPS}
        with copy_free_layouts():  # nested: the outer replacement stays
            assert {name: getattr(torch_nn, name) for name in OPS} == inside
        assert {name: getattr(torch_nn, name) for name in OPS} == inside
    assert all(inside[name] is not before[name] for name in OPS)
    assert {name: getattr(torch_nn, name) for name in OPS} == before

    class Stop(Exception):
        pass

    class Fail(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            assert getattr(torch_nn.conv, "__wrapped__", None) is before["conv"]
            raise Stop

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 1)), layers.Conv2D(2, 3), layers.Flatten(), layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(Stop):
        model.fit(np.zeros((4, 8, 8, 1), "float32"), np.zeros((4, 2), "float32"), verbose=0,
                  callbacks=[Fail()], distribution=ks.CentralStorage())
    assert {name: getattr(torch_nn, name) for name in OPS} == before


@pytest.mark.parametrize("name", ["default", "one_device", "mirrored", "central_storage"])
def test_only_multi_replica_strategies_use_it(name):
    """Default, OneDevice and one-device Mirrored stay Keras's ops, bit for bit;
    CentralStorage (two replicas on the CPU here) uses the fix and still equals
    one-device training. MultiWorkerMirrored: tests/test_multi_worker.py
    (a convnet) and the benchmarks."""
    from keras.src.backend.torch import nn as torch_nn

    seen = []

    class Probe(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(hasattr(torch_nn.max_pool, "__wrapped__"))

    x, y = data()

    def fit(distribution):
        keras.utils.set_random_seed(0)
        model = conv_model()
        model.compile(optimizer=keras.optimizers.SGD(0.05),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[Probe()],
                  **({"distribution": distribution} if distribution else {}))
        return model.get_weights()

    strategy = {"default": ks.Default, "one_device": lambda: ks.OneDevice("cpu:0"),
                "mirrored": ks.Mirrored, "central_storage": ks.CentralStorage}[name]()
    plain = fit(None)
    assert seen == [False] * 3
    seen.clear()
    ours = fit(strategy)
    if name == "central_storage":
        assert seen == [True] * 3
        for a, b in zip(plain, ours):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    else:
        assert seen == [False] * 3
        for a, b in zip(plain, ours):
            np.testing.assert_array_equal(a, b)
