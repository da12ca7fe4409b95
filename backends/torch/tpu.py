"""PyTorch TPU: `torch_xla`'s XLA devices of this process as replicas.

The master parameters and the optimizer state live on the first XLA device
and each device runs a replica on its slice of the batch, exactly as
CentralStorage does (see `central_storage.py`). `find_tpu_devices` is the one
place that looks for TPUs; tests replace it. Not run on TPU hardware.
"""

from keras_strategies.backends.torch.central_storage import TorchCentralStorage
from keras_strategies.implementation.base import Implementation
from keras_strategies.implementation.placement import check_local_tpu


def find_tpu_devices(tpu):
    """This process's TPU devices, through `torch_xla`.

    Args:
        tpu: `None` or `"local"`.

    Returns:
        A list of `(keras_name, torch.device)` pairs; empty when torch_xla
        finds no TPU.

    Raises:
        ImportError: when `torch_xla` is not installed.
    """
    import torch_xla.core.xla_model as xm

    devices = xm.get_xla_supported_devices("TPU") or []
    return [(f"tpu:{i}", xm.xla_device(i)) for i in range(len(devices))]


class TorchTPU(TorchCentralStorage):
    """CentralStorage over the TPU cores, the master copy on the first."""

    def __init__(self, strategy, devices, tpu=None):
        self.name = type(strategy).__name__
        check_local_tpu(self, tpu, "torch_xla", "Use TPU() on the TPU VM.")
        try:
            found = find_tpu_devices(tpu)
        except ImportError as error:
            raise self.unsupported(
                f"torch_xla is not installed ({error})",
                "Install torch_xla[tpu] matching your torch version on a Cloud "
                "TPU VM, or use OneDevice/CentralStorage on this machine.",
            ) from None
        if not found:
            raise self.unsupported("torch_xla found no TPU devices", "Run on a Cloud TPU VM (PJRT_DEVICE=TPU).")
        self._found = [name for name, _ in found]
        Implementation.__init__(self, strategy, None)
        self.storage_device = self.devices[0]
        self.replica_devices = [device for _, device in found]
        self.native = self.replica_devices[0]
        self.last_step = None

    def default_devices(self):
        return list(self._found)


IMPLEMENTATIONS = {"TPU": TorchTPU}
