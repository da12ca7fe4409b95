"""TensorFlow ParameterServer: the real `ParameterServerStrategy` and
`ClusterCoordinator`.

Keras 3 `fit` refuses this strategy; what works (and what this module does)
is a coordinator loop that schedules Keras's own `train_step` on the
workers with `ClusterCoordinator.schedule`, over a per-worker dataset
(`create_per_worker_dataset`). The variables, the optimizer's state and the
metrics live on the parameter servers (round robin, TensorFlow's placement),
so the chief reads the epoch's metrics from them.

Workers and parameter servers are `tf.distribute.Server`s: they serve inside
the strategy's constructor. At its exit the chief ends them with TensorFlow's
`Abort` op (exit code 0); a chief that dies is noticed by its port closing.

Traps handled: Keras's `assign_add` is not atomic on a server's variable, and
two workers lost updates (`tf-variable-updates`); servers with one inter-op
thread deadlock on a 2-core machine (they get workers + 1).
"""

import atexit
import contextlib
import re
import socket

import numpy as np
import tensorflow as tf
from keras.src import tree

from keras_strategies.backends.tensorflow.base import TFImplementation
from keras_strategies.backends.tensorflow.keras_fixes import replica_local_optimizer
from keras_strategies.cluster.rendezvous import exchange_addresses
from keras_strategies.cluster.spec import split_address
from keras_strategies.errors import StrategyError, WorkerError
from keras_strategies.implementation import data as data_lib
from keras_strategies.implementation.multi_process import own_coordinator
from keras_strategies.implementation.parameter_server import (
    SLOW_WORKER_VARIABLE,
    ParameterServerImplementation,
    PeerWatch,
    StepResult,
    first_batch,
)
from keras_strategies.launch.ports import reserve_port


def _tcp_alive(address):
    host, port = split_address(address, "the chief's address")
    try:
        socket.create_connection((host, port), timeout=2.0).close()
        return True
    except OSError:
        return False


class _ChiefProbe:
    """Alive until the chief's port, once seen open, closes (or never opens
    within `timeout`)."""

    def __init__(self, address, timeout):
        import time

        self.address, self.seen, self.deadline = address, False, time.monotonic() + timeout

    def __call__(self):
        import time

        if _tcp_alive(self.address):
            self.seen = True
            return True
        return not self.seen and time.monotonic() < self.deadline


# the engine's errors when a task of the cluster is gone
_LOST = (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.CancelledError,
         tf.errors.DeadlineExceededError)


