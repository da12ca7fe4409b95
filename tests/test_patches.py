"""The package's changes to Keras: all listed in one table, applied only during
its own runs, and removable (`keras_strategies.uninstall()`)."""

import inspect
import os
import subprocess
import sys
import tempfile
import warnings

import keras
import numpy as np
import pytest

import keras_strategies as ks
from conftest import BACKEND
from keras_strategies import patches
from models import build, initial_weights, make_data

INSTALLED = ["distribution-argument", "scope-ownership"]


def run_patch_sites():
    """Every Keras attribute a "run" patch of this backend replaces."""
    return [
        (patch.name, owner, attribute)
        for patch in patches.PATCHES
        if patch.scope == "run" and BACKEND in patch.backends
        for owner, attribute in patches._sites(patch)
    ]


def keras_own(owner, attribute):
    """Whether the attribute is Keras's own code, not this package's."""
    value = getattr(owner, attribute)
    return getattr(value, "__module__", "").startswith("keras.")


def train_under_every_strategy(replica_devices):
    x, y = make_data(n=32)
    for strategy in (ks.Default(), ks.Mirrored(devices=replica_devices),
                     ks.CentralStorage(devices=replica_devices), ks.MultiWorkerMirrored()):
        model = build("functional", initial_weights("functional", batch_norm=True), batch_norm=True)
        seen = []

        class Probe(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                seen.append(patches.applied())

        # a BackupAndRestore brings in its patch (resume-mid-epoch) too
        backup = keras.callbacks.BackupAndRestore(tempfile.mkdtemp(prefix="ks-test-backup-"))
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[Probe(), backup], distribution=strategy)
        yield strategy, seen


def test_run_patches_apply_during_runs_only(replica_devices):
    sites = run_patch_sites()
    assert sites, "this backend has run patches"
    assert all(keras_own(owner, attribute) for _, owner, attribute in sites)
    used = set()
    for strategy, seen in train_under_every_strategy(replica_devices):
        assert seen and all(set(names) >= set(strategy._impl.keras_patches) for names in seen)
        used.update(name for names in seen for name in names)
        # after the run: only the plugin, and Keras's own functions everywhere
        assert patches.applied() == INSTALLED
        assert all(keras_own(owner, attribute) for _, owner, attribute in sites)
    # the runs used (so the check above restored) every run patch but the ones
    # for strategies not run here (TPU: none; torch layouts need a conv model)
    assert {name for name, _, _ in sites} - used <= {"torch-copy-free-layouts", "jax-callbacks-local"}


def test_plain_keras_after_the_packages_runs_behaves_as_unpatched(replica_devices):
    for _ in train_under_every_strategy(replica_devices):
        pass
    x, y = make_data(n=36)
    if BACKEND == "jax":
        # Unpatched Keras refuses a batch that does not divide over the devices
        # (the package replicates it during its own runs only).
        distribution = keras.distribution.DataParallel(devices=replica_devices)
        with distribution.scope():
            model = build("functional", initial_weights("functional"))
            with pytest.raises(ValueError, match="divisible|partitioned"):
                model.fit(x, y, batch_size=5, epochs=1, verbose=0, shuffle=False)
    elif BACKEND == "tensorflow":
        import tensorflow as tf
        from keras.src.losses import loss as loss_module

        # Unpatched Keras scales each replica's loss by 1/replicas, whatever its share.
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        scaled = strategy.run(lambda: loss_module.scale_loss_for_distribution(tf.constant(1.0)))
        assert [float(v) for v in strategy.experimental_local_results(scaled)] == [0.5, 0.5]
    else:
        from keras.src.layers.normalization.batch_normalization import BatchNormalization

        assert BatchNormalization._moments.__module__.startswith("keras.")
    model = build("functional", initial_weights("functional"))
    history = model.fit(x, y, batch_size=12, epochs=1, verbose=0, shuffle=False)
    reference = build("functional", initial_weights("functional"))
    ks.uninstall()
    try:
        expected = reference.fit(x, y, batch_size=12, epochs=1, verbose=0, shuffle=False)
    finally:
        ks.install()
    np.testing.assert_allclose(history.history["loss"], expected.history["loss"], rtol=1e-6)


