"""PyTorch backend: MultiWorkerMirrored with torch.distributed and DDP.

One process per device. Keras's own training step runs with the model
wrapped in `DistributedDataParallel`, so DDP's bucketed all-reduce overlaps
the backward pass. A model with its own `train_step` gets its gradients
all-reduced inside `optimizer.apply` instead. Each step weights every
worker's gradient by its share of the global batch (exact for an uneven last
batch), and metrics are reduced from their state (totals and counts), so
every worker reports the global value.
"""

import contextlib
import datetime

import torch
import torch.distributed as dist
from keras.src import tree
from keras.src.backend.torch.trainer import TorchTrainer
from keras.src.layers.normalization.batch_normalization import BatchNormalization
from keras.src.trainers.data_adapters import data_adapter_utils
from torch.nn.parallel import DistributedDataParallel

from keras_strategies import data as data_lib
from keras_strategies.backend_base import MultiProcessBackendStrategy
from keras_strategies.backend_base import join_error
from keras_strategies.backend_base import state_variables
from keras_strategies.backends.torch.common import torch_device
from keras_strategies.errors import WorkerError
from keras_strategies.multi_worker import shuffle_seed


def create(strategy, devices, cluster, timeout, **options):
    """Returns the PyTorch implementation of a multi-process strategy."""
    return TorchMultiWorker(strategy, devices, cluster, timeout, **options)


def create_mirrored(strategy, devices):
    """Mirrored over several devices: one process per device.

    Started by a launcher (or torchrun), this process is one of them. Started
    as a plain `python train.py`, the script is started again as one process
    per device by `keras_strategies.launch.relaunch_this_script`, and this
    process only waits for them.
    """
    from keras_strategies.cluster import resolve_cluster
    from keras_strategies.errors import StrategyError
    from keras_strategies.launch import relaunch_this_script
    from keras_strategies.multi_worker import default_timeout

    cluster = resolve_cluster()
    if cluster.world_size == 1:
        relaunch_this_script(len(devices), type(strategy).__name__, "torch")
    if cluster.world_size != len(devices):
        raise StrategyError(
            f"{type(strategy).__name__}(devices={devices}) on the torch backend runs one "
            f"process per device, but this job has {cluster.world_size} processes "
            f"(from {cluster.source}). Start it with --nproc-per-node {len(devices)}, "
            "or use MultiWorkerMirrored() for one process per device across machines."
        )
    return TorchMultiWorker(strategy, devices, cluster, default_timeout())


def _batch_size(data):
    x, _, _ = data_adapter_utils.unpack_x_y_sample_weight(data)
    return next(i for i in tree.flatten(x) if i is not None).shape[0]


