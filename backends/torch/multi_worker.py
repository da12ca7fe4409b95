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
import math

import torch
import torch.distributed as dist
from keras.src import tree
from keras.src.backend.torch.core import to_torch_dtype
from keras.src.backend.torch.trainer import TorchTrainer
from keras.src.layers.normalization.batch_normalization import BatchNormalization
from keras.src.trainers.data_adapters import data_adapter_utils
from torch.nn.parallel import DistributedDataParallel

from keras_strategies import data as data_lib
from keras_strategies.backend_base import MultiProcessBackendStrategy
from keras_strategies.backend_base import join_error
from keras_strategies.backend_base import state_variables
from keras_strategies.backends.torch.common import torch_device
from keras_strategies.backends.torch.fused_adam import fused_adam
from keras_strategies.backends.torch.layout import copy_free_layouts
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


class _CountWeightedSum(torch.autograd.Function):
    """A sum over every worker whose backward weights each worker's incoming
    gradient by `count` (then divides by this worker's).

    Where each worker's gradients are weighted by its example count only after
    backward (a custom train_step: in the packed all-reduce), gradients that
    crossed workers here (global BatchNormalization moments) must carry the
    count of the worker whose loss they came from, so that an unevenly split
    batch still trains exactly as on one device. Where the loss itself was
    weighted before backward, `count` is 1: a plain sum.
    """

    @staticmethod
    def forward(ctx, tensor, count):
        ctx.count = count
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad):
        weighted = grad * ctx.count
        dist.all_reduce(weighted)
        return weighted / (ctx.count or 1.0), None


def _moment_sums(x, axes):
    """This worker's [sum of x, sum of x * x, element count] over `axes`, one
    tensor: what the BatchNormalization all-reduce adds up over workers."""
    count = torch.tensor([math.prod(x.shape[a] for a in axes)], dtype=x.dtype, device=x.device)
    return torch.cat([torch.sum(x, dim=axes), torch.sum(x * x, dim=axes), count])


def _moments(total):
    """Mean and (biased) variance from summed `_moment_sums`."""
    channels = (total.shape[0] - 1) // 2
    mean = total[:channels] / total[-1]
    return mean, torch.clamp(total[channels:2 * channels] / total[-1] - mean * mean, min=0.0)


class _GlobalBatchNorm(torch.autograd.Function):
    """BatchNormalization over the global batch in a few passes, forward and
    backward: `(x - mean) / sqrt(variance + epsilon) * gamma + beta` with the
    mean and variance of every worker's batch (one all-reduce each way).

    Keras's own layer composes it from about ten elementwise ops whose autograd
    graph reads the activation some twenty times per step (`aten::mul` was 29%
    of the benchmark BN convnet's CPU time); here the forward is two
    reductions and one fused multiply-add, the backward two reductions and two.
    The gradient is the one autograd takes through `_CountWeightedSum`: the
    sums of `dy` and `dy * x_hat` over every worker, each weighted by its
    worker's `count_weight`. Returns the normalized tensor, the mean and the
    (biased) variance, the last two for the moving statistics.
    """

    @staticmethod
    def forward(ctx, x, gamma, beta, axes, shape, epsilon, count_weight):
        total = _moment_sums(x, axes)
        dist.all_reduce(total)
        mean, variance = _moments(total)
        n = total[-1]
        invstd = torch.rsqrt(variance + epsilon)
        scale = invstd if gamma is None else invstd * gamma
        shift = -mean * scale if beta is None else beta - mean * scale
        y = torch.addcmul(shift.reshape(shape), x, scale.reshape(shape))
        ctx.save_for_backward(x, mean, invstd, scale)
        ctx.axes, ctx.shape, ctx.n, ctx.count_weight = axes, shape, n, count_weight
        ctx.has_gamma, ctx.has_beta = gamma is not None, beta is not None
        ctx.mark_non_differentiable(mean, variance)
        return y, mean, variance

    @staticmethod
    def backward(ctx, dy, _mean_grad, _variance_grad):
        x, mean, invstd, scale = ctx.saved_tensors
        axes, shape, n, weight = ctx.axes, ctx.shape, ctx.n, ctx.count_weight
        sum_dy = torch.sum(dy, dim=axes)
        sum_dy_xhat = (torch.sum(dy * x, dim=axes) - mean * sum_dy) * invstd
        gamma_grad = sum_dy_xhat if ctx.has_gamma else None
        beta_grad = sum_dy if ctx.has_beta else None
        total = torch.cat([sum_dy, sum_dy_xhat]) * weight
        dist.all_reduce(total)
        total = total / (weight or 1.0)
        channels = sum_dy.shape[0]
        mean_dy = total[:channels] / n
        q = scale * invstd * total[channels:] / n
        dx = torch.addcmul((q * mean - scale * mean_dy).reshape(shape), x, (-q).reshape(shape))
        dx = torch.addcmul(dx, dy, scale.reshape(shape))
        return dx, gamma_grad, beta_grad, None, None, None, None


