"""JAX, one machine: `Default` (no distribution), `OneDevice` and `Mirrored`
(`keras.distribution.DataParallel` over one device or several)."""

from keras_strategies.backends.jax.base import JaxImplementation, accelerators
from keras_strategies.backends.jax.keras_fixes import unaliased_ema
from keras_strategies.implementation.base import NoDistribution


class JaxDefault(NoDistribution, JaxImplementation):
    """No distribution at all: Keras's own single-device path (with the EMA fix)."""

    def make_distribution(self):
        return None

    def run_context(self, model):
        return unaliased_ema(model)


class JaxOneDevice(JaxImplementation):
    """A one-device `DataParallel` mesh."""


class JaxMirrored(JaxImplementation):
    """A `DataParallel` mesh over the devices (every GPU or TPU by default)."""

    def default_devices(self):
        return accelerators() or super().default_devices()


IMPLEMENTATIONS = {"Default": JaxDefault, "OneDevice": JaxOneDevice, "Mirrored": JaxMirrored}
