"""Finds the active backend's implementation of a strategy.

A backend's modules (and so its framework) are imported only when that
backend is active, so `import keras_strategies` works with just one framework
installed.
"""

import importlib

import keras

from keras_strategies.errors import unsupported

SUPPORTED_BACKENDS = ("tensorflow", "jax", "torch")


def backend_name():
    """Returns the active Keras backend's name (`keras.backend.backend()`)."""
    return keras.backend.backend()


def implementation(strategy, devices, **options):
    """Builds the active backend's implementation of `strategy`.

    The strategy's class names its family (`_family`, e.g. `"local"`): the
    module `keras_strategies.backends.<backend>.<family>`, whose
    `IMPLEMENTATIONS` maps strategy class names to implementation classes.
    A user's subclass of a strategy gets its parent's implementation.

    Args:
        strategy: a `keras_strategies.Strategy`.
        devices: the devices asked for, or `None`.
        **options: the strategy's other arguments.

    Returns:
        A `keras_strategies.implementation.base.Implementation`.
    """
    name = backend_name()
    strategy_name = type(strategy).__name__
    if name not in SUPPORTED_BACKENDS:
        raise unsupported(
            strategy_name, name,
            "keras-strategies supports the tensorflow, jax and torch backends only",
            "Set KERAS_BACKEND to one of them.",
        )
    module = importlib.import_module(f"keras_strategies.backends.{name}.{strategy._family}")
    for cls in type(strategy).__mro__:
        implementation_class = module.IMPLEMENTATIONS.get(cls.__name__)
        if implementation_class is not None:
            return implementation_class.create(strategy, devices, **options)
    raise unsupported(strategy_name, name, f"{module.__name__} has no implementation of it")


def local_accelerators():
    """The active backend's accelerators on this machine, as Keras names.

    Each backend finds them the cheapest way it has
    (`keras_strategies.backends.<backend>.base.accelerators`): TensorFlow
    lists its physical devices, PyTorch counts CUDA devices (and asks
    `torch_xla` for TPUs when it is installed), JAX lists the devices of its
    default platform.

    Returns:
        A list such as `["gpu:0", "gpu:1"]` or `["tpu:0", ...]`; `[]` on a
        machine without accelerators or on a backend this package does not
        support.
    """
    name = backend_name()
    if name not in SUPPORTED_BACKENDS:
        return []
    return importlib.import_module(f"keras_strategies.backends.{name}.base").accelerators()


def keep_host_memory():
    """Keeps host memory mapped between training steps when the active backend
    computes on this machine's CPU (`implementation.host_memory`; each backend
    tells: `keras_strategies.backends.<backend>.base.computes_on_host`).
    Called once, when `keras_strategies` is imported.

    Returns:
        Whether glibc's malloc settings were changed.
    """
    from keras_strategies.implementation import host_memory

    def computes_on_host():
        name = backend_name()
        if name not in SUPPORTED_BACKENDS:
            return False
        return importlib.import_module(f"keras_strategies.backends.{name}.base").computes_on_host()

    return host_memory.keep(computes_on_host)
