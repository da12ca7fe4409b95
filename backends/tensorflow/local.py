"""TensorFlow, one machine: `Default`, `OneDevice` and `Mirrored` are the
default strategy, `OneDeviceStrategy` and `MirroredStrategy`."""

import tensorflow as tf

from keras_strategies.backends.tensorflow.base import TFImplementation, gpu_count, tf_device
from keras_strategies.backends.tensorflow.one_iterator import one_iterator_fit
from keras_strategies.implementation.base import NoDistribution

_mirrored_strategies = {}


class TFDefault(NoDistribution, TFImplementation):
    """TensorFlow's default strategy: nothing to place, scope or fix."""

    def __init__(self, strategy, devices):
        super().__init__(strategy, devices)
        self.native = tf.distribute.get_strategy()


class TFOneDevice(TFImplementation):
    """`tf.distribute.OneDeviceStrategy`."""

    def __init__(self, strategy, devices):
        super().__init__(strategy, devices)
        self.native = tf.distribute.OneDeviceStrategy(tf_device(self.devices[0]))


class TFMirrored(TFImplementation):
    """`tf.distribute.MirroredStrategy` over the devices (every GPU by default)."""

    keras_patches = TFImplementation.keras_patches + ("tf-one-validation-iterator", "tf-dataset-rewrites")

    def __init__(self, strategy, devices):
        super().__init__(strategy, devices)
        names = tuple(tf_device(d) for d in self.devices)
        # One MirroredStrategy per device set and process: separate instances
        # reuse the same collective keys, and their all-reduces then collide.
        if names not in _mirrored_strategies:
            _mirrored_strategies[names] = tf.distribute.MirroredStrategy(list(names))
        self.native = _mirrored_strategies[names]

    def default_devices(self):
        return [f"gpu:{i}" for i in range(gpu_count())] or ["cpu:0"]

    def prepare_call(self, model, method, arguments):
        # A fit on arrays reads one endless dataset, each replica its part of a global batch (Keras's
        # dataset of global batches, a new distributed iterator each epoch: about half the throughput on
        # 2 CPU replicas), shuffled with the call's seed (data.fit_seed: new each fit).
        one_iterator_fit(model, method, arguments, self.call_seed, self.native)
        return arguments


IMPLEMENTATIONS = {"Default": TFDefault, "OneDevice": TFOneDevice, "Mirrored": TFMirrored}
