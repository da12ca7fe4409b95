"""Helpers shared by the tensorflow strategies."""

import contextlib
import threading

import tensorflow as tf
from keras.src import tree
from keras.src.layers.normalization.batch_normalization import BatchNormalization
from keras.src.losses import loss as loss_module
from keras.src.trainers.data_adapters import data_adapter_utils

from keras_strategies.backend_base import (
    restore_compiled_functions,
    stash_compiled_functions,
    state_variables,
)
from keras_strategies.devices import parse_device
from keras_strategies.errors import StrategyError

# -- loss scaling by each replica's share of the global batch ---------------
_replica_state = threading.local()  # MirroredStrategy runs replicas in threads
_original_scale = loss_module.scale_loss_for_distribution
_original_unscale = loss_module.unscale_loss_for_distribution


def _batch_share():
    return getattr(_replica_state, "share", None)


def _scale_loss(value):
    share = _batch_share()
    if share is None:
        return _original_scale(value)
    return value * tf.cast(share, value.dtype)


def _unscale_loss(value):
    share = _batch_share()
    if share is None:
        return _original_unscale(value)
    return tf.math.divide_no_nan(value, tf.cast(share, value.dtype))


loss_module.scale_loss_for_distribution = _scale_loss
loss_module.unscale_loss_for_distribution = _unscale_loss


def share_weighted_train_step(train_step):
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


def tf_device(name):
    kind, index = parse_device(name)
    return f"/device:{kind.upper()}:{index}"


def logical_cpu_count():
    cpu = tf.config.list_physical_devices("CPU")[0]
    config = tf.config.get_logical_device_configuration(cpu)
    return len(config) if config else 1


def ensure_logical_cpus(count, strategy_name):
    """Splits the host CPU into `count` logical devices if TF has not started."""
    if logical_cpu_count() >= count:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * count
        )
    except RuntimeError as error:
        raise StrategyError(
            f"{strategy_name} on the tensorflow backend needs {count} logical "
            f"CPU devices, but TensorFlow has already started with "
            f"{logical_cpu_count()}. Create the strategy before anything runs "
            "TensorFlow (before building a model), or call "
            "tf.config.set_logical_device_configuration("
            "tf.config.list_physical_devices('CPU')[0], "
            f"[tf.config.LogicalDeviceConfiguration()] * {count}) at the very "
            f"start of the program. ({error})"
        ) from None


def mean_aggregating_creator(next_creator, **kwargs):
    """Non-trainable float variables (BatchNorm statistics, ...) get MEAN
    aggregation so a replica-context assign keeps replicas identical."""
    aggregation = kwargs.get("aggregation")
    dtype = kwargs.get("dtype")
    if (
        kwargs.get("trainable") is False
        and aggregation in (None, tf.VariableAggregation.NONE)
        and dtype is not None
        and tf.as_dtype(dtype).is_floating
    ):
        kwargs["aggregation"] = tf.VariableAggregation.MEAN
    return next_creator(**kwargs)


def _local_copy(value):
    """This replica's copy of a distributed variable, read without a
    collective (reading an on-read variable whole would all-reduce)."""
    if isinstance(value, tf.distribute.DistributedValues):
        return value.values[0]
    return value


def recreate_variables(model):
    """Re-creates every variable's tf.Variable under the current scope."""
    with tf.init_scope():
        for variable in state_variables(model):
            if variable._value is None:
                continue  # not initialised yet: it will be, under the scope
            value = tf.identity(tf.convert_to_tensor(_local_copy(variable._value)))
            variable._value = None
            variable._initialize(value)
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and optimizer.built:
        optimizer._trainable_variables_indices = {
            optimizer._var_key(v): i for i, v in enumerate(optimizer._trainable_variables)
        }


@contextlib.contextmanager
def global_batch_training(model, num_replicas, owner):
    """During one fit/evaluate/predict with several replicas: BatchNormalization
    computes its statistics over the global batch, and each replica's loss is
    weighted by its share of the global batch. The model is left as it was.

    The steps traced this way are kept for `owner`'s next run of the model (the
    same variables: a model built in its scope), so that they are not traced again
    at every call."""
    if num_replicas == 1:
        yield
        return
    norms = [
        layer
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, BatchNormalization) and not layer.synchronized
    ]
    for layer in norms:
        layer.synchronized = True
    model.__dict__["train_step"] = share_weighted_train_step(model.train_step)
    restore_compiled_functions(model, owner, values=True)
    try:
        yield
    finally:
        del model.__dict__["train_step"]
        for layer in norms:
            layer.synchronized = False
        stash_compiled_functions(model, owner, values=True)