def test_uninstall_restores_keras_and_install_brings_it_back(replica_devices):
    from keras.src.models.model import Model
    from keras.src.trainers import trainer

    assert "fit" in vars(Model)
    ks.uninstall()
    try:
        assert patches.applied() == []
        for name in ("fit", "evaluate", "predict"):
            assert name not in vars(Model)  # Keras defines them on the backend trainer
            assert "distribution" not in inspect.signature(getattr(keras.Model, name)).parameters
        assert trainer.Trainer.__init__.__module__ == "keras.src.trainers.trainer"
        x, y = make_data(n=32)
        model = build("functional")
        with pytest.raises(TypeError, match="distribution"):
            model.fit(x, y, distribution=ks.Default())
        with ks.Mirrored(devices=replica_devices).scope():
            scoped = build("functional")
        assert "_ks_strategy" not in scoped.__dict__
    finally:
        ks.install()
    assert patches.applied() == INSTALLED
    assert "distribution" in inspect.signature(keras.Model.fit).parameters


def test_every_patch_is_documented_and_model_patches_are_checked():
    for patch in patches.PATCHES:
        assert patch.why and patch.scope in ("installed", "run", "model")
        assert set(patch.backends) <= {"tensorflow", "jax", "torch"}
        assert bool(patch.replacement) == (patch.scope != "model")
    model = build("functional")
    with pytest.raises(KeyError):
        with patches.overriding(model, "train_step", None, "no-such-patch"):
            pass
    with pytest.raises(ValueError, match="not a model patch"):
        with patches.overriding(model, "train_step", None, "tf-loss-share"):
            pass
    with patches.overriding(model, "train_step", "stand-in", "torch-ddp-step"):
        assert model.train_step == "stand-in"
    assert "train_step" not in model.__dict__


def test_keras_outside_the_tested_range_gets_one_clear_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert patches.check_keras_version(keras.__version__)
        assert not patches.check_keras_version("3.14.2")
        assert not patches.check_keras_version("3.16.0")
    assert len(caught) == 2
    assert all(issubclass(w.category, patches.UntestedKerasWarning) for w in caught)
    assert ">=3.15.0,<3.16.0" in str(caught[0].message) and "3.14.2" in str(caught[0].message)
    # at import, in a fresh process
    env = dict(os.environ, KERAS_BACKEND=BACKEND)
    code = "import keras; keras.__version__ = '3.99.0'; import keras_strategies"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.count("tested with Keras >=3.15.0,<3.16.0, and this is Keras 3.99.0") == 1


def test_every_error_has_one_base():
    from keras_strategies.errors import LaunchError

    for error in (ks.StrategyError, ks.UnsupportedStrategyError, ks.WorkerError, ks.ClusterError,
                  LaunchError):
        assert issubclass(error, ks.KerasStrategiesError)
    assert issubclass(ks.StrategyError, ValueError) and issubclass(ks.WorkerError, RuntimeError)


def test_two_run_patches_of_one_target_unwind_to_keras_own():
    """`epoch-spare-iterator` and `resume-mid-epoch` both replace
    `EpochIterator._enumerate_iterator` (as `jax-one-device-mesh` and
    `jax-uneven-device-put` both replace JAX's `distribute_tensor`): entered
    together, the second wraps the first, and leaving restores the last
    applied first, so Keras's own function is back, not the first patch's."""
    from keras.src.trainers.epoch_iterator import EpochIterator

    own = vars(EpochIterator)["_enumerate_iterator"]
    with patches.active(("epoch-spare-iterator", "resume-mid-epoch")):
        assert vars(EpochIterator)["_enumerate_iterator"] is not own
    assert vars(EpochIterator)["_enumerate_iterator"] is own
    assert patches.applied() == INSTALLED
