"""Keras's SGD update on torch in one fused kernel per step, with the
division of the summed gradients by the global example count folded in.

Keras 3.15's torch SGD with momentum (`torch_sgd.SGD._parallel_update_step`)
makes three `torch._foreach_*` passes over every parameter (scale the
momentum, add the gradient, add the momentum to the variable); the
multi-process step adds one more before it, dividing the all-reduced
gradients by the summed example count (`ddp.DataParallelStep`). torch's fused
SGD kernel does all of it in one pass. The two compute the same update:

    Keras:  m = momentum * m - lr * g / count;  var += m
            (nesterov: var += momentum * m - lr * g / count)
    fused:  g' = g / grad_scale with grad_scale = -count / lr
            buf = momentum * buf + g';  var -= lr' * buf with lr' = -1
            (nesterov: var -= lr' * (g' + momentum * buf))

so the kernel keeps Keras's own momentum variable `m` as its buffer. SGD
without momentum keeps Keras's own update, one `_foreach_add_` of
`-lr * g`, with the division folded into its factor (`-lr / count`)
instead of a pass of its own over every gradient. The results agree
to float rounding, not bit for bit, so like the fused Adam update
(`fused_adam.py`) it is used only where the gradient all-reduce already
changes the order of summation (MultiWorkerMirrored).

The count is folded in only when nothing in Keras's `Optimizer.apply` reads
the gradients before the update (`folds_count`): no clipping, no gradient
accumulation, no variable overwritten with its gradient. Everything else
`apply` does (learning rate schedules, weight decay, loss scale factor, EMA,
constraints, the iteration count) is Keras's own.
"""

import contextlib
import threading

import torch
from keras.src.backend.torch.optimizers.torch_sgd import SGD as KerasTorchSGD

from keras_strategies.patches import overriding

_active = set()  # id() of the optimizers whose update is the fused one now
_pending = threading.local()  # .count: the divisor of this step's gradients


def supports(optimizer):
    """Whether `optimizer` gets the fused update: Keras's SGD. With momentum
    it is torch's fused kernel; without, Keras's one `_foreach_add_` (faster
    than the kernel: `benchmarks/update_cost.py`, 0.37 against 0.40 ms for
    the benchmark MLP) with the division by the count folded into its factor
    (saves a `_foreach_div_` over the gradients, about 55 us of that MLP's
    step on one thread)."""
    if type(optimizer) is not KerasTorchSGD or not isinstance(optimizer.momentum, float):
        return False
    return optimizer.momentum == 0 or hasattr(torch, "_fused_sgd_")


def folds_count(optimizer, variables):
    """Whether `optimizer` can divide the summed gradients of `variables` by
    the example count inside its update (`dividing_by`): its fused update is
    active and nothing in `apply` reads the gradients before it."""
    return (id(optimizer) in _active
            and optimizer.clipnorm is None and optimizer.clipvalue is None
            and optimizer.global_clipnorm is None
            and not optimizer.gradient_accumulation_steps
            and not any(getattr(v, "overwrite_with_gradient", False) for v in variables))


@contextlib.contextmanager
def dividing_by(count):
    """While entered, the fused update divides the gradients by `count` (a
    number or a 0-d tensor), which the caller then leaves undivided."""
    _pending.count = count
    try:
        yield
    finally:
        _pending.count = None


def _grad_scale(count, lr, device):
    """The kernel's `grad_scale` (it divides the gradients by it): the buffer
    is Keras's m, so g' = -lr * g / count."""
    count = 1.0 if count is None else count
    return (torch.as_tensor(count, dtype=torch.float32) * (-1.0 / lr)).to(device).reshape(())


def fused_update_step(optimizer):
    """A replacement for `optimizer._backend_update_step`."""
    original = optimizer._backend_update_step

    @torch.no_grad()
    def update_step(grads, variables, learning_rate):
        count = getattr(_pending, "count", None)
        params = [v.value for v in variables]
        lr = float(learning_rate)
        if optimizer.momentum == 0:  # Keras's own update, the division folded in
            torch._foreach_add_(params, grads, alpha=-lr if count is None else -lr / float(count))
            return None
        device = params[0].device
        if lr == 0.0 or any(p.dtype != torch.float32 or p.device != device for p in params) or any(
            g.dtype != torch.float32 or g.device != device for g in grads
        ):
            if count is not None:
                grads = [g / count for g in grads]
            return original(grads, variables, learning_rate)
        index = optimizer._get_variable_index
        buffers = [optimizer.momentums[index(v)].value for v in variables]
        torch._fused_sgd_(
            params,
            [g.contiguous() for g in grads],
            buffers,
            weight_decay=0.0,  # Keras applies its own weight decay in apply()
            momentum=optimizer.momentum,
            lr=-1.0,
            dampening=0.0,
            nesterov=bool(optimizer.nesterov),
            maximize=False,
            is_first_step=False,  # Keras's momentum starts at zeros: the same
            grad_scale=_grad_scale(count, lr, device),
            found_inf=None,
        )

    return update_step


@contextlib.contextmanager
def fused_sgd(optimizer):
    """While entered, `optimizer` (if a plain Keras SGD) updates in one kernel
    (the `torch-fused-sgd` patch)."""
    if optimizer is None or not supports(optimizer):
        yield
        return
    with overriding(optimizer, "_backend_update_step", fused_update_step(optimizer), "torch-fused-sgd"):
        _active.add(id(optimizer))
        try:
            yield
        finally:
            _active.discard(id(optimizer))
