"""One machine: `Default`, `OneDevice` and `Mirrored`."""

from keras_strategies.errors import StrategyError
from keras_strategies.strategies.base import Strategy


class Default(Strategy):
    """No distribution: one replica on the backend's default device.

    The same code path as the other strategies, so a script can switch
    strategies with one argument.

    Example:
    ```python
    model.fit(x, y, distribution=keras_strategies.Default())
    ```
    """

    _family = "local"

    def __init__(self):
        super().__init__(None)

    def __repr__(self):
        return f"Default(backend={self._backend!r}, devices={self.devices})"


class OneDevice(Strategy):
    """Everything (variables and computation) on one device.

    Args:
        device: a Keras-style device name such as `"cpu:0"` or `"gpu:1"`.

    Example:
    ```python
    model.fit(x, y, distribution=keras_strategies.OneDevice("gpu:0"))
    ```
    """

    _family = "local"

    def __init__(self, device):
        if isinstance(device, (list, tuple)):
            raise StrategyError(
                f"OneDevice takes one device name, got {device!r}; use "
                "Mirrored(devices=...) for several."
            )
        super().__init__([device])


class Mirrored(Strategy):
    """Synchronous data parallelism over the devices of one machine.

    The model is replicated on every device, each global batch is split
    evenly over the replicas, and the gradients are all-reduced each step,
    so training gives the same weights as one device on the whole batch.
    Batch-normalisation statistics are computed over the global batch.

    Args:
        devices: Keras-style device names, e.g. `["gpu:0", "gpu:1"]`.
            `None` means every local GPU (or TPU core), or one CPU when
            there is none. On a CPU-only machine `["cpu:0", "cpu:1"]` gives
            two real replicas on TensorFlow and JAX when the strategy is
            created before the backend has started.

    Example:
    ```python
    with keras_strategies.Mirrored(["gpu:0", "gpu:1"]).scope():
        model = build_model(); model.compile(...)
    model.fit(x, y, batch_size=256)
    ```
    """

    _family = "local"

    def __init__(self, devices=None):
        super().__init__(devices)
