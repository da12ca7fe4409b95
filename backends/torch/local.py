"""PyTorch backend: Default, OneDevice and one-device Mirrored in this process.

`Mirrored` over several devices runs one process per device with
torch.distributed and DDP (`multi_worker.py`); a plain `python train.py`
starts those processes itself.
"""

import contextlib

import torch
from keras.src.backend.torch import core as torch_core
from keras_strategies.backends.torch.common import move_variables, torch_device
from keras_strategies.devices import normalize_devices

from keras_strategies.backend_base import BackendStrategy
from keras_strategies.devices import check_available, parse_device


def create(strategy, devices, **options):
    """Returns the PyTorch implementation of `strategy`.

    Mirrored over several devices is one process per device: see
    `keras_strategies.backends.torch.multi_worker.create_mirrored`.
    """
    if strategy.kind == "mirrored":
        if devices is not None:
            names = normalize_devices(devices, type(strategy).__name__)
        else:
            names = [f"gpu:{i}" for i in range(torch.cuda.device_count())]
        if len(names) > 1:
            from keras_strategies.backends.torch.multi_worker import create_mirrored

            return create_mirrored(strategy, names)
    return TorchStrategy(strategy, devices, **options)


class TorchStrategy(BackendStrategy):
    backend = "torch"

    def __init__(self, strategy, devices):
        super().__init__(strategy, devices)
        self.native = torch_device(self.devices[0])

    def resolve_devices(self, requested):
        gpus = torch.cuda.device_count()
        if requested is None:
            return ["gpu:0" if gpus else "cpu:0"]
        kind = parse_device(requested[0])[0]
        available = {"cpu": ["cpu:0"], "gpu": [f"gpu:{i}" for i in range(gpus)]}.get(kind, [])
        check_available(
            requested,
            available,
            self.name,
            self.backend,
            "PyTorch has one CPU device, 'cpu:0'." if kind == "cpu" else "",
        )
        return requested

    def scope(self):
        if self.kind == "default":
            return contextlib.nullcontext()
        return torch_core.device_scope(str(self.native))

    def attach(self, model):
        move_variables(model, self.native)

    def detach(self, model):
        move_variables(model, torch.device(torch_core.get_device()))
