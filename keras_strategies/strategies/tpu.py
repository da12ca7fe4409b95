"""TPU: synchronous data parallelism over the cores of a TPU."""

from keras_strategies.strategies.base import Strategy


class TPU(Strategy):
    """Synchronous data parallelism over TPU cores.

    - TensorFlow: `TPUClusterResolver(tpu)` +
      `tf.tpu.experimental.initialize_tpu_system` + `tf.distribute.TPUStrategy`.
    - JAX: a `keras.distribution.DataParallel` mesh over `jax.devices("tpu")`
      (every host's cores once `jax.distributed.initialize()` has run on each
      host of a pod, as for MultiWorkerMirrored).
    - PyTorch: `torch_xla`'s devices of this process, one replica each, with
      the master parameters on the first (as CentralStorage does).

    Each global batch is split evenly over the cores. Not run on TPU
    hardware by this project yet: on a machine without a TPU (or without
    `torch_xla` on PyTorch) it raises an `UnsupportedStrategyError` naming the
    backend and what is missing.

    Args:
        tpu: TensorFlow only: the TPU's name or `grpc://` address, as for
            `TPUClusterResolver`; `None` means the TPU of this VM (or
            `$TPU_NAME`). JAX and PyTorch use this host's TPU devices and take
            `None` or `"local"`.

    Returns:
        A strategy usable as `fit(..., distribution=strategy)` or with
        `strategy.scope()`.

    Example:
    ```python
    strategy = keras_strategies.TPU()
    with strategy.scope():
        model = build_model(); model.compile(...)
    model.fit(x, y, batch_size=1024)  # 128 per core on a v3-8
    ```
    """

    _family = "tpu"

    def __init__(self, tpu=None):
        super().__init__(None, tpu=tpu)

    def __repr__(self):
        return f"TPU(backend={self._backend!r}, devices={self.devices})"
