"""What a strategy does: the backend-neutral strategy classes, one module per family.

- `base`: `Strategy`, the scope stack and the run of one fit/evaluate/predict.
- `local`: `Default`, `OneDevice`, `Mirrored` (one machine).
- `multi_worker`: `MultiWorkerMirrored` (processes on one or more machines).
- `central_storage`: `CentralStorage`.
- `parameter_server`: `ParameterServer` (asynchronous, parameter-server processes).
- `tpu`: `TPU`.

How each backend does it lives in `keras_strategies.backends.<backend>.<family>`.
"""

from keras_strategies.strategies.base import Strategy, current_strategy, model_strategy
from keras_strategies.strategies.central_storage import CentralStorage
from keras_strategies.strategies.local import Default, Mirrored, OneDevice
from keras_strategies.strategies.multi_worker import MultiWorkerMirrored
from keras_strategies.strategies.parameter_server import ParameterServer
from keras_strategies.strategies.tpu import TPU

__all__ = [
    "CentralStorage", "Default", "Mirrored", "MultiWorkerMirrored", "OneDevice", "ParameterServer",
    "Strategy", "TPU",
    "current_strategy", "model_strategy",
]
