"""Exact resume from `keras.callbacks.BackupAndRestore` under every strategy.

Keras's own callback resumes at the start of the epoch it was in (the step
it saved is never used, so a mid-epoch backup trains some batches twice),
writes its file in place (a process killed while writing leaves a truncated
file the next run cannot open), and on a multi-process job every worker
restores from its own disk. While one of this package's strategies runs a
`fit` with a `BackupAndRestore`, `ExactBackup` takes its place:

- **Where**: the backup records the epoch and the step within it; the rerun
  starts at that step (`skipping_enumerate` passes over the batches already
  trained), with the optimizer's state and iterations (so the learning-rate
  schedule), and draws the same shuffle order for every epoch (arrays are
  shuffled with the package's seeded permutation, `data.ShuffledShards`).
- **Safe files**: `backup_files` writes each backup into a temporary
  directory and renames it into place, keeping the previous one; a backup
  that cannot be read is passed over, with one warning line.
- **One writer, one reader**: only the chief reads and writes the backup
  directory. On resume it sends the backup over the strategy's own
  collectives, so every worker loads the chief's state even when it cannot
  read the chief's disk, and with any number of workers (the global batches
  do not depend on it).
- **Any backend**: Keras's `.weights.h5` plus a JSON state: a backup written
  under one backend resumes under another. A backup written for another
  model or optimizer raises a `StrategyError` naming the difference, and
  nothing in it is changed.
- **Preemption**: SIGTERM makes every worker save after the same step and
  exit with `PREEMPTED_EXIT_CODE` (see `preemption`).
"""

import contextlib
import json
import logging
import os
import shutil
import tempfile
import threading

import keras

from keras_strategies import patches
from keras_strategies.errors import StrategyError
from keras_strategies.implementation import backup_files
from keras_strategies.implementation import data as data_lib
from keras_strategies.implementation.preemption import SigtermFlag, preempted_exit

FORMAT = 1
PATCH = "resume-mid-epoch"
# Across processes, the SIGTERM flags are compared every this many steps: a
# preempted job stops (and backs up) at most this many steps after the signal.
AGREE_EVERY = 10
logger = logging.getLogger("keras_strategies")
_pending = threading.local()  # steps the next training epoch starts at


# -- what a backup was written for ------------------------------------------
def signature(model):
    """What must match for a backup to load into `model`: the shapes of its
    weights in order, the optimizer's class and the shapes of its variables.
    Paths are kept for messages only (Keras numbers layer names per process)."""
    optimizer = getattr(model, "optimizer", None)
    return {
        "weights": [[v.path, [int(d) for d in v.shape]] for v in model.weights],
        "optimizer": type(optimizer).__name__ if optimizer is not None else None,
        "optimizer_variables": [[v.path, [int(d) for d in v.shape]] for v in optimizer.variables]
        if optimizer is not None else [],
    }


def difference(saved, current):
    """The first way `current` differs from `saved` (two `signature`s), in
    words, or `None` when a backup of `saved` loads into `current`."""
    if saved["optimizer"] != current["optimizer"]:
        return f"its optimizer is {saved['optimizer']}, this model's is {current['optimizer']}"
    for kind, name in (("weights", "weights"), ("optimizer_variables", "optimizer variables")):
        old, new = saved[kind], current[kind]
        if len(old) != len(new):
            return f"it has {len(old)} {name}, this model has {len(new)}"
        for index, ((old_path, old_shape), (new_path, new_shape)) in enumerate(zip(old, new)):
            if old_shape != new_shape:
                return (f"its {name} number {index} ({old_path}) has shape {tuple(old_shape)}, this "
                        f"model's ({new_path}) has shape {tuple(new_shape)}")
    return None


# -- choosing and sending the backup ----------------------------------------
def _check_weights_file(path):
    """Reads every array of a `.weights.h5` file (a truncated or damaged
    file raises `OSError`)."""
    import h5py

    with h5py.File(path, "r") as f:
        f.visititems(lambda name, item: item[()] if isinstance(item, h5py.Dataset) else None)


def choose_backup(backup_dir):
    """On the chief: the newest backup that can be read.

    Returns:
        `{"path": ..., "state": ...}`, `{}` when there is none, or
        `{"error": ...}` when there are backups but none can be read.
    """
    backup_files.remove_leftovers(backup_dir)
    skipped = []
    for path in backup_files.backups(backup_dir):
        try:
            state = backup_files.read_state(path)
            _check_weights_file(backup_files.weights_path(path))
        except (OSError, ValueError, KeyError) as error:
            skipped.append(f"{path} ({type(error).__name__}: {str(error).splitlines()[0][:120]})")
            continue
        if skipped:
            logger.warning("keras_strategies: BackupAndRestore cannot read %s; resuming from the "
                           "backup before it, %s", "; ".join(skipped), path)
        return {"path": path, "state": state}
    if skipped:
        return {"error": (f"BackupAndRestore({backup_dir!r}): no backup in it can be read: "
                          f"{'; '.join(skipped)}. Move the directory away to start afresh.")}
    return {}


def _pack(header, payload=b""):
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + payload


