"""PyTorch, one machine: `Default`, `OneDevice` and `Mirrored`.

`Mirrored` over several devices runs one process per device with
torch.distributed and DDP (`multi_worker.TorchMultiWorkerMirrored`); a plain
`python train.py` starts those processes itself.
"""

import contextlib

import torch

from keras_strategies.backends.torch.base import TorchImplementation
from keras_strategies.devices import normalize_devices
from keras_strategies.implementation.multi_process import default_timeout, processes_for_devices


class TorchDefault(TorchImplementation):
    """The backend's default device, without a device scope."""

    # Keras's spare iterator at each epoch's end stays: making a shuffled
    # DataLoader's iterator draws from torch's generator, and without it the
    # next epochs' orders would not be plain Keras's after the same seed.
    epoch_patches = ()
    batch_patches = ()  # Default: plain Keras's own fit

    def scope(self):
        return contextlib.nullcontext()


class TorchOneDevice(TorchImplementation):
    """Everything on one device, under Keras's device scope."""

    epoch_patches = ()  # as `TorchDefault`: plain Keras's shuffle orders


class TorchMirrored(TorchImplementation):
    """One device: in this process. Several: one process per device."""

    @classmethod
    def create(cls, strategy, devices, **options):
        name = type(strategy).__name__
        if devices is not None:
            names = normalize_devices(devices, name)
        else:
            names = [f"gpu:{i}" for i in range(torch.cuda.device_count())]
        if len(names) > 1:
            from keras_strategies.backends.torch.multi_worker import TorchMultiWorkerMirrored

            cluster = processes_for_devices(names, name, cls.backend)
            return TorchMultiWorkerMirrored(strategy, names, cluster, default_timeout())
        return cls(strategy, devices, **options)


IMPLEMENTATIONS = {"Default": TorchDefault, "OneDevice": TorchOneDevice, "Mirrored": TorchMirrored}
