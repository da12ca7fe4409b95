"""Keras's per-batch callback hooks, with logs only for callbacks that read them.

At every batch of `fit`, `evaluate` and `predict`, Keras's `CallbackList`
converts the step's logs to Python floats (`pythonify_logs`) before it calls
each callback's batch hook, also when no callback overrides that hook (a run
with `verbose=0` and epoch-level callbacks only: every hook it calls is
`Callback`'s empty default). On JAX and PyTorch, where Keras calls its
backend thread-safe, it hands that call to a thread pool at every batch
(about 80 us of the main thread's time, and a pool thread waiting for the
step); else it converts in the main thread, which then waits for the step's
result before it can start the next step (JAX dispatches steps ahead
otherwise). The per-batch callbacks of this package (`Heartbeat`,
`ExactBackup`) read no logs, yet make every multi-process run pay that.

The `unread-batch-logs` patch (`keras_strategies.patches`), active while a
distributing strategy runs: a batch hook that no callback overrides is
skipped, and one whose overriding callbacks all say they read no logs
(`batch_logs_unused = True`, as ours do) gets none to convert (its
callbacks get `{}`). Every callback that overrides a hook without saying so
gets it exactly as from Keras. Measured: JAX `Mirrored`, the benchmark MLP,
1.07-1.08x with it, one process, in turns; elsewhere within 2%
(docs/benchmarks/README.md).
"""

from keras.src import utils

# A CallbackList hook -> the Callback methods that are called for it (the
# train hooks' defaults call the older `on_batch_*` ones).
_CALLED = {
    "on_train_batch_begin": ("on_train_batch_begin", "on_batch_begin"),
    "on_train_batch_end": ("on_train_batch_end", "on_batch_end"),
    "on_test_batch_begin": ("on_test_batch_begin",),
    "on_test_batch_end": ("on_test_batch_end",),
    "on_predict_batch_begin": ("on_predict_batch_begin",),
    "on_predict_batch_end": ("on_predict_batch_end",),
}


def listens(callback, hook):
    """Whether `callback` overrides a method that the `CallbackList` hook
    `hook` calls (else each of them is `Callback`'s empty default).

    Args:
        callback: a `keras.callbacks.Callback`.
        hook: a `CallbackList` batch hook's name, e.g. `"on_train_batch_end"`.

    Returns:
        `True` when calling the hook on `callback` can do anything.
    """
    for name in _CALLED[hook]:
        method = getattr(callback, name, None)  # a callback not derived from Callback may lack one
        if method is not None and not utils.is_default(method):
            return True
    return False


def logs_only_where_read(original):
    """The replacement of one `CallbackList` batch hook (patch
    `unread-batch-logs`).

    Args:
        original: Keras's `CallbackList.on_<mode>_batch_<begin|end>` (or
            another patch's replacement of it, which keeps its `__name__`).

    Returns:
        The hook: skipped when no callback listens; given `logs=None` (its
        callbacks get `{}`) when every listening callback has
        `batch_logs_unused = True`; else the original, unchanged.

    Example:
    ```python
    class Beat(keras.callbacks.Callback):
        batch_logs_unused = True  # never reads `logs`
        def on_train_batch_end(self, batch, logs=None):
            ...
    ```
    """
    hook = original.__name__
    if hook not in _CALLED:
        raise ValueError(f"unread-batch-logs: {hook!r} is not a CallbackList batch hook")

    def batch_hook(self, batch, logs=None):
        listening = [callback for callback in self.callbacks if listens(callback, hook)]
        if not listening:
            return None
        if all(getattr(callback, "batch_logs_unused", False) for callback in listening):
            logs = None
        return original(self, batch, logs)

    batch_hook.__name__ = hook
    return batch_hook
