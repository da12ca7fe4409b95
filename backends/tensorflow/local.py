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

import tensorflow as tf
from keras_strategies.backends.tensorflow.common import (
    ensure_logical_cpus,
    global_batch_training,
    logical_cpu_count,
    mean_aggregating_creator,
    recreate_variables,
    tf_device,
)

from keras_strategies.backend_base import (
    BackendStrategy,
    drop_compiled_functions,
    reset_compiled_functions,
)
from keras_strategies.devices import check_available, parse_device

_mirrored_strategies = {}


def create(strategy, devices, **options):
    """Returns the TensorFlow implementation of `strategy`."""
    return TensorFlowStrategy(strategy, devices, **options)


def _mirrored_strategy(devices):
    """One MirroredStrategy per device set and process: separate instances
    reuse the same collective keys, and their all-reduces then collide."""
    if devices not in _mirrored_strategies:
        _mirrored_strategies[devices] = tf.distribute.MirroredStrategy(list(devices))
    return _mirrored_strategies[devices]


class TensorFlowStrategy(BackendStrategy):
    backend = "tensorflow"

    def __init__(self, strategy, devices):
        super().__init__(strategy, devices)
        names = [tf_device(d) for d in self.devices]
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
            ensure_logical_cpus(max(parse_device(d)[1] for d in requested) + 1, self.name)
            available = [f"cpu:{i}" for i in range(logical_cpu_count())]
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
            with tf.variable_creator_scope(mean_aggregating_creator):
                yield

    def attach(self, model):
        if self.kind == "default":
            return
        with self.scope():
            recreate_variables(model)
        self._saved = (model._distribute_strategy, model._jit_compile)
        model._distribute_strategy = self.native
        model._jit_compile = False  # as Keras does for models built in a scope
        if getattr(model, "optimizer", None) is not None:
            model.optimizer._distribution_strategy = self.native
        reset_compiled_functions(model)

    def detach(self, model):
        if self.kind == "default":
            return
        recreate_variables(model)
        model._distribute_strategy, model._jit_compile = self._saved
        if getattr(model, "optimizer", None) is not None:
            model.optimizer._distribution_strategy = tf.distribute.get_strategy()
        drop_compiled_functions(model)  # and the strategy's variables they hold

    @contextlib.contextmanager
    def run_context(self, model):
        with global_batch_training(model, self.num_replicas_in_sync, self):
            with self.scope():
                yield