class TorchMultiWorker(MultiProcessBackendStrategy):
    backend = "torch"

    def __init__(self, strategy, devices, cluster, timeout):
        super().__init__(strategy, devices, cluster, timeout)
        self.native = torch_device(self.devices[self.cluster.local_rank % len(self.devices)])
        self._ddp = {}  # id(model) -> DDP wrapper (kept out of Keras tracking)
        self._share = None
        self._needs_sync = False
        self._init_process_group()



    @property
    def num_replicas_in_sync(self):
        return self.cluster.world_size

    @property
    def distributed(self):
        return self.cluster.world_size > 1

    def resolve_devices(self, requested):
        if requested:  # Mirrored: every local device, one per process
            available = [f"gpu:{i}" for i in range(torch.cuda.device_count())]
            for device in requested:
                if device.startswith("gpu") and device not in available:
                    raise self.unsupported(f"unknown device {device}; this machine has {available}")
            return requested
        if torch.cuda.is_available():
            return [f"gpu:{self.cluster.local_rank % torch.cuda.device_count()}"]
        return ["cpu:0"]

    def _init_process_group(self):
        if not self.distributed or dist.is_initialized():
            return
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
            raise join_error(self.name, "torch", self.cluster, self.timeout, error) from error

    # -- the training step ---------------------------------------------------
    def _sync_weights(self, model):
        """Rank 0's model, optimizer and metric state, to every worker."""
        for variable in state_variables(model):
            if variable._value is not None:
                dist.broadcast(variable._value.data, src=0)

    def _sync_once(self, model):
        """At the first step of a run, once Keras has built every variable."""
        if self._needs_sync:
            self._sync_weights(model)
            self._needs_sync = False

    def _ddp_for(self, model):
        wrapper = self._ddp.get(id(model))
        if wrapper is None:
            # Keras keeps every variable as a Parameter (no buffers to sync).
            wrapper = DistributedDataParallel(
                model, device_ids=[self.native.index] if self.native.type == "cuda" else None
            )
            self._ddp[id(model)] = wrapper
        return wrapper

    def _batch_share(self, local):
        """This worker's examples x workers / global examples, for this step."""
        counts = torch.tensor([float(local)])
        dist.all_reduce(counts)
        return float(local) * self.cluster.world_size / float(counts[0])

    def _ddp_train_step(self, model):
        """Keras's TorchTrainer.train_step, with the forward pass through DDP."""

        def train_step(data):
            self._sync_once(model)
            x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
            ddp = self._ddp_for(model)
            if model._call_has_training_arg:
                y_pred = ddp(x, training=True)
            else:
                y_pred = ddp(x)
            model.zero_grad()
            loss = model._compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
            )
            local = _batch_size(data)
            model._loss_tracker.update_state(loss, sample_weight=local)
            if model.optimizer is not None:
                loss = model.optimizer.scale_loss(loss)
            if model.trainable_weights:
                (loss * self._batch_share(local)).backward()
                weights = model.trainable_weights[:]
                gradients = [v.value.grad for v in weights]
                with torch.no_grad():
                    model.optimizer.apply(gradients, weights)
            return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

        return train_step

    def _custom_train_step(self, model, train_step):
        """A user's train_step: gradients are all-reduced in optimizer.apply."""

        def step(data):
            self._sync_once(model)
            self._share = self._batch_share(_batch_size(data))
            try:
                return train_step(data)
            finally:
                self._share = None

        return step

    def _all_reducing_apply(self, apply):
        def all_reduced(grads, trainable_variables=None):
            if self._share is not None:
                scale = self._share / self.cluster.world_size
                for grad in grads:
                    if grad is not None:
                        grad.mul_(scale)
                        dist.all_reduce(grad)
            return apply(grads, trainable_variables)

        return all_reduced

    def _global_metrics(self, model, get_metrics_result):
        """Metric results computed from the state summed over every worker."""

        def result():
            variables = [v for v in model.metrics_variables if v.aggregation in ("sum", "mean")]
            if not variables:
                return get_metrics_result()
            local = [v.value.detach().clone() for v in variables]
            flat = torch.cat([t.reshape(-1).to(torch.float64) for t in local])
            dist.all_reduce(flat)
            offset = 0
            for variable, value in zip(variables, local):
                total = flat[offset:offset + value.numel()].reshape(value.shape)
                offset += value.numel()
                if variable.aggregation == "mean":
                    total = total / self.cluster.world_size
                variable.value.data.copy_(total.to(value.dtype))
            try:
                return get_metrics_result()
            finally:
                for variable, value in zip(variables, local):
                    variable.value.data.copy_(value)

        return result

    def _global_moments(self, layer):
        """BatchNormalization statistics over the global batch (all workers),
        differentiable, so every worker's moving statistics stay identical and
        training equals one device (as on the other backends)."""
        from torch.distributed.nn import functional as dist_nn

        original = layer._moments

        def moments(inputs, mask):
            if mask is not None:
                return original(inputs, mask)
            axes = list(layer._reduction_axes)
            count = torch.ones((), dtype=inputs.dtype, device=inputs.device)
            for axis in axes:
                count = count * inputs.shape[axis]
            sums = torch.sum(inputs, dim=axes)
            squares = torch.sum(inputs * inputs, dim=axes)
            total = dist_nn.all_reduce(torch.cat([sums, squares, count.reshape(1)]))
            channels = sums.shape[0]
            mean = total[:channels] / total[-1]
            variance = torch.clamp(total[channels:2 * channels] / total[-1] - mean * mean, min=0.0)
            return mean, variance

        return moments

    # -- hooks -----------------------------------------------------------------
    def prepare_call(self, model, method, arguments):
        return data_lib.shard_call(
            method, arguments, self.cluster.rank, self.cluster.world_size, self.strategy,
            seed=shuffle_seed(),
        )

    @contextlib.contextmanager
    def run_context(self, model):
        if not self.distributed:
            yield
            return
        overrides = {"get_metrics_result": self._global_metrics(model, model.get_metrics_result)}
        if type(model).train_step is TorchTrainer.train_step:
            overrides["train_step"] = self._ddp_train_step(model)
        else:
            overrides["train_step"] = self._custom_train_step(model, model.train_step)
        optimizer = getattr(model, "optimizer", None)
        custom_step = type(model).train_step is not TorchTrainer.train_step
        if optimizer is not None and custom_step:
            optimizer.__dict__["apply"] = self._all_reducing_apply(optimizer.apply)
        model.__dict__.update(overrides)
        norms = [
            layer for layer in model._flatten_layers(include_self=False)
            if isinstance(layer, BatchNormalization)
        ]
        for layer in norms:
            layer.__dict__["_moments"] = self._global_moments(layer)
        try:
            self._needs_sync = True
            with self._failures_as_worker_errors():
                with self.scope():
                    yield
        finally:
            for name in overrides:
                model.__dict__.pop(name, None)
            for layer in norms:
                layer.__dict__.pop("_moments", None)
            if optimizer is not None:
                optimizer.__dict__.pop("apply", None)

    def scope(self):
        from keras.src.backend.torch import core as torch_core

        return torch_core.device_scope(str(self.native))

    @contextlib.contextmanager
    def _failures_as_worker_errors(self):
        try:
            yield
        except WorkerError:
            raise
        except (RuntimeError, dist.DistError) as error:
            text = str(error)
            if any(
                marker in text
                for marker in ("Connection closed", "Connection reset", "Timed out", "timed out",
                               "Gloo", "gloo", "NCCL", "peer", "Broken pipe")
            ):
                raise self.lost_contact(error) from error
            raise
