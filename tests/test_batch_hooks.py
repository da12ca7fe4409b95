"""Keras's per-batch callback hooks under a distributing strategy (the
`unread-batch-logs` patch, keras_strategies/implementation/batch_hooks.py):
skipped where no callback overrides them, with empty logs where every
callback that does says it reads none, and exactly Keras's otherwise; `Default` keeps
Keras's own hooks."""

import keras
import numpy as np
import pytest
from keras.src.callbacks.callback_list import CallbackList

import keras_strategies as ks
from keras_strategies.implementation import batch_hooks
from models import build, initial_weights, make_data

pytestmark = pytest.mark.in_process

BATCH, N = 16, 64  # 4 batches
MODES = ("train", "test", "predict")


@pytest.fixture
def keras_batch_ends(monkeypatch):
    """How often Keras's own batch-end hooks ran their callbacks (the private
    `_on_<mode>_batch_end`, called by `on_<mode>_batch_end` in the main thread
    or in its thread pool), per mode."""
    counts = dict.fromkeys(MODES, 0)
    for mode in MODES:
        name = f"_on_{mode}_batch_end"
        original = getattr(CallbackList, name)

        def counting(self, batch, logs=None, _original=original, _mode=mode):
            counts[_mode] += 1
            return _original(self, batch, logs)

        monkeypatch.setattr(CallbackList, name, counting)
    return counts


def fit_evaluate_predict(strategy, callbacks=(), weights=None):
    x, y = make_data(n=N)
    model = build("functional", weights or initial_weights("functional"))
    history = model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
                        validation_data=(x, y), callbacks=list(callbacks), distribution=strategy)
    model.evaluate(x, y, batch_size=BATCH, verbose=0, callbacks=list(callbacks), distribution=strategy)
    model.predict(x, batch_size=BATCH, verbose=0, callbacks=list(callbacks), distribution=strategy)
    return model, history


class Recorder(keras.callbacks.Callback):
    """Records the logs of every batch end it gets."""

    def __init__(self):
        super().__init__()
        self.logs = {mode: [] for mode in MODES}

    def on_train_batch_end(self, batch, logs=None):
        self.logs["train"].append(logs)

    def on_test_batch_end(self, batch, logs=None):
        self.logs["test"].append(logs)

    def on_predict_batch_end(self, batch, logs=None):
        self.logs["predict"].append(logs)


class LogsUnused(Recorder):
    batch_logs_unused = True


class LegacyBatchEnd(keras.callbacks.Callback):
    """Overrides only the older `on_batch_end`, which Keras's default
    `on_train_batch_end` calls."""

    def __init__(self):
        super().__init__()
        self.logs = []

    def on_batch_end(self, batch, logs=None):
        self.logs.append(logs)


def test_no_callback_listening_skips_the_batch_hooks(replica_devices, keras_batch_ends):
    fit_evaluate_predict(ks.Mirrored(devices=replica_devices))
    # fit (with its validation), evaluate and predict ran 4 batches each; no
    # callback overrides a batch hook (History, no progress bar)
    assert keras_batch_ends == {"train": 0, "test": 0, "predict": 0}


def test_default_keeps_keras_own_batch_hooks(keras_batch_ends):
    fit_evaluate_predict(ks.Default())
    assert keras_batch_ends == {"train": 4, "test": 8, "predict": 4}


def test_a_callback_reading_logs_gets_them_as_from_keras(replica_devices):
    ours, plain, legacy = Recorder(), Recorder(), LegacyBatchEnd()
    fit_evaluate_predict(ks.Mirrored(devices=replica_devices), [ours, legacy])
    fit_evaluate_predict(ks.Default(), [plain])
    for mode in MODES:
        assert len(ours.logs[mode]) == len(plain.logs[mode]) == (8 if mode == "test" else 4)
        for got, expected in zip(ours.logs[mode], plain.logs[mode]):
            assert got.keys() == expected.keys()
            for key in got:  # Mirrored trains as one device does
                np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-6)
    assert legacy.logs == ours.logs["train"]


def test_callbacks_that_read_no_logs_get_empty_logs(replica_devices, keras_batch_ends):
    unused = LogsUnused()
    fit_evaluate_predict(ks.Mirrored(devices=replica_devices), [unused])
    assert {mode: len(unused.logs[mode]) for mode in MODES} == {"train": 4, "test": 8, "predict": 4}
    assert all(logs == {} for mode in MODES for logs in unused.logs[mode])  # nothing converted
    assert keras_batch_ends == {"train": 4, "test": 8, "predict": 4}  # through Keras's hooks
    # beside a callback that reads them, every callback gets the logs
    unused, reader = LogsUnused(), Recorder()
    fit_evaluate_predict(ks.Mirrored(devices=replica_devices), [unused, reader])
    assert unused.logs == reader.logs and reader.logs["train"][0]["loss"] > 0


def test_which_callbacks_listen():
    assert not batch_hooks.listens(keras.callbacks.History(), "on_train_batch_end")
    assert not batch_hooks.listens(keras.callbacks.EarlyStopping(), "on_train_batch_end")
    assert batch_hooks.listens(keras.callbacks.ProgbarLogger(), "on_train_batch_end")
    assert batch_hooks.listens(LegacyBatchEnd(), "on_train_batch_end")
    assert not batch_hooks.listens(LegacyBatchEnd(), "on_test_batch_end")
    lam = keras.callbacks.LambdaCallback(on_train_batch_begin=lambda batch, logs: None)
    assert batch_hooks.listens(lam, "on_train_batch_begin") and not batch_hooks.listens(lam, "on_train_batch_end")

    class Duck:  # not a keras Callback: only the hook it implements
        def on_train_batch_end(self, batch, logs=None):
            pass

    assert batch_hooks.listens(Duck(), "on_train_batch_end") and not batch_hooks.listens(Duck(), "on_test_batch_end")
    with pytest.raises(ValueError, match="not a CallbackList batch hook"):
        batch_hooks.logs_only_where_read(CallbackList.on_train_begin)
