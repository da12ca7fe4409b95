"""MultiWorkerMirrored: synchronous data parallelism across processes.

What is the same on every backend lives here: the cluster description, the
global batch, which worker writes files, and the call-argument rewriting.
How the engines do it lives in `keras_strategies.backends.<name>.multi_worker`.
"""

import copy
import os
import shutil
import sys
import tempfile
import threading
import time

import keras

from keras_strategies.strategies import Strategy

DEFAULT_TIMEOUT = 1800.0
TIMEOUT_VARIABLE = "KERAS_STRATEGIES_TIMEOUT"

# Callbacks that print or write logs: dropped on non-chief workers.
_CHIEF_ONLY = (keras.callbacks.CSVLogger, keras.callbacks.ProgbarLogger)
# Callbacks that read the model to write it: non-chief workers run them into a
# scratch directory, because reading distributed variables can be a collective
# that every worker must join (TensorFlow's on-read variables).
_REDIRECTED = {keras.callbacks.ModelCheckpoint: "filepath", keras.callbacks.TensorBoard: "log_dir"}


def shuffle_seed():
    """The seed every worker shuffles with: Keras's global seed when set
    (`keras.utils.set_random_seed`, the same on every worker), else 0."""
    from keras.src.utils import rng_utils

    seed = rng_utils.get_random_seed()
    return 0 if seed is None else int(seed)


def default_timeout():
    """Seconds a worker waits for its peers before failing (env-configurable)."""
    return float(os.environ.get(TIMEOUT_VARIABLE, DEFAULT_TIMEOUT))


class MultiWorkerMirrored(Strategy):
    """Synchronous data parallelism over worker processes on one or more machines.

    Each process holds one replica per local device (one per process on a
    CPU); every step all-reduces the gradients over all replicas of all
    processes, so training equals one device on the global batch.

    The cluster is read from the environment: `TF_CONFIG`, torchrun's
    variables, `KERAS_DISTRIBUTION_*` or SLURM (see
    `keras_strategies.cluster.resolve_cluster`). Start the processes with
    `keras-strategies launch --nproc-per-node N train.py`, torchrun, srun, or
    by hand with a `TF_CONFIG` each.

    Args:
        cluster: a `keras_strategies.cluster.ClusterSpec`; read from the
            environment when `None`.
        timeout: seconds to wait for a peer (a collective, the rendezvous)
            before failing with a clear error. Defaults to the
            `KERAS_STRATEGIES_TIMEOUT` environment variable, else 1800.

    Example:
    ```python
    # train.py, started by: keras-strategies launch --nproc-per-node 2 train.py
    model.fit(x, y, batch_size=256, distribution=keras_strategies.MultiWorkerMirrored())
    ```
    """

    kind = "multi_worker_mirrored"
    implementation = "multi_worker"

    def __init__(self, cluster=None, timeout=None):
        if cluster is None:
            from keras_strategies.cluster import resolve_cluster

            cluster = resolve_cluster()
        self.cluster = cluster
        self.timeout = float(timeout) if timeout is not None else default_timeout()
        super().__init__(None, cluster=self.cluster, timeout=self.timeout)

    def __repr__(self):
        return (
            f"MultiWorkerMirrored(backend={self._backend!r}, devices={self.devices}, "
            f"worker={self.worker_index}/{self.num_workers})"
        )

    def _prepare_call(self, model, method, arguments):
        arguments = super()._prepare_call(model, method, arguments)
        if self.num_workers > 1:
            args = arguments.arguments
            args["callbacks"] = list(args.get("callbacks") or []) + [_Heartbeat()]
        if not self.is_chief:
            args = arguments.arguments
            if "verbose" in arguments.signature.parameters:
                args["verbose"] = 0
            if args.get("callbacks"):
                args["callbacks"] = non_chief_callbacks(args["callbacks"], self._scratch_dir())
        return arguments

    def _run(self, model, method, original, arguments):
        watchdog = _Watchdog(self) if self.num_workers > 1 else None
        try:
            return super()._run(model, method, original, arguments)
        finally:
            if watchdog is not None:
                watchdog.stop()
            self._cleanup_scratch()

    def _scratch_dir(self):
        if getattr(self, "_scratch", None) is None:
            self._scratch = tempfile.mkdtemp(prefix=f"keras-strategies-worker{self.worker_index}-")
        return self._scratch

    def _cleanup_scratch(self):
        if getattr(self, "_scratch", None):
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None


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
    """The callbacks a non-chief worker runs: no printing, no writing into the
    user's paths; decisions (EarlyStopping, ReduceLROnPlateau) still run, on
    the same global logs as the chief."""
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


_last_progress = [time.monotonic()]


class _Heartbeat(keras.callbacks.Callback):
    """Tells the watchdog that this worker still makes progress."""

    def _beat(self, *args, **kwargs):
        _last_progress[0] = time.monotonic()

    on_train_begin = on_epoch_begin = on_train_batch_end = _beat
    on_test_begin = on_test_batch_end = on_predict_begin = on_predict_batch_end = _beat
    on_epoch_end = on_test_end = on_predict_end = _beat


class _Watchdog:
    """Ends a worker that made no progress for `timeout` seconds.

    Some engines wait for a hung peer forever inside a collective (JAX's gloo
    collectives have no deadline), where no Python exception can reach the
    waiting thread. The watchdog prints a clear error and ends the process,
    so a hung peer never hangs the job.
    """

    def __init__(self, strategy):
        self.strategy = strategy
        self.done = threading.Event()
        _last_progress[0] = time.monotonic()
        self.thread = threading.Thread(target=self._watch, daemon=True, name="keras-strategies-watchdog")
        self.thread.start()

    def _watch(self):
        timeout = self.strategy.timeout
        while not self.done.wait(min(5.0, timeout / 4)):
            idle = time.monotonic() - _last_progress[0]
            if idle > timeout:
                s = self.strategy
                sys.stderr.write(
                    f"keras_strategies.WorkerError: {type(s).__name__} on the {s.backend} "
                    f"backend: worker {s.worker_index} lost contact with its peers: no "
                    f"step finished for {idle:.0f}s (a worker died or hung). Ending this "
                    "worker. See the other workers' output; timeout= (or "
                    "KERAS_STRATEGIES_TIMEOUT) sets how long to wait.\n"
                )
                sys.stderr.flush()
                os._exit(75)

    def stop(self):
        self.done.set()
        self.thread.join(timeout=10)
