"""TPU: a clear error on this TPU-less machine on every backend, and, with the
device discovery handed a list of devices, the right mesh, data split and
replica count."""

import importlib

import numpy as np
import pytest

import keras_strategies as ks
from conftest import BACKEND
from models import build, initial_weights, make_data

pytestmark = pytest.mark.in_process  # one process only: may run beside another backend's (tests/run_all.py)

MODULE = importlib.import_module(f"keras_strategies.backends.{BACKEND}.tpu")
MISSING = {
    "tensorflow": "no TPU was found",
    "jax": "no TPU devices were found",
    "torch": "torch_xla is not installed",
}


def test_no_tpu_here_gives_a_clear_error():
    with pytest.raises(ks.UnsupportedStrategyError) as error:
        ks.TPU()
    message = str(error.value)
    assert message.startswith(f"TPU on the {BACKEND} backend: ")
    assert MISSING[BACKEND] in message
    assert "TPU" in ks.__all__


def test_tpu_address_outside_tensorflow_or_unreachable(monkeypatch):
    if BACKEND == "tensorflow":
        def unreachable(tpu):
            raise ValueError(f"Could not connect to {tpu}")

        monkeypatch.setattr(MODULE, "connect_tpu", unreachable)
        expected = "could not connect to the TPU 'grpc://10.0.0.2:8470'"
    else:
        expected = "TensorFlow TPUClusterResolver setting"
    with pytest.raises(ks.UnsupportedStrategyError, match=expected):
        ks.TPU(tpu="grpc://10.0.0.2:8470")


def fake_tpu(monkeypatch, count):
    """Hands the TPU code path `count` devices instead of looking for a TPU."""
    if BACKEND == "jax":
        import jax

        monkeypatch.setattr(MODULE, "find_tpu_devices", lambda tpu: jax.devices("cpu")[:count])
    elif BACKEND == "torch":
        import torch

        devices = [(f"cpu:{i}", torch.device("cpu")) for i in range(count)]
        monkeypatch.setattr(MODULE, "find_tpu_devices", lambda tpu: devices)
    else:
        created = []

        class FakeTPUStrategy:
            num_replicas_in_sync = count

            def __init__(self, resolver):
                created.append(resolver)

        monkeypatch.setattr(
            MODULE, "connect_tpu", lambda tpu: ("resolver", [f"tpu:{i}" for i in range(count)])
        )
        monkeypatch.setattr(MODULE, "TPUStrategy", FakeTPUStrategy)
        return created


def test_replica_count_and_batch_split_from_the_devices(monkeypatch):
    count = 8 if BACKEND == "tensorflow" else 2
    created = fake_tpu(monkeypatch, count)
    strategy = ks.TPU()
    assert strategy.num_replicas_in_sync == count
    assert len(strategy.devices) == count
    if BACKEND == "tensorflow":
        assert strategy.devices == [f"tpu:{i}" for i in range(8)]
        assert created == ["resolver"]  # TPUStrategy built from the resolver
    x, y = make_data(n=64)
    model = build("functional", initial_weights("functional"))
    with pytest.raises(ks.StrategyError, match=f"not a multiple of {count}"):
        model.fit(x, y, batch_size=count * 2 + 1, distribution=strategy, verbose=0)


@pytest.mark.skipif(BACKEND == "tensorflow", reason="TPUStrategy needs a real TPU to run")
def test_fake_tpu_devices_train_like_one_device(monkeypatch):
    """On two stand-in devices the TPU path shards each batch 8/8 and trains
    to the single-device weights (BatchNormalization included)."""
    fake_tpu(monkeypatch, 2)
    strategy = ks.TPU()
    x, y = make_data(n=64)
    weights = initial_weights("functional", batch_norm=True)
    ref = build("functional", weights, batch_norm=True)
    ref.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    with strategy.scope():
        model = build("functional", weights, batch_norm=True)
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    for got, want in zip(model.get_weights(), ref.get_weights()):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    if BACKEND == "jax":
        mesh = strategy.native.device_mesh
        assert mesh.shape == (2,) and mesh.axis_names == ["batch"]
        layout = strategy.native.get_data_layout((16, 8))
        assert tuple(layout.axes) == ("batch", None)
        sharding = layout.backend_layout
        assert sharding.shard_shape((16, 8)) == (8, 8)
    else:
        assert strategy._impl.last_step["batch_sizes"] == [8, 8]
