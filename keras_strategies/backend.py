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


def backend_module(strategy_name="keras_strategies"):
    """Imports and returns `keras_strategies.backends.<active backend>`.

    Args:
        strategy_name: used in the error raised for an unsupported backend.

    Returns:
        The backend implementation module.
    """
    name = backend_name()
    if name not in SUPPORTED_BACKENDS:
        raise unsupported(
            strategy_name,
            name,
            "keras-strategies supports the tensorflow, jax and torch backends only",
            "Set KERAS_BACKEND to one of them.",
        )
    return importlib.import_module(f"keras_strategies.backends.{name}")
