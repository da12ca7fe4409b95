"""A hung peer never hangs the job: the heartbeat and the watchdog."""

import os
import sys
import threading
import time

import keras

from keras_strategies.errors import WORKER_LOST_EXIT_CODE

_last_progress = [time.monotonic()]


class Heartbeat(keras.callbacks.Callback):
    """Tells the watchdog that this worker still makes progress."""

    batch_logs_unused = True  # its batch hooks get no logs (implementation.batch_hooks)

    def _beat(self, *args, **kwargs):
        _last_progress[0] = time.monotonic()

    on_train_begin = on_epoch_begin = on_train_batch_end = _beat
    on_test_begin = on_test_batch_end = on_predict_begin = on_predict_batch_end = _beat
    on_epoch_end = on_test_end = on_predict_end = _beat


def beat():
    """Records progress (for loops that run no Keras callbacks)."""
    _last_progress[0] = time.monotonic()


class Watchdog:
    """Ends a worker that made no progress for `timeout` seconds.

    Some engines wait for a hung peer forever inside a collective (JAX's gloo
    collectives have no deadline), where no Python exception can reach the
    waiting thread. The watchdog prints the `WorkerError` text and ends the
    process with exit code 75 (`WORKER_LOST_EXIT_CODE`), so a hung peer never
    hangs the job. `except WorkerError` cannot catch this.

    Args:
        implementation: the multi-process implementation (its `name`,
            `backend`, `worker_index` and `timeout` are read).

    Example:
    ```python
    with Watchdog(implementation):
        model.fit(...)  # a Heartbeat callback records each step
    ```
    """

    def __init__(self, implementation):
        self.implementation = implementation
        self.done = threading.Event()
        self.thread = None

    def __enter__(self):
        beat()
        self.thread = threading.Thread(target=self._watch, daemon=True, name="keras-strategies-watchdog")
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.done.set()
        self.thread.join(timeout=10)
        return False

    def _watch(self):
        timeout = self.implementation.timeout
        while not self.done.wait(min(5.0, timeout / 4)):
            idle = time.monotonic() - _last_progress[0]
            if idle > timeout:
                s = self.implementation
                sys.stderr.write(
                    f"keras_strategies.WorkerError: {s.name} on the {s.backend} "
                    f"backend: {s.describe()} lost contact with its peers: no "
                    f"step finished for {idle:.0f}s (a worker died or hung). Ending this "
                    f"worker (exit code {WORKER_LOST_EXIT_CODE}). See the other workers' output; "
                    "timeout= (or KERAS_STRATEGIES_TIMEOUT) sets how long to wait.\n"
                )
                sys.stderr.flush()
                os._exit(WORKER_LOST_EXIT_CODE)
