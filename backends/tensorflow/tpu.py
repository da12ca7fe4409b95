"""TensorFlow TPU: `TPUClusterResolver` + `initialize_tpu_system` +
`tf.distribute.TPUStrategy`, with the same scope, BatchNormalization and
attach/detach handling as Mirrored (`local.py`).

`connect_tpu` is the one place that looks for and initialises a TPU; tests
replace it (and `TPUStrategy`). Not run on TPU hardware.
"""

import os

import tensorflow as tf
from keras_strategies.backends.tensorflow.local import TensorFlowStrategy

from keras_strategies.backend_base import BackendStrategy

TPUStrategy = tf.distribute.TPUStrategy


def create(strategy, devices, tpu=None):
    """Returns the TensorFlow implementation of `TPU`."""
    return TensorFlowTPU(strategy, tpu)


def connect_tpu(tpu):
    """Finds, connects to and initialises the TPU system.

    Args:
        tpu: a TPU name or `grpc://` address, or `None` for this VM's TPU
            (or `$TPU_NAME`).

    Returns:
        `(resolver, device_names)`: the `TPUClusterResolver` and the TPU cores
        as Keras names (`"tpu:0"`, ...); `(None, [])` when there is no TPU
        to connect to.
    """
    if tpu is None and not os.environ.get("TPU_NAME"):
        if not tf.config.list_physical_devices("TPU"):
            return None, []
        tpu = "local"
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
    if tpu != "local":
        tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    cores = tf.config.list_logical_devices("TPU")
    return resolver, [f"tpu:{i}" for i in range(len(cores))]


class TensorFlowTPU(TensorFlowStrategy):
    def __init__(self, strategy, tpu=None):
        self.name = type(strategy).__name__
        try:
            resolver, names = connect_tpu(tpu)
        except (ValueError, RuntimeError, tf.errors.OpError) as error:
            raise self.unsupported(
                f"could not connect to the TPU {tpu!r} ({error})",
                "Check the TPU name or address and that the TPU is running.",
            ) from None
        if not names:
            raise self.unsupported(
                "no TPU was found (tf.config.list_physical_devices('TPU') is "
                "empty and TPU_NAME is not set)",
                "Run on a Cloud TPU VM, pass TPU(tpu='name-or-grpc-address'), or "
                "use Mirrored or OneDevice on this machine.",
            )
        BackendStrategy.__init__(self, strategy, names)
        self.native = TPUStrategy(resolver)

    @property
    def num_replicas_in_sync(self):
        return self.native.num_replicas_in_sync

    def resolve_devices(self, requested):
        return requested
