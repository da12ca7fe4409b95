"""TensorFlow MultiWorkerMirrored: the real `tf.distribute.MultiWorkerMirroredStrategy`.

The cluster comes from `TF_CONFIG` as TensorFlow reads it, or, from any other
description (torchrun, SLURM, KERAS_DISTRIBUTION_*), from a rendezvous at the
coordinator address that tells every worker the others' addresses. Keras
3.15 cannot fit under this strategy (keras-team/keras#20585): the two fixes
(`keras_fixes.symbolic_build_from_spec`, `keras_fixes.scalar_safe_reduce`)
are applied while it runs.
"""

import contextlib

import numpy as np
import tensorflow as tf

from keras_strategies.backends.tensorflow.base import TFImplementation, gpu_count
from keras_strategies.backends.tensorflow.one_iterator import one_iterator_fit
from keras_strategies.cluster.rendezvous import exchange_addresses
from keras_strategies.errors import StrategyError
from keras_strategies.implementation import data as data_lib
from keras_strategies.implementation.model_state import cached_predict_function
from keras_strategies.implementation.multi_process import MultiProcessImplementation, own_coordinator
from keras_strategies.launch.ports import reserve_port

_native = {}  # one MultiWorkerMirroredStrategy per process: TF allows no other


def _resolver(cluster, timeout, reservation):
    """The cluster resolver; each worker's own gRPC port is found with
    `reservation` (held by the caller until the strategy's server runs)."""
    if cluster.source == "TF_CONFIG":
        return tf.distribute.cluster_resolver.TFConfigClusterResolver()
    if cluster.world_size == 1:
        return None
    addresses = exchange_addresses(own_coordinator(cluster), cluster.rank, cluster.world_size, reservation.port,
                                   timeout)
    spec = tf.train.ClusterSpec({"worker": addresses})
    return tf.distribute.cluster_resolver.SimpleClusterResolver(
        spec, task_type="worker", task_id=cluster.rank, rpc_layer="grpc"
    )


class TFMultiWorkerMirrored(MultiProcessImplementation, TFImplementation):
    """One `MultiWorkerMirroredStrategy` per process, every local GPU (or the CPU)."""

    keras_patches = TFImplementation.keras_patches + ("keras-20585-reduce", "tf-one-validation-iterator",
                                                       "tf-dataset-rewrites")
    lost_contact_errors = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
                           tf.errors.CancelledError, tf.errors.AbortedError, tf.errors.InternalError)

    def __init__(self, strategy, devices, cluster, timeout):
        super().__init__(strategy, devices, cluster, timeout)
        first = "strategy" not in _native
        if first:
            options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout)
            try:
                with reserve_port() as reservation:
                    _native["strategy"] = tf.distribute.MultiWorkerMirroredStrategy(
                        cluster_resolver=_resolver(cluster, timeout, reservation), communication_options=options
                    )
                _native["options"] = options
            except RuntimeError as error:
                raise self.unsupported(
                    f"TensorFlow has already started ({error})",
                    "Create MultiWorkerMirrored() at the start of the program, before "
                    "building a model or running any TensorFlow operation.",
                ) from error
        self.native = _native["strategy"]
        self._collectives = {}  # traced broadcast / any-worker functions
        if first and cluster.world_size > 1:
            self.check_local_devices()

    def default_devices(self):
        return [f"gpu:{i}" for i in range(gpu_count())] or ["cpu:0"]

    @contextlib.contextmanager
    def run_context(self, model):
        with super().run_context(model), watched_collectives(_native.get("options"), self.multi_process):
            yield

    def _sum_over_workers(self, values, chief_only):
        """`values` (a float32 vector) summed over the workers: every worker's
        or, with `chief_only`, the chief's alone (the others add zeros). One
        traced collective (run eagerly, TensorFlow warns of its overhead)."""
        local = np.asarray(values, np.float32)
        if chief_only and not self.is_chief:
            local = np.zeros_like(local)
        key = ("sum", chief_only)
        if key not in self._collectives:
            strategy = self.native

            @tf.function
            def total(value):
                def contribute():
                    replica = tf.distribute.get_replica_context().replica_id_in_sync_group
                    return value * tf.cast(tf.equal(replica, 0), tf.float32) if chief_only else value

                return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(contribute), axis=None)

            self._collectives[key] = total
        return self._collectives[key](tf.constant(local)).numpy()

    def broadcast_bytes(self, data):
        if not self.multi_process:
            return data
        length = np.frombuffer(len(data).to_bytes(8, "little") if self.is_chief else bytes(8), np.uint8)
        size = int.from_bytes(self._sum_over_workers(length.astype(np.float32), True).astype(np.uint8).tobytes(),
                              "little")
        values = np.frombuffer(data, np.uint8) if self.is_chief else np.zeros(size, np.uint8)
        # bytes are 0..255, exact in float32
        return self._sum_over_workers(values.astype(np.float32), chief_only=True).astype(np.uint8).tobytes()

    def any_worker(self, flag):
        if not self.multi_process:
            return bool(flag)
        return bool(self._sum_over_workers([1.0 if flag else 0.0], chief_only=False)[0] > 0)

    def prepare_call(self, model, method, arguments):
        if one_iterator_fit(model, method, arguments, self.call_seed, self.native):
            return arguments
        return data_lib.shuffle_globally(method, arguments, self.call_seed)

    splits_predict = True

    def splits_predict_for(self, model):
        # Keras's own distributed predict (every batch gathered) in a strategy's
        # scope, where the default strategy cannot run, and for a model not yet
        # built, whose variables would be created outside the strategy
        return model.built and not tf.distribute.has_strategy()

    def local_predict_context(self, model):
        """This worker's part of a split `predict` under TensorFlow's default
        strategy: Keras's predict under MultiWorkerMirroredStrategy gathers
        every batch across the workers, and its dataset sharding makes every
        worker read the whole input."""
        return default_strategy_predict(model, self)

    def all_gather(self, array):
        key = ("gather", str(array.dtype))
        if key not in self._collectives:
            strategy = self.native
            local = len(strategy.extended.worker_devices)

            @tf.function(reduce_retracing=True)
            def gather(value):
                # worker-major order; each worker's first local replica's copy
                every = strategy.gather(strategy.run(lambda: tf.identity(value)), axis=0)
                return tf.reshape(every, tf.concat([[-1, local], tf.shape(value)], 0))[:, 0]

            self._collectives[key] = gather
        return list(self._collectives[key](tf.constant(array)).numpy())

    def check_local_devices(self):
        """Every worker's local devices, compared before any collective
        (through TensorFlow's coordination service): `StrategyError` on every
        worker when they differ in number or kind."""
        from tensorflow.python.eager import context

        extended, cluster = self.native.extended, self.cluster
        mine = f"{len(extended.worker_devices)} {extended._local_device_type}"
        service = context.context()
        service.set_config_key_value(f"keras_strategies/local_devices/{cluster.rank}", mine)
        every = [service.get_config_key_value(f"keras_strategies/local_devices/{rank}")
                 for rank in range(cluster.world_size)]
        if len(set(every)) > 1:
            raise uneven_devices_error(self.name, every)


