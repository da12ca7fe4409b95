"""Picks the implementation module for the active Keras backend.

A backend's module (and so its framework) is imported only when that backend
is active, so `import keras_strategies` works with just one framework installed.
"""

import importlib

import keras

from keras_strategies.errors import unsupported

SUPPORTED_BACKENDS = ("tensorflow", "jax", "torch")


def backend_name():
    """Returns the active Keras backend's name (`keras.backend.backend()`)."""
    return keras.backend.backend()


def implementation_module(strategy):
    """Imports the module implementing `strategy` on the active backend.

    Args:
        strategy: a `keras_strategies.Strategy`; its `implementation` names the
            module, e.g. `"local"` gives `keras_strategies.backends.jax.local`.

    Returns:
        The module; its `create(strategy, devices, **options)` builds the
        backend implementation.
    """
    name = backend_name()
    if name not in SUPPORTED_BACKENDS:
        raise unsupported(
            type(strategy).__name__,
            name,
            "keras-strategies supports the tensorflow, jax and torch backends only",
            "Set KERAS_BACKEND to one of them.",
        )
    return importlib.import_module(
        f"keras_strategies.backends.{name}.{strategy.implementation}"
    )
