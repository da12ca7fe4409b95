"""TensorFlow TPU: `TPUClusterResolver` + `initialize_tpu_system` +
`tf.distribute.TPUStrategy`, with the same scope, BatchNormalization and
attach/detach handling as Mirrored.

`connect_tpu` is the one place that looks for and initialises a TPU; tests
replace it (and `TPUStrategy`). Not run on TPU hardware.
"""

import os

import tensorflow as tf

from keras_strategies.backends.tensorflow.base import TFImplementation

TPUStrategy = tf.distribute.TPUStrategy


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


class TFTPU(TFImplementation):
    """`tf.distribute.TPUStrategy` over every core of the TPU."""

    def __init__(self, strategy, devices, tpu=None):
        self.name = type(strategy).__name__
        try:
            resolver, self._cores = connect_tpu(tpu)
        except (ValueError, RuntimeError, tf.errors.OpError) as error:
            raise self.unsupported(
                f"could not connect to the TPU {tpu!r} ({error})",
                "Check the TPU name or address and that the TPU is running.",
            ) from None
        if not self._cores:
            raise self.unsupported(
                "no TPU was found (tf.config.list_physical_devices('TPU') is "
                "empty and TPU_NAME is not set)",
                "Run on a Cloud TPU VM, pass TPU(tpu='name-or-grpc-address'), or "
                "use Mirrored or OneDevice on this machine.",
            )
        super().__init__(strategy, None)
        self.native = TPUStrategy(resolver)

    def default_devices(self):
        return list(self._cores)


IMPLEMENTATIONS = {"TPU": TFTPU}
