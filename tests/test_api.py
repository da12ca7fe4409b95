"""The public API: names, properties, repr, signatures."""

import inspect

import keras
import pytest

import keras_strategies as ks
from conftest import BACKEND

pytestmark = pytest.mark.in_process  # one process only: may run beside another backend's (tests/run_all.py)


def test_public_names():
    for name in ("Default", "OneDevice", "Mirrored", "Strategy", "StrategyError",
                 "UnsupportedStrategyError"):
        assert name in ks.__all__ and hasattr(ks, name)


def test_fit_evaluate_predict_show_distribution():
    for method in (keras.Model.fit, keras.Model.evaluate, keras.Model.predict):
        parameter = inspect.signature(method).parameters["distribution"]
        assert parameter.default is None
        assert parameter.kind is inspect.Parameter.KEYWORD_ONLY


def test_properties_and_repr(replica_devices):
    for strategy, replicas in (
        (ks.Default(), 1),
        (ks.OneDevice("cpu:0"), 1),
        (ks.Mirrored(devices=replica_devices), len(replica_devices)),
    ):
        assert strategy.num_replicas_in_sync == replicas
        assert strategy.num_workers == 1
        assert strategy.worker_index == 0
        assert strategy.is_chief is True
        assert strategy.backend == BACKEND
        text = repr(strategy)
        assert type(strategy).__name__ in text and BACKEND in text
        for device in strategy.devices:
            assert device in text
    assert ks.OneDevice("/device:CPU:0").devices == ["cpu:0"]


def _gpus():
    """This machine's GPUs, asked of the engine itself (not of the package)."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return len(tf.config.list_physical_devices("GPU"))
    if BACKEND == "jax":
        import jax

        return sum(d.platform == "gpu" for d in jax.devices())
    import torch

    return torch.cuda.device_count()


def test_mirrored_without_devices_uses_local_accelerators_or_one_cpu():
    strategy = ks.Mirrored()
    gpus = _gpus()
    if gpus and BACKEND == "torch":  # one process per GPU: this process's is one of them
        assert strategy.num_replicas_in_sync == gpus
        return
    assert strategy.devices == ([f"gpu:{i}" for i in range(gpus)] or ["cpu:0"])
    assert strategy.num_replicas_in_sync == max(1, gpus)


def test_scope_yields_strategy_and_nests():
    outer, inner = ks.Default(), ks.OneDevice("cpu:0")
    assert ks.current_strategy() is None
    with outer.scope() as entered:
        assert entered is outer and ks.current_strategy() is outer
        with inner.scope():
            assert ks.current_strategy() is inner
        assert ks.current_strategy() is outer
    assert ks.current_strategy() is None
