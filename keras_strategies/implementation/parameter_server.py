"""What ParameterServer does the same way on every backend.

- Roles: the chief (the coordinator), the workers (they compute gradients)
  and the parameter servers (they hold the variables and the optimizer
  state, and apply each update as it arrives), one process each, all running
  the same script.
- The chief's `fit` loop (`ParameterServerImplementation.coordinate_fit`):
  Keras's callbacks, progress bar and validation run on the chief while the
  engine schedules updates on the workers; each epoch ends when every
  scheduled update is applied, and the chief's model then holds the servers'
  values.
- Bookkeeping: staleness (updates other workers applied between a worker's
  read and its own update), steps per worker.
- Lifecycle (`PeerWatch`): a worker or parameter server exits 0 soon after
  the chief finishes, and with a `WorkerError` when the chief dies.

How an engine runs updates is the backend's (`backends/tensorflow`:
`ParameterServerStrategy` + `ClusterCoordinator`; `backends/rpc`:
`torch.distributed.rpc`, for PyTorch and JAX).
"""

import abc
import atexit
import contextlib
import dataclasses
import hashlib
import math
import sys
import threading
import time

import keras
import numpy as np

from keras_strategies import patches
from keras_strategies.errors import WORKER_LOST_EXIT_CODE, StrategyError, WorkerError
from keras_strategies.implementation import data as data_lib
from keras_strategies.implementation.multi_process import MultiProcessImplementation
from keras_strategies.implementation.watchdog import Watchdog, beat

# Test-only hook: "WORKER_INDEX:SECONDS" slows that worker's every step down.
SLOW_WORKER_VARIABLE = "KERAS_STRATEGIES_TEST_SLOW_WORKER"


@dataclasses.dataclass
class StepResult:
    """What applied updates report to the chief: one update, or (`count` > 1)
    a worker's updates summed by the engine.

    Attributes:
        worker: the index of the worker that computed it.
        staleness: updates other workers applied between this worker's read
            of the variables and its update (summed over `count` updates).
        count: how many updates this reports.
        max_staleness: the largest staleness among them (`staleness` when
            `count` is 1).
        metric_state: the values of the model's metric variables for this
            one batch, when the engine keeps the metrics on the chief (they
            add up); `None` where the servers keep them (TensorFlow).
    """

    worker: int
    staleness: int
    count: int = 1
    max_staleness: int = None
    metric_state: list = None


@dataclasses.dataclass
class FitPlan:
    """One `fit` call of the chief, read from Keras's arguments."""

    x: object
    y: object
    sample_weight: object
    batch_size: int
    epochs: int
    steps_per_epoch: int
    initial_epoch: int
    verbose: object
    callbacks: list
    shuffle: object
    class_weight: object
    validation: tuple
    validation_freq: int
    validation_batch_size: object
    validation_steps: object


def _known_length(x, batch_size):
    """The number of batches an epoch of `x` has, or `None` when unknown."""
    if data_lib.is_array_like(x):
        return math.ceil(int(keras.tree.flatten(x)[0].shape[0]) / batch_size)
    if isinstance(x, keras.utils.PyDataset) or type(x).__name__ == "DataLoader":
        try:
            return len(x)
        except TypeError:
            return None
    cardinality = getattr(x, "cardinality", None)
    if callable(cardinality):
        value = int(cardinality())
        return value if value > 0 else None
    return None