def _unpack(data):
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + size]), data[8 + size:]


def receive_backup(implementation, backup_dir):
    """Every worker gets the chief's choice of backup (and, across
    processes, its weights file): `(header, weights path or None)`.

    The weights come over the strategy's collectives, so a worker that
    cannot read the chief's disk loads the same state.
    """
    single = implementation.num_workers == 1
    message = b""
    if implementation.is_chief:
        header = choose_backup(backup_dir)
        payload = b""
        if "path" in header and not single:
            with open(backup_files.weights_path(header["path"]), "rb") as f:
                payload = f.read()
        message = _pack(header, payload)
    header, payload = _unpack(message if single else implementation.broadcast_bytes(message))
    if "path" not in header:
        return header, None
    if single:
        return header, backup_files.weights_path(header["path"])
    local = os.path.join(tempfile.mkdtemp(prefix="keras-strategies-restore-"), backup_files.WEIGHTS)
    with open(local, "wb") as f:
        f.write(payload)
    return header, local


def _build_optimizer(model):
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and not optimizer.built:
        optimizer.build(model.trainable_variables)


class ExactBackup(keras.callbacks.Callback):
    """The `BackupAndRestore` of a run under one of this package's strategies.

    Keeps the user's `backup_dir`, `save_freq` (`"epoch"` or a number of
    batches, counted over the whole run so a resumed run saves at the same
    steps) and `delete_checkpoint`.

    Args:
        original: the user's `keras.callbacks.BackupAndRestore`.
        implementation: the strategy's implementation (who is the chief, and
            its `broadcast_bytes`/`any_worker` collectives).
        dataset: the `data.ShuffledShards` feeding the run, if any (its
            epoch and seed follow the run's).
        sigterm: a `preemption.SigtermFlag`, or `None`.
    """

    batch_logs_unused = True  # its batch hooks get no logs (implementation.batch_hooks)

    def __init__(self, original, implementation, dataset=None, sigterm=None):
        super().__init__()
        self.backup_dir = os.fspath(original.backup_dir)
        self.save_freq = original.save_freq
        self.delete_checkpoint = original.delete_checkpoint
        self.implementation = implementation
        self.dataset = dataset
        self.sigterm = sigterm
        self.epoch = self.step = self.batches = 0
        self.restored = None  # the backup's state.json, when this run resumed

    def on_train_begin(self, logs=None):
        model = self.model
        _build_optimizer(model)
        model._initial_epoch = None
        header, weights = receive_backup(self.implementation, self.backup_dir)
        if "error" in header:
            raise StrategyError(header["error"])
        if weights is None:
            return
        state = header["state"]
        try:
            problem = difference(state["signature"], signature(model))
            if problem:
                raise StrategyError(
                    f"BackupAndRestore({self.backup_dir!r}): the backup {header['path']} was written for "
                    f"another model: {problem}. Resume with the model and optimizer it was written for, or "
                    "give this run another backup_dir; the backup was left unchanged.")
            model.load_weights(weights)
        finally:
            if weights != backup_files.weights_path(header["path"]):
                shutil.rmtree(os.path.dirname(weights), ignore_errors=True)
        self.epoch, self.step, self.batches = state["epoch"], state["step"], state["batches"]
        self.restored = state
        model._initial_epoch = self.epoch
        _pending.steps = self.step
        if self.dataset is not None:
            self.dataset.seed = state["seed"]

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        if self.dataset is not None:
            self.dataset.set_epoch(epoch)

    def on_train_batch_end(self, batch, logs=None):
        before = self.batches  # `batch` is the last of the call's steps (steps_per_execution)
        self.batches += batch + 1 - self.step
        self.step = batch + 1
        every = self.save_freq if self.save_freq != "epoch" else 0
        if every and self.batches // every > before // every:
            self._save()
        if self.sigterm is not None and self._agree_now(before) and \
                self.implementation.any_worker(self.sigterm.received):
            self._save()
            self.implementation.any_worker(False)  # everyone waits for the chief's write
            self.sigterm.handled = True
            where = self.backup_dir if self.implementation.is_chief else "the chief's backup directory"
            raise preempted_exit(f"epoch {self.epoch}, step {self.step}", where)

    def _agree_now(self, before):
        """Whether the workers compare their SIGTERM flags after this step:
        every step in one process, every `AGREE_EVERY` steps across
        processes (a collective: ~1-2 ms on 2 CPU processes)."""
        if self.implementation.num_workers == 1:
            return True
        return self.batches // AGREE_EVERY > before // AGREE_EVERY

    def on_epoch_end(self, epoch, logs=None):
        self.epoch, self.step = epoch + 1, 0
        if self.save_freq == "epoch":
            self._save()

    def on_train_end(self, logs=None):
        if self.implementation.is_chief and self.delete_checkpoint:
            shutil.rmtree(self.backup_dir, ignore_errors=True)

    def state(self):
        """What `state.json` records: where to resume, and for what model."""
        epoch, step = self.epoch, self.step
        steps = (self.params or {}).get("steps")
        if steps and step >= steps:
            epoch, step = epoch + 1, 0  # the epoch's last batch: resume at the next one
        # without a ShuffledShards the seed shuffles nothing of ours (and reading call_seed
        # here, on the chief alone, could be its first read: a collective)
        seed = self.dataset.seed if self.dataset is not None else data_lib.shuffle_seed()
        return {"format": FORMAT, "epoch": epoch, "step": step, "batches": self.batches, "seed": seed,
                "backend": keras.backend.backend(), "workers": self.implementation.num_workers,
                "signature": signature(self.model)}

    def _save(self):
        model = self.model
        if self.implementation.is_chief:
            backup_files.write(self.backup_dir, self.batches, model.save_weights, self.state())
            return
        # The others read every variable too (on some engines a read is a
        # collective), into a file of their own that is thrown away.
        with tempfile.TemporaryDirectory(prefix="keras-strategies-backup-") as scratch:
            model.save_weights(os.path.join(scratch, backup_files.WEIGHTS))


