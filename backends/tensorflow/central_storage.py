"""TensorFlow CentralStorage: the real
`tf.distribute.experimental.CentralStorageStrategy`.

Under Keras 3.15 it fails as soon as a model has a BatchNormalization layer
("You must specify an aggregation method to update a AggregatingVariable in
Replica Context"): BatchNormalization creates its statistics with aggregation
NONE. Inside `scope()` non-trainable floating variables are created with MEAN
aggregation (`mean_aggregating_creator`), and during a run BatchNormalization
computes its statistics over the global batch, so the replicas' updates agree
and training equals one device.

Keras implements `Variable.assign_add(delta)` as `assign(self + delta)`. On an
`AggregatingVariable` with SUM aggregation (every metric's total and count),
each replica's `assign(old + delta_i)` is summed into `2 * old + sum(delta)`,
so metrics and the loss in the logs came out wrong after the first step. For
these variables `assign_add`/`assign_sub` go to TensorFlow's own methods,
which reduce the deltas.
"""

import tensorflow as tf
from keras.src.backend.common.stateless_scope import in_stateless_scope
from keras.src.backend.tensorflow.core import Variable as KerasTFVariable
from tensorflow.python.distribute import ps_values
from keras_strategies.backends.tensorflow.common import tf_device
from keras_strategies.backends.tensorflow.local import TensorFlowStrategy

from keras_strategies.backend_base import BackendStrategy
from keras_strategies.central_storage import storage_device_for
from keras_strategies.devices import check_available, parse_device

_strategies = {}


def _aggregating_update(name):
    original = getattr(KerasTFVariable, name)

    def update(self, value):
        if in_stateless_scope() or not isinstance(self._value, ps_values.AggregatingVariable):
            return original(self, value)
        value = self._convert_to_tensor(value, dtype=self._dtype)
        getattr(self._value, name)(value)
        return value

    update._ks_original = original
    return update


if not hasattr(KerasTFVariable.assign_add, "_ks_original"):
    KerasTFVariable.assign_add = _aggregating_update("assign_add")
    KerasTFVariable.assign_sub = _aggregating_update("assign_sub")


def create(strategy, devices, storage_device=None):
    """Returns the TensorFlow implementation of `CentralStorage`."""
    return TensorFlowCentralStorage(strategy, devices, storage_device)


def _central_storage_strategy(compute, storage):
    """One native strategy per device set and process (as for Mirrored)."""
    key = (compute, storage)
    if key not in _strategies:
        _strategies[key] = tf.distribute.experimental.CentralStorageStrategy(
            compute_devices=list(compute), parameter_device=storage
        )
    return _strategies[key]


class TensorFlowCentralStorage(TensorFlowStrategy):
    """Reuses the Mirrored implementation's scope, attach, detach and run
    context; only the native strategy and the devices differ."""

    def __init__(self, strategy, devices, storage_device=None):
        BackendStrategy.__init__(self, strategy, devices)
        self.storage_device = storage_device_for(self.devices, storage_device)
        storage_kind = parse_device(self.storage_device)[0]
        if storage_kind == "cpu":
            self.resolve_devices([self.storage_device])  # checks it exists
        else:
            check_available(
                [self.storage_device], self.devices, self.name, self.backend,
                "An accelerator used for storage must be one of the compute devices.",
            )
        self.native = _central_storage_strategy(
            tuple(tf_device(d) for d in self.devices), tf_device(self.storage_device)
        )

    @property
    def num_replicas_in_sync(self):
        return len(self.devices)

    def resolve_devices(self, requested):
        gpus = len(tf.config.list_physical_devices("GPU"))
        if requested is None and gpus:
            return [f"gpu:{i}" for i in range(gpus)]
        return super().resolve_devices(requested)
