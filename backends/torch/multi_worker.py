"""PyTorch MultiWorkerMirrored (and Mirrored over several devices): one
process per device, `torch.distributed` and DDP inside Keras's own train step.

The step itself is in `ddp.py`, metric reduction in `metrics.py`, global
BatchNormalization in `batchnorm.py`; this module forms the process group and
puts them together for each run.
"""

import atexit
import contextlib
import datetime
import os

import numpy as np
import torch
import torch.distributed as dist

from keras_strategies.backends.torch.base import TorchImplementation, host_tensor, torch_device
from keras_strategies.backends.torch.batchnorm import global_batch_normalization
from keras_strategies.backends.torch.ddp import DataParallelStep
from keras_strategies.backends.torch.fused_adam import fused_adam
from keras_strategies.backends.torch.fused_sgd import fused_sgd
from keras_strategies.backends.torch.layout import copy_free_layouts
from keras_strategies.backends.torch.store import loopback_init_method
from keras_strategies.errors import StrategyError, WorkerError
from keras_strategies.implementation import data as data_lib
from keras_strategies.implementation.multi_process import (
    MultiProcessImplementation,
    loopback_interface,
    loopback_only,
)
from keras_strategies.patches import overriding


BACKEND_VARIABLE = "KERAS_STRATEGIES_TORCH_BACKEND"
_MIXED_HINT = (f"If other machines of this job have GPUs, they chose nccl and this one gloo: set "
               f"{BACKEND_VARIABLE}=gloo on every machine (gloo all-reduces CUDA tensors too).")


def process_group_backend(environ=None):
    """The `torch.distributed` backend of this process, which every process
    of a job must share: `KERAS_STRATEGIES_TORCH_BACKEND` (`gloo` or `nccl`)
    when set, else `nccl` with a GPU and `gloo` without. A job with a machine
    without GPUs among GPU machines sets `gloo` on every machine.

    Args:
        environ: the environment (`os.environ` when `None`).

    Returns:
        `"gloo"` or `"nccl"`.

    Example:
    >>> process_group_backend({"KERAS_STRATEGIES_TORCH_BACKEND": "gloo"})
    'gloo'
    """
    environ = os.environ if environ is None else environ
    chosen = environ.get(BACKEND_VARIABLE, "").strip().lower()
    if chosen not in ("", "gloo", "nccl"):
        raise StrategyError(f"{BACKEND_VARIABLE} must be gloo or nccl; got {environ[BACKEND_VARIABLE]!r}.")
    if chosen == "nccl" and not torch.cuda.is_available():
        raise StrategyError(
            f"{BACKEND_VARIABLE}=nccl, but this machine has no GPU (nccl needs one in every process): set "
            f"{BACKEND_VARIABLE}=gloo on every machine of the job."
        )
    return chosen or ("nccl" if torch.cuda.is_available() else "gloo")


def _destroy_process_group():
    """At exit, the process group this package formed is taken down before
    the interpreter's own teardown: left to it, a process whose peer (the
    store's host) had already gone was seen to abort ("terminate called
    without an active exception", a C++ thread destroyed while joinable) in
    about 1 run of 10 of a short 2-process job. Local only: no collective."""
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


class TorchMultiWorkerMirrored(MultiProcessImplementation, TorchImplementation):
    """One replica per process; gradients all-reduced by DDP each step."""

    keras_patches = ("torch-copy-free-layouts",)
    splits_predict = True
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
        backend = process_group_backend()
        try:
            dist.init_process_group(
                backend=backend,
                init_method=self._init_method(),
                rank=self.cluster.rank,
                world_size=self.cluster.world_size,
                timeout=datetime.timedelta(seconds=self.timeout),
            )
        except Exception as error:  # noqa: BLE001 - re-raised with context
            failure = self.join_error(error)
            if backend == "gloo" and not os.environ.get(BACKEND_VARIABLE):
                failure = WorkerError(f"{failure} {_MIXED_HINT}")
            raise failure from error
        atexit.register(_destroy_process_group)

    def _init_method(self):
        """torch's `tcp://` store, which listens on every interface; when every
        rank is on this machine, one that listens on loopback only (and gloo
        too). Under torchrun's agent store torch connects to torchrun's."""
        local, host = loopback_only(self.cluster)
        if local:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback_interface())
        if not local or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            return f"tcp://{self.cluster.coordinator}"
        return loopback_init_method(host, int(self.cluster.coordinator.rsplit(":", 1)[1]))

    def broadcast_bytes(self, data):
        if not self.multi_process:
            return data
        box = [data if self.is_chief else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def any_worker(self, flag):
        if not self.multi_process:
            return bool(flag)
        on = self.native if self.native.type == "cuda" else torch.device("cpu")
        value = torch.tensor([1.0 if flag else 0.0], device=on)
        dist.all_reduce(value)
        return bool(value.item() > 0)

    def prepare_call(self, model, method, arguments):
        rank, world = self.cluster.rank, self.cluster.world_size
        return data_lib.shard_call(method, arguments, rank, world, self.strategy, seed=self.call_seed,
                                   convert=host_tensor)

    def all_gather(self, array):
        on = self.native if self.native.type == "cuda" else torch.device("cpu")  # nccl gathers CUDA tensors
        local = torch.from_numpy(np.ascontiguousarray(array)).to(on)
        every = [torch.empty_like(local) for _ in range(self.cluster.world_size)]
        dist.all_gather(every, local)
        return [piece.cpu().numpy() for piece in every]

    @contextlib.contextmanager
    def run_context(self, model):
        optimizer = getattr(model, "optimizer", None)
        with fused_adam(optimizer), fused_sgd(optimizer), self.scope():
            if not self.multi_process:
                yield
                return
            self.step.sync_weights(model)  # rank 0's state everywhere, whatever runs first
            with self.step.training(model, self.cluster.world_size), \
                    global_batch_normalization(model, self.step), \
                    overriding(model, "_symbolic_build", self._synced_build(model), "torch-synced-build"):
                yield

    def _synced_build(self, model):
        """`_symbolic_build`, then rank 0's values of what it created (the
        optimizer's slots, the metrics: each worker's own until then)."""
        build = model._symbolic_build

        def symbolic_build(*args, **kwargs):
            result = build(*args, **kwargs)
            self.step.sync_weights(model)
            return result

        return symbolic_build


IMPLEMENTATIONS = {"MultiWorkerMirrored": TorchMultiWorkerMirrored}
