"""keras-strategies: tf.distribute-style strategies for Keras 3 on TF, JAX and torch.

Example:
```python
import keras, keras_strategies
model.fit(x, y, batch_size=256, distribution=keras_strategies.Mirrored())
```

Every public name is exported here. The package's rooms: `strategies` (what
each strategy does), `cluster` (who this process is in a job), `launch` (how
the processes of a job start), `implementation` (what every backend's
implementation builds on), `backends` (the TensorFlow, JAX and PyTorch
implementations), and the plumbing beside them: `auto` (the strategy that
fits where the program runs), `plugin` (`distribution=` on `fit`), `loader`
(the active backend's implementation), `patches` (every change made to
Keras), `errors`, `devices`.
"""

import os as _os
import sys as _sys

__version__ = "0.1.0"


def _only_launching():
    """True in the launcher's own process (`keras-strategies launch`,
    `python -m keras_strategies.launch`): it needs neither keras nor an engine,
    and importing them would add seconds before any rank starts."""
    argv = getattr(_sys, "orig_argv", [])
    if "-m" in argv and argv[argv.index("-m") + 1:][:1] == ["keras_strategies.launch"]:
        return True
    return _os.path.basename(_sys.argv[0] if _sys.argv else "") == "keras-strategies"


def _load():
    import keras

    from keras_strategies import loader, patches, plugin
    from keras_strategies.auto import auto
    from keras_strategies.cluster import ClusterError, ClusterSpec, resolve_cluster
    from keras_strategies.errors import (
        PREEMPTED_EXIT_CODE,
        KerasStrategiesError,
        LaunchError,
        StrategyError,
        UnsupportedStrategyError,
        WorkerError,
    )
    from keras_strategies.plugin import install, uninstall
    from keras_strategies.strategies import (
        TPU,
        CentralStorage,
        Default,
        Mirrored,
        MultiWorkerMirrored,
        OneDevice,
        ParameterServer,
        Strategy,
        current_strategy,
    )

    globals().update({name: value for name, value in locals().items() if name in __all__})
    patches.check_keras_version(keras.__version__)
    loader.keep_host_memory()  # before the engine's threads allocate (implementation/host_memory.py)
    plugin.install()


__all__ = [
    "PREEMPTED_EXIT_CODE",
    "CentralStorage",
    "ClusterError",
    "ClusterSpec",
    "LaunchError",
    "Default",
    "KerasStrategiesError",
    "Mirrored",
    "MultiWorkerMirrored",
    "OneDevice",
    "ParameterServer",
    "Strategy",
    "StrategyError",
    "TPU",
    "UnsupportedStrategyError",
    "WorkerError",
    "auto",
    "current_strategy",
    "install",
    "resolve_cluster",
    "uninstall",
]

if _only_launching():

    def __getattr__(name):
        if name in __all__:
            _load()
            return globals()[name]
        raise AttributeError(f"module 'keras_strategies' has no attribute {name!r}")

else:
    _load()
