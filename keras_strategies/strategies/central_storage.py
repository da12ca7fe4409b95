"""CentralStorage: variables in one place, computation replicated."""

from keras_strategies.strategies.base import Strategy


class CentralStorage(Strategy):
    """Synchronous data parallelism with the variables stored in one place.

    As `tf.distribute.experimental.CentralStorageStrategy`: the variables (and
    the optimizer state) live on one storage device, the computation is
    replicated on the local compute devices, each global batch is split over
    the replicas, each step's gradients are reduced into the stored variables,
    and every replica reads the updated variables on the next step. Training
    gives the same weights as one device on the whole batch;
    BatchNormalization statistics are computed over the global batch.

    What happens per backend:

    - TensorFlow: the real `CentralStorageStrategy`; non-trainable variables
      (BatchNormalization statistics, ...) are MEAN-aggregated so they work.
    - JAX: the variables are committed to the storage device; each step copies
      the model's variables (not the optimizer's slot variables) to every
      compute device, runs forward and backward on the batch sharded over the
      compute devices, moves the summed gradients and the new non-trainable
      and metric values back to the storage device, and applies the optimizer
      there.
    - PyTorch: the model's own parameters are the master copy, and they and
      the optimizer state stay on the storage device; each step copies them
      to one replica per compute device (differentiably, as
      `torch.nn.DataParallel` does), runs the replicas on their slices of the
      batch, and the backward pass sums the replicas' gradients into the
      master parameters, which the optimizer updates.

    Args:
        devices: Keras-style names of the compute devices, e.g.
            `["gpu:0", "gpu:1"]`. `None` means every local GPU, or one CPU
            when there is none. On a CPU-only machine `["cpu:0", "cpu:1"]`
            gives two replicas on every backend (created before the backend
            starts, for TensorFlow and JAX; two replicas on the one `"cpu"`
            device for PyTorch).
        storage_device: where the variables live. `None` means the CPU, or
            the single compute device when there is exactly one accelerator.

    Returns:
        A strategy usable as `fit(..., distribution=strategy)` or with
        `strategy.scope()`.

    Example:
    ```python
    strategy = keras_strategies.CentralStorage(["gpu:0", "gpu:1"])
    with strategy.scope():
        model = build_model(); model.compile(...)
    model.fit(x, y, batch_size=256)  # 128 per replica
    ```
    """

    _family = "central_storage"

    def __init__(self, devices=None, storage_device=None):
        super().__init__(devices, storage_device=storage_device)

    @property
    def storage_device(self):
        """The Keras-style name of the device holding the variables."""
        return self._impl.storage_device

    def __repr__(self):
        return (
            f"CentralStorage(backend={self._backend!r}, devices={self.devices}, "
            f"storage_device={self.storage_device!r})"
        )
