"""What only the chief of a multi-process job does: print progress and write
the user's files.

Every other process runs the callbacks that take decisions (EarlyStopping,
ReduceLROnPlateau, ...) on the same global logs as the chief, runs the ones
that write files into a scratch directory of its own (reading distributed
variables to save them can be a collective every worker must join:
TensorFlow's on-read variables), and drops the ones that only print or log.
"""

import copy
import os

import keras

# Callbacks that print or write logs: dropped on non-chief workers.
_CHIEF_ONLY = (keras.callbacks.CSVLogger, keras.callbacks.ProgbarLogger)
# Callbacks that read the model to write it: non-chief workers run them into a
# scratch directory.
_REDIRECTED = {keras.callbacks.ModelCheckpoint: "filepath", keras.callbacks.TensorBoard: "log_dir"}


class _ReadOnlyBackup(keras.callbacks.BackupAndRestore):
    """A non-chief's BackupAndRestore: restores from the chief's backup,
    writes its own backups into a scratch directory, never the user's."""

    def __init__(self, original, scratch):
        super().__init__(
            backup_dir=original.backup_dir,
            save_freq=original.save_freq,
            double_checkpoint=getattr(original, "double_checkpoint", False),
            delete_checkpoint=original.delete_checkpoint,
        )
        self._scratch_dir = os.path.join(scratch, "backup")

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)  # reads the chief's files, if any
        self._redirect()

    _PATHS = (
        "_weights_path",
        "_training_metadata_path",
        "_prev_weights_path",
        "_prev_training_metadata_path",
    )

    def _redirect(self):
        for name in self._PATHS:
            value = getattr(self, name, None)
            if isinstance(value, str) and value.startswith(self.backup_dir):
                setattr(self, name, value.replace(self.backup_dir, self._scratch_dir, 1))
        # Keras creates `backup_dir` before each save: a non-chief creating
        # the user's directory raced the chief's own makedirs (FileExistsError).
        self.backup_dir = self._scratch_dir
        os.makedirs(self._scratch_dir, exist_ok=True)

    def on_train_end(self, logs=None):
        pass  # the chief deletes (or keeps) the real backup


def non_chief_callbacks(callbacks, scratch):
    """The callbacks a non-chief worker runs.

    Args:
        callbacks: the user's callbacks.
        scratch: a directory of this worker's own for what it must write.

    Returns:
        A new list: no printing, no writing into the user's paths; decisions
        (EarlyStopping, ReduceLROnPlateau) still run.
    """
    kept = []
    for callback in callbacks:
        redirected = [a for t, a in _REDIRECTED.items() if isinstance(callback, t)]
        if isinstance(callback, keras.callbacks.BackupAndRestore):
            kept.append(_ReadOnlyBackup(callback, scratch))
        elif redirected:
            twin = copy.copy(callback)
            path = str(getattr(callback, redirected[0]))
            setattr(twin, redirected[0], os.path.join(scratch, os.path.basename(path.rstrip("/"))))
            kept.append(twin)
        elif not isinstance(callback, _CHIEF_ONLY):
            kept.append(callback)
    return kept


def for_this_worker(arguments, is_chief, scratch, extra_callbacks=()):
    """Rewrites a fit/evaluate/predict call for this worker of a job.

    Args:
        arguments: the call's `inspect.BoundArguments` (changed in place).
        is_chief: whether this process is the chief.
        scratch: a callable returning this worker's scratch directory.
        extra_callbacks: callbacks every worker runs too (the heartbeat).

    Returns:
        The same `arguments`.
    """
    args = arguments.arguments
    callbacks = list(args.get("callbacks") or [])
    if not is_chief:
        if "verbose" in arguments.signature.parameters:
            args["verbose"] = 0
        if callbacks:
            callbacks = non_chief_callbacks(callbacks, scratch())
    if callbacks or extra_callbacks:
        args["callbacks"] = callbacks + list(extra_callbacks)
    return arguments