def fit_plan(arguments, implementation):
    """The `FitPlan` of a fit call's `inspect.BoundArguments`.

    `steps_per_epoch` is the number of updates per epoch over all workers:
    given, or the batches in one pass over the input; an input of unknown
    length (an endless dataset) needs it, as in TensorFlow.
    """
    data_lib.split_validation(arguments)
    a = arguments.arguments
    batch_size = a.get("batch_size") or (32 if data_lib.is_array_like(a.get("x")) else None)
    steps = a.get("steps_per_epoch") or _known_length(a.get("x"), batch_size)
    if not steps:
        raise StrategyError(
            f"{implementation.name} on the {implementation.backend} backend needs "
            "fit(steps_per_epoch=...) for an input of unknown length (an endless dataset, as in "
            "TensorFlow): the number of updates per epoch over all workers."
        )
    validation = a.get("validation_data")
    if validation is not None and not isinstance(validation, (tuple, list)):
        validation = (validation,)
    return FitPlan(
        x=a.get("x"), y=a.get("y"), sample_weight=a.get("sample_weight"), batch_size=batch_size,
        epochs=a.get("epochs", 1), steps_per_epoch=int(steps), initial_epoch=a.get("initial_epoch", 0),
        verbose=a.get("verbose", "auto"), callbacks=list(a.get("callbacks") or []),
        shuffle=a.get("shuffle", True), class_weight=a.get("class_weight"),
        validation=tuple(validation) if validation is not None else None,
        validation_freq=a.get("validation_freq", 1),
        validation_batch_size=a.get("validation_batch_size"),
        validation_steps=a.get("validation_steps"),
    )


def input_fingerprint(plan):
    """A short digest of a fit's training input (shapes, dtypes, the first and
    last rows, the batch size, shuffling, class weights): equal on the chief
    and a worker when their scripts passed the same input. Datasets and
    generators count by their type only."""
    digest = hashlib.sha1(repr((plan.batch_size, plan.shuffle, sorted((plan.class_weight or {}).items()))).encode())
    for value in keras.tree.flatten((plan.x, plan.y, plan.sample_weight)):
        if value is None:
            continue
        if not data_lib.is_array_like(value):
            digest.update(type(value).__name__.encode())
            continue
        array = np.asarray(value)
        digest.update(repr((array.shape, str(array.dtype))).encode())
        digest.update(np.ascontiguousarray(array[:16]).tobytes() + np.ascontiguousarray(array[-16:]).tobytes())
    return digest.hexdigest()


def first_batch(x, y, sample_weight, batch_size):
    """One batch of the input, for building the model and its state."""
    from keras.src.trainers.data_adapters import get_data_adapter

    adapter = get_data_adapter(x, y, sample_weight, batch_size=batch_size, steps_per_epoch=1, shuffle=False)
    return next(iter(adapter.get_numpy_iterator()))


def worker_batches(arguments, worker_index, seed=0):
    """An endless iterator over one worker's batches of its fit input.

    Each worker reads its own passes over the input, as TensorFlow's
    per-worker datasets do: arrays are shuffled anew each pass (seeded by
    the fit's seed, the worker and the pass, so workers differ), datasets are
    read again from the start. `validation_split` is taken off first, and
    `class_weight` becomes sample weights, as Keras does.

    Args:
        arguments: the worker's fit call (`inspect.BoundArguments`).
        worker_index: this worker's index.
        seed: the fit's shuffle seed (`data.fit_seed`: new each fit).

    Yields:
        Batches of numpy arrays, `(x,)`, `(x, y)` or `(x, y, sample_weight)`.
    """
    from keras.src.trainers.data_adapters import data_adapter_utils, get_data_adapter

    data_lib.split_validation(arguments)
    a = arguments.arguments
    x, y, weights = a.get("x"), a.get("y"), a.get("sample_weight")
    shuffle, class_weight = a.get("shuffle", True), a.get("class_weight")
    if not data_lib.is_array_like(x):
        adapter = get_data_adapter(x, y, weights, batch_size=a.get("batch_size"), steps_per_epoch=None,
                                   shuffle=shuffle, class_weight=class_weight)
        while True:
            yield from adapter.get_numpy_iterator()
            adapter.on_epoch_end()
    if class_weight is not None:
        weights = data_adapter_utils.class_weight_to_sample_weights(y, class_weight)
    n, batch_size = int(keras.tree.flatten(x)[0].shape[0]), a.get("batch_size") or 32
    take = data_lib.take
    for epoch in range(2**62):
        order = np.arange(n)
        if shuffle:
            order = np.random.default_rng((seed, worker_index, epoch)).permutation(n)
        for start in range(0, n, batch_size):
            index = order[start:start + batch_size]
            yield data_adapter_utils.pack_x_y_sample_weight(take(x, index), take(y, index), take(weights, index))


