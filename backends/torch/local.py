"""PyTorch backend: Default and OneDevice in this process.

`Mirrored` over one device is `OneDevice`. Over several devices it needs one
process per device (torch.distributed), which this release does not have yet:
it raises a clear error instead.
"""

import contextlib

import torch
from keras.src.backend.torch import core as torch_core
from keras_strategies.backends.torch.common import move_variables, torch_device

from keras_strategies.backend_base import BackendStrategy
from keras_strategies.devices import check_available, parse_device


def create(strategy, devices, **options):
    """Returns the PyTorch implementation of `strategy`."""
    return TorchStrategy(strategy, devices, **options)


class TorchStrategy(BackendStrategy):
    backend = "torch"

    def __init__(self, strategy, devices):
        super().__init__(strategy, devices)
        self.native = torch_device(self.devices[0])

    def resolve_devices(self, requested):
        gpus = torch.cuda.device_count()
        if requested is None:
            if self.kind == "mirrored" and gpus > 1:
                requested = [f"gpu:{i}" for i in range(gpus)]
            else:
                return ["gpu:0" if gpus else "cpu:0"]
        if len(requested) > 1:
            raise self.unsupported(
                f"training over {len(requested)} devices {requested} needs one "
                "process per device (torch.distributed), and multi-process "
                "training is not in this release yet",
                "Use one device, e.g. Mirrored(devices=['cpu:0']), or the "
                "tensorflow or jax backend for several devices in one process.",
            )
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