@contextlib.contextmanager
def watched_collectives(options, watched):
    """While a run of a multi-process job goes on, the collectives traced in it
    get no deadline of their own: the run's `Watchdog` ends a worker whose peer
    died or hung (`timeout` seconds without a finished step).

    TensorFlow keeps a collective's deadline (`CommunicationOptions.timeout_seconds`,
    given to the strategy for everything else: variables created in the scope,
    the cluster's first collectives) by starting a new thread for every
    collective it runs, which sleeps for the whole deadline (its docstring:
    "an overhead of `timeout_seconds * num_collectives_per_second` more
    threads"). With the default 1800 s, each step's collectives (the
    gradients, the logs, 5 per synchronized BatchNormalization layer) left as
    many sleeping threads: 1 128 an epoch of 40 steps for the benchmark's BN
    convnet on 2 workers, whose job aborted after about 40 s of training where
    Linux's `pid_max` is 32 768 ("Resource temporarily unavailable").

    Args:
        options: the `CommunicationOptions` the strategy was created with
            (TensorFlow reads them, the same object, when it traces a collective).
        watched: whether the run has a watchdog (a job of several processes).
    """
    if options is None or not watched:
        yield
        return
    deadline, options.timeout_seconds = options.timeout_seconds, None
    try:
        yield
    finally:
        options.timeout_seconds = deadline


@contextlib.contextmanager
def default_strategy_predict(model, owner):
    """Keras's `predict` run by TensorFlow's default strategy, reading the
    model's (distributed) variables; its predict function is kept for the
    next split predict of `owner`."""
    default = tf.distribute.get_strategy()
    saved = model._distribute_strategy
    model._distribute_strategy = default
    try:
        with cached_predict_function(model, owner, values=True):
            yield
    finally:
        model._distribute_strategy = saved


def uneven_devices_error(name, every):
    """The `StrategyError` for TensorFlow workers whose local devices differ;
    `every[k]` is worker k's `"<count> <CPU|GPU|TPU>"`."""
    each = ", ".join(f"worker {rank}: {entry}" for rank, entry in enumerate(every))
    if len({entry.split()[1] for entry in every}) > 1:
        fix = ("Give every worker a GPU, or hide the GPUs (CUDA_VISIBLE_DEVICES='') so that every worker "
               "trains on its CPU")
    else:
        fix = ("Give every worker the same number of GPUs, or run one process per GPU: --nproc-per-node set "
               "to the machine's GPUs, each process seeing one (os.environ['CUDA_VISIBLE_DEVICES'] = "
               "os.environ['LOCAL_RANK'] before TensorFlow starts)")
    return StrategyError(
        f"{name} on the tensorflow backend: the workers' local devices differ ({each}), and TensorFlow's "
        "MultiWorkerMirroredStrategy needs the same number and kind in every worker (it sizes its all-reduce "
        f"as workers x this worker's devices, and hangs or fails otherwise). {fix}."
    )


IMPLEMENTATIONS = {"MultiWorkerMirrored": TFMultiWorkerMirrored}