def slow_worker_delay(environ, worker_index):
    """Seconds the test-only hook (`KERAS_STRATEGIES_TEST_SLOW_WORKER`) adds to
    each step of this worker (0 without it)."""
    text = environ.get(SLOW_WORKER_VARIABLE, "")
    if not text:
        return 0.0
    index, seconds = text.split(":")
    return float(seconds) if int(index) == worker_index else 0.0


class EpochStats:
    """Staleness and steps per worker of the updates applied so far."""

    def __init__(self):
        self.updates = self.staleness = 0
        self.max_staleness = None
        self.by_worker = {}

    def add(self, result):
        self.updates += result.count
        self.staleness += result.staleness
        most = result.staleness if result.max_staleness is None else result.max_staleness
        self.max_staleness = most if self.max_staleness is None else max(self.max_staleness, most)
        self.by_worker[result.worker] = self.by_worker.get(result.worker, 0) + result.count

    def logs(self):
        if not self.updates:
            return {}
        return {"staleness": self.staleness / self.updates, "max_staleness": float(self.max_staleness)}


class ParameterServerImplementation(MultiProcessImplementation):
    """The backend-neutral half of ParameterServer; engines implement the
    abstract methods.

    Args:
        strategy, devices, cluster, timeout: as for every multi-process
            implementation; the cluster names a chief, workers and
            parameter servers.
    """

    # Updates are asynchronous: a rerun resumes at the last backed-up epoch
    # (Keras's own BackupAndRestore), not at an exact step.
    exact_resume = False

    def __init__(self, strategy, devices, cluster, timeout):
        super().__init__(strategy, devices, cluster, timeout)
        self.steps_by_worker = {}  # worker index -> updates it computed (chief)

    # -- who am I ----------------------------------------------------------
    @property
    def role(self):
        return self.cluster.task_type

    @property
    def is_chief(self):
        return self.role == "chief"

    @property
    def num_workers(self):
        return self.cluster.world_size - 1

    @property
    def worker_index(self):
        return self.cluster.task_index

    @property
    def num_ps(self):
        """The number of parameter servers."""
        return self.cluster.num_ps

    @property
    def num_replicas_in_sync(self):
        return 1  # asynchronous: each update is one worker's batch

    @property
    def multi_process(self):
        return True

    # -- what an engine implements -------------------------------------------
    @abc.abstractmethod
    def prepare_fit(self, model, plan):
        """Chief, before the callbacks start: builds the model, its optimizer
        and metrics, and whatever the engine feeds the workers from."""

    @abc.abstractmethod
    def start_fit(self, model):
        """Chief, after the callbacks' `on_train_begin`: the servers take the
        chief's current values (a restored backup included) and the workers
        are ready."""

    @abc.abstractmethod
    def schedule(self, step_id):
        """Chief: queues one update (`step_id`, unique within the job)."""

    @abc.abstractmethod
    def results(self, wait_for=None):
        """Chief: `StepResult`s of updates applied since the last call;
        blocks until `wait_for` (a step id) is done, or, with `None`, until
        every scheduled update is."""

    @abc.abstractmethod
    def pull(self, model):
        """Chief: the servers' current values into the model (and its optimizer)."""

    def end_fit(self, model):
        """Chief: after the last epoch of a fit."""

    @abc.abstractmethod
    def finish(self, reason=None):
        """Chief: ends every other process of the job, once: with exit code 0
        (`reason` `None`: the job finished) or with a `WorkerError` giving
        `reason`."""

    def lost_process(self, error):
        """Chief: the `WorkerError` for an engine error that means a process of
        the job is gone (having called `finish` with it), or `None`."""
        return None

    def finish_at_exit(self):
        """Registered with `atexit` by the chief: `finish`, with an error for
        the others when the chief's script ended on an uncaught exception
        (a failed call the script caught and went on from ends nothing)."""
        uncaught = getattr(sys, "last_value", None)  # set when Python printed one at the end
        self.finish(None if uncaught is None else f"the chief's script failed ({describe_error(uncaught)})")

    def push_settings(self, model):
        """Chief: the optimizer's settings the callbacks may have changed (the
        learning rate) to the servers, at the start of each epoch."""

    def queue_depth(self):
        """Chief: how many updates may wait for a worker, ahead of the progress
        bar (enough that no worker waits for the chief)."""
        return max(2, 2 * self.num_workers)

    def serve_worker(self, model, method, arguments):
        """Worker: computes updates for the chief until it is done, then exits."""
        raise self.unsupported(f"a worker's {method}() is not run here")

    # -- processes that serve in the background ---------------------------------
    background_roles = ("ps",)  # roles whose engine serves from the constructor on

    def serve_in_background(self, watch):
        """A parameter server (a TensorFlow worker too) serves from the
        strategy's constructor on, in the engine's threads; its main thread
        goes on with the script and waits for the chief to finish in its
        first fit/evaluate/predict under the strategy, or at the script's
        end, whichever comes first, then the process exits."""
        self.watch = watch
        atexit.register(self.serve_until_done)

    def serve_until_done(self):
        """Waits until the chief is done (or gone), then ends the process."""
        self.watch.finished.wait()
        self.leave()
        self.watch.exit()

    def leave(self):
        """Leaves the engine's group before the process exits."""

    def chief_evaluation(self, model):
        """Chief: a context in which plain Keras evaluate/predict run on the
        model as the chief holds it."""
        return contextlib.nullcontext()

    # -- one fit/evaluate/predict --------------------------------------------
    def run(self, model, method, original, arguments, attached):
        if self.role in self.background_roles:
            self.serve_until_done()
        if self.role == "worker":
            return self.serve_worker(model, method, arguments)
        with patches.active(self.keras_patches), Watchdog(self):
            if not attached:
                self.attach(model)
            try:
                if method == "fit":
                    result = self.coordinate_fit(model, arguments)
                else:
                    self.pull(model)
                    with self.chief_evaluation(model):
                        result = original(*arguments.args, **arguments.kwargs)
            except BaseException as error:
                if not attached:
                    with contextlib.suppress(Exception):  # the first error is the one to see
                        self.detach(model)
                lost = self._lost_process(error)
                if lost is None:
                    raise
                raise lost from error
            if not attached:
                self.detach(model)
            return result

    def _lost_process(self, error):
        """A lost process, wherever the chief met it (a step, a callback, its
        own evaluation), ends every process now with a `WorkerError` naming
        it; returned to raise when the engine's error is not one already."""
        if isinstance(error, WorkerError):
            self.finish(str(error))
            return None
        lost = self.lost_process(error) if isinstance(error, Exception) else None
        if lost is not None:
            self.finish(str(lost))
        return lost

    def coordinate_fit(self, model, arguments):
        """The chief's fit: Keras's callbacks and progress bar, updates run by
        the workers, each epoch joined, validation on the chief."""
        from keras.src.callbacks.callback_list import CallbackList

        plan = fit_plan(arguments, self)
        self.prepare_fit(model, plan)
        callbacks = CallbackList(plan.callbacks, add_history=True, add_progbar=plan.verbose != 0,
                                 verbose=plan.verbose, epochs=plan.epochs, steps=plan.steps_per_epoch,
                                 model=model)
        model.stop_training = False
        callbacks.on_train_begin()
        self.start_fit(model)
        initial_epoch = model._initial_epoch or plan.initial_epoch
        training_logs = None
        for epoch in range(initial_epoch, plan.epochs):
            epoch_logs = self._run_epoch(model, plan, callbacks, epoch)
            callbacks.on_epoch_end(epoch, epoch_logs)
            training_logs = epoch_logs
            if model.stop_training:
                break
        if isinstance(model.optimizer, keras.optimizers.Optimizer) and plan.epochs > 0:
            model.optimizer.finalize_variable_values(model.trainable_weights)
        self.end_fit(model)
        callbacks.on_train_end(logs=training_logs)
        return model.history

    def _run_epoch(self, model, plan, callbacks, epoch):
        model.reset_metrics()
        callbacks.on_epoch_begin(epoch)
        self.push_settings(model)  # LearningRateScheduler, ReduceLROnPlateau
        stats, logs = EpochStats(), {}
        in_flight = self.queue_depth()
        first = self._next_step_id
        for step in range(plan.steps_per_epoch):
            callbacks.on_train_batch_begin(step)
            self.schedule(self._next_step_id)
            self._next_step_id += 1
            if step >= in_flight:  # progress follows the updates, not the queue
                logs = self._account(model, stats, self.results(wait_for=first + step - in_flight))
            callbacks.on_train_batch_end(step, logs)
            if model.stop_training:
                break
        self._account(model, stats, self.results())
        self.pull(model)
        epoch_logs = {**self._metric_results(model), **stats.logs()}
        if plan.validation is not None and model._should_eval(epoch, plan.validation_freq):
            val_x, val_y, val_weight = (list(plan.validation) + [None, None])[:3]
            with self.chief_evaluation(model):
                val_logs = model.evaluate(
                    x=val_x, y=val_y, sample_weight=val_weight,
                    batch_size=plan.validation_batch_size or plan.batch_size,
                    steps=plan.validation_steps, callbacks=callbacks, return_dict=True, verbose=0)
            epoch_logs.update({"val_" + name: value for name, value in val_logs.items()})
        return epoch_logs

    @property
    def _next_step_id(self):
        return getattr(self, "_step_counter", 0)

    @_next_step_id.setter
    def _next_step_id(self, value):
        self._step_counter = value

    def _account(self, model, stats, results):
        """Adds applied updates to the epoch's books; returns the logs so far."""
        variables = model.metrics_variables
        on_chief = False
        for result in results:
            stats.add(result)
            self.steps_by_worker[result.worker] = self.steps_by_worker.get(result.worker, 0) + result.count
            if result.metric_state is not None:  # the engine keeps the metrics on the chief
                on_chief = True
                for variable, value in zip(variables, result.metric_state):
                    value = keras.ops.cast(value, variable.dtype)
                    variable.assign(variable.value + value if variable.aggregation in ("sum", None) else value)
            beat()
        # where the servers keep the metrics, reading them is a round trip: not at every step
        return {**(self._metric_results(model) if on_chief else {}), **stats.logs()}

    @staticmethod
    def _metric_results(model):
        if not model.metrics_variables:
            return {}
        return {name: float(keras.ops.convert_to_numpy(value)) for name, value in model.get_metrics_result().items()}


