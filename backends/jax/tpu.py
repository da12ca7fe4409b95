"""JAX TPU: a `keras.distribution.DataParallel` mesh over `jax.devices("tpu")`.

On a pod, run `jax.distributed.initialize()` (or
`keras.distribution.initialize()`) on every host first: `jax.devices("tpu")`
then lists every host's cores, and each host feeds its share of the batch.
`find_tpu_devices` is the one place that looks for TPUs; tests replace it.
"""

import jax
import keras
from keras_strategies.backends.jax.local import JaxStrategy

from keras_strategies.backend_base import BackendStrategy


def create(strategy, devices, tpu=None):
    """Returns the JAX implementation of `TPU`."""
    return JaxTPU(strategy, tpu)


def find_tpu_devices(tpu):
    """The TPU devices JAX sees (every host's, after `jax.distributed`).

    Args:
        tpu: `None` or `"local"`.

    Returns:
        A list of `jax.Device`; empty when there is no TPU.
    """
    try:
        return jax.devices("tpu")
    except RuntimeError:  # "Unknown backend tpu" / failed to initialize
        return []


class JaxTPU(JaxStrategy):
    def __init__(self, strategy, tpu=None):
        self.name = type(strategy).__name__
        if tpu not in (None, "local"):
            raise self.unsupported(
                f"a TPU name or address ({tpu!r}) is a TensorFlow "
                "TPUClusterResolver setting; JAX uses this host's TPU devices",
                "Use TPU() on the TPU VM (after jax.distributed.initialize() on a pod).",
            )
        found = find_tpu_devices(tpu)
        if not found:
            raise self.unsupported(
                "no TPU devices were found (jax.devices('tpu') failed; JAX sees "
                f"only {sorted({d.platform for d in jax.devices()})})",
                "Run on a Cloud TPU VM with jax[tpu] installed, or use Mirrored "
                "or OneDevice on this machine.",
            )
        self._found = [f"{d.platform}:{d.id}" for d in found]
        BackendStrategy.__init__(self, strategy, self._found)
        self.native = keras.distribution.DataParallel(devices=self.devices)

    @property
    def num_replicas_in_sync(self):
        return len(self.devices)

    def resolve_devices(self, requested):
        return requested
