"""JAX TPU: a `keras.distribution.DataParallel` mesh over `jax.devices("tpu")`.

On a pod, run `jax.distributed.initialize()` (or
`keras.distribution.initialize()`) on every host first: `jax.devices("tpu")`
then lists every host's cores, and each host feeds its share of the batch.
`find_tpu_devices` is the one place that looks for TPUs; tests replace it.
"""

import jax

from keras_strategies.backends.jax.base import JaxImplementation
from keras_strategies.implementation.placement import check_local_tpu


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


class JaxTPU(JaxImplementation):
    """A `DataParallel` mesh over every TPU core JAX sees."""

    def __init__(self, strategy, devices, tpu=None):
        self.name = type(strategy).__name__
        check_local_tpu(self, tpu, "JAX", "Use TPU() on the TPU VM (after jax.distributed.initialize() on a pod).")
        found = find_tpu_devices(tpu)
        if not found:
            raise self.unsupported(
                "no TPU devices were found (jax.devices('tpu') failed; JAX sees "
                f"only {sorted({d.platform for d in jax.devices()})})",
                "Run on a Cloud TPU VM with jax[tpu] installed, or use Mirrored "
                "or OneDevice on this machine.",
            )
        self._found = [f"{d.platform}:{d.id}" for d in found]
        super().__init__(strategy, None)

    def default_devices(self):
        return list(self._found)


IMPLEMENTATIONS = {"TPU": JaxTPU}
