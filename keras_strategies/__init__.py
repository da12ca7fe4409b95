"""keras-strategies: tf.distribute-style strategies for Keras 3 on TF, JAX and torch.

Example:
```python
import keras, keras_strategies
model.fit(x, y, batch_size=256, distribution=keras_strategies.Mirrored())
```
"""

from keras_strategies import plugin as _plugin
from keras_strategies.central_storage import CentralStorage
from keras_strategies.cluster import ClusterError, ClusterSpec, resolve_cluster
from keras_strategies.errors import StrategyError, UnsupportedStrategyError, WorkerError
from keras_strategies.multi_worker import MultiWorkerMirrored
from keras_strategies.strategies import (
    Default,
    Mirrored,
    OneDevice,
    Strategy,
    current_strategy,
)
from keras_strategies.tpu import TPU

__version__ = "0.1.0"

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

_plugin.install()
