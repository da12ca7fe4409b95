"""TensorFlow backend: the strategies are real `tf.distribute` strategies.

Fixes applied around Keras 3.15 (all scoped to runs of our strategies):
- BatchNormalization moving statistics drifted apart between replicas under
  MirroredStrategy (their variables use aggregation NONE). Non-trainable
  floating variables are created with aggregation MEAN, and BatchNormalization
  computes its statistics over the global batch (`synchronized=True`), so every
  replica holds identical values and training equals one device.
- Keras scales each replica's loss by 1/num_replicas, which is wrong for an
  unevenly split (last) batch; each replica's loss is scaled by its share of
  the global batch instead.
- A model built outside `scope()` gets its variables re-created as
  distributed variables for the run, and plain ones afterwards.
"""

import contextlib
import threading

import tensorflow as tf
from keras.src import tree
from keras.src.layers.normalization.batch_normalization import BatchNormalization
from keras.src.losses import loss as loss_module
from keras.src.trainers.data_adapters import data_adapter_utils

from keras_strategies.backend_base import BackendStrategy
from keras_strategies.backend_base import reset_compiled_functions
from keras_strategies.backend_base import state_variables
from keras_strategies.devices import check_available
from keras_strategies.devices import parse_device
from keras_strategies.errors import StrategyError


def create(strategy, devices, **options):
    """Returns the TensorFlow implementation of `strategy`."""
    return TensorFlowStrategy(strategy, devices, **options)


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


def _share_weighted_train_step(train_step):
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


_mirrored_strategies = {}


def _mirrored_strategy(devices):
    """One MirroredStrategy per device set and process: separate instances
    reuse the same collective keys, and their all-reduces then collide."""
    if devices not in _mirrored_strategies:
        _mirrored_strategies[devices] = tf.distribute.MirroredStrategy(list(devices))
    return _mirrored_strategies[devices]


def _tf_device(name):
    kind, index = parse_device(name)
    return f"/device:{kind.upper()}:{index}"


def _logical_cpu_count():
    cpu = tf.config.list_physical_devices("CPU")[0]
    config = tf.config.get_logical_device_configuration(cpu)
    return len(config) if config else 1


def _ensure_logical_cpus(count, strategy_name):
    """Splits the host CPU into `count` logical devices if TF has not started."""
    if _logical_cpu_count() >= count:
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
            f"{_logical_cpu_count()}. Create the strategy before anything runs "
            "TensorFlow (before building a model), or call "
            "tf.config.set_logical_device_configuration("
            "tf.config.list_physical_devices('CPU')[0], "
            f"[tf.config.LogicalDeviceConfiguration()] * {count}) at the very "
            f"start of the program. ({error})"
        ) from None


def _mean_aggregating_creator(next_creator, **kwargs):
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


def _recreate_variables(model):
    """Re-creates every variable's tf.Variable under the current scope."""
    with tf.init_scope():
        for variable in state_variables(model):
            if variable._value is None:
                continue  # not initialised yet: it will be, under the scope
            value = tf.identity(tf.convert_to_tensor(variable._value))
            variable._value = None
            variable._initialize(value)
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and optimizer.built:
        optimizer._trainable_variables_indices = {
            optimizer._var_key(v): i
            for i, v in enumerate(optimizer._trainable_variables)
        }


class TensorFlowStrategy(BackendStrategy):
    backend = "tensorflow"

    def __init__(self, strategy, devices):
        super().__init__(strategy, devices)
        names = [_tf_device(d) for d in self.devices]
        if self.kind == "default":
            self.native = tf.distribute.get_strategy()
        elif self.kind == "one_device":
            self.native = tf.distribute.OneDeviceStrategy(names[0])
        elif self.kind == "mirrored":
            self.native = _mirrored_strategy(tuple(names))
        else:
            raise self.unsupported(f"unknown strategy kind {self.kind!r}")

    def resolve_devices(self, requested):
        gpus = len(tf.config.list_physical_devices("GPU"))
        if requested is None:
            if self.kind == "mirrored" and gpus:
                return [f"gpu:{i}" for i in range(gpus)]
            return ["gpu:0" if gpus else "cpu:0"]
        kind = parse_device(requested[0])[0]
        if kind == "cpu":
            _ensure_logical_cpus(max(parse_device(d)[1] for d in requested) + 1, self.name)
            available = [f"cpu:{i}" for i in range(_logical_cpu_count())]
        elif kind == "gpu":
            available = [f"gpu:{i}" for i in range(gpus)]
        else:
            available = []
        check_available(requested, available, self.name, self.backend)
        return requested

    @contextlib.contextmanager
    def scope(self):
        if self.kind == "default":
            yield
            return
        with self.native.scope():
            with tf.variable_creator_scope(_mean_aggregating_creator):
                yield

    def attach(self, model):
        if self.kind == "default":
            return
        with self.scope():
            _recreate_variables(model)
        self._saved = (model._distribute_strategy, model._jit_compile)
        model._distribute_strategy = self.native
        model._jit_compile = False  # as Keras does for models built in a scope
        if getattr(model, "optimizer", None) is not None:
            model.optimizer._distribution_strategy = self.native
        reset_compiled_functions(model)

    def detach(self, model):
        if self.kind == "default":
            return
        _recreate_variables(model)
        model._distribute_strategy, model._jit_compile = self._saved
        if getattr(model, "optimizer", None) is not None:
            model.optimizer._distribution_strategy = tf.distribute.get_strategy()
        reset_compiled_functions(model)

    @contextlib.contextmanager
    def run_context(self, model):
        if self.num_replicas_in_sync == 1:
            with self.scope():
                yield
            return
        norms = [
            layer
            for layer in model._flatten_layers(include_self=False)
            if isinstance(layer, BatchNormalization) and not layer.synchronized
        ]
        for layer in norms:
            layer.synchronized = True
        model.__dict__["train_step"] = _share_weighted_train_step(model.train_step)
        reset_compiled_functions(model)
        try:
            with self.scope():
                yield
        finally:
            del model.__dict__["train_step"]
            for layer in norms:
                layer.synchronized = False
            reset_compiled_functions(model)
