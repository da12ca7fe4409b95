"""Every Keras training feature under every strategy of one process, exactly as
on one device (tests/features.py lists them; the multi-process strategies run
the same cases in tests/test_multi_worker.py and tests/test_parameter_server.py)."""

import functools

import pytest

import keras_strategies as ks
from conftest import BACKEND, REPLICA_DEVICES
from features import BY_NAME, CASES, check_save_and_load, compare

pytestmark = pytest.mark.in_process  # one process only: may run beside another backend's (tests/run_all.py)


@functools.lru_cache(maxsize=None)
def one_device(name):
    return BY_NAME[name].train()


STRATEGIES = {
    "default": lambda: ks.Default(),
    "mirrored": lambda: ks.Mirrored(devices=REPLICA_DEVICES),
    "central_storage": lambda: ks.CentralStorage(devices=["cpu:0", "cpu:1"]),
}
if BACKEND == "torch":  # Mirrored over two devices is two processes there: tests/test_multi_worker.py
    del STRATEGIES["mirrored"]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_feature_trains_as_on_one_device(strategy, case):
    want = one_device(case.name)
    if BACKEND in case.keras_refuses:
        assert case.keras_refuses[BACKEND] in want.get("error", ""), want
    got = case.train(distribution=STRATEGIES[strategy]())
    compare(case, got, want)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_a_second_fit_after_use_ema(strategy):
    """Plain Keras 3.15 on JAX cannot fit a model with `use_ema` again after
    an evaluate ("Buffer has been deleted or donated":
    docs/upstream/jax-ema-donated-average.md); under every strategy it can."""
    case = BY_NAME["use_ema"]
    model = case.build()
    x, y, kwargs, (xv, yv) = case.arguments()
    distribution = STRATEGIES[strategy]()
    model.fit(x, y, **kwargs, distribution=distribution)
    model.evaluate(xv, yv, verbose=0, distribution=distribution)
    history = model.fit(x, y, **{**kwargs, "epochs": 1}, distribution=distribution)
    assert len(history.history["loss"]) == 1


@pytest.mark.parametrize("pattern", ["fit_argument", "scope"])
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_save_and_load_model_after_training(strategy, pattern, tmp_path):
    """Trained under the strategy (passed to fit, or the model built in its
    scope), with momentum slots: equal to one device, then saved and loaded."""
    case = BY_NAME["momentum"]
    chosen = STRATEGIES[strategy]()
    if pattern == "scope":
        got = case.train(scope=chosen, keep_model=True)
    else:
        got = case.train(distribution=chosen, keep_model=True)
    compare(case, got, one_device(case.name))
    check_save_and_load(got, str(tmp_path / "model.keras"))


@pytest.mark.parametrize("strategy", sorted(set(STRATEGIES) - {"default"}))
def test_one_data_iterator_an_epoch_and_none_to_build_from(strategy, monkeypatch):
    """Keras makes an iterator at each epoch's end that the next epoch never
    uses (without steps_per_epoch): under tf.distribute a multi-device
    iterator, ~0.15 s with its buffers filled. And on TensorFlow every fit,
    evaluate and predict opened one more to draw a batch for the symbolic
    build, dropped mid-prefetch (~0.15 s; once a segfault in a TensorFlow
    thread): there the build reads the dataset's element spec instead. On
    JAX and torch the first fit draws a batch from a host iterator (no
    devices, no threads). TensorFlow `Mirrored` and `CentralStorage` read a
    fit's arrays as one endless dataset (backends/tensorflow/one_iterator.py):
    one iterator for the whole fit. The training is still one device's (the cases above)."""
    from keras.src.trainers.epoch_iterator import EpochIterator

    made, classes = [], [EpochIterator]
    for cls in classes:  # the backends' own iterators override _get_iterator
        classes.extend(cls.__subclasses__())
        if "_get_iterator" in vars(cls):
            monkeypatch.setattr(cls, "_get_iterator", _counted(vars(cls)["_get_iterator"], made))
    case = BY_NAME["plain"]
    model = case.build()
    x, y, kwargs, _ = case.arguments()
    distribution = STRATEGIES[strategy]()
    history = model.fit(x, y, **kwargs, distribution=distribution)
    epochs = len(history.history["loss"])
    assert epochs == 3
    if BACKEND == "tensorflow":
        assert len(made) == (1 if strategy in ("mirrored", "central_storage") else epochs), made
    else:
        assert len(made) == epochs + 1, made
    made.clear()
    model.evaluate(x, y, verbose=0, distribution=distribution)
    assert len(made) == 1, made
    made.clear()
    model.predict(x, verbose=0, distribution=distribution)
    assert len(made) == 1, made


def _counted(get, made):
    def _get_iterator(self):
        made.append(type(self).__name__)
        return get(self)

    return _get_iterator
