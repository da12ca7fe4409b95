"""TensorFlow backend: MultiWorkerMirrored is the real
`tf.distribute.MultiWorkerMirroredStrategy`.

The cluster comes from `TF_CONFIG` as TensorFlow reads it, or, from any other
description (torchrun, SLURM, KERAS_DISTRIBUTION_*), from a rendezvous at the
coordinator address that tells every worker the others' addresses. Keras
3.15 cannot fit under this strategy (keras-team/keras#20585); the two fixes,
applied only while one of our multi-worker strategies runs, are in
`_fix_keras_20585`.
"""

import contextlib

import tensorflow as tf
from keras.src.backend.tensorflow import trainer as tf_trainer

from keras_strategies import data as data_lib
from keras_strategies.backend_base import MultiProcessBackendStrategy
from keras_strategies.backend_base import own_coordinator
from keras_strategies.backends.tensorflow.common import global_batch_training
from keras_strategies.backends.tensorflow.common import mean_aggregating_creator
from keras_strategies.backends.tensorflow.common import recreate_variables
from keras_strategies.backend_base import drop_compiled_functions
from keras_strategies.backend_base import reset_compiled_functions
from keras_strategies.multi_worker import shuffle_seed
from keras_strategies.ports import free_port
from keras_strategies.rendezvous import exchange_addresses


def create(strategy, devices, cluster, timeout, **options):
    """Returns the TensorFlow implementation of a multi-process strategy."""
    return TensorFlowMultiWorker(strategy, devices, cluster, timeout, **options)


_native = {}  # one MultiWorkerMirroredStrategy per process: TF allows no other


def _resolver(cluster, timeout):
    if cluster.source == "TF_CONFIG":
        return tf.distribute.cluster_resolver.TFConfigClusterResolver()
    if cluster.world_size == 1:
        return None
    port = free_port()
    addresses = exchange_addresses(
        own_coordinator(cluster), cluster.rank, cluster.world_size, port, timeout
    )
    spec = tf.train.ClusterSpec({"worker": addresses})
    return tf.distribute.cluster_resolver.SimpleClusterResolver(
        spec, task_type="worker", task_id=cluster.rank, rpc_layer="grpc"
    )


class TensorFlowMultiWorker(MultiProcessBackendStrategy):
    backend = "tensorflow"

    def __init__(self, strategy, devices, cluster, timeout):
        super().__init__(strategy, devices, cluster, timeout)
        if "strategy" not in _native:
            options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout)
            try:
                _native["strategy"] = tf.distribute.MultiWorkerMirroredStrategy(
                    cluster_resolver=_resolver(cluster, timeout), communication_options=options
                )
            except RuntimeError as error:
                raise self.unsupported(
                    f"TensorFlow has already started ({error})",
                    "Create MultiWorkerMirrored() at the start of the program, before "
                    "building a model or running any TensorFlow operation.",
                ) from error
        self.native = _native["strategy"]



    @property
    def num_replicas_in_sync(self):
        return self.native.num_replicas_in_sync

    def resolve_devices(self, requested):
        gpus = len(tf.config.list_physical_devices("GPU"))
        return [f"gpu:{i}" for i in range(gpus)] or ["cpu:0"]

    @contextlib.contextmanager
    def scope(self):
        with self.native.scope():
            with tf.variable_creator_scope(mean_aggregating_creator):
                yield

    def attach(self, model):
        with self.scope():
            recreate_variables(model)
        self._saved = (model._distribute_strategy, model._jit_compile)
        model._distribute_strategy = self.native
        model._jit_compile = False
        if getattr(model, "optimizer", None) is not None:
            model.optimizer._distribution_strategy = self.native
        reset_compiled_functions(model)

    def detach(self, model):
        recreate_variables(model)
        model._distribute_strategy, model._jit_compile = self._saved
        if getattr(model, "optimizer", None) is not None:
            model.optimizer._distribution_strategy = tf.distribute.get_strategy()
        drop_compiled_functions(model)  # and the strategy's variables they hold

    def prepare_call(self, model, method, arguments):
        return data_lib.shuffle_globally(method, arguments, shuffle_seed())

    @contextlib.contextmanager
    def run_context(self, model):
        with _fix_keras_20585(), global_batch_training(model, self.num_replicas_in_sync, self):
            try:
                with self.scope():
                    yield
            except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
                    tf.errors.CancelledError, tf.errors.AbortedError,
                    tf.errors.InternalError) as error:
                raise self.lost_contact(error) from error


@contextlib.contextmanager
def _fix_keras_20585():
    """keras-team/keras#20585: fit under MultiWorkerMirroredStrategy crashes.

    1. `_maybe_symbolic_build` hands a `PerReplica` batch to the symbolic
       build; we give it the local values instead.
    2. `reduce_per_replica` calls `strategy.reduce("MEAN", v, axis=0)` on scalar
       logs (`Invalid reduction dimension 0`); scalars are reduced with
       `axis=None`.
    """
    original_build = tf_trainer.TensorFlowTrainer._maybe_symbolic_build
    original_reduce = tf_trainer.reduce_per_replica

    def maybe_symbolic_build(self, iterator=None, data_batch=None):
        if iterator is not None and data_batch is None:
            for _, _, it in iterator:
                batch = next(it)
                data_batch = tf.nest.map_structure(_local_value, batch)
                break
            iterator = None
        return original_build(self, iterator=iterator, data_batch=data_batch)

    def reduce_per_replica(values, strategy, reduction):
        if reduction == "auto":
            reduction = "mean"
        if reduction in ("mean", "sum") and _is_collective(strategy):
            op = "MEAN" if reduction == "mean" else "SUM"

            def reduce(value):
                if not isinstance(value, tf.distribute.DistributedValues):
                    return value
                axis = 0 if value.values[0].shape.rank else None
                return strategy.reduce(op, value, axis=axis)

            return tf.nest.map_structure(reduce, values)
        return original_reduce(values, strategy, reduction)

    tf_trainer.TensorFlowTrainer._maybe_symbolic_build = maybe_symbolic_build
    tf_trainer.reduce_per_replica = reduce_per_replica
    try:
        yield
    finally:
        tf_trainer.TensorFlowTrainer._maybe_symbolic_build = original_build
        tf_trainer.reduce_per_replica = original_reduce


def _local_value(value):
    if isinstance(value, tf.distribute.DistributedValues):
        return value.values[0]
    return value


def _is_collective(strategy):
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
