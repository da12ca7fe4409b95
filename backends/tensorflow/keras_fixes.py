"""The TensorFlow replacements of Keras functions named in `keras_strategies.patches`.

Each `*` function here is a factory: given Keras's original, it returns what
stands in for it while one of this package's strategies runs.
"""

import threading

import tensorflow as tf
from keras.src import tree
from keras.src.backend.common.stateless_scope import in_stateless_scope
from keras.src.trainers.data_adapters import data_adapter_utils
from tensorflow.python.distribute import ps_values

# -- tf-loss-share / tf-share-weighted-step ---------------------------------
_replica_state = threading.local()  # MirroredStrategy runs replicas in threads


def share_scaled_loss(original):
    """`scale_loss_for_distribution` / `unscale_...`: by this replica's share
    of the global batch (set by `share_weighted_train_step`), not 1/replicas."""
    unscale = original.__name__.startswith("unscale")

    def scaled(value):
        share = getattr(_replica_state, "share", None)
        if share is None:
            return original(value)
        share = tf.cast(share, value.dtype)
        return tf.math.divide_no_nan(value, share) if unscale else value * share

    return scaled


def share_weighted_train_step(train_step):
    """`train_step` with each replica's share of the global batch recorded."""

    def step(data):
        context = tf.distribute.get_replica_context()
        if context is None or context.num_replicas_in_sync == 1:
            return train_step(data)
        x, _, _ = data_adapter_utils.unpack_x_y_sample_weight(data)
        local = tf.cast(tf.shape(tree.flatten(x)[0])[0], tf.float32)
        total = context.all_reduce(tf.distribute.ReduceOp.SUM, local)
        _replica_state.share = local / total
        try:
            return train_step(data)
        finally:
            _replica_state.share = None

    return step


# -- tf-native-assign-add -----------------------------------------------------
def native_assign_add(original):
    """Keras implements `Variable.assign_add(delta)` as `assign(self + delta)`.
    On an `AggregatingVariable` with SUM aggregation (every metric's total and
    count under CentralStorage), each replica's `assign(old + delta_i)` is
    summed into `2 * old + sum(delta)`; on a parameter server's variable two
    workers' read-modify-writes interleave and one is lost. TensorFlow's own
    `assign_add` reduces the deltas, and is one atomic op on the server."""
    name = original.__name__
    native = (ps_values.AggregatingVariable, ps_values.CachingVariable)

    def update(self, value):
        if in_stateless_scope() or not isinstance(self._value, native):
            return original(self, value)
        value = self._convert_to_tensor(value, dtype=self._dtype)
        getattr(self._value, name)(value)
        return value

    return update


# -- keras-team/keras#20585 -----------------------------------------------------
def local_batch_symbolic_build(original):
    """`_maybe_symbolic_build` handed a `PerReplica` batch under
    MultiWorkerMirroredStrategy: build from this worker's local values."""

    def maybe_symbolic_build(self, iterator=None, data_batch=None):
        if iterator is not None and data_batch is None:
            for _, _, it in iterator:
                batch = next(it)
                data_batch = tf.nest.map_structure(local_value, batch)
                break
            iterator = None
        return original(self, iterator=iterator, data_batch=data_batch)

    return maybe_symbolic_build


def scalar_safe_reduce(original):
    """`reduce_per_replica` calls `strategy.reduce("MEAN", v, axis=0)` on
    scalar logs under a collective strategy (`Invalid reduction dimension 0`);
    scalars are reduced with `axis=None`."""

    def reduce_per_replica(values, strategy, reduction):
        if reduction == "auto":
            reduction = "mean"
        if reduction in ("mean", "sum") and isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            op = "MEAN" if reduction == "mean" else "SUM"

            def reduce(value):
                if not isinstance(value, tf.distribute.DistributedValues):
                    return value
                axis = 0 if value.values[0].shape.rank else None
                return strategy.reduce(op, value, axis=axis)

            return tf.nest.map_structure(reduce, values)
        return original(values, strategy, reduction)

    return reduce_per_replica


def local_value(value):
    """This replica's copy of a distributed value, read without a collective
    (reading an on-read variable whole would all-reduce)."""
    if isinstance(value, tf.distribute.DistributedValues):
        return value.values[0]
    return value