def _batch_size(data):
    x, _, _ = data_adapter_utils.unpack_x_y_sample_weight(data)
    return next(i for i in tree.flatten(x) if i is not None).shape[0]


class TorchMultiWorker(MultiProcessBackendStrategy):
    backend = "torch"

    def __init__(self, strategy, devices, cluster, timeout):
        super().__init__(strategy, devices, cluster, timeout)
        self.native = torch_device(self.devices[self.cluster.local_rank % len(self.devices)])
        self._ddp = {}  # id(model) -> DDP wrapper (kept out of Keras tracking)
        self._local_count = 0  # this worker's examples in the current step
        self._moments_weight = 1.0  # see _CountWeightedSum
        self._in_custom_step = False
        self._metric_variables = None  # metric state the last bucket carries
        self._metric_cache = None  # (versions, reduced state) from that bucket
        self._global_count = None  # summed example counts, from that bucket
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
                model,
                device_ids=[self.native.index] if self.native.type == "cuda" else None,
                gradient_as_bucket_view=True,  # no copy between gradients and buckets
            )
            self._group = dist.distributed_c10d._get_default_group()
            wrapper.register_comm_hook(None, self._comm_hook)
            self._ddp[id(model)] = wrapper
        return wrapper

    # One collective per step. DDP's gradient all-reduce also carries this
    # worker's example count (the loss was multiplied by it, so the sum over
    # workers divided by the summed counts is the global batch's gradient,
    # exact for an uneven last batch) and the metric state (totals and
    # counts), so every worker's logs are global without collectives of their
    # own. Profiled on 2 CPU processes: the two extra collectives were ~19% of
    # a step, and each one is a sync point. Only the last bucket carries them:
    # the others are summed in place (no copies), and the gradients are
    # divided by the summed count once backward is done (`_average`).
    def _comm_hook(self, state, bucket):
        buffer = bucket.buffer()
        if not bucket.is_last():
            return self._group.allreduce([buffer]).get_future().then(lambda done: done.value()[0])
        parts = [buffer, buffer.new_tensor([float(self._local_count)])]
        metrics = self._metric_variables
        if metrics:
            parts.append(self._flat_metric_state(metrics, buffer.dtype))
            versions = self._metric_versions(metrics)
        size = buffer.numel()
        future = self._group.allreduce([torch.cat(parts)]).get_future()

        def unpack(done):
            total = done.value()[0]
            self._global_count = total[size]
            if metrics:
                self._metric_cache = (versions, total[size + 1:])
            return total[:size]

        return future.then(unpack)

    def _average(self, gradients):
        """Summed count-weighted gradients -> the global batch's gradient."""
        count, self._global_count = self._global_count, None
        if count is None:
            raise RuntimeError("keras_strategies: DDP's last bucket did not carry the example count")
        torch._foreach_div_([g for g in gradients if g is not None], count)

    @staticmethod
    def _flat_metric_state(variables, dtype):
        return torch.cat([v.value.detach().reshape(-1).to(dtype) for v in variables])

    @staticmethod
    def _metric_versions(variables):
        # in-place updates bump a tensor's version: the same on every worker,
        # since every worker runs the same updates (NaN-safe, unlike values)
        return tuple(v.value._version for v in variables)

    def _ddp_train_step(self, model):
        """Keras's TorchTrainer.train_step, with the forward pass through DDP."""
        from keras.src.trainers.trainer import Trainer

        default_metrics = type(model).compute_metrics is Trainer.compute_metrics

        def train_step(data):
            self._sync_once(model)
            self._local_count = _batch_size(data)
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
            model._loss_tracker.update_state(loss, sample_weight=self._local_count)
            fused = default_metrics and bool(model.trainable_weights)
            if fused:  # before backward, so the last bucket carries the new state
                if model._compile_metrics is not None:
                    model._compile_metrics.update_state(y, y_pred, sample_weight)
                self._metric_variables = self._reduced_metric_variables(model)
            if model.optimizer is not None:
                loss = model.optimizer.scale_loss(loss)
            loss = loss * float(self._local_count)  # see _comm_hook
            self._moments_weight = 1.0
            try:
                if model.trainable_weights:
                    loss.backward()  # DDP weights and all-reduces (the comm hook)
                    weights = model.trainable_weights[:]
                    gradients = [v.value.grad for v in weights]
                    with torch.no_grad():
                        self._average(gradients)
                        model.optimizer.apply(gradients, weights)
            finally:
                self._metric_variables = None
            if fused:
                return model.get_metrics_result()
            return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

        return train_step

    def _custom_train_step(self, model, train_step):
        """A user's train_step: gradients are all-reduced in optimizer.apply."""

        def step(data):
            self._sync_once(model)
            self._local_count = _batch_size(data)
            self._moments_weight = float(self._local_count)
            self._in_custom_step = True
            try:
                return train_step(data)
            finally:
                self._in_custom_step = False

        return step

    def _all_reducing_apply(self, apply):
        def all_reduced(grads, trainable_variables=None):
            present = [g for g in grads if g is not None]
            if self._in_custom_step and present:
                # one packed all-reduce: sum(count_i * grad_i) / sum(count_i)
                count = float(self._local_count)
                packed = torch.cat([g.reshape(-1) * count for g in present]
                                   + [present[0].new_tensor([count])])
                dist.all_reduce(packed)
                packed = packed[:-1] / packed[-1]
                offset = 0
                for grad in present:
                    grad.copy_(packed[offset:offset + grad.numel()].reshape(grad.shape))
                    offset += grad.numel()
            return apply(grads, trainable_variables)

        return all_reduced

    @staticmethod
    def _reduced_metric_variables(model):
        return [v for v in model.metrics_variables if v.aggregation in ("sum", "mean")]

    def _global_metrics(self, model, get_metrics_result):
        """Metric results computed from the state summed over every worker."""

        def result():
            variables = self._reduced_metric_variables(model)
            if not variables:
                return get_metrics_result()
            cache, self._metric_cache = self._metric_cache, None
            if cache is not None and cache[0] == self._metric_versions(variables):
                flat = cache[1]  # reduced in this step's gradient all-reduce
                self._metric_cache = cache
            else:
                flat = self._flat_metric_state(variables, torch.float64)
                dist.all_reduce(flat)
            # the results are computed from the global state, which stands in
            # for each variable's own tensor (swapped, not copied) meanwhile
            local = [v._value for v in variables]
            offset = 0
            try:
                for variable in variables:
                    shape = tuple(variable.shape)
                    size = math.prod(shape)
                    total = flat[offset:offset + size].reshape(shape)
                    offset += size
                    if variable.aggregation == "mean":
                        total = total / self.cluster.world_size
                    variable._value = total.to(to_torch_dtype(variable.dtype))
                return get_metrics_result()
            finally:
                for variable, value in zip(variables, local):
                    variable._value = value

        return result

    def _global_moments(self, layer):
        """BatchNormalization statistics over the global batch (all workers),
        differentiable, so every worker's moving statistics stay identical and
        training equals one device (as on the other backends)."""
        original = layer._moments

        def moments(inputs, mask):
            if mask is not None:
                return original(inputs, mask)
            total = _CountWeightedSum.apply(
                _moment_sums(inputs, tuple(layer._reduction_axes)), self._moments_weight
            )
            return _moments(total)

        return moments

    def _global_batch_norm(self, layer):
        """`layer.call` with `_GlobalBatchNorm` in training; everything else
        (inference, masks, renorm, other dtypes) is Keras's own call, whose
        moments are global too (`_global_moments`)."""
        original = layer.call

        def call(inputs, training=None, mask=None):
            if (
                not (training and layer.trainable) or mask is not None or layer.renorm
                or inputs.dtype != torch.float32 or layer.compute_dtype != "float32"
            ):
                return original(inputs, training=training, mask=mask)
            axes = tuple(layer._reduction_axes)
            shape = [1] * inputs.ndim
            shape[layer.axis] = inputs.shape[layer.axis]
            gamma = layer.gamma.value if layer.scale else None
            beta = layer.beta.value if layer.center else None
            outputs, mean, variance = _GlobalBatchNorm.apply(
                inputs, gamma, beta, axes, shape, layer.epsilon, self._moments_weight
            )
            momentum = layer.momentum
            layer.moving_mean.assign(layer.moving_mean.value * momentum + mean * (1.0 - momentum))
            layer.moving_variance.assign(layer.moving_variance.value * momentum + variance * (1.0 - momentum))
            return outputs

        return call

    # -- hooks -----------------------------------------------------------------
    def prepare_call(self, model, method, arguments):
        return data_lib.shard_call(
            method, arguments, self.cluster.rank, self.cluster.world_size, self.strategy,
            seed=shuffle_seed(),
        )

    @contextlib.contextmanager
    def run_context(self, model):
        with fused_adam(getattr(model, "optimizer", None)), copy_free_layouts():
            if not self.distributed:
                yield
            else:
                with self._distributed_run(model):
                    yield

    @contextlib.contextmanager
    def _distributed_run(self, model):
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
            layer.__dict__["call"] = self._global_batch_norm(layer)
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
                layer.__dict__.pop("call", None)
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
