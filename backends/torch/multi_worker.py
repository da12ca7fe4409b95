"""PyTorch MultiWorkerMirrored (and Mirrored over several devices): one
process per device, `torch.distributed` and DDP inside Keras's own train step.

The step itself is in `ddp.py`, metric reduction in `metrics.py`, global
BatchNormalization in `batchnorm.py`; this module forms the process group and
puts them together for each run.
"""

import contextlib
import datetime

import torch
import torch.distributed as dist

from keras_strategies.backends.torch.base import TorchImplementation, torch_device
from keras_strategies.backends.torch.batchnorm import global_batch_normalization
from keras_strategies.backends.torch.ddp import DataParallelStep
from keras_strategies.backends.torch.fused_adam import fused_adam
from keras_strategies.backends.torch.layout import copy_free_layouts
from keras_strategies.implementation import data as data_lib
from keras_strategies.implementation.multi_process import MultiProcessImplementation


class TorchMultiWorkerMirrored(MultiProcessImplementation, TorchImplementation):
    """One replica per process; gradients all-reduced by DDP each step."""

    keras_patches = ("torch-copy-free-layouts",)
    lost_contact_markers = ("Connection closed", "Connection reset", "Timed out", "timed out",
                            "Gloo", "gloo", "NCCL", "peer", "Broken pipe")

    def __init__(self, strategy, devices, cluster, timeout):
        super().__init__(strategy, devices, cluster, timeout)
        self.native = torch_device(self.devices[self.cluster.local_rank % len(self.devices)])
        self.step = DataParallelStep(self.native)
        if self.multi_process and not dist.is_initialized():
            self._init_process_group()

    @property
    def num_replicas_in_sync(self):
        return self.cluster.world_size

    def default_devices(self):
        if torch.cuda.is_available():
            return [f"gpu:{self.cluster.local_rank % torch.cuda.device_count()}"]
        return ["cpu:0"]

    def available_devices(self, kind, requested):
        if kind == "cpu":  # Mirrored over CPU "devices": one process each, all on the CPU
            return list(requested), ""
        return super().available_devices(kind, requested)

    def _init_process_group(self):
        if not self.cluster.coordinator:
            raise self.unsupported(
                "the cluster description has no coordinator address",
                "Set MASTER_ADDR and MASTER_PORT (or start with keras-strategies launch).",
            )
        if torch.cuda.is_available():
            torch.cuda.set_device(self.native)
        try:
            dist.init_process_group(
                backend="nccl" if torch.cuda.is_available() else "gloo",
                init_method=f"tcp://{self.cluster.coordinator}",
                rank=self.cluster.rank,
                world_size=self.cluster.world_size,
                timeout=datetime.timedelta(seconds=self.timeout),
            )
        except Exception as error:  # noqa: BLE001 - re-raised with context
            raise self.join_error(error) from error

    def prepare_call(self, model, method, arguments):
        return data_lib.shard_call(
            method, arguments, self.cluster.rank, self.cluster.world_size, self.strategy,
            seed=data_lib.shuffle_seed(),
        )

    @contextlib.contextmanager
    def run_context(self, model):
        with fused_adam(getattr(model, "optimizer", None)), self.scope():
            if not self.multi_process:
                yield
                return
            with self.step.training(model, self.cluster.world_size), \
                    global_batch_normalization(model, self.step):
                yield


IMPLEMENTATIONS = {"MultiWorkerMirrored": TorchMultiWorkerMirrored}
