"""JAX, one machine: `Default` (no distribution), `OneDevice` and `Mirrored`
(`keras.distribution.DataParallel` over one device or several)."""

import contextlib

from keras_strategies.backends.jax.base import JaxImplementation, accelerators


class JaxDefault(JaxImplementation):
    """No distribution at all: Keras's own single-device path."""

    keras_patches = ()

    def make_distribution(self):
        return None

    def scope(self):
        return contextlib.nullcontext()

    def attach(self, model):
        pass

    def detach(self, model):
        pass

    def run_context(self, model):
        return contextlib.nullcontext()


class JaxOneDevice(JaxImplementation):
    """A one-device `DataParallel` mesh."""


class JaxMirrored(JaxImplementation):
    """A `DataParallel` mesh over the devices (every GPU or TPU by default)."""

    def default_devices(self):
        return accelerators() or super().default_devices()


IMPLEMENTATIONS = {"Default": JaxDefault, "OneDevice": JaxOneDevice, "Mirrored": JaxMirrored}
