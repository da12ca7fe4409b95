"""Each clear error the foundation promises."""

import os
import subprocess
import sys
import textwrap

import pytest

import keras_strategies as ks
from conftest import BACKEND
from models import build, initial_weights, make_data


def test_model_built_under_one_strategy_fitted_with_another(replica_devices):
    x, y = make_data(n=32)
    with ks.Mirrored(devices=replica_devices).scope():
        model = build("functional", initial_weights("functional"))
    with pytest.raises(ks.StrategyError, match="built under Mirrored.*cannot be run with OneDevice"):
        model.fit(x, y, batch_size=16, verbose=0, distribution=ks.OneDevice("cpu:0"))


def test_distribution_must_be_a_strategy():
    x, y = make_data(n=32)
    model = build("functional")
    with pytest.raises(ks.StrategyError, match="takes a keras_strategies strategy"):
        model.fit(x, y, distribution="mirrored")


@pytest.mark.parametrize("name", ["gpu:0", "tpu:0"])
def test_unknown_device(name):
    with pytest.raises(ks.StrategyError, match=rf"unknown device.*{name}.*this machine has"):
        ks.OneDevice(name)


def test_malformed_device_names():
    with pytest.raises(ks.StrategyError, match="Unknown device 'abc:0'"):
        ks.OneDevice("abc:0")
    with pytest.raises(ks.StrategyError, match="each device may appear once"):
        ks.Mirrored(devices=["cpu:0", "cpu:0"])
    with pytest.raises(ks.StrategyError, match="takes one device name"):
        ks.OneDevice(["cpu:0"])


def _run(code, **env):
    environment = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    environment.update(env, KERAS_BACKEND=BACKEND)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=240, env=environment,
    )


if BACKEND in ("tensorflow", "jax"):

    def test_indivisible_global_batch(replica_devices):
        x, y = make_data(n=32)
        model = build("functional")
        strategy = ks.Mirrored(devices=replica_devices)
        with pytest.raises(ks.StrategyError, match="batch_size=5 is not a multiple of 2.*such as 4 or 6"):
            model.fit(x, y, batch_size=5, verbose=0, distribution=strategy)
        with pytest.raises(ks.StrategyError, match="batch_size=9 is not a multiple of 2"):
            model.predict(x, batch_size=9, verbose=0, distribution=strategy)

    def test_cpu_replicas_created_before_backend_start():
        result = _run("""
            import keras_strategies as ks
            s = ks.Mirrored(devices=["cpu:0", "cpu:1", "cpu:2"])
            print("replicas", s.num_replicas_in_sync)
        """)
        assert result.returncode == 0, result.stderr
        assert "replicas 3" in result.stdout

    def test_cpu_replicas_requested_after_backend_start():
        result = _run("""
            import keras, keras_strategies as ks
            keras.layers.Dense(2).build((None, 3))  # the backend starts here
            ks.Mirrored(devices=["cpu:0", "cpu:1"])
        """)
        assert result.returncode != 0
        fix = {
            "jax": "XLA_FLAGS=--xla_force_host_platform_device_count=2",
            "tensorflow": "tf.config.set_logical_device_configuration",
        }[BACKEND]
        assert "StrategyError" in result.stderr and fix in result.stderr, result.stderr
        assert "already started" in result.stderr

else:  # torch: several devices means one process per device

    def test_torch_mirrored_over_several_devices_cannot_start_from_python_c():
        result = _run("""
            import keras_strategies as ks
            ks.Mirrored(devices=["cpu:0", "cpu:1"])
        """)
        assert result.returncode != 0
        assert "UnsupportedStrategyError: Mirrored on the torch backend" in result.stderr
        assert "keras-strategies launch --nproc-per-node 2" in result.stderr, result.stderr
