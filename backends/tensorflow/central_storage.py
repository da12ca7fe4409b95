"""TensorFlow CentralStorage: the real
`tf.distribute.experimental.CentralStorageStrategy`.

Under Keras 3.15 it fails as soon as a model has a BatchNormalization layer
("You must specify an aggregation method to update a AggregatingVariable in
Replica Context"): BatchNormalization creates its statistics with aggregation
NONE. Inside `scope()` non-trainable floating variables are created with MEAN
aggregation (`mean_aggregating_creator`), and during a run BatchNormalization
computes its statistics over the global batch, so the replicas' updates agree
and training equals one device. Metrics' SUM-aggregated variables need the
`tf-variable-updates` fix (see `keras_fixes.variable_update`). A `fit` on
arrays reads one endless dataset of the replicas' parts, as under `Mirrored`
(backends/tensorflow/one_iterator.py).
"""

import tensorflow as tf

from keras_strategies.backends.tensorflow.base import TFImplementation, logical_cpu_count, tf_device
from keras_strategies.backends.tensorflow.local import TFMirrored
from keras_strategies.implementation.placement import resolve_storage_device

_strategies = {}


class TFCentralStorage(TFImplementation):
    """Variables on the storage device, replicas on the compute devices."""

    keras_patches = TFMirrored.keras_patches
    default_devices = TFMirrored.default_devices
    prepare_call = TFMirrored.prepare_call  # a fit on arrays reads one endless dataset, as under Mirrored

    def __init__(self, strategy, devices, storage_device=None):
        super().__init__(strategy, devices)
        cpus = [f"cpu:{i}" for i in range(logical_cpu_count())]
        self.storage_device = resolve_storage_device(self, storage_device, cpus)
        key = (tuple(tf_device(d) for d in self.devices), tf_device(self.storage_device))
        if key not in _strategies:  # one per device set and process, as for Mirrored
            _strategies[key] = tf.distribute.experimental.CentralStorageStrategy(
                compute_devices=list(key[0]), parameter_device=key[1]
            )
        self.native = _strategies[key]


IMPLEMENTATIONS = {"CentralStorage": TFCentralStorage}
