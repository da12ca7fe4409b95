"""numpy, tf.data, PyDataset and torch DataLoader inputs under Mirrored give
single-device results (69 samples: the last batch of 5 is uneven)."""

import keras
import numpy as np
import pytest
import tensorflow as tf
import torch

import keras_strategies as ks
from models import build, initial_weights, make_data

pytestmark = pytest.mark.in_process  # one process only: may run beside another backend's (tests/run_all.py)

BATCH = 16


class Batches(keras.utils.PyDataset):
    def __init__(self, x, y):
        super().__init__()
        self.x, self.y = x, y

    def __len__(self):
        return -(-len(self.x) // BATCH)

    def __getitem__(self, i):
        return self.x[i * BATCH:(i + 1) * BATCH], self.y[i * BATCH:(i + 1) * BATCH]


def make_input(kind, x, y):
    if kind == "numpy":
        return (x, y), {"batch_size": BATCH}
    if kind == "tf_data":
        return (tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH),), {}
    if kind == "py_dataset":
        return (Batches(x, y),), {}
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    return (torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=False),), {}


@pytest.mark.parametrize("kind", ["numpy", "tf_data", "py_dataset", "torch_dataloader"])
def test_inputs_under_mirrored(kind, replica_devices):
    x, y = make_data()
    weights = initial_weights("functional")
    ref = build("functional", weights)
    ref_history = ref.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)

    model = build("functional", weights)
    strategy = ks.Mirrored(devices=replica_devices)
    args, kwargs = make_input(kind, x, y)
    history = model.fit(*args, **kwargs, epochs=2, shuffle=False, verbose=0, distribution=strategy)
    for got, want in zip(model.get_weights(), ref.get_weights()):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(history.history["loss"], ref_history.history["loss"], atol=1e-5)

    args, kwargs = make_input(kind, x, y)
    np.testing.assert_allclose(
        model.evaluate(*args, **kwargs, verbose=0, distribution=strategy),
        ref.evaluate(x, y, batch_size=BATCH, verbose=0), atol=1e-5)
    args, kwargs = make_input(kind, x, y)
    predictions = model.predict(args[0], verbose=0, distribution=strategy, **kwargs)
    np.testing.assert_allclose(predictions, ref.predict(x, batch_size=BATCH, verbose=0), atol=1e-5)
