"""torch: the multi-process training step (`backends/torch/ddp.py`) in one
process, on a one-rank gloo group: the step's own code with no second process.

What it checks: the example count and the metric state ride in DDP's gradient
all-reduce (the step makes no collective of its own), and the step trains as
plain Keras does, logs included.
"""

import socket

import keras
import numpy as np
import pytest

from conftest import BACKEND

pytestmark = [pytest.mark.in_process, pytest.mark.skipif(
    BACKEND != "torch", reason="the DDP step is torch-backend code (backends/torch/ddp.py)"
)]


@pytest.fixture
def one_rank_group(monkeypatch):
    """A one-rank gloo group, and MultiWorkerMirrored taking its multi-process path on it."""
    import torch.distributed as dist

    from keras_strategies.backends.torch import multi_worker

    if dist.is_initialized():
        pytest.fail("a process group is already initialized in this test process")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    monkeypatch.setattr(multi_worker.TorchMultiWorkerMirrored, "multi_process", property(lambda self: True))
    try:
        yield
    finally:
        dist.destroy_process_group()


def fit(distribution, x, y, callbacks=()):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    outputs = keras.layers.Dense(3)(keras.layers.Dense(8, activation="relu")(inputs))
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy", keras.metrics.SparseCategoricalCrossentropy(from_logits=True)])
    kwargs = {"distribution": distribution} if distribution is not None else {}
    history = model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0, callbacks=list(callbacks), **kwargs)
    return model.get_weights(), history.history


def test_count_and_metrics_ride_in_the_gradient_all_reduce_and_it_trains_as_keras(one_rank_group, monkeypatch):
    import torch.distributed as dist

    import keras_strategies as ks
    from keras_strategies.backends.torch import metrics

    rng = np.random.default_rng(0)
    x = rng.normal(size=(69, 6)).astype("float32")  # the last batch of 5: the count is not the batch size
    y = rng.integers(0, 3, size=69).astype("int32")
    reductions = []  # the metrics' own all-reduces once training began (the state was not carried)
    training = []

    class CountingDist:
        def __getattr__(self, name):
            return getattr(dist, name)

        def all_reduce(self, *args, **kwargs):
            if training:
                reductions.append(1)
            return dist.all_reduce(*args, **kwargs)

    class Training(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            training.append(batch)

    monkeypatch.setattr(metrics, "dist", CountingDist())
    got_weights, got_history = fit(ks.MultiWorkerMirrored(), x, y, [Training()])
    want_weights, want_history = fit(None, x, y)
    assert len(training) == 3 * 5 and not reductions
    for got, want in zip(got_weights, want_weights):  # float rounding: the count is divided in the update
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert got_history.keys() == want_history.keys()
    for key, values in want_history.items():
        np.testing.assert_allclose(got_history[key], values, rtol=1e-5, atol=1e-6, err_msg=key)
