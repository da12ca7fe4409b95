"""keras-strategies: tf.distribute-style strategies for Keras 3 on TF, JAX and torch.

Example:
```python
import keras, keras_strategies
model.fit(x, y, batch_size=256, distribution=keras_strategies.Mirrored())
```
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
    from keras_strategies import plugin
    from keras_strategies.central_storage import CentralStorage
    from keras_strategies.cluster import ClusterError, ClusterSpec, resolve_cluster
    from keras_strategies.errors import StrategyError, UnsupportedStrategyError, WorkerError
    from keras_strategies.multi_worker import MultiWorkerMirrored
    from keras_strategies.strategies import Default, Mirrored, OneDevice, Strategy, current_strategy
    from keras_strategies.tpu import TPU

    globals().update({name: value for name, value in locals().items() if name in __all__})
    plugin.install()


__all__ = [
    "ClusterError",
    "ClusterSpec",
    "CentralStorage",
    "Default",
    "Mirrored",
    "MultiWorkerMirrored",
    "OneDevice",
    "Strategy",
    "StrategyError",
    "TPU",
    "UnsupportedStrategyError",
    "WorkerError",
    "current_strategy",
    "resolve_cluster",
]

if _only_launching():

    def __getattr__(name):
        if name in __all__:
            _load()
            return globals()[name]
        raise AttributeError(f"module 'keras_strategies' has no attribute {name!r}")

else:
    _load()
