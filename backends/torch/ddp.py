"""The PyTorch multi-process training step: Keras's own train_step with the
forward pass through `DistributedDataParallel`.

DDP's bucketed all-reduce overlaps the backward pass. A model with its own
`train_step` gets its gradients all-reduced inside `optimizer.apply` instead.
Each step weights every worker's gradient by its share of the global batch
(exact for an uneven last batch), and the metric state rides along in the
same collective, so a step costs one all-reduce.
"""

import contextlib

import torch
import torch.distributed as dist
from keras.src import tree
from keras.src.backend.torch.trainer import TorchTrainer
from keras.src.trainers.data_adapters import data_adapter_utils
from torch.nn.parallel import DistributedDataParallel

from keras_strategies.backends.torch import fused_loss, fused_sgd
from keras_strategies.backends.torch.metrics import (
    flat_metric_state,
    global_metrics,
    metric_versions,
    reduced_metric_variables,
)
from keras_strategies.implementation.model_state import state_variables
from keras_strategies.patches import overriding


def batch_size(data):
    """The number of examples in a batch."""
    x, _, _ = data_adapter_utils.unpack_x_y_sample_weight(data)
    return next(i for i in tree.flatten(x) if i is not None).shape[0]


class DataParallelStep:
    """What one worker's training step needs, and its state between the
    forward pass, DDP's communication hook and the optimizer.

    Args:
        device: this worker's `torch.device`.
    """

    def __init__(self, device):
        self.device = device
        self._ddp = {}  # id(model) -> DDP wrapper (kept out of Keras tracking)
        self._group = None
        self.local_count = 0  # this worker's examples in the current step
        self.moments_weight = 1.0  # see batchnorm.CountWeightedSum
        self.in_custom_step = False
        self.metric_variables = None  # metric state the all-reduce carries
        self.metric_cache = None  # (versions, reduced state) from it
        self.global_count = None  # summed example counts, carried in the all-reduce
        self._carried_versions = None  # metric_versions of the carried state

    def sync_weights(self, model):
        """Rank 0's model, optimizer and metric state, to every worker."""
        for variable in state_variables(model):
            if variable._value is not None:
                dist.broadcast(variable._value.data, src=0)

    def _ddp_for(self, model):
        """DDP over `model` and this step's carrier (`_Carried`), made once."""
        wrapper = self._ddp.get(id(model))
        if wrapper is None:
            metrics = reduced_metric_variables(model)
            size = 1 + (flat_metric_state(metrics, torch.float32).numel() if metrics else 0)
            # Keras keeps every variable as a Parameter (no buffers to sync).
            wrapper = DistributedDataParallel(
                _Carried(model, size, self.device),
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                gradient_as_bucket_view=True,  # no copy between gradients and buckets
            )
            self._group = dist.distributed_c10d._get_default_group()
            wrapper.register_comm_hook(None, self._comm_hook)
            self._ddp[id(model)] = wrapper
        return wrapper

    def _comm_hook(self, state, bucket):
        """Every bucket summed in place; the division by the summed example
        count comes once backward is done (`_apply_average`)."""
        return self._group.allreduce([bucket.buffer()]).get_future().then(lambda done: done.value()[0])

    # One collective per step. DDP's gradient all-reduce also carries this
    # worker's example count (the loss was multiplied by it, so the sum over
    # workers divided by the summed counts is the global batch's gradient,
    # exact for an uneven last batch) and the metric state (totals and
    # counts), so every worker's logs are global without collectives of their
    # own. Profiled on 2 CPU processes: the two extra collectives were ~19% of
    # a step, and each one is a sync point. They ride as the gradient of the
    # carrier, a parameter of ours that holds zeros: the loss gets
    # `dot(carrier, payload)` added, which is 0 and adds nothing to any other
    # gradient, and whose gradient is `payload`; DDP sums it with the rest.
    # (Before, the last bucket was copied into a longer buffer with the
    # payload appended and copied back: two copies of the whole bucket.)
    def _carry(self, carrier, loss):
        """`loss` with the payload's term added; notes what it carries."""
        metrics = self.metric_variables
        parts = [torch.full((1,), float(self.local_count), dtype=carrier.dtype, device=carrier.device)]
        versions = None
        if metrics:
            state = [v.value.detach().reshape(-1) for v in metrics]
            if sum(t.numel() for t in state) + 1 == carrier.numel():
                parts += [t if t.dtype == carrier.dtype else t.to(carrier.dtype) for t in state]
                versions = metric_versions(metrics)
        if versions is None and carrier.numel() > 1:  # the metric state changed size: not carried
            parts.append(carrier.new_zeros(carrier.numel() - 1))
        self._carried_versions = versions
        carrier.grad = None  # DDP makes it a view of its bucket again
        return loss + torch.dot(carrier, torch.cat(parts) if len(parts) > 1 else parts[0])

    def _take_carried(self, carrier):
        """After backward: the summed count, and the summed metric state."""
        total = carrier.grad.clone()  # the grad is a view of DDP's bucket, reused next step
        self.global_count = total[0]
        if self._carried_versions is not None:
            self.metric_cache = (self._carried_versions, total[1:])

    def _apply_average(self, optimizer, gradients, weights):
        """Summed count-weighted gradients -> the global batch's gradient,
        applied: divided here, or inside a fused SGD update that can fold
        the division in (`fused_sgd.folds_count`)."""
        count, self.global_count = self.global_count, None
        if count is None:
            raise RuntimeError("keras_strategies: DDP's all-reduce did not carry the example count")
        if fused_sgd.folds_count(optimizer, weights):
            with fused_sgd.dividing_by(count):
                return optimizer.apply(gradients, weights)
        torch._foreach_div_([g for g in gradients if g is not None], count)
        return optimizer.apply(gradients, weights)

    def train_step(self, model):
        """Keras's TorchTrainer.train_step, with the forward pass through DDP."""
        from keras.src.trainers.trainer import Trainer

        default_metrics = type(model).compute_metrics is Trainer.compute_metrics

        def train_step(data):
            self.local_count = batch_size(data)
            x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
            ddp = self._ddp_for(model)
            carrier = ddp.module.carrier
            if model._call_has_training_arg:
                y_pred = ddp(x, training=True)
            else:
                y_pred = ddp(x)
            model.zero_grad()
            loss = fused_loss.loss(model, y, y_pred, sample_weight)
            if loss is None:
                loss = model._compute_loss(
                    x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
                )
            if not fused_loss.track(model._loss_tracker, loss, self.local_count):
                model._loss_tracker.update_state(loss, sample_weight=self.local_count)
            weights = model.trainable_weights  # a fresh list, walked once a step
            fused = default_metrics and bool(weights)
            if fused:  # before backward, so the all-reduce carries the new state
                if model._compile_metrics is not None:
                    model._compile_metrics.update_state(y, y_pred, sample_weight)
                self.metric_variables = reduced_metric_variables(model)
            if model.optimizer is not None:
                loss = model.optimizer.scale_loss(loss)
            loss = loss * float(self.local_count)  # see _carry
            self.moments_weight = 1.0
            try:
                if weights:
                    self._carry(carrier, loss).backward()  # DDP all-reduces (the comm hook)
                    self._take_carried(carrier)
                    gradients = [v.value.grad for v in weights]
                    with torch.no_grad():
                        self._apply_average(model.optimizer, gradients, weights)
            finally:
                self.metric_variables = None
            if fused:
                return model.get_metrics_result()
            return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

        return train_step

    def custom_train_step(self, model, train_step):
        """A user's train_step: gradients are all-reduced in optimizer.apply."""

        def step(data):
            self.local_count = batch_size(data)
            self.moments_weight = float(self.local_count)
            self.in_custom_step = True
            try:
                return train_step(data)
            finally:
                self.in_custom_step = False

        return step

    def all_reducing_apply(self, apply):
        def all_reduced(grads, trainable_variables=None):
            present = [g for g in grads if g is not None]
            if self.in_custom_step and present:
                # one packed all-reduce: sum(count_i * grad_i) / sum(count_i)
                count = float(self.local_count)
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

    @contextlib.contextmanager
    def training(self, model, world_size):
        """While entered, `model` trains with this step (the `torch-ddp-step`
        patch): its train_step, its metric results, and for a custom
        train_step its optimizer's `apply`.

        Args:
            model: the Keras model.
            world_size: the number of workers.
        """
        custom = type(model).train_step is not TorchTrainer.train_step
        step = self.custom_train_step(model, model.train_step) if custom else self.train_step(model)
        metrics = global_metrics(model, model.get_metrics_result, self, world_size)
        optimizer = getattr(model, "optimizer", None)
        with contextlib.ExitStack() as stack:
            stack.enter_context(overriding(model, "train_step", step, "torch-ddp-step"))
            stack.enter_context(overriding(model, "get_metrics_result", metrics, "torch-ddp-step"))
            if optimizer is not None and custom:
                apply = self.all_reducing_apply(optimizer.apply)
                stack.enter_context(overriding(optimizer, "apply", apply, "torch-ddp-step"))
            yield


class _Carried(torch.nn.Module):
    """What DDP wraps: the Keras model, and the carrier, a parameter of ours
    whose gradient is the step's example count and metric state
    (`DataParallelStep._carry`). It holds zeros and is never updated.

    Args:
        model: the Keras model (a `torch.nn.Module` under the torch backend).
        size: the carrier's length: 1 + the metric state's.
        device: this worker's device.
    """

    def __init__(self, model, size, device):
        super().__init__()
        self.model = model
        self.carrier = torch.nn.Parameter(torch.zeros(size, device=device))

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)