class PeerWatch:
    """How a worker or parameter server learns that its job is over.

    The chief says it is done (`done()`, called by the engine when the chief
    tells it); after that the process exits 0. If instead `probe()` (is the
    chief still there?) fails before, the chief died: the process prints a
    `WorkerError` naming it and exits with code 75. Run `wait()` in the
    process's main thread.

    Args:
        implementation: the multi-process implementation (for names).
        probe: a callable returning False once the chief is gone.
        period: seconds between probes.
    """

    def __init__(self, implementation, probe, period=1.0):
        self.implementation = implementation
        self.probe = probe
        self.period = period
        self.finished = threading.Event()
        self.reason = None  # None: the chief finished; else why the job ended

    def done(self, reason=None):
        """The chief finished (`reason=None`) or ended the job for `reason`."""
        if not self.finished.is_set():
            self.reason = reason
            self.finished.set()

    def start(self):
        """Starts probing the chief in a background thread."""
        thread = threading.Thread(target=self._watch, daemon=True, name="keras-strategies-peer-watch")
        thread.start()
        return self

    def _watch(self):
        while not self.finished.wait(self.period):
            if not self.probe():
                self.done("the chief is gone (it died or was stopped)")

    def error(self):
        """The `WorkerError` for how the job ended, or `None` when it finished."""
        if self.reason is None:
            return None
        i = self.implementation
        return WorkerError(
            f"{i.name} on the {i.backend} backend: {i.describe()} stops: {self.reason}."
        )

    def exit(self):
        """Ends this process: 0 when the chief finished, else 75 with the error."""
        error = self.error()
        if error is not None:
            sys.stderr.write(f"keras_strategies.WorkerError: {error}\n")
        sys.stdout.flush()
        sys.stderr.flush()
        import os

        os._exit(0 if error is None else WORKER_LOST_EXIT_CODE)


def describe_error(error):
    """`Type: first line of the message`, for one line of another process's error."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def wait_until(predicate, timeout, what, period=0.05):
    """Waits for `predicate()` up to `timeout` seconds; `TimeoutError` naming `what`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout:.0f}s")
        time.sleep(period)
