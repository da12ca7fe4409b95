"""keras-strategies: tf.distribute-style strategies for Keras 3 on TF, JAX and torch.

Example:
```python
import keras, keras_strategies
model.fit(x, y, batch_size=256, distribution=keras_strategies.Mirrored())
```
"""

from keras_strategies import plugin as _plugin
from keras_strategies.central_storage import CentralStorage
from keras_strategies.errors import StrategyError, UnsupportedStrategyError
from keras_strategies.strategies import (
    Default,
    Mirrored,
    OneDevice,
    Strategy,
    current_strategy,
)

__version__ = "0.1.0"

__all__ = [
    "CentralStorage",
    "Default",
    "Mirrored",
    "OneDevice",
    "Strategy",
    "StrategyError",
    "UnsupportedStrategyError",
    "current_strategy",
]

_plugin.install()