def skipping_enumerate(original):
    """`EpochIterator._enumerate_iterator` that starts the first training
    epoch after a restore at the saved step: the batches before it are drawn
    (the data order stays the same) but not trained on."""

    def _enumerate_iterator(self):
        skip = getattr(_pending, "steps", 0)
        if not skip:
            yield from original(self)
            return
        _pending.steps = 0
        yield from _resumed_epoch(self, skip)

    return _enumerate_iterator


def without_spare_iterator(original):
    """`EpochIterator._enumerate_iterator` less the iterator Keras makes when
    an epoch's batches run out: without `steps_per_epoch` the next epoch
    makes a new one and never uses that one. Under tf.distribute each costs
    ~0.15 s (a multi-device iterator) and starts filling its prefetch and
    shuffle buffers; it was two iterators an epoch, now one."""

    def _enumerate_iterator(self):
        yield from _without_spare_iterator(self, original)

    return _enumerate_iterator


def _without_spare_iterator(epoch_iterator, original):
    if (epoch_iterator.steps_per_epoch is not None or not epoch_iterator._num_batches
            or "_get_iterator" in vars(epoch_iterator)):
        yield from original(epoch_iterator)
        return
    get, spare = epoch_iterator._get_iterator, [False]
    epoch_iterator._get_iterator = lambda: () if spare[0] else get()
    inner, first = original(epoch_iterator), True
    try:
        while True:
            # resuming once the batches ran out only ends the epoch (Keras
            # then makes the spare); the first resumption makes the real one
            spare[0] = not first and epoch_iterator._steps_seen >= epoch_iterator._num_batches
            first = False
            try:
                item = next(inner)
            except StopIteration:
                return
            finally:
                spare[0] = False
            yield item
    finally:
        inner.close()
        del epoch_iterator._get_iterator


def _resumed_epoch(iterator, skip):
    """Keras 3.15's `_enumerate_iterator`, from step `skip` of the epoch."""
    iterator.data_adapter.on_epoch_begin()
    steps = iterator.steps_per_epoch or iterator._num_batches or -1
    every = iterator.steps_per_execution
    iterator._current_iterator = iter(iterator._get_iterator())
    for _ in range(skip):
        next(iterator._current_iterator)
    iterator._steps_seen = skip
    step = skip
    while steps <= 0 or step < steps:
        if iterator._num_batches and iterator._steps_seen >= iterator._num_batches:
            break
        iterator._steps_seen += every
        yield step, step + every - 1, iterator._current_iterator
        step += every
    if iterator._num_batches and iterator._steps_seen >= iterator._num_batches:
        # the next epoch makes its own without steps_per_epoch (see _without_spare_iterator)
        iterator._current_iterator = iter(iterator._get_iterator()) if iterator.steps_per_epoch else None
        iterator._steps_seen = 0
    iterator.data_adapter.on_epoch_end()


@contextlib.contextmanager
def exact_backups(implementation, model, method, arguments):
    """While entered, a `fit` call's `BackupAndRestore` is an `ExactBackup`.

    Args:
        implementation: the strategy's implementation.
        model: the Keras model.
        method: `"fit"`, `"evaluate"` or `"predict"` (only fit changes).
        arguments: the call's `inspect.BoundArguments`, after the strategy's
            `prepare_call` (changed in place).
    """
    a = arguments.arguments
    callbacks = list(a.get("callbacks") or [])
    originals = [c for c in callbacks if isinstance(c, keras.callbacks.BackupAndRestore)]
    if method != "fit" or not originals or not getattr(implementation, "exact_resume", False):
        yield
        return
    if len(originals) > 1:
        raise StrategyError(f"fit() got {len(originals)} BackupAndRestore callbacks; give it one.")
    data_lib.shuffle_globally(method, arguments, implementation.call_seed)  # arrays: a seeded order
    x = a.get("x")
    dataset = x if isinstance(x, data_lib.ShuffledShards) else None
    with SigtermFlag() as sigterm:
        backup = ExactBackup(originals[0], implementation, dataset, sigterm)
        a["callbacks"] = [backup if c is originals[0] else c for c in callbacks]
        try:
            with patches.active((PATCH,)):
                yield
        finally:
            _pending.steps = 0
            model._initial_epoch = None