class TFParameterServer(ParameterServerImplementation, TFImplementation):
    """ParameterServer on TensorFlow."""

    keras_patches = ("tf-variable-updates",)
    background_roles = ("ps", "worker")  # tf.distribute.Servers: the chief runs the work on them

    def __init__(self, strategy, devices, cluster, timeout):
        super().__init__(strategy, devices, cluster, timeout)
        with reserve_port() as reservation:  # held until this process's gRPC server runs
            spec = self._spec = self._cluster_dict(reservation)
            self._start_server(spec)
        if self.role == "chief":
            self.coordinator = tf.distribute.coordinator.ClusterCoordinator(self.native)
            self._finished = False
            atexit.register(self.finish_at_exit)
            return
        # the chief's Abort op ends this process when all is well; the watch
        # notices a chief that died
        self.serve_in_background(PeerWatch(self, _ChiefProbe(spec["chief"][0], timeout)).start())

    def _start_server(self, spec):
        """The chief's ParameterServerStrategy (which starts its server), or
        this worker's or server's `tf.distribute.Server`."""
        if self.role == "chief":
            resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
                tf.train.ClusterSpec(spec), task_type="chief", task_id=0, rpc_layer="grpc")
            self.native = tf.distribute.experimental.ParameterServerStrategy(resolver)
            return
        workers = len(spec.get("worker", []))
        config = tf.compat.v1.ConfigProto(inter_op_parallelism_threads=workers + 1,
                                          intra_op_parallelism_threads=1)
        self._server = tf.distribute.Server(tf.train.ClusterSpec(spec), job_name=self.role,
                                            task_index=self.worker_index, protocol="grpc",
                                            config=config, start=True)

    def _cluster_dict(self, reservation):
        """`{"chief": [...], "worker": [...], "ps": [...]}` addresses; ours
        on `reservation`'s port when the cluster gives only the coordinator."""
        cluster = self.cluster
        if cluster.tf_cluster is not None:
            return {k: v for k, v in cluster.tf_cluster.items() if k in ("chief", "worker", "ps")}
        processes = cluster.world_size + cluster.num_ps
        addresses = exchange_addresses(own_coordinator(cluster), cluster.process_index, processes,
                                       reservation.port, self.timeout)
        workers = cluster.world_size
        return {"chief": addresses[:1], "worker": addresses[1:workers], "ps": addresses[workers:]}

    def finish(self, reason=None):
        """Chief: ends every server, with TensorFlow's `Abort` op (exit 0 when
        the job finished; with `reason`, an error exit that prints it)."""
        if self._finished:
            return
        self._finished = True
        for job in ("worker", "ps"):
            for index in range(len(self._spec.get(job, []))):
                try:
                    with tf.device(f"/job:{job}/replica:0/task:{index}/device:CPU:0"):
                        tf.raw_ops.Abort(error_msg=f"keras_strategies.WorkerError: {reason}" if reason else "done",
                                         exit_without_error=reason is None)
                except Exception:  # noqa: BLE001 - the server is gone: that was the point
                    pass

    def default_devices(self):
        return ["cpu:0"]

    def scope(self):
        if self.role != "chief":
            return contextlib.nullcontext()  # the same script builds a model here too: unused
        # the strategy's own scope only: one replica per update, so none of
        # Mirrored's MEAN aggregation (it made every metric update an
        # aggregating one)
        return self.native.scope()

    # -- chief -----------------------------------------------------------------
    def prepare_fit(self, model, plan):
        with self.scope():
            model._symbolic_build(data_batch=first_batch(plan.x, plan.y, plan.sample_weight, plan.batch_size))
            if not model.optimizer.built:
                model.optimizer.build(model.trainable_variables)
            if not hasattr(self, "_totals"):
                # per worker: [updates, summed staleness], and
                workers = len(self._spec["worker"])
                # the largest staleness of the epoch, beside the step counter
                with self.native.extended.colocate_vars_with(model.optimizer._iterations.value):
                    self._totals = tf.Variable(tf.zeros([workers, 2], tf.int64), trainable=False)
                    self._maxima = tf.Variable(tf.zeros([workers], tf.int64), trainable=False)
                self._seen = np.zeros((workers, 2), np.int64)
        dataset_fn = self._dataset_fn(plan)
        self._iterator = iter(self.coordinator.create_per_worker_dataset(dataset_fn))
        self._step_fn = self._make_step(model)
        self._iterations = model.optimizer._iterations  # every update, also with gradient accumulation

    def _dataset_fn(self, plan):
        from keras.src.trainers.data_adapters import data_adapter_utils

        x, y, weights = plan.x, plan.y, plan.sample_weight
        if isinstance(x, tf.data.Dataset):
            data = x.repeat()
        elif data_lib.is_array_like(x):
            if plan.class_weight is not None:
                weights = data_adapter_utils.class_weight_to_sample_weights(y, plan.class_weight)
            arrays = tree.lists_to_tuples(data_adapter_utils.pack_x_y_sample_weight(x, y, weights))
            data = None
        else:
            raise StrategyError(
                "ParameterServer on the tensorflow backend reads its input on the workers, which run "
                f"no Python: give numpy arrays or a tf.data.Dataset, not {type(x).__name__}."
            )
        slow = _slow_microseconds()
        shuffle, batch_size = plan.shuffle, plan.batch_size

        def dataset_fn():
            if data is not None:
                dataset = data
            else:
                dataset = tf.data.Dataset.from_tensor_slices(arrays)
                if shuffle:
                    dataset = dataset.shuffle(len(keras_first(arrays)), reshuffle_each_iteration=True)
                dataset = dataset.batch(batch_size).repeat()  # each pass ends with its own smaller batch
            if slow is not None:
                index = tf.distribute.coordinator.experimental_get_current_worker_index()
                delay = tf.where(tf.equal(index, slow[0]), tf.constant(slow[1], tf.int64), tf.constant(0, tf.int64))
                dataset = dataset.apply(testing.sleep(delay))
            return dataset.prefetch(1)

        return dataset_fn

    def _make_step(self, model):
        # the step counter (`iterations` is a tensor with gradient accumulation)
        iterations = model.optimizer._iterations
        totals, maxima = self._totals, self._maxima
        # Keras's own apply runs each variable's update on its server (a
        # merge_call); the replica-local apply, which computes the update on
        # the worker and writes it back variable by variable, is taken only
        # where Keras's update has a `cond` around it, which cannot merge_call
        # (it cost a third of the step's throughput)
        local_apply = replica_local_optimizer if _update_has_cond(model.optimizer) else _as_is

        def replica_fn(data):
            # the count is read, compared and recorded on its own server: the
            # worker never waits for it (automatic control dependencies order
            # the reads around this step's update of the same variable)
            with tf.device(iterations.value.device):
                before = tf.identity(iterations.value)
            with local_apply(model.optimizer):
                model.train_step(data)
            worker = tf.reshape(tf.cast(tf.distribute.coordinator.experimental_get_current_worker_index(),
                                        tf.int64), [1])
            with tf.device(iterations.value.device):
                staleness = tf.reshape(tf.identity(iterations.value) - before - 1, [1])
                totals.scatter_add(tf.IndexedSlices(tf.stack([tf.ones([1], tf.int64), staleness], axis=1),
                                                    worker))
                maxima.scatter_max(tf.IndexedSlices(staleness, worker))

        @tf.function
        def step_fn(iterator):
            self.native.run(replica_fn, args=(next(iterator),))

        return step_fn

    def start_fit(self, model):
        pass  # the variables live on the servers already (a restored backup was assigned there)

    def queue_depth(self):
        # The coordinator sends closures to workers from its own queue, and
        # the counts are read once an epoch: the chief never waits per step.
        return 1 << 62

    def schedule(self, step_id):
        self.coordinator.schedule(self._step_fn, args=(self._iterator,))

    def results(self, wait_for=None):
        if wait_for is not None:
            return []
        # a lost task surfaces here as the engine's error: `lost_process` names it
        self.coordinator.join()
        totals, most = self._totals.numpy(), self._maxima.numpy()
        self._maxima.assign(tf.zeros_like(most))  # the next epoch's
        (updates, staleness), self._seen = (totals - self._seen).T, totals
        return [StepResult(worker=w, staleness=int(staleness[w]), count=int(updates[w]), max_staleness=int(most[w]))
                for w in range(len(updates)) if updates[w]]

    def _lost_task(self, text):
        """The `(job, index)` an engine error names, by device or by address."""
        match = re.search(r"/job:(ps|worker)/replica:\d+/task:(\d+)", text)
        if match:
            return match.group(1), int(match.group(2))
        for job in ("ps", "worker"):
            for index, address in enumerate(self._spec.get(job, [])):
                if address in text:
                    return job, index
        return None, None

    def lost_process(self, error):
        # the chief also reads and writes the servers' variables outside a
        # step: Keras's callbacks (the learning rate), checkpoints, evaluation
        return self._server_lost(error) if isinstance(error, _LOST) else None

    def _server_lost(self, error):
        text = str(error)
        job, index = self._lost_task(text)
        what = {"ps": f"parameter server {index}", "worker": f"worker {index}"}.get(job, "a process of the job")
        first = text.strip().splitlines()
        lost = WorkerError(
            f"ParameterServer on the tensorflow backend: {what} was lost "
            f"({type(error).__name__}: {first[0] if first else ''}). "
            + ("Its variables are gone; rerun the job (with BackupAndRestore it resumes from the last backup)."
               if job != "worker" else "No worker is left to run the remaining updates.")
        )
        self.finish(str(lost))
        return lost

    def pull(self, model):
        pass  # the chief reads the servers' variables directly

    @contextlib.contextmanager
    def chief_evaluation(self, model):
        saved = model._distribute_strategy
        model._distribute_strategy = None  # Keras then runs on the chief, reading the servers
        model.test_function = model.predict_function = None
        try:
            yield
        finally:
            model._distribute_strategy = saved
            model.test_function = model.predict_function = None

    def updates_applied(self):
        import keras

        return int(keras.ops.convert_to_numpy(self._iterations)) if hasattr(self, "_iterations") else 0

    def variables_by_server(self, model):
        found = [[] for _ in range(self.num_ps)]
        for variable in model.variables + model.optimizer.variables:
            match = re.search(r"/job:ps/replica:\d+/task:(\d+)", variable.value.device)
            if match:
                found[int(match.group(1))].append(variable.path)
        return found


@contextlib.contextmanager
def _as_is(optimizer):
    yield


def _update_has_cond(optimizer):
    """Whether Keras puts a `cond` around `optimizer`'s update (gradient
    accumulation, or an EMA that overwrites the variables every N steps), or
    around its inner optimizer's (a `LossScaleOptimizer`'s)."""
    while optimizer is not None:
        if optimizer.gradient_accumulation_steps or (optimizer.use_ema and optimizer.ema_overwrite_frequency):
            return True
        optimizer = getattr(optimizer, "inner_optimizer", None)
    return False


def keras_first(structure):
    import keras

    return keras.tree.flatten(structure)[0]


def _slow_microseconds():
    """`(worker index, microseconds)` of the test-only slow-worker hook, or `None`."""
    import os

    text = os.environ.get(SLOW_WORKER_VARIABLE, "")
    if not text:
        return None
    index, seconds = text.split(":")
    return int(index), int(float(seconds) * 1e6)


from tensorflow.python.data.experimental.ops import testing  # noqa: E402  (the hook's sleep)


IMPLEMENTATIONS = {"ParameterServer": TFParameterServer}
